//! The flood case (issue 11): what a flood of spoofed packets does to the
//! connections a balancer already carries, and how fast it takes them.
//!
//! 1. 10,000 established TCP connections to the tcp4 DSR VIP, each opened as
//!    a client opens one (SYN, then the ACK, then a data segment: a design
//!    that tracks a flow only once a second packet confirms it tracks
//!    these), spread over the CPUs; each one's backend is read from its
//!    data segment's destination MAC.
//! 2. Spoofed SYNs to the same VIP, every one from another source (the
//!    restore wrapper's flood mode: one `repeat` call sends that many
//!    distinct new flows through the real balancer): 10M (3M with --quick,
//!    still about three times the default connection table), in calls of
//!    1M, one CPU after the other. The new-flow rate per core is 1e9 ÷ the
//!    kernel's mean ns per run (the wrapper's few ns included), over all
//!    calls and over those that began with the table full.
//! 3. A fourth backend is added to the VIP through the reconciler (the
//!    controller's own path: the Maglev table changes), and every
//!    established connection sends one more segment: how many reached
//!    another backend (goal 0), and how many the connection table still
//!    tracked (counted as conntrack hits).
//! 4. 1M spoofed bare ACKs (distinct sources, same mode) at the NAT VIP: the
//!    rate, and how many NAT_FLOWS and NAT_REVERSE entries they created
//!    (goal 0).
//!
//! Figures only, never asserted. Everything goes through public APIs and
//! packets, so the case runs against any connection-table design.

use std::{net::IpAddr, time::Instant};

use lb_common::{maps::programs, reasons};
use lb_userspace::reconcile::VipSpec;
use tests::{
    harness::{Engine, XDP_DROP, XDP_TX, allowed_cpus, backend_mac, backend_of, pin_to},
    packets::{self, L4, frame},
    restore::Restore,
};

use crate::{
    dataplane::{TX, checked, fresh_engine, nat_spec, run_once, source, specs},
    report::Report,
};

const ESTABLISHED: u32 = 10_000;
/// Spoofed packets per BPF_PROG_TEST_RUN call.
const CHUNK: u32 = 1_000_000;
const NAT_ACKS: u32 = 1_000_000;
const SUITE: &str = "flood";
/// Seeds of the flood mode's source sequences: fixed, so runs compare.
const SYN_SEED: u32 = 0x5eed_0001;
const ACK_SEED: u32 = 0x5eed_0002;
/// TCP flags.
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const PSH_ACK: u8 = 0x18;
/// Initial sequence numbers of the established connections (client, server).
const CLIENT_ISN: u32 = 1000;
const SERVER_ISN: u32 = 0x4000_0000;

pub fn run(report: &mut Report, quick: bool) {
    println!("\n== flood: spoofed SYNs and ACKs against established flows (BPF_PROG_TEST_RUN) ==");
    let syns = if quick { 3 * CHUNK } else { 10 * CHUNK };
    report.note(format!(
        "flood: {ESTABLISHED} connections opened (SYN, ACK, data) to the tcp4 DSR VIP, spread over the CPUs; then \
         {}M spoofed SYNs, each from another source (the restore wrapper's flood mode, repeat in calls of 1M, one \
         CPU after the other; ns per packet includes the wrapper); then a 4th backend added (Maglev changes) and \
         one more segment per connection: moved = reached another backend (goal 0), tracked = counted as a \
         conntrack hit; then {}M spoofed bare ACKs at the NAT VIP: NAT entries created (goal 0)",
        syns / CHUNK,
        NAT_ACKS / CHUNK
    ));
    syn_flood(report, syns);
    ack_flood(report, NAT_ACKS);
}

/// `seg` (a TCP frame of `packets::frame`) without its payload: headers
/// only, checksums valid, padded to the 64 bytes the restore wrapper puts back.
fn bare(seg: &[u8], flags: u8, seq: u32, ack: u32) -> Vec<u8> {
    let mut f = packets::tcp_segment(seg, flags, seq, ack)[..54].to_vec();
    f[16..18].copy_from_slice(&40u16.to_be_bytes());
    packets::fix_checksums(&mut f);
    f.resize(64, 0);
    f
}

/// Runs `pkt` through the balancer: the index of the backend it went to.
fn backend(e: &mut Engine, pkt: &[u8]) -> usize {
    let out = e.run(pkt);
    assert_eq!(out.action, XDP_TX, "an established connection's segment is forwarded");
    backend_of(&out.frame)
}

/// One BPF_PROG_TEST_RUN call of the flood: the kernel's mean ns per run
/// and the call's wall-clock seconds.
struct Chunk {
    ns: f64,
    wall: f64,
}

/// Mean ns per packet (the kernel's) and wall-clock packets per second over `chunks`.
fn rates(chunks: &[Chunk]) -> (f64, f64) {
    let ns = chunks.iter().map(|c| c.ns).sum::<f64>() / chunks.len() as f64;
    let wall: f64 = chunks.iter().map(|c| c.wall).sum();
    (ns, (chunks.len() as u32 * CHUNK) as f64 / wall)
}

/// `f(i)` for every `i` in `0..n`, each on CPU `cpus[i % cpus.len()]`, as
/// a NIC's receive-side scaling spreads clients over its queues (the
/// connection table keeps per-CPU lists: which CPU a flow arrived on
/// matters). Grouped by CPU, one pin each; results in the order of `i`.
fn spread<T>(cpus: &[usize], n: usize, mut f: impl FnMut(usize) -> T) -> Vec<T> {
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    for (k, &cpu) in cpus.iter().enumerate() {
        pin_to(&[cpu]);
        for (i, slot) in out.iter_mut().enumerate().skip(k).step_by(cpus.len()) {
            *slot = Some(f(i));
        }
    }
    pin_to(cpus);
    out.into_iter().map(|v| v.expect("every index ran")).collect()
}

/// `n` spoofed copies of `template` (each from its own source) through the
/// balancer behind the restore wrapper, in calls of `CHUNK`, one CPU of
/// `cpus` after the other: each call's timing, and the action of the last packet.
fn flood(
    e: &mut Engine,
    restore: &mut Restore,
    cpus: &[usize],
    (template, seed): (&[u8], u32),
    n: u32,
) -> (Vec<Chunk>, u32) {
    restore.set(e, programs::BALANCER, template);
    restore.vary_source(Some(seed));
    let mut last = 0;
    let chunks = (0..n / CHUNK)
        .map(|j| {
            pin_to(&[cpus[j as usize % cpus.len()]]);
            let t = Instant::now();
            let (action, mean) = run_once(e, programs::BENCH_RESTORE, template, CHUNK);
            last = action;
            Chunk { ns: mean.as_nanos() as f64, wall: t.elapsed().as_secs_f64() }
        })
        .collect();
    pin_to(cpus);
    restore.vary_source(None);
    (chunks, last)
}

fn syn_flood(report: &mut Report, syns: u32) {
    let mut e = fresh_engine();
    let mut restore = Restore::load(&mut e);
    let mut all = specs();
    let spec = all[0].clone();
    assert_eq!((spec.port, spec.protocol), (80, 6), "the first VIP is tcp4 DSR");

    // 1. The established connections.
    let segs: Vec<Vec<u8>> =
        (0..ESTABLISHED).map(|i| frame(L4::Tcp, source(i, false), 40_000, spec.addr, spec.port)).collect();
    let cpus = allowed_cpus();
    let before = spread(&cpus, segs.len(), |i| {
        let seg = &segs[i];
        backend(&mut e, &bare(seg, SYN, CLIENT_ISN, 0));
        backend(&mut e, &bare(seg, ACK, CLIENT_ISN + 1, SERVER_ISN + 1));
        backend(&mut e, &packets::tcp_segment(seg, PSH_ACK, CLIENT_ISN + 1, SERVER_ISN + 1))
    });
    println!("  ({ESTABLISHED} connections open, {} flows tracked)", e.dp.flow_count());

    // 2. The flood.
    let template = bare(&frame(L4::Tcp, source(0, false), 40_000, spec.addr, spec.port), SYN, 7, 0);
    let case = format!("{}M spoofed SYNs, tcp4 dsr (distinct sources)", syns / 1_000_000);
    let hits = e.reasons()[reasons::CONNTRACK_HIT as usize];
    let (chunks, _) = checked(report, &mut e, &case, &TX, |e| {
        (flood(e, &mut restore, &cpus, (&template, SYN_SEED), syns), syns as u64)
    });
    let hits = e.reasons()[reasons::CONNTRACK_HIT as usize] - hits;
    if hits != 0 {
        report.note(format!("{case}: {hits} spoofed SYNs matched a tracked flow (sources not all distinct?)"));
    }
    // Sustained: the calls that began with the table full, where every insert evicts.
    let full = (e.dp.sizes().conntrack as usize).div_ceil(CHUNK as usize);
    let sustained = format!("{case}, once the table is full");
    for (case, chunks) in [(&case, &chunks[..]), (&sustained, chunks.get(full..).unwrap_or_default())] {
        if chunks.is_empty() {
            continue;
        }
        let (ns, wall_pps) = rates(chunks);
        report.add(SUITE, case, "xdplb", "ns_per_packet", ns, "ns");
        report.add(SUITE, case, "xdplb", "new_flows_per_second_per_core", 1e9 / ns, "flows/s");
        report.add(SUITE, case, "xdplb", "wall_clock_packets_per_second", wall_pps, "pps");
    }
    let entries = e.dp.flow_count();
    report.add(SUITE, &case, "xdplb", "conntrack_entries_after", entries as f64, "entries");

    // 3. A backend added, as the controller adds one; one more segment each.
    let mut grown = spec.clone();
    let mut extra = grown.backends[0].clone();
    extra.addr = "198.18.1.4".parse().unwrap();
    extra.mac = backend_mac(grown.backends.len());
    grown.backends.push(extra);
    all[0] = grown.clone();
    e.apply(&all);
    let maglev_moves = (0..ESTABLISHED)
        .filter(|&i| e.predicted_backend(&grown, source(i, false), 40_000) != before[i as usize])
        .count();
    let hits = e.reasons()[reasons::CONNTRACK_HIT as usize];
    let data = CLIENT_ISN + 1 + (segs[0].len() - 54) as u32;
    let after =
        spread(&cpus, segs.len(), |i| backend(&mut e, &packets::tcp_segment(&segs[i], PSH_ACK, data, SERVER_ISN + 1)));
    let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
    let tracked = e.reasons()[reasons::CONNTRACK_HIT as usize] - hits;
    let case = format!("{ESTABLISHED} established flows, after the SYN flood and a 4th backend");
    report.add(SUITE, &case, "xdplb", "flows_moved", moved as f64, "flows");
    report.add(SUITE, &case, "xdplb", "flows_still_tracked", tracked as f64, "flows");
    report.add(SUITE, &case, "xdplb", "flows_maglev_alone_would_move", maglev_moves as f64, "flows");
}

fn ack_flood(report: &mut Report, acks: u32) {
    let mut e = fresh_engine();
    e.apply(&[specs(), vec![nat_spec()]].concat());
    e.set_nat(true);
    let mut restore = Restore::load(&mut e);
    let spec: VipSpec = nat_spec();
    let vip_addr: IpAddr = spec.addr;
    let template = bare(&frame(L4::Tcp, source(0, false), 40_000, vip_addr, spec.port), ACK, 7, 7);
    let nat_entries = |e: &Engine| (e.dp.nat_flows().len(), e.dp.nat_replies().len());
    let (flows, replies) = nat_entries(&e);
    let forwarded = e.reasons()[reasons::TX as usize];
    let (chunks, last) = flood(&mut e, &mut restore, &allowed_cpus(), (&template, ACK_SEED), acks);
    let (ns, wall_pps) = rates(&chunks);
    let forwarded = e.reasons()[reasons::TX as usize] - forwarded;
    let (flows_after, replies_after) = nat_entries(&e);
    let case = format!("{}M spoofed bare ACKs, tcp4 nat (distinct sources)", acks / 1_000_000);
    // Only a SYN opens a NAT connection: an ACK of none is dropped.
    if last != XDP_DROP {
        report.note(format!("{case}: the last ACK's action was {last}, not XDP_DROP"));
    }
    report.add(SUITE, &case, "xdplb", "ns_per_packet", ns, "ns");
    report.add(SUITE, &case, "xdplb", "packets_per_second_per_core", 1e9 / ns, "pps");
    report.add(SUITE, &case, "xdplb", "wall_clock_packets_per_second", wall_pps, "pps");
    report.add(SUITE, &case, "xdplb", "forwarded", forwarded as f64, "packets");
    let created = |after: usize, before: usize| after as f64 - before as f64;
    report.add(SUITE, &case, "xdplb", "nat_flows_entries_created", created(flows_after, flows), "entries");
    report.add(SUITE, &case, "xdplb", "nat_reverse_entries_created", created(replies_after, replies), "entries");
}
