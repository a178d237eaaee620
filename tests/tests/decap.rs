//! The decapsulation program (`xdplb decap`) and its filter, packet by
//! packet: the real eBPF object loaded with the filter `xdplb decap` would
//! give it, driven with BPF_PROG_TEST_RUN; every output frame is compared
//! byte for byte. Allowed IP-in-IP comes out as the inner frame; IP-in-IP
//! the filter refuses is dropped and counted refused (passed, a kernel
//! `ipip` device such as tunl0 would decapsulate it anyway); anything that
//! is not IP-in-IP passes exactly as it came, uncounted.

use std::net::IpAddr;

use aya::programs::{TestRun as _, TestRunOptions};
use lb_common::maps::programs;
use lb_userspace::{
    dataplane::{Dataplane, MapSizes},
    decap::{self, SourcePrefix},
};
use tests::{
    harness::{XDP_DROP, XDP_PASS},
    packets::{self, L4, LB_MAC, frame},
};

const BACKEND_MAC: [u8; 6] = [0x02, 0xbe, 0, 0, 0, 0x01];
/// The balancers' IP-in-IP sources (`ipip_source_v4/v6`), and the VIPs.
const LB_SOURCES: [&str; 2] = ["198.18.255.0/24", "2001:db8:ffff::/96"];
const VIP4: &str = "198.18.100.1";
const VIP6: &str = "2001:db8:100::1";
const BACKEND4: &str = "198.18.0.11";
const BACKEND6: &str = "2001:db8::11";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The decapsulation program, loaded as `xdplb decap --allow-source S.. --vip V..` loads it.
fn program(sources: &[&str], vips: &[&str]) -> Dataplane {
    let sources: Vec<SourcePrefix> = sources.iter().map(|s| s.parse().unwrap()).collect();
    let vips: Vec<IpAddr> = vips.iter().map(|v| ip(v)).collect();
    let filter = decap::filter(&sources, &vips).expect("a filter the program holds");
    let sizes = MapSizes { max_vips: 1, max_backends: 1, conntrack: 1, maglev_pool: 1024, nat_table: 1 };
    Dataplane::load_decap(sizes, &filter).expect("the eBPF object loads and verifies (run as root)")
}

fn run(dp: &mut Dataplane, input: &[u8]) -> (u32, Vec<u8>) {
    let prog = dp.program(programs::DECAP).expect("program is loaded");
    let mut out = vec![0u8; input.len() + 256];
    let r = prog
        .test_run(TestRunOptions { data_in: Some(input), data_out: Some(&mut out), ..Default::default() })
        .expect("BPF_PROG_TEST_RUN succeeds");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

/// A client's TCP frame to `vip`: what the backend should receive.
fn inner(vip: &str) -> Vec<u8> {
    let client = if vip.contains(':') { ip("2001:db8::c1") } else { ip("198.18.0.1") };
    frame(L4::Tcp, client, 40_000, ip(vip), 80)
}

/// `inner` in an outer IPv4 or IPv6 header from `src` to `dst`, as a
/// balancer sends it to the backend's MAC.
fn ipip(src: &str, dst: &str, inner: &[u8]) -> Vec<u8> {
    let packet = &inner[14..];
    let inner_proto: u8 = if packet[0] >> 4 == 4 { 4 } else { 41 };
    let mut out = BACKEND_MAC.to_vec();
    out.extend_from_slice(&LB_MAC);
    match (ip(src), ip(dst)) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend_from_slice(&[0x08, 0x00]);
            let mut h = vec![0x45, 0];
            h.extend_from_slice(&(20 + packet.len() as u16).to_be_bytes());
            h.extend_from_slice(&[0, 0, 0x40, 0, 64, inner_proto, 0, 0]);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            let c = packets::checksum(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            out.extend_from_slice(&h);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
            out.extend_from_slice(&(packet.len() as u16).to_be_bytes());
            out.extend_from_slice(&[inner_proto, 64]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        _ => panic!("mixed outer families"),
    }
    out.extend_from_slice(packet);
    out
}

/// What the backend's stack must receive for `inner` sent as IP-in-IP: the
/// inner packet under the MACs the outer frame came with.
fn decapsulated(inner: &[u8]) -> Vec<u8> {
    let mut out = BACKEND_MAC.to_vec();
    out.extend_from_slice(&LB_MAC);
    out.extend_from_slice(&inner[12..]);
    out
}

fn assert_decapsulated(dp: &mut Dataplane, outer: &[u8], inner: &[u8], what: &str) {
    let (action, out) = run(dp, outer);
    assert_eq!(action, XDP_PASS, "{what}");
    assert_eq!(out, decapsulated(inner), "{what}: the inner frame, byte for byte");
}

fn assert_untouched(dp: &mut Dataplane, frame: &[u8], what: &str) {
    let (action, out) = run(dp, frame);
    assert_eq!(action, XDP_PASS, "{what}");
    assert_eq!(out, frame, "{what}: passed exactly as it came");
}

/// Refused IP-in-IP never reaches the stack: a kernel ipip device there
/// (tunl0 up, as LVS-TUN backends have) would decapsulate it, filter or not.
fn assert_refused(dp: &mut Dataplane, outer: &[u8], what: &str) {
    let (action, _) = run(dp, outer);
    assert_eq!(action, XDP_DROP, "{what}: dropped, not passed to the stack");
}

#[test]
fn decap_an_allowed_source_is_decapsulated_and_another_is_dropped() {
    let mut dp = program(&LB_SOURCES, &[]);
    let (v4, v6) = (inner(VIP4), inner(VIP6));
    assert_decapsulated(&mut dp, &ipip("198.18.255.7", BACKEND4, &v4), &v4, "IPv4 from a balancer's source");
    assert_decapsulated(&mut dp, &ipip("2001:db8:ffff::7", BACKEND6, &v6), &v6, "IPv6 from a balancer's source");
    // An outer header with options: the inner header sits further on.
    let with_options = packets::with_ipv4_options(&ipip("198.18.255.8", BACKEND4, &v4), &[1, 1, 1, 1]);
    assert_decapsulated(&mut dp, &with_options, &v4, "IPv4 with outer options from a balancer's source");
    assert_refused(&mut dp, &ipip("198.18.0.66", BACKEND4, &v4), "IPv4 from another host");
    assert_refused(&mut dp, &ipip("198.18.254.7", BACKEND4, &v4), "IPv4 from just outside the prefix");
    assert_refused(&mut dp, &ipip("2001:db8::66", BACKEND6, &v6), "IPv6 from another host");
    assert_refused(&mut dp, &ipip("2001:db8:fffe::7", BACKEND6, &v6), "IPv6 from just outside the prefix");
    // Whatever is not IP-in-IP passes as before, uncounted.
    assert_untouched(&mut dp, &v4, "a plain packet");
    assert_untouched(&mut dp, &v6, "a plain IPv6 packet");
    assert_eq!(dp.decap_counters().unwrap(), (3, 4), "(decapsulated, refused)");
}

#[test]
fn decap_a_list_of_one_family_refuses_the_other() {
    let mut dp = program(&LB_SOURCES[..1], &[]);
    let v6 = inner(VIP6);
    assert_refused(&mut dp, &ipip("2001:db8:ffff::7", BACKEND6, &v6), "IPv6 when only IPv4 sources are allowed");
    assert_eq!(dp.decap_counters().unwrap(), (0, 1));
}

#[test]
fn decap_an_inner_destination_not_listed_is_dropped() {
    let mut dp = program(&[], &[VIP4, VIP6]);
    let (v4, v6) = (inner(VIP4), inner(VIP6));
    assert_decapsulated(&mut dp, &ipip("198.18.0.66", BACKEND4, &v4), &v4, "to a listed IPv4 VIP, any source");
    assert_decapsulated(&mut dp, &ipip("2001:db8::66", BACKEND6, &v6), &v6, "to a listed IPv6 VIP, any source");
    // IPv6 inside IPv4: the inner header's family decides which list applies.
    assert_decapsulated(&mut dp, &ipip("198.18.0.66", BACKEND4, &v6), &v6, "IPv6-in-IPv4 to a listed VIP");
    let (other4, other6) = (inner("198.18.100.2"), inner("2001:db8:100::2"));
    assert_refused(&mut dp, &ipip("198.18.255.7", BACKEND4, &other4), "to an IPv4 address not listed");
    assert_refused(&mut dp, &ipip("2001:db8:ffff::7", BACKEND6, &other6), "to an IPv6 address not listed");
    let with_options = packets::with_ipv4_options(&ipip("198.18.255.7", BACKEND4, &other4), &[1, 1, 1, 1]);
    assert_refused(&mut dp, &with_options, "to an address not listed, outer options");
    assert_eq!(dp.decap_counters().unwrap(), (3, 3));
}

#[test]
fn decap_both_lists_must_agree() {
    let mut dp = program(&LB_SOURCES, &[VIP4]);
    let v4 = inner(VIP4);
    let other = inner("198.18.100.2");
    assert_decapsulated(&mut dp, &ipip("198.18.255.7", BACKEND4, &v4), &v4, "allowed source, listed VIP");
    assert_refused(&mut dp, &ipip("198.18.0.66", BACKEND4, &v4), "another source, listed VIP");
    assert_refused(&mut dp, &ipip("198.18.255.7", BACKEND4, &other), "allowed source, VIP not listed");
    assert_eq!(dp.decap_counters().unwrap(), (1, 2));
}

#[test]
fn decap_without_a_filter_accepts_any_source_as_before() {
    let mut dp = program(&[], &[]);
    let (v4, v6) = (inner(VIP4), inner(VIP6));
    assert_decapsulated(&mut dp, &ipip("198.18.0.66", BACKEND4, &v4), &v4, "IPv4 from anyone");
    assert_decapsulated(&mut dp, &ipip("2001:db8::66", BACKEND6, &v6), &v6, "IPv6 from anyone");
    assert_eq!(dp.decap_counters().unwrap(), (2, 0));
}

/// IP-in-IP whose inner header is cut cannot be decapsulated: dropped and
/// counted refused, with or without a filter (passed, the kernel's ipip
/// device would be the one to judge it).
#[test]
fn decap_a_cut_inner_header_is_dropped() {
    for (sources, vips) in [(&[][..], &[][..]), (&LB_SOURCES[..], &[VIP4][..])] {
        let mut dp = program(sources, vips);
        let v4 = inner(VIP4);
        let whole = ipip("198.18.255.7", BACKEND4, &v4);
        let mut cut = whole[..14 + 20 + 12].to_vec();
        cut[16..18].copy_from_slice(&32u16.to_be_bytes());
        packets::fix_checksums(&mut cut);
        assert_refused(&mut dp, &cut, "inner header cut");
        assert_eq!(dp.decap_counters().unwrap(), (0, 1), "{sources:?} {vips:?}");
    }
}
