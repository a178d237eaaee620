//! Whole-map walks (flows per backend, NAT collection) run off the
//! controller's event loop: with a million tracked flows, a signal that
//! arrives while the table is being counted is handled before the count
//! ends, and the count never exceeds the table's capacity.

use std::{os::fd::AsFd as _, time::Duration};

use lb_common::maps::{FlowKey, FlowValue};
use lb_userspace::{
    dataplane::{Dataplane, MapSizes},
    walks::{Walked, Walker, census_flows, insert_batched},
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
            (key, FlowValue { backend_id: i % 100, generation: 1, hash: i, _pad: 0 })
        })
        .collect()
}

#[test]
fn a_signal_is_handled_while_a_million_flows_are_counted() {
    let dp = Dataplane::load(MapSizes::default()).unwrap();
    let capacity = dp.sizes().conntrack;
    let maps = dp.walk_maps().unwrap();
    let written = insert_batched(maps.flows.fd().as_fd(), &flows(FLOWS)).unwrap();
    assert_eq!(written, FLOWS as usize);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (order, census) = rt.block_on(async {
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
                Some(s) = signals.recv() => order.push(s),
                Some(w) = walked.recv() => {
                    order.push("counted");
                    if let Walked::Flows(c) = w { census = Some(c) }
                }
            }
        }
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
    insert_batched(maps.flows.fd().as_fd(), &flows(20_000)).unwrap();
    let census = census_flows(&maps.flows, 10_000, Duration::from_secs(60)).unwrap();
    assert_eq!(census.total, 10_000);
    assert_eq!(census.by_backend.values().sum::<u64>(), 10_000);
}
