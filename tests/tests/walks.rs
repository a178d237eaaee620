//! Whole-map walks (flows per backend, NAT collection) run off the
//! controller's event loop: with a million tracked flows, a signal that
//! arrives while the table is being counted is handled before the count
//! ends, and the count never exceeds the table's capacity.

use std::time::{Duration, Instant};

use aya::maps::IterableMap as _;
use lb_common::maps::{FlowKey, FlowValue, NAT_OPEN, NatFlow, NatReply};
use lb_userspace::{
    config::NatSettings,
    dataplane::{Dataplane, MapSizes},
    walks::{Walked, Walker, census_flows, for_each_batched, insert_batched, sweep_nat},
};
use tokio::sync::mpsc;

const FLOWS: u32 = 1_000_000;

fn flows(n: u32) -> Vec<(FlowKey, FlowValue)> {
    (0..n)
        .map(|i| {
            let key = FlowKey {
                src: [0xc612_0000 | (i >> 16), 0, 0, 0],
                dst: [0xc612_ff01, 0, 0, 0],
                sport: i as u16,
                dport: 80,
                protocol: 6,
                family: 4,
                _pad: [0; 2],
            };
            (key, FlowValue { backend_id: i % 100, generation: 1, hash: i, last_seen_s: 0 })
        })
        .collect()
}

#[test]
fn a_signal_is_handled_while_a_million_flows_are_counted() {
    let dp = Dataplane::load(MapSizes::default()).unwrap();
    let capacity = dp.sizes().conntrack;
    let maps = dp.walk_maps().unwrap();
    let written = insert_batched(&maps.flows, &flows(FLOWS)).unwrap();
    assert_eq!(written, FLOWS as usize);
    // One blocking thread, held by a gate the signal opens: a count run on
    // the blocking pool cannot end before the signal is handled, and one run
    // on the loop itself (or waited for) has ended before the select starts.
    let rt = tokio::runtime::Builder::new_current_thread().max_blocking_threads(1).enable_all().build().unwrap();
    let (order, census) = rt.block_on(async {
        let (gate, gated) = std::sync::mpsc::channel::<()>();
        let held = tokio::task::spawn_blocking(move || gated.recv());
        let (walker, mut walked) = Walker::new(maps);
        let (signal, mut signals) = mpsc::unbounded_channel();
        assert!(walker.census(Duration::from_secs(120)), "no count started");
        assert!(!walker.census(Duration::from_secs(120)), "a second count started while one runs");
        // The loop's next event, arriving while the table is being walked.
        signal.send("SIGHUP").unwrap();
        let mut order = Vec::new();
        let mut census = None;
        while census.is_none() {
            tokio::select! {
                // The walk's result first: had the count already ended, it wins.
                biased;
                Some(w) = walked.recv() => {
                    order.push("counted");
                    if let Walked::Flows(c) = w { census = Some(c) }
                }
                Some(s) = signals.recv() => {
                    order.push(s);
                    assert!(!walker.census(Duration::from_secs(120)), "the count was over when the signal was handled");
                    gate.send(()).unwrap();
                }
            }
        }
        // Open the gate however the loop ended (a wrong order fails below).
        drop(gate);
        let _ = held.await;
        (order, census.unwrap())
    });
    assert_eq!(order, ["SIGHUP", "counted"], "the signal waited for the walk");
    assert!(census.complete, "the count did not reach the end of the table");
    assert!(census.total <= u64::from(capacity), "{} flows counted in a table of {capacity}", census.total);
    // The LRU may have evicted a few while it filled; most are there.
    assert!(census.total > u64::from(FLOWS) * 9 / 10, "only {} of {FLOWS} flows counted", census.total);
    assert_eq!(census.by_backend.values().sum::<u64>(), census.total);
}

#[test]
fn a_flow_count_stops_at_the_tables_capacity() {
    let dp = Dataplane::load(MapSizes::default()).unwrap();
    let maps = dp.walk_maps().unwrap();
    insert_batched(&maps.flows, &flows(20_000)).unwrap();
    let census = census_flows(&maps.flows, 10_000, Duration::from_secs(60)).unwrap();
    assert_eq!(census.total, 10_000);
    assert_eq!(census.by_backend.values().sum::<u64>(), 10_000);
    assert!(!census.complete, "a table holding more than its capacity counted as complete");
}

#[test]
fn a_full_table_read_to_its_end_is_complete() {
    let dp = Dataplane::load(MapSizes::default()).unwrap();
    let maps = dp.walk_maps().unwrap();
    insert_batched(&maps.flows, &flows(20_000)).unwrap();
    // However many the LRU kept: a table holding exactly its capacity.
    let held = census_flows(&maps.flows, u32::MAX, Duration::from_secs(60)).unwrap();
    assert!(held.complete);
    let census = census_flows(&maps.flows, held.total as u32, Duration::from_secs(60)).unwrap();
    assert_eq!(census.total, held.total);
    assert!(census.complete, "a full read of a table of {} flows counted as partial", held.total);
}

#[test]
fn batched_access_refuses_a_map_of_other_sizes() {
    let dp = Dataplane::load(MapSizes::default()).unwrap();
    let maps = dp.walk_maps().unwrap();
    // FLOWS holds FlowValue (16 bytes), not NatReply (48): the kernel would
    // write BATCH × 48 bytes of keys and values into buffers of BATCH × 16.
    let err = for_each_batched::<FlowKey, NatReply>(&maps.flows, Instant::now() + Duration::from_secs(60), |_, _| true)
        .unwrap_err();
    assert!(format!("{err:#}").contains("-byte values"), "{err:#}");
    let wider = [(FlowKey::default(), NatFlow::default())];
    assert!(insert_batched(&maps.flows, &wider).is_err(), "a write of another value size was accepted");
    // NAT_FLOWS's values are NatFlow: the same walk there is fine.
    assert!(for_each_batched::<FlowKey, NatFlow>(maps.nat.nat_flows.map(), Instant::now(), |_, _| true).unwrap());
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime(2) writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[test]
fn a_nat_sweep_cut_short_keeps_connections_whose_server_talks() {
    const CONNECTIONS: u32 = 50_000;
    let dp = Dataplane::load(MapSizes::default()).unwrap();
    let mut maps = dp.walk_maps().unwrap();
    let now = monotonic_ns();
    let nat = NatSettings { tcp_timeout: Duration::from_secs(60), ..NatSettings::default() };
    assert!(now > 2 * nat.tcp_timeout.as_nanos() as u64, "booted too recently for this test");
    // Backend 0 (an all-zero slot, generation 0) serves every connection;
    // the clients went quiet at boot, the server answered just now.
    let (mut forward, mut reverse) = (Vec::new(), Vec::new());
    for i in 0..CONNECTIONS {
        let key = FlowKey {
            src: [0x0a00_0000 | i, 0, 0, 0],
            dst: [0xc612_ff01, 0, 0, 0],
            sport: i as u16,
            dport: 80,
            protocol: 6,
            family: 4,
            _pad: [0; 2],
        };
        let reply = FlowKey { src: [0; 4], dst: key.src, sport: key.dport, dport: key.sport, ..key };
        forward.push((key, NatFlow { last_seen_ns: 1, state: NAT_OPEN, ..NatFlow::default() }));
        reverse.push((reply, NatReply { last_seen_ns: now, state: NAT_OPEN, ..NatReply::default() }));
    }
    assert_eq!(insert_batched(maps.nat.nat_flows.map(), &forward).unwrap(), CONNECTIONS as usize);
    assert_eq!(insert_batched(maps.nat.nat_reverse.map(), &reverse).unwrap(), CONNECTIONS as usize);
    // A spent budget: each table's read stops after its first batch.
    let sweep = sweep_nat(&mut maps.nat, &nat, Duration::ZERO).unwrap();
    assert!(!sweep.complete, "the reads were not cut short: the test proves nothing");
    assert_eq!((sweep.evicted_idle, sweep.evicted_closed), (0, 0), "live connections evicted: {sweep:?}");
    assert!(sweep.connections > 0);
    assert_eq!(maps.nat.nat_flows.keys().count(), CONNECTIONS as usize);
    assert_eq!(maps.nat.nat_reverse.keys().count(), CONNECTIONS as usize);
}
