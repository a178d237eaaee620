//! The flow sync datagram: what one node tells one peer, sealed with
//! HMAC-SHA256 under the shared key.
//!
//! ```text
//! offset  size  field
//!      0     4  magic "XLBS"
//!      4     1  version (2)
//!      5     1  type: 1 flows, 2 request for the full set of deviating flows
//!      6     2  record count (big endian; 0 in a request, and in the answer
//!               to a request when the answerer has nothing to send)
//!      8     8  session: a random number the sending process drew at start
//!     16     8  sequence number (big endian): 1, 2, 3... in the session,
//!               per destination
//!     24     8  sender's clock, unix ms (big endian)
//!     32    18  sender: its `listen` address (16 bytes, IPv4 as
//!               ::ffff:a.b.c.d) and port (big endian)
//!     50    18  destination: the receiver's `listen` address and port, alike
//!     68        records
//!   last    32  HMAC-SHA256 tag over everything before it
//!
//! record: family (4|6), protocol, client port, VIP port, backend port (0: the
//! VIP's), client address, VIP address, backend address. Ports are network
//! order; addresses 4 bytes (IPv4, 20-byte record) or 16 (IPv6, 56 bytes).
//! ```
//!
//! A record names its backend by address and port, never by id: backend ids
//! and generations are each node's own (allocated in the order it applied
//! its configurations). A datagram is at most 1400 bytes, so it fits an
//! Ethernet MTU with room for tunnels: 65 IPv4 or 23 IPv6 records.
//!
//! The sender and the destination are inside the tag: a datagram copied to
//! another node, or sent back to its own sender, names the wrong node and is
//! refused; the UDP source only has to agree with the sender it names.
//!
//! Opening refuses, and says why: a source address that is no configured
//! peer's; malformed (length, magic, version, type, record layout); a bad tag
//! (another key, or altered); addressed to another node's `listen` address;
//! naming a sender that is not the configured peer at its source address; a
//! clock more than 30 s away from ours; a replay. Replays are told per peer
//! and session, as IPsec does (RFC 4303 §3.4.3): of the 64 sequence numbers
//! up to the newest accepted, each passes once, in any order (datagrams
//! reordered on the way: several NIC queues, a bond); older ones do not
//! pass. A session other than the peer's current one is the peer restarted:
//! accepted at once, whatever its sequence numbers, if it is newer (its
//! clock is past the earliest accepted in the current one, and it is not
//! one the peer had before). Opening never panics, whatever the bytes.

use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use lb_common::maps::{FAMILY_V4, FAMILY_V6, FlowKey};
use ring::hmac;

pub const MAGIC: [u8; 4] = *b"XLBS";
pub const VERSION: u8 = 2;
pub const TYPE_FLOWS: u8 = 1;
pub const TYPE_REQUEST_FULL_SET: u8 = 2;
pub const HEADER_LEN: usize = 68;
pub const TAG_LEN: usize = 32;
/// Largest datagram sent or accepted.
pub const MAX_DATAGRAM: usize = 1400;
/// Room for records in one datagram.
pub const MAX_RECORD_BYTES: usize = MAX_DATAGRAM - HEADER_LEN - TAG_LEN;
pub const RECORD_V4_LEN: usize = 20;
pub const RECORD_V6_LEN: usize = 56;
/// IPv4 records in a full datagram.
pub const MAX_V4_RECORDS: usize = MAX_RECORD_BYTES / RECORD_V4_LEN;
/// A datagram whose clock is further than this from ours is refused.
pub const MAX_CLOCK_SKEW_MS: u64 = 30_000;
/// Sequence numbers this far behind the newest accepted are still accepted
/// once (the replay window).
pub const REPLAY_WINDOW: u64 = 64;
/// A peer's earlier sessions are remembered this long after it started
/// another: by then every datagram of theirs fails the clock check (sent
/// before the new session began, by a clock at most 30 s ahead of ours).
const RETIRED_FOR_MS: u64 = 2 * MAX_CLOCK_SKEW_MS;
/// At most this many earlier sessions remembered per peer (a peer that
/// restarts more often than this in a minute is in a crash loop).
const MAX_RETIRED: usize = 32;
const ADDR_LEN: usize = 18;
const AT_COUNT: usize = 6;
const AT_SESSION: usize = 8;
const AT_SEQ: usize = 16;
const AT_CLOCK: usize = 24;
const AT_SENDER: usize = 32;
const AT_DESTINATION: usize = AT_SENDER + ADDR_LEN;

/// One flow as sent: the flow's key and its backend's address and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowRecord {
    /// Addresses and ports as in the FLOWS map (network order).
    pub flow: FlowKey,
    /// The backend's address words, of the flow's family.
    pub backend_addr: [u32; 4],
    /// Network order; 0: the VIP's port (as in `Backend::port`).
    pub backend_port: u16,
}

impl FlowRecord {
    pub fn wire_len(&self) -> usize {
        if self.flow.family == FAMILY_V4 { RECORD_V4_LEN } else { RECORD_V6_LEN }
    }

    fn write(&self, out: &mut Vec<u8>) {
        let words = if self.flow.family == FAMILY_V4 { 1 } else { 4 };
        out.push(self.flow.family);
        out.push(self.flow.protocol);
        // Ports and addresses are stored as their network-order bytes.
        out.extend_from_slice(&self.flow.sport.to_ne_bytes());
        out.extend_from_slice(&self.flow.dport.to_ne_bytes());
        out.extend_from_slice(&self.backend_port.to_ne_bytes());
        for addr in [&self.flow.src, &self.flow.dst, &self.backend_addr] {
            for w in &addr[..words] {
                out.extend_from_slice(&w.to_ne_bytes());
            }
        }
    }

    /// Reads one record from the front of `bytes`; returns it and its length.
    fn read(bytes: &[u8]) -> Result<(Self, usize), Refusal> {
        let (&family, _) = bytes.split_first().ok_or(Refusal::Malformed("record cut short"))?;
        let (len, words) = match family {
            FAMILY_V4 => (RECORD_V4_LEN, 1),
            FAMILY_V6 => (RECORD_V6_LEN, 4),
            _ => return Err(Refusal::Malformed("record of an unknown address family")),
        };
        let r = bytes.get(..len).ok_or(Refusal::Malformed("record cut short"))?;
        let port = |at: usize| u16::from_ne_bytes([r[at], r[at + 1]]);
        let addr = |at: usize| {
            let mut a = [0u32; 4];
            for (i, w) in a.iter_mut().take(words).enumerate() {
                let o = at + 4 * i;
                *w = u32::from_ne_bytes([r[o], r[o + 1], r[o + 2], r[o + 3]]);
            }
            a
        };
        let step = 4 * words;
        let flow = FlowKey {
            src: addr(8),
            dst: addr(8 + step),
            sport: port(2),
            dport: port(4),
            protocol: r[1],
            family,
            _pad: [0; 2],
        };
        Ok((Self { flow, backend_addr: addr(8 + 2 * step), backend_port: port(6) }, len))
    }
}

/// What an accepted datagram says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Flows(Vec<FlowRecord>),
    /// The sender (re)started: send it every deviating flow.
    RequestFullSet,
}

/// Why a datagram was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Length, magic, version, type or record layout wrong; what was wrong.
    Malformed(&'static str),
    /// The tag does not match: another key, or altered on the way.
    BadKey,
    /// Its source is not a configured peer.
    UnknownPeer,
    /// Addressed to this `listen` address, not to ours.
    NotForUs { to: SocketAddr },
    /// It names this sender, which is not the configured peer at its source.
    WrongSender { named: SocketAddr },
    /// Its clock is this far (ms, + ahead) from ours.
    TooOld { skew_ms: i64 },
    /// Its sequence number was accepted already in its session, or is more
    /// than `REPLAY_WINDOW` behind the newest accepted there.
    Replayed { seq: u64, newest: u64 },
    /// From a session of the peer older than its current one.
    EarlierSession,
}

impl Refusal {
    /// The counter it is counted under (`SyncStatus::datagrams_refused`).
    pub fn name(&self) -> &'static str {
        match self {
            Refusal::Malformed(_) => "malformed",
            Refusal::BadKey => "bad key",
            Refusal::UnknownPeer => "unknown peer",
            Refusal::NotForUs { .. } => "not for this node",
            Refusal::WrongSender { .. } => "wrong sender",
            Refusal::TooOld { .. } => "too old",
            Refusal::Replayed { .. } => "replayed",
            Refusal::EarlierSession => "earlier session",
        }
    }

    /// For an operator: what is wrong and what to do.
    pub fn explain(&self) -> String {
        match self {
            Refusal::Malformed(what) => {
                format!("malformed: {what} (another program, or a peer running another xdplb version?)")
            }
            Refusal::BadKey => "bad key (the key_file differs between nodes, or the datagram was altered)".into(),
            Refusal::UnknownPeer => {
                "not a configured peer (list it in flow_sync.peers, or keep it away from the sync port)".into()
            }
            Refusal::NotForUs { to } => format!(
                "not for this node: addressed to {to} (the peer lists another address for this node than its \
                 flow_sync.listen, or a copy of a datagram meant for another node)"
            ),
            Refusal::WrongSender { named } => format!(
                "wrong sender: it names {named}, which is not the configured peer at its source address (this \
                 node's flow_sync.peers lists another address than that peer's listen, or a copy of another \
                 node's datagram)"
            ),
            Refusal::TooOld { skew_ms } => format!(
                "too old: its clock is {:.1} s {} this node's (synchronise the clocks, e.g. with chrony)",
                skew_ms.unsigned_abs() as f64 / 1000.0,
                if *skew_ms < 0 { "behind" } else { "ahead of" }
            ),
            Refusal::Replayed { seq, newest } if newest.saturating_sub(*seq) >= REPLAY_WINDOW => format!(
                "replayed: sequence number {seq} is more than {REPLAY_WINDOW} behind {newest}, the newest accepted \
                 (a copy of an earlier datagram, or one held up very long on the way)"
            ),
            Refusal::Replayed { seq, .. } => {
                format!("replayed: sequence number {seq} was accepted already (a copy of an earlier datagram)")
            }
            Refusal::EarlierSession => {
                "from an earlier run of the peer's xdplb than the one heard since (a copy of an old datagram)".into()
            }
        }
    }
}

/// The header fields of a well-formed datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub session: u64,
    pub seq: u64,
    pub timestamp_ms: u64,
    /// The sender's `listen` address, as it says.
    pub from: SocketAddr,
    /// The `listen` address of the node it is for.
    pub to: SocketAddr,
    pub message: Message,
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(w)
}

fn write_addr(out: &mut Vec<u8>, a: SocketAddr) {
    let ip = match a.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    out.extend_from_slice(&ip.octets());
    out.extend_from_slice(&a.port().to_be_bytes());
}

fn read_addr(b: &[u8], at: usize) -> SocketAddr {
    let mut ip = [0u8; 16];
    ip.copy_from_slice(&b[at..at + 16]);
    SocketAddr::new(Ipv6Addr::from(ip).to_canonical(), be_u16(b, at + 16))
}

/// `a` and `b` are the same node address: IPv4-mapped IPv6 is IPv4, and an
/// IPv6 scope or flow label does not count.
fn same_node(a: SocketAddr, b: SocketAddr) -> bool {
    a.ip().to_canonical() == b.ip().to_canonical() && a.port() == b.port()
}

/// Checks a datagram's structure (not its tag) and reads it.
pub fn parse(datagram: &[u8]) -> Result<Parsed, Refusal> {
    if datagram.len() < HEADER_LEN + TAG_LEN {
        return Err(Refusal::Malformed("shorter than a header and a tag"));
    }
    if datagram.len() > MAX_DATAGRAM {
        return Err(Refusal::Malformed("longer than 1400 bytes"));
    }
    if datagram[..4] != MAGIC {
        return Err(Refusal::Malformed("no XLBS magic"));
    }
    if datagram[4] != VERSION {
        return Err(Refusal::Malformed("unknown version"));
    }
    let kind = datagram[5];
    let count = be_u16(datagram, AT_COUNT) as usize;
    let mut body = &datagram[HEADER_LEN..datagram.len() - TAG_LEN];
    let message = match kind {
        TYPE_REQUEST_FULL_SET if count == 0 && body.is_empty() => Message::RequestFullSet,
        TYPE_REQUEST_FULL_SET => return Err(Refusal::Malformed("a request that carries records")),
        TYPE_FLOWS => {
            // Each record is at least 20 bytes: a count that cannot fit is refused before allocating.
            if count > body.len() / RECORD_V4_LEN {
                return Err(Refusal::Malformed("more records counted than the datagram holds"));
            }
            let mut records = Vec::with_capacity(count);
            for _ in 0..count {
                let (r, len) = FlowRecord::read(body)?;
                records.push(r);
                body = &body[len..];
            }
            if !body.is_empty() {
                return Err(Refusal::Malformed("bytes after the last record"));
            }
            Message::Flows(records)
        }
        _ => return Err(Refusal::Malformed("unknown message type")),
    };
    Ok(Parsed {
        session: be_u64(datagram, AT_SESSION),
        seq: be_u64(datagram, AT_SEQ),
        timestamp_ms: be_u64(datagram, AT_CLOCK),
        from: read_addr(datagram, AT_SENDER),
        to: read_addr(datagram, AT_DESTINATION),
        message,
    })
}

/// A sending process's numbering: a random id drawn when it starts, and the
/// sequence numbers in it, one series per destination (so each peer's
/// replay window covers only its own datagrams). The channels that reloads
/// start one after another share it, so a peer sees one session per run of
/// the process.
#[derive(Debug)]
pub struct Session {
    id: u64,
    next_seq: Mutex<HashMap<(IpAddr, u16), u64>>,
}

impl Session {
    /// Numbers from 1 in session `id`.
    pub fn new(id: u64) -> Self {
        Self { id, next_seq: Mutex::new(HashMap::new()) }
    }

    /// A session with a random id (the system's random source).
    pub fn random() -> Result<Self, ring::error::Unspecified> {
        let id: [u8; 8] = ring::rand::generate(&ring::rand::SystemRandom::new())?.expose();
        Ok(Self::new(u64::from_ne_bytes(id)))
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// The next sequence number for `to`.
    fn take_seq(&self, to: SocketAddr) -> u64 {
        let mut next = self.next_seq.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let n = next.entry((to.ip().to_canonical(), to.port())).or_insert(1);
        *n += 1;
        *n - 1
    }
}

/// Writes this node's datagrams: addresses, numbers and seals them.
pub struct Sealer {
    key: hmac::Key,
    /// This node's `listen` address.
    from: SocketAddr,
    session: Arc<Session>,
}

impl Sealer {
    pub fn new(key: &[u8], from: SocketAddr, session: Arc<Session>) -> Self {
        Self { key: hmac::Key::new(hmac::HMAC_SHA256, key), from, session }
    }

    fn header(&self, kind: u8, count: u16, to: SocketAddr, now_ms: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAX_DATAGRAM);
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(kind);
        out.extend_from_slice(&count.to_be_bytes());
        out.extend_from_slice(&self.session.id.to_be_bytes());
        out.extend_from_slice(&self.session.take_seq(to).to_be_bytes());
        out.extend_from_slice(&now_ms.to_be_bytes());
        write_addr(&mut out, self.from);
        write_addr(&mut out, to);
        out
    }

    fn seal(&self, mut out: Vec<u8>) -> Vec<u8> {
        let tag = hmac::sign(&self.key, &out);
        out.extend_from_slice(tag.as_ref());
        out
    }

    /// How many of `records`, from the front, fit in one datagram.
    pub fn fit(records: &[FlowRecord]) -> usize {
        let mut room = MAX_RECORD_BYTES;
        let mut n = 0;
        for r in records {
            let len = r.wire_len();
            if len > room {
                break;
            }
            room -= len;
            n += 1;
        }
        n
    }

    /// One datagram for the peer listening on `to`, holding as many of
    /// `records`, from the front, as fit in 1400 bytes; returns it and how
    /// many it holds.
    pub fn flows(&self, records: &[FlowRecord], to: SocketAddr, now_ms: u64) -> (Vec<u8>, usize) {
        let n = Self::fit(records);
        let mut out = self.header(TYPE_FLOWS, n as u16, to, now_ms);
        for r in &records[..n] {
            r.write(&mut out);
        }
        (self.seal(out), n)
    }

    /// Asks the peer listening on `to` for every flow of its that deviates.
    pub fn request_full_set(&self, to: SocketAddr, now_ms: u64) -> Vec<u8> {
        let out = self.header(TYPE_REQUEST_FULL_SET, 0, to, now_ms);
        self.seal(out)
    }
}

/// An accepted datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// Index of the sender in the configured peers.
    pub peer: usize,
    pub seq: u64,
    pub message: Message,
}

/// The sequence numbers accepted in one session: the newest, and which of
/// the `REPLAY_WINDOW` before it (bit i: newest - i).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Window {
    newest: u64,
    seen: u64,
}

impl Window {
    fn starting_at(seq: u64) -> Self {
        Self { newest: seq, seen: 1 }
    }

    /// Accepts `seq` if it is new to the window, and records it.
    fn admit(&mut self, seq: u64) -> Result<(), Refusal> {
        if seq > self.newest {
            let shift = seq - self.newest;
            self.seen = if shift >= REPLAY_WINDOW { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.newest = seq;
            return Ok(());
        }
        let behind = self.newest - seq;
        if behind >= REPLAY_WINDOW || self.seen & (1 << behind) != 0 {
            return Err(Refusal::Replayed { seq, newest: self.newest });
        }
        self.seen |= 1 << behind;
        Ok(())
    }
}

/// What this node accepted from one peer.
#[derive(Clone, Debug)]
struct PeerState {
    session: u64,
    /// The earliest clock accepted in the session: a session whose clock is
    /// not past it began before this one.
    first_ms: u64,
    window: Window,
    /// Its sessions before this one, each until when (our clock) it is kept.
    retired: VecDeque<(u64, u64)>,
}

impl PeerState {
    fn new(p: &Parsed) -> Self {
        Self {
            session: p.session,
            first_ms: p.timestamp_ms,
            window: Window::starting_at(p.seq),
            retired: VecDeque::new(),
        }
    }

    /// Accepts `p` unless it replays, and records it.
    fn admit(&mut self, p: &Parsed, now_ms: u64) -> Result<(), Refusal> {
        if p.session == self.session {
            self.window.admit(p.seq)?;
            self.first_ms = self.first_ms.min(p.timestamp_ms);
            return Ok(());
        }
        self.retired.retain(|&(_, until)| until >= now_ms);
        if p.timestamp_ms <= self.first_ms || self.retired.iter().any(|&(s, _)| s == p.session) {
            return Err(Refusal::EarlierSession);
        }
        // The peer restarted: a new window, whatever its numbers.
        if self.retired.len() >= MAX_RETIRED {
            self.retired.pop_front();
        }
        self.retired.push_back((self.session, now_ms.saturating_add(RETIRED_FOR_MS)));
        let retired = std::mem::take(&mut self.retired);
        *self = Self { retired, ..Self::new(p) };
        Ok(())
    }
}

/// Checks the peers' datagrams; remembers, per peer, its session and the
/// sequence numbers accepted in it.
pub struct Opener {
    key: hmac::Key,
    /// This node's `listen` address: datagrams must be addressed to it.
    listen: SocketAddr,
    peers: Vec<SocketAddr>,
    state: Vec<Option<PeerState>>,
}

impl Opener {
    pub fn new(key: &[u8], listen: SocketAddr, peers: &[SocketAddr]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
            listen,
            peers: peers.to_vec(),
            state: vec![None; peers.len()],
        }
    }

    /// Takes a new configuration (a reload), keeping what it accepted from
    /// the peers that stay: a datagram accepted before is not accepted again.
    /// On another listen address everything starts anew: datagrams for the
    /// old one are refused anyway, and the peers number those for the new
    /// one from 1.
    pub fn reconfigure(&mut self, key: &[u8], listen: SocketAddr, peers: &[SocketAddr]) {
        let keep = same_node(listen, self.listen);
        let state = peers
            .iter()
            .map(|p| self.peers.iter().position(|o| keep && same_node(*o, *p)).and_then(|i| self.state[i].take()))
            .collect();
        *self = Self { state, ..Self::new(key, listen, peers) };
    }

    /// The first configured peer with `from`'s address.
    pub fn peer_of(&self, from: SocketAddr) -> Option<usize> {
        let ip = from.ip().to_canonical();
        self.peers.iter().position(|p| p.ip().to_canonical() == ip)
    }

    /// Accepts a datagram from a peer, or says why not. Only an accepted
    /// datagram changes what is remembered of the peer.
    pub fn open(&mut self, from: SocketAddr, datagram: &[u8], now_ms: u64) -> Result<Accepted, Refusal> {
        self.peer_of(from).ok_or(Refusal::UnknownPeer)?;
        let parsed = parse(datagram)?;
        let (signed, tag) = datagram.split_at(datagram.len() - TAG_LEN);
        hmac::verify(&self.key, signed, tag).map_err(|_| Refusal::BadKey)?;
        if !same_node(parsed.to, self.listen) {
            return Err(Refusal::NotForUs { to: parsed.to });
        }
        // The peer is the one the sealed bytes name; the source must agree.
        let peer = self
            .peers
            .iter()
            .position(|p| same_node(*p, parsed.from) && p.ip().to_canonical() == from.ip().to_canonical())
            .ok_or(Refusal::WrongSender { named: parsed.from })?;
        let skew_ms = parsed.timestamp_ms as i128 - now_ms as i128;
        if skew_ms.unsigned_abs() > MAX_CLOCK_SKEW_MS as u128 {
            return Err(Refusal::TooOld { skew_ms: skew_ms.clamp(i64::MIN as i128, i64::MAX as i128) as i64 });
        }
        match &mut self.state[peer] {
            Some(state) => state.admit(&parsed, now_ms)?,
            empty => *empty = Some(PeerState::new(&parsed)),
        }
        Ok(Accepted { peer, seq: parsed.seq, message: parsed.message })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::maps::{PROTO_TCP, PROTO_UDP};

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW: u64 = 1_700_000_000_000;

    fn a() -> SocketAddr {
        "198.18.1.11:7946".parse().unwrap()
    }

    fn b() -> SocketAddr {
        "198.18.1.12:7946".parse().unwrap()
    }

    fn c() -> SocketAddr {
        "198.18.1.13:7946".parse().unwrap()
    }

    fn v4(i: u32) -> FlowRecord {
        FlowRecord {
            flow: FlowKey {
                src: [u32::from_ne_bytes([198, 18, (i >> 8) as u8, i as u8]), 0, 0, 0],
                dst: [u32::from_ne_bytes([198, 18, 100, 1]), 0, 0, 0],
                sport: (1024 + i as u16).to_be(),
                dport: 80u16.to_be(),
                protocol: PROTO_TCP,
                family: FAMILY_V4,
                _pad: [0; 2],
            },
            backend_addr: [u32::from_ne_bytes([198, 18, 0, 11 + (i % 4) as u8]), 0, 0, 0],
            backend_port: if i.is_multiple_of(2) { 0 } else { 8080u16.to_be() },
        }
    }

    fn v6(i: u32) -> FlowRecord {
        FlowRecord {
            flow: FlowKey {
                src: [0x2001_0db8u32.to_be(), 0, i, 0x0101_0101],
                dst: [0x2001_0db8u32.to_be(), 0x100, 0, 1u32.to_be()],
                sport: (2000 + i as u16).to_be(),
                dport: 53u16.to_be(),
                protocol: PROTO_UDP,
                family: FAMILY_V6,
                _pad: [0; 2],
            },
            backend_addr: [0x2001_0db8u32.to_be(), 0, 0, (0x11 + i % 4).to_be()],
            backend_port: 0,
        }
    }

    /// Node `listen`'s sealer, in session `session`.
    fn sealer(listen: SocketAddr, session: u64) -> Sealer {
        Sealer::new(KEY, listen, Arc::new(Session::new(session)))
    }

    /// Sealed by a sender (a) and opened by its peer (b).
    fn pair() -> (Sealer, Opener) {
        (sealer(a(), 1), Opener::new(KEY, b(), &[a()]))
    }

    fn send_all(sealer: &Sealer, records: &[FlowRecord]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut rest = records;
        while !rest.is_empty() {
            let (d, n) = sealer.flows(rest, b(), NOW);
            assert!(n > 0);
            out.push(d);
            rest = &rest[n..];
        }
        out
    }

    #[test]
    fn records_round_trip_v4_and_v6() {
        let (sealer, mut opener) = pair();
        let records: Vec<FlowRecord> = (0..10u32).map(|i| if i.is_multiple_of(3) { v6(i) } else { v4(i) }).collect();
        let (d, n) = sealer.flows(&records, b(), NOW);
        assert_eq!(n, 10);
        assert_eq!(d.len(), HEADER_LEN + 4 * RECORD_V6_LEN + 6 * RECORD_V4_LEN + TAG_LEN);
        let got = opener.open(a(), &d, NOW + 5).unwrap();
        assert_eq!(got.peer, 0);
        assert_eq!(got.message, Message::Flows(records));
    }

    #[test]
    fn the_header_names_session_sequence_sender_and_destination() {
        let v6a: SocketAddr = "[2001:db8::11]:7946".parse().unwrap();
        let s = Sealer::new(KEY, v6a, Arc::new(Session::new(0x0102_0304_0506_0708)));
        s.request_full_set(b(), NOW);
        let d = s.request_full_set(b(), NOW);
        assert_eq!(&d[..8], b"XLBS\x02\x02\x00\x00");
        assert_eq!(d[8..16], [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(be_u64(&d, 16), 2, "the second datagram of the session");
        assert_eq!(be_u64(&d, 24), NOW);
        assert_eq!(d[32..48], "2001:db8::11".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(be_u16(&d, 48), 7946);
        assert_eq!(d[50..66], "::ffff:198.18.1.12".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(be_u16(&d, 66), 7946);
        let p = parse(&d).unwrap();
        assert_eq!((p.session, p.seq, p.from, p.to), (0x0102_0304_0506_0708, 2, v6a, b()));
        // Each destination has its own series.
        let seq = |d: &[u8]| parse(d).unwrap().seq;
        assert_eq!(seq(&s.request_full_set(c(), NOW)), 1);
        assert_eq!(seq(&s.flows(&[v4(1)], "[::ffff:198.18.1.13]:7946".parse().unwrap(), NOW).0), 2);
        assert_eq!(seq(&s.request_full_set(b(), NOW)), 3);
    }

    #[test]
    fn a_request_round_trips() {
        let (sealer, mut opener) = pair();
        let d = sealer.request_full_set(b(), NOW);
        assert_eq!(d.len(), HEADER_LEN + TAG_LEN);
        assert_eq!(opener.open(a(), &d, NOW).unwrap().message, Message::RequestFullSet);
    }

    #[test]
    fn batches_fill_datagrams_of_at_most_1400_bytes() {
        for (make, per, len) in [(v4 as fn(u32) -> FlowRecord, 65, RECORD_V4_LEN), (v6, 23, RECORD_V6_LEN)] {
            let (sealer, mut opener) = pair();
            let records: Vec<FlowRecord> = (0..1000).map(make).collect();
            let datagrams = send_all(&sealer, &records);
            assert_eq!(datagrams.len(), 1000usize.div_ceil(per));
            let mut got = Vec::new();
            for d in &datagrams {
                assert!(d.len() <= MAX_DATAGRAM, "{} bytes", d.len());
                match opener.open(a(), d, NOW).unwrap().message {
                    Message::Flows(r) => got.extend(r),
                    other => panic!("{other:?}"),
                }
            }
            assert_eq!(got, records);
            assert!(datagrams[0].len() + len > MAX_DATAGRAM, "the first datagram has no room for another record");
        }
        assert_eq!(MAX_V4_RECORDS, 65);
    }

    #[test]
    fn tampering_and_another_key_are_refused_as_bad_key() {
        let (sealer, mut opener) = pair();
        let (d, _) = sealer.flows(&[v4(1)], b(), NOW);
        let mut tampered = d.clone();
        tampered[HEADER_LEN + 9] ^= 1; // the client's address
        assert_eq!(opener.open(a(), &tampered, NOW), Err(Refusal::BadKey));
        let other = Sealer::new(b"another key of sixteen bytes", a(), Arc::new(Session::new(2)));
        let (d2, _) = other.flows(&[v4(1)], b(), NOW);
        assert_eq!(opener.open(a(), &d2, NOW), Err(Refusal::BadKey));
        // Refusals changed nothing: the genuine one still passes.
        assert!(opener.open(a(), &d, NOW).is_ok());
    }

    #[test]
    fn reordered_datagrams_pass_once_within_the_window() {
        let (sealer, mut opener) = pair();
        let d: Vec<Vec<u8>> = (0..100).map(|i| sealer.flows(&[v4(i)], b(), NOW).0).collect();
        let open = |o: &mut Opener, i: usize| o.open(a(), &d[i], NOW).map(|acc| acc.seq);
        // Out of order (seq = index + 1).
        assert_eq!(open(&mut opener, 5), Ok(6));
        assert_eq!(open(&mut opener, 2), Ok(3));
        assert_eq!(open(&mut opener, 7), Ok(8));
        assert_eq!(open(&mut opener, 6), Ok(7));
        assert_eq!(open(&mut opener, 0), Ok(1));
        // Each once.
        for i in [5, 2, 7, 6, 0] {
            assert_eq!(open(&mut opener, i), Err(Refusal::Replayed { seq: i as u64 + 1, newest: 8 }));
        }
        // 64 behind the newest still passes once; 65 behind does not.
        assert_eq!(open(&mut opener, 71), Ok(72));
        assert_eq!(open(&mut opener, 8), Ok(9), "72 - 9 = 63 behind");
        assert_eq!(open(&mut opener, 1), Err(Refusal::Replayed { seq: 2, newest: 72 }));
        assert!(Refusal::Replayed { seq: 2, newest: 72 }.explain().contains("more than 64 behind 72"));
        assert!(Refusal::Replayed { seq: 9, newest: 72 }.explain().contains("accepted already"));
        // A jump past the whole window forgets the old bits, not the rule.
        assert_eq!(open(&mut opener, 99), Ok(100));
        assert_eq!(open(&mut opener, 71), Err(Refusal::Replayed { seq: 72, newest: 100 }));
        assert_eq!(open(&mut opener, 98), Ok(99));
        assert_eq!(open(&mut opener, 99), Err(Refusal::Replayed { seq: 100, newest: 100 }));
    }

    #[test]
    fn a_restarted_peer_is_accepted_at_once_and_its_old_session_no_more() {
        let (old, mut opener) = pair();
        let started = NOW - 20_000;
        assert!(opener.open(a(), &old.request_full_set(b(), started), started).is_ok());
        let old_datagrams: Vec<Vec<u8>> = (0..1000).map(|i| old.flows(&[v4(i)], b(), NOW).0).collect();
        assert!(opener.open(a(), &old_datagrams[999], NOW).is_ok());
        // Restarted at once, after its clock was stepped back 5 s: a new
        // session, numbered from 1 again, with an earlier clock than the last
        // datagram of the old one.
        let new = sealer(a(), 7);
        let at = |ms: u64| NOW - 5000 + ms;
        assert_eq!(opener.open(a(), &new.request_full_set(b(), at(0)), NOW + 1).map(|acc| acc.seq), Ok(1));
        assert_eq!(opener.open(a(), &new.flows(&[v4(1)], b(), at(1)).0, NOW + 2).map(|acc| acc.seq), Ok(2));
        // The earlier session's datagrams, even those never accepted, no more.
        assert_eq!(opener.open(a(), &old_datagrams[998], NOW + 3), Err(Refusal::EarlierSession));
        assert_eq!(opener.open(a(), &old_datagrams[10], NOW + 3), Err(Refusal::EarlierSession));
        assert_eq!(opener.open(a(), &new.flows(&[v4(2)], b(), at(4)).0, NOW + 4).map(|acc| acc.seq), Ok(3));
        // A session this node never saw, begun before the current one: refused.
        let unseen = sealer(a(), 8).request_full_set(b(), at(0) - 1);
        assert_eq!(opener.open(a(), &unseen, NOW + 5), Err(Refusal::EarlierSession));
        // Restarting again: the last session is retired too; each is
        // forgotten only once its datagrams are too old anyway.
        let third = sealer(a(), 9);
        assert!(opener.open(a(), &third.request_full_set(b(), NOW + 2000), NOW + 2000).is_ok());
        assert_eq!(opener.open(a(), &new.request_full_set(b(), NOW + 2001), NOW + 2001), Err(Refusal::EarlierSession));
        let state = opener.state[0].as_ref().unwrap();
        assert_eq!(state.retired.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 7]);
        assert_eq!(state.retired[0].1, NOW + 1 + 2 * MAX_CLOCK_SKEW_MS);
    }

    #[test]
    fn a_datagram_copied_to_another_node_or_sent_back_is_refused() {
        // A sends to B: B accepts.
        let from_a = sealer(a(), 1);
        let mut at_b = Opener::new(KEY, b(), &[a(), c()]);
        let mut at_c = Opener::new(KEY, c(), &[a(), b()]);
        let mut at_a = Opener::new(KEY, a(), &[b(), c()]);
        let copies: Vec<Vec<u8>> = (0..50).map(|i| from_a.flows(&[v4(i)], b(), NOW).0).collect();
        assert!(at_b.open(a(), &copies[0], NOW).is_ok());
        // The same bytes sent to B from C's address (a higher sequence number
        // than C's): refused, and C is not locked out.
        assert_eq!(at_b.open(c(), &copies[49], NOW), Err(Refusal::WrongSender { named: a() }));
        let from_c = sealer(c(), 2);
        assert_eq!(at_b.open(c(), &from_c.request_full_set(b(), NOW), NOW).map(|acc| acc.peer), Ok(1));
        assert_eq!(at_b.open(a(), &copies[1], NOW).map(|acc| acc.peer), Ok(0));
        // Copied to C, from A's address: not for C.
        assert_eq!(at_c.open(a(), &copies[2], NOW), Err(Refusal::NotForUs { to: b() }));
        // Sent back to A from B's address: not for A, nor from B.
        assert_eq!(at_a.open(b(), &copies[3], NOW), Err(Refusal::NotForUs { to: b() }));
        // A datagram A sealed for itself cannot name a peer as its sender.
        let to_self = from_a.request_full_set(a(), NOW);
        assert_eq!(at_a.open(b(), &to_self, NOW), Err(Refusal::WrongSender { named: a() }));
        assert!(Refusal::WrongSender { named: a() }.explain().starts_with("wrong sender: it names 198.18.1.11:7946"));
        assert!(Refusal::NotForUs { to: b() }.explain().starts_with("not for this node: addressed to 198.18.1.12"));
    }

    #[test]
    fn clocks_more_than_30_s_apart_are_refused() {
        let (sealer, mut opener) = pair();
        let (old, _) = sealer.flows(&[v4(1)], b(), NOW - 30_001);
        assert_eq!(opener.open(a(), &old, NOW), Err(Refusal::TooOld { skew_ms: -30_001 }));
        let (ahead, _) = sealer.flows(&[v4(1)], b(), NOW + 31_000);
        assert_eq!(opener.open(a(), &ahead, NOW), Err(Refusal::TooOld { skew_ms: 31_000 }));
        let (edge, _) = sealer.flows(&[v4(1)], b(), NOW - 30_000);
        assert!(opener.open(a(), &edge, NOW).is_ok());
    }

    #[test]
    fn strangers_are_refused_and_peers_are_told_apart_by_what_they_sign() {
        let (sealer, _) = pair();
        let (d, _) = sealer.flows(&[v4(1)], b(), NOW);
        let mut opener = Opener::new(KEY, b(), &[c(), a()]);
        assert_eq!(opener.open("198.18.1.99:7946".parse().unwrap(), &d, NOW), Err(Refusal::UnknownPeer));
        assert_eq!(opener.open(a(), &d, NOW).unwrap().peer, 1);
        // Another source port of the peer's address is still that peer.
        let (d, _) = sealer.flows(&[v4(1)], b(), NOW);
        assert_eq!(opener.open("198.18.1.11:40000".parse().unwrap(), &d, NOW).unwrap().peer, 1);
        // An IPv4-mapped IPv6 source (a dual-stack socket) is the IPv4 peer.
        let (d, _) = sealer.flows(&[v4(1)], b(), NOW);
        assert_eq!(opener.open("[::ffff:198.18.1.11]:7946".parse().unwrap(), &d, NOW).unwrap().peer, 1);
        // Two peers on one address: the sender they sign tells them apart.
        let a2: SocketAddr = "198.18.1.11:7947".parse().unwrap();
        let mut opener = Opener::new(KEY, b(), &[a(), a2]);
        let (d, _) = sealer.flows(&[v4(1)], b(), NOW);
        let (d2, _) = self::sealer(a2, 5).flows(&[v4(1)], b(), NOW);
        assert_eq!(opener.open(a2, &d2, NOW).unwrap().peer, 1);
        assert_eq!(opener.open(a2, &d, NOW).unwrap().peer, 0);
        // A peer whose listen address is not what this node lists for it.
        let mut opener = Opener::new(KEY, b(), &["198.18.1.11:7000".parse().unwrap()]);
        let (d, _) = sealer.flows(&[v4(1)], b(), NOW);
        assert_eq!(opener.open(a(), &d, NOW), Err(Refusal::WrongSender { named: a() }));
    }

    #[test]
    fn a_reload_keeps_what_was_accepted_from_the_peers_that_stay() {
        let (sealer, mut opener) = pair();
        let (d, _) = sealer.flows(&[v4(1)], b(), NOW);
        assert!(opener.open(a(), &d, NOW).is_ok());
        opener.reconfigure(KEY, b(), &[c(), a()]);
        assert_eq!(opener.open(a(), &d, NOW), Err(Refusal::Replayed { seq: 1, newest: 1 }));
        // Another key from now on.
        const KEY2: &[u8] = b"another key of sixteen bytes";
        opener.reconfigure(KEY2, b(), &[a()]);
        let other = Sealer::new(KEY2, a(), sealer.session.clone());
        assert_eq!(opener.open(a(), &other.request_full_set(b(), NOW), NOW).map(|acc| acc.seq), Ok(2));
        assert_eq!(opener.open(a(), &d, NOW), Err(Refusal::BadKey));
        // Another listen address: the peer numbers its datagrams for it from 1.
        let b2: SocketAddr = "198.18.1.12:7000".parse().unwrap();
        opener.reconfigure(KEY2, b2, &[a()]);
        assert_eq!(opener.open(a(), &other.request_full_set(b2, NOW), NOW).map(|acc| acc.seq), Ok(1));
        assert_eq!(opener.open(a(), &other.request_full_set(b(), NOW), NOW), Err(Refusal::NotForUs { to: b() }));
    }

    #[test]
    fn malformed_datagrams_are_refused_with_a_reason() {
        let (sealer, mut opener) = pair();
        let (d, _) = sealer.flows(&[v4(1), v6(2)], b(), NOW);
        let refusal = |bytes: &[u8], opener: &mut Opener| opener.open(a(), bytes, NOW).unwrap_err();
        let mut bad = d.clone();
        bad[0] = b'Y';
        assert_eq!(refusal(&bad, &mut opener), Refusal::Malformed("no XLBS magic"));
        let mut bad = d.clone();
        bad[4] = 1;
        assert_eq!(refusal(&bad, &mut opener), Refusal::Malformed("unknown version"));
        let mut bad = d.clone();
        bad[5] = 9;
        assert_eq!(refusal(&bad, &mut opener), Refusal::Malformed("unknown message type"));
        let mut bad = d.clone();
        bad[7] = 3;
        assert_eq!(refusal(&bad, &mut opener), Refusal::Malformed("record cut short"));
        let mut bad = d.clone();
        bad[7] = 1;
        assert_eq!(refusal(&bad, &mut opener), Refusal::Malformed("bytes after the last record"));
        let mut bad = d.clone();
        bad[HEADER_LEN] = 5;
        assert_eq!(refusal(&bad, &mut opener), Refusal::Malformed("record of an unknown address family"));
        let mut bad = d.clone();
        bad[5] = TYPE_REQUEST_FULL_SET;
        assert_eq!(refusal(&bad, &mut opener), Refusal::Malformed("a request that carries records"));
        assert_eq!(refusal(&vec![0; 1401], &mut opener), Refusal::Malformed("longer than 1400 bytes"));
        assert_eq!(
            refusal(&d[..HEADER_LEN + TAG_LEN - 1], &mut opener),
            Refusal::Malformed("shorter than a header and a tag")
        );
        assert!(opener.open(a(), &d, NOW).is_ok(), "none of these changed what was accepted");
    }

    /// A small deterministic generator (xorshift64*), so failures reproduce.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    #[test]
    fn no_input_makes_opening_panic() {
        let (sealer, _) = pair();
        let records: Vec<FlowRecord> = (0..30u32).map(|i| if i.is_multiple_of(2) { v4(i) } else { v6(i) }).collect();
        let (d, n) = sealer.flows(&records, b(), NOW);
        assert!(n > 10);
        let opener = || Opener::new(KEY, b(), &[a()]);
        // Truncated at every offset: refused, never accepted, never a panic.
        for cut in 0..d.len() {
            assert!(opener().open(a(), &d[..cut], NOW).is_err(), "accepted {cut} bytes of {}", d.len());
            let _ = parse(&d[..cut]);
        }
        // Every single bit flipped: refused.
        for bit in 0..d.len() * 8 {
            let mut flipped = d.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(opener().open(a(), &flipped, NOW).is_err(), "accepted with bit {bit} flipped");
            let _ = parse(&flipped);
        }
        // Random bytes, and random bytes behind a valid header.
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut opener = opener();
        for i in 0..20_000u32 {
            let len = (rng.next() % 1500) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if i.is_multiple_of(2) && len >= HEADER_LEN {
                bytes[..HEADER_LEN].copy_from_slice(&d[..HEADER_LEN]);
                bytes[AT_COUNT..AT_COUNT + 2].copy_from_slice(&((rng.next() % 80) as u16).to_be_bytes());
            }
            assert!(opener.open(a(), &bytes, NOW).is_err());
            let _ = parse(&bytes);
        }
    }
}
