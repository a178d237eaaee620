//! Per-packet cost with BPF_PROG_TEST_RUN, xdplb side by side with a floor
//! program (parse + MAC swap + XDP_TX) on identical packets.
//!
//! Three methods, each compared with the floor measured the same way:
//! - `repeat`: one call with repeat = 1,000,000, median of 5. The kernel
//!   re-runs the program on its own output, so every xdplb case (and the
//!   floor it is compared with) runs behind the restore wrapper
//!   (`xdplb_bench_restore`), which puts the saved frame back first.
//! - `per-call`: repeat = 1 per call, the kernel's per-run time averaged over
//!   many calls (median of 5 rounds): for many different packets (new flows,
//!   many established flows). It includes the kernel timer's own overhead,
//!   as the floor measured this way does.
//! - live frames: every frame really transmitted, behind the restore
//!   wrapper (the page pool hands back the program's own output otherwise).
//!
//! Every case checks the dataplane's reason counters: the packets counted as
//! forwarded (and, where it matters, as a conntrack hit or miss) must equal
//! the packets run, or the case says so.
//!
//! Every case that creates flows starts from a connection table of its own.
//! The flood case (`flood`) runs last, before the sizing figures.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd as _, AsRawFd as _},
    time::Duration,
};

use aya::{
    maps::MapData,
    programs::{TestRun as _, TestRunAttrs, TestRunOptions},
};
use lb_common::{
    maps::{FAMILY_V4, FlowKey, FlowValue, programs},
    reasons,
    trace::TraceConfig,
};
use lb_userspace::{
    addr,
    dataplane::MapSizes,
    reconcile::{Forwarding, VipSpec},
    walks,
};
use tests::{
    harness::{Engine, XDP_PASS, XDP_TX, vip},
    packets::{self, L4, frame},
    restore::Restore,
    topology::{Netns, unique_tag},
};

use crate::report::Report;

const REPEAT: u32 = 1_000_000;
const ROUNDS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

pub(crate) fn run_once(e: &mut Engine, prog: &str, pkt: &[u8], repeat: u32) -> (u32, Duration) {
    let p = e.dp.program(prog).unwrap();
    let mut out = vec![0u8; pkt.len() + 256];
    let r = p
        .test_run(TestRunOptions { data_in: Some(pkt), data_out: Some(&mut out), repeat, ..Default::default() })
        .expect("BPF_PROG_TEST_RUN");
    (r.return_value, r.duration)
}

/// What a case's packets must be counted as: every reason listed, once per packet run.
pub(crate) struct Expect(pub(crate) &'static [u32]);

pub(crate) const TX: Expect = Expect(&[reasons::TX]);
const TX_HIT: Expect = Expect(&[reasons::TX, reasons::CONNTRACK_HIT]);
const TX_MISS: Expect = Expect(&[reasons::TX, reasons::CONNTRACK_MISS]);
const NONE: Expect = Expect(&[]);

/// Runs `f`, which runs `runs` packets, and reports the share of them counted
/// as each expected reason (a note if any is not 1).
pub(crate) fn checked<T>(
    report: &mut Report,
    e: &mut Engine,
    case: &str,
    expect: &Expect,
    f: impl FnOnce(&mut Engine) -> (T, u64),
) -> T {
    let before = e.reasons();
    let (value, runs) = f(e);
    let after = e.reasons();
    for &r in expect.0 {
        let counted = after[r as usize] - before[r as usize];
        if counted != runs {
            report.note(format!(
                "{case}: INVALID, {counted} of {runs} packets counted as {} (the case measured another path)",
                reasons::NAMES[r as usize]
            ));
        }
    }
    value
}

/// ns per packet of `prog` on `pkt`, `repeat` method; through the wrapper when `restore` is given.
fn repeated(
    report: &mut Report,
    e: &mut Engine,
    restore: Option<&mut Restore>,
    (prog, pkt): (&str, &[u8]),
    want: u32,
    expect: &Expect,
    case: &str,
) -> f64 {
    let prog = match restore {
        Some(r) => {
            r.set(e, prog, pkt);
            programs::BENCH_RESTORE
        }
        None => prog,
    };
    let (action, _) = run_once(e, prog, pkt, 1);
    assert_eq!(action, want, "{case}: unexpected action");
    checked(report, e, case, expect, |e| {
        let ns = median((0..ROUNDS).map(|_| run_once(e, prog, pkt, REPEAT).1.as_nanos() as f64).collect());
        (ns, ROUNDS as u64 * REPEAT as u64)
    })
}

/// ns per packet, `per-call` method over `pkts` (cycled `calls` times per round).
fn per_call(e: &mut Engine, prog: &str, pkts: &[Vec<u8>], calls: usize, want: u32) -> (f64, u64) {
    let ns = median(
        (0..ROUNDS)
            .map(|round| {
                let mut total = 0u128;
                for i in 0..calls {
                    let pkt = &pkts[(round * calls + i) % pkts.len()];
                    let (action, d) = run_once(e, prog, pkt, 1);
                    assert_eq!(action, want, "{prog}: unexpected action");
                    total += d.as_nanos();
                }
                total as f64 / calls as f64
            })
            .collect(),
    );
    (ns, (ROUNDS * calls) as u64)
}

fn per_call_checked(
    report: &mut Report,
    e: &mut Engine,
    pkts: &[Vec<u8>],
    calls: usize,
    expect: &Expect,
    case: &str,
) -> f64 {
    checked(report, e, case, expect, |e| per_call(e, programs::BALANCER, pkts, calls, XDP_TX))
}

/// The `i`th client address: 198.18.128.0/17 or 2001:db8:c::/64.
pub(crate) fn source(i: u32, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(0x2001_0db8_000c_0000_0000_0000_0000_0000u128 + i as u128 + 1))
    } else {
        IpAddr::V4(Ipv4Addr::from(0xc612_8000 + (i & 0x7fff)))
    }
}

/// `n` frames of distinct 5-tuples from client block `block` (each 50,000 flows).
fn fresh(l4: L4, v6: bool, vip_addr: IpAddr, port: u16, block: u32, n: usize) -> Vec<Vec<u8>> {
    (0..n as u32)
        .map(|i| frame(l4, source(block + i / 50_000, v6), 1024 + (i % 50_000) as u16, vip_addr, port))
        .collect()
}

const CASES: [(&str, L4, bool, u16); 3] =
    [("tcp4", L4::Tcp, false, 80), ("tcp6", L4::Tcp, true, 80), ("udp4", L4::Udp, false, 53)];

pub(crate) fn specs() -> Vec<VipSpec> {
    let mut specs = Vec::new();
    for (name, l4, v6, port) in CASES {
        let (vip_addr, backends): (&str, [(&str, u32); 3]) = if v6 {
            ("2001:db8::100", [("2001:db8:1::1", 1), ("2001:db8:1::2", 1), ("2001:db8:1::3", 1)])
        } else {
            ("198.18.0.100", [("198.18.1.1", 1), ("198.18.1.2", 1), ("198.18.1.3", 1)])
        };
        specs.push(vip(&format!("{name}-dsr"), vip_addr, port, l4, Forwarding::Dsr, &backends));
        specs.push(vip(&format!("{name}-ipip"), vip_addr, port + 1000, l4, Forwarding::Ipip, &backends));
    }
    specs
}

fn vip_of(v6: bool) -> IpAddr {
    if v6 { "2001:db8::100".parse().unwrap() } else { "198.18.0.100".parse().unwrap() }
}

/// A fresh engine: the maps at their production defaults (1M-entry
/// connection table), empty, with the benchmark's VIPs.
pub(crate) fn fresh_engine() -> Engine {
    let mut e = Engine::unpinned(MapSizes::default());
    // No NAT VIP: as the controller configures it, non-VIP packets skip the NAT reply lookup.
    e.set_nat(false);
    e.apply(&specs());
    e
}

pub fn run(report: &mut Report, quick: bool) {
    println!("\n== dataplane: ns per packet (BPF_PROG_TEST_RUN) ==");
    let calls = if quick { 20_000 } else { 100_000 };
    let mut e = fresh_engine();
    let mut restore = Restore::load(&mut e);

    let tcp4 = frame(L4::Tcp, source(1, false), 40_000, "198.18.0.100".parse().unwrap(), 80);
    let floor_repeat = repeated(report, &mut e, None, (programs::BENCH_FLOOR, &tcp4), XDP_TX, &NONE, "floor");
    let floor_restored =
        repeated(report, &mut e, Some(&mut restore), (programs::BENCH_FLOOR, &tcp4), XDP_TX, &NONE, "floor");
    let (floor_call, _) = per_call(&mut e, programs::BENCH_FLOOR, std::slice::from_ref(&tcp4), calls, XDP_TX);
    report.add("dataplane", "floor (parse+swap+TX)", "floor", "ns_per_packet", floor_repeat, "ns");
    report.add("dataplane", "floor (parse+swap+TX) restored", "floor", "ns_per_packet", floor_restored, "ns");
    report.add("dataplane", "floor (parse+swap+TX) per-call", "floor", "ns_per_packet", floor_call, "ns");

    let other = frame(L4::Tcp, source(1, false), 40_000, "198.18.0.200".parse().unwrap(), 80);
    let case = "non-VIP pass";
    let pass =
        repeated(report, &mut e, None, (programs::BALANCER, &other), XDP_PASS, &Expect(&[reasons::PASS_NOT_VIP]), case);
    report.add("dataplane", case, "xdplb", "ns_per_packet", pass, "ns");
    report.add("dataplane", case, "xdplb", "ratio_to_floor", pass / floor_repeat, "x");

    // Established, one flow (tracked from its second packet), every run restored.
    for (name, l4, v6, port) in CASES {
        for (fwd, vport) in [("dsr", port), ("ipip", port + 1000)] {
            let pkt = frame(l4, source(7, v6), 40_000, vip_of(v6), vport);
            let case = format!("{name} {fwd} established, 1 flow");
            run_once(&mut e, programs::BALANCER, &pkt, 1);
            run_once(&mut e, programs::BALANCER, &pkt, 1);
            let ns = repeated(report, &mut e, Some(&mut restore), (programs::BALANCER, &pkt), XDP_TX, &TX_HIT, &case);
            report.add("dataplane", &case, "xdplb", "ns_per_packet", ns, "ns");
            report.add("dataplane", &case, "xdplb", "ratio_to_floor", ns / floor_restored, "x");
        }
    }
    trace(report, &mut e, &mut restore, calls, floor_restored, floor_call);
    nat(report, &mut e, calls, floor_call);
    drop(restore);
    drop(e);

    new_flows(report, quick, calls, floor_call);
    many_flows(report, calls, floor_call);
    live_frames(report);
    crate::flood::run(report, quick);
    sizing(report);
}

/// `xdplb trace`, on the established tcp4 dsr flow. Off, the attached
/// program is the untraced balancer ("tcp4 dsr established" above: its code
/// is the same as before tracing existed). Here: the traced program with its
/// deadline passed (what a killed `xdplb trace` leaves in the link until the
/// controller swaps it back), and tracing on, every packet written to the
/// ring buffer, which is drained between calls (outside the timed run).
fn trace(
    report: &mut Report,
    e: &mut Engine,
    restore: &mut Restore,
    calls: usize,
    floor_restored: f64,
    floor_call: f64,
) {
    let pkt = frame(L4::Tcp, source(7, false), 40_000, "198.18.0.100".parse().unwrap(), 80);
    let on = lb_userspace::trace::Filter::default();
    let mut ring = e.start_trace(&on);
    e.set_trace(on.config(lb_userspace::trace::monotonic_ns() - 1_000_000_000, std::process::id()));
    let case = "tcp4 dsr established, traced program, deadline passed";
    let ns = repeated(report, e, Some(restore), (programs::TRACED, &pkt), XDP_TX, &TX_HIT, case);
    report.add("dataplane", case, "xdplb", "ns_per_packet", ns, "ns");
    report.add("dataplane", case, "xdplb", "ratio_to_floor", ns / floor_restored, "x");

    let case = ONE_FLOW;
    let untraced = per_call_checked(report, e, std::slice::from_ref(&pkt), calls, &TX_HIT, case);
    report.add("dataplane", case, "xdplb", "ns_per_packet", untraced, "ns");
    report.add("dataplane", case, "xdplb", "ratio_to_floor", untraced / floor_call, "x");
    e.set_trace(on.config(lb_userspace::trace::monotonic_ns() + 3_600_000_000_000, std::process::id()));
    let traced = median(
        (0..ROUNDS)
            .map(|_| {
                let mut total = 0u128;
                for _ in 0..calls {
                    let (action, d) = run_once(e, programs::TRACED, &pkt, 1);
                    assert_eq!(action, XDP_TX);
                    total += d.as_nanos();
                    assert_eq!(tests::harness::trace_events(&mut ring).len(), 1, "one event per packet");
                }
                total as f64 / calls as f64
            })
            .collect(),
    );
    let case = "tcp4 dsr established per-call, tracing on";
    report.add("dataplane", case, "xdplb", "ns_per_packet", traced, "ns");
    report.add("dataplane", case, "xdplb", "ratio_to_floor", traced / floor_call, "x");
    e.set_trace(TraceConfig::default());
}

/// The NAT VIP of the NAT cases: tcp4 port 8000 → backends' 8080.
pub(crate) fn nat_spec() -> VipSpec {
    let mut s =
        vip("tcp4-nat", "198.18.0.100", 8000, L4::Tcp, Forwarding::Nat, &[("198.18.1.1", 1), ("198.18.1.2", 1)]);
    for b in &mut s.backends {
        b.port = 8080;
    }
    s
}

/// The backend's initial sequence number in the NAT cases' SYN-ACK.
const NAT_ISN: u32 = 0x8000_0000;

/// Starts a NAT connection from client `source(3)`:40000 with a SYN and
/// returns a client segment of it and the backend's reply to it (from the
/// backend's MAC: NAT takes replies only from the backend side).
fn nat_open(e: &mut Engine) -> (Vec<u8>, Vec<u8>) {
    let vip_addr: IpAddr = "198.18.0.100".parse().unwrap();
    let syn = packets::syn(source(3, false), 40_000, vip_addr, 8000);
    let out = e.run(&syn).frame;
    let backend: IpAddr = IpAddr::V4(Ipv4Addr::new(out[30], out[31], out[32], out[33]));
    let pkt = frame(L4::Tcp, source(3, false), 40_000, vip_addr, 8000);
    let mut reply = frame(L4::Tcp, backend, 8080, source(3, false), 40_000);
    reply[0..6].copy_from_slice(&out[6..12]);
    reply[6..12].copy_from_slice(&out[0..6]);
    packets::fix_checksums(&mut reply);
    (pkt, reply)
}

/// Opens the connection `nat_open` started: the backend's SYN-ACK, then the
/// client's ACK of it. Returns a client segment of the open connection.
fn nat_confirm(e: &mut Engine, pkt: &[u8], reply: &[u8]) -> Vec<u8> {
    let syn_ack = packets::tcp_segment(reply, 0x12, NAT_ISN, 1001);
    assert_eq!(e.run(&syn_ack).action, XDP_TX, "the backend's SYN-ACK");
    let ack = packets::tcp_segment(pkt, 0x10, 1001, NAT_ISN.wrapping_add(1));
    assert_eq!(e.run(&ack).action, XDP_TX, "the client's ACK");
    ack
}

/// NAT, tcp4: the way in (established and new) and the way back.
fn nat(report: &mut Report, e: &mut Engine, calls: usize, floor_call: f64) {
    e.apply(&[nat_spec()]);
    e.set_nat(true);
    // Only a SYN opens a NAT connection; the client's segments after it are the embryonic case.
    let (pkt, reply) = nat_open(e);
    let case = "tcp4 nat embryonic (client segments before the reply) per-call";
    let ns = per_call_checked(report, e, std::slice::from_ref(&pkt), calls, &TX, case);
    report.add("dataplane", case, "xdplb", "ns_per_packet", ns, "ns");
    report.add("dataplane", case, "xdplb", "ratio_to_floor", ns / floor_call, "x");
    let case = "tcp4 nat reply per-call";
    let ns = per_call_checked(report, e, std::slice::from_ref(&reply), calls, &Expect(&[reasons::NAT_REPLY]), case);
    report.add("dataplane", case, "xdplb", "ns_per_packet", ns, "ns");
    report.add("dataplane", case, "xdplb", "ratio_to_floor", ns / floor_call, "x");
    let open = nat_confirm(e, &pkt, &reply);
    let case = "tcp4 nat established per-call";
    let ns = per_call_checked(report, e, std::slice::from_ref(&open), calls, &TX, case);
    report.add("dataplane", case, "xdplb", "ns_per_packet", ns, "ns");
    report.add("dataplane", case, "xdplb", "ratio_to_floor", ns / floor_call, "x");
    // New connections (the NAT table is 262,144 entries: stay below).
    let vip_addr: IpAddr = "198.18.0.100".parse().unwrap();
    let fresh: Vec<Vec<u8>> = (0..(calls * ROUNDS).min(60_000) as u32)
        .map(|i| packets::syn(source(2000 + i / 30_000, false), 1024 + (i % 30_000) as u16, vip_addr, 8000))
        .collect();
    let case = "tcp4 nat new flow (SYN) per-call";
    let ns = per_call_checked(report, e, &fresh, calls.min(fresh.len() / ROUNDS), &TX, case);
    report.add("dataplane", case, "xdplb", "ns_per_packet", ns, "ns");
    report.add("dataplane", case, "xdplb", "ratio_to_floor", ns / floor_call, "x");
    e.set_nat(false);
}

/// Connection-table entries for `n` flows nobody sends (198.19.0.0/16),
/// tracked to backend `id`.
fn filler(n: u32, id: u32, generation: u32) -> Vec<(FlowKey, FlowValue)> {
    (0..n)
        .map(|i| {
            let key = FlowKey {
                src: addr::words(IpAddr::V4(Ipv4Addr::from(0xc613_0000 | (i >> 16)))),
                dst: addr::words("198.18.0.100".parse().unwrap()),
                sport: (i as u16).to_be(),
                dport: 80u16.to_be(),
                protocol: 6,
                family: FAMILY_V4,
                _pad: [0; 2],
            };
            (key, FlowValue { backend_id: id, generation, hash: i, last_seen_s: 0 })
        })
        .collect()
}

/// Backend id and generation of `s`'s first backend.
fn first_backend(e: &Engine, s: &VipSpec) -> (u32, u32) {
    let id = e.reconciler.backend_id(&s.key(), s.backends[0].addr, 0).unwrap();
    (id, e.dp.backend(id).unwrap().generation)
}

/// Fills the connection table to its capacity with flows nobody sends.
fn fill(e: &mut Engine, entries: &[(FlowKey, FlowValue)]) -> usize {
    walks::insert_batched(&e.dp.flows_map().unwrap(), entries).expect("batched insert into FLOWS")
}

/// New flows, each case on an engine of its own: first on an empty
/// connection table (calls × rounds inserts into 1M entries: no eviction),
/// then on a full one (filled to capacity with other flows first: every
/// insert evicts, the steady state of a busy balancer).
fn new_flows(report: &mut Report, quick: bool, calls: usize, floor_call: f64) {
    let capacity = MapSizes::default().conntrack;
    let mut fill_entries: Vec<(FlowKey, FlowValue)> = Vec::new();
    for (name, l4, v6, port) in CASES {
        for (fwd, vport) in [("dsr", port), ("ipip", port + 1000)] {
            if quick && (name, fwd) != ("tcp4", "dsr") && (name, fwd) != ("tcp4", "ipip") {
                continue;
            }
            let mut e = fresh_engine();
            let empty = fresh(l4, v6, vip_of(v6), vport, 1000, calls * ROUNDS);
            let case = format!("{name} {fwd} new flow, empty table per-call");
            let ns = per_call_checked(report, &mut e, &empty, calls, &TX_MISS, &case);
            report.add("dataplane", &case, "xdplb", "ns_per_packet", ns, "ns");
            report.add("dataplane", &case, "xdplb", "ratio_to_floor", ns / floor_call, "x");
            drop(empty);
            // The second packets (one case: each costs an LRU insert per flow).
            let confirm = |report: &mut Report, e: &mut Engine, table: &str, block: u32| {
                if (name, fwd) == ("tcp4", "dsr") {
                    let pkts = fresh(l4, v6, vip_of(v6), vport, block, calls);
                    let case = format!("{name} {fwd} flow confirmed, {table} table per-call");
                    confirmations(report, e, &pkts, &case, floor_call);
                }
            };
            confirm(report, &mut e, "empty", 1200);

            if fill_entries.is_empty() {
                let spec = &specs()[0];
                let (id, generation) = first_backend(&e, spec);
                fill_entries = filler(capacity, id, generation);
            }
            fill(&mut e, &fill_entries);
            let full = fresh(l4, v6, vip_of(v6), vport, 1100, calls * ROUNDS);
            let case = format!("{name} {fwd} new flow, full table per-call");
            let ns = per_call_checked(report, &mut e, &full, calls, &TX_MISS, &case);
            report.add("dataplane", &case, "xdplb", "ns_per_packet", ns, "ns");
            report.add("dataplane", &case, "xdplb", "ratio_to_floor", ns / floor_call, "x");
            confirm(report, &mut e, "full", 1300);
        }
    }
}

/// A flow's second packet, the one that enters it into the connection table
/// (an LRU insert; on a full table, one that evicts). Each flow's first
/// packet runs untimed just before, in chunks the per-CPU embryonic cache
/// holds, on one CPU (the cache is per CPU); only the second is timed.
fn confirmations(report: &mut Report, e: &mut Engine, pkts: &[Vec<u8>], case: &str, floor_call: f64) {
    let cpus = tests::harness::allowed_cpus();
    tests::harness::pin_to_this_cpu();
    let expect = Expect(&[reasons::CONNTRACK_CONFIRMED]);
    let ns = checked(report, e, case, &expect, |e| {
        let mut total = 0u128;
        for chunk in pkts.chunks(1024) {
            for p in chunk {
                run_once(e, programs::BALANCER, p, 1);
            }
            for p in chunk {
                let (action, d) = run_once(e, programs::BALANCER, p, 1);
                assert_eq!(action, XDP_TX);
                total += d.as_nanos();
            }
        }
        (total as f64 / pkts.len() as f64, pkts.len() as u64)
    });
    tests::harness::pin_to(&cpus);
    report.add("dataplane", case, "xdplb", "ns_per_packet", ns, "ns");
    report.add("dataplane", case, "xdplb", "ratio_to_floor", ns / floor_call, "x");
}

/// A small pseudo-random sequence (xorshift), so that packets visit the
/// tracked flows in no order the caches could learn.
fn shuffled(n: u32, count: usize) -> Vec<u32> {
    let mut x = 0x9e37_79b9u32;
    (0..count)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x % n
        })
        .collect()
}

const ONE_FLOW: &str = "tcp4 dsr established, 1 flow per-call";
const MANY_FLOWS: &str = "tcp4 dsr established, 1M flows (random) per-call";

/// Established flows, memory-bound: the connection table filled to its
/// capacity (1M) with tracked flows, and every packet one of them at random.
/// Reported next to the one-flow per-call case.
fn many_flows(report: &mut Report, calls: usize, floor_call: f64) {
    let mut e = fresh_engine();
    let spec = specs().into_iter().next().unwrap();
    let (id, generation) = first_backend(&e, &spec);
    // A little below capacity: the LRU's per-CPU free lists may evict a few
    // entries of a table filled to the last one, and every packet must hit.
    let n = MapSizes::default().conntrack - 4096;
    let written = fill(&mut e, &filler(n, id, generation));
    let pkts: Vec<Vec<u8>> = shuffled(written as u32, calls * ROUNDS)
        .into_iter()
        .map(|i| frame(L4::Tcp, IpAddr::V4(Ipv4Addr::from(0xc613_0000 | (i >> 16))), i as u16, spec.addr, 80))
        .collect();
    println!("  ({written} flows written into the connection table)");
    let case = MANY_FLOWS;
    let ns = per_call_checked(report, &mut e, &pkts, calls, &TX_HIT, case);
    report.add("dataplane", case, "xdplb", "ns_per_packet", ns, "ns");
    report.add("dataplane", case, "xdplb", "ratio_to_floor", ns / floor_call, "x");
}

/// One live-frames run per round: ns per frame (median), and the frames sent.
fn live(e: &mut Engine, pkt: &[u8]) -> Result<(f64, u64), String> {
    let mut runs = Vec::new();
    for _ in 0..ROUNDS {
        let p = e.dp.program(programs::BENCH_RESTORE).unwrap();
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(pkt),
                repeat: REPEAT,
                attrs: TestRunAttrs::new().xdp_live_frames(64),
                ..Default::default()
            })
            .map_err(|err| format!("{err}: live frames need BPF_F_TEST_XDP_LIVE_FRAMES"))?;
        runs.push(r.duration.as_nanos() as f64);
    }
    Ok((median(runs), ROUNDS as u64 * REPEAT as u64))
}

/// Packets per second with live frames (each frame really transmitted), in
/// a throwaway namespace so transmitted frames go nowhere; every case behind
/// the restore wrapper, the floor too.
fn live_frames(report: &mut Report) {
    let ns = Netns::create(format!("{}{}-live", tests::topology::NETNS_PREFIX, unique_tag()));
    let mut sub = Report::default();
    let sub = ns.enter(move || {
        let mut e = fresh_engine();
        e.apply(&[specs(), vec![nat_spec()]].concat());
        let mut restore = Restore::load(&mut e);
        let tcp4 = frame(L4::Tcp, source(1, false), 40_000, vip_of(false), 80);
        let floor = "live frames floor (parse+swap+TX), restored".to_string();
        let mut cases: Vec<(String, &str, Vec<u8>, Expect)> = vec![(floor, programs::BENCH_FLOOR, tcp4, NONE)];
        for (name, l4, v6, port) in CASES.into_iter().filter(|c| c.1 == L4::Tcp) {
            for (fwd, vport) in [("dsr", port), ("ipip", port + 1000)] {
                let pkt = frame(l4, source(7, v6), 40_000, vip_of(v6), vport);
                // Two packets: the second confirms the flow into the connection table.
                e.run(&pkt);
                e.run(&pkt);
                let case = format!("live frames {name} {fwd} established, 1 flow");
                cases.push((case, programs::BALANCER, pkt, TX_HIT));
            }
        }
        e.set_nat(true);
        let (pkt, reply) = nat_open(&mut e);
        let open = nat_confirm(&mut e, &pkt, &reply);
        cases.push(("live frames tcp4 nat established, 1 flow".into(), programs::BALANCER, open, TX));
        let nat_reply = Expect(&[reasons::NAT_REPLY]);
        cases.push(("live frames tcp4 nat reply, 1 flow".into(), programs::BALANCER, reply, nat_reply));
        let mut floor_ns = None;
        for (case, prog, pkt, expect) in cases {
            let imp = if prog == programs::BENCH_FLOOR { "floor" } else { "xdplb" };
            restore.set(&mut e, prog, &pkt);
            let r = checked(&mut sub, &mut e, &case, &expect, |e| match live(e, &pkt) {
                Ok((ns, sent)) => (Ok(ns), sent),
                Err(err) => (Err(err), 0),
            });
            match r {
                Ok(ns) if ns > 0.0 => {
                    sub.add("dataplane", &case, imp, "packets_per_second", 1e9 / ns, "pps");
                    match floor_ns {
                        None => floor_ns = Some(ns),
                        Some(f) => sub.add("dataplane", &case, imp, "ratio_to_floor", ns / f, "x"),
                    }
                }
                Ok(_) => sub.note(format!("{case}: live-frames mode reported no duration")),
                Err(err) => {
                    sub.note(format!("live-frames mode failed: {err}"));
                    break;
                }
            }
        }
        sub
    });
    report.figures.extend(sub.figures);
    report.notes.extend(sub.notes);
}

/// One map of the loaded object: its name, entries, key and value sizes,
/// and the kernel's own account of its memory (`memlock` in fdinfo).
struct MapSize {
    name: String,
    entries: u32,
    key: u32,
    value: u32,
    memlock: u64,
}

fn map_sizes(e: &mut Engine) -> Vec<MapSize> {
    let p = e.dp.program(programs::BALANCER).unwrap();
    let ids = p.info().unwrap().map_ids().unwrap().unwrap_or_default();
    ids.into_iter()
        .filter_map(|id| {
            let m = MapData::from_id(id).ok()?;
            let info = m.info().ok()?;
            let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", m.fd().as_fd().as_raw_fd())).ok()?;
            let memlock = fdinfo.lines().find_map(|l| l.strip_prefix("memlock:"))?.trim().parse().ok()?;
            Some(MapSize {
                name: info.name_as_str()?.to_string(),
                entries: info.max_entries(),
                key: info.key_size(),
                value: info.value_size(),
                memlock,
            })
        })
        .collect()
}

/// Ethernet line rate in frames per second for `bytes`-long frames (plus
/// 20 bytes of preamble and inter-frame gap each).
fn line_rate(gbit: f64, bytes: f64) -> f64 {
    gbit * 1e9 / ((bytes + 20.0) * 8.0)
}

/// Sizing figures from this run: memory per flow, VIP and backend at the
/// default map sizes; packets per second per core; the cores a NIC needs;
/// the nodes a flow count and a connection rate need.
fn sizing(report: &mut Report) {
    println!("\n== sizing, from this run ==");
    let mut e = Engine::unpinned(MapSizes::default());
    let maps = map_sizes(&mut e);
    let get = |n: &str| maps.iter().find(|m| m.name == n);
    let per_entry = |n: &str| get(n).map_or(0.0, |m| m.memlock as f64 / m.entries as f64);
    for m in &maps {
        println!(
            "  map {:<14} {:>9} entries, key {:>2} B, value {:>4} B, memlock {:>11} B ({:.1} B per entry)",
            m.name,
            m.entries,
            m.key,
            m.value,
            m.memlock,
            m.memlock as f64 / m.entries as f64
        );
    }
    let flow = per_entry("FLOWS");
    report.add("sizing", "memory per tracked flow (FLOWS, LRU hash)", "xdplb", "bytes", flow, "B");
    let nat = per_entry("NAT_FLOWS") + per_entry("NAT_REVERSE");
    report.add("sizing", "memory per NAT connection (NAT_FLOWS + NAT_REVERSE)", "xdplb", "bytes", nat, "B");
    // A VIP: its entries, its counters (per CPU), and its Maglev table twice
    // (the live one and the one written during a swap) at 65,537 slots.
    let slot = per_entry("MAGLEV_POOL");
    let vip = per_entry("VIPS") + per_entry("VIP_ADDRS") + per_entry("VIP_STATS") + 2.0 * 65_537.0 * slot;
    report.add("sizing", "memory per VIP (entries + 2 Maglev tables of 65,537)", "xdplb", "bytes", vip, "B");
    let backend = per_entry("BACKENDS") + per_entry("BACKEND_STATS");
    report.add("sizing", "memory per backend (entry + counters)", "xdplb", "bytes", backend, "B");
    let total: u64 = maps.iter().map(|m| m.memlock).sum();
    report.add("sizing", "memory of all maps at default sizes", "xdplb", "bytes", total as f64, "B");
    drop(e);

    // Per core: live frames give the cost with transmission; the per-call
    // difference between a case and the one-flow case adds what many flows
    // or a new flow cost on top.
    let find = |case: &str, imp: &str, metric: &str| report.get("dataplane", case, imp, metric);
    let (Some(live_pps), Some(one), Some(many), Some(new_full)) = (
        find("live frames tcp4 dsr established, 1 flow", "xdplb", "packets_per_second"),
        find(ONE_FLOW, "xdplb", "ns_per_packet"),
        find(MANY_FLOWS, "xdplb", "ns_per_packet"),
        find("tcp4 dsr new flow, full table per-call", "xdplb", "ns_per_packet"),
    ) else {
        report.note("sizing: a dataplane figure it needs is missing; per-core figures not computed");
        return;
    };
    let live_ns = 1e9 / live_pps;
    let est_ns = live_ns + (many - one).max(0.0);
    let new_ns = live_ns + (new_full - one).max(0.0);
    report.add("sizing", "established, 1 flow (live frames)", "xdplb", "packets_per_second_per_core", live_pps, "pps");
    report.add(
        "sizing",
        "established, 1M flows (live + many-flows penalty)",
        "xdplb",
        "packets_per_second_per_core",
        1e9 / est_ns,
        "pps",
    );
    report.add(
        "sizing",
        "new flows, full table (live + new-flow penalty)",
        "xdplb",
        "packets_per_second_per_core",
        1e9 / new_ns,
        "pps",
    );
    report.note(format!(
        "sizing: ns per established packet = live frames ({live_ns:.0} ns) + (1M-flow per-call {many:.0} − 1-flow \
         per-call {one:.0}) = {est_ns:.0} ns; per new flow = live frames + (new flow on a full table per-call \
         {new_full:.0} − 1-flow per-call) = {new_ns:.0} ns; packets per second per core = 1e9 ÷ ns"
    ));
    for gbit in [10.0, 25.0, 100.0] {
        for bytes in [64.0, 800.0] {
            let pps = line_rate(gbit, bytes);
            report.add(
                "sizing",
                &format!("{gbit:.0} Gbit/s line rate, {bytes:.0}-byte frames ({:.2} Mpps)", pps / 1e6),
                "xdplb",
                "cores_established_1M_flows",
                pps * est_ns / 1e9,
                "cores",
            );
        }
    }
    report.note(format!(
        "sizing: nodes = max(⌈F ÷ T⌉, ⌈R ÷ (C × {new_pps:.0})⌉, ⌈P ÷ (C × {est_pps:.0})⌉) for F concurrent flows, \
         R new connections per second, P packets per second, T connection-table entries per node (default 1,048,576, \
         {flow:.0} B each) and C cores per node given to the dataplane (the NIC's queues); line-rate packets per \
         second = Gbit/s × 1e9 ÷ ((frame bytes + 20) × 8)",
        new_pps = 1e9 / new_ns,
        est_pps = 1e9 / est_ns,
    ));
}
