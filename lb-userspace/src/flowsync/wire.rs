//! The flow sync datagram: what one node tells its peers, sealed with
//! HMAC-SHA256 under the shared key.
//!
//! ```text
//! offset  size  field
//!      0     4  magic "XLBS"
//!      4     1  version (1)
//!      5     1  type: 1 flows, 2 request for the full set of deviating flows
//!      6     2  reserved, 0
//!      8     8  sequence number (big endian): starts at the sender's unix time
//!               in µs when it starts, +1 per datagram, so a restarted sender
//!               continues upward
//!     16     8  sender's clock, unix ms (big endian)
//!     24     2  record count (big endian; 0 in a request, and in the answer
//!               to a request when the answerer has nothing to send)
//!     26        records
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
//! Ethernet MTU with room for tunnels: 67 IPv4 or 23 IPv6 records.
//!
//! Opening refuses, and says why: not from a configured peer, malformed
//! (length, magic, version, type, record layout), a bad tag (another key),
//! a clock more than 30 s away from ours, a sequence number not above the
//! last one accepted from that peer (a replay). Opening never panics,
//! whatever the bytes.

use std::net::SocketAddr;

use lb_common::maps::{FAMILY_V4, FAMILY_V6, FlowKey};
use ring::hmac;

pub const MAGIC: [u8; 4] = *b"XLBS";
pub const VERSION: u8 = 1;
pub const TYPE_FLOWS: u8 = 1;
pub const TYPE_REQUEST_FULL_SET: u8 = 2;
pub const HEADER_LEN: usize = 26;
pub const TAG_LEN: usize = 32;
/// Largest datagram sent or accepted.
pub const MAX_DATAGRAM: usize = 1400;
/// Room for records in one datagram.
pub const MAX_RECORD_BYTES: usize = MAX_DATAGRAM - HEADER_LEN - TAG_LEN;
pub const RECORD_V4_LEN: usize = 20;
pub const RECORD_V6_LEN: usize = 56;
/// A datagram whose clock is further than this from ours is refused.
pub const MAX_CLOCK_SKEW_MS: u64 = 30_000;

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
    /// Its clock is this far (ms, + ahead) from ours.
    TooOld { skew_ms: i64 },
    /// Its sequence number is not above the last accepted from that peer.
    Replayed { seq: u64, last: u64 },
}

impl Refusal {
    /// The counter it is counted under (`SyncStatus::datagrams_refused`).
    pub fn name(&self) -> &'static str {
        match self {
            Refusal::Malformed(_) => "malformed",
            Refusal::BadKey => "bad key",
            Refusal::UnknownPeer => "unknown peer",
            Refusal::TooOld { .. } => "too old",
            Refusal::Replayed { .. } => "replayed",
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
            Refusal::TooOld { skew_ms } => format!(
                "too old: its clock is {:.1} s {} this node's (synchronise the clocks, e.g. with chrony)",
                skew_ms.unsigned_abs() as f64 / 1000.0,
                if *skew_ms < 0 { "behind" } else { "ahead of" }
            ),
            Refusal::Replayed { seq, last } => format!(
                "replayed: sequence number {seq} is not above {last}, the last accepted (a copy of an earlier datagram)"
            ),
        }
    }
}

/// The header fields of a well-formed datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub seq: u64,
    pub timestamp_ms: u64,
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
    let seq = be_u64(datagram, 8);
    let timestamp_ms = be_u64(datagram, 16);
    let count = be_u16(datagram, 24) as usize;
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
    Ok(Parsed { seq, timestamp_ms, message })
}

fn header(kind: u8, seq: u64, now_ms: u64, count: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_DATAGRAM);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&now_ms.to_be_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    out
}

/// Writes this node's datagrams: numbers and seals them.
pub struct Sealer {
    key: hmac::Key,
    next_seq: u64,
}

impl Sealer {
    /// `first_seq`: the sender's unix time in µs at start (see the module docs).
    pub fn new(key: &[u8], first_seq: u64) -> Self {
        Self { key: hmac::Key::new(hmac::HMAC_SHA256, key), next_seq: first_seq }
    }

    fn seal(&mut self, mut out: Vec<u8>) -> Vec<u8> {
        let tag = hmac::sign(&self.key, &out);
        out.extend_from_slice(tag.as_ref());
        self.next_seq += 1;
        out
    }

    /// One datagram holding as many of `records`, from the front, as fit
    /// in 1400 bytes; returns it and how many it holds.
    pub fn flows(&mut self, records: &[FlowRecord], now_ms: u64) -> (Vec<u8>, usize) {
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
        let mut out = header(TYPE_FLOWS, self.next_seq, now_ms, n as u16);
        for r in &records[..n] {
            r.write(&mut out);
        }
        (self.seal(out), n)
    }

    /// Asks a peer for every flow of its that deviates.
    pub fn request_full_set(&mut self, now_ms: u64) -> Vec<u8> {
        let out = header(TYPE_REQUEST_FULL_SET, self.next_seq, now_ms, 0);
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

/// Checks the peers' datagrams; remembers each peer's last sequence number.
pub struct Opener {
    key: hmac::Key,
    peers: Vec<SocketAddr>,
    last_seq: Vec<Option<u64>>,
}

impl Opener {
    pub fn new(key: &[u8], peers: &[SocketAddr]) -> Self {
        Self { key: hmac::Key::new(hmac::HMAC_SHA256, key), peers: peers.to_vec(), last_seq: vec![None; peers.len()] }
    }

    /// The configured peer a datagram from `from` comes from: the one with
    /// that address and port (a peer sends from its `listen` address), else
    /// the first with that address.
    pub fn peer_of(&self, from: SocketAddr) -> Option<usize> {
        let from = SocketAddr::new(from.ip().to_canonical(), from.port());
        self.peers.iter().position(|p| *p == from).or_else(|| self.peers.iter().position(|p| p.ip() == from.ip()))
    }

    /// Accepts a datagram from a peer, or says why not. Only an accepted
    /// datagram moves the peer's sequence number.
    pub fn open(&mut self, from: SocketAddr, datagram: &[u8], now_ms: u64) -> Result<Accepted, Refusal> {
        let peer = self.peer_of(from).ok_or(Refusal::UnknownPeer)?;
        let parsed = parse(datagram)?;
        let (signed, tag) = datagram.split_at(datagram.len() - TAG_LEN);
        hmac::verify(&self.key, signed, tag).map_err(|_| Refusal::BadKey)?;
        let skew_ms = parsed.timestamp_ms as i128 - now_ms as i128;
        if skew_ms.unsigned_abs() > MAX_CLOCK_SKEW_MS as u128 {
            return Err(Refusal::TooOld { skew_ms: skew_ms.clamp(i64::MIN as i128, i64::MAX as i128) as i64 });
        }
        if let Some(last) = self.last_seq[peer]
            && parsed.seq <= last
        {
            return Err(Refusal::Replayed { seq: parsed.seq, last });
        }
        self.last_seq[peer] = Some(parsed.seq);
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

    /// Sealed by a sender (a) and opened by its peer (b).
    fn pair() -> (Sealer, Opener) {
        (Sealer::new(KEY, NOW * 1000), Opener::new(KEY, &[a()]))
    }

    fn send_all(sealer: &mut Sealer, records: &[FlowRecord]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut rest = records;
        while !rest.is_empty() {
            let (d, n) = sealer.flows(rest, NOW);
            assert!(n > 0);
            out.push(d);
            rest = &rest[n..];
        }
        out
    }

    #[test]
    fn records_round_trip_v4_and_v6() {
        let (mut sealer, mut opener) = pair();
        let records: Vec<FlowRecord> = (0..10u32).map(|i| if i.is_multiple_of(3) { v6(i) } else { v4(i) }).collect();
        let (d, n) = sealer.flows(&records, NOW);
        assert_eq!(n, 10);
        assert_eq!(d.len(), HEADER_LEN + 4 * RECORD_V6_LEN + 6 * RECORD_V4_LEN + TAG_LEN);
        let got = opener.open(a(), &d, NOW + 5).unwrap();
        assert_eq!(got.peer, 0);
        assert_eq!(got.message, Message::Flows(records));
    }

    #[test]
    fn a_request_round_trips() {
        let (mut sealer, mut opener) = pair();
        let d = sealer.request_full_set(NOW);
        assert_eq!(d.len(), HEADER_LEN + TAG_LEN);
        assert_eq!(opener.open(a(), &d, NOW).unwrap().message, Message::RequestFullSet);
    }

    #[test]
    fn batches_fill_datagrams_of_at_most_1400_bytes() {
        for (make, per, len) in [(v4 as fn(u32) -> FlowRecord, 67, RECORD_V4_LEN), (v6, 23, RECORD_V6_LEN)] {
            let (mut sealer, mut opener) = pair();
            let records: Vec<FlowRecord> = (0..1000).map(make).collect();
            let datagrams = send_all(&mut sealer, &records);
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
    }

    #[test]
    fn tampering_and_another_key_are_refused_as_bad_key() {
        let (mut sealer, mut opener) = pair();
        let (d, _) = sealer.flows(&[v4(1)], NOW);
        let mut tampered = d.clone();
        tampered[HEADER_LEN + 9] ^= 1; // the client's address
        assert_eq!(opener.open(a(), &tampered, NOW), Err(Refusal::BadKey));
        let mut other = Sealer::new(b"another key of sixteen bytes", NOW * 1000 + 10);
        let (d2, _) = other.flows(&[v4(1)], NOW);
        assert_eq!(opener.open(a(), &d2, NOW), Err(Refusal::BadKey));
        // Refusals did not move the sequence number: the genuine one still passes.
        assert!(opener.open(a(), &d, NOW).is_ok());
    }

    #[test]
    fn replays_are_refused_and_a_restarted_sender_continues() {
        let (mut sealer, mut opener) = pair();
        let (d1, _) = sealer.flows(&[v4(1)], NOW);
        let (d2, _) = sealer.flows(&[v4(2)], NOW);
        assert!(opener.open(a(), &d2, NOW).is_ok());
        let seq2 = NOW * 1000 + 1;
        assert_eq!(opener.open(a(), &d2, NOW), Err(Refusal::Replayed { seq: seq2, last: seq2 }));
        assert_eq!(opener.open(a(), &d1, NOW), Err(Refusal::Replayed { seq: seq2 - 1, last: seq2 }));
        // Restarted a second later: its sequence starts from its clock, above the old one.
        let mut restarted = Sealer::new(KEY, (NOW + 1000) * 1000);
        assert!(opener.open(a(), &restarted.request_full_set(NOW + 1000), NOW + 1000).is_ok());
    }

    #[test]
    fn clocks_more_than_30_s_apart_are_refused() {
        let (mut sealer, mut opener) = pair();
        let (old, _) = sealer.flows(&[v4(1)], NOW - 30_001);
        assert_eq!(opener.open(a(), &old, NOW), Err(Refusal::TooOld { skew_ms: -30_001 }));
        let (ahead, _) = sealer.flows(&[v4(1)], NOW + 31_000);
        assert_eq!(opener.open(a(), &ahead, NOW), Err(Refusal::TooOld { skew_ms: 31_000 }));
        let (edge, _) = sealer.flows(&[v4(1)], NOW - 30_000);
        assert!(opener.open(a(), &edge, NOW).is_ok());
    }

    #[test]
    fn strangers_are_refused_and_peers_are_told_apart() {
        let (mut sealer, _) = pair();
        let (d, _) = sealer.flows(&[v4(1)], NOW);
        let mut opener = Opener::new(KEY, &[b(), a()]);
        assert_eq!(opener.open("198.18.1.99:7946".parse().unwrap(), &d, NOW), Err(Refusal::UnknownPeer));
        assert_eq!(opener.open(a(), &d, NOW).unwrap().peer, 1);
        // Another source port of a peer's address is still that peer.
        assert_eq!(opener.peer_of("198.18.1.12:40000".parse().unwrap()), Some(0));
        // An IPv4-mapped IPv6 source (a dual-stack socket) is the IPv4 peer.
        assert_eq!(opener.peer_of("[::ffff:198.18.1.11]:7946".parse().unwrap()), Some(1));
    }

    #[test]
    fn malformed_datagrams_are_refused_with_a_reason() {
        let (mut sealer, mut opener) = pair();
        let (d, _) = sealer.flows(&[v4(1), v6(2)], NOW);
        let refusal = |bytes: &[u8], opener: &mut Opener| opener.open(a(), bytes, NOW).unwrap_err();
        let mut bad = d.clone();
        bad[0] = b'Y';
        assert_eq!(refusal(&bad, &mut opener), Refusal::Malformed("no XLBS magic"));
        let mut bad = d.clone();
        bad[4] = 2;
        assert_eq!(refusal(&bad, &mut opener), Refusal::Malformed("unknown version"));
        let mut bad = d.clone();
        bad[5] = 9;
        assert_eq!(refusal(&bad, &mut opener), Refusal::Malformed("unknown message type"));
        let mut bad = d.clone();
        bad[25] = 3;
        assert_eq!(refusal(&bad, &mut opener), Refusal::Malformed("record cut short"));
        let mut bad = d.clone();
        bad[HEADER_LEN] = 5;
        assert_eq!(refusal(&bad, &mut opener), Refusal::Malformed("record of an unknown address family"));
        assert_eq!(refusal(&vec![0; 1401], &mut opener), Refusal::Malformed("longer than 1400 bytes"));
        assert!(opener.open(a(), &d, NOW).is_ok(), "none of these moved the sequence number");
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
        let (mut sealer, _) = pair();
        let records: Vec<FlowRecord> = (0..30u32).map(|i| if i.is_multiple_of(2) { v4(i) } else { v6(i) }).collect();
        let (d, n) = sealer.flows(&records, NOW);
        assert!(n > 10);
        // Truncated at every offset: refused, never accepted, never a panic.
        for cut in 0..d.len() {
            let mut opener = Opener::new(KEY, &[a()]);
            assert!(opener.open(a(), &d[..cut], NOW).is_err(), "accepted {cut} bytes of {}", d.len());
            let _ = parse(&d[..cut]);
        }
        // Every single bit flipped: refused.
        for bit in 0..d.len() * 8 {
            let mut flipped = d.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            let mut opener = Opener::new(KEY, &[a()]);
            assert!(opener.open(a(), &flipped, NOW).is_err(), "accepted with bit {bit} flipped");
            let _ = parse(&flipped);
        }
        // Random bytes, and random bytes behind a valid header.
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut opener = Opener::new(KEY, &[a()]);
        for i in 0..20_000u32 {
            let len = (rng.next() % 1500) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if i.is_multiple_of(2) && len >= HEADER_LEN {
                bytes[..HEADER_LEN].copy_from_slice(&d[..HEADER_LEN]);
                bytes[24..26].copy_from_slice(&((rng.next() % 80) as u16).to_be_bytes());
            }
            assert!(opener.open(a(), &bytes, NOW).is_err());
            let _ = parse(&bytes);
        }
    }
}
