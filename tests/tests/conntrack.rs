//! The connection table against floods and time, packet by packet on the
//! real eBPF object (BPF_PROG_TEST_RUN): a flow enters FLOWS only with its
//! second packet, so one-packet floods never evict an established flow; past
//! `flood_rate` a CPU stops entering flows; idle UDP flows are chosen again;
//! the flow hash is seeded; a backend being rewritten is never read half-written.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use lb_common::{
    flow_hash,
    maps::{BackendSlot, LbConfig},
    reasons,
};
use lb_userspace::{
    addr,
    dataplane::MapSizes,
    reconcile::{Forwarding, VipSpec},
};
use tests::{
    harness::{Engine, XDP_TX, backend_mac, backend_of, vip},
    packets::{L4, frame, syn},
};

const VIP4: &str = "198.18.0.100";
const BACKENDS4: [(&str, u32); 3] = [("198.18.1.1", 1), ("198.18.1.2", 1), ("198.18.1.3", 1)];

fn client(i: u32) -> IpAddr {
    format!("198.18.{}.{}", 128 + (i >> 8) % 64, i & 0xff).parse().unwrap()
}

/// A spoofed source: one of 65,536 addresses, then another port.
fn spoofed(i: u32) -> (IpAddr, u16) {
    (format!("198.19.{}.{}", (i >> 8) & 0xff, i & 0xff).parse().unwrap(), 1024 + (i >> 16) as u16)
}

fn web(backends: &[(&str, u32)], l4: L4) -> VipSpec {
    vip("web", VIP4, if l4 == L4::Tcp { 80 } else { 53 }, l4, Forwarding::Dsr, backends)
}

/// A flow's first two packets (`f` twice): it is confirmed into FLOWS. Its backend.
fn establish(e: &mut Engine, f: &[u8]) -> usize {
    let first = backend_of(&e.run(f).frame);
    assert_eq!(backend_of(&e.run(f).frame), first, "a flow's second packet goes where its first went");
    first
}

fn set_config(e: &mut Engine, change: impl FnOnce(&mut LbConfig)) {
    let mut cfg = e.dp.config().unwrap();
    change(&mut cfg);
    e.dp.set_config(&cfg).unwrap();
}

/// A table of 1,024 flows holding 500 established ones; 100,000 SYNs from
/// distinct spoofed sources; then a backend is added. Before the embryonic
/// cache, each SYN took a FLOWS entry (evicting the least recently used):
/// every established flow was evicted, and Maglev moved a third of them.
#[test]
fn a_flood_of_one_packet_flows_moves_no_established_flow() {
    let mut e = Engine::with_sizes(MapSizes { conntrack: 1024, ..Engine::new().dp.sizes() });
    let s = web(&BACKENDS4[..2], L4::Tcp);
    e.apply(std::slice::from_ref(&s));
    let flows: Vec<Vec<u8>> = (0..500).map(|i| frame(L4::Tcp, client(i), 30_000, s.addr, 80)).collect();
    let first: Vec<usize> = flows.iter().map(|f| establish(&mut e, f)).collect();
    assert_eq!(e.dp.flow_count(), 500);

    let flood = 100_000;
    for i in 0..flood {
        let (src, sport) = spoofed(i);
        assert_eq!(e.run(&syn(src, sport, s.addr, 80)).action, XDP_TX, "a SYN is forwarded");
    }
    assert_eq!(e.dp.flow_count(), 500, "no spoofed SYN took a FLOWS entry");

    let grown = web(&BACKENDS4, L4::Tcp);
    e.apply(std::slice::from_ref(&grown));
    let mut would_move = 0;
    for (i, f) in flows.iter().enumerate() {
        assert_eq!(backend_of(&e.run(f).frame), first[i], "established flow {i} keeps its backend");
        would_move += usize::from(e.predicted_backend(&grown, client(i as u32), 30_000) != first[i]);
    }
    assert!(would_move > 50, "the new backend must matter for the test to mean anything ({would_move})");
    let r = e.reasons();
    assert_eq!(r[reasons::CONNTRACK_MISS as usize], 500 + flood as u64);
    assert_eq!(r[reasons::CONNTRACK_HIT as usize], 500);
}

/// A SYN never confirms a flow, even the same SYN again (a spoofer's
/// retransmission); the client's next segment does.
#[test]
fn a_repeated_syn_never_confirms_a_flow() {
    let mut e = Engine::new();
    let s = web(&BACKENDS4, L4::Tcp);
    e.apply(std::slice::from_ref(&s));
    let c = client(3);
    for _ in 0..3 {
        assert_eq!(e.run(&syn(c, 40_000, s.addr, 80)).action, XDP_TX);
    }
    assert_eq!(e.dp.flow_count(), 0, "SYNs alone leave no FLOWS entry");
    let b = backend_of(&e.run(&frame(L4::Tcp, c, 40_000, s.addr, 80)).frame);
    assert_eq!(e.dp.flow_count(), 1, "the ACK confirms it");
    assert_eq!(b, e.predicted_backend(&s, c, 40_000));
    let r = e.reasons();
    assert_eq!((r[reasons::CONNTRACK_MISS as usize], r[reasons::CONNTRACK_CONFIRMED as usize]), (3, 1));
}

/// Past `flood_rate` new flows in a second, a CPU forwards by Maglev alone
/// and enters no more flows into FLOWS (counted); the flows it did enter stay.
#[test]
fn past_the_flood_rate_new_flows_are_forwarded_untracked() {
    let mut e = Engine::new();
    set_config(&mut e, |c| c.flood_rate = 1000);
    let s = web(&BACKENDS4, L4::Tcp);
    e.apply(std::slice::from_ref(&s));
    let n = 3000u32;
    let started = Instant::now();
    for i in 0..n {
        let c = client(i);
        let got = establish(&mut e, &frame(L4::Tcp, c, 31_000, s.addr, 80));
        assert_eq!(got, e.predicted_backend(&s, c, 31_000), "flow {i}: Maglev's choice, tracked or not");
    }
    // The window is one second: at most `flood_rate` flows per second begun.
    let windows = started.elapsed().as_secs() + 1;
    let tracked = e.dp.flow_count() as u64;
    let r = e.reasons();
    assert!(tracked >= 1000 && tracked <= 1000 * windows, "{tracked} tracked in {windows} windows");
    assert_eq!(r[reasons::CONNTRACK_CONFIRMED as usize], tracked);
    assert_eq!(r[reasons::CONNTRACK_FLOOD as usize], n as u64 - tracked, "every flow not entered is counted");
    assert_eq!(r[reasons::TX as usize], 2 * n as u64, "and every packet forwarded");
}

/// A UDP flow idle longer than `udp_idle_s` is chosen again (a draining
/// server's UDP flows end); a TCP flow idle as long keeps its backend.
#[test]
fn an_idle_udp_flow_is_chosen_again_and_tcp_is_not() {
    let mut e = Engine::new();
    set_config(&mut e, |c| c.udp_idle_s = 1);
    let (udp, tcp) = (web(&BACKENDS4[..2], L4::Udp), web(&BACKENDS4[..2], L4::Tcp));
    e.apply(&[udp.clone(), tcp.clone()]);
    let n = 200u32;
    let udp_first: Vec<usize> =
        (0..n).map(|i| establish(&mut e, &frame(L4::Udp, client(i), 5300, udp.addr, 53))).collect();
    let tcp_first: Vec<usize> =
        (0..n).map(|i| establish(&mut e, &frame(L4::Tcp, client(i), 5300, tcp.addr, 80))).collect();
    let (udp3, tcp3) = (web(&BACKENDS4, L4::Udp), web(&BACKENDS4, L4::Tcp));
    e.apply(&[udp3.clone(), tcp3]);
    // Not idle yet: both keep their backends.
    for i in 0..n {
        assert_eq!(backend_of(&e.run(&frame(L4::Udp, client(i), 5300, udp.addr, 53)).frame), udp_first[i as usize]);
    }
    // The dataplane counts whole seconds: idle > 1 s means 2 s apart.
    std::thread::sleep(Duration::from_millis(3100));
    let mut moved = 0;
    for i in 0..n {
        let now = backend_of(&e.run(&frame(L4::Udp, client(i), 5300, udp.addr, 53)).frame);
        assert_eq!(now, e.predicted_backend(&udp3, client(i), 5300), "UDP flow {i}: Maglev's choice now");
        moved += usize::from(now != udp_first[i as usize]);
        let t = backend_of(&e.run(&frame(L4::Tcp, client(i), 5300, tcp.addr, 80)).frame);
        assert_eq!(t, tcp_first[i as usize], "TCP flow {i} keeps its backend");
    }
    assert!(moved > 20, "the new backend must matter for the test to mean anything ({moved})");
    assert_eq!(e.reasons()[reasons::CONNTRACK_EXPIRED as usize], n as u64);
}

/// The flow hash takes the seed in CONFIG: the dataplane's choices follow
/// it (as userspace computes them with it), and another seed orders flows
/// otherwise.
#[test]
fn the_hash_seed_decides_where_flows_go() {
    let mut e = Engine::new();
    let seed = [0x1234_5678, 0x9abc_def0];
    set_config(&mut e, |c| c.hash_seed = seed);
    let s = web(&BACKENDS4, L4::Tcp);
    e.apply(std::slice::from_ref(&s));
    let meta = e.reconciler.vip_meta(&s.key()).unwrap();
    let mut differs = 0;
    for i in 0..300 {
        let c = client(i);
        let got = backend_of(&e.run(&frame(L4::Tcp, c, 32_000, s.addr, 80)).frame);
        assert_eq!(got, e.predicted_backend(&s, c, 32_000), "flow {i}");
        let (src, dst) = (addr::words(c), addr::words(s.addr));
        let unseeded = flow_hash::five_tuple(&[0, 0], &src, &dst, 32_000u16.to_be(), 80u16.to_be(), 6);
        let id = e.dp.read_pool(meta.ring_offset + unseeded % meta.ring_size, 1)[0];
        differs += usize::from(e.backend_index(&s, id) != Some(got));
    }
    assert!(differs > 100, "the seed must change choices ({differs} of 300)");
}

/// A backend is published by writing the copy packets do not read, then
/// flipping `live`: while the idle copy is half-written, packets still see
/// the whole old backend (before, BACKENDS held one copy, rewritten in place).
#[test]
fn a_backend_being_rewritten_is_never_read_half_written() {
    let mut e = Engine::new();
    let s = web(&BACKENDS4[..1], L4::Tcp);
    e.apply(std::slice::from_ref(&s));
    let id = e.reconciler.backend_id(&s.key(), s.backends[0].addr, s.backends[0].port).unwrap();
    let before = e.dp.backend_slot(id).unwrap();
    let live = before.live & 1;
    // A rewrite cut in the middle: the idle copy has a new MAC, but the
    // address of another server and a zero generation.
    let mut torn = before;
    torn.copies[(live ^ 1) as usize].mac = [0x02, 0xee, 0xee, 0xee, 0xee, 0xee];
    torn.copies[(live ^ 1) as usize].addr = addr::words("198.18.9.9".parse().unwrap());
    torn.copies[(live ^ 1) as usize].generation = 0;
    e.dp.set_backend_slot(id, &torn).unwrap();
    let f = frame(L4::Tcp, client(1), 33_000, s.addr, 80);
    assert_eq!(e.run(&f).frame[0..6], backend_mac(0), "packets read the live copy");

    // A whole update: the new MAC, every other field kept.
    let mut moved = *before.current();
    moved.mac = [0x02, 0xbb, 0, 0, 0, 0x07];
    e.dp.set_backend(id, &moved).unwrap();
    let after: BackendSlot = e.dp.backend_slot(id).unwrap();
    assert_eq!(after.live & 1, live ^ 1, "the other copy is live now");
    assert_eq!(after.copies[live as usize], *before.current(), "the old copy stays whole until the next update");
    assert_eq!(e.run(&f).frame[0..6], moved.mac);
}

/// In flood mode a flow's second packet cannot enter FLOWS: it stays in
/// FLOWS_NEW, so its later packets still go to its first packet's backend
/// when the table changes (before, the slot was freed and the flow was
/// chosen again by the new table).
#[test]
fn in_flood_mode_an_unconfirmed_flow_keeps_its_backend() {
    let mut e = Engine::new();
    set_config(&mut e, |c| c.flood_rate = 1);
    let s = web(&BACKENDS4[..2], L4::Tcp);
    e.apply(std::slice::from_ref(&s));
    establish(&mut e, &frame(L4::Tcp, client(999), 34_000, s.addr, 80));
    assert_eq!(e.dp.flow_count(), 1, "the second's one flow is tracked");
    let flows: Vec<Vec<u8>> = (0..100).map(|i| frame(L4::Tcp, client(i), 34_000, s.addr, 80)).collect();
    let first: Vec<usize> = flows.iter().map(|f| establish(&mut e, f)).collect();
    let tracked = e.dp.flow_count();
    let grown = web(&BACKENDS4, L4::Tcp);
    e.apply(std::slice::from_ref(&grown));
    let mut would_move = 0;
    for (i, f) in flows.iter().enumerate() {
        assert_eq!(backend_of(&e.run(f).frame), first[i], "flow {i} keeps its backend");
        would_move += usize::from(e.predicted_backend(&grown, client(i as u32), 34_000) != first[i]);
    }
    // The window is a second: on a slow machine a few flows may have been tracked.
    assert!(tracked < 50, "flood mode: {tracked} tracked");
    assert!(would_move > 10, "the new backend must matter for the test to mean anything ({would_move})");
    assert!(e.reasons()[reasons::CONNTRACK_FLOOD as usize] >= 100 - tracked as u64);
}
