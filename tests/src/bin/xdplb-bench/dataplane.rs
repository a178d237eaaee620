//! Per-packet cost with BPF_PROG_TEST_RUN, xdplb side by side with a floor
//! program (parse + MAC swap + XDP_TX) on identical packets.
//!
//! Two methods, each compared with the floor measured the same way:
//! - `repeat`: one call with repeat = 1,000,000, median of 5. Valid only
//!   where the program leaves the packet on the same path (pass, the
//!   established DSR flow: the kernel re-runs the program on its own output).
//! - `per-call`: repeat = 1 per call, the kernel's per-run time averaged over
//!   many calls (median of 5 rounds): for paths that change their input
//!   (IP-in-IP encapsulates, a new flow becomes established). It includes the
//!   kernel timer's own overhead, as the floor measured this way does.

use std::{net::IpAddr, time::Duration};

use aya::programs::{TestRun as _, TestRunAttrs, TestRunOptions};
use lb_common::{
    maps::{FAMILY_V4, FlowKey, FlowValue, programs},
    trace::TraceConfig,
};
use lb_userspace::{addr, dataplane::MapSizes, reconcile::Forwarding};
use tests::{
    harness::{Engine, XDP_PASS, XDP_TX, vip},
    packets::{self, L4, frame},
    topology::{Netns, unique_tag},
};

use crate::report::Report;

const REPEAT: u32 = 1_000_000;
const ROUNDS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn run_once(e: &mut Engine, prog: &str, pkt: &[u8], repeat: u32) -> (u32, Duration) {
    let p = e.dp.program(prog).unwrap();
    let mut out = vec![0u8; pkt.len() + 256];
    let r = p
        .test_run(TestRunOptions { data_in: Some(pkt), data_out: Some(&mut out), repeat, ..Default::default() })
        .expect("BPF_PROG_TEST_RUN");
    (r.return_value, r.duration)
}

/// ns per packet, `repeat` method.
fn repeated(e: &mut Engine, prog: &str, pkt: &[u8], want: u32) -> f64 {
    let (action, _) = run_once(e, prog, pkt, 1);
    assert_eq!(action, want, "{prog}: unexpected action");
    median((0..ROUNDS).map(|_| run_once(e, prog, pkt, REPEAT).1.as_nanos() as f64).collect())
}

/// ns per packet, `per-call` method over `pkts` (cycled `calls` times).
fn per_call(e: &mut Engine, prog: &str, pkts: &[Vec<u8>], calls: usize, want: u32) -> f64 {
    median(
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
    )
}

/// The `i`th client address: 198.18.128.0/17 or 2001:db8:c::/64.
fn source(i: u32, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(std::net::Ipv6Addr::from(0x2001_0db8_000c_0000_0000_0000_0000_0000u128 + i as u128 + 1))
    } else {
        IpAddr::V4(std::net::Ipv4Addr::from(0xc612_8000 + (i & 0x7fff)))
    }
}

pub fn run(report: &mut Report, quick: bool) {
    println!("\n== dataplane: ns per packet (BPF_PROG_TEST_RUN) ==");
    let calls = if quick { 20_000 } else { 100_000 };
    // The maps at their production defaults (1M-entry connection table).
    let mut e = Engine::with_sizes(MapSizes::default());
    // No NAT VIP yet: as the controller configures it, non-VIP packets skip the NAT reply lookup.
    e.set_nat(false);
    let cases: [(&str, L4, bool, u16); 3] =
        [("tcp4", L4::Tcp, false, 80), ("tcp6", L4::Tcp, true, 80), ("udp4", L4::Udp, false, 53)];
    let mut specs = Vec::new();
    for (name, l4, v6, port) in cases {
        let (vip_addr, backends): (&str, [(&str, u32); 3]) = if v6 {
            ("2001:db8::100", [("2001:db8:1::1", 1), ("2001:db8:1::2", 1), ("2001:db8:1::3", 1)])
        } else {
            ("198.18.0.100", [("198.18.1.1", 1), ("198.18.1.2", 1), ("198.18.1.3", 1)])
        };
        specs.push(vip(&format!("{name}-dsr"), vip_addr, port, l4, Forwarding::Dsr, &backends));
        specs.push(vip(&format!("{name}-ipip"), vip_addr, port + 1000, l4, Forwarding::Ipip, &backends));
    }
    e.apply(&specs);

    let tcp4 = frame(L4::Tcp, source(1, false), 40_000, "198.18.0.100".parse().unwrap(), 80);
    let floor_repeat = repeated(&mut e, programs::BENCH_FLOOR, &tcp4, XDP_TX);
    let floor_call = per_call(&mut e, programs::BENCH_FLOOR, std::slice::from_ref(&tcp4), calls, XDP_TX);
    report.add("dataplane", "floor (parse+swap+TX)", "floor", "ns_per_packet", floor_repeat, "ns");
    report.add("dataplane", "floor (parse+swap+TX) per-call", "floor", "ns_per_packet", floor_call, "ns");

    let other = frame(L4::Tcp, source(1, false), 40_000, "198.18.0.200".parse().unwrap(), 80);
    let pass = repeated(&mut e, programs::BALANCER, &other, XDP_PASS);
    report.add("dataplane", "non-VIP pass", "xdplb", "ns_per_packet", pass, "ns");
    report.add("dataplane", "non-VIP pass", "xdplb", "ratio_to_floor", pass / floor_repeat, "x");

    for (name, l4, v6, port) in cases {
        let vip_addr: IpAddr = if v6 { "2001:db8::100".parse().unwrap() } else { "198.18.0.100".parse().unwrap() };
        for (fwd, vport) in [("dsr", port), ("ipip", port + 1000)] {
            // Established: one flow, already tracked.
            let pkt = frame(l4, source(7, v6), 40_000, vip_addr, vport);
            let case = format!("{name} {fwd} established");
            if fwd == "dsr" {
                let ns = repeated(&mut e, programs::BALANCER, &pkt, XDP_TX);
                report.add("dataplane", &case, "xdplb", "ns_per_packet", ns, "ns");
                report.add("dataplane", &case, "xdplb", "ratio_to_floor", ns / floor_repeat, "x");
            } else {
                run_once(&mut e, programs::BALANCER, &pkt, 1);
                let ns = per_call(&mut e, programs::BALANCER, std::slice::from_ref(&pkt), calls, XDP_TX);
                let case = format!("{case} per-call");
                report.add("dataplane", &case, "xdplb", "ns_per_packet", ns, "ns");
                report.add("dataplane", &case, "xdplb", "ratio_to_floor", ns / floor_call, "x");
            }
            // New flows: every packet a 5-tuple not seen before.
            let fresh: Vec<Vec<u8>> = (0..(calls * ROUNDS) as u32)
                .map(|i| frame(l4, source(1000 + i / 50_000, v6), 1024 + (i % 50_000) as u16, vip_addr, vport))
                .collect();
            let ns = per_call(&mut e, programs::BALANCER, &fresh, calls, XDP_TX);
            let case = format!("{name} {fwd} new flow per-call");
            report.add("dataplane", &case, "xdplb", "ns_per_packet", ns, "ns");
            report.add("dataplane", &case, "xdplb", "ratio_to_floor", ns / floor_call, "x");
        }
    }

    trace(report, &mut e, calls, floor_repeat, floor_call);
    let e = live_frames(report, e, &tcp4);
    let mut e = e;
    nat(report, &mut e, calls, floor_call);
    map_sizes(report, quick, calls);
}

/// `xdplb trace`, on the established tcp4 dsr flow. Off, the attached
/// program is the untraced balancer ("tcp4 dsr established" above: its code
/// is the same as before tracing existed). Here: the traced program with its
/// deadline passed (what a killed `xdplb trace` leaves in the link until the
/// controller swaps it back), and tracing on, every packet written to the
/// ring buffer, which is drained between calls (outside the timed run).
fn trace(report: &mut Report, e: &mut Engine, calls: usize, floor_repeat: f64, floor_call: f64) {
    let pkt = frame(L4::Tcp, source(7, false), 40_000, "198.18.0.100".parse().unwrap(), 80);
    let on = lb_userspace::trace::Filter::default();
    let mut ring = e.start_trace(&on);
    e.set_trace(on.config(lb_userspace::trace::monotonic_ns() - 1_000_000_000, std::process::id()));
    let case = "tcp4 dsr established, traced program, deadline passed";
    let ns = repeated(e, programs::TRACED, &pkt, XDP_TX);
    report.add("dataplane", case, "xdplb", "ns_per_packet", ns, "ns");
    report.add("dataplane", case, "xdplb", "ratio_to_floor", ns / floor_repeat, "x");

    let untraced = per_call(e, programs::BALANCER, std::slice::from_ref(&pkt), calls, XDP_TX);
    let case = "tcp4 dsr established per-call";
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

/// NAT, tcp4: the way in (established and new) and the way back.
fn nat(report: &mut Report, e: &mut Engine, calls: usize, floor_call: f64) {
    let mut s =
        vip("tcp4-nat", "198.18.0.100", 8000, L4::Tcp, Forwarding::Nat, &[("198.18.1.1", 1), ("198.18.1.2", 1)]);
    for b in &mut s.backends {
        b.port = 8080;
    }
    e.apply(&[s.clone()]);
    e.set_nat(true);
    let vip_addr: IpAddr = "198.18.0.100".parse().unwrap();
    // Only a SYN opens a NAT connection; the segments after it are the established case.
    let syn = packets::syn(source(3, false), 40_000, vip_addr, 8000);
    let pkt = frame(L4::Tcp, source(3, false), 40_000, vip_addr, 8000);
    let out = {
        let p = e.dp.program(programs::BALANCER).unwrap();
        let mut out = vec![0u8; syn.len() + 64];
        p.test_run(TestRunOptions { data_in: Some(&syn), data_out: Some(&mut out), ..Default::default() }).unwrap();
        out.truncate(syn.len());
        out
    };
    let backend: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(out[30], out[31], out[32], out[33]));
    let ns = per_call(e, programs::BALANCER, std::slice::from_ref(&pkt), calls, XDP_TX);
    report.add("dataplane", "tcp4 nat established per-call", "xdplb", "ns_per_packet", ns, "ns");
    report.add("dataplane", "tcp4 nat established per-call", "xdplb", "ratio_to_floor", ns / floor_call, "x");
    let mut reply = frame(L4::Tcp, backend, 8080, source(3, false), 40_000);
    reply[0..6].copy_from_slice(&out[6..12]);
    let ns = per_call(e, programs::BALANCER, std::slice::from_ref(&reply), calls, XDP_TX);
    report.add("dataplane", "tcp4 nat reply per-call", "xdplb", "ns_per_packet", ns, "ns");
    report.add("dataplane", "tcp4 nat reply per-call", "xdplb", "ratio_to_floor", ns / floor_call, "x");
    // New connections (the NAT table is 65,536 entries: stay below).
    let fresh: Vec<Vec<u8>> = (0..(calls * ROUNDS).min(60_000) as u32)
        .map(|i| packets::syn(source(2000 + i / 30_000, false), 1024 + (i % 30_000) as u16, vip_addr, 8000))
        .collect();
    let ns = per_call(e, programs::BALANCER, &fresh, calls.min(fresh.len() / ROUNDS), XDP_TX);
    report.add("dataplane", "tcp4 nat new flow per-call", "xdplb", "ns_per_packet", ns, "ns");
    report.add("dataplane", "tcp4 nat new flow per-call", "xdplb", "ratio_to_floor", ns / floor_call, "x");
}

/// Packets per second with live frames (each frame really transmitted), in
/// a throwaway namespace so transmitted frames go nowhere.
fn live_frames(report: &mut Report, e: Engine, tcp4: &[u8]) -> Engine {
    let ns = Netns::create(format!("{}{}-live", tests::topology::NETNS_PREFIX, unique_tag()));
    let pkt = tcp4.to_vec();
    let (results, e) = ns.enter(move || {
        let mut e = e;
        let mut out = Vec::new();
        for prog in [programs::BENCH_FLOOR, programs::BALANCER] {
            let mut runs = Vec::new();
            for _ in 0..ROUNDS {
                let p = e.dp.program(prog).unwrap();
                let r = p.test_run(TestRunOptions {
                    data_in: Some(&pkt),
                    repeat: REPEAT,
                    attrs: TestRunAttrs::new().xdp_live_frames(64),
                    ..Default::default()
                });
                match r {
                    Ok(r) => runs.push(r.duration.as_nanos() as f64),
                    Err(err) => return (Err(format!("{err}: live frames need BPF_F_TEST_XDP_LIVE_FRAMES")), e),
                }
            }
            out.push(median(runs));
        }
        (Ok(out), e)
    });
    match results {
        Ok(v) if v[0] > 0.0 && v[1] > 0.0 => {
            report.add(
                "dataplane",
                "live frames tcp4 dsr established",
                "floor",
                "packets_per_second",
                1e9 / v[0],
                "pps",
            );
            report.add(
                "dataplane",
                "live frames tcp4 dsr established",
                "xdplb",
                "packets_per_second",
                1e9 / v[1],
                "pps",
            );
            report.add("dataplane", "live frames tcp4 dsr established", "xdplb", "ratio_to_floor", v[1] / v[0], "x");
        }
        Ok(v) => report.note(format!("live-frames mode reported no duration ({v:?})")),
        Err(e) => report.note(format!("live-frames mode failed: {e}")),
    }
    e
}

/// Established-flow cost over a working set of 50,000 tracked flows, with
/// the connection table at 64K entries or at 4M entries filled with other
/// flows (cache and TLB pressure of a big table).
fn map_sizes(report: &mut Report, quick: bool, calls: usize) {
    let big: u32 = if quick { 1 << 20 } else { 4 << 20 };
    for (label, size, fill) in [("64K", 1u32 << 16, 0u32), (if quick { "1M" } else { "4M" }, big, big / 10 * 9)] {
        let mut e = Engine::with_sizes(MapSizes {
            max_vips: 64,
            max_backends: 4096,
            conntrack: size,
            maglev_pool: 4 * 65_537,
            nat_table: 1024,
        });
        let s = vip("web", "198.18.0.100", 80, L4::Tcp, Forwarding::Dsr, &[("198.18.1.1", 1), ("198.18.1.2", 1)]);
        e.apply(std::slice::from_ref(&s));
        let id = e.reconciler.backend_id(&s.key(), "198.18.1.1".parse().unwrap(), 0).unwrap();
        let generation = e.dp.backend(id).unwrap().generation;
        for i in 0..fill {
            let key = FlowKey {
                src: addr::words(IpAddr::V4(std::net::Ipv4Addr::from(0xc613_0000 | (i >> 16)))),
                dst: addr::words("198.18.0.100".parse().unwrap()),
                sport: (i as u16).to_be(),
                dport: 80u16.to_be(),
                protocol: 6,
                family: FAMILY_V4,
                _pad: [0; 2],
            };
            e.dp.insert_flow(&key, &FlowValue { backend_id: id, generation, hash: i, _pad: 0 }).unwrap();
        }
        let working: Vec<Vec<u8>> = (0..50_000u32)
            .map(|i| frame(L4::Tcp, source(500 + i / 40_000, false), 1024 + (i % 40_000) as u16, s.addr, 80))
            .collect();
        for p in &working {
            run_once(&mut e, programs::BALANCER, p, 1);
        }
        let ns = per_call(&mut e, programs::BALANCER, &working, calls, XDP_TX);
        report.add(
            "dataplane",
            &format!("conntrack {label} ({fill} other flows) established per-call"),
            "xdplb",
            "ns_per_packet",
            ns,
            "ns",
        );
    }
}
