//! The XDP forwarding engine, proven packet by packet: the real eBPF object
//! in the real kernel, driven with BPF_PROG_TEST_RUN; every output frame is
//! checked byte for byte and its checksums verified independently.

use std::net::IpAddr;

use lb_common::{
    maps::programs,
    reasons,
    trace::{
        TRACE_F_BACKEND, TRACE_F_FLOW, TRACE_F_MAGLEV, TRACE_F_NAT_REPLY, TRACE_F_VIP, TRACE_F_VIP_ADDR, TRACE_NONE,
        TRACE_SNAPLEN,
    },
};
use lb_userspace::{
    addr,
    reconcile::{Forwarding, HashMode, VipSpec},
    trace,
};
use tests::{
    harness::{Engine, MTU, XDP_DROP, XDP_PASS, XDP_TX, backend_mac, backend_of, trace_events, vip},
    packets::{self, L4, LB_MAC, frame},
};

const VIP4: &str = "198.18.0.100";
const VIP6: &str = "2001:db8::100";
const BACKENDS4: [(&str, u32); 3] = [("198.18.1.1", 1), ("198.18.1.2", 1), ("198.18.1.3", 1)];
const BACKENDS6: [(&str, u32); 3] = [("2001:db8:1::1", 1), ("2001:db8:1::2", 1), ("2001:db8:1::3", 1)];

fn client(v6: bool, i: u32) -> IpAddr {
    if v6 {
        format!("2001:db8:c::{:x}", i + 1).parse().unwrap()
    } else {
        format!("198.18.{}.{}", 128 + (i >> 8) % 64, i & 0xff).parse().unwrap()
    }
}

fn spec(v6: bool, l4: L4, fwd: Forwarding) -> VipSpec {
    let port = if l4 == L4::Tcp { 80 } else { 53 };
    if v6 { vip("web6", VIP6, port, l4, fwd, &BACKENDS6) } else { vip("web4", VIP4, port, l4, fwd, &BACKENDS4) }
}

/// Sends one client frame to the VIP and checks the transmitted frame exactly.
fn forwards_exactly(v6: bool, l4: L4, fwd: Forwarding) {
    let mut e = Engine::new();
    let s = spec(v6, l4, fwd);
    e.apply(std::slice::from_ref(&s));
    let src = client(v6, 7);
    let input = frame(l4, src, 40_000, s.addr, s.port);
    let out = e.run(&input);
    assert_eq!(out.action, XDP_TX, "{v6} {l4:?} {fwd:?}: VIP traffic is transmitted");
    let want = e.predicted_backend(&s, src, 40_000);
    let backend = &s.backends[want];
    assert_eq!(backend_of(&out.frame), want, "the backend Maglev predicts in userspace");
    assert_eq!(out.frame[0..6], backend_mac(want), "destination MAC: the backend's");
    assert_eq!(out.frame[6..12], LB_MAC, "source MAC: the load balancer's");

    match fwd {
        Forwarding::Dsr => {
            // The IP packet is untouched.
            assert_eq!(out.frame.len(), input.len());
            assert_eq!(out.frame[12..], input[12..]);
        }
        Forwarding::Ipip => {
            let inner = &input[14..];
            if v6 {
                assert_eq!(out.frame[12..14], [0x86, 0xdd]);
                let outer = &out.frame[14..54];
                assert_eq!(outer[0] >> 4, 6, "version");
                assert_eq!(u16::from_be_bytes([outer[4], outer[5]]) as usize, inner.len(), "payload length");
                assert_eq!(outer[6], 41, "next header: IPv6");
                assert_eq!(outer[7], 64, "hop limit");
                assert_eq!(outer[8..20], "2001:db8:ffff::".parse::<std::net::Ipv6Addr>().unwrap().octets()[..12]);
                let IpAddr::V6(dst) = backend.addr else { unreachable!() };
                assert_eq!(outer[24..40], dst.octets(), "outer destination: the backend");
                assert_eq!(&out.frame[54..], inner, "the inner packet is carried whole");
            } else {
                assert_eq!(out.frame[12..14], [0x08, 0x00]);
                let outer = &out.frame[14..34];
                assert_eq!(outer[0], 0x45);
                assert_eq!(u16::from_be_bytes([outer[2], outer[3]]) as usize, inner.len() + 20, "total length");
                assert_eq!(outer[8], 64, "ttl");
                assert_eq!(outer[9], 4, "protocol: IPIP");
                assert!(packets::ipv4_header_ok(outer), "outer header checksum");
                assert_eq!(outer[12..14], [198, 19], "outer source in 198.19.0.0/16");
                let IpAddr::V4(dst) = backend.addr else { unreachable!() };
                assert_eq!(outer[16..20], dst.octets(), "outer destination: the backend");
                assert_eq!(&out.frame[34..], inner, "the inner packet is carried whole");
            }
        }
        Forwarding::Nat => unreachable!("NAT has its own tests below"),
    }
    let ip = &out.frame[out.frame.len() - (input.len() - 14)..];
    if !v6 {
        assert!(packets::ipv4_header_ok(ip));
    }
    assert!(packets::l4_checksum_ok(ip), "inner transport checksum still valid");
    let r = e.reasons();
    assert_eq!((r[reasons::TX as usize], r[reasons::CONNTRACK_MISS as usize]), (1, 1));
}

#[test]
fn tcp4_dsr() {
    forwards_exactly(false, L4::Tcp, Forwarding::Dsr);
}
#[test]
fn udp4_dsr() {
    forwards_exactly(false, L4::Udp, Forwarding::Dsr);
}
#[test]
fn tcp6_dsr() {
    forwards_exactly(true, L4::Tcp, Forwarding::Dsr);
}
#[test]
fn udp6_dsr() {
    forwards_exactly(true, L4::Udp, Forwarding::Dsr);
}
#[test]
fn tcp4_ipip() {
    forwards_exactly(false, L4::Tcp, Forwarding::Ipip);
}
#[test]
fn udp4_ipip() {
    forwards_exactly(false, L4::Udp, Forwarding::Ipip);
}
#[test]
fn tcp6_ipip() {
    forwards_exactly(true, L4::Tcp, Forwarding::Ipip);
}
#[test]
fn udp6_ipip() {
    forwards_exactly(true, L4::Udp, Forwarding::Ipip);
}

#[test]
fn ipip_outer_source_follows_the_flow() {
    let mut e = Engine::new();
    let s = spec(false, L4::Tcp, Forwarding::Ipip);
    e.apply(std::slice::from_ref(&s));
    let mut sources = std::collections::HashSet::new();
    for port in 0..64u16 {
        let out = e.run(&frame(L4::Tcp, client(false, 1), 30_000 + port, s.addr, 80));
        assert_eq!(out.action, XDP_TX);
        sources.insert(out.frame[26..30].to_vec());
        // The same flow always gets the same outer source.
        let again = e.run(&frame(L4::Tcp, client(false, 1), 30_000 + port, s.addr, 80));
        assert_eq!(again.frame[26..30], out.frame[26..30]);
    }
    assert!(sources.len() > 56, "64 flows should use (nearly) 64 outer sources, got {}", sources.len());
}

#[test]
fn decap_restores_the_original_frame() {
    for v6 in [false, true] {
        let mut e = Engine::new();
        let s = spec(v6, L4::Tcp, Forwarding::Ipip);
        e.apply(std::slice::from_ref(&s));
        let input = frame(L4::Tcp, client(v6, 3), 5555, s.addr, 80);
        let encapsulated = e.run(&input);
        assert_eq!(encapsulated.action, XDP_TX);
        let out = e.run_program(programs::DECAP, &encapsulated.frame);
        assert_eq!(out.action, XDP_PASS);
        assert_eq!(out.frame[12..], input[12..], "v6={v6}: inner frame restored");
        assert_eq!(out.frame[0..12], encapsulated.frame[0..12], "MACs as received");
        // Anything else passes untouched.
        let plain = e.run_program(programs::DECAP, &input);
        assert_eq!((plain.action, &plain.frame), (XDP_PASS, &input));
        assert_eq!(e.dp.decap_counters().unwrap(), (1, 1));
    }
}

#[test]
fn non_vip_traffic_passes_untouched() {
    let mut e = Engine::new();
    let s = spec(false, L4::Tcp, Forwarding::Dsr);
    let s6 = spec(true, L4::Tcp, Forwarding::Dsr);
    e.apply(&[s.clone(), s6.clone()]);
    let c = client(false, 1);
    let c6 = client(true, 1);
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&packets::CLIENT_MAC);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&[0; 18]);
    // A VIP packet in a frame for another host's MAC: a switch flooded it (the
    // MAC table missed, or the other node of a pair just died) or the NIC is
    // promiscuous. The node it is addressed to serves it; forwarding it here
    // too would hand the backend a duplicate.
    let mut elsewhere = frame(L4::Tcp, c, 1234, s.addr, 80);
    elsewhere[0..6].copy_from_slice(&[0x02, 0x1b, 0, 0, 0, 0x02]);
    let mut elsewhere6 = frame(L4::Tcp, c6, 1234, s6.addr, 80);
    elsewhere6[0..6].copy_from_slice(&[0x02, 0x1b, 0, 0, 0, 0x02]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a VIP packet for another host's MAC", elsewhere),
        ("an IPv6 VIP packet for another host's MAC", elsewhere6),
        ("another address", frame(L4::Tcp, c, 1234, "198.18.0.200".parse().unwrap(), 80)),
        ("the VIP address on another port", frame(L4::Tcp, c, 1234, s.addr, 22)),
        ("the VIP's port over UDP", frame(L4::Udp, c, 1234, s.addr, 80)),
        ("IPv6, another address", frame(L4::Tcp, c6, 1234, "2001:db8::200".parse().unwrap(), 80)),
        ("IPv6, the VIP address on another port", frame(L4::Tcp, c6, 1234, s6.addr, 443)),
        ("ARP", arp),
    ];
    for (what, input) in &cases {
        let out = e.run(input);
        assert_eq!(out.action, XDP_PASS, "{what}");
        assert_eq!(&out.frame, input, "{what}: byte for byte untouched");
    }
    let r = e.reasons();
    assert_eq!(r[reasons::PASS_NOT_VIP as usize], cases.len() as u64);
    assert_eq!(r.iter().sum::<u64>(), cases.len() as u64, "one reason per packet");
}

#[test]
fn icmp_to_a_vip_address_passes_to_the_host() {
    let mut e = Engine::new();
    let s = spec(false, L4::Tcp, Forwarding::Dsr);
    e.apply(std::slice::from_ref(&s));
    let mut ping = Vec::new();
    let IpAddr::V4(v) = s.addr else { unreachable!() };
    etherparse::PacketBuilder::ethernet2(packets::CLIENT_MAC, LB_MAC)
        .ipv4([198, 18, 128, 1], v.octets(), 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut ping, b"ping")
        .unwrap();
    let out = e.run(&ping);
    assert_eq!((out.action, &out.frame), (XDP_PASS, &ping));
    assert_eq!(e.reasons()[reasons::PASS_VIP_OTHER_PROTO as usize], 1);
}

/// Every cut inside the Ethernet, IP and transport headers: never forwarded,
/// each counted once; a cut IP header passes (not recognisably VIP traffic),
/// a cut transport header to a VIP address is dropped.
#[test]
fn truncated_at_every_header_boundary() {
    for v6 in [false, true] {
        for l4 in [L4::Tcp, L4::Udp] {
            let mut e = Engine::new();
            let s = spec(v6, l4, Forwarding::Dsr);
            e.apply(std::slice::from_ref(&s));
            let full = frame(l4, client(v6, 1), 1000, s.addr, s.port);
            let ip_end = if v6 { 54 } else { 34 };
            let l4_end = ip_end + if l4 == L4::Tcp { 20 } else { 8 };
            let (mut passed, mut dropped) = (0u64, 0u64);
            // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header.
            for len in 14..l4_end {
                let cut = &full[..len];
                let out = e.run(cut);
                if len < ip_end {
                    assert_eq!(out.action, XDP_PASS, "v6={v6} {l4:?} cut at {len}");
                    assert_eq!(out.frame, cut, "passed untouched");
                    passed += 1;
                } else {
                    assert_eq!(out.action, XDP_DROP, "v6={v6} {l4:?} cut at {len}");
                    dropped += 1;
                }
            }
            let r = e.reasons();
            assert_eq!(r[reasons::PASS_MALFORMED_L3 as usize], passed);
            assert_eq!(r[reasons::DROP_MALFORMED_L4 as usize], dropped);
            assert_eq!(r[reasons::TX as usize], 0);
            // The whole transport header is enough.
            assert_eq!(e.run(&full[..l4_end]).action, XDP_TX);
        }
    }
}

#[test]
fn malformed_ipv4_headers_pass_untouched() {
    let mut e = Engine::new();
    let s = spec(false, L4::Tcp, Forwarding::Dsr);
    e.apply(std::slice::from_ref(&s));
    let good = frame(L4::Tcp, client(false, 1), 1000, s.addr, 80);
    for (what, len, value) in
        [("IHL 4", good.len(), 0x44u8), ("version 5", good.len(), 0x55), ("IHL 15 beyond the frame", 60, 0x4f)]
    {
        let mut bad = good[..len].to_vec();
        bad[14] = value;
        let out = e.run(&bad);
        assert_eq!((out.action, &out.frame), (XDP_PASS, &bad), "{what}");
    }
    assert_eq!(e.reasons()[reasons::PASS_MALFORMED_L3 as usize], 3);
}

#[test]
fn ipv4_options_are_skipped() {
    for fwd in [Forwarding::Dsr, Forwarding::Ipip] {
        let mut e = Engine::new();
        let s = spec(false, L4::Tcp, fwd);
        e.apply(std::slice::from_ref(&s));
        // Router alert (4 bytes), then 36 more bytes of NOPs + EOL: IHL 5..15.
        for extra_words in 1..=10usize {
            let mut opts = vec![0x94, 0x04, 0, 0];
            opts.resize(extra_words * 4, 1);
            *opts.last_mut().unwrap() = 0;
            let sport = 2000 + extra_words as u16;
            let input = packets::with_ipv4_options(&frame(L4::Tcp, client(false, 2), sport, s.addr, 80), &opts);
            let out = e.run(&input);
            assert_eq!(out.action, XDP_TX, "{} option words", extra_words);
            assert_eq!(backend_of(&out.frame), e.predicted_backend(&s, client(false, 2), sport));
            assert_eq!(out.frame[out.frame.len() - (input.len() - 14)..], input[14..], "inner packet intact");
            if fwd == Forwarding::Ipip {
                assert!(packets::ipv4_header_ok(&out.frame[14..]));
                assert_eq!(u16::from_be_bytes([out.frame[16], out.frame[17]]) as usize, input.len() - 14 + 20);
            }
        }
    }
}

#[test]
fn ipv6_extension_headers_are_walked() {
    let mut e = Engine::new();
    let s = spec(true, L4::Tcp, Forwarding::Dsr);
    e.apply(std::slice::from_ref(&s));
    let base = frame(L4::Tcp, client(true, 4), 4444, s.addr, 80);
    let hop = packets::with_ipv6_ext(&base, 0);
    let hop_dst = packets::with_ipv6_ext(&hop, 60);
    for input in [hop, hop_dst] {
        assert!(packets::l4_checksum_ok(&input[14..]));
        let out = e.run(&input);
        assert_eq!(out.action, XDP_TX);
        assert_eq!(backend_of(&out.frame), e.predicted_backend(&s, client(true, 4), 4444));
        assert_eq!(out.frame[12..], input[12..]);
    }
    // Five extension headers: more than the dataplane walks, dropped.
    let mut long = base.clone();
    for _ in 0..5 {
        long = packets::with_ipv6_ext(&long, 60);
    }
    assert_eq!(e.run(&long).action, XDP_DROP);
    assert_eq!(e.reasons()[reasons::DROP_MALFORMED_L4 as usize], 1);
}

#[test]
fn fragments_to_a_vip_are_dropped_and_counted() {
    let mut e = Engine::new();
    let s = spec(false, L4::Udp, Forwarding::Dsr);
    let s6 = spec(true, L4::Udp, Forwarding::Dsr);
    e.apply(&[s.clone(), s6.clone()]);
    let f = frame(L4::Udp, client(false, 1), 1000, s.addr, 53);
    let first = packets::as_ipv4_fragment(&f, 0x2000); // more fragments, offset 0
    let later = packets::as_ipv4_fragment(&f, 0x00b9); // offset 185 * 8, last
    let f6 = packets::with_ipv6_ext(&frame(L4::Udp, client(true, 1), 1000, s6.addr, 53), 44);
    for input in [&first, &later, &f6] {
        assert_eq!(e.run(input).action, XDP_DROP);
    }
    assert_eq!(e.reasons()[reasons::DROP_FRAGMENT as usize], 3);
    // Fragments to other hosts are not ours to judge.
    let other =
        packets::as_ipv4_fragment(&frame(L4::Udp, client(false, 1), 1000, "198.18.0.9".parse().unwrap(), 53), 0x2000);
    let out = e.run(&other);
    assert_eq!((out.action, &out.frame), (XDP_PASS, &other));
    // Nor are VIP fragments in frames for another host's MAC: that host judges them.
    let mut elsewhere = first.clone();
    elsewhere[0..6].copy_from_slice(&[0x02, 0x1b, 0, 0, 0, 0x02]);
    let out = e.run(&elsewhere);
    assert_eq!((out.action, &out.frame), (XDP_PASS, &elsewhere));
    assert_eq!(e.reasons()[reasons::DROP_FRAGMENT as usize], 3);
}

#[test]
fn source_ip_hashing_keeps_a_client_on_one_backend() {
    let mut e = Engine::new();
    let mut s = spec(false, L4::Tcp, Forwarding::Dsr);
    s.hash = HashMode::SourceIp;
    e.apply(std::slice::from_ref(&s));
    let mut seen_for_clients = std::collections::HashSet::new();
    for c in 0..60 {
        let src = client(false, c);
        let want = e.predicted_backend(&s, src, 0);
        for port in 0..20u16 {
            let out = e.run(&frame(L4::Tcp, src, 10_000 + port * 7, s.addr, 80));
            assert_eq!(backend_of(&out.frame), want, "client {src} port {port}");
        }
        seen_for_clients.insert(want);
    }
    assert_eq!(seen_for_clients.len(), 3, "clients spread over all backends");
}

#[test]
fn conntrack_keeps_flows_across_table_changes() {
    let mut e = Engine::new();
    let s = vip("web", VIP4, 80, L4::Tcp, Forwarding::Dsr, &BACKENDS4[..2]);
    e.apply(std::slice::from_ref(&s));
    let flows: Vec<(IpAddr, u16)> = (0..300).map(|i| (client(false, i), 20_000 + i as u16)).collect();
    let first: Vec<usize> =
        flows.iter().map(|&(c, p)| backend_of(&e.run(&frame(L4::Tcp, c, p, s.addr, 80)).frame)).collect();

    // Add a third backend: Maglev would move about a third of new flows to it.
    let grown = vip("web", VIP4, 80, L4::Tcp, Forwarding::Dsr, &BACKENDS4);
    e.apply(std::slice::from_ref(&grown));
    let mut would_move = 0;
    for (i, &(c, p)) in flows.iter().enumerate() {
        let out = e.run(&frame(L4::Tcp, c, p, s.addr, 80));
        assert_eq!(backend_of(&out.frame), first[i], "flow {i} keeps its backend");
        would_move += usize::from(e.predicted_backend(&grown, c, p) != first[i]);
    }
    assert!(would_move > 50, "the table change must matter for the test to mean anything ({would_move})");
    let r = e.reasons();
    assert_eq!(r[reasons::CONNTRACK_HIT as usize], 300);
    assert_eq!(r[reasons::CONNTRACK_MISS as usize], 300);
}

#[test]
fn a_removed_backend_never_gets_a_packet_again() {
    let mut e = Engine::new();
    let s = vip("web", VIP4, 80, L4::Tcp, Forwarding::Dsr, &BACKENDS4);
    e.apply(std::slice::from_ref(&s));
    let flows: Vec<(IpAddr, u16)> = (0..300).map(|i| (client(false, i), 20_000 + i as u16)).collect();
    let first: Vec<usize> =
        flows.iter().map(|&(c, p)| backend_of(&e.run(&frame(L4::Tcp, c, p, s.addr, 80)).frame)).collect();
    // Remove backend 1 (198.18.1.2): its flows are re-chosen among the rest;
    // the others keep theirs. The remaining backends keep their MACs.
    let shrunk = VipSpec { backends: vec![s.backends[0].clone(), s.backends[2].clone()], ..s.clone() };
    e.apply(std::slice::from_ref(&shrunk));
    let mut moved = 0;
    for (i, &(c, p)) in flows.iter().enumerate() {
        let got = backend_of(&e.run(&frame(L4::Tcp, c, p, s.addr, 80)).frame);
        assert_ne!(got, 1, "flow {i} reached the removed backend");
        if first[i] == 1 {
            moved += 1;
        } else {
            assert_eq!(got, first[i], "flow {i} on a surviving backend keeps it");
        }
    }
    assert!(moved > 50);
    assert_eq!(e.reasons()[reasons::CONNTRACK_STALE as usize], moved as u64);
}

#[test]
fn drain_keeps_established_flows_and_down_moves_them() {
    let mut e = Engine::new();
    let s = vip("web", VIP4, 80, L4::Tcp, Forwarding::Dsr, &BACKENDS4);
    e.apply(std::slice::from_ref(&s));
    let send = |e: &mut Engine, i: u32| backend_of(&e.run(&frame(L4::Tcp, client(false, i), 9000, s.addr, 80)).frame);
    let first: Vec<usize> = (0..200).map(|i| send(&mut e, i)).collect();

    let mut drained = s.clone();
    drained.backends[0].weight = 0;
    e.apply(std::slice::from_ref(&drained));
    for i in 0..200 {
        assert_eq!(send(&mut e, i), first[i as usize], "draining keeps flow {i}");
    }
    for i in 1000..1200 {
        assert_ne!(send(&mut e, i), 0, "no new flow to a draining backend");
    }

    let mut down = s.clone();
    down.backends[0].healthy = false;
    e.apply(std::slice::from_ref(&down));
    for i in 0..200 {
        let got = send(&mut e, i);
        assert_ne!(got, 0, "a down backend's flow {i} is re-steered");
        if first[i as usize] != 0 {
            assert_eq!(got, first[i as usize]);
        }
    }
}

#[test]
fn a_syn_reusing_a_drained_flow_is_rescheduled() {
    let mut e = Engine::new();
    let s = vip("web", VIP4, 80, L4::Tcp, Forwarding::Dsr, &BACKENDS4);
    e.apply(std::slice::from_ref(&s));
    // Flows that landed on backend 0, established.
    let on_0: Vec<u32> = (0..300).filter(|&i| e.predicted_backend(&s, client(false, i), 7000) == 0).take(20).collect();
    for &i in &on_0 {
        assert_eq!(backend_of(&e.run(&packets::syn(client(false, i), 7000, s.addr, 80)).frame), 0);
    }
    let mut drained = s.clone();
    drained.backends[0].weight = 0;
    e.apply(std::slice::from_ref(&drained));
    for &i in &on_0 {
        // Packets of the established connection still reach it...
        assert_eq!(backend_of(&e.run(&frame(L4::Tcp, client(false, i), 7000, s.addr, 80)).frame), 0);
        // ...but a new connection from a reused port does not.
        assert_ne!(backend_of(&e.run(&packets::syn(client(false, i), 7000, s.addr, 80)).frame), 0);
    }
    assert_eq!(e.reasons()[reasons::CONNTRACK_SYN_RESCHEDULED as usize], on_0.len() as u64);
}

#[test]
fn no_backend_drops_and_counts() {
    let mut e = Engine::new();
    let mut s = spec(false, L4::Tcp, Forwarding::Dsr);
    for b in &mut s.backends {
        b.healthy = false;
    }
    e.apply(std::slice::from_ref(&s));
    assert_eq!(e.run(&frame(L4::Tcp, client(false, 1), 1, s.addr, 80)).action, XDP_DROP);
    assert_eq!(e.reasons()[reasons::DROP_NO_BACKEND as usize], 1);
}

#[test]
fn ipip_beyond_the_mtu_is_dropped_and_counted() {
    let mut e = Engine::new();
    let s = spec(false, L4::Udp, Forwarding::Ipip);
    e.apply(std::slice::from_ref(&s));
    let big = |payload: usize| {
        let mut out = Vec::new();
        etherparse::PacketBuilder::ethernet2(packets::CLIENT_MAC, LB_MAC)
            .ipv4([198, 18, 128, 1], [198, 18, 0, 100], 64)
            .udp(1000, 53)
            .write(&mut out, &vec![7u8; payload])
            .unwrap();
        out
    };
    // IP length 1480 + 20 = 1500 fits; 1481 + 20 does not.
    assert_eq!(e.run(&big(MTU as usize - 20 - 28)).action, XDP_TX);
    assert_eq!(e.run(&big(MTU as usize - 20 - 28 + 1)).action, XDP_DROP);
    assert_eq!(e.reasons()[reasons::DROP_TOO_BIG as usize], 1);
}

#[test]
fn ten_thousand_flows_follow_the_weights() {
    for weights in [[1u32, 1, 1, 1], [2, 3, 5, 10]] {
        let mut e = Engine::new();
        let backends: Vec<(String, u32)> = (0..4).map(|i| (format!("198.18.1.{}", i + 1), weights[i])).collect();
        let refs: Vec<(&str, u32)> = backends.iter().map(|(a, w)| (a.as_str(), *w)).collect();
        let s = vip("web", VIP4, 80, L4::Tcp, Forwarding::Dsr, &refs);
        e.apply(std::slice::from_ref(&s));
        let mut per_backend = [0u64; 4];
        let mut bytes = [0u64; 4];
        for i in 0..10_000u32 {
            let input = frame(L4::Tcp, client(false, i % 4000), 1024 + (i / 4000) as u16 * 7, s.addr, 80);
            let out = e.run(&input);
            assert_eq!(out.action, XDP_TX);
            let b = backend_of(&out.frame);
            per_backend[b] += 1;
            bytes[b] += input.len() as u64;
        }
        let total: u32 = weights.iter().sum();
        for (i, &w) in weights.iter().enumerate() {
            let want = 10_000.0 * w as f64 / total as f64;
            let got = per_backend[i] as f64;
            assert!((got - want).abs() / want <= 0.05, "weights {weights:?}: backend {i} got {got}, want {want}");
        }
        // Counters match what was sent.
        let key = s.key();
        let vip_id = e.reconciler.vip_meta(&key).unwrap().vip_id;
        let vc = e.dp.vip_counter(vip_id).unwrap();
        assert_eq!((vc.packets, vc.bytes), (10_000, bytes.iter().sum()));
        for (i, b) in s.backends.iter().enumerate() {
            let id = e.reconciler.backend_id(&key, b.addr, b.port).unwrap();
            let bc = e.dp.backend_counter(id).unwrap();
            assert_eq!((bc.packets, bc.bytes), (per_backend[i], bytes[i]), "backend {i} counters");
        }
        let r = e.reasons();
        assert_eq!(r[reasons::TX as usize], 10_000);
        assert_eq!(r[reasons::CONNTRACK_MISS as usize], 10_000);
        assert_eq!(e.dp.flow_count(), 10_000);
    }
}

/// A NAT VIP whose backends listen on 8080.
fn nat_spec(v6: bool, l4: L4) -> VipSpec {
    let mut s = spec(v6, l4, Forwarding::Nat);
    for b in &mut s.backends {
        b.port = 8080;
    }
    s
}

/// The frame with its source and destination swapped, as a reply.
fn reply_to(request: &[u8], from: IpAddr, sport: u16, to: IpAddr, dport: u16, l4: L4, from_mac: [u8; 6]) -> Vec<u8> {
    let mut r = frame(l4, from, sport, to, dport);
    r[0..6].copy_from_slice(&LB_MAC);
    r[6..12].copy_from_slice(&from_mac);
    assert_eq!(r.len(), request.len());
    r
}

fn nat_both_ways(v6: bool, l4: L4) {
    let mut e = Engine::new();
    let s = nat_spec(v6, l4);
    e.apply(std::slice::from_ref(&s));
    let c = client(v6, 9);
    let input = frame(l4, c, 41_000, s.addr, s.port);
    let out = e.run(&input);
    assert_eq!(out.action, XDP_TX, "{v6} {l4:?}: forwarded");
    let b = backend_of(&out.frame);
    let backend = s.backends[b].addr;
    assert_eq!(b, e.predicted_backend(&s, c, 41_000));
    assert_eq!(out.frame[6..12], LB_MAC);
    let (ip, l4_off) = if v6 { (&out.frame[14..], 54) } else { (&out.frame[14..], 34) };
    // Destination address and port are the backend's; everything else as sent.
    let (dst, src) = if v6 { (24..40, 8..24) } else { (16..20, 12..16) };
    let want_dst: Vec<u8> = match backend {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    assert_eq!(ip[dst.clone()], want_dst[..]);
    assert_eq!(ip[src.clone()], input[14..][src.clone()]);
    assert_eq!(out.frame[l4_off..l4_off + 2], input[l4_off..l4_off + 2], "source port kept");
    assert_eq!(out.frame[l4_off + 2..l4_off + 4], 8080u16.to_be_bytes(), "destination port: the backend's");
    if !v6 {
        assert!(packets::ipv4_header_ok(ip), "IPv4 header checksum updated");
    }
    assert!(packets::l4_checksum_ok(ip), "transport checksum updated");
    let payload_at = l4_off + if l4 == L4::Tcp { 20 } else { 8 };
    assert_eq!(out.frame[payload_at..], input[payload_at..], "payload untouched");

    // The reply from the backend goes back from the VIP to the client's MAC.
    let reply = reply_to(&input, backend, 8080, c, 41_000, l4, backend_mac(b));
    let back = e.run(&reply);
    assert_eq!(back.action, XDP_TX, "reply translated");
    assert_eq!(back.frame[0..6], packets::CLIENT_MAC, "to the MAC the client's packets came from");
    assert_eq!(back.frame[6..12], LB_MAC);
    let ip = &back.frame[14..];
    let vip_bytes = &input[14..][dst.clone()];
    assert_eq!(&ip[src.clone()], vip_bytes, "source: the VIP");
    assert_eq!(back.frame[l4_off..l4_off + 2], s.port.to_be_bytes(), "source port: the VIP's");
    if !v6 {
        assert!(packets::ipv4_header_ok(ip));
    }
    assert!(packets::l4_checksum_ok(ip));
    // A reply nobody asked for passes untouched.
    let stranger = reply_to(&input, backend, 8080, c, 41_001, l4, backend_mac(b));
    let out = e.run(&stranger);
    assert_eq!((out.action, &out.frame), (XDP_PASS, &stranger));
    let r = e.reasons();
    assert_eq!((r[reasons::TX as usize], r[reasons::NAT_REPLY as usize], r[reasons::PASS_NOT_VIP as usize]), (1, 1, 1));
}

#[test]
fn nat_tcp4_both_ways() {
    nat_both_ways(false, L4::Tcp);
}
#[test]
fn nat_udp4_both_ways() {
    nat_both_ways(false, L4::Udp);
}
#[test]
fn nat_tcp6_both_ways() {
    nat_both_ways(true, L4::Tcp);
}
#[test]
fn nat_udp6_both_ways() {
    nat_both_ways(true, L4::Udp);
}

#[test]
fn nat_keeps_an_ipv4_udp_packet_without_checksum_without_one() {
    let mut e = Engine::new();
    let s = nat_spec(false, L4::Udp);
    e.apply(std::slice::from_ref(&s));
    let mut input = frame(L4::Udp, client(false, 1), 5000, s.addr, 53);
    input[34 + 6] = 0;
    input[34 + 7] = 0;
    let out = e.run(&input);
    assert_eq!(out.action, XDP_TX);
    assert_eq!(out.frame[34 + 6..34 + 8], [0, 0]);
    assert!(packets::ipv4_header_ok(&out.frame[14..]));
}

#[test]
fn nat_tracks_tcp_state_and_refuses_new_flows_when_full() {
    let mut e = Engine::with_sizes(lb_userspace::dataplane::MapSizes {
        max_vips: 8,
        max_backends: 64,
        conntrack: 1024,
        maglev_pool: 4 * 65_537,
        nat_table: 16,
    });
    let s = nat_spec(false, L4::Tcp);
    e.apply(std::slice::from_ref(&s));
    for i in 0..16 {
        assert_eq!(e.run(&frame(L4::Tcp, client(false, i), 6000, s.addr, 80)).action, XDP_TX);
    }
    // Full: a new connection is refused, established ones keep going.
    assert_eq!(e.run(&frame(L4::Tcp, client(false, 99), 6000, s.addr, 80)).action, XDP_DROP);
    assert_eq!(e.reasons()[reasons::DROP_NAT_TABLE_FULL as usize], 1);
    assert_eq!(e.run(&frame(L4::Tcp, client(false, 3), 6000, s.addr, 80)).action, XDP_TX);
    // FIN and RST move the connection's state.
    let mut fin = frame(L4::Tcp, client(false, 4), 6000, s.addr, 80);
    fin[34 + 13] = 0x11;
    let mut rst = frame(L4::Tcp, client(false, 5), 6000, s.addr, 80);
    rst[34 + 13] = 0x04;
    e.run(&fin);
    e.run(&rst);
    let states: std::collections::HashMap<IpAddr, u8> =
        e.dp.nat_flows()
            .into_iter()
            .map(|(k, v)| (lb_userspace::addr::from_words(&k.src, k.family), v.state))
            .collect();
    assert_eq!(states[&client(false, 4)], lb_common::maps::NAT_CLOSING);
    assert_eq!(states[&client(false, 5)], lb_common::maps::NAT_CLOSED);
    assert_eq!(states[&client(false, 3)], lb_common::maps::NAT_OPEN);
}

#[test]
fn a_failed_apply_gives_back_what_it_took() {
    let mut e = Engine::with_sizes(lb_userspace::dataplane::MapSizes {
        max_vips: 8,
        max_backends: 64,
        conntrack: 1024,
        maglev_pool: 600,
        nat_table: 1024,
    });
    let mut a = spec(false, L4::Tcp, Forwarding::Dsr);
    a.table_size = 251;
    let mut b = vip("other", "198.18.0.101", 80, L4::Tcp, Forwarding::Dsr, &BACKENDS4);
    b.table_size = 251;
    e.apply(std::slice::from_ref(&a));
    // Two tables of 251 and a replacement do not fit in 600 slots at once.
    let mut bigger = b.clone();
    bigger.table_size = 353;
    let err = e.reconciler.apply(&mut e.dp, &[a.clone(), bigger]).unwrap_err();
    assert!(format!("{err:#}").contains("no free region"), "{err:#}");
    // Nothing of the failed VIP is left behind: it applies later, and A kept forwarding.
    assert!(e.reconciler.vip_meta(&b.key()).is_none());
    assert_eq!(e.run(&frame(L4::Tcp, client(false, 1), 1000, a.addr, 80)).action, XDP_TX);
    e.apply(&[a.clone(), b.clone()]);
    assert_eq!(e.run(&frame(L4::Tcp, client(false, 1), 1000, b.addr, 80)).action, XDP_TX);
}

/// The traced balancer (`xdplb trace`) forwards exactly as the untraced one
/// and reports each packet: the decision, and the frame as it left XDP.
#[test]
fn trace_reports_the_decision_and_the_frame_as_it_left() {
    for (v6, fwd) in
        [(false, Forwarding::Dsr), (true, Forwarding::Dsr), (false, Forwarding::Ipip), (true, Forwarding::Nat)]
    {
        let what = format!("v6={v6} {fwd:?}");
        let mut e = Engine::new();
        let s = if fwd == Forwarding::Nat { nat_spec(v6, L4::Tcp) } else { spec(v6, L4::Tcp, fwd) };
        e.apply(std::slice::from_ref(&s));
        let mut ring = e.start_trace(&trace::Filter::default());
        let src = client(v6, 5);
        let input = frame(L4::Tcp, src, 42_000, s.addr, s.port);
        let out = e.run_traced(&input);
        assert_eq!(out.action, XDP_TX, "{what}");
        let (hash, slot, id) = e.maglev_choice(&s, src, 42_000);
        let b = e.backend_index(&s, id).unwrap();
        assert_eq!(backend_of(&out.frame), b, "{what}: the traced program forwards as the balancer does");

        let events = trace_events(&mut ring);
        assert_eq!(events.len(), 1, "{what}: one event per packet");
        let (ev, bytes) = &events[0];
        let f = TRACE_F_FLOW | TRACE_F_VIP | TRACE_F_MAGLEV | TRACE_F_BACKEND;
        assert_eq!(ev.flags, f, "{what}: flags");
        assert_eq!((ev.action, ev.reason, ev.conntrack), (XDP_TX, reasons::TX, reasons::CONNTRACK_MISS), "{what}");
        assert_eq!((ev.flow.src, ev.flow.dst), (addr::words(src), addr::words(s.addr)), "{what}: flow as it came in");
        assert_eq!((ev.flow.sport, ev.flow.dport), (42_000u16.to_be(), s.port.to_be()));
        assert_eq!(ev.tcp_flags, input[if v6 { 54 } else { 34 } + 13]);
        assert_eq!((ev.vip_addr, ev.vip_port), (addr::words(s.addr), s.port.to_be()), "{what}: the VIP");
        assert_eq!(ev.forwarding as u32, fwd as u32, "{what}");
        assert_eq!(
            (ev.hash, ev.maglev_slot),
            (hash, slot),
            "{what}: Maglev's hash and slot, as userspace computes them"
        );
        assert_eq!(ev.backend_id, id, "{what}: the backend in that slot");
        assert_eq!(ev.backend_addr, addr::words(s.backends[b].addr), "{what}: its address");
        assert_eq!(ev.backend_port, s.backends[b].port.to_be());
        assert_eq!(ev.frame_len as usize, out.frame.len(), "{what}: frame length as it left");
        assert_eq!(ev.cap_len as usize, out.frame.len().min(TRACE_SNAPLEN));
        assert_eq!(bytes[..], out.frame[..ev.cap_len as usize], "{what}: the frame bytes as they left XDP");

        // The same flow again: the connection table answers, Maglev is not asked.
        let again = e.run_traced(&input);
        assert_eq!(again.frame, out.frame, "{what}");
        let events = trace_events(&mut ring);
        let (ev, _) = &events[0];
        assert_eq!((ev.conntrack, ev.flags), (reasons::CONNTRACK_HIT, TRACE_F_FLOW | TRACE_F_VIP | TRACE_F_BACKEND));
        assert_eq!((ev.backend_id, ev.maglev_slot), (id, TRACE_NONE), "{what}");

        if fwd == Forwarding::Nat {
            // The backend's reply: translated back to the VIP, reported as such.
            let reply = reply_to(&input, s.backends[b].addr, 8080, src, 42_000, L4::Tcp, backend_mac(b));
            let back = e.run_traced(&reply);
            assert_eq!(back.action, XDP_TX);
            let events = trace_events(&mut ring);
            let (ev, bytes) = &events[0];
            assert_eq!(ev.flags, TRACE_F_FLOW | TRACE_F_NAT_REPLY, "{what}: a NAT reply");
            assert_eq!(
                (ev.vip_addr, ev.vip_port, ev.reason),
                (addr::words(s.addr), s.port.to_be(), reasons::NAT_REPLY)
            );
            assert_eq!(bytes[..], back.frame[..], "{what}: the translated reply");
        }
        // Not for a VIP: passed untouched, and said so.
        let other = frame(L4::Tcp, src, 42_000, if v6 { "2001:db8::200" } else { "198.18.0.200" }.parse().unwrap(), 80);
        assert_eq!(e.run_traced(&other).action, XDP_PASS);
        let events = trace_events(&mut ring);
        let (ev, bytes) = &events[0];
        assert_eq!((ev.flags, ev.action, ev.reason), (TRACE_F_FLOW, XDP_PASS, reasons::PASS_NOT_VIP), "{what}");
        assert_eq!((ev.backend_id, ev.conntrack), (TRACE_NONE, TRACE_NONE));
        assert_eq!(bytes[..], other[..]);
        // Each packet still counts exactly one outcome.
        let r = e.reasons();
        let nat_reply = if fwd == Forwarding::Nat { 1 } else { 0 };
        assert_eq!((r[reasons::TX as usize], r[reasons::PASS_NOT_VIP as usize]), (2, 1), "{what}");
        assert_eq!(r[reasons::NAT_REPLY as usize], nat_reply);
        assert_eq!(e.dp.trace_lost().unwrap(), 0);
    }
}

/// Frames longer than the snapshot length are cut, their length kept; the
/// VIP and client filters, the deadline, and the untraced balancer: no event.
#[test]
fn trace_filters_cuts_and_stops_at_its_deadline() {
    let mut e = Engine::new();
    let s = spec(false, L4::Udp, Forwarding::Dsr);
    let other = vip("other", "198.18.0.101", 53, L4::Udp, Forwarding::Dsr, &BACKENDS4);
    e.apply(&[s.clone(), other.clone()]);
    let (c1, c2) = (client(false, 1), client(false, 2));
    let filter = trace::Filter { vip: Some((s.addr, 53)), client: Some(c1) };
    let mut ring = e.start_trace(&filter);
    let (IpAddr::V4(from), IpAddr::V4(to)) = (c1, s.addr) else { unreachable!() };
    let mut big = Vec::new();
    etherparse::PacketBuilder::ethernet2(packets::CLIENT_MAC, LB_MAC)
        .ipv4(from.octets(), to.octets(), 64)
        .udp(1000, 53)
        .write(&mut big, &[0x5a; 600])
        .unwrap();
    let out = e.run_traced(&big);
    assert_eq!(out.action, XDP_TX);
    let events = trace_events(&mut ring);
    assert_eq!(events.len(), 1);
    let (ev, bytes) = &events[0];
    assert_eq!((ev.frame_len as usize, ev.cap_len as usize), (big.len(), TRACE_SNAPLEN), "cut, length kept");
    assert_eq!(bytes[..], out.frame[..TRACE_SNAPLEN]);

    for (what, pkt) in [
        ("another client", frame(L4::Udp, c2, 1000, s.addr, 53)),
        ("another VIP", frame(L4::Udp, c1, 1000, other.addr, 53)),
        ("the VIP address, another port", frame(L4::Udp, c1, 1000, s.addr, 54)),
    ] {
        e.run_traced(&pkt);
        assert!(trace_events(&mut ring).is_empty(), "{what}: filtered out in the kernel");
    }
    // The VIP's address alone matches any port, fragments to it too.
    let by_address = trace::Filter { vip: Some((s.addr, 0)), client: None };
    e.set_trace(by_address.config(trace::monotonic_ns() + 60_000_000_000, 1));
    let fragment = packets::as_ipv4_fragment(&frame(L4::Udp, c2, 1000, s.addr, 53), 0x2000);
    assert_eq!(e.run_traced(&fragment).action, XDP_DROP);
    let events = trace_events(&mut ring);
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].0.flags, events[0].0.reason), (TRACE_F_VIP_ADDR, reasons::DROP_FRAGMENT));

    // The untraced balancer never writes an event, tracing on or not.
    e.set_trace(filter.config(trace::monotonic_ns() + 60_000_000_000, 1));
    assert_eq!(e.run(&big).action, XDP_TX);
    assert!(trace_events(&mut ring).is_empty(), "the attached balancer does not trace");
    // A deadline in the past (a killed `xdplb trace`), or none: nothing.
    for deadline in [trace::monotonic_ns() - 1_000_000_000, 0] {
        e.set_trace(filter.config(deadline, 1));
        assert_eq!(e.run_traced(&big).action, XDP_TX);
        assert!(trace_events(&mut ring).is_empty(), "deadline {deadline}");
    }
}
