//! The controller end to end: `xdplb run` in a network-namespace cluster with
//! real HTTP servers and clients; reloads, restarts and counters.

use std::{
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use tests::topology::{
    self, Cluster, ClusterSpec, KeepAlive, RequestStream, Servers, VIP4, VIP6, backend_states, http_get, wait_until,
};

const WAIT: Duration = Duration::from_secs(30);

fn cluster(backends: usize) -> Cluster {
    let c = Cluster::new(ClusterSpec { backends, servers: Servers::Builtin, bin_dir: topology::bin_dir(), nat: None });
    for i in 0..backends {
        c.start_server(i, 80);
    }
    c
}

/// A configuration with one VIP per entry of `vips` (name, address,
/// forwarding), each over backends 0..n, fast health checks.
fn config(vips: &[(&str, &str, &str)], n: usize, extra: &str) -> String {
    let mut y = format!(
        "interface: lb0\nmetrics_listen: 127.0.0.1:9464\nipip_source_v4: {}\nipip_source_v6: {}\n{extra}vips:\n",
        topology::IPIP_SOURCE_V4,
        topology::IPIP_SOURCE_V6
    );
    for (name, addr, fwd) in vips {
        let v6 = addr.contains(':');
        y += &format!("  - name: {name}\n    address: {addr}\n    port: 80\n    forwarding: {fwd}\n    backends:\n");
        for i in 0..n {
            let b = if v6 { topology::backend6(i) } else { topology::backend4(i) };
            y += &format!("      - address: {b}\n");
        }
        y += "    health_check: {type: tcp, interval: 200ms, timeout: 150ms, rise: 1, fall: 2}\n";
    }
    y
}

use topology::target as vip;

fn requests(c: &Cluster, target: SocketAddr, n: usize) -> Vec<String> {
    c.requests(target, n)
}

fn spread(names: &[String], backends: usize) {
    for i in 1..=backends {
        let b = format!("b{i}");
        assert!(names.contains(&b), "backend {b} served none of {} requests: {names:?}", names.len());
    }
}

fn serves_http(forwarding: &str) {
    let c = cluster(3);
    if forwarding == "ipip" {
        c.enable_decap();
    }
    let yaml = config(&[("web4", VIP4, forwarding), ("web6", VIP6, forwarding)], 3, "");
    let path = c.write_config("xdplb.yaml", &yaml);
    c.start_xdplb("xdplb", &path, &[]);
    c.wait_backend_states("web4", &["active"; 3], WAIT);
    c.wait_backend_states("web6", &["active"; 3], WAIT);
    for target in [vip(VIP4, 80), vip(VIP6, 80)] {
        let names = requests(&c, target, 60);
        spread(&names, 3);
    }
    // The status is refreshed every second.
    let s = c.wait_status(WAIT, "counters of both VIPs", |s| {
        s["vips"].as_array().is_some_and(|vs| vs.iter().all(|v| v["packets"].as_u64() >= Some(60 * 3)))
    });
    for v in s["vips"].as_array().unwrap() {
        let packets = v["packets"].as_u64().unwrap();
        assert!(packets >= 60 * 3, "{}: {packets} packets for 60 connections", v["name"]);
        let to_backends: u64 = v["backends"].as_array().unwrap().iter().map(|b| b["packets"].as_u64().unwrap()).sum();
        assert_eq!(to_backends, packets, "every VIP packet went to a backend");
    }
}

#[test]
fn dsr_serves_http_over_ipv4_and_ipv6() {
    serves_http("dsr");
}

#[test]
fn ipip_serves_http_over_ipv4_and_ipv6() {
    serves_http("ipip");
}

#[test]
fn status_and_metrics_count_exactly_what_was_sent() {
    let c = cluster(2);
    let mut yaml = config(&[], 2, "");
    yaml += &format!(
        "  - name: echo\n    address: {VIP4}\n    port: 80\n    protocol: udp\n    backends:\n      - address: {}\n      - address: {}\n    health_check: {{type: tcp, port: 80, interval: 200ms, timeout: 150ms, rise: 1}}\n",
        topology::backend4(0),
        topology::backend4(1)
    );
    let path = c.write_config("xdplb.yaml", &yaml);
    c.start_xdplb("xdplb", &path, &[]);
    c.wait_backend_states("echo", &["active", "active"], WAIT);
    const N: usize = 200;
    const PAYLOAD: usize = 100;
    let replies = c.client.enter(|| {
        let mut replies = Vec::new();
        for i in 0..N {
            // A new source port per datagram: a new flow each, spread over the backends.
            let s = UdpSocket::bind("198.18.0.1:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s.send_to(&[i as u8; PAYLOAD], vip(VIP4, 80)).unwrap();
            let mut buf = [0u8; 512];
            let (n, _) = s.recv_from(&mut buf).expect("echo reply");
            replies.push(String::from_utf8_lossy(&buf[..3.min(n)]).to_string());
        }
        replies
    });
    assert!(replies.iter().any(|r| r == "b1:") && replies.iter().any(|r| r == "b2:"), "{replies:?}");
    let frame = 14 + 20 + 8 + PAYLOAD as u64;
    let s = c.wait_status(WAIT, "the VIP counters", |s| s["vips"][0]["packets"] == N as u64);
    let v = &s["vips"][0];
    assert_eq!(v["bytes"].as_u64().unwrap(), N as u64 * frame);
    let b1 = v["backends"][0]["packets"].as_u64().unwrap();
    let b2 = v["backends"][1]["packets"].as_u64().unwrap();
    assert_eq!(b1 + b2, N as u64);
    assert_eq!(b1, replies.iter().filter(|r| *r == "b1:").count() as u64, "b1's counter = replies from b1");

    let metrics = c.metrics();
    assert!(metrics.contains(&format!("xdplb_vip_packets_total{{vip=\"echo\"}} {N}\n")), "{metrics}");
    assert!(metrics.contains(&format!("xdplb_vip_bytes_total{{vip=\"echo\"}} {}\n", N as u64 * frame)));
    assert!(
        metrics.contains(&format!(
            "xdplb_backend_packets_total{{vip=\"echo\",backend=\"198.18.0.11\",port=\"0\"}} {b1}\n"
        ))
    );
    assert!(metrics.contains("xdplb_backend_up{vip=\"echo\",backend=\"198.18.0.12\",port=\"0\"} 1\n"));
    assert!(metrics.contains("xdplb_config_generation 1\n"));
}

#[test]
fn an_invalid_reload_changes_nothing() {
    let c = cluster(2);
    let good = config(&[("web", VIP4, "dsr")], 2, "");
    let path = c.write_config("xdplb.yaml", &good);
    c.start_xdplb("xdplb", &path, &[]);
    c.wait_backend_states("web", &["active", "active"], WAIT);
    let stream = RequestStream::start(&c.client, vip(VIP4, 80), Duration::from_millis(20), 10_000);
    std::thread::sleep(Duration::from_millis(500));
    // An unknown key and a bad address: the whole file is rejected.
    let bad =
        good.replace("forwarding: dsr", "forwarding: dsr\n    colour: blue").replace("198.18.0.12", "198.18.0.999");
    c.write_config("xdplb.yaml", &bad);
    let s = c.wait_status(WAIT, "the rejected reload", |s| s["reloads_failed"] == 1);
    assert_eq!(s["config_generation"], 1);
    let errors: Vec<String> = s["last_reload_errors"].as_array().unwrap().iter().map(|e| e.to_string()).collect();
    assert!(errors.iter().any(|e| e.contains("xdplb.yaml:10:5: vips[0].colour: unknown key")), "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("vips[0].backends[1].address: `198.18.0.999`")), "{errors:?}");
    assert_eq!(backend_states(&s, "web"), ["active", "active"]);
    std::thread::sleep(Duration::from_millis(500));
    let samples = stream.stop();
    let failed: Vec<_> = samples.iter().filter(|s| s.result.is_err()).collect();
    assert!(samples.len() > 30 && failed.is_empty(), "{} requests, failures: {failed:?}", samples.len());
    assert!(c.log("xdplb").contains("reload (the file changed) rejected"));
    // `xdplb reload` (the unit's ExecReload) waits for the verdict and fails with every error.
    let out = c.xdplb_in(&c.lb, &["reload"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.starts_with("lb0: reload REJECTED, still running generation 1\n"), "{text}");
    assert!(text.contains("xdplb.yaml:10:5: vips[0].colour: unknown key"), "{text}");
}

#[test]
fn a_reload_that_adds_a_backend_keeps_a_keepalive_connection_on_its_backend() {
    let c = cluster(3);
    let path = c.write_config("xdplb.yaml", &config(&[("web", VIP4, "dsr")], 2, ""));
    c.start_xdplb("xdplb", &path, &[]);
    c.wait_backend_states("web", &["active", "active"], WAIT);
    let mut conns: Vec<(KeepAlive, String)> = (0..12)
        .map(|_| {
            let mut k = KeepAlive::open(&c.client, vip(VIP4, 80));
            let (_, b) = k.get("/").unwrap();
            (k, b)
        })
        .collect();
    c.write_config("xdplb.yaml", &config(&[("web", VIP4, "dsr")], 3, ""));
    c.wait_backend_states("web", &["active", "active", "active"], WAIT);
    assert_eq!(c.status().unwrap()["config_generation"], 2);
    assert!(c.log("xdplb").contains("reload (the file changed): VIP web: backend 198.18.0.13 added (weight 1)"));
    let out = c.xdplb_in(&c.lb, &["reload"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text, "lb0: reload applied, generation 3\n  nothing changed\n");
    for (k, first) in &mut conns {
        for _ in 0..5 {
            let (code, b) = k.get("/").expect("the keep-alive connection survives the reload");
            assert_eq!((code, &b), (200, &*first), "a keep-alive connection changed backend");
        }
    }
    // New connections reach the new backend.
    spread(&requests(&c, vip(VIP4, 80), 60), 3);
}

#[test]
fn kill_9_and_restart_lose_no_request() {
    let c = cluster(3);
    let path = c.write_config("xdplb.yaml", &config(&[("web", VIP4, "dsr"), ("web6", VIP6, "dsr")], 3, ""));
    c.start_xdplb("xdplb", &path, &[]);
    c.wait_backend_states("web", &["active"; 3], WAIT);
    c.wait_backend_states("web6", &["active"; 3], WAIT);
    let v4 = RequestStream::start(&c.client, vip(VIP4, 80), Duration::from_millis(10), 100_000);
    let v6 = RequestStream::start(&c.client, vip(VIP6, 80), Duration::from_millis(10), 100_000);
    std::thread::sleep(Duration::from_millis(500));
    c.kill("xdplb");
    // Nobody is steering now: the pinned dataplane forwards alone.
    std::thread::sleep(Duration::from_secs(2));
    // `status` now reads the pinned maps themselves: the VIPs are still served.
    let pinned = c.status().expect("status from the pinned dataplane");
    assert_eq!(pinned["xdp_mode"], "pinned (no controller running)");
    assert_eq!(pinned["vips"].as_array().unwrap().len(), 2);
    assert_eq!(backend_states(&pinned, "vip0"), ["active"; 3]);
    c.start_xdplb("xdplb2", &path, &[]);
    c.wait_status(WAIT, "the restarted controller", |s| {
        s["xdp_mode"] == "adopted" && backend_states(s, "web") == ["active"; 3]
    });
    std::thread::sleep(Duration::from_secs(1));
    let (s4, s6) = (v4.stop(), v6.stop());
    for (family, samples) in [("IPv4", s4), ("IPv6", s6)] {
        let failed: Vec<_> = samples.iter().filter(|s| s.result.is_err()).collect();
        assert!(samples.len() > 100, "{family}: only {} requests", samples.len());
        assert!(failed.is_empty(), "{family}: {} of {} requests failed: {:?}", failed.len(), samples.len(), failed);
    }
    let log = c.log("xdplb2");
    assert!(log.contains("adopting the running dataplane") && log.contains("replaced atomically"), "{log}");
}

#[test]
fn a_backend_whose_mac_changes_keeps_receiving_traffic() {
    let c = cluster(2);
    let path = c.write_config("xdplb.yaml", &config(&[("web", VIP4, "dsr")], 2, ""));
    c.start_xdplb("xdplb", &path, &[]);
    c.wait_backend_states("web", &["active", "active"], WAIT);
    let old = c.status().unwrap()["vips"][0]["backends"][0]["next_hop_mac"].as_str().unwrap().to_string();
    // The new NIC announces itself (gratuitous ARP), as a replaced server would.
    c.backends[0].sysctl("net.ipv4.conf.b1.arp_notify", "1");
    c.backends[0].ip("link set b1 address 02:00:5e:10:00:01");
    let s = c.wait_status(WAIT, "the new MAC", |s| s["vips"][0]["backends"][0]["next_hop_mac"] == "02:00:5e:10:00:01");
    assert_ne!(old, "02:00:5e:10:00:01");
    assert_eq!(backend_states(&s, "web"), ["active", "active"]);
    spread(&requests(&c, vip(VIP4, 80), 40), 2);
    assert!(c.log("xdplb").contains("next hop 198.18.0.11 is at 02:00:5e:10:00:01"));
}

/// The dataplane forwards only frames for the interface's own MAC: a MAC
/// changed at run time (a bond failing over, `ip link set address`) must reach
/// it, or every VIP packet would go to the kernel.
#[test]
fn the_balancers_own_mac_may_change_at_run_time() {
    let c = cluster(2);
    let path = c.write_config("xdplb.yaml", &config(&[("web", VIP4, "dsr")], 2, ""));
    c.start_xdplb("xdplb", &path, &[]);
    c.wait_backend_states("web", &["active", "active"], WAIT);
    spread(&requests(&c, vip(VIP4, 80), 20), 2);
    c.lb.sysctl("net.ipv4.conf.lb0.arp_notify", "1");
    c.lb.ip("link set lb0 address 02:00:5e:10:00:02");
    // The client learns the new MAC (the gratuitous ARP, or its next solicitation).
    c.client.ip("neigh flush all");
    let seen = wait_until(WAIT, || c.log("xdplb").contains("MAC ") && c.log("xdplb").contains("-> 02:00:5e:10:00:02"));
    assert!(seen, "{}", c.log("xdplb"));
    spread(&requests(&c, vip(VIP4, 80), 40), 2);
}

#[test]
fn sigterm_keeps_the_dataplane_unless_asked_to_detach() {
    let c = cluster(2);
    let path = c.write_config("xdplb.yaml", &config(&[("web", VIP4, "dsr")], 2, ""));
    c.start_xdplb("xdplb", &path, &[]);
    c.wait_backend_states("web", &["active", "active"], WAIT);
    c.signal("xdplb", libc::SIGTERM);
    assert!(c.wait_exit("xdplb", WAIT).is_some_and(|s| s.success()), "clean exit on SIGTERM");
    spread(&requests(&c, vip(VIP4, 80), 30), 2);
    assert!(c.pin_root.join("lb0/link").exists());

    c.start_xdplb("xdplb2", &path, &["--detach-on-exit"]);
    c.wait_status(WAIT, "the second controller", |s| s["xdp_mode"] == "adopted");
    c.signal("xdplb2", libc::SIGINT);
    assert!(c.wait_exit("xdplb2", WAIT).is_some_and(|s| s.success()));
    assert!(!c.pin_root.join("lb0").exists(), "pins removed");
    let link = c.lb.ip("link show lb0");
    assert!(
        !String::from_utf8_lossy(&link.stdout).contains(" xdp "),
        "program detached: {}\n{}",
        String::from_utf8_lossy(&link.stdout),
        c.log("xdplb2")
    );
    let r = c.client.enter(|| http_get(vip(VIP4, 80), "/", Duration::from_millis(1000)));
    assert!(r.is_err(), "nothing balances the VIP any more: {r:?}");
}

#[test]
fn a_file_truncated_in_place_changes_nothing() {
    let c = cluster(2);
    let good = config(&[("web", VIP4, "dsr")], 2, "");
    let path = c.write_config("xdplb.yaml", &good);
    c.start_xdplb("xdplb", &path, &[]);
    c.wait_backend_states("web", &["active", "active"], WAIT);
    let stream = RequestStream::start(&c.client, vip(VIP4, 80), Duration::from_millis(20), 10_000);
    // As `cat > file` or an editor leaves it for a moment, here for several polls:
    // an empty file (which used to read as "no VIPs": every VIP removed).
    std::fs::write(&path, "").unwrap();
    let s = c.wait_status(WAIT, "the empty file rejected", |s| s["reloads_failed"] == 1);
    assert!(
        s["last_reload_errors"][0].as_str().is_some_and(|e| e.contains("vips: is required")),
        "{}",
        s["last_reload_errors"]
    );
    assert_eq!(backend_states(&s, "web"), ["active", "active"]);
    std::thread::sleep(Duration::from_secs(2));
    // The whole file again: nothing to change, service never stopped.
    std::fs::write(&path, &good).unwrap();
    c.wait_status(WAIT, "the file back", |s| s["reloads_ok"] == 1);
    let samples = stream.stop();
    let failed: Vec<_> = samples.iter().filter(|s| s.result.is_err()).collect();
    assert!(samples.len() > 50 && failed.is_empty(), "{} requests, failures: {failed:?}", samples.len());
    assert_eq!(c.status().unwrap()["last_reload_changes"], serde_json::json!(["nothing changed"]));
}

#[test]
fn the_balancers_own_address_is_no_vip_and_no_backend() {
    let c = cluster(2);
    let own = config(&[("web", VIP4, "dsr")], 2, "").replace("198.18.0.12", topology::LB4);
    let path = c.write_config("own.yaml", &own);
    let out = c.xdplb_in(&c.lb, &["run", "--config", path.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("vips `web`: backend 198.18.0.2 is this load balancer's own address"), "{err}");
    // A running controller rejects such a reload and keeps serving.
    let good = config(&[("web", VIP4, "dsr")], 2, "");
    let path = c.write_config("xdplb.yaml", &good);
    c.start_xdplb("xdplb", &path, &[]);
    c.wait_backend_states("web", &["active", "active"], WAIT);
    c.write_config("xdplb.yaml", &good.replace(&format!("address: {VIP4}"), &format!("address: {}", topology::LB4)));
    let s = c.wait_status(WAIT, "the rejected reload", |s| s["reloads_failed"] == 1);
    assert!(
        s["last_reload_errors"][0]
            .as_str()
            .is_some_and(|e| e.contains("address 198.18.0.2 is this load balancer's own address")),
        "{}",
        s["last_reload_errors"]
    );
    assert_eq!(backend_states(&s, "web"), ["active", "active"]);
}
