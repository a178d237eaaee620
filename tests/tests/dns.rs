//! Backends by DNS name: a real DNS server (dnsmasq) in a namespace of its
//! own answers for `web.pool.test`; the record changes under a steady stream
//! of new connections, and then the DNS server dies.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use tests::topology::{self, Cluster, ClusterSpec, KeepAlive, RequestStream, Servers, VIP4, backend_states};

const WAIT: Duration = Duration::from_secs(30);
const DNS4: &str = "198.18.0.53";
const NAME: &str = "web.pool.test";

fn hosts_file(c: &Cluster, backends: &[usize]) -> std::path::PathBuf {
    let text: String = backends.iter().map(|&i| format!("{} {NAME}\n", topology::backend4(i))).collect();
    c.write_config("dns-hosts", &text)
}

/// dnsmasq in a namespace of its own at DNS4, answering for NAME with `backends`
/// from a hosts file (records from that file only, re-read on SIGHUP, TTL 0).
fn start_dnsmasq(c: &Cluster, backends: &[usize]) -> tests::topology::Netns {
    let dns = c.add_host("dns", DNS4, "2001:db8::53");
    let hosts = hosts_file(c, backends);
    c.spawn(
        "dnsmasq",
        dns.command("dnsmasq").args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            &format!("--listen-address={DNS4}"),
            &format!("--addn-hosts={}", hosts.display()),
            "--local-ttl=0",
            "--user=root",
            "--pid-file=",
        ]),
    );
    dns
}

fn addresses(s: &serde_json::Value) -> Vec<String> {
    s["dns"][0]["addresses"].as_array().map_or(vec![], |a| a.iter().map(|v| v.as_str().unwrap().into()).collect())
}

#[test]
fn a_changed_record_moves_traffic_without_a_failed_request_and_a_dead_dns_server_changes_nothing() {
    let c =
        Cluster::new(ClusterSpec { backends: 3, servers: Servers::Builtin, bin_dir: topology::bin_dir(), nat: None });
    for i in 0..3 {
        c.start_server(i, 80);
    }
    let dns = start_dnsmasq(&c, &[0, 1]);
    let yaml = format!(
        "interface: lb0\nmetrics_listen: 127.0.0.1:9464\n\
         resolvers:\n  nameservers: [{DNS4}]\n  interval: 500ms\n  timeout: 200ms\n  hold_obsolete: 3s\n\
         vips:\n  - name: web\n    address: {VIP4}\n    port: 80\n    backends:\n      - address: {NAME}\n\
         \x20   health_check: {{type: tcp, interval: 300ms, timeout: 200ms, rise: 2, fall: 2}}\n"
    );
    let config = c.write_config("xdplb.yaml", &yaml);
    c.start_xdplb("xdplb", &config, &[]);
    let s = c.wait_backend_states("web", &["active", "active"], WAIT);
    assert_eq!(addresses(&s), ["198.18.0.11", "198.18.0.12"]);

    let vip = SocketAddr::new(VIP4.parse().unwrap(), 80);
    // An established connection to b1, the server about to leave DNS.
    let mut to_b1 = None;
    for _ in 0..50 {
        let mut k = KeepAlive::open(&c.client, vip);
        if k.get("/").map(|(_, b)| b == "b1").unwrap_or(false) {
            to_b1 = Some(k);
            break;
        }
    }
    let mut to_b1 = to_b1.expect("one of 50 connections reaches b1");
    let stream = RequestStream::start(&c.client, vip, Duration::from_millis(20), 100_000);
    std::thread::sleep(Duration::from_millis(500));

    // The record changes: b1 leaves, b3 joins.
    let changed_at = Instant::now();
    hosts_file(&c, &[1, 2]);
    c.signal("dnsmasq", libc::SIGHUP);
    let s = c.wait_backend_states("web", &["active", "active", "draining"], WAIT);
    let moved = changed_at.elapsed();
    assert_eq!(addresses(&s), ["198.18.0.12", "198.18.0.13"]);
    assert_eq!(s["dns"][0]["draining"][0], "198.18.0.11");
    let draining_seen = stream.samples().len();
    assert_eq!(to_b1.get("/").expect("b1's established connection survives the change").1, "b1");
    // After hold_obsolete, b1 is gone.
    let s = c.wait_backend_states("web", &["active", "active"], WAIT);
    assert_eq!(s["dns"][0]["draining"].as_array().map(Vec::len), Some(0));
    std::thread::sleep(Duration::from_millis(500));
    let samples = stream.stop();
    let failed: Vec<_> = samples.iter().filter(|s| s.result.is_err()).collect();
    assert!(samples.len() > 50 && failed.is_empty(), "{} requests, failed: {failed:?}", samples.len());
    let after: Vec<&str> = samples[draining_seen..].iter().filter_map(|s| s.result.as_deref().ok()).collect();
    assert!(after.contains(&"b3"), "b3 serves new connections once it joined");
    assert!(!after.contains(&"b1"), "b1 takes no new connection while draining");
    let log = c.log("xdplb");
    assert!(log.contains("backend name resolves to [198.18.0.12, 198.18.0.13]; draining [198.18.0.11]"), "{log}");
    eprintln!(
        "record changed → b3 serving and b1 draining in {} ms; {} requests, 0 failed",
        moved.as_millis(),
        samples.len()
    );

    // The DNS server dies: the last known servers stay, and status says so.
    c.kill("dnsmasq");
    let s = c.wait_status(WAIT, "the failed resolution reported", |s| {
        s["dns"][0]["last_error"].as_str().is_some_and(|e| !e.is_empty())
    });
    assert_eq!(addresses(&s), ["198.18.0.12", "198.18.0.13"]);
    assert_eq!(backend_states(&s, "web"), ["active", "active"]);
    let served = c.requests(vip, 20);
    assert!(served.iter().all(|b| b == "b2" || b == "b3"), "{served:?}");
    assert!(c.metrics().contains(&format!("xdplb_dns_resolution_failing{{name=\"{NAME}\"}} 1")));
    assert!(c.log("xdplb").contains("cannot resolve backend name: "), "{}", c.log("xdplb"));
    let text = c.xdplb_in(&c.lb, &["status"]).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(&format!("{NAME} -> [198.18.0.12, 198.18.0.13]  RESOLUTION FAILING")), "{text}");
    drop(dns);
}

/// `/etc/netns/NAME/resolv.conf`, which `ip netns exec NAME` shows the
/// process as its /etc/resolv.conf; removed on drop.
struct NetnsResolvConf(std::path::PathBuf);

impl NetnsResolvConf {
    fn new(ns: &str, nameserver: &str) -> Self {
        let dir = std::path::PathBuf::from("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("resolv.conf"), format!("nameserver {nameserver}\noptions timeout:1\n")).unwrap();
        Self(dir)
    }
}

impl Drop for NetnsResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn without_a_resolvers_section_names_resolve_through_the_system_resolver() {
    let c =
        Cluster::new(ClusterSpec { backends: 2, servers: Servers::Builtin, bin_dir: topology::bin_dir(), nat: None });
    for i in 0..2 {
        c.start_server(i, 80);
    }
    let _dns = start_dnsmasq(&c, &[0, 1]);
    // As on a real host: the balancer's /etc/resolv.conf names the DNS server.
    let _resolv = NetnsResolvConf::new(&c.lb.name, DNS4);
    let yaml = format!(
        "interface: lb0\nvips:\n  - name: web\n    address: {VIP4}\n    port: 80\n    backends:\n      - address: {NAME}\n\
         \x20   health_check: {{type: tcp, interval: 300ms, timeout: 200ms, rise: 2, fall: 2}}\n"
    );
    let config = c.write_config("xdplb.yaml", &yaml);
    let check = c.xdplb_in(&c.lb, &["check", "--config", config.to_str().unwrap()]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&check.stdout).trim(),
        format!("{}: ok (1 VIPs, 0 backends, 1 backend names resolved at run time)", config.display())
    );
    c.start_xdplb("xdplb", &config, &[]);
    let s = c.wait_backend_states("web", &["active", "active"], WAIT);
    assert_eq!(addresses(&s), ["198.18.0.11", "198.18.0.12"]);
    let vip = SocketAddr::new(VIP4.parse().unwrap(), 80);
    let mut served = c.requests(vip, 30);
    served.sort();
    served.dedup();
    assert_eq!(served, ["b1", "b2"]);
}
