//! The benchmarks' restore wrapper (`xdplb_bench_restore`, never attached):
//! its flood mode must give every run of a `repeat` call another client,
//! with checksums a receiver accepts, or the flood benchmark measures one
//! flow over and over. Checked on what the balancer itself reports: the
//! traced balancer runs behind the wrapper, and its trace holds every
//! frame as it left XDP and the flow as it was parsed.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr},
};

use aya::maps::{MapData, RingBuf};
use lb_common::maps::programs;
use lb_userspace::{addr, reconcile::Forwarding, trace};
use tests::{
    harness::{Engine, XDP_TX, trace_events, vip},
    packets::{self, L4, frame},
    restore::Restore,
};

const BACKENDS: [(&str, u32); 3] = [("198.18.1.1", 1), ("198.18.1.2", 1), ("198.18.1.3", 1)];
/// Runs per call: few enough that their trace records fit the object's small ring.
const REPEAT: u32 = 4;
const CALLS: usize = 250;

/// `calls` calls of the wrapper with `repeat = REPEAT`; every frame the
/// traced balancer sent, with the source it parsed (address, port).
fn run(e: &mut Engine, ring: &mut RingBuf<MapData>, template: &[u8], calls: usize) -> Vec<(Vec<u8>, [u32; 4], u16)> {
    use aya::programs::{TestRun as _, TestRunOptions};
    let mut seen = Vec::new();
    for _ in 0..calls {
        let p = e.dp.program(programs::BENCH_RESTORE).unwrap();
        let mut out = vec![0u8; template.len() + 256];
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(template),
                data_out: Some(&mut out),
                repeat: REPEAT,
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        assert_eq!(r.return_value, XDP_TX, "the wrapper ran the balancer, which forwarded");
        let events = trace_events(ring);
        assert_eq!(events.len(), REPEAT as usize, "one trace record per run");
        for (ev, bytes) in events {
            assert_eq!(ev.action, XDP_TX);
            seen.push((bytes, ev.flow.src, u16::from_be(ev.flow.sport)));
        }
    }
    assert_eq!(e.dp.trace_lost().unwrap(), 0, "no record lost");
    seen
}

#[test]
fn flood_mode_gives_every_run_another_source_with_valid_checksums() {
    for (l4, port) in [(L4::Tcp, 80), (L4::Udp, 53)] {
        let what = format!("{l4:?}");
        let mut e = Engine::new();
        let s = vip("v", "198.18.0.100", port, l4, Forwarding::Dsr, &BACKENDS);
        e.apply(std::slice::from_ref(&s));
        let mut ring = e.start_trace(&trace::Filter::default());
        let mut restore = Restore::load(&mut e);
        let client: IpAddr = "198.18.128.1".parse().unwrap();
        let template = frame(l4, client, 40_000, s.addr, port);
        restore.set(&mut e, programs::TRACED, &template);

        // Off (the mode's default): every run is the saved frame.
        for (bytes, src, sport) in run(&mut e, &mut ring, &template, 2) {
            assert_eq!(bytes[14..], template[14..], "{what}: the IP packet as saved");
            assert_eq!((src, sport), (addr::words(client), 40_000));
        }

        // On: every run another source, everything else as saved.
        restore.vary_source(Some(0xc0ff_ee00));
        let seen = run(&mut e, &mut ring, &template, CALLS);
        let mut sources = HashSet::new();
        for (bytes, src, sport) in &seen {
            assert_eq!(bytes.len(), template.len(), "{what}");
            let ip = &bytes[14..];
            assert!(packets::ipv4_header_ok(ip), "{what}: IPv4 header checksum of {ip:02x?}");
            assert!(packets::l4_checksum_ok(ip), "{what}: transport checksum of {ip:02x?}");
            let from = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
            let from_port = u16::from_be_bytes([ip[20], ip[21]]);
            assert_eq!((addr::words(IpAddr::V4(from)), from_port), (*src, *sport), "{what}: what the balancer parsed");
            assert_eq!(from.octets()[..2], [198, 19], "{what}: {from} is in 198.19.0.0/16");
            // Destination, ports, lengths and payload untouched (the source
            // address, its port and the checksums aside).
            let mut a = ip.to_vec();
            let mut b = template[14..].to_vec();
            for f in [&mut a, &mut b] {
                f[10..16].fill(0);
                f[20..22].fill(0);
                let check = if l4 == L4::Tcp { 36 } else { 26 };
                f[check..check + 2].fill(0);
            }
            assert_eq!(a, b, "{what}: only the source changes");
            sources.insert((from, from_port));
        }
        assert_eq!(sources.len(), seen.len(), "{what}: {} runs, {} distinct sources", seen.len(), sources.len());

        // Back off: the saved frame again.
        restore.vary_source(None);
        for (bytes, _, _) in run(&mut e, &mut ring, &template, 1) {
            assert_eq!(bytes[14..], template[14..], "{what}: off again");
        }
    }
}
