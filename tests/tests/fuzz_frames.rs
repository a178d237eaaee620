//! The balancer under fuzzing: generated and mutated frames through the real
//! eBPF object (BPF_PROG_TEST_RUN), every outcome checked against what any
//! frame must get, whatever today's exact reasons are:
//!
//! - never XDP_ABORTED; exactly one outcome reason counted (the
//!   `conntrack_*` reasons are counted besides it), named for its action;
//! - XDP_PASS leaves the frame byte for byte as it came;
//! - a frame not addressed to a VIP address is passed, unless it is a NAT
//!   reply (then translated back from a VIP, or dropped) or an ICMP error
//!   from a NAT backend's side (then sent on from the VIP or from its own
//!   sender, quoting a packet to a NAT VIP, or dropped);
//! - XDP_TX/XDP_REDIRECT goes to a live backend of the VIP the frame was
//!   addressed to (DSR: only the MACs change; IP-in-IP: the frame whole
//!   behind a valid outer header to the backend; NAT: to the backend's
//!   address and port, an ICMP error quoting a packet from it), or back to
//!   the sender from the VIP address as an
//!   ICMP answer with valid checksums, or from a NAT VIP as a reply; a valid
//!   IPv4 header or transport checksum stays valid.
//!
//! `cargo test` runs a bounded pass (a fixed seed and the corpus under
//! tests/fuzz/frames); `cargo xtask fuzz --time N` runs random seeds for N
//! seconds (the `long_run` test below) and saves failing frames under
//! tests/fuzz/found/.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::programs::{TestRun as _, TestRunOptions};
use lb_common::{maps::programs, reasons};
use lb_userspace::reconcile::{Forwarding, VipSpec};
use tests::{
    harness::{Engine, XDP_DROP, XDP_PASS, XDP_TX, backend_mac, vip},
    packets::{self, CLIENT_MAC, L4, LB_MAC},
};

const XDP_ABORTED: u32 = 0;
const XDP_REDIRECT: u32 = 4;
/// The seed of the bounded pass; any other replays with XDPLB_FUZZ_SEED.
const BOUNDED_SEED: u64 = 0x5eed_f00d;
const BOUNDED_CASES: usize = 10_000;
/// Cases per engine: a long run starts a fresh one (empty tables) this often.
const BATCH: usize = 2000;
/// BPF_PROG_TEST_RUN takes an XDP frame of at most a page less the headroom
/// and the shared info (3,520 bytes on x86-64); longer ones are refused.
const MAX_FRAME: usize = 3520;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

// ---------------------------------------------------------------- randomness

type Rng = lb_common::seeded::SeededRng;

// ---------------------------------------------------------------- the world

struct Vip {
    spec: VipSpec,
    /// MAC of each backend: unique in the world, so a MAC names one backend.
    macs: Vec<[u8; 6]>,
}

/// An engine with VIPs of every mode, family and protocol, some backends
/// down, a VIP with none up, and one that passes when none is up.
struct World {
    engine: Engine,
    vips: Vec<Vip>,
    /// Frames the balancer sent to NAT backends, to build replies from.
    nat_sent: Vec<Vec<u8>>,
    corpus: Vec<Vec<u8>>,
}

fn addr(s: &str) -> IpAddr {
    s.parse().expect("a test address")
}

fn addr_bytes(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

impl World {
    fn new() -> Self {
        let layout = [
            // (forwarding, l4, address suffix, all backends down, pass when none is up)
            (Forwarding::Dsr, L4::Tcp, 100, false, false),
            (Forwarding::Dsr, L4::Udp, 100, false, false),
            (Forwarding::Ipip, L4::Tcp, 101, false, false),
            (Forwarding::Ipip, L4::Udp, 101, false, false),
            (Forwarding::Nat, L4::Tcp, 102, false, false),
            (Forwarding::Nat, L4::Udp, 102, false, false),
            (Forwarding::Dsr, L4::Tcp, 103, true, false),
            (Forwarding::Ipip, L4::Udp, 104, true, true),
        ];
        let mut vips = Vec::new();
        for v6 in [false, true] {
            for (j, &(fwd, l4, suffix, down, pass)) in layout.iter().enumerate() {
                let g = usize::from(v6) * layout.len() + j;
                let (vip_addr, backends): (String, Vec<String>) = if v6 {
                    (format!("2001:db8::{suffix}"), (1..=3).map(|i| format!("2001:db8:{:x}::{i}", 0x10 + g)).collect())
                } else {
                    (format!("198.18.0.{suffix}"), (1..=3).map(|i| format!("198.18.{}.{i}", 10 + g)).collect())
                };
                let port = if l4 == L4::Tcp { 80 } else { 53 };
                let list: Vec<(&str, u32)> = backends.iter().map(|b| (b.as_str(), 1)).collect();
                let mut spec = vip(&format!("v{g}"), &vip_addr, port, l4, fwd, &list);
                spec.pass_when_empty = pass;
                // Small tables: sixteen of them fit the harness's Maglev pool.
                spec.table_size = 251;
                let mut macs = Vec::new();
                for (i, b) in spec.backends.iter_mut().enumerate() {
                    b.mac = backend_mac(g * 4 + i);
                    // The third backend is down everywhere; all are on the down VIPs.
                    b.healthy = !down && i < 2;
                    if fwd == Forwarding::Nat {
                        b.port = 8080;
                    }
                    macs.push(b.mac);
                }
                vips.push(Vip { spec, macs });
            }
        }
        let mut engine = Engine::new();
        let specs: Vec<VipSpec> = vips.iter().map(|v| v.spec.clone()).collect();
        engine.apply(&specs);
        Self { engine, vips, nat_sent: Vec::new(), corpus: read_corpus() }
    }

    fn is_vip_addr(&self, a: IpAddr) -> bool {
        self.vips.iter().any(|v| v.spec.addr == a)
    }

    fn is_nat_backend(&self, a: IpAddr) -> bool {
        self.vips
            .iter()
            .filter(|v| v.spec.forwarding == Forwarding::Nat)
            .any(|v| v.spec.backends.iter().any(|b| b.addr == a))
    }

    /// An ICMP message from a NAT backend's address or MAC: maybe an error
    /// about a NAT connection, from the backend side.
    fn nat_icmp_like(&self, input: &[u8]) -> bool {
        let icmp = input.get(14..).and_then(packets::transport_of).is_some_and(|(p, _, _)| matches!(p, 1 | 58));
        let nat_mac = input
            .get(6..12)
            .and_then(|m| self.backend_by_mac(m))
            .is_some_and(|(v, _)| v.spec.forwarding == Forwarding::Nat);
        icmp && (nat_mac || addrs(input).is_some_and(|(src, _)| self.is_nat_backend(src)))
    }

    fn backend_by_mac(&self, mac: &[u8]) -> Option<(&Vip, usize)> {
        self.vips.iter().find_map(|v| v.macs.iter().position(|m| m[..] == *mac).map(|i| (v, i)))
    }

    /// Runs one frame; None if BPF_PROG_TEST_RUN refuses it (too long).
    fn run(&mut self, frame: &[u8]) -> Option<(u32, Vec<u8>)> {
        let prog = self.engine.dp.program(programs::BALANCER).expect("the balancer is loaded");
        // Room for an outer header, or an ICMP answer quoting the frame.
        let mut out = vec![0u8; frame.len() + 1024];
        let r = prog.test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..Default::default() });
        match r {
            Ok(r) => {
                out.truncate(r.data_size_out as usize);
                Some((r.return_value, out))
            }
            Err(e) => {
                assert!(frame.len() > 1514, "BPF_PROG_TEST_RUN refused a {}-byte frame: {e}", frame.len());
                None
            }
        }
    }
}

fn read_corpus() -> Vec<Vec<u8>> {
    corpus_files(&corpus_dir().join("frames")).into_iter().map(|(_, f)| f).collect()
}

/// The `.hex` files of `dir`: hex digits, whitespace and `#` comments.
fn corpus_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths.into_iter().filter(|p| p.extension().is_some_and(|e| e == "hex")) {
        let text = std::fs::read_to_string(&p).expect("a corpus file is text");
        let digits: Vec<u8> = text
            .lines()
            .map(|l| l.split('#').next().unwrap_or(""))
            .flat_map(|l| l.bytes().filter(|b| !b.is_ascii_whitespace()).collect::<Vec<_>>())
            .collect();
        let bytes = digits
            .chunks(2)
            .map(|c| u8::from_str_radix(std::str::from_utf8(c).unwrap(), 16))
            .collect::<Result<Vec<u8>, _>>()
            .unwrap_or_else(|e| panic!("{}: not hex: {e}", p.display()));
        out.push((p.display().to_string(), bytes));
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::new();
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 && i % 32 == 0 {
            s.push('\n');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}

// ---------------------------------------------------------------- checks

/// Source and destination address of an Ethernet frame's IP header, if the
/// frame is long enough to hold them (the header itself may be nonsense).
fn addrs(frame: &[u8]) -> Option<(IpAddr, IpAddr)> {
    match frame.get(12..14)? {
        [0x08, 0x00] if frame.len() >= 34 => {
            let a = |o: usize| IpAddr::from(<[u8; 4]>::try_from(&frame[o..o + 4]).unwrap());
            Some((a(26), a(30)))
        }
        [0x86, 0xdd] if frame.len() >= 54 => {
            let a = |o: usize| IpAddr::from(<[u8; 16]>::try_from(&frame[o..o + 16]).unwrap());
            Some((a(22), a(38)))
        }
        _ => None,
    }
}

/// Transport protocol and ports of an IP packet, when it has them.
fn ports(ip: &[u8]) -> Option<(u8, u16, u16)> {
    let (proto, off, total) = packets::transport_of(ip)?;
    (matches!(proto, 6 | 17) && total >= off + 4)
        .then(|| (proto, u16::from_be_bytes([ip[off], ip[off + 1]]), u16::from_be_bytes([ip[off + 2], ip[off + 3]])))
}

/// Source and destination address of an IP packet (a quote, maybe cut).
fn addrs_of_ip(ip: &[u8]) -> Option<(IpAddr, IpAddr)> {
    match ip.first()? >> 4 {
        4 if ip.len() >= 20 => Some((
            IpAddr::from(<[u8; 4]>::try_from(&ip[12..16]).unwrap()),
            IpAddr::from(<[u8; 4]>::try_from(&ip[16..20]).unwrap()),
        )),
        6 if ip.len() >= 40 => Some((
            IpAddr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap()),
            IpAddr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap()),
        )),
        _ => None,
    }
}

/// A NAT-translated ICMP error: if the input's checksums all verified
/// (outer, ICMP, quoted IPv4 header, whole quoted segment), the output's
/// must; its quote must pass `quoted`. Nothing to check for other frames.
fn icmp_error_kept(ip_in: &[u8], ip_out: &[u8], quoted: impl Fn(&[u8]) -> Result<(), String>) -> Result<(), String> {
    let Some(q) = packets::icmp_quote(ip_out) else { return Ok(()) };
    if packets::icmp_error_checksums_ok(ip_in) && !packets::icmp_error_checksums_ok(ip_out) {
        return Err("its checksums all verified, and do not any more".into());
    }
    quoted(q)
}

/// A valid checksum must stay valid through a rewrite; an invalid one is the
/// sender's business (a balancer does not verify checksums).
fn checksums_kept(ip_in: &[u8], ip_out: &[u8]) -> Result<(), String> {
    if packets::transport_checksum_ok(ip_in) == Some(true) && packets::transport_checksum_ok(ip_out) != Some(true) {
        return Err("the transport checksum was valid and is not any more".into());
    }
    if ip_in.first().is_some_and(|b| b >> 4 == 4)
        && packets::ipv4_header_valid(ip_in)
        && !packets::ipv4_header_valid(ip_out)
    {
        return Err("the IPv4 header checksum was valid and is not any more".into());
    }
    Ok(())
}

impl World {
    /// Runs `input` and checks every invariant. Ok(None) if the kernel
    /// refused the frame; Ok(Some(reason name)) otherwise.
    fn case(&mut self, input: &[u8]) -> Result<Option<&'static str>, String> {
        let before = self.engine.reasons();
        let Some((action, out)) = self.run(input) else { return Ok(None) };
        let after = self.engine.reasons();
        let counted: Vec<usize> = (0..before.len())
            .filter(|&i| !reasons::NAMES[i].starts_with("conntrack_"))
            .flat_map(|i| std::iter::repeat_n(i, (after[i] - before[i]) as usize))
            .collect();
        let [reason] = counted[..] else {
            let names: Vec<&str> = counted.iter().map(|&i| reasons::NAMES[i]).collect();
            return Err(format!("action {action}: {} outcome reasons counted, not one: {names:?}", names.len()));
        };
        let name = reasons::NAMES[reason];
        self.check(input, action, &out, name).map_err(|e| {
            format!("action {action} ({name}): {e}\n# out ({} bytes): {}", out.len(), hex(&out).replace('\n', ""))
        })?;
        Ok(Some(name))
    }

    fn check(&mut self, input: &[u8], action: u32, out: &[u8], reason: &str) -> Result<(), String> {
        let family_of_reason = match action {
            XDP_ABORTED => return Err("XDP_ABORTED".into()),
            XDP_PASS => "pass_",
            XDP_DROP => "drop_",
            XDP_TX | XDP_REDIRECT => "",
            _ => return Err("not an XDP action".into()),
        };
        // A transmitted frame may count a drop: the packet was dropped and
        // an answer (e.g. "fragmentation needed") sent in its place.
        let named_for_action = if family_of_reason.is_empty() {
            !reason.starts_with("pass_")
        } else {
            reason.starts_with(family_of_reason)
        };
        if !named_for_action {
            return Err("the reason counted does not name the action taken".into());
        }
        if action == XDP_PASS {
            return if out == input { Ok(()) } else { Err("passed, but not byte for byte as it came".into()) };
        }
        let view = addrs(input);
        let to_vip = view.is_some_and(|(_, dst)| self.is_vip_addr(dst));
        let nat_reply_like = view.is_some_and(|(src, _)| self.is_nat_backend(src)) || self.nat_icmp_like(input);
        if action == XDP_DROP {
            return if to_vip || nat_reply_like {
                Ok(())
            } else {
                Err("dropped a frame addressed to no VIP address".into())
            };
        }
        // Transmitted: to a backend, back to the sender, or a NAT reply.
        let (src, dst) = view.ok_or("transmitted a frame without an IP header")?;
        if out.len() < 14 || out[6..12] != LB_MAC {
            return Err(format!("transmitted from MAC {:02x?}, not the balancer's", out.get(6..12)));
        }
        if let Some((vip, i)) = self.backend_by_mac(&out[0..6]) {
            let (spec, name) = (vip.spec.clone(), vip.spec.name.clone());
            if !spec.backends[i].healthy {
                return Err(format!("sent to backend {i} of VIP {name}, which is down"));
            }
            if spec.addr != dst {
                return Err(format!("sent to a backend of VIP {name} ({}), but addressed to {dst}", spec.addr));
            }
            return self.check_forward(&spec, i, input, out);
        }
        if !to_vip && !nat_reply_like {
            return Err("transmitted a frame addressed to no VIP address".into());
        }
        let (osrc, odst) = addrs(out).ok_or("transmitted without an IP header")?;
        if to_vip && osrc == dst && odst == src {
            // An answer from the VIP address to the sender (ICMP echo reply,
            // "fragmentation needed"): ICMP, valid checksums, to its MAC.
            if out[0..6] != input[6..12] {
                return Err("an answer to the sender, but not to its MAC".into());
            }
            let (proto, _, _) = packets::transport_of(&out[14..])
                .ok_or("an answer that is not a whole IP packet (its length does not match the frame)")?;
            if !matches!(proto, 1 | 58) {
                return Err(format!("an answer to the sender of protocol {proto}, not ICMP"));
            }
            if packets::transport_checksum_ok(&out[14..]).is_none() {
                return Err("an answer whose ICMP header lies outside its IP packet".into());
            }
            // As for forwarding: the balancer need not verify the request's
            // checksums, but what was valid must stay valid.
            checksums_kept(&input[14..], &out[14..]).map_err(|e| format!("an answer: {e}"))?;
            return Ok(());
        }
        if nat_reply_like {
            return self.check_nat_reply(input, out);
        }
        Err(format!("transmitted to {odst} from {osrc}: neither a backend, nor an answer, nor a NAT reply"))
    }

    fn check_forward(&mut self, spec: &VipSpec, i: usize, input: &[u8], out: &[u8]) -> Result<(), String> {
        let backend = &spec.backends[i];
        let v4 = spec.addr.is_ipv4();
        match spec.forwarding {
            Forwarding::Dsr => {
                if out.len() != input.len() || out[12..] != input[12..] {
                    return Err("DSR changed more than the MACs".into());
                }
            }
            Forwarding::Ipip => {
                let (outer, ethertype) = if v4 { (20, [0x08, 0x00]) } else { (40, [0x86, 0xdd]) };
                if out.len() != input.len() + outer || out[14 + outer..] != input[14..] || out[12..14] != ethertype {
                    return Err("IP-in-IP: not the frame whole behind one outer header".into());
                }
                let ip = &out[14..14 + outer];
                let (len, proto, dst) = if v4 {
                    (u16::from_be_bytes([ip[2], ip[3]]) as usize, ip[9], &ip[16..20])
                } else {
                    (40 + u16::from_be_bytes([ip[4], ip[5]]) as usize, ip[6], &ip[24..40])
                };
                if (v4 && (ip[0] != 0x45 || !packets::ipv4_header_ok(ip))) || (!v4 && ip[0] >> 4 != 6) {
                    return Err("IP-in-IP: invalid outer header".into());
                }
                if proto != if v4 { 4 } else { 41 } || dst != addr_bytes(backend.addr) {
                    return Err("IP-in-IP: outer header not IP-in-IP to the backend".into());
                }
                if len > out.len() - 14 || len <= outer {
                    return Err(format!("IP-in-IP: outer length {len} does not fit the frame"));
                }
            }
            Forwarding::Nat => {
                let (osrc, odst) = addrs(out).ok_or("NAT: no IP header")?;
                let (src, _) = addrs(input).ok_or("NAT: no IP header in")?;
                if out.len() != input.len() || odst != backend.addr || osrc != src {
                    return Err(format!("NAT: sent from {osrc} to {odst}, not from {src} to the backend"));
                }
                checksums_kept(&input[14..], &out[14..]).map_err(|e| format!("NAT: {e}"))?;
                icmp_error_kept(&input[14..], &out[14..], |q| {
                    let (qsrc, _) = addrs_of_ip(q).ok_or("no quoted IP header")?;
                    let sport = ports(q).map(|(_, s, _)| s);
                    if qsrc != backend.addr || sport.is_some_and(|s| s != backend.port) {
                        return Err(format!("quotes a packet from {qsrc}:{sport:?}, not from the backend"));
                    }
                    Ok(())
                })
                .map_err(|e| format!("NAT: an ICMP error: {e}"))?;
                if let Some((proto, _, dport)) = ports(&out[14..])
                    && proto == spec.protocol
                {
                    if dport != backend.port {
                        return Err(format!("NAT: to port {dport}, not the backend's {}", backend.port));
                    }
                    if self.nat_sent.len() < 256 {
                        self.nat_sent.push(out.to_vec());
                    }
                }
            }
        }
        Ok(())
    }

    fn check_nat_reply(&self, input: &[u8], out: &[u8]) -> Result<(), String> {
        let (src, dst) = addrs(input).ok_or("no IP header")?;
        let (osrc, odst) = addrs(out).ok_or("a NAT reply without an IP header")?;
        let vips: Vec<&VipSpec> =
            self.vips.iter().map(|v| &v.spec).filter(|s| s.forwarding == Forwarding::Nat && s.addr == osrc).collect();
        // An ICMP error about a NAT connection from another host on the
        // backend side (a router, or another server) keeps its own source;
        // only the connection's own backend is answered for by the VIP.
        let quoted_dst = packets::icmp_quote(&input[14..]).and_then(addrs_of_ip).map(|(_, d)| d);
        let router_error = self.nat_icmp_like(input) && osrc == src && quoted_dst.is_some_and(|d| d != src);
        if (vips.is_empty() && !router_error) || odst != dst || out.len() != input.len() {
            return Err(format!("a NAT reply from {osrc} to {odst}: not from a NAT VIP to {dst}"));
        }
        checksums_kept(&input[14..], &out[14..]).map_err(|e| format!("NAT reply: {e}"))?;
        icmp_error_kept(&input[14..], &out[14..], |q| {
            let (_, qdst) = addrs_of_ip(q).ok_or("no quoted IP header")?;
            let dport = ports(q).map(|(_, _, d)| d);
            let vip = self
                .vips
                .iter()
                .map(|v| &v.spec)
                .find(|s| s.forwarding == Forwarding::Nat && s.addr == qdst && dport.is_none_or(|d| d == s.port));
            vip.map(|_| ()).ok_or(format!("quotes a packet to {qdst}:{dport:?}, not to a NAT VIP"))
        })
        .map_err(|e| format!("NAT reply: an ICMP error: {e}"))?;
        if let Some((proto, sport, _)) = ports(&out[14..])
            && !vips.iter().any(|s| s.protocol == proto && s.port == sport)
        {
            return Err(format!("a NAT reply from port {sport}, not a VIP's"));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- generators

fn client(rng: &Rng, v6: bool) -> IpAddr {
    if v6 {
        addr(&format!("2001:db8:c::{:x}", rng.range(1, 0xffff)))
    } else {
        addr(&format!("198.18.{}.{}", rng.range(128, 191), rng.range(1, 254)))
    }
}

/// An Ethernet frame from the client's MAC to the balancer's carrying `l4`
/// (protocol `proto`) from `src` to `dst`, checksums valid.
fn ip_frame(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&LB_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
            f.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
            f.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto, 0, 0]);
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
            f.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            f.extend_from_slice(&[proto, 64]);
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
        }
        _ => unreachable!("one family"),
    }
    f.extend_from_slice(l4);
    packets::fix_checksums(&mut f);
    f
}

/// A TCP or UDP segment, its checksum left for `ip_frame`.
fn segment(rng: &Rng, proto: u8, sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    if proto == 6 {
        s.extend_from_slice(&rng.bytes(8)); // sequence, acknowledgement
        let flags = rng.pick(&[0x02, 0x10, 0x18, 0x11, 0x04, 0x12, rng.next() as u8]);
        s.extend_from_slice(&[0x50, flags, 0xfa, 0xf0, 0, 0, 0, 0]);
    } else {
        s.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
        s.extend_from_slice(&[0, 0]);
    }
    s.extend(rng.bytes(payload));
    s
}

fn payload_len(rng: &Rng) -> usize {
    match rng.below(10) {
        0 => 0,
        1 => rng.range(1400, 1480),
        2 => rng.range(1480, MAX_FRAME - 74),
        _ => rng.below(120),
    }
}

/// Client → VIP: one of the world's VIPs, its port and protocol (mostly).
fn to_vip(rng: &Rng, w: &World) -> Vec<u8> {
    let s = &w.vips[rng.below(w.vips.len())].spec;
    let c = client(rng, s.addr.is_ipv6());
    let proto = if rng.chance(90) { s.protocol } else { rng.pick(&[6, 17]) };
    let dport = if rng.chance(90) { s.port } else { rng.next() as u16 };
    let len = payload_len(rng);
    let seg = segment(rng, proto, rng.range(1024, 65535) as u16, dport, len);
    ip_frame(c, s.addr, proto, &seg)
}

fn to_elsewhere(rng: &Rng, w: &World) -> Vec<u8> {
    let v6 = rng.chance(50);
    let s = &w.vips[rng.below(w.vips.len())].spec;
    let dst = match rng.below(3) {
        0 if s.addr.is_ipv6() == v6 => s.backends[rng.below(3)].addr,
        1 => client(rng, v6),
        _ => addr(if v6 { "2001:db8::200" } else { "198.18.0.200" }),
    };
    let proto = rng.pick(&[6, 17, 1, 58, 4, 41, 47, 132]);
    let seg =
        segment(rng, if proto == 6 { 6 } else { 17 }, rng.next() as u16, rng.pick(&[80, 53, 8080]), rng.below(64));
    ip_frame(client(rng, v6), dst, proto, &seg)
}

/// A NAT backend's answer to a frame the balancer sent it, or a stranger's.
fn nat_reply(rng: &Rng, w: &World) -> Vec<u8> {
    let Some(sent) = w.nat_sent.get(rng.below(w.nat_sent.len())) else { return to_vip(rng, w) };
    let (src, dst) = addrs(sent).expect("sent frames have IP headers");
    let Some((proto, sport, dport)) = ports(&sent[14..]) else { return to_vip(rng, w) };
    let (sport, dport) = if rng.chance(80) { (dport, sport) } else { (dport, rng.next() as u16) };
    let len = payload_len(rng);
    let mut f = ip_frame(dst, src, proto, &segment(rng, proto, sport, dport, len));
    f[6..12].copy_from_slice(&sent[0..6]);
    f
}

fn icmp_echo(rng: &Rng, w: &World) -> Vec<u8> {
    let s = &w.vips[rng.below(w.vips.len())].spec;
    let v6 = s.addr.is_ipv6();
    let dst = if rng.chance(85) { s.addr } else { client(rng, v6) };
    let kind = match (v6, rng.below(5)) {
        (false, 0) => rng.pick(&[0, 13, 17, 5, 9]),
        (true, 0) => rng.pick(&[129, 133, 134, 135, 136, 137]),
        (false, _) => 8,
        (true, _) => 128,
    };
    let len = rng.pick(&[0, 4, 56, rng.below(1600), rng.range(1400, MAX_FRAME - 70)]);
    let body = rng.bytes(len);
    packets::icmp(client(rng, v6), dst, kind, 0, [0, rng.next() as u8, 0, 1], &body)
}

/// An ICMP error to a VIP address quoting a packet of one of its flows (as a
/// router on the way to the client sends it), or something like one.
fn icmp_error(rng: &Rng, w: &World) -> Vec<u8> {
    let s = &w.vips[rng.below(w.vips.len())].spec;
    let v6 = s.addr.is_ipv6();
    let c = client(rng, v6);
    let (vport, cport) = (s.port, rng.range(1024, 65535) as u16);
    let quoted_frame = if rng.chance(70) {
        // The VIP's answer to the client, as the router saw it.
        let len = rng.below(40);
        ip_frame(s.addr, c, s.protocol, &segment(rng, s.protocol, vport, cport, len))
    } else {
        // The client's own packet (a router on the way in), or another flow.
        let len = rng.below(40);
        ip_frame(c, s.addr, rng.pick(&[6, 17, 1]), &segment(rng, s.protocol, cport, vport, len))
    };
    let mut quoted = quoted_frame[14..].to_vec();
    let ip_len = if v6 { 40 } else { 20 };
    quoted.truncate(match rng.below(4) {
        0 => quoted.len(),
        1 => rng.below(quoted.len() + 1),
        _ => (ip_len + 8).min(quoted.len()),
    });
    let (kind, code, rest) = match (v6, rng.below(5)) {
        (false, 0) => (11, 0, [0; 4]),
        (false, 1) => (3, rng.pick(&[0, 1, 3, 13]), [0; 4]),
        (false, 2) => (rng.next() as u8, rng.next() as u8, [0; 4]),
        (false, _) => (3, 4, [0, 0, 0x05, 0x78]),
        (true, 0) => (3, 0, [0; 4]),
        (true, 1) => (1, rng.pick(&[0, 3, 4]), [0; 4]),
        (true, 2) => (4, rng.below(3) as u8, [0, 0, 0, 40]),
        (true, _) => (2, 0, [0, 0, 0x05, 0x00]),
    };
    let router = if v6 { addr("2001:db8:ee::1") } else { addr("198.18.250.1") };
    let mut f = packets::icmp(router, s.addr, kind, code, rest, &quoted);
    if rng.chance(20) {
        // The quoted header's own checksum broken, the message's fixed.
        let at = 14 + if v6 { 48 } else { 28 } + rng.below(ip_len);
        if at < f.len() {
            f[at] ^= 1 << rng.below(8);
            packets::fix_checksums(&mut f);
        }
    }
    f
}

/// An ICMP error about a NAT connection the balancer forwarded: from its
/// backend (or a router behind it) to the client, quoting what the backend
/// got; or from a router to the VIP, quoting a reply the client got.
fn nat_icmp_error(rng: &Rng, w: &World) -> Vec<u8> {
    let Some(sent) = w.nat_sent.get(rng.below(w.nat_sent.len())) else { return icmp_error(rng, w) };
    let (client, backend) = addrs(sent).expect("sent frames have IP headers");
    let Some((proto, cport, _)) = ports(&sent[14..]) else { return icmp_error(rng, w) };
    let v6 = client.is_ipv6();
    let (kind, code, rest) = match (v6, rng.below(4)) {
        (false, 0) => (11, 0, [0; 4]),
        (false, 1) => (3, 3, [0; 4]),
        (false, _) => (3, 4, [0, 0, 0x05, 0x78]),
        (true, 0) => (3, 0, [0; 4]),
        (true, 1) => (1, 4, [0; 4]),
        (true, _) => (2, 0, [0, 0, 0x05, 0x00]),
    };
    let ip_len = if v6 { 40 } else { 20 };
    let cut = |ip: &[u8]| -> Vec<u8> {
        let keep = match rng.below(4) {
            0 => rng.below(ip.len() + 1),
            1 => ip_len + 8,
            _ => ip.len(),
        };
        ip[..keep.min(ip.len())].to_vec()
    };
    if rng.chance(50) {
        let from = if rng.chance(70) { backend } else { addr(if v6 { "2001:db8:201::1" } else { "198.18.201.1" }) };
        let mut f = packets::icmp(from, client, kind, code, rest, &cut(&sent[14..]));
        f[6..12].copy_from_slice(&sent[0..6]);
        return f;
    }
    let Some((vip, _)) = w.backend_by_mac(&sent[0..6]) else { return icmp_error(rng, w) };
    let s = &vip.spec;
    let len = rng.below(40);
    let reply = ip_frame(s.addr, client, proto, &segment(rng, proto, s.port, cport, len));
    let router = if v6 { addr("2001:db8:ee::1") } else { addr("198.18.250.1") };
    packets::icmp(router, s.addr, kind, code, rest, &cut(&reply[14..]))
}

fn ipv4_fragment(rng: &Rng, w: &World) -> Vec<u8> {
    let mut f = to_vip(rng, w);
    if f[12..14] == [0x08, 0x00] {
        let flags: u16 = rng.pick(&[0x2000, 0x00b9, 0x2001, 0x4000, 0x3fff, 0x6000, 0x8000, rng.next() as u16]);
        f[20..22].copy_from_slice(&flags.to_be_bytes());
        packets::fix_checksums(&mut f);
    }
    f
}

/// IPv6 with a chain of extension headers in front of the transport header.
fn ipv6_chain(rng: &Rng, w: &World) -> Vec<u8> {
    let six: Vec<&Vip> = w.vips.iter().filter(|v| v.spec.addr.is_ipv6()).collect();
    let s = &six[rng.below(six.len())].spec;
    let len = rng.below(64);
    let seg = segment(rng, s.protocol, rng.range(1024, 65535) as u16, s.port, len);
    let mut next = if rng.chance(90) { s.protocol } else { rng.pick(&[58, 59, 4, 41]) };
    let mut chain: Vec<u8> = Vec::new();
    for _ in 0..rng.range(1, 9) {
        let kind = rng.pick(&[0, 43, 60, 60, 44, 51]);
        let mut h = match kind {
            44 => {
                let mut h = vec![next, 0];
                h.extend_from_slice(&(rng.pick(&[0u16, 1, 8, 0x00b9, rng.next() as u16])).to_be_bytes());
                h.extend(rng.bytes(4));
                h
            }
            51 => {
                let units = rng.pick(&[1usize, 4, 7, 0, 255]);
                let mut h = vec![next, units as u8, 0, 0];
                h.extend(rng.bytes((units + 2) * 4 - 4));
                h
            }
            _ => {
                let units = rng.pick(&[0usize, 0, 1, 3, 255]);
                let mut h = vec![next, units as u8];
                h.extend_from_slice(&[1, (units * 8 + 4) as u8]); // PadN
                h.extend(std::iter::repeat_n(0, (units + 1) * 8 - 4));
                h
            }
        };
        if rng.chance(5) {
            h.truncate(rng.below(h.len()));
        }
        h.extend_from_slice(&chain);
        chain = h;
        next = kind;
    }
    chain.extend_from_slice(&seg);
    let mut f = ip_frame(client(rng, true), s.addr, 0, &chain);
    f[20] = next;
    packets::fix_checksums(&mut f);
    f
}

/// IPv4 or IPv6 carried in IPv4 or IPv6, once or more, toward a VIP address.
fn ip_in_ip(rng: &Rng, w: &World) -> Vec<u8> {
    let mut f = to_vip(rng, w);
    for _ in 0..rng.range(1, 3) {
        let inner = f[14..].to_vec();
        let v6 = rng.chance(50);
        let dst = if rng.chance(80) {
            let s: Vec<IpAddr> = w.vips.iter().map(|v| v.spec.addr).filter(|a| a.is_ipv6() == v6).collect();
            s[rng.below(s.len())]
        } else {
            client(rng, v6)
        };
        let proto = if inner[0] >> 4 == 4 { 4 } else { 41 };
        f = ip_frame(client(rng, v6), dst, proto, &inner);
    }
    f
}

fn vlan(rng: &Rng, w: &World) -> Vec<u8> {
    let f = to_vip(rng, w);
    let mut out = f[..12].to_vec();
    for _ in 0..rng.range(1, 2) {
        out.extend_from_slice(&rng.pick(&[[0x81, 0x00], [0x88, 0xa8], [0x91, 0x00]]));
        out.extend_from_slice(&[0, rng.below(16) as u8]);
    }
    if rng.chance(30) {
        out.extend_from_slice(&[rng.next() as u8, rng.next() as u8]);
        out.extend_from_slice(&f[14..]);
    } else {
        out.extend_from_slice(&f[12..]);
    }
    out
}

/// TCP with a soup of options, and data offsets right and wrong.
fn tcp_options(rng: &Rng, w: &World) -> Vec<u8> {
    let tcp: Vec<&Vip> = w.vips.iter().filter(|v| v.spec.protocol == 6).collect();
    let s = &tcp[rng.below(tcp.len())].spec;
    let mut opts = Vec::new();
    while opts.len() < rng.below(44) {
        match rng.below(8) {
            0 => opts.push(0),
            1 => opts.push(1),
            2 => opts.extend_from_slice(&[2, 4, 0x05, 0xb4]),
            3 => opts.extend_from_slice(&[3, 3, 7]),
            4 => opts.extend_from_slice(&[4, 2]),
            5 => opts.extend_from_slice(&[8, 10, 1, 2, 3, 4, 5, 6, 7, 8]),
            6 => opts.extend_from_slice(&[rng.next() as u8, rng.pick(&[0, 1, 2, 40, 255])]),
            _ => opts.push(rng.next() as u8),
        }
    }
    opts.truncate(40);
    let pad = (4 - opts.len() % 4) % 4;
    opts.extend(std::iter::repeat_n(0, pad));
    let len = rng.below(64);
    let mut seg = segment(rng, 6, rng.range(1024, 65535) as u16, s.port, len);
    let tail = seg.split_off(20);
    seg.extend_from_slice(&opts);
    seg.extend_from_slice(&tail);
    let doff = if rng.chance(70) { 5 + opts.len() / 4 } else { rng.below(16) };
    seg[12] = (doff as u8) << 4;
    ip_frame(client(rng, s.addr.is_ipv6()), s.addr, 6, &seg)
}

fn random_bytes(rng: &Rng, w: &World) -> Vec<u8> {
    let len = rng.pick(&[14, 15, 33, 34, 53, 54, rng.range(14, 200), rng.range(14, MAX_FRAME)]);
    let mut f = rng.bytes(len);
    if rng.chance(70) {
        f[0..6].copy_from_slice(&LB_MAC);
    }
    if rng.chance(70) && len >= 54 {
        let a = w.vips[rng.below(w.vips.len())].spec.addr;
        match a {
            IpAddr::V4(a) => {
                f[12..14].copy_from_slice(&[0x08, 0x00]);
                f[14] = 0x45;
                f[30..34].copy_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                f[12..14].copy_from_slice(&[0x86, 0xdd]);
                f[14] = 0x60;
                f[38..54].copy_from_slice(&a.octets());
            }
        }
    }
    f
}

fn from_corpus(rng: &Rng, w: &World) -> Vec<u8> {
    match w.corpus.get(rng.below(w.corpus.len())) {
        Some(f) => f.clone(),
        None => to_vip(rng, w),
    }
}

type Generator = fn(&Rng, &World) -> Vec<u8>;

const GENERATORS: [(&str, Generator); 14] = [
    ("to_vip", to_vip),
    ("to_vip", to_vip),
    ("to_elsewhere", to_elsewhere),
    ("nat_reply", nat_reply),
    ("icmp_echo", icmp_echo),
    ("icmp_error", icmp_error),
    ("nat_icmp_error", nat_icmp_error),
    ("ipv4_fragment", ipv4_fragment),
    ("ipv6_chain", ipv6_chain),
    ("ip_in_ip", ip_in_ip),
    ("vlan", vlan),
    ("tcp_options", tcp_options),
    ("random_bytes", random_bytes),
    ("from_corpus", from_corpus),
];

/// One structural mutation of a frame.
fn mutate(rng: &Rng, f: &mut Vec<u8>) {
    let len = f.len();
    let v4 = f.get(12..14) == Some(&[0x08, 0x00]);
    let header = |rng: &Rng| if rng.chance(80) { rng.below(len.min(80)) } else { rng.below(len) };
    match rng.below(12) {
        0 => f.truncate(rng.range(14, len)),
        1 => {
            for _ in 0..rng.range(1, 4) {
                let at = header(rng);
                f[at] ^= 1 << rng.below(8);
            }
        }
        2 => {
            let at = header(rng);
            f[at] = rng.pick(&[0, 0xff, 0x7f, 0x80, rng.next() as u8]);
        }
        3 if v4 && len > 14 => f[14] = 0x40 | rng.below(16) as u8,
        4 if len >= 20 => {
            let ihl = if v4 { (f[14] & 0xf) as usize * 4 } else { 40 };
            let l3 = len - 14;
            let v = rng.pick(&[0, 1, 19, 20, ihl, l3 - 1, l3, l3 + 1, l3 + 8, 0xffff, rng.next() as u16 as usize]);
            let at = if v4 { 16 } else { 18 };
            let v = if v4 { v } else { v.saturating_sub(40) };
            f[at..at + 2].copy_from_slice(&(v as u16).to_be_bytes());
        }
        5 if len > 23 => {
            let at = if v4 { 23 } else { 20 };
            f[at] = rng.pick(&[0, 1, 4, 6, 17, 41, 43, 44, 50, 51, 58, 59, 60, 255]);
        }
        6 => {
            if let Some((6, off, _)) = f.get(14..).and_then(packets::transport_of)
                && 14 + off + 12 < len
            {
                f[14 + off + 12] = (rng.below(16) as u8) << 4;
            }
        }
        7 => {
            let at = rng.range(14, len);
            let n = rng.range(1, 16);
            let bytes = rng.bytes(n);
            f.splice(at..at, bytes);
        }
        8 if len > 15 => {
            let at = rng.range(14, len - 1);
            let end = rng.range(at + 1, len.min(at + 16));
            f.drain(at..end);
        }
        9 => f[0..6].copy_from_slice(&rng.pick(&[[0x02, 0x1b, 0, 0, 0, 0x02], [0xff; 6], [0x01, 0, 0x5e, 0, 0, 1]])),
        10 => {
            let n = rng.range(1, 64);
            f.extend(rng.bytes(n));
        }
        _ => {
            // The other family's ethertype over the same bytes.
            let e = if v4 { [0x86, 0xdd] } else { [0x08, 0x00] };
            f[12..14].copy_from_slice(&e);
        }
    }
}

/// One fuzz case: a generated frame, maybe mutated, checksums maybe fixed.
fn generate(rng: &Rng, w: &World) -> (&'static str, Vec<u8>) {
    let (name, make) = GENERATORS[rng.below(GENERATORS.len())];
    let mut f = make(rng, w);
    if rng.chance(60) {
        for _ in 0..rng.range(1, 3) {
            mutate(rng, &mut f);
        }
        if rng.chance(60) {
            packets::fix_checksums(&mut f);
        }
    }
    f.truncate(MAX_FRAME);
    if f.len() < 14 {
        f.resize(14, 0);
    }
    (name, f)
}

// ---------------------------------------------------------------- running

struct Failure {
    seed: u64,
    case: usize,
    frame: Vec<u8>,
    what: String,
}

#[derive(Default)]
struct Tally {
    cases: usize,
    refused: usize,
    reasons: BTreeMap<&'static str, usize>,
    failures: Vec<Failure>,
}

impl Tally {
    fn record(&mut self, seed: u64, case: usize, frame: &[u8], result: Result<Option<&'static str>, String>) {
        self.cases += 1;
        match result {
            Ok(Some(reason)) => *self.reasons.entry(reason).or_default() += 1,
            Ok(None) => self.refused += 1,
            Err(what) => {
                if self.failures.len() < 20 {
                    self.failures.push(Failure { seed, case, frame: frame.to_vec(), what });
                }
            }
        }
    }

    /// Prints the summary and every failure; panics if there was one.
    fn finish(&self, save: bool) {
        println!(
            "{} cases ({} refused by the kernel as too long); reasons: {:?}",
            self.cases, self.refused, self.reasons
        );
        for f in &self.failures {
            let text = format!(
                "# seed {:#x} case {} ({} bytes): {}\n# replay: cargo xtask fuzz --seed {:#x}, or copy into tests/fuzz/frames/\n{}\n",
                f.seed,
                f.case,
                f.frame.len(),
                f.what,
                f.seed,
                hex(&f.frame)
            );
            println!("FAILURE {text}");
            if save {
                let dir = corpus_dir().join("found");
                std::fs::create_dir_all(&dir).expect("tests/fuzz/found can be created");
                let path = dir.join(format!("frame-{:x}-{}.hex", f.seed, f.case));
                std::fs::write(&path, &text).expect("a found frame can be saved");
                println!("saved {}", path.display());
            }
        }
        assert!(self.failures.is_empty(), "{} frames broke an invariant (see above)", self.failures.len());
    }
}

/// `cases` generated frames from `seed` through one fresh engine.
fn batch(seed: u64, cases: usize, tally: &mut Tally) {
    let mut w = World::new();
    let rng = Rng::new(seed);
    for case in 0..cases {
        let (_, frame) = generate(&rng, &w);
        let result = w.case(&frame);
        tally.record(seed, case, &frame, result);
    }
}

#[test]
fn bounded_pass() {
    let started = Instant::now();
    let mut tally = Tally::default();
    batch(BOUNDED_SEED, BOUNDED_CASES, &mut tally);
    println!("bounded pass: {:?}", started.elapsed());
    tally.finish(false);
    assert!(
        tally.reasons.get("tx").copied().unwrap_or(0) > BOUNDED_CASES / 20,
        "the fuzzer should forward some frames"
    );
}

/// Every frame of the committed corpus, and each cut at every offset.
#[test]
fn seed_corpus_and_its_truncations() {
    let files = corpus_files(&corpus_dir().join("frames"));
    assert!(files.len() >= 5, "the seed corpus is in tests/fuzz/frames");
    let mut w = World::new();
    let mut tally = Tally::default();
    for (i, (name, frame)) in files.iter().enumerate() {
        for len in (14..=frame.len()).rev() {
            let result = w.case(&frame[..len]).map_err(|e| format!("{name} cut at {len}: {e}"));
            tally.record(i as u64, len, &frame[..len], result);
        }
    }
    tally.finish(false);
}

/// Each generator's first frames, cut at every offset: every early exit of
/// the parser sees its boundary.
#[test]
fn generated_frames_cut_at_every_offset() {
    let mut w = World::new();
    let rng = Rng::new(BOUNDED_SEED ^ 1);
    let mut tally = Tally::default();
    for (g, (name, make)) in GENERATORS.iter().enumerate() {
        for _ in 0..3 {
            let frame = make(&rng, &w);
            for len in (14..=frame.len().min(160)).rev() {
                let result = w.case(&frame[..len]).map_err(|e| format!("{name} cut at {len}: {e}"));
                tally.record(g as u64, len, &frame[..len], result);
            }
        }
    }
    tally.finish(false);
}

/// `cargo xtask fuzz --time N`: random seeds for N seconds
/// (XDPLB_FUZZ_TIME), or one batch again (XDPLB_FUZZ_SEED).
#[test]
#[ignore = "long: run with cargo xtask fuzz"]
fn long_run() {
    let secs: u64 = std::env::var("XDPLB_FUZZ_TIME").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let replay = std::env::var("XDPLB_FUZZ_SEED").ok().map(|s| {
        let s = s.trim_start_matches("0x");
        u64::from_str_radix(s, 16).expect("XDPLB_FUZZ_SEED is a hex seed")
    });
    let mut tally = Tally::default();
    if let Some(seed) = replay {
        batch(seed, BATCH, &mut tally);
        return tally.finish(false);
    }
    let deadline = Instant::now() + Duration::from_secs(secs);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let seeds = Rng::new(nanos ^ u64::from(std::process::id()));
    while Instant::now() < deadline && tally.failures.is_empty() {
        let seed = seeds.next();
        println!("frames: seed {seed:#x}");
        batch(seed, BATCH, &mut tally);
    }
    tally.finish(true);
}
