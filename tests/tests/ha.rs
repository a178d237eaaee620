//! High availability: three xdplb nodes announce the VIPs over eBGP, each
//! through its own BIRD, to a router that spreads them with ECMP (see
//! tests::ha for the topology). Nodes that crash, drain, or lose a VIP's
//! last backend leave the router's route, and no client notices.
//!
//! Each test prints the convergence times it measured (the router's route
//! changing); none is asserted.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use tests::{
    ha::{
        HaCluster, HaSpec, HaVip, KeepAliveFleet, MaglevChoice, VIP, VIP_2, backend_addr, backend_name, get_once,
        route, vip_packets,
    },
    topology::{self, RequestStream, Sample},
};

const WAIT: Duration = Duration::from_secs(30);
const NODES: usize = 3;
/// How long a request may wait for its answer before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

fn all_active(s: &serde_json::Value) -> bool {
    s["vips"].as_array().is_some_and(|vs| {
        !vs.is_empty()
            && vs.iter().all(|v| v["backends"].as_array().is_some_and(|bs| bs.iter().all(|b| b["state"] == "active")))
    })
}

/// Flows in a node's flow table, over every VIP and backend.
fn node_flows(s: &serde_json::Value) -> u64 {
    let backends =
        s["vips"].as_array().into_iter().flatten().flat_map(|v| v["backends"].as_array().into_iter().flatten());
    backends.map(|b| b["flows"].as_u64().unwrap_or(0)).sum()
}

fn prefix(vip: &str) -> String {
    format!("{vip}/32")
}

fn ok<T>(r: Result<T, String>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

/// The group: every node runs `vips`, every backend's server is up; returns
/// once every node announces every VIP and the router has 3 next hops for each.
fn group(backends: usize, vips: &[HaVip]) -> HaCluster {
    let c = ok(HaCluster::new(HaSpec { nodes: NODES, backends, bin_dir: topology::bin_dir() }));
    let start = Instant::now();
    for i in 0..NODES {
        ok(c.write_config(i, &c.node_yaml(i, vips)));
        ok(c.start_xdplb(i));
    }
    for i in 0..NODES {
        ok(c.wait_status(i, WAIT, "every backend active and every VIP announced", |s| {
            all_active(s) && vips.iter().all(|v| route(s, &prefix(&v.address.to_string())).is_some_and(|r| r.0))
        }));
    }
    for v in vips {
        let a = v.address.to_string();
        ok(c.wait_nexthops(&a, NODES, WAIT));
        eprintln!("start: {a} has {NODES} next hops {:.0?} after the nodes started", start.elapsed());
    }
    c
}

fn packets(c: &HaCluster, vip: &str) -> Vec<u64> {
    (0..NODES).map(|i| c.status(i).and_then(|s| vip_packets(&s, vip)).unwrap_or(0)).collect()
}

fn failures(samples: &[Sample]) -> Vec<&Sample> {
    samples.iter().filter(|s| s.result.is_err()).collect()
}

#[test]
fn new_connections_spread_across_the_three_nodes() {
    let web = HaVip::new("web", VIP, 80, 0..3);
    let c = group(3, std::slice::from_ref(&web));
    // The blackhole route xdplb gives BIRD only carries the announcement:
    // no node's own routing table holds it.
    for n in &c.nodes {
        let out = n.ns.command("ip").args(["route", "show", "table", "all", &prefix(VIP)]).output().unwrap();
        assert!(out.stdout.is_empty(), "{}: {}", n.name, String::from_utf8_lossy(&out.stdout));
    }
    let before = packets(&c, "web");
    let maglev = MaglevChoice::new(&[backend_addr(0), backend_addr(1), backend_addr(2)], c.hash_seed());
    let mut per_node = [0usize; NODES];
    for n in 0..90 {
        let (local, backend) = get_once(&c.client, web.target(), REQUEST_TIMEOUT)
            .unwrap_or_else(|e| panic!("connection {n}: {e}\n{}", c.xdplb_log(0)));
        per_node[c.node_for(local, web.target()).expect("the router routes the VIP")] += 1;
        // Whichever node the router chose, Maglev's choice is the same.
        assert_eq!(backend, backend_name(maglev.backend(local, web.target())), "connection from {local}");
    }
    // Each node's dataplane counted some: status refreshes every second.
    for i in 0..NODES {
        let s = ok(c.wait_status(i, WAIT, "VIP packets counted", |s| vip_packets(s, "web") > Some(before[i])));
        eprintln!(
            "{}: {} of 90 connections routed here, {} VIP packets",
            c.nodes[i].name,
            per_node[i],
            vip_packets(&s, "web").unwrap() - before[i]
        );
    }
}

#[test]
fn killing_a_node_loses_no_established_connection() {
    // Four servers; the VIP starts with three, the fourth joins later.
    let web = HaVip::new("web", VIP, 80, 0..3);
    let c = group(4, std::slice::from_ref(&web));
    let target = web.target();
    let fleet = ok(KeepAliveFleet::start(&c.client, target, 60, Duration::from_millis(100), REQUEST_TIMEOUT));
    let held = fleet.snapshot();
    let maglev3 = MaglevChoice::new(&[backend_addr(0), backend_addr(1), backend_addr(2)], c.hash_seed());
    let node_before: Vec<usize> = held.iter().map(|h| c.node_for(h.local, target).unwrap()).collect();
    for h in &held {
        assert_eq!(h.backend, backend_name(maglev3.backend(h.local, target)), "{}", h.local);
    }
    // The router sends each connection where `ip route get` says: each node
    // tracks exactly the connections predicted for it.
    for i in 0..NODES {
        let expected = node_before.iter().filter(|&&n| n == i).count() as u64;
        ok(c.wait_status(i, WAIT, &format!("{expected} flows"), |s| node_flows(s) == expected));
    }

    let stream = RequestStream::start(&c.client, target, Duration::from_millis(20), 100_000);
    std::thread::sleep(Duration::from_secs(1));
    // Backend 4 joins: Maglev gives it about a quarter of the flows, so
    // about a quarter of the established connections now deviate from
    // Maglev's choice. Each node keeps its own on their backend; flow sync
    // tells the others.
    let web4 = HaVip::new("web", VIP, 80, 0..4);
    for i in 0..NODES {
        ok(c.write_config(i, &c.node_yaml(i, std::slice::from_ref(&web4))));
        eprintln!("{}: {}", c.nodes[i].name, ok(c.reload(i)).trim());
    }
    for i in 0..NODES {
        ok(c.wait_status(i, WAIT, "4 active backends", |s| {
            all_active(s) && s["vips"][0]["backends"].as_array().is_some_and(|b| b.len() == 4)
        }));
    }
    let maglev4 =
        MaglevChoice::new(&[backend_addr(0), backend_addr(1), backend_addr(2), backend_addr(3)], c.hash_seed());
    let deviating: Vec<bool> =
        held.iter().map(|h| h.backend != backend_name(maglev4.backend(h.local, target))).collect();
    let mut deviating_on = [0u64; NODES];
    for (k, &d) in deviating.iter().enumerate() {
        deviating_on[node_before[k]] += d as u64;
    }
    eprintln!("deviating long-lived connections by node: {deviating_on:?}");
    // Every node has installed at least the deviating connections the others carry.
    let sync_start = Instant::now();
    for i in 0..NODES {
        let from_peers: u64 = (0..NODES).filter(|&j| j != i).map(|j| deviating_on[j]).sum();
        ok(c.wait_status(i, WAIT, &format!("{from_peers} flows installed from peers"), |s| {
            s["flow_sync"]["flows_installed"].as_u64() >= Some(from_peers)
        }));
    }
    eprintln!(
        "flow sync: peers had installed the deviating flows {:.0?} after every node had 4 active backends",
        sync_start.elapsed()
    );
    // One more refresh (2 s) for good measure.
    std::thread::sleep(Duration::from_millis(2500));
    for i in 0..NODES {
        eprintln!(
            "{}: flow_sync {}",
            c.nodes[i].name,
            c.status(i).map(|s| s["flow_sync"].to_string()).unwrap_or_default()
        );
    }

    // The node carrying the most deviating connections crashes: xdplb and BIRD, SIGKILL.
    let victim = (0..NODES).max_by_key(|&i| deviating_on[i]).unwrap();
    let packets_before = packets(&c, "web");
    let killed_at = Instant::now();
    c.kill_node(victim);
    ok(c.wait_nexthops(VIP, NODES - 1, WAIT));
    let converged_at = Instant::now();
    assert!(!c.nexthops(VIP).contains(&c.nodes[victim].addr));
    std::thread::sleep(Duration::from_secs(5));
    let packets_after = packets(&c, "web");
    let node_after: Vec<usize> = held.iter().map(|h| c.node_for(h.local, target).unwrap()).collect();
    let samples = stream.stop();
    let held = fleet.stop();

    let convergence = converged_at - killed_at;
    let during: Vec<&Sample> = failures(&samples).into_iter().filter(|s| s.at >= killed_at).collect();
    let before_kill: Vec<&Sample> = failures(&samples).into_iter().filter(|s| s.at < killed_at).collect();
    let after: Vec<&Sample> = during.iter().copied().filter(|s| s.at >= converged_at).collect();
    let slowest = held.iter().map(|h| h.slowest).max().unwrap_or_default();
    eprintln!(
        "killed {} (carrying {} deviating connections): the router had 2 next hops after {convergence:.0?}; \
         {} of {} new connections failed meanwhile, {} after; slowest keep-alive request {slowest:.0?}",
        c.nodes[victim].name,
        deviating_on[victim],
        during.len() - after.len(),
        samples.iter().filter(|s| s.at >= killed_at && s.at < converged_at).count(),
        after.len()
    );
    for i in 0..NODES {
        eprintln!(
            "{}: VIP packets {} -> {}",
            c.nodes[i].name,
            packets_before[i],
            if i == victim { "(killed)".to_string() } else { packets_after[i].to_string() }
        );
    }

    // Teeth: deviating connections that the router now sends to another
    // node than before. Their new node never saw them; without flow sync it
    // would send them to Maglev's new choice, a backend that has no such
    // connection and answers with a reset.
    let moved_deviating = (0..held.len()).filter(|&k| deviating[k] && node_after[k] != node_before[k]).count();
    eprintln!(
        "{} deviating long-lived connections changed node ({} were on the killed node)",
        moved_deviating,
        (0..held.len()).filter(|&k| deviating[k] && node_before[k] == victim).count()
    );
    assert!(moved_deviating > 0, "no deviating connection changed node: the test proves nothing");
    assert!(node_after.iter().all(|&n| n != victim));

    let broken: Vec<String> = held
        .iter()
        .filter(|h| h.failure.is_some() || h.last_ok < converged_at)
        .map(|h| {
            format!(
                "{} ({}): {:?}, last answer {:?} after the kill",
                h.local,
                h.backend,
                h.failure,
                h.last_ok.checked_duration_since(killed_at)
            )
        })
        .collect();
    assert!(
        broken.is_empty(),
        "established connections broke: {broken:#?}\nlog of a survivor:\n{}",
        c.xdplb_log((victim + 1) % NODES)
    );
    assert!(before_kill.is_empty(), "new connections failed before the kill: {before_kill:?}");
    assert!(after.is_empty(), "new connections failed after the router converged: {after:?}");
    assert!(samples.iter().filter(|s| s.at >= converged_at).count() > 50, "the stream went on after convergence");
}

#[test]
fn draining_a_node_moves_its_share_without_a_failed_request() {
    let web = HaVip::new("web", VIP, 80, 0..3);
    let c = group(3, std::slice::from_ref(&web));
    let target = web.target();
    let fleet = ok(KeepAliveFleet::start(&c.client, target, 30, Duration::from_millis(100), REQUEST_TIMEOUT));
    let node_of: Vec<usize> = fleet.snapshot().iter().map(|h| c.node_for(h.local, target).unwrap()).collect();
    // The node with the most keep-alive connections drains.
    let v = (0..NODES).max_by_key(|&i| node_of.iter().filter(|&&n| n == i).count()).unwrap();
    let carried = node_of.iter().filter(|&&n| n == v).count();
    let stream = RequestStream::start(&c.client, target, Duration::from_millis(20), 100_000);
    std::thread::sleep(Duration::from_secs(1));

    let drained_at = Instant::now();
    eprintln!("{}: xdplb drain: {}", c.nodes[v].name, ok(c.drain(v)).trim());
    ok(c.wait_nexthops(VIP, NODES - 1, WAIT));
    let drain_convergence = drained_at.elapsed();
    assert!(!c.nexthops(VIP).contains(&c.nodes[v].addr));
    // The status says so (it is published every second: wait for it).
    ok(c.wait_status(v, WAIT, "node drained, route withdrawn", |s| {
        s["node_drained"] == true && route(s, &prefix(VIP)) == Some((false, "node drained".to_string()))
    }));
    eprintln!("{}: status shows the drain {:.0?} after `xdplb drain`", c.nodes[v].name, drained_at.elapsed());
    // Its counters stop: after the route is gone, nothing arrives.
    std::thread::sleep(Duration::from_secs(2));
    let p1 = packets(&c, "web")[v];
    std::thread::sleep(Duration::from_secs(3));
    let p2 = packets(&c, "web")[v];
    assert_eq!(p1, p2, "{} still receives VIP packets while drained", c.nodes[v].name);
    for (i, n) in c.nodes.iter().enumerate().filter(|&(i, _)| i != v) {
        let s = c.status(i).unwrap();
        assert_eq!(route(&s, &prefix(VIP)), Some((true, "healthy backends".to_string())), "{}: {}", n.name, s["bgp"]);
    }

    let undrained_at = Instant::now();
    eprintln!("{}: xdplb undrain: {}", c.nodes[v].name, ok(c.undrain(v)).trim());
    ok(c.wait_nexthops(VIP, NODES, WAIT));
    let undrain_convergence = undrained_at.elapsed();
    ok(c.wait_status(v, WAIT, "VIP packets rising again", |s| vip_packets(s, "web") > Some(p2)));
    let rising = undrained_at.elapsed();
    assert_eq!(route(&c.status(v).unwrap(), &prefix(VIP)), Some((true, "healthy backends".to_string())));
    std::thread::sleep(Duration::from_secs(1));
    let samples = stream.stop();
    let held = fleet.stop();
    eprintln!(
        "drain of {} (carrying {carried} of 30 keep-alive connections): 2 next hops after {drain_convergence:.0?}; \
         undrain: 3 next hops after {undrain_convergence:.0?}, its counters rising after \
         {rising:.0?}; {} requests on new connections, {} on keep-alive ones, slowest {:.0?}",
        c.nodes[v].name,
        samples.len(),
        held.iter().map(|h| h.requests).sum::<u64>(),
        held.iter().map(|h| h.slowest).max().unwrap_or_default()
    );
    let broken: Vec<_> = held.iter().filter(|h| h.failure.is_some()).collect();
    assert!(broken.is_empty(), "keep-alive connections failed: {broken:#?}");
    assert!(failures(&samples).is_empty(), "new connections failed: {:?}", failures(&samples));
}

#[test]
fn a_vip_without_healthy_backends_is_withdrawn_by_every_node() {
    let web = HaVip::new("web", VIP, 80, [0, 1]);
    let api = HaVip::new("api", VIP_2, 80, [2, 3]);
    let c = group(4, &[web.clone(), api.clone()]);
    let stream = RequestStream::start(&c.client, web.target(), Duration::from_millis(20), 100_000);

    let killed_at = Instant::now();
    c.kill_server(2);
    c.kill_server(3);
    ok(c.wait_nexthops(VIP_2, 0, WAIT));
    let withdrawn = killed_at.elapsed();
    for i in 0..NODES {
        let s = ok(c.wait_status(i, WAIT, "api withdrawn", |s| route(s, &prefix(VIP_2)).is_some_and(|r| !r.0)));
        assert_eq!(route(&s, &prefix(VIP_2)), Some((false, "no healthy backend".to_string())), "{}", s["bgp"]);
        assert_eq!(route(&s, &prefix(VIP)), Some((true, "healthy backends".to_string())), "{}", s["bgp"]);
    }
    let web_hops: Vec<Ipv4Addr> = c.nexthops(VIP);
    assert_eq!(web_hops.len(), NODES, "web keeps every node: {web_hops:?}");

    // A server of api comes back: every node announces it again.
    let restarted_at = Instant::now();
    ok(c.start_server(2));
    ok(c.wait_nexthops(VIP_2, NODES, WAIT));
    let announced = restarted_at.elapsed();
    let (_, b) = ok(get_once(&c.client, api.target(), REQUEST_TIMEOUT));
    assert_eq!(b, "b3");
    let samples = stream.stop();
    eprintln!(
        "api's servers killed: the router dropped {VIP_2} after {withdrawn:.0?}; one restarted: 3 next hops again \
         after {announced:.0?}; web: {} requests, {} failed",
        samples.len(),
        failures(&samples).len()
    );
    assert!(failures(&samples).is_empty(), "web failed meanwhile: {:?}", failures(&samples));
}

/// Whether process `pid` runs (a zombie, exited but not yet reaped, does not).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

#[test]
fn a_stopping_node_withdraws_its_routes_before_it_exits() {
    let web = HaVip::new("web", VIP, 80, 0..3);
    let c = group(3, std::slice::from_ref(&web));
    let target = web.target();
    let fleet = ok(KeepAliveFleet::start(&c.client, target, 30, Duration::from_millis(100), REQUEST_TIMEOUT));
    let stream = RequestStream::start(&c.client, target, Duration::from_millis(20), 100_000);
    std::thread::sleep(Duration::from_secs(1));
    // lb1 runs with --ephemeral, as a newcomer does under `ip netns exec`: its
    // XDP program goes with the process. Withdraw first, exit (detach) after.
    let name = c.nodes[0].name.clone();
    let pid = c.pid(&format!("xdplb-{name}")).expect("lb1's xdplb runs");
    let stopped_at = Instant::now();
    // SAFETY: kill(2) sends a signal to a process this test started; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    ok(c.wait_nexthops(VIP, NODES - 1, WAIT));
    let withdrawn = stopped_at.elapsed();
    assert!(running(pid), "{name}'s xdplb exited before the router lost its route\n{}", c.xdplb_log(0));
    assert!(!c.nexthops(VIP).contains(&c.nodes[0].addr));
    let exited = eventually(|| !running(pid));
    assert!(exited.is_some(), "{name}'s xdplb did not exit after SIGTERM\n{}", c.xdplb_log(0));
    let exit = stopped_at.elapsed();
    let log = c.xdplb_log(0);
    assert!(log.contains("every route withdrawn"), "{log}");
    std::thread::sleep(Duration::from_secs(1));
    let samples = stream.stop();
    let held = fleet.stop();
    eprintln!(
        "SIGTERM to {name}: the router had 2 next hops after {withdrawn:.0?}, xdplb exited after {exit:.0?} \
         (withdraw_wait 1s); {} requests on new connections, {} failed; {} keep-alive connections, {} broken",
        samples.len(),
        failures(&samples).len(),
        held.len(),
        held.iter().filter(|h| h.failure.is_some()).count()
    );
    let broken: Vec<_> = held.iter().filter(|h| h.failure.is_some()).collect();
    assert!(broken.is_empty(), "keep-alive connections failed: {broken:#?}");
    assert!(failures(&samples).is_empty(), "new connections failed: {:?}", failures(&samples));
}

/// Polls `done` every 20 ms for up to `WAIT`.
fn eventually(mut done: impl FnMut() -> bool) -> Option<()> {
    tests::ha::wait_for(WAIT, Duration::from_millis(20), || done().then_some(()))
}
