//! End to end in network namespaces, same topology, same run: requests per
//! second and latency (wrk) for short connections and keep-alive requests,
//! and TCP throughput (iperf3), through each path, with the CPU seconds the
//! whole machine spent per 100,000 requests (from /proc/stat).

use std::{net::SocketAddr, time::Duration};

use tests::topology::{self, Cluster, ClusterSpec, LB4, Servers, VIP4, backend4};

use crate::report::Report;

/// Busy and total jiffies of all CPUs.
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> =
        stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    let total: u64 = v.iter().take(8).sum();
    (total - idle, total)
}

struct Wrk {
    rps: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    requests: f64,
    errors: u64,
    cpu_seconds: f64,
}

fn ms(s: &str) -> f64 {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| c.is_alphabetic()).unwrap_or(s.len()));
    let n: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        _ => f64::NAN,
    }
}

fn wrk(c: &Cluster, target: SocketAddr, secs: u64, close: bool) -> Wrk {
    let mut cmd = c.client.command("wrk");
    cmd.args(["-t2", "-c32", &format!("-d{secs}s"), "--latency", "--timeout", "2s"]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("http://{target}/"));
    let (busy0, _) = cpu_jiffies();
    let out = cmd.output().expect("wrk runs");
    let (busy1, _) = cpu_jiffies();
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |prefix: &str| -> Option<String> {
        text.lines().find_map(|l| l.trim().strip_prefix(prefix).map(|r| r.trim().to_string()))
    };
    let rps = field("Requests/sec:").and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let errors = field("Socket errors:")
        .map_or(0, |l| l.split(',').filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok()).sum())
        + field("Non-2xx or 3xx responses:").and_then(|v| v.parse().ok()).unwrap_or(0);
    let clk = 100.0; // USER_HZ
    Wrk {
        rps,
        p50: field("50%").map_or(f64::NAN, |v| ms(&v)),
        p90: field("90%").map_or(f64::NAN, |v| ms(&v)),
        p99: field("99%").map_or(f64::NAN, |v| ms(&v)),
        requests,
        errors,
        cpu_seconds: (busy1 - busy0) as f64 / clk,
    }
}

fn iperf(c: &Cluster, target: SocketAddr, secs: u64) -> f64 {
    let out = c
        .client
        .command("iperf3")
        .args(["-c", &target.ip().to_string(), "-p", &target.port().to_string(), "-t", &secs.to_string(), "-J"])
        .output()
        .expect("iperf3 runs");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9
}

/// Load-test tuning for every host, so that no path is limited by ports in
/// TIME_WAIT after hundreds of thousands of short connections.
fn tune(c: &Cluster) {
    for ns in [&c.client, &c.lb].into_iter().chain(c.backends.iter()) {
        ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000");
        ns.sysctl("net.ipv4.tcp_tw_reuse", "1");
    }
}

/// Connection tracking on the balancer as kube-proxy sets it, plus the one
/// change a site taking thousands of short connections a second makes:
/// closed connections leave conntrack sooner, so that R connections per
/// second × the TIME_WAIT timeout stays well under `nf_conntrack_max`
/// (120 s by default: the table fills at about 2,200 connections per second,
/// then new connections are dropped). Returns what was set, for the report.
fn tune_conntrack(c: &Cluster) -> String {
    let max = c.lb.command("sysctl").args(["-n", "net.netfilter.nf_conntrack_max"]).output();
    let max = max.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    // kube-proxy's conntrack settings: 24 h established, 1 h CLOSE_WAIT,
    // nf_conntrack_max at least max(131072, 32768 per core), which the
    // kernel lets only the initial namespace set (this host has it above that).
    let set = [
        ("net.netfilter.nf_conntrack_tcp_timeout_established", "86400"),
        ("net.netfilter.nf_conntrack_tcp_timeout_close_wait", "3600"),
        ("net.netfilter.nf_conntrack_tcp_timeout_time_wait", "5"),
    ];
    for (k, v) in set {
        c.lb.sysctl(k, v);
    }
    format!(
        "nftables tuning: on every host ip_local_port_range 1024-65000 and tcp_tw_reuse=1 (as for every path); \
         on the balancer conntrack as kube-proxy sets it (tcp_timeout_established 86400 s, \
         tcp_timeout_close_wait 3600 s; nf_conntrack_max {max}, global, already above kube-proxy's \
         max(131072, 32768 × cores)) and tcp_timeout_time_wait 5 s (default 120 s: at 120 s the table \
         holds 120 × R closed connections and fills at about {} connections per second); DNAT numgen round \
         robin, masquerade fully-random",
        max.parse::<u64>().unwrap_or(262_144) / 120
    )
}

/// The balancer's conntrack table after the nftables runs: entries and the
/// kernel's drop counters (all CPUs), so a table that filled shows.
fn conntrack_stats(c: &Cluster) -> String {
    let read = |cmd: &mut std::process::Command| {
        cmd.output().map(|o| String::from_utf8_lossy(&o.stdout).to_string()).unwrap_or_default()
    };
    let count = read(c.lb.command("cat").arg("/proc/sys/net/netfilter/nf_conntrack_count"));
    let stat = read(c.lb.command("cat").arg("/proc/net/stat/nf_conntrack"));
    let mut lines = stat.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
    let mut sums = vec![0u64; header.len()];
    for l in lines {
        for (i, v) in l.split_whitespace().enumerate() {
            if let (Some(s), Ok(v)) = (sums.get_mut(i), u64::from_str_radix(v, 16)) {
                *s += v;
            }
        }
    }
    let field = |n: &str| header.iter().position(|h| *h == n).map_or(0, |i| sums[i]);
    format!(
        "nftables: after its runs the balancer's conntrack held {} entries; drop {}, early_drop {}, insert_failed {}",
        count.trim(),
        field("drop"),
        field("early_drop"),
        field("insert_failed")
    )
}

fn measure(report: &mut Report, c: &Cluster, imp: &str, http: SocketAddr, tcp: SocketAddr, secs: u64) {
    // A full run takes the median of three wrk runs by requests per second:
    // this 2-core machine runs client, balancer and servers at once.
    let runs = if secs >= 5 { 3 } else { 1 };
    for (case, close) in [("short connections", true), ("keep-alive", false)] {
        let mut all: Vec<Wrk> = (0..runs).map(|_| wrk(c, http, secs, close)).collect();
        all.sort_by(|a, b| a.rps.partial_cmp(&b.rps).unwrap_or(std::cmp::Ordering::Equal));
        let w = all.swap_remove(runs / 2);
        report.add("e2e", case, imp, "requests_per_second", w.rps, "req/s");
        report.add("e2e", case, imp, "latency_p50", w.p50, "ms");
        report.add("e2e", case, imp, "latency_p90", w.p90, "ms");
        report.add("e2e", case, imp, "latency_p99", w.p99, "ms");
        if w.requests > 0.0 {
            report.add("e2e", case, imp, "cpu_seconds_per_100k_requests", w.cpu_seconds * 100_000.0 / w.requests, "s");
        }
        if w.errors > 0 {
            report.note(format!("{imp} {case}: wrk counted {} socket errors or non-2xx answers", w.errors));
        }
        if let Some(direct) = report.get("e2e", case, "direct", "requests_per_second") {
            report.add("e2e", case, imp, "ratio_to_direct", w.rps / direct, "x");
        }
    }
    let mut all: Vec<f64> = (0..runs).map(|_| iperf(c, tcp, secs.min(5))).collect();
    all.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let gbps = all[runs / 2];
    report.add("e2e", "tcp throughput", imp, "gbit_per_second", gbps, "Gbit/s");
    if let Some(direct) = report.get("e2e", "tcp throughput", "direct", "gbit_per_second") {
        report.add("e2e", "tcp throughput", imp, "ratio_to_direct", gbps / direct, "x");
    }
}

fn xdplb_config(forwarding: &str) -> String {
    let mut y = format!("interface: lb0\nxdp_mode: driver\nipip_source_v4: {}\nvips:\n", topology::IPIP_SOURCE_V4);
    for port in [80, 5201] {
        // iperf3's control and data connections must meet the same server.
        let hash = if port == 80 { "five-tuple" } else { "source-ip" };
        y += &format!(
            "  - name: web{port}\n    address: {VIP4}\n    port: {port}\n    forwarding: {forwarding}\n    hash: {hash}\n    backends:\n"
        );
        for i in 0..3 {
            y += &format!("      - address: {}\n", backend4(i));
        }
        y += "    health_check: {type: tcp, port: 80, interval: 1s, rise: 1}\n";
    }
    y
}

pub fn run(report: &mut Report, quick: bool) {
    println!("\n== e2e: through each path, in network namespaces ==");
    let secs = if quick { 2 } else { 5 };
    let c = Cluster::new(ClusterSpec { backends: 3, servers: Servers::Nginx, bin_dir: topology::bin_dir(), nat: None });
    for i in 0..3 {
        c.start_server(i, 80);
        c.spawn(&format!("iperf-b{}", i + 1), c.backends[i].command("iperf3").args(["-s", "-p", "5201"]));
    }
    // IP-in-IP needs decapsulation on the backends; attached for every path, so all pay the same.
    c.enable_decap();
    tune(&c);
    std::thread::sleep(Duration::from_millis(500));
    let vip = |port| SocketAddr::new(VIP4.parse().unwrap(), port);

    measure(report, &c, "direct", SocketAddr::new(backend4(0), 80), SocketAddr::new(backend4(0), 5201), secs);

    let path = c.write_config("bench.yaml", &xdplb_config("dsr"));
    c.start_xdplb("xdplb", &path, &["--detach-on-exit"]);
    c.wait_backend_states("web80", &["active"; 3], Duration::from_secs(30));
    c.wait_backend_states("web5201", &["active"; 3], Duration::from_secs(30));
    measure(report, &c, "xdplb-dsr", vip(80), vip(5201), secs);

    c.write_config("bench.yaml", &xdplb_config("ipip"));
    c.wait_status(Duration::from_secs(30), "the ipip configuration", |s| s["config_generation"] == 2);
    measure(report, &c, "xdplb-ipip", vip(80), vip(5201), secs);
    c.signal("xdplb", libc::SIGTERM);
    c.wait_exit("xdplb", Duration::from_secs(10));

    // HAProxy in TCP mode on the load balancer's own address.
    let cfg = c.dir.join("haproxy.cfg");
    let mut h = String::from(
        "global\n  maxconn 8000\n  nbthread 1\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n",
    );
    for port in [80, 5201] {
        // iperf3's control and data connections must meet the same server.
        let balance = if port == 80 { "roundrobin" } else { "source" };
        h += &format!("listen l{port}\n  bind {LB4}:{port}\n  balance {balance}\n");
        for i in 0..3 {
            h += &format!("  server b{} {}:{port}\n", i + 1, backend4(i));
        }
    }
    std::fs::write(&cfg, h).unwrap();
    c.spawn("haproxy", c.lb.command("haproxy").arg("-db").arg("-f").arg(&cfg));
    std::thread::sleep(Duration::from_millis(500));
    let lb = |port| SocketAddr::new(LB4.parse().unwrap(), port);
    measure(report, &c, "haproxy", lb(80), lb(5201), secs);
    c.kill("haproxy");

    // nftables DNAT round robin with masquerade, as kube-proxy's nftables mode.
    c.lb.sysctl("net.ipv4.ip_forward", "1");
    c.lb.sysctl("net.ipv4.conf.all.send_redirects", "0");
    c.lb.sysctl("net.ipv4.conf.lb0.send_redirects", "0");
    let map = format!("{{ 0 : {}, 1 : {}, 2 : {} }}", backend4(0), backend4(1), backend4(2));
    let rules = format!(
        "table ip xdplb_bench {{\n  chain pre {{\n    type nat hook prerouting priority dstnat;\n    \
         ip daddr {VIP4} tcp dport 80 dnat to numgen inc mod 3 map {map}\n    \
         ip daddr {VIP4} tcp dport 5201 dnat to jhash ip saddr mod 3 map {map}\n  }}\n  \
         chain post {{\n    type nat hook postrouting priority srcnat;\n    \
         ip daddr 198.18.0.0/24 ip saddr != {LB4} masquerade fully-random\n  }}\n}}\n"
    );
    let rules_path = c.dir.join("nft.conf");
    std::fs::write(&rules_path, rules).unwrap();
    let ok = c.lb.command("nft").arg("-f").arg(&rules_path).status().is_ok_and(|s| s.success());
    if ok {
        report.note(tune_conntrack(&c));
        measure(report, &c, "nftables", vip(80), vip(5201), secs);
        report.note(conntrack_stats(&c));
    } else {
        report.note("nftables: loading the DNAT rules failed; not measured");
    }
    drop(c);
    nat(report, secs);
}

/// xdplb NAT, one-armed (the same single interface as the other paths):
/// backends on their own subnet behind the balancer, port 80 → 8080.
fn nat(report: &mut Report, secs: u64) {
    let c = Cluster::new(ClusterSpec {
        backends: 3,
        servers: Servers::Nginx,
        bin_dir: topology::bin_dir(),
        nat: Some(topology::NatArms::OneArmed),
    });
    for i in 0..3 {
        c.start_server(i, 8080);
        c.spawn(&format!("iperf-b{}", i + 1), c.backends[i].command("iperf3").args(["-s", "-p", "5201"]));
    }
    let mut y = String::from("interface: lb0\nxdp_mode: driver\nvips:\n");
    for (port, to, hash) in [(80, 8080, "five-tuple"), (5201, 5201, "source-ip")] {
        y += &format!(
            "  - name: web{port}\n    address: {VIP4}\n    port: {port}\n    forwarding: nat\n    hash: {hash}\n    backends:\n"
        );
        for i in 0..3 {
            y += &format!("      - address: {}\n        port: {to}\n", c.backend4(i));
        }
        y += "    health_check: {type: tcp, port: 8080, interval: 1s, rise: 1}\n";
    }
    tune(&c);
    let path = c.write_config("nat.yaml", &y);
    c.start_xdplb("xdplb", &path, &["--detach-on-exit"]);
    c.wait_backend_states("web80", &["active"; 3], Duration::from_secs(30));
    let vip = |port| SocketAddr::new(VIP4.parse().unwrap(), port);
    measure(report, &c, "xdplb-nat", vip(80), vip(5201), secs);
}
