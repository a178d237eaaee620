//! An active/standby pair of xdplb nodes with keepalived (VRRP), run with
//! the files of examples/keepalived/: the standby takes the VIP when the
//! active node dies or is drained, and established connections continue
//! (flows that Maglev alone would move reach the standby by flow sync).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

use tests::{
    ha::{Held, KeepAliveFleet, MaglevChoice},
    topology::{RequestStream, Sample, target, wait_until},
    vrrp::{self, PORT, Pair, VIP},
};

/// Long-lived connections, each asking every `ASK_EVERY`; a request may
/// take `KEPT_TIMEOUT` (TCP retransmits while the VIP moves).
const KEPT: usize = 30;
const ASK_EVERY: Duration = Duration::from_millis(100);
const KEPT_TIMEOUT: Duration = Duration::from_secs(20);
/// New connections: one every `NEW_EVERY`, each given 2 s (RequestStream's).
const NEW_EVERY: Duration = Duration::from_millis(20);

/// Both nodes' xdplb up with `backends` backends, lb1 MASTER, lb2 BACKUP.
/// Keep-alive connections and a stream of new ones through the VIP, running.
fn traffic(pair: &Pair, vip: SocketAddr) -> (KeepAliveFleet, RequestStream) {
    let client = &pair.cluster.client;
    let fleet = KeepAliveFleet::start(client, vip, KEPT, ASK_EVERY, KEPT_TIMEOUT)
        .unwrap_or_else(|e| panic!("keep-alive connections: {e}\n{}", pair.logs()));
    let stream = RequestStream::start(client, vip, NEW_EVERY, 100_000);
    thread::sleep(Duration::from_millis(500));
    (fleet, stream)
}

fn pair_with_master(backends: usize, all: usize) -> Pair {
    let pair = Pair::new(all);
    pair.start_xdplb(0, backends);
    pair.start_xdplb(1, backends);
    // One after the other: with nopreempt the first node up stays master.
    pair.start_keepalived(0);
    pair.wait_vrrp_state(0, "MASTER");
    pair.wait_vip(0, true);
    pair.start_keepalived(1);
    pair.wait_vrrp_state(1, "BACKUP");
    assert!(pair.has_vip(0), "lb1 holds the VIP\n{}", pair.logs());
    assert!(!pair.has_vip(1), "lb2 does not hold the VIP\n{}", pair.logs());
    pair
}

fn backend_addrs(pair: &Pair, n: usize) -> Vec<Ipv4Addr> {
    (0..n)
        .map(|i| match pair.cluster.backend4(i) {
            IpAddr::V4(a) => a,
            a => panic!("{a} is not IPv4"),
        })
        .collect()
}

/// Every connection still open, on its first backend, and asked again
/// since `before` (so it went through whichever node holds the VIP now).
fn assert_kept(pair: &Pair, what: &str, before: &[Held], after: &[Held]) {
    let broken: Vec<&Held> = after.iter().filter(|h| h.failure.is_some()).collect();
    assert!(
        broken.is_empty(),
        "{what}: {} of {} connections broke: {broken:#?}\n{}",
        broken.len(),
        after.len(),
        pair.logs()
    );
    for h in after {
        let earlier = before.iter().find(|b| b.local == h.local).map_or(0, |b| b.requests);
        assert!(h.requests > earlier, "{what}: {} asked nothing after the move ({} requests)", h.local, h.requests);
    }
}

fn failed(samples: &[Sample]) -> Vec<&Sample> {
    samples.iter().filter(|s| s.result.is_err()).collect()
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

#[test]
fn the_standby_takes_the_vip_and_established_connections_continue() {
    let pair = pair_with_master(2, 3);
    let vip = target(VIP, PORT);
    let client = &pair.cluster.client;
    let (fleet, stream) = traffic(&pair, vip);

    // One more backend on both nodes: Maglev moves about a third of the flows,
    // and only the flow table (lb1's, and lb2's copy by flow sync) keeps them.
    for i in 0..2 {
        pair.reload(i, 3);
    }
    let maglev = MaglevChoice::new(&backend_addrs(&pair, 3), pair.hash_seed());
    let name = |a: Ipv4Addr| format!("b{}", backend_addrs(&pair, 3).iter().position(|b| *b == a).unwrap() + 1);
    let deviating: Vec<SocketAddr> =
        fleet.snapshot().iter().filter(|h| name(maglev.backend(h.local, vip)) != h.backend).map(|h| h.local).collect();
    assert!(!deviating.is_empty(), "no kept connection deviates from Maglev's new choice");
    let s1 = pair.wait_status(0, "the deviating flows", |s| {
        s["flow_sync"]["deviating_flows"].as_u64().is_some_and(|n| n >= deviating.len() as u64)
    });
    let on_lb1 = s1["flow_sync"]["deviating_flows"].as_u64().unwrap();
    let s2 = pair.wait_status(1, "the synced flows", |s| {
        s["flow_sync"]["flows_installed"].as_u64().is_some_and(|n| n >= on_lb1)
    });
    println!(
        "{} of {KEPT} kept connections deviate from Maglev's new choice; lb1: {on_lb1} deviating flows; \
         lb2: {} flows installed from lb1",
        deviating.len(),
        s2["flow_sync"]["flows_installed"]
    );

    // lb1 dies: no goodbye from keepalived or xdplb, and its link goes down.
    let before = fleet.snapshot();
    let killed = Instant::now();
    pair.kill(0);
    let lb2 = pair.nodes[1].ns.name.clone();
    let vip_moved =
        thread::spawn(move || wait_until(Duration::from_secs(30), || vrrp::has_vip(&lb2)).then(Instant::now));
    let (answered, failed_probes) =
        vrrp::first_answer(client, vip, Duration::from_millis(300), Duration::from_millis(10), Duration::from_secs(30));
    let vip_moved = vip_moved.join().unwrap();
    let answered = answered.unwrap_or_else(|| panic!("no new connection succeeded after the kill\n{}", pair.logs()));
    let vip_moved = vip_moved.unwrap_or_else(|| panic!("lb2 never took the VIP\n{}", pair.logs()));
    // Long enough for every kept connection to retransmit and ask again.
    thread::sleep(Duration::from_secs(3));
    let after = fleet.stop();
    let samples = stream.stop();

    assert_eq!(pair.vrrp_state(1).as_deref(), Some("MASTER"), "{}", pair.logs());
    assert!(pair.has_vip(1));
    assert_kept(&pair, "after lb1 died", &before, &after);
    let before_kill: Vec<Sample> = samples.iter().filter(|s| s.at + s.took < killed).cloned().collect();
    assert!(failed(&before_kill).is_empty(), "new connections failed before the kill: {:?}", failed(&before_kill));
    let during: Vec<Sample> = samples.iter().filter(|s| s.at + s.took >= killed && s.at < answered).cloned().collect();
    let later: Vec<Sample> = samples.iter().filter(|s| s.at >= answered).cloned().collect();
    assert!(later.len() > 20, "only {} new connections after the takeover", later.len());
    assert!(failed(&later).is_empty(), "new connections failed after the takeover: {:?}", failed(&later));
    let slowest = after.iter().map(|h| h.slowest).max().unwrap_or_default();
    println!(
        "takeover: lb2 held the VIP {} after the kill; first new connection answered {} after the kill \
         ({failed_probes} probes of 300 ms failed before); new connections in flight during the takeover: {}, \
         failed: {}; kept connections: {} of {KEPT} unbroken ({} deviating), slowest request {}",
        ms(vip_moved - killed),
        ms(answered - killed),
        during.len(),
        failed(&during).len(),
        after.iter().filter(|h| h.failure.is_none()).count(),
        deviating.len(),
        ms(slowest)
    );
}

#[test]
fn a_drained_node_gives_the_vip_to_the_standby() {
    let pair = pair_with_master(3, 3);
    let vip = target(VIP, PORT);
    let (fleet, stream) = traffic(&pair, vip);

    // `xdplb drain`: the track file says 1, keepalived on lb1 enters FAULT
    // and sends priority 0, and lb2 takes the VIP at once.
    let before = fleet.snapshot();
    let drained = Instant::now();
    pair.xdplb_ok(0, &["drain"]);
    pair.wait_vip(1, true);
    let moved = drained.elapsed();
    pair.wait_vip(0, false);
    assert_eq!(pair.track_file(0).as_deref(), Some("1\n"));
    pair.wait_vrrp_state(0, "FAULT");
    pair.wait_vrrp_state(1, "MASTER");
    assert_eq!(pair.status(0).unwrap()["node_drained"], true);
    thread::sleep(Duration::from_secs(1));
    let drain_held = fleet.snapshot();
    assert_kept(&pair, "after lb1 was drained", &before, &drain_held);

    // `xdplb undrain`: lb1 comes back as BACKUP and leaves the VIP on lb2
    // (nopreempt), for ten advert intervals and more.
    pair.xdplb_ok(0, &["undrain"]);
    assert!(wait_until(Duration::from_secs(30), || pair.track_file(0).as_deref() == Some("0\n")));
    pair.wait_vrrp_state(0, "BACKUP");
    thread::sleep(Duration::from_secs(1));
    assert_eq!(pair.vrrp_state(0).as_deref(), Some("BACKUP"), "{}", pair.logs());
    assert!(pair.has_vip(1) && !pair.has_vip(0), "lb1 took the VIP back\n{}", pair.logs());

    // Moving it back is draining the other node.
    let back = Instant::now();
    pair.xdplb_ok(1, &["drain"]);
    pair.wait_vip(0, true);
    let moved_back = back.elapsed();
    pair.xdplb_ok(1, &["undrain"]);
    pair.wait_vrrp_state(1, "BACKUP");
    pair.wait_vrrp_state(0, "MASTER");
    thread::sleep(Duration::from_secs(1));
    let after = fleet.stop();
    let samples = stream.stop();

    assert!(pair.has_vip(0) && !pair.has_vip(1), "the VIP is back on lb1 alone\n{}", pair.logs());
    assert_kept(&pair, "after the VIP moved back to lb1", &drain_held, &after);
    assert!(samples.len() > 100, "only {} new connections", samples.len());
    assert!(failed(&samples).is_empty(), "new connections failed: {:?}\n{}", failed(&samples), pair.logs());
    let slowest = after.iter().map(|h| h.slowest).max().unwrap_or_default();
    println!(
        "drain: lb2 held the VIP {} after `xdplb drain` on lb1; back on lb1 {} after `xdplb drain` on lb2; \
         {} new connections, none failed; kept connections: {KEPT} unbroken, slowest request {}",
        ms(moved),
        ms(moved_back),
        samples.len(),
        ms(slowest)
    );
}
