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
    harness::{
        Engine, MTU, XDP_DROP, XDP_PASS, XDP_TX, allowed_cpus, backend_mac, backend_of, pin_to, trace_events, vip,
    },
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
        // Not IP-in-IP: passed, and not counted (refused IP-in-IP would be).
        assert_eq!(e.dp.decap_counters().unwrap(), (1, 0));
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
    let mut s = spec(false, L4::Tcp, Forwarding::Dsr);
    // Echo is answered unless no VIP on the address allows it (tests below).
    s.icmp_echo = false;
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

/// Sends a flow's first two packets (`f` twice), so that it is confirmed
/// into FLOWS; returns its backend.
fn establish(e: &mut Engine, f: &[u8]) -> usize {
    let first = backend_of(&e.run(f).frame);
    assert_eq!(backend_of(&e.run(f).frame), first, "a flow's second packet goes where its first went");
    first
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
    // First packets are embryonic (FLOWS_NEW); second ones confirm the flow into FLOWS.
    let r = e.reasons();
    assert_eq!((r[reasons::CONNTRACK_MISS as usize], r[reasons::CONNTRACK_CONFIRMED as usize]), (300, 300));
    assert_eq!(r[reasons::CONNTRACK_HIT as usize], 0);
    assert_eq!(e.dp.flow_count(), 300, "confirmed flows are in FLOWS");
    for (i, &(c, p)) in flows.iter().enumerate() {
        assert_eq!(backend_of(&e.run(&frame(L4::Tcp, c, p, s.addr, 80)).frame), first[i], "flow {i}, third packet");
    }
    assert_eq!(e.reasons()[reasons::CONNTRACK_HIT as usize], 300);
}

#[test]
fn a_removed_backend_never_gets_a_packet_again() {
    let mut e = Engine::new();
    let s = vip("web", VIP4, 80, L4::Tcp, Forwarding::Dsr, &BACKENDS4);
    e.apply(std::slice::from_ref(&s));
    let flows: Vec<(IpAddr, u16)> = (0..300).map(|i| (client(false, i), 20_000 + i as u16)).collect();
    let first: Vec<usize> = flows.iter().map(|&(c, p)| establish(&mut e, &frame(L4::Tcp, c, p, s.addr, 80))).collect();
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
fn ipip_beyond_the_mtu_is_answered_and_counted_too_big() {
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
    // IP length 1480 + 20 = 1500 fits; 1481 + 20 does not: the client is
    // answered with ICMP (see the ICMP tests below), the packet dropped.
    assert_eq!(e.run(&big(MTU as usize - 20 - 28)).action, XDP_TX);
    assert_eq!(e.run(&big(MTU as usize - 20 - 28 + 1)).action, XDP_TX);
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
        assert_eq!(e.dp.flow_count(), 0, "one packet each: embryonic (FLOWS_NEW), none in FLOWS");
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

/// The backend's reply to a frame NAT forwarded to it (addresses, ports
/// and MACs swapped; a TCP segment without flags).
fn answer(forwarded: &[u8]) -> Vec<u8> {
    let v6 = forwarded[12..14] == [0x86, 0xdd];
    let (src, dst, l4_off) = if v6 { (22..38, 38..54, 54) } else { (26..30, 30..34, 34) };
    let ip = |r: std::ops::Range<usize>| -> IpAddr {
        if v6 {
            IpAddr::from(<[u8; 16]>::try_from(&forwarded[r]).unwrap())
        } else {
            IpAddr::from(<[u8; 4]>::try_from(&forwarded[r]).unwrap())
        }
    };
    let port = |at: usize| u16::from_be_bytes([forwarded[at], forwarded[at + 1]]);
    let l4 = if forwarded[if v6 { 20 } else { 23 }] == 6 { L4::Tcp } else { L4::Udp };
    let mac: [u8; 6] = forwarded[0..6].try_into().unwrap();
    reply_to(forwarded, ip(dst), port(l4_off + 2), ip(src), port(l4_off), l4, mac)
}

/// The backend's initial sequence number in the tests' SYN-ACKs.
const ISN: u32 = 0x8000_0000;

use packets::tcp_segment;

/// The backend's SYN-ACK to a SYN NAT forwarded to it, with sequence number `isn`.
fn syn_ack(forwarded: &[u8], isn: u32) -> Vec<u8> {
    tcp_segment(&answer(forwarded), 0x12, isn, 1001)
}

/// What confirms the connection `first` (the client's SYN or datagram)
/// started: the ACK of the backend's SYN-ACK (`isn`); for UDP, another datagram.
fn confirmation(first: &[u8], isn: u32) -> Vec<u8> {
    let tcp = first[if first[12..14] == [0x86, 0xdd] { 20 } else { 23 }] == 6;
    if tcp { tcp_segment(first, 0x10, 1001, isn.wrapping_add(1)) } else { first.to_vec() }
}

/// The whole opening: the backend answers what NAT forwarded of `first`
/// (a SYN-ACK, or a datagram), then the client confirms.
fn open_connection(e: &mut Engine, first: &[u8], forwarded: &[u8]) {
    let tcp = first[if first[12..14] == [0x86, 0xdd] { 20 } else { 23 }] == 6;
    let answer = if tcp { syn_ack(forwarded, ISN) } else { answer(forwarded) };
    assert_eq!(e.run(&answer).action, XDP_TX, "the backend's answer");
    assert_eq!(e.run(&confirmation(first, ISN)).action, XDP_TX, "the client's confirmation");
}

/// Every NAT entry, both directions, is in `state`.
fn assert_nat_states(e: &Engine, state: u8, what: &str) {
    let flows: Vec<u8> = e.dp.nat_flows().iter().map(|(_, f)| f.state).collect();
    let replies: Vec<u8> = e.dp.nat_replies().iter().map(|(_, r)| r.state).collect();
    assert!(!flows.is_empty() && !replies.is_empty(), "{what}: no NAT entries");
    assert!(flows.iter().chain(&replies).all(|&s| s == state), "{what}: states {flows:?} / {replies:?}, not {state}");
}

fn nat_both_ways(v6: bool, l4: L4) {
    let mut e = Engine::new();
    let s = nat_spec(v6, l4);
    e.apply(std::slice::from_ref(&s));
    let c = client(v6, 9);
    // Only a SYN opens a TCP connection; any UDP datagram opens a flow.
    let input =
        if l4 == L4::Tcp { packets::syn(c, 41_000, s.addr, s.port) } else { frame(l4, c, 41_000, s.addr, s.port) };
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
    let hops = if v6 { 7 } else { 8 };
    assert_eq!(ip[hops], input[14 + hops] - 1, "TTL / hop limit counted down");
    let payload_at = l4_off + if l4 == L4::Tcp { 20 } else { 8 };
    assert_eq!(out.frame[payload_at..], input[payload_at..], "payload untouched");
    assert_nat_states(&e, lb_common::maps::NAT_EMBRYONIC, "before the backend answers");

    // The reply from the backend (a SYN-ACK) goes back from the VIP to the client's MAC.
    let mut reply = reply_to(&input, backend, 8080, c, 41_000, l4, backend_mac(b));
    if l4 == L4::Tcp {
        reply = tcp_segment(&reply, 0x12, ISN, 1001);
    }
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
    assert_eq!(ip[hops], reply[14 + hops] - 1, "TTL / hop limit counted down");
    assert_nat_states(&e, lb_common::maps::NAT_ANSWERED, "the backend answered");
    // The client confirms (its ACK of the SYN-ACK, another datagram): open.
    assert_eq!(e.run(&confirmation(&input, ISN)).action, XDP_TX);
    assert_nat_states(&e, lb_common::maps::NAT_OPEN, "the client confirmed");
    // A reply nobody asked for passes untouched.
    let stranger = reply_to(&input, backend, 8080, c, 41_001, l4, backend_mac(b));
    let out = e.run(&stranger);
    assert_eq!((out.action, &out.frame), (XDP_PASS, &stranger));
    let r = e.reasons();
    assert_eq!((r[reasons::TX as usize], r[reasons::NAT_REPLY as usize], r[reasons::PASS_NOT_VIP as usize]), (2, 1, 1));
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
        let syn = packets::syn(client(false, i), 6000, s.addr, 80);
        let out = e.run(&syn);
        assert_eq!(out.action, XDP_TX);
        // The backend answers, the client confirms: the connection opens.
        open_connection(&mut e, &syn, &out.frame);
    }
    // Full: a new connection is refused, established ones keep going.
    assert_eq!(e.run(&packets::syn(client(false, 99), 6000, s.addr, 80)).action, XDP_DROP);
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
        let input = if fwd == Forwarding::Nat {
            packets::syn(src, 42_000, s.addr, s.port)
        } else {
            frame(L4::Tcp, src, 42_000, s.addr, s.port)
        };
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

        // The same flow again: the connection table answers, Maglev is not
        // asked (DSR and IP-in-IP: the embryonic flow is confirmed by it, and
        // the connection table answers the third packet).
        let answers: &[u32] = if fwd == Forwarding::Nat {
            &[reasons::CONNTRACK_HIT]
        } else {
            &[reasons::CONNTRACK_CONFIRMED, reasons::CONNTRACK_HIT]
        };
        for &answer in answers {
            let again = e.run_traced(&input);
            assert_eq!(again.frame, out.frame, "{what}");
            let events = trace_events(&mut ring);
            let (ev, _) = &events[0];
            assert_eq!((ev.conntrack, ev.flags), (answer, TRACE_F_FLOW | TRACE_F_VIP | TRACE_F_BACKEND), "{what}");
            assert_eq!((ev.backend_id, ev.maglev_slot), (id, TRACE_NONE), "{what}");
        }

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
        let tx = 1 + answers.len() as u64;
        assert_eq!((r[reasons::TX as usize], r[reasons::PASS_NOT_VIP as usize]), (tx, 1), "{what}");
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

// ICMP to a VIP address: errors about a VIP's flow follow it to its
// backend, IP-in-IP too big for the MTU is answered, echo is answered.

/// The IP packet a backend sends as the VIP to the client (a DSR/IP-in-IP
/// reply), as an ICMP error quotes it: its first `keep` bytes.
fn quoted_reply(l4: L4, vip: IpAddr, vport: u16, client: IpAddr, cport: u16, keep: usize) -> Vec<u8> {
    let reply = frame(l4, vip, vport, client, cport);
    reply[14..(14 + keep).min(reply.len())].to_vec()
}

/// A router on the way to the client, reporting an error to the VIP.
fn router(v6: bool) -> IpAddr {
    if v6 { "2001:db8:200::1" } else { "198.18.200.1" }.parse().unwrap()
}

/// (kind, code, rest) of every ICMP error the dataplane forwards.
fn icmp_errors(v6: bool) -> Vec<(u8, u8, [u8; 4])> {
    if v6 {
        // Destination unreachable, packet too big (MTU 1400), time exceeded.
        vec![(1, 4, [0; 4]), (2, 0, 1400u32.to_be_bytes()), (3, 0, [0; 4])]
    } else {
        // Fragmentation needed (MTU 1400), port unreachable, time exceeded.
        vec![(3, 4, [0, 0, 0x05, 0x78]), (3, 3, [0; 4]), (11, 0, [0; 4])]
    }
}

fn icmp_errors_reach_the_backend(v6: bool, fwd: Forwarding) {
    let what = format!("v6={v6} {fwd:?}");
    let mut e = Engine::new();
    let s = spec(v6, L4::Tcp, fwd);
    e.apply(std::slice::from_ref(&s));
    let c = client(v6, 11);
    // A tracked flow, and a port Maglev alone decides.
    let tracked = establish(&mut e, &frame(L4::Tcp, c, 40_000, s.addr, 80));
    let mut sent = 2;
    for (sport, tracked_flow) in [(40_000u16, true), (40_001, false)] {
        for (kind, code, rest) in icmp_errors(v6) {
            let quoted = quoted_reply(L4::Tcp, s.addr, 80, c, sport, if v6 { 120 } else { 28 });
            let input = packets::icmp(router(v6), s.addr, kind, code, rest, &quoted);
            assert_eq!(packets::transport_checksum_ok(&input[14..]), Some(true));
            let out = e.run(&input);
            let case = format!("{what} type {kind} code {code} port {sport}");
            assert_eq!(out.action, XDP_TX, "{case}: forwarded");
            sent += 1;
            let want = if tracked_flow { tracked } else { e.predicted_backend(&s, c, sport) };
            assert_eq!(backend_of(&out.frame), want, "{case}: the flow's backend");
            assert_eq!(out.frame[6..12], LB_MAC, "{case}");
            match fwd {
                Forwarding::Dsr => assert_eq!(out.frame[12..], input[12..], "{case}: the IP packet untouched"),
                Forwarding::Ipip => {
                    let (hdr, backend_at) = if v6 { (40, 24..40) } else { (20, 16..20) };
                    assert_eq!(out.frame.len(), input.len() + hdr, "{case}");
                    assert_eq!(out.frame[14 + hdr..], input[14..], "{case}: carried whole");
                    let backend = match s.backends[want].addr {
                        IpAddr::V4(a) => a.octets().to_vec(),
                        IpAddr::V6(a) => a.octets().to_vec(),
                    };
                    assert_eq!(out.frame[14..][backend_at], backend[..], "{case}: outer destination");
                    if v6 {
                        assert_eq!((out.frame[12..14].to_vec(), out.frame[20]), (vec![0x86, 0xdd], 41));
                    } else {
                        assert_eq!((out.frame[12..14].to_vec(), out.frame[23]), (vec![0x08, 0x00], 4));
                        assert!(packets::ipv4_header_ok(&out.frame[14..]), "{case}: outer checksum");
                    }
                    // The outer source comes from the flow's hash, as for the flow's packets.
                    let (hash, _, _) = e.maglev_choice(&s, c, sport);
                    let h = hash.to_be_bytes();
                    if v6 {
                        let mut want = "2001:db8:ffff::".parse::<std::net::Ipv6Addr>().unwrap().octets();
                        want[12..].copy_from_slice(&h);
                        assert_eq!(out.frame[22..38], want, "{case}: outer source");
                    } else {
                        assert_eq!(out.frame[26..30], [198, 19, h[2], h[3]], "{case}: outer source");
                    }
                }
                Forwarding::Nat => unreachable!(),
            }
            let inner = &out.frame[out.frame.len() - (input.len() - 14)..];
            assert_eq!(packets::transport_checksum_ok(inner), Some(true), "{case}: ICMP checksum");
        }
    }
    let r = e.reasons();
    assert_eq!(r[reasons::TX as usize], sent, "{what}: every one counted tx");
    let conntrack = r[reasons::CONNTRACK_MISS as usize] + r[reasons::CONNTRACK_CONFIRMED as usize];
    assert_eq!(r.iter().sum::<u64>() - conntrack, sent, "{what}: one reason each");
    assert_eq!(e.dp.flow_count(), 1, "{what}: no flow entry for an ICMP error");
    assert_eq!(
        (
            r[reasons::CONNTRACK_MISS as usize],
            r[reasons::CONNTRACK_CONFIRMED as usize],
            r[reasons::CONNTRACK_HIT as usize]
        ),
        (1, 1, 0),
        "{what}"
    );
}

#[test]
fn icmp4_errors_reach_the_dsr_backend() {
    icmp_errors_reach_the_backend(false, Forwarding::Dsr);
}
#[test]
fn icmp6_errors_reach_the_dsr_backend() {
    icmp_errors_reach_the_backend(true, Forwarding::Dsr);
}
#[test]
fn icmp4_errors_reach_the_ipip_backend() {
    icmp_errors_reach_the_backend(false, Forwarding::Ipip);
}
#[test]
fn icmp6_errors_reach_the_ipip_backend() {
    icmp_errors_reach_the_backend(true, Forwarding::Ipip);
}

/// A tracked flow keeps its backend when the table changes; so do the
/// ICMP errors about it, and an error never opens a flow.
#[test]
fn an_icmp_error_follows_its_tracked_flow_not_maglev() {
    let mut e = Engine::new();
    let s = vip("web", VIP4, 80, L4::Tcp, Forwarding::Dsr, &BACKENDS4[..2]);
    e.apply(std::slice::from_ref(&s));
    let flows: Vec<IpAddr> = (0..200).map(|i| client(false, i)).collect();
    let first: Vec<usize> = flows.iter().map(|&c| establish(&mut e, &frame(L4::Tcp, c, 7000, s.addr, 80))).collect();
    let grown = vip("web", VIP4, 80, L4::Tcp, Forwarding::Dsr, &BACKENDS4);
    e.apply(std::slice::from_ref(&grown));
    let mut moved = 0;
    for (i, &c) in flows.iter().enumerate() {
        let quoted = quoted_reply(L4::Tcp, s.addr, 80, c, 7000, 28);
        let out = e.run(&packets::icmp(router(false), s.addr, 3, 4, [0, 0, 0x05, 0x78], &quoted));
        assert_eq!(backend_of(&out.frame), first[i], "error about flow {i}: its tracked backend");
        moved += usize::from(e.predicted_backend(&grown, c, 7000) != first[i]);
    }
    assert!(moved > 30, "the table change must matter ({moved})");
    assert_eq!(e.dp.flow_count(), 200);
}

/// Cut or invalid quoted headers are dropped and counted; errors about
/// anything but a DSR/IP-in-IP VIP's flow pass to the host as before.
#[test]
fn icmp_errors_that_are_not_about_a_vip_flow() {
    for v6 in [false, true] {
        let mut e = Engine::new();
        let s = spec(v6, L4::Udp, Forwarding::Dsr);
        let mut n = nat_spec(v6, L4::Tcp);
        n.port = 443;
        e.apply(&[s.clone(), n.clone()]);
        let c = client(v6, 3);
        let (kind, code, rest) = icmp_errors(v6)[0];
        let err = |quoted: &[u8], to: IpAddr| packets::icmp(router(v6), to, kind, code, rest, quoted);
        let ip_len = if v6 { 40 } else { 20 };
        let good = quoted_reply(L4::Udp, s.addr, 53, c, 5000, ip_len + 8);
        let mut bad_version = good.clone();
        bad_version[0] = 0x55;
        let mut dropped = vec![("quote cut in the IP header", err(&good[..ip_len - 4], s.addr))];
        dropped.push(("quote cut before the ports", err(&good[..ip_len + 3], s.addr)));
        dropped.push(("quoted IP version 5", err(&bad_version, s.addr)));
        if !v6 {
            let mut bad_ihl = good.clone();
            bad_ihl[0] = 0x44;
            dropped.push(("quoted IHL 4", err(&bad_ihl, s.addr)));
        }
        // An ICMP header cut short.
        let whole = err(&good, s.addr);
        let mut cut = whole[..14 + ip_len + 6].to_vec();
        if v6 {
            cut[18..20].copy_from_slice(&6u16.to_be_bytes());
        } else {
            cut[16..18].copy_from_slice(&26u16.to_be_bytes());
            packets::fix_checksums(&mut cut);
        }
        dropped.push(("ICMP header cut", cut));
        for (what, input) in &dropped {
            assert_eq!(e.run(input).action, XDP_DROP, "v6={v6}: {what}");
        }
        let passed_other = vec![
            ("about another port of the VIP address", err(&quoted_reply(L4::Udp, s.addr, 54, c, 5000, 48), s.addr)),
            ("about TCP to the UDP VIP's port", err(&quoted_reply(L4::Tcp, s.addr, 53, c, 5000, 48), s.addr)),
            ("about a NAT VIP's flow", err(&quoted_reply(L4::Tcp, n.addr, 443, c, 5000, 48), n.addr)),
            ("quoting another source", err(&quoted_reply(L4::Udp, router(v6), 53, c, 5000, 48), s.addr)),
            ("a redirect", packets::icmp(router(v6), s.addr, if v6 { 137 } else { 5 }, 0, [0; 4], &good)),
        ];
        for (what, input) in &passed_other {
            let out = e.run(input);
            assert_eq!((out.action, &out.frame), (XDP_PASS, input), "v6={v6}: {what}");
        }
        let other_host = err(&good, if v6 { "2001:db8::200" } else { "198.18.0.200" }.parse().unwrap());
        assert_eq!(e.run(&other_host).frame, other_host);
        let r = e.reasons();
        assert_eq!(r[reasons::DROP_MALFORMED_L4 as usize], dropped.len() as u64, "v6={v6}");
        assert_eq!(r[reasons::PASS_VIP_OTHER_PROTO as usize], passed_other.len() as u64, "v6={v6}");
        assert_eq!(r[reasons::PASS_NOT_VIP as usize], 1);
        assert_eq!(r.iter().sum::<u64>(), dropped.len() as u64 + passed_other.len() as u64 + 1, "one reason each");
        assert_eq!(e.dp.flow_count(), 0);
    }
}

/// An IP-in-IP packet beyond the MTU: the client hears the MTU that fits,
/// from the VIP, quoting the packet; no flow is opened.
fn too_big_is_answered(v6: bool, dont_fragment: bool) {
    let what = format!("v6={v6} DF={dont_fragment}");
    let mut e = Engine::new();
    let s = spec(v6, L4::Udp, Forwarding::Ipip);
    e.apply(std::slice::from_ref(&s));
    let c = client(v6, 8);
    let (overhead, ip_hdr) = if v6 { (40, 40) } else { (20, 20) };
    let big = |payload: usize| {
        let mut out = Vec::new();
        let eth = etherparse::PacketBuilder::ethernet2(packets::CLIENT_MAC, LB_MAC);
        let ip = match (c, s.addr) {
            (IpAddr::V4(a), IpAddr::V4(b)) => eth.ipv4(a.octets(), b.octets(), 64),
            (IpAddr::V6(a), IpAddr::V6(b)) => eth.ipv6(a.octets(), b.octets(), 64),
            _ => unreachable!(),
        };
        ip.udp(1000, 53).write(&mut out, &(0..payload).map(|i| i as u8).collect::<Vec<_>>()).unwrap();
        if !v6 {
            let flags = if dont_fragment { 0x4000 } else { 0 };
            out = packets::as_ipv4_fragment(&out, flags);
        }
        out
    };
    let fits = MTU as usize - overhead - ip_hdr - 8;
    let input = big(fits + 1);
    let out = e.run(&input);
    assert_eq!(out.action, XDP_TX, "{what}: answered");
    let (vip, client_ip) = match (s.addr, c) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (a.octets().to_vec(), b.octets().to_vec()),
        (IpAddr::V6(a), IpAddr::V6(b)) => (a.octets().to_vec(), b.octets().to_vec()),
        _ => unreachable!(),
    };
    let mut want = Vec::new();
    want.extend_from_slice(&packets::CLIENT_MAC);
    want.extend_from_slice(&LB_MAC);
    if v6 {
        // 1280 bytes: IPv6 header, ICMPv6 "packet too big" with MTU 1460, 1232 bytes of the packet.
        want.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
        want.extend_from_slice(&1240u16.to_be_bytes());
        want.extend_from_slice(&[58, 64]);
        want.extend_from_slice(&vip);
        want.extend_from_slice(&client_ip);
        want.extend_from_slice(&[2, 0, 0, 0]);
        want.extend_from_slice(&(MTU - 40).to_be_bytes());
        want.extend_from_slice(&input[14..14 + 1232]);
    } else {
        // 576 bytes: IPv4 header, ICMP "fragmentation needed" with MTU 1480, 548 bytes of the packet.
        want.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
        want.extend_from_slice(&576u16.to_be_bytes());
        want.extend_from_slice(&[0, 0, 0, 0, 64, 1, 0, 0]);
        want.extend_from_slice(&vip);
        want.extend_from_slice(&client_ip);
        want.extend_from_slice(&[3, 4, 0, 0, 0, 0]);
        want.extend_from_slice(&((MTU - 20) as u16).to_be_bytes());
        want.extend_from_slice(&input[14..14 + 548]);
    }
    // Checksums computed here, independently; then the whole frame, byte for byte.
    packets::fix_checksums(&mut want);
    assert_eq!(out.frame.len(), want.len(), "{what}: length");
    assert_eq!(out.frame, want, "{what}: the answer, byte for byte");
    if !v6 {
        assert!(packets::ipv4_header_ok(&out.frame[14..]), "{what}");
    }
    assert_eq!(packets::transport_checksum_ok(&out.frame[14..]), Some(true), "{what}: ICMP checksum");
    assert_eq!(e.dp.flow_count(), 0, "{what}: a packet too big opens no flow");
    // What fits is still forwarded, and tracked (from its second packet on).
    assert_eq!(e.run(&big(fits)).action, XDP_TX);
    assert_eq!(e.run(&big(fits)).action, XDP_TX);
    assert_eq!(e.dp.flow_count(), 1);
    let r = e.reasons();
    assert_eq!((r[reasons::DROP_TOO_BIG as usize], r[reasons::TX as usize]), (1, 2), "{what}");
}

#[test]
fn ipip4_too_big_answers_fragmentation_needed() {
    too_big_is_answered(false, true);
}
#[test]
fn ipip4_too_big_without_df_is_answered_too() {
    too_big_is_answered(false, false);
}
#[test]
fn ipip6_too_big_answers_packet_too_big() {
    too_big_is_answered(true, true);
}

/// The monotonic coarse clock, the one the dataplane's rate limit reads
/// (bpf_ktime_get_coarse_ns), in whole seconds.
fn coarse_second() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    assert_eq!(unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) }, 0);
    ts.tv_sec as u64
}

/// At most `TOO_BIG_PER_SEC` (100) answers a second for the whole balancer,
/// however many CPUs the packets arrive on (it was 100 per CPU); the rest
/// are dropped, every one counted `drop_too_big`. Each thread, pinned to a
/// CPU of its own, sends more than the limit. No timing threshold: the
/// bound is computed from the clock's seconds the run touched. A first
/// answer opens the second before the threads start, so within that
/// second the limit is exact; each later second may be opened by every
/// thread at once (see `too_big_allowed`): the limit times the threads.
#[test]
fn too_big_answers_are_rate_limited_for_the_whole_balancer() {
    const PER_SEC: u64 = 100;
    let mut e = Engine::new();
    let s = spec(false, L4::Udp, Forwarding::Ipip);
    e.apply(std::slice::from_ref(&s));
    let mut input = Vec::new();
    etherparse::PacketBuilder::ethernet2(packets::CLIENT_MAC, LB_MAC)
        .ipv4([198, 18, 128, 1], [198, 18, 0, 100], 64)
        .udp(1000, 53)
        .write(&mut input, &[9u8; 1472])
        .unwrap();
    let cpus: Vec<usize> = allowed_cpus().into_iter().take(4).collect();
    let per_thread = PER_SEC + 50;
    let first = coarse_second();
    let primed = u64::from(e.run(&input).action == XDP_TX);
    let prog: &aya::programs::Xdp = e.dp.program(programs::BALANCER).unwrap();
    let answered: u64 = std::thread::scope(|scope| {
        let threads: Vec<_> = cpus
            .iter()
            .map(|&cpu| {
                let input = &input;
                scope.spawn(move || {
                    pin_to(&[cpu]);
                    let mut out = vec![0u8; input.len() + 256];
                    (0..per_thread)
                        .filter(|_| {
                            let opts = aya::programs::TestRunOptions {
                                data_in: Some(input),
                                data_out: Some(&mut out),
                                ..Default::default()
                            };
                            aya::programs::TestRun::test_run(prog, opts).unwrap().return_value == XDP_TX
                        })
                        .count() as u64
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).sum::<u64>()
    }) + primed;
    let seconds = coarse_second() - first + 1;
    let sent = 1 + per_thread * cpus.len() as u64;
    let r = e.reasons();
    assert_eq!(r[reasons::DROP_TOO_BIG as usize], sent, "every one counted");
    assert_eq!(primed, 1, "the first is answered");
    let bound = PER_SEC * (1 + (seconds - 1) * cpus.len() as u64);
    assert!(answered <= bound, "{answered} answered of {sent} on {} CPUs in {seconds} second(s)", cpus.len());
    if cpus.len() > 1 && seconds == 1 {
        // Per CPU, as before, it would have been 100 on each.
        assert_eq!(answered, PER_SEC, "the whole budget, no more");
    }
}

fn echo(from: IpAddr, to: IpAddr, kind: u8, ttl: u8) -> Vec<u8> {
    let mut f = packets::icmp(from, to, kind, 0, [0x12, 0x34, 0, 7], b"abcdefghijklmnopqrstuvwxyz012345");
    if from.is_ipv4() {
        f[22] = ttl;
    } else {
        f[21] = ttl;
    }
    packets::fix_checksums(&mut f);
    f
}

#[test]
fn echo_requests_to_a_vip_address_are_answered() {
    for v6 in [false, true] {
        let mut e = Engine::new();
        let s = spec(v6, L4::Tcp, Forwarding::Ipip);
        e.apply(std::slice::from_ref(&s));
        let c = client(v6, 5);
        let (request, reply) = if v6 { (128, 129) } else { (8, 0) };
        let input = echo(c, s.addr, request, 57);
        let out = e.run(&input);
        assert_eq!(out.action, XDP_TX, "v6={v6}: answered");
        // The reply: from the VIP, TTL 64, checksums computed independently.
        let mut want = echo(s.addr, c, reply, 64);
        want[0..6].copy_from_slice(&packets::CLIENT_MAC);
        want[6..12].copy_from_slice(&LB_MAC);
        assert_eq!(out.frame, want, "v6={v6}: the reply, byte for byte");
        assert_eq!(packets::transport_checksum_ok(&out.frame[14..]), Some(true));
        if !v6 {
            assert!(packets::ipv4_header_ok(&out.frame[14..]));
        }
        // Echo to another address is the host's; replies to the VIP too.
        let other = echo(c, if v6 { "2001:db8::200" } else { "198.18.0.200" }.parse().unwrap(), request, 64);
        assert_eq!(e.run(&other).frame, other);
        let pong = echo(c, s.addr, reply, 64);
        assert_eq!(e.run(&pong).frame, pong);
        let r = e.reasons();
        assert_eq!(
            (r[reasons::TX as usize], r[reasons::PASS_NOT_VIP as usize], r[reasons::PASS_VIP_OTHER_PROTO as usize]),
            (1, 1, 1)
        );
        assert_eq!(e.dp.flow_count(), 0);
    }
}

/// An echo request whose IP length is not a whole packet in the frame (cut
/// short, or a length that leaves the ICMP header outside) gets no answer:
/// the answer would carry the false length. Found by the frame fuzzer.
#[test]
fn echo_requests_that_are_not_whole_packets_are_dropped_unanswered() {
    for v6 in [false, true] {
        let mut e = Engine::new();
        let s = spec(v6, L4::Tcp, Forwarding::Dsr);
        e.apply(std::slice::from_ref(&s));
        let whole = echo(client(v6, 5), s.addr, if v6 { 128 } else { 8 }, 57);
        let cut = whole[..whole.len() - 4].to_vec();
        let mut short = whole.clone();
        // The IP length says the packet ends inside the ICMP header.
        if v6 {
            short[18..20].copy_from_slice(&4u16.to_be_bytes());
        } else {
            short[16..18].copy_from_slice(&24u16.to_be_bytes());
        }
        for (what, input) in [("cut short", &cut), ("ICMP header outside the IP length", &short)] {
            assert_eq!(e.run(input).action, XDP_DROP, "v6={v6}: {what}");
        }
        let r = e.reasons();
        assert_eq!((r[reasons::TX as usize], r[reasons::DROP_MALFORMED_L4 as usize]), (0, 2), "v6={v6}");
    }
}

/// `icmp_echo: false` on every VIP of an address: echo passes to the host;
/// one VIP that allows it is enough; the setting follows reloads.
#[test]
fn icmp_echo_false_passes_echo_to_the_host() {
    let mut e = Engine::new();
    let mut web = spec(false, L4::Tcp, Forwarding::Dsr);
    web.icmp_echo = false;
    let mut dns = vip("dns", VIP4, 53, L4::Udp, Forwarding::Dsr, &BACKENDS4);
    dns.icmp_echo = false;
    e.apply(&[web.clone(), dns.clone()]);
    let input = echo(client(false, 1), web.addr, 8, 64);
    let out = e.run(&input);
    assert_eq!((out.action, &out.frame), (XDP_PASS, &input), "no VIP allows it");
    dns.icmp_echo = true;
    e.apply(&[web.clone(), dns.clone()]);
    assert_eq!(e.run(&input).action, XDP_TX, "one VIP on the address allows it");
    e.apply(std::slice::from_ref(&web));
    assert_eq!(e.run(&input).action, XDP_PASS, "the VIP that allowed it is gone");
    let r = e.reasons();
    assert_eq!((r[reasons::PASS_VIP_OTHER_PROTO as usize], r[reasons::TX as usize]), (2, 1));
}

/// A UDP frame from `c` to an IP-in-IP VIP whose IP length claims
/// `claimed` bytes while the frame is `frame_len` bytes long.
fn claiming(c: IpAddr, vip: IpAddr, frame_len: usize, claimed: u16) -> Vec<u8> {
    let v6 = c.is_ipv6();
    let payload = frame_len - 14 - if v6 { 40 } else { 20 } - 8;
    let mut out = frame(L4::Udp, c, 1000, vip, 53);
    let l3 = if v6 { 40 } else { 20 };
    out.truncate(14 + l3 + 8);
    out.extend((0..payload).map(|i| i as u8));
    if v6 {
        out[18..20].copy_from_slice(&(claimed - 40).to_be_bytes());
    } else {
        out[16..18].copy_from_slice(&claimed.to_be_bytes());
    }
    packets::fix_checksums(&mut out);
    assert_eq!(out.len(), frame_len);
    out
}

/// A packet whose IP length claims more than the frame holds is dropped as
/// malformed before the MTU is judged by that length: no "too big" answer
/// to a forged length (a 562-byte frame claiming 1500 bytes got a 590-byte
/// answer; IPv6: 1246 → 1294), no flow, nothing encapsulated. An ICMP
/// error with a forged length is dropped the same way.
#[test]
fn ipip_length_beyond_the_frame_is_dropped_unanswered() {
    for v6 in [false, true] {
        let mut e = Engine::new();
        let s = spec(v6, L4::Udp, Forwarding::Ipip);
        e.apply(std::slice::from_ref(&s));
        let c = client(v6, 9);
        // The shortest frame the answer could quote from, claiming a full-size packet.
        let frame_len = if v6 { 14 + 1232 } else { 14 + 548 };
        let forged = claiming(c, s.addr, frame_len, 1500);
        let out = e.run(&forged);
        assert_eq!(out.action, XDP_DROP, "v6={v6}: a forged length is not answered");
        // Claiming a length that fits is as false, and as dropped (not encapsulated).
        let out = e.run(&claiming(c, s.addr, frame_len, frame_len as u16 - 14 + 1));
        assert_eq!(out.action, XDP_DROP, "v6={v6}: one byte more than the frame");
        // An ICMP error about a flow of the VIP, claiming more than it holds.
        let quoted = quoted_reply(L4::Udp, s.addr, 53, c, 1000, if v6 { 48 } else { 28 });
        let (kind, code, rest) = icmp_errors(v6)[0];
        let mut err = packets::icmp(router(v6), s.addr, kind, code, rest, &quoted);
        let claimed = (err.len() - 14 + 1) as u16;
        if v6 {
            err[18..20].copy_from_slice(&(claimed - 40).to_be_bytes());
        } else {
            err[16..18].copy_from_slice(&claimed.to_be_bytes());
        }
        packets::fix_checksums(&mut err);
        assert_eq!(e.run(&err).action, XDP_DROP, "v6={v6}: an ICMP error with a forged length");
        // The same frame with its true length is forwarded.
        let honest = claiming(c, s.addr, frame_len, frame_len as u16 - 14);
        assert_eq!(e.run(&honest).action, XDP_TX, "v6={v6}: a true length");
        assert_eq!(e.run(&honest).action, XDP_TX, "v6={v6}: a true length, second packet");
        let r = e.reasons();
        assert_eq!(
            (r[reasons::DROP_MALFORMED_L4 as usize], r[reasons::DROP_TOO_BIG as usize], r[reasons::TX as usize]),
            (3, 0, 2),
            "v6={v6}"
        );
        assert_eq!(e.dp.flow_count(), 1, "v6={v6}: only the true packet opened a flow");
    }
}

/// Echo requests with IPv4 options or IPv6 extension headers pass to the
/// host (its stack answers them right); requests from a multicast or
/// broadcast source address, or a multicast source MAC, are never answered:
/// dropped, counted `drop_malformed_l4`.
#[test]
fn echo_answers_only_plain_unicast_requests() {
    for v6 in [false, true] {
        let mut e = Engine::new();
        let s = spec(v6, L4::Tcp, Forwarding::Dsr);
        e.apply(std::slice::from_ref(&s));
        let request = if v6 { 128 } else { 8 };
        let plain = echo(client(v6, 5), s.addr, request, 57);
        let with_headers =
            if v6 { packets::with_ipv6_ext(&plain, 60) } else { packets::with_ipv4_options(&plain, &[1, 1, 1, 1]) };
        let out = e.run(&with_headers);
        assert_eq!((out.action, &out.frame), (XDP_PASS, &with_headers), "v6={v6}: options / extension headers");
        let groups: &[&str] = if v6 {
            &["ff02::1", "ff0e::db8:1", "::", "::1"]
        } else {
            &["224.0.0.1", "239.1.2.3", "255.255.255.255", "0.0.0.0", "127.0.0.1"]
        };
        for g in groups {
            let input = echo(g.parse().unwrap(), s.addr, request, 57);
            assert_eq!(e.run(&input).action, XDP_DROP, "v6={v6}: from {g}");
        }
        for mac in [[0x01, 0x00, 0x5e, 0, 0, 1], [0x33, 0x33, 0, 0, 0, 1], [0xff; 6]] {
            let mut input = plain.clone();
            input[6..12].copy_from_slice(&mac);
            assert_eq!(e.run(&input).action, XDP_DROP, "v6={v6}: from MAC {mac:02x?}");
        }
        assert_eq!(e.run(&plain).action, XDP_TX, "v6={v6}: a plain unicast request");
        let r = e.reasons();
        assert_eq!(
            (
                r[reasons::PASS_VIP_OTHER_PROTO as usize],
                r[reasons::DROP_MALFORMED_L4 as usize],
                r[reasons::TX as usize]
            ),
            (1, groups.len() as u64 + 3, 1),
            "v6={v6}"
        );
    }
}

/// An IP-in-IP packet too big, from a multicast or broadcast source (address
/// or MAC): dropped, counted `drop_too_big`, never answered.
#[test]
fn too_big_is_never_answered_to_a_group() {
    for v6 in [false, true] {
        let mut e = Engine::new();
        let s = spec(v6, L4::Udp, Forwarding::Ipip);
        e.apply(std::slice::from_ref(&s));
        let len = MTU as usize + 14;
        let sources: &[&str] = if v6 { &["ff02::1", "::"] } else { &["224.0.0.1", "255.255.255.255"] };
        for g in sources {
            let input = claiming(g.parse().unwrap(), s.addr, len, len as u16 - 14);
            assert_eq!(e.run(&input).action, XDP_DROP, "v6={v6}: from {g}");
        }
        let mut input = claiming(client(v6, 2), s.addr, len, len as u16 - 14);
        input[6] = 0x01;
        assert_eq!(e.run(&input).action, XDP_DROP, "v6={v6}: from a multicast MAC");
        input[6] = packets::CLIENT_MAC[0];
        assert_eq!(e.run(&input).action, XDP_TX, "v6={v6}: from a unicast client: answered");
        let r = e.reasons();
        assert_eq!(r[reasons::DROP_TOO_BIG as usize], sources.len() as u64 + 2, "v6={v6}");
        assert_eq!(r.iter().sum::<u64>(), sources.len() as u64 + 2, "v6={v6}: one reason each");
    }
}

/// IPv6 with an interface MTU below 1320: the MTU that fits is below 1280,
/// which hosts ignore (RFC 8201 4). Not answered (a 1280 would be a lie):
/// dropped, counted `drop_too_big`. From 1320 on it is answered.
#[test]
fn ipip6_too_big_below_the_ipv6_minimum_mtu_is_not_answered() {
    for (mtu, answered) in [(1300u32, false), (1319, false), (1320, true)] {
        let mut e = Engine::new();
        let mut cfg = e.dp.config().unwrap();
        cfg.mtu = mtu;
        e.dp.set_config(&cfg).unwrap();
        let s = spec(true, L4::Udp, Forwarding::Ipip);
        e.apply(std::slice::from_ref(&s));
        // One byte too big after the 40-byte outer header.
        let len = 14 + mtu as usize - 40 + 1;
        let input = claiming(client(true, 4), s.addr, len, len as u16 - 14);
        let out = e.run(&input);
        assert_eq!(out.action, if answered { XDP_TX } else { XDP_DROP }, "MTU {mtu}");
        if answered {
            let icmp = &out.frame[14 + 40..14 + 48];
            assert_eq!((icmp[0], icmp[1], &icmp[4..]), (2, 0, &[0, 0, 0x05, 0x00][..]), "packet too big, MTU 1280");
            assert_eq!(packets::transport_checksum_ok(&out.frame[14..]), Some(true));
        }
        assert_eq!(e.reasons()[reasons::DROP_TOO_BIG as usize], 1, "MTU {mtu}");
        // IPv4 at the same MTU is still answered (its minimum is 68).
        let s4 = spec(false, L4::Udp, Forwarding::Ipip);
        e.apply(&[s.clone(), s4.clone()]);
        let len4 = 14 + mtu as usize - 20 + 1;
        let input4 = claiming(client(false, 4), s4.addr, len4, len4 as u16 - 14);
        assert_eq!(e.run(&input4).action, XDP_TX, "IPv4 at MTU {mtu}");
    }
}

// ------------------------------------------------------------------ NAT state
// Spoofed packets must not hold NAT state: only a SYN creates TCP state; a
// connection stays unconfirmed (embryonic, then answered) until its client
// acknowledges the backend's SYN-ACK (UDP: sends again after a reply); no
// packet extends an unconfirmed connection's life; the controller's sweep
// forgets (or, above the high-water mark, reclaims) unconfirmed ones.

use lb_common::maps::{NAT_ANSWERED, NAT_CLOSED, NAT_EMBRYONIC, NAT_OPEN};
use lb_userspace::config::NatSettings;
use std::time::Duration;

/// A client → VIP TCP segment with these flags.
fn tcp_with_flags(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8) -> Vec<u8> {
    let mut f = frame(L4::Tcp, src, sport, dst, dport);
    let l4 = if src.is_ipv4() { 34 } else { 54 };
    assert_eq!(f[l4 + 13], 0, "frame() sends no flags");
    f[l4 + 13] = flags;
    // RFC 1624: the checksum's sum grows by the flags' value.
    let old = u16::from_be_bytes([f[l4 + 16], f[l4 + 17]]);
    let mut sum = !old as u32 + flags as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    f[l4 + 16..l4 + 18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    assert!(packets::l4_checksum_ok(&f[14..]));
    f
}

/// Sets the IPv4 TTL / IPv6 hop limit, keeping the header checksum valid.
fn with_hops(frame: &[u8], hops: u8) -> Vec<u8> {
    let mut f = frame.to_vec();
    if f[12..14] == [0x86, 0xdd] {
        f[21] = hops;
    } else {
        f[22] = hops;
        f[24..26].copy_from_slice(&[0, 0]);
        let c = packets::checksum(&f[14..34]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
    }
    f
}

/// The frame from another source MAC.
fn from_mac(frame: &[u8], mac: [u8; 6]) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[6..12].copy_from_slice(&mac);
    f
}

fn nat_sweep(e: &Engine, nat: &NatSettings) -> lb_userspace::walks::NatSweep {
    let mut maps = e.dp.walk_maps().expect("walk handles");
    lb_userspace::walks::sweep_nat(&mut maps.nat, nat, Duration::from_secs(30)).expect("a NAT sweep")
}

/// Settings whose embryonic timeout a test can wait out.
fn short_embryonic() -> NatSettings {
    NatSettings { embryonic_timeout: Duration::from_millis(300), ..Default::default() }
}

/// Longer than `short_embryonic`'s timeout.
const PAST_EMBRYONIC: Duration = Duration::from_millis(400);

fn nat_engine(table: u32) -> Engine {
    Engine::with_sizes(lb_userspace::dataplane::MapSizes {
        max_vips: 8,
        max_backends: 64,
        conntrack: 1024,
        maglev_pool: 4 * 65_537,
        nat_table: table,
    })
}

/// The client's first packet of a connection: a SYN, or a datagram.
fn first_packet(l4: L4, c: IpAddr, sport: u16, s: &VipSpec) -> Vec<u8> {
    if l4 == L4::Tcp { packets::syn(c, sport, s.addr, s.port) } else { frame(l4, c, sport, s.addr, s.port) }
}

fn nat_entries(e: &Engine) -> (usize, usize) {
    (e.dp.nat_flows().len(), e.dp.nat_replies().len())
}

/// A TCP segment other than a SYN, of a 5-tuple NAT does not track, creates
/// nothing; it is dropped and counted as `drop_malformed_l4`.
#[test]
fn nat_creates_tcp_state_only_from_a_syn() {
    for v6 in [false, true] {
        let mut e = Engine::new();
        let s = nat_spec(v6, L4::Tcp);
        e.apply(std::slice::from_ref(&s));
        // ACK, none, FIN+ACK, RST, SYN+ACK, PSH+ACK: none opens a connection.
        for (i, flags) in [0x10u8, 0x00, 0x11, 0x04, 0x12, 0x18].into_iter().enumerate() {
            let spoofed = tcp_with_flags(client(v6, i as u32), 7000, s.addr, 80, flags);
            let out = e.run(&spoofed);
            assert_eq!(out.action, XDP_DROP, "v6={v6} flags {flags:#x}");
        }
        assert_eq!(nat_entries(&e), (0, 0), "v6={v6}: state created");
        let r = e.reasons();
        assert_eq!((r[reasons::DROP_MALFORMED_L4 as usize], r[reasons::CONNTRACK_MISS as usize]), (6, 6));
        assert_eq!((r[reasons::TX as usize], r[reasons::DROP_NAT_TABLE_FULL as usize]), (0, 0));
        // A SYN does, and then the same 5-tuple's ACK follows it.
        let c = client(v6, 0);
        assert_eq!(e.run(&packets::syn(c, 7000, s.addr, 80)).action, XDP_TX);
        assert_eq!(e.run(&tcp_with_flags(c, 7000, s.addr, 80, 0x10)).action, XDP_TX);
        assert_eq!(nat_entries(&e), (1, 1));
    }
}

/// Review item 1. A SYN or a UDP datagram creates both entries embryonic;
/// the backend's SYN-ACK (any UDP reply) makes them answered, not open;
/// only the client's ACK of that SYN-ACK (ack = ISN + 1; UDP: another
/// datagram) opens them. Nothing else the client sends does: a wrong
/// acknowledgment number, a retransmitted SYN, a RST. A SYN reusing a
/// closed connection's port starts embryonic again.
#[test]
fn nat_connections_open_only_when_the_client_confirms_the_backends_answer() {
    for (v6, l4) in [(false, L4::Tcp), (true, L4::Tcp), (false, L4::Udp), (true, L4::Udp)] {
        let what = format!("v6={v6} {l4:?}");
        let mut e = Engine::new();
        let s = nat_spec(v6, l4);
        e.apply(std::slice::from_ref(&s));
        let c = client(v6, 3);
        let first = first_packet(l4, c, 7001, &s);
        let out = e.run(&first);
        assert_eq!(out.action, XDP_TX, "{what}");
        assert_nat_states(&e, NAT_EMBRYONIC, &what);
        // The client alone (a retransmission; for TCP a spoofer's RST and ACK too) does not open it.
        assert_eq!(e.run(&first).action, XDP_TX);
        if l4 == L4::Tcp {
            assert_eq!(e.run(&tcp_with_flags(c, 7001, s.addr, s.port, 0x04)).action, XDP_TX);
            assert_eq!(e.run(&confirmation(&first, ISN)).action, XDP_TX);
            // The backend's bare segment (not a SYN-ACK) answers nothing.
            assert_eq!(e.run(&answer(&out.frame)).action, XDP_TX);
        }
        assert_nat_states(&e, NAT_EMBRYONIC, &what);
        // The backend answers: both directions answered, not open.
        let answer = if l4 == L4::Tcp { syn_ack(&out.frame, ISN) } else { answer(&out.frame) };
        assert_eq!(e.run(&answer).action, XDP_TX, "{what}");
        assert_nat_states(&e, NAT_ANSWERED, &what);
        if l4 == L4::Tcp {
            assert_eq!(e.dp.nat_flows()[0].1.backend_isn, ISN, "{what}: the backend's ISN kept");
            // Acknowledging anything but the SYN-ACK (a guess), or with SYN or RST set: still answered.
            for (flags, ack) in [(0x10, ISN), (0x10, ISN.wrapping_add(2)), (0x10, 0), (0x12, ISN + 1), (0x14, ISN + 1)]
            {
                assert_eq!(e.run(&tcp_segment(&first, flags, 1001, ack)).action, XDP_TX, "{what}");
                assert_nat_states(&e, NAT_ANSWERED, &format!("{what}: flags {flags:#x} ack {ack:#x}"));
            }
            assert_eq!(e.run(&first).action, XDP_TX, "a retransmitted SYN");
            assert_nat_states(&e, NAT_ANSWERED, &what);
        }
        // The client confirms: both directions open.
        assert_eq!(e.run(&confirmation(&first, ISN)).action, XDP_TX, "{what}");
        assert_nat_states(&e, NAT_OPEN, &what);
        if l4 == L4::Tcp {
            // RST, then the client reuses its port: a new connection, embryonic.
            assert_eq!(e.run(&tcp_with_flags(c, 7001, s.addr, s.port, 0x04)).action, XDP_TX);
            assert_eq!(e.dp.nat_flows()[0].1.state, NAT_CLOSED, "{what}");
            assert_eq!(e.run(&first).action, XDP_TX);
            assert_nat_states(&e, NAT_EMBRYONIC, &format!("{what}: the port reused"));
        }
    }
}

/// Review item 1, the controller's side: a spoofed SYN answered by the
/// backend's SYN-ACK (and retransmissions of both), or a spoofed datagram
/// answered by a reply, is forgotten `embryonic_timeout` after it was
/// created; connections whose client confirmed stay.
#[test]
fn nat_answered_but_unconfirmed_connections_are_swept_after_the_embryonic_timeout() {
    let mut e = Engine::new();
    let (tcp, mut udp) = (nat_spec(false, L4::Tcp), nat_spec(false, L4::Udp));
    udp.name = "dns4".into();
    e.apply(&[tcp.clone(), udp.clone()]);
    for i in 0..20 {
        let syn = packets::syn(client(false, i), 7002, tcp.addr, 80);
        let datagram = frame(L4::Udp, client(false, i), 7002, udp.addr, 53);
        let (to_tcp, to_udp) = (e.run(&syn), e.run(&datagram));
        assert_eq!((to_tcp.action, to_udp.action), (XDP_TX, XDP_TX));
        if i % 2 == 0 {
            // Real clients: the whole opening.
            open_connection(&mut e, &syn, &to_tcp.frame);
            open_connection(&mut e, &datagram, &to_udp.frame);
        } else {
            // Spoofed: the backend answers, twice; the spoofer repeats its SYN.
            for _ in 0..2 {
                assert_eq!(e.run(&syn_ack(&to_tcp.frame, ISN)).action, XDP_TX);
                assert_eq!(e.run(&answer(&to_udp.frame)).action, XDP_TX);
                assert_eq!(e.run(&syn).action, XDP_TX);
            }
        }
    }
    assert_eq!(nat_entries(&e), (40, 40));
    let nat = short_embryonic();
    let before = nat_sweep(&e, &nat);
    assert_eq!((before.connections, before.evicted_embryonic), (40, 0), "young: kept");
    std::thread::sleep(PAST_EMBRYONIC);
    let after = nat_sweep(&e, &nat);
    assert_eq!((after.connections, after.evicted_embryonic, after.evicted_idle), (20, 20, 0), "{after:?}");
    assert!(!after.pressure);
    assert_eq!(nat_entries(&e), (20, 20));
    assert_nat_states(&e, NAT_OPEN, "the confirmed ones");
}

/// Review item 1: a reply counts only from the backend side. One-armed (the
/// harness's CONFIG: one interface), a "backend → client" frame from any MAC
/// but the backend's is not a reply: passed untouched, the connection stays
/// embryonic. Two-armed, a reply must come in on the backend interface.
#[test]
fn nat_replies_count_only_from_the_backend_side() {
    for v6 in [false, true] {
        let mut e = Engine::new();
        let s = nat_spec(v6, L4::Tcp);
        e.apply(std::slice::from_ref(&s));
        let c = client(v6, 4);
        let out = e.run(&packets::syn(c, 7006, s.addr, 80));
        let b = backend_of(&out.frame);
        // A host on the client segment forges the backend's SYN-ACK.
        for mac in [packets::CLIENT_MAC, [0x02, 0xee, 0, 0, 0, 1], backend_mac(b + 1)] {
            let forged = from_mac(&syn_ack(&out.frame, ISN), mac);
            let got = e.run(&forged);
            assert_eq!((got.action, &got.frame), (XDP_PASS, &forged), "v6={v6} from {mac:02x?}");
        }
        assert_nat_states(&e, NAT_EMBRYONIC, "forged SYN-ACKs");
        assert_eq!(e.reasons()[reasons::PASS_NOT_VIP as usize], 3);
        assert_eq!(e.run(&syn_ack(&out.frame, ISN)).action, XDP_TX, "the backend's own");
        assert_nat_states(&e, NAT_ANSWERED, "the backend's SYN-ACK");
    }
    // Two-armed. BPF_PROG_TEST_RUN delivers on the loopback interface (index 1).
    let mut e = Engine::new();
    let s = nat_spec(false, L4::Tcp);
    e.apply(std::slice::from_ref(&s));
    let mut cfg = e.dp.config().unwrap();
    (cfg.client_ifindex, cfg.backend_ifindex) = (1, 1000);
    e.dp.set_config(&cfg).unwrap();
    let out = e.run(&packets::syn(client(false, 5), 7006, s.addr, 80));
    // The backend port has no device in the test: the redirect fails, the state stays.
    assert_eq!(e.reasons()[reasons::DROP_REDIRECT_FAILED as usize], 1);
    assert_nat_states(&e, NAT_EMBRYONIC, "two-armed: the SYN");
    // The frame as it would have left toward the backend.
    let mut forwarded = out.frame.clone();
    forwarded[0..6].copy_from_slice(&backend_mac(e.predicted_backend(&s, client(false, 5), 7006)));
    let syn_ack = syn_ack(&forwarded, ISN);
    let got = e.run(&syn_ack);
    assert_eq!((got.action, &got.frame), (XDP_PASS, &syn_ack), "in on the client interface: not a reply");
    assert_nat_states(&e, NAT_EMBRYONIC, "two-armed: a SYN-ACK from the client side");
    (cfg.client_ifindex, cfg.backend_ifindex) = (1000, 1);
    e.dp.set_config(&cfg).unwrap();
    e.run(&syn_ack);
    assert_eq!(e.reasons()[reasons::DROP_REDIRECT_FAILED as usize], 2, "translated, sent toward the client");
    assert_nat_states(&e, NAT_ANSWERED, "two-armed: a SYN-ACK from the backend side");
}

/// Review item 2: the client's MAC is fixed by the packets that prove the
/// connection (its SYN, the ACK of the backend's SYN-ACK, a SYN reusing a
/// closed connection's port), not by any segment of its 5-tuple: a host on
/// the client segment sending the victim's tuple from its own MAC redirects
/// nothing. A group (multicast, broadcast) source MAC is refused, counted
/// as `drop_malformed_l4`, and creates nothing.
#[test]
fn nat_client_mac_comes_only_from_the_handshake() {
    let hijacker = [0x02, 0xee, 0, 0, 0, 0x66];
    for v6 in [false, true] {
        let mut e = Engine::new();
        let s = nat_spec(v6, L4::Tcp);
        e.apply(std::slice::from_ref(&s));
        let c = client(v6, 12);
        for group in [[0x01, 0x00, 0x5e, 0, 0, 1], [0x33, 0x33, 0, 0, 0, 1], [0xff; 6]] {
            let syn = from_mac(&packets::syn(c, 7007, s.addr, 80), group);
            assert_eq!(e.run(&syn).action, XDP_DROP, "v6={v6} from {group:02x?}");
        }
        assert_eq!(nat_entries(&e), (0, 0));
        assert_eq!(e.reasons()[reasons::DROP_MALFORMED_L4 as usize], 3);

        let syn = packets::syn(c, 7007, s.addr, 80);
        let out = e.run(&syn);
        open_connection(&mut e, &syn, &out.frame);
        let reply = answer(&out.frame);
        // Aged past any once-a-second refresh: the old code would follow the next segment.
        let mut maps = e.dp.walk_maps().unwrap();
        let (key, mut flow) = e.dp.nat_flows()[0];
        flow.last_seen_ns -= 2 << 30;
        maps.nat.nat_flows.insert(key, flow, 0).unwrap();
        for flags in [0x10, 0x18, 0x11] {
            let ack = from_mac(&tcp_with_flags(c, 7007, s.addr, 80, flags), hijacker);
            assert_eq!(e.run(&ack).action, XDP_TX, "forwarded all the same");
        }
        // A group source MAC on the open connection: refused too.
        let bcast = from_mac(&tcp_with_flags(c, 7007, s.addr, 80, 0x10), [0xff; 6]);
        assert_eq!(e.run(&bcast).action, XDP_DROP);
        let back = e.run(&reply);
        assert_eq!((back.action, back.frame[0..6].to_vec()), (XDP_TX, packets::CLIENT_MAC.to_vec()), "v6={v6}");

        // The client's port reused after a RST: the new SYN's MAC holds.
        assert_eq!(e.run(&tcp_with_flags(c, 7007, s.addr, 80, 0x04)).action, XDP_TX);
        let router = [0x02, 0xc1, 0, 0, 0, 0x77];
        let syn2 = from_mac(&syn, router);
        let out = e.run(&syn2);
        assert_eq!(e.run(&syn_ack(&out.frame, ISN)).frame[0..6], router);
        // And the ACK of the SYN-ACK sets it as well.
        let ack = from_mac(&confirmation(&syn, ISN), hijacker);
        assert_eq!(e.run(&ack).action, XDP_TX);
        assert_nat_states(&e, NAT_OPEN, "confirmed");
        assert_eq!(e.run(&reply).frame[0..6], hijacker, "v6={v6}: the MAC that completed the handshake");
    }
}

/// Review item 3: a packet NAT would forward that arrives with TTL / hop
/// limit 1 or 0 is dropped (`drop_malformed_l4`), never passed to the local
/// stack (which may hold the VIP), and creates nothing; so is a reply. TTL
/// and hop limit count down both ways, checksums valid.
#[test]
fn nat_drops_last_hop_packets_and_counts_hops_down() {
    for v6 in [false, true] {
        let mut e = Engine::new();
        let s = nat_spec(v6, L4::Tcp);
        e.apply(std::slice::from_ref(&s));
        let c = client(v6, 11);
        for hops in [1, 0] {
            let last = with_hops(&packets::syn(c, 7005, s.addr, 80), hops);
            assert_eq!(e.run(&last).action, XDP_DROP, "v6={v6} hops {hops}");
        }
        assert_eq!(nat_entries(&e), (0, 0), "state for a packet that went nowhere");
        assert_eq!(e.reasons()[reasons::DROP_MALFORMED_L4 as usize], 2);
        assert_eq!(e.reasons()[reasons::PASS_MALFORMED_L3 as usize], 0);

        let syn = with_hops(&packets::syn(c, 7005, s.addr, 80), 2);
        let out = e.run(&syn);
        assert_eq!(out.action, XDP_TX);
        let hop_at = if v6 { 21 } else { 22 };
        assert_eq!(out.frame[hop_at], 1, "counted down");
        if !v6 {
            assert!(packets::ipv4_header_ok(&out.frame[14..]));
        }
        let reply = syn_ack(&out.frame, ISN);
        let back = e.run(&reply);
        assert_eq!((back.action, back.frame[hop_at]), (XDP_TX, 63));
        if !v6 {
            assert!(packets::ipv4_header_ok(&back.frame[14..]));
        }
        assert!(packets::l4_checksum_ok(&back.frame[14..]));
        // A reply arriving with TTL 1: dropped.
        assert_eq!(e.run(&with_hops(&reply, 1)).action, XDP_DROP);
        assert_eq!(e.reasons()[reasons::DROP_MALFORMED_L4 as usize], 3);
        assert_eq!(e.reasons()[reasons::PASS_MALFORMED_L3 as usize], 0);
    }
}

/// Review item 4: nothing extends an unconfirmed connection's life: its
/// entries keep their creation time through repeated SYNs, RSTs and the
/// backend's retransmitted SYN-ACKs, and the sweep forgets it
/// `embryonic_timeout` after its creation.
#[test]
fn nat_repeated_syns_do_not_keep_an_unconfirmed_connection() {
    let mut e = Engine::new();
    let s = nat_spec(false, L4::Tcp);
    e.apply(std::slice::from_ref(&s));
    let c = client(false, 13);
    let syn = packets::syn(c, 7008, s.addr, 80);
    let out = e.run(&syn);
    let created = (e.dp.nat_flows()[0].1.last_seen_ns, e.dp.nat_replies()[0].1.last_seen_ns);
    let nat = short_embryonic();
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..3 {
        assert_eq!(e.run(&syn).action, XDP_TX);
        assert_eq!(e.run(&tcp_with_flags(c, 7008, s.addr, 80, 0x04)).action, XDP_TX);
        assert_eq!(e.run(&syn_ack(&out.frame, ISN)).action, XDP_TX);
    }
    assert_eq!((e.dp.nat_flows()[0].1.last_seen_ns, e.dp.nat_replies()[0].1.last_seen_ns), created);
    assert_eq!(nat_sweep(&e, &nat).evicted_embryonic, 0, "younger than the timeout");
    std::thread::sleep(Duration::from_millis(150));
    // 350 ms after its creation, 150 ms after the last SYN.
    let sweep = nat_sweep(&e, &nat);
    assert_eq!((sweep.evicted_embryonic, sweep.connections), (1, 0), "{sweep:?}");
    assert_eq!(nat_entries(&e), (0, 0));
}

/// Review item 5: the sweep reads the tables, then acts. A connection the
/// client confirms in between (read unconfirmed and past the timeout) stays.
#[test]
fn nat_sweep_rereads_an_unconfirmed_connection_before_removing_it() {
    let mut e = Engine::new();
    let s = nat_spec(false, L4::Tcp);
    e.apply(std::slice::from_ref(&s));
    let syn = packets::syn(client(false, 14), 7009, s.addr, 80);
    let out = e.run(&syn);
    assert_eq!(e.run(&syn_ack(&out.frame, ISN)).action, XDP_TX);
    std::thread::sleep(PAST_EMBRYONIC);
    let mut maps = e.dp.walk_maps().unwrap();
    let ack = confirmation(&syn, ISN);
    let sweep = lb_userspace::walks::sweep_nat_with(&mut maps.nat, &short_embryonic(), Duration::from_secs(30), || {
        assert_eq!(e.run(&ack).action, XDP_TX, "the client confirms while the sweep runs");
    })
    .unwrap();
    assert_eq!((sweep.evicted_embryonic, sweep.connections), (0, 1), "{sweep:?}");
    assert_nat_states(&e, NAT_OPEN, "confirmed during the sweep");
}

/// Review item 6, what holds: a segment other than a SYN never adds a
/// connection for a 5-tuple without one. On a connection whose backend went
/// it re-steers: the client-side entry is rewritten to the newly chosen
/// backend, embryonic (so that backend's RST reaches the client), with a
/// reply entry for that backend; nothing the client sends confirms it, and
/// the sweep forgets it after `embryonic_timeout`.
#[test]
fn nat_a_segment_of_a_connection_whose_backend_went_is_resteered_unconfirmed() {
    let mut e = Engine::new();
    let s = nat_spec(false, L4::Tcp);
    e.apply(std::slice::from_ref(&s));
    let c = client(false, 15);
    let syn = packets::syn(c, 7010, s.addr, 80);
    let out = e.run(&syn);
    open_connection(&mut e, &syn, &out.frame);
    let b = backend_of(&out.frame);
    let mut without = s.clone();
    without.backends.remove(b);
    e.apply(std::slice::from_ref(&without));
    let ack = tcp_with_flags(c, 7010, s.addr, 80, 0x10);
    let moved = e.run(&ack);
    assert_eq!(moved.action, XDP_TX);
    assert_ne!(moved.frame[0..6], backend_mac(b), "to another backend");
    assert_eq!(e.reasons()[reasons::CONNTRACK_STALE as usize], 1);
    assert_eq!(e.dp.nat_flows().len(), 1, "rewritten, not added");
    assert_eq!(e.dp.nat_flows()[0].1.state, NAT_EMBRYONIC);
    // The new backend's RST goes back to the client.
    let rst = tcp_segment(&answer(&moved.frame), 0x04, 0, 0);
    assert_eq!(e.run(&rst).action, XDP_TX, "the new backend's RST reaches the client");
    for _ in 0..3 {
        assert_eq!(e.run(&ack).action, XDP_TX);
    }
    assert_eq!(e.dp.nat_flows()[0].1.state, NAT_EMBRYONIC, "the client cannot confirm it");
    std::thread::sleep(PAST_EMBRYONIC);
    let nat = NatSettings { closed_timeout: Duration::from_millis(1), ..short_embryonic() };
    let sweep = nat_sweep(&e, &nat);
    assert_eq!(sweep.evicted_embryonic, 1, "{sweep:?}");
    assert_eq!(nat_entries(&e), (0, 0), "the old backend's reply entry went too, as an orphan");
}

/// Spoofed SYNs fill the table and refuse a real connection; one sweep (the
/// timeout has not passed) reclaims the oldest unconfirmed entries down to
/// the low-water mark, keeps every confirmed connection and the youngest
/// unconfirmed ones, and new connections get in again.
#[test]
fn nat_a_full_table_gives_up_its_oldest_embryonic_connections() {
    const TABLE: u32 = 1024;
    let mut e = nat_engine(TABLE);
    let s = nat_spec(false, L4::Tcp);
    e.apply(std::slice::from_ref(&s));
    // 100 real connections, confirmed.
    for i in 0..100 {
        let syn = packets::syn(client(false, i), 7003, s.addr, 80);
        let out = e.run(&syn);
        open_connection(&mut e, &syn, &out.frame);
    }
    // Spoofed SYNs until the table refuses; the backend answers every other one.
    let mut spoofed = 0;
    loop {
        let out = e.run(&packets::syn(client(false, 1000 + spoofed), 7003, s.addr, 80));
        if out.action != XDP_TX {
            break;
        }
        if spoofed % 2 == 0 {
            assert_eq!(e.run(&syn_ack(&out.frame, ISN)).action, XDP_TX);
        }
        spoofed += 1;
        assert!(spoofed < 2 * TABLE, "the table never filled");
    }
    assert_eq!(100 + spoofed, TABLE);
    assert_eq!(e.run(&packets::syn(client(false, 9999), 7003, s.addr, 80)).action, XDP_DROP, "a real SYN refused");
    assert_eq!(e.reasons()[reasons::DROP_NAT_TABLE_FULL as usize], 2);

    let sweep = nat_sweep(&e, &NatSettings::default());
    assert!(sweep.pressure, "{sweep:?}");
    let low = TABLE as u64 * lb_userspace::walks::NAT_LOW_WATER / 10;
    assert_eq!(sweep.occupancy_after, low, "{sweep:?}");
    assert_eq!(sweep.reclaimed, TABLE as u64 - low);
    assert_eq!(sweep.evicted_embryonic + sweep.evicted_idle + sweep.evicted_closed, 0, "nothing timed out");
    let left: std::collections::HashSet<IpAddr> =
        e.dp.nat_flows().into_iter().map(|(k, _)| addr::from_words(&k.src, k.family)).collect();
    assert!((0..100).all(|i| left.contains(&client(false, i))), "a confirmed connection was reclaimed");
    // Oldest first: the spoofed SYNs that came last are the ones left.
    let kept = (low - 100) as u32;
    assert!((spoofed - kept..spoofed).all(|i| left.contains(&client(false, 1000 + i))), "not the oldest reclaimed");
    assert!((0..spoofed - kept).all(|i| !left.contains(&client(false, 1000 + i))));
    // Room again.
    let out = e.run(&packets::syn(client(false, 9999), 7003, s.addr, 80));
    assert_eq!(out.action, XDP_TX, "a real SYN after the sweep");
    // Below the high-water mark the next sweep reclaims nothing.
    let calm = nat_sweep(&e, &NatSettings::default());
    assert!(!calm.pressure && calm.reclaimed == 0, "{calm:?}");
}

/// The reply entry is inserted with BPF_NOEXIST. A reply 5-tuple another
/// VIP holds is never taken over (the newcomer is refused, the other's
/// replies still go back from its VIP); one left behind by this VIP's
/// previous connection on the port is taken over, embryonic.
#[test]
fn nat_never_takes_over_another_vips_reply_mapping() {
    let mut e = Engine::new();
    // Two VIPs, one backend server (same address and port) behind both.
    let a = nat_spec(false, L4::Tcp);
    let mut b = vip("other", "198.18.0.101", 80, L4::Tcp, Forwarding::Nat, &BACKENDS4[..1]);
    b.backends[0].port = 8080;
    let mut a1 = a.clone();
    a1.backends.truncate(1);
    e.apply(&[a1.clone(), b.clone()]);
    let c = client(false, 7);
    let syn_a = packets::syn(c, 7004, a1.addr, 80);
    let to_a = e.run(&syn_a);
    assert_eq!(to_a.action, XDP_TX);
    open_connection(&mut e, &syn_a, &to_a.frame);
    // The same client port to the other VIP: the same reply 5-tuple.
    assert_eq!(e.run(&packets::syn(c, 7004, b.addr, 80)).action, XDP_DROP);
    assert_eq!(e.reasons()[reasons::DROP_NAT_TABLE_FULL as usize], 1);
    assert_eq!(nat_entries(&e), (1, 1), "no state for the refused one");
    let back = e.run(&answer(&to_a.frame));
    assert_eq!(back.action, XDP_TX);
    assert_eq!(back.frame[26..30], [198, 18, 0, 100], "A's replies still come from A");
    assert_nat_states(&e, NAT_OPEN, "A's connection untouched");
    // A's client-side entry forgotten, its reply entry left behind: the next
    // SYN on the port takes the reply entry over, from the new MAC.
    let (key, _) = e.dp.nat_flows()[0];
    e.dp.remove_nat_flow(&key);
    let syn = from_mac(&packets::syn(c, 7004, a1.addr, 80), [0x02, 0xc1, 0, 0, 0, 0x42]);
    assert_eq!(e.run(&syn).action, XDP_TX);
    assert_nat_states(&e, NAT_EMBRYONIC, "a new connection on the port");
    assert_eq!(e.dp.nat_replies()[0].1.client_mac, [0x02, 0xc1, 0, 0, 0, 0x42]);
}

/// Review item 7: how much of the NAT table spoofed floods hold. Spoofed
/// ACKs: nothing at all. Spoofed SYNs answered by the backend's SYN-ACKs,
/// spoofed datagrams answered by replies: nothing after one sweep past the
/// embryonic timeout.
#[test]
fn nat_occupancy_under_spoofed_floods() {
    const N: u32 = 10_000;
    let nat = NatSettings { embryonic_timeout: Duration::from_secs(1), ..Default::default() };
    let client_n = |i: u32| -> IpAddr { format!("198.18.{}.{}", 128 + i / 250, 1 + i % 250).parse().unwrap() };
    let mut engines = Vec::new();
    for (what, l4) in [("bare ACKs", L4::Tcp), ("UDP datagrams", L4::Udp), ("SYNs", L4::Tcp)] {
        let mut e = Engine::new();
        let s = nat_spec(false, l4);
        e.apply(std::slice::from_ref(&s));
        for i in 0..N {
            let pkt = match what {
                "bare ACKs" => tcp_with_flags(client_n(i), 9000, s.addr, 80, 0x10),
                "SYNs" => packets::syn(client_n(i), 9000, s.addr, 80),
                _ => frame(L4::Udp, client_n(i), 9000, s.addr, 53),
            };
            let out = e.run(&pkt);
            // The backend answers whatever reaches it, as its kernel would.
            if out.action == XDP_TX {
                let answer = if what == "SYNs" { syn_ack(&out.frame, ISN) } else { answer(&out.frame) };
                assert_eq!(e.run(&answer).action, XDP_TX, "{what}: the backend's answer");
            }
        }
        let held = nat_entries(&e);
        println!("NAT entries after {N} spoofed {what}, answered: {held:?} of {}", e.dp.sizes().nat_table);
        if what == "bare ACKs" {
            assert_eq!(held, (0, 0), "spoofed ACKs hold nothing");
        } else {
            assert_eq!(held, (N as usize, N as usize), "{what}: one connection each until the sweep");
        }
        engines.push((what, e));
    }
    std::thread::sleep(nat.embryonic_timeout + Duration::from_millis(100));
    for (what, e) in &engines {
        let sweep = nat_sweep(e, &nat);
        println!("NAT entries after {N} spoofed {what} and one sweep past the embryonic timeout: {sweep:?}");
        assert_eq!(nat_entries(e), (0, 0), "{what}: left after the sweep");
        assert_eq!(sweep.connections, 0, "{what}");
    }
}

// ------------------------------------------------------- NAT: ICMP errors
// An ICMP error about a NAT connection is translated as Linux's NAT
// translates one (nf_nat_icmp_reply_translation): the outer address on the
// NAT side, the quoted packet's, every checksum. Client side → backend: an
// error to the VIP about a reply the client got (quoted VIP → client) goes
// to the connection's backend, as if the backend's own reply had met it.
// Backend side → client: an error about a packet the backend got (quoted
// client → backend) goes to the client, from the VIP if the backend sent it.
// Neither creates nor refreshes state.

use lb_common::maps::{FlowKey, NatFlow, NatReply};

fn ip_bytes(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// Source, destination, TTL / hop limit, source and destination port of the
/// IP packet `ip` (no IPv4 options or IPv6 extension headers; it may be cut
/// after its ports, as a quote).
fn ip_fields(ip: &[u8]) -> (Vec<u8>, Vec<u8>, u8, u16, u16) {
    let (src, dst, hops, l4) = if ip[0] >> 4 == 6 { (8..24, 24..40, 7, 40) } else { (12..16, 16..20, 8, 20) };
    let port = |at: usize| u16::from_be_bytes([ip[at], ip[at + 1]]);
    (ip[src].to_vec(), ip[dst].to_vec(), ip[hops], port(l4), port(l4 + 2))
}

type NatSnapshot = (Vec<(FlowKey, NatFlow)>, Vec<(FlowKey, NatReply)>);

/// Both NAT tables, every field (`last_seen_ns` too), in key order.
fn nat_snapshot(e: &Engine) -> NatSnapshot {
    let (mut flows, mut replies) = (e.dp.nat_flows(), e.dp.nat_replies());
    flows.sort_by_key(|(k, _)| *k);
    replies.sort_by_key(|(k, _)| *k);
    (flows, replies)
}

/// A NAT connection through the engine.
struct NatConn {
    /// The client's first packet (a SYN, a datagram), and what NAT forwarded of it.
    first: Vec<u8>,
    forwarded: Vec<u8>,
    /// The backend's answer as the backend sent it, and as the client got it.
    answer: Vec<u8>,
    answered: Vec<u8>,
    backend: usize,
}

/// Opens a connection from `c`:`cport` to `s`: the first packet; if
/// `answered`, the backend's answer; if also `confirmed`, the client's
/// confirmation (open).
fn nat_connection(e: &mut Engine, s: &VipSpec, c: IpAddr, cport: u16, answered: bool, confirmed: bool) -> NatConn {
    let l4 = if s.protocol == 6 { L4::Tcp } else { L4::Udp };
    let first = first_packet(l4, c, cport, s);
    let out = e.run(&first);
    assert_eq!(out.action, XDP_TX, "the connection's first packet");
    let forwarded = out.frame;
    let backend = backend_of(&forwarded);
    let answer = if l4 == L4::Tcp { syn_ack(&forwarded, ISN) } else { answer(&forwarded) };
    let mut answered_frame = Vec::new();
    if answered {
        let back = e.run(&answer);
        assert_eq!(back.action, XDP_TX, "the backend's answer");
        answered_frame = back.frame;
        if confirmed {
            assert_eq!(e.run(&confirmation(&first, ISN)).action, XDP_TX, "the client's confirmation");
        }
    }
    NatConn { first, forwarded, answer, answered: answered_frame, backend }
}

/// A router on the backend side.
fn backend_router(v6: bool) -> IpAddr {
    if v6 { "2001:db8:201::1" } else { "198.18.201.1" }.parse().unwrap()
}

/// The first `keep` bytes of the frame's IP packet.
fn quote(frame: &[u8], keep: usize) -> &[u8] {
    &frame[14..14usize.saturating_add(keep).min(frame.len())]
}

/// Checks a translated ICMP error `out` against the `input`: same length
/// and ICMP header, outer and quoted (source, destination, hops, ports) as
/// given, every checksum valid, the quoted transport header (as far as
/// quoted) byte for byte `segment`'s.
#[allow(clippy::too_many_arguments)]
fn assert_translated_error(
    case: &str,
    input: &[u8],
    out: &[u8],
    outer: (IpAddr, IpAddr),
    quoted: ((IpAddr, u16), (IpAddr, u16)),
    segment: &[u8],
) {
    let (ip_in, ip) = (&input[14..], &out[14..]);
    let ip_len = if ip[0] >> 4 == 6 { 40 } else { 20 };
    assert_eq!(out.len(), input.len(), "{case}: length");
    assert_eq!(out[12..14], input[12..14], "{case}: ethertype");
    let (src, dst, hops, _, _) = ip_fields(ip);
    assert_eq!((src, dst), (ip_bytes(outer.0), ip_bytes(outer.1)), "{case}: outer addresses");
    assert_eq!(hops, ip_fields(ip_in).2 - 1, "{case}: TTL / hop limit counted down");
    assert_eq!(ip[ip_len..ip_len + 2], ip_in[ip_len..ip_len + 2], "{case}: ICMP type and code");
    assert_eq!(ip[ip_len + 4..ip_len + 8], ip_in[ip_len + 4..ip_len + 8], "{case}: the MTU / unused word");
    assert!(packets::icmp_error_checksums_ok(ip), "{case}: checksums");
    let q = packets::icmp_quote(ip).expect("a quote");
    let (qsrc, qdst, _, qsport, qdport) = ip_fields(q);
    let ((from, sport), (to, dport)) = quoted;
    assert_eq!((qsrc, qsport), (ip_bytes(from), sport), "{case}: quoted source");
    assert_eq!((qdst, qdport), (ip_bytes(to), dport), "{case}: quoted destination");
    let seg = &q[ip_len..];
    assert_eq!(seg, &segment[..seg.len()], "{case}: the quoted transport header and data");
}

/// An error about a reply the client got (as a router on the way to the
/// client sends it, quoting all of the reply or its first 8 transport
/// bytes) reaches the connection's backend translated: to the backend's
/// address, the quote from the backend's address and port, the quoted
/// segment the backend's own byte for byte (its checksum translated back
/// where quoted, left alone where the quote cuts it off). Counted `tx`.
fn nat_icmp_errors_reach_the_backend(v6: bool, l4: L4) {
    let mut e = Engine::new();
    let s = nat_spec(v6, l4);
    e.apply(std::slice::from_ref(&s));
    let c = client(v6, 21);
    let conn = nat_connection(&mut e, &s, c, 42_000, true, true);
    let backend = s.backends[conn.backend].addr;
    let before = (nat_snapshot(&e), e.reasons());
    let ip_len = if v6 { 40 } else { 20 };
    let mut sent = 0;
    for (kind, code, rest) in icmp_errors(v6) {
        for keep in [usize::MAX, ip_len + 8] {
            let case = format!("v6={v6} {l4:?} type {kind} code {code} quoting {}", quote(&conn.answered, keep).len());
            let input = packets::icmp(router(v6), s.addr, kind, code, rest, quote(&conn.answered, keep));
            let out = e.run(&input);
            assert_eq!(out.action, XDP_TX, "{case}: forwarded");
            sent += 1;
            assert_eq!(out.frame[0..6], backend_mac(conn.backend), "{case}: to the connection's backend");
            assert_eq!(out.frame[6..12], LB_MAC, "{case}");
            let segment = &conn.answer[14 + ip_len..];
            assert_translated_error(
                &case,
                &input,
                &out.frame,
                (router(v6), backend),
                ((backend, 8080), (c, 42_000)),
                segment,
            );
        }
    }
    assert_eq!(nat_snapshot(&e), before.0, "v6={v6} {l4:?}: no NAT state created or refreshed");
    let r = e.reasons();
    assert_eq!(r[reasons::TX as usize] - before.1[reasons::TX as usize], sent, "v6={v6} {l4:?}: counted tx");
    assert_eq!(r.iter().sum::<u64>() - before.1.iter().sum::<u64>(), sent, "v6={v6} {l4:?}: one reason each");
}

#[test]
fn nat_icmp4_errors_about_tcp_reach_the_backend() {
    nat_icmp_errors_reach_the_backend(false, L4::Tcp);
}
#[test]
fn nat_icmp4_errors_about_udp_reach_the_backend() {
    nat_icmp_errors_reach_the_backend(false, L4::Udp);
}
#[test]
fn nat_icmp6_errors_about_tcp_reach_the_backend() {
    nat_icmp_errors_reach_the_backend(true, L4::Tcp);
}
#[test]
fn nat_icmp6_errors_about_udp_reach_the_backend() {
    nat_icmp_errors_reach_the_backend(true, L4::Udp);
}

/// An error from the backend side about a packet the backend got reaches
/// the client translated: the quote to the VIP's address and port (the
/// client's own segment again, byte for byte), the outer source the VIP's
/// if the backend sent it, a router's own address if a router did.
/// Counted `nat_reply`.
fn nat_icmp_errors_reach_the_client(v6: bool, l4: L4) {
    let mut e = Engine::new();
    let s = nat_spec(v6, l4);
    e.apply(std::slice::from_ref(&s));
    let c = client(v6, 22);
    let conn = nat_connection(&mut e, &s, c, 42_001, true, true);
    let backend = s.backends[conn.backend].addr;
    let before = (nat_snapshot(&e), e.reasons());
    let ip_len = if v6 { 40 } else { 20 };
    let mut sent = 0;
    for (from, outer_src) in [(backend, s.addr), (backend_router(v6), backend_router(v6))] {
        for (kind, code, rest) in icmp_errors(v6) {
            for keep in [usize::MAX, ip_len + 8] {
                let case = format!(
                    "v6={v6} {l4:?} from {from} type {kind} code {code} quoting {}",
                    quote(&conn.forwarded, keep).len()
                );
                let error = packets::icmp(from, c, kind, code, rest, quote(&conn.forwarded, keep));
                let input = from_mac(&error, backend_mac(conn.backend));
                let out = e.run(&input);
                assert_eq!(out.action, XDP_TX, "{case}: sent");
                sent += 1;
                assert_eq!(out.frame[0..6], packets::CLIENT_MAC, "{case}: to the client's MAC");
                assert_eq!(out.frame[6..12], LB_MAC, "{case}");
                let segment = &conn.first[14 + ip_len..];
                let quoted = ((c, 42_001), (s.addr, s.port));
                assert_translated_error(&case, &input, &out.frame, (outer_src, c), quoted, segment);
            }
        }
    }
    assert_eq!(nat_snapshot(&e), before.0, "v6={v6} {l4:?}: no NAT state created or refreshed");
    let r = e.reasons();
    let nat_reply = r[reasons::NAT_REPLY as usize] - before.1[reasons::NAT_REPLY as usize];
    assert_eq!(nat_reply, sent, "v6={v6} {l4:?}: counted nat_reply");
    assert_eq!(r.iter().sum::<u64>() - before.1.iter().sum::<u64>(), sent, "v6={v6} {l4:?}: one reason each");
}

#[test]
fn nat_icmp4_errors_about_tcp_reach_the_client() {
    nat_icmp_errors_reach_the_client(false, L4::Tcp);
}
#[test]
fn nat_icmp4_errors_about_udp_reach_the_client() {
    nat_icmp_errors_reach_the_client(false, L4::Udp);
}
#[test]
fn nat_icmp6_errors_about_tcp_reach_the_client() {
    nat_icmp_errors_reach_the_client(true, L4::Tcp);
}
#[test]
fn nat_icmp6_errors_about_udp_reach_the_client() {
    nat_icmp_errors_reach_the_client(true, L4::Udp);
}

/// Only errors about a tracked connection are translated. To the VIP: an
/// error about a tuple NAT does not track, or about an embryonic
/// connection (no reply went out yet to be quoted), passes to the host
/// untouched (`pass_vip_other_proto`) as before; one with TTL / hop limit 1
/// is dropped (`drop_malformed_l4`). From the backend side: an error about
/// an untracked tuple passes untouched (`pass_not_vip`); one about an
/// embryonic connection is translated (the first datagram can meet a closed
/// port). Next to each, the tracked counterpart is translated.
#[test]
fn nat_icmp_errors_about_untracked_tuples_are_not_translated() {
    for (v6, l4) in [(false, L4::Udp), (true, L4::Udp), (false, L4::Tcp), (true, L4::Tcp)] {
        let mut e = Engine::new();
        let s = nat_spec(v6, l4);
        e.apply(std::slice::from_ref(&s));
        let c = client(v6, 23);
        let open = nat_connection(&mut e, &s, c, 43_000, true, true);
        let embryonic = nat_connection(&mut e, &s, c, 43_001, false, false);
        let before = nat_snapshot(&e);
        let (kind, code, rest) = icmp_errors(v6)[1];
        let what = format!("v6={v6} {l4:?}");

        // To the VIP.
        let about = |cport: u16| frame(l4, s.addr, s.port, c, cport);
        let to_vip = |quoted: &[u8]| packets::icmp(router(v6), s.addr, kind, code, rest, &quoted[14..]);
        assert_eq!(e.run(&to_vip(&open.answered)).action, XDP_TX, "{what}: the tracked one");
        for (case, input) in [
            ("untracked", to_vip(&about(43_002))),
            ("embryonic", to_vip(&about(43_001))),
            ("another VIP port", to_vip(&frame(l4, s.addr, 8080, c, 43_000))),
        ] {
            let out = e.run(&input);
            assert_eq!((out.action, &out.frame), (XDP_PASS, &input), "{what}: {case}");
        }
        let last_hop = with_hops(&to_vip(&open.answered), 1);
        assert_eq!(e.run(&last_hop).action, XDP_DROP, "{what}: TTL 1");

        // From the backend side (each connection's own backend).
        let to_client = |conn: &NatConn, quoted: &[u8]| {
            let from = s.backends[conn.backend].addr;
            from_mac(&packets::icmp(from, c, kind, code, rest, &quoted[14..]), backend_mac(conn.backend))
        };
        assert_eq!(e.run(&to_client(&open, &open.forwarded)).action, XDP_TX, "{what}: the tracked one");
        let backend = s.backends[open.backend].addr;
        let untracked = to_client(&open, &frame(l4, c, 43_002, backend, 8080));
        let out = e.run(&untracked);
        assert_eq!((out.action, &out.frame), (XDP_PASS, &untracked), "{what}: untracked, from the backend");
        let out = e.run(&to_client(&embryonic, &embryonic.forwarded));
        assert_eq!(out.action, XDP_TX, "{what}: embryonic, from the backend");
        assert_eq!(ip_fields(&out.frame[14..]).0, ip_bytes(s.addr), "{what}: embryonic, from the VIP");

        assert_eq!(nat_snapshot(&e), before, "{what}: no NAT state created or refreshed");
        let r = e.reasons();
        let count = |reason: u32| r[reason as usize];
        assert_eq!(count(reasons::PASS_VIP_OTHER_PROTO), 3, "{what}");
        assert_eq!(count(reasons::PASS_NOT_VIP), 1, "{what}");
        assert_eq!(count(reasons::DROP_MALFORMED_L4), 1, "{what}");
    }
}

/// An error about a backend-side tuple (quoted client → backend) is
/// accepted only from the backend side, as replies are: one-armed from the
/// backend's MAC, two-armed in on the backend interface. From the client
/// side (the client's MAC, another host's, another backend's; in on the
/// client interface) it passes untouched, `pass_not_vip`; so does one sent
/// to the VIP quoting the backend-side tuple. Nothing is created or refreshed.
#[test]
fn nat_icmp_errors_from_the_client_side_about_a_backend_tuple_are_refused() {
    for v6 in [false, true] {
        let mut e = Engine::new();
        let s = nat_spec(v6, L4::Udp);
        e.apply(std::slice::from_ref(&s));
        let c = client(v6, 24);
        let conn = nat_connection(&mut e, &s, c, 44_000, true, true);
        let backend = s.backends[conn.backend].addr;
        let before = nat_snapshot(&e);
        let (kind, code, rest) = icmp_errors(v6)[1];
        let error = packets::icmp(backend, c, kind, code, rest, &conn.forwarded[14..]);
        for mac in [packets::CLIENT_MAC, [0x02, 0xee, 0, 0, 0, 1], backend_mac(conn.backend + 1)] {
            let spoofed = from_mac(&error, mac);
            let out = e.run(&spoofed);
            assert_eq!((out.action, &out.frame), (XDP_PASS, &spoofed), "v6={v6} from {mac:02x?}");
        }
        let to_vip = packets::icmp(c, s.addr, kind, code, rest, &conn.forwarded[14..]);
        let out = e.run(&to_vip);
        assert_eq!((out.action, &out.frame), (XDP_PASS, &to_vip), "v6={v6}: to the VIP");
        assert_eq!(e.run(&from_mac(&error, backend_mac(conn.backend))).action, XDP_TX, "v6={v6}: the backend's");
        assert_eq!(nat_snapshot(&e), before, "v6={v6}: no NAT state created or refreshed");
        let r = e.reasons();
        assert_eq!((r[reasons::PASS_NOT_VIP as usize], r[reasons::PASS_VIP_OTHER_PROTO as usize]), (3, 1), "v6={v6}");
    }
    // Two-armed. BPF_PROG_TEST_RUN delivers on the loopback interface (index 1).
    let mut e = Engine::new();
    let s = nat_spec(false, L4::Udp);
    e.apply(std::slice::from_ref(&s));
    let c = client(false, 25);
    let conn = nat_connection(&mut e, &s, c, 44_001, true, true);
    let before = nat_snapshot(&e);
    let (kind, code, rest) = icmp_errors(false)[1];
    let backend = s.backends[conn.backend].addr;
    let error =
        from_mac(&packets::icmp(backend, c, kind, code, rest, &conn.forwarded[14..]), backend_mac(conn.backend));
    let mut cfg = e.dp.config().unwrap();
    (cfg.client_ifindex, cfg.backend_ifindex) = (1, 1000);
    e.dp.set_config(&cfg).unwrap();
    let out = e.run(&error);
    assert_eq!((out.action, &out.frame), (XDP_PASS, &error), "in on the client interface");
    (cfg.client_ifindex, cfg.backend_ifindex) = (1000, 1);
    e.dp.set_config(&cfg).unwrap();
    e.run(&error);
    // The client port has no device in the test: the redirect fails.
    assert_eq!(e.reasons()[reasons::DROP_REDIRECT_FAILED as usize], 1, "translated, sent toward the client");
    assert_eq!(nat_snapshot(&e), before, "two-armed: no NAT state created or refreshed");
}
