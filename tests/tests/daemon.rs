//! The controller's own life: signals during start-up, a cold start that
//! waits for health before attaching, a VIP that cannot be applied, and maps
//! changed behind its back. `xdplb run` in a namespace cluster, started with
//! `ip netns exec` as the other tests do.

use std::time::Duration;

use tests::topology::{self, Cluster, ClusterSpec, Servers, VIP4, backend_states, wait_until};

const WAIT: Duration = Duration::from_secs(30);

fn cluster(backends: usize, serving: usize) -> Cluster {
    let c = Cluster::new(ClusterSpec { backends, servers: Servers::Builtin, bin_dir: topology::bin_dir(), nat: None });
    for i in 0..serving {
        c.start_server(i, 80);
    }
    c
}

/// One VIP `name` on VIP4:`port` over backends 0..n, with `check`.
fn vip(name: &str, port: u16, n: usize, check: &str, extra: &str) -> String {
    let mut y = format!("  - name: {name}\n    address: {VIP4}\n    port: {port}\n{extra}    backends:\n");
    for i in 0..n {
        y += &format!("      - address: {}\n", topology::backend4(i));
    }
    y + &format!("    health_check: {{{check}}}\n")
}

fn config(vips: &[String]) -> String {
    format!("interface: lb0\nvips:\n{}", vips.concat())
}

/// Waits until the log of `name` contains `text`.
fn wait_log(c: &Cluster, name: &str, text: &str) -> bool {
    wait_until(WAIT, || c.log(name).contains(text))
}

fn xdp_attached(c: &Cluster) -> bool {
    String::from_utf8_lossy(&c.lb.ip("link show lb0").stdout).contains(" xdp ")
}

/// Checks that take a few seconds to decide (servers down: `fall` refusals).
const SLOW_CHECK: &str = "type: tcp, interval: 1s, timeout: 500ms, rise: 3, fall: 3";

#[test]
fn sigterm_during_start_up_stops_cleanly_before_attaching() {
    let c = cluster(2, 0);
    let path = c.write_config("xdplb.yaml", &config(&[vip("web", 80, 2, SLOW_CHECK, "")]));
    c.start_xdplb("xdplb", &path, &[]);
    assert!(wait_log(&c, "xdplb", "waiting up to"), "{}", c.log("xdplb"));
    c.signal("xdplb", libc::SIGTERM);
    let exit = c.wait_exit("xdplb", WAIT);
    let log = c.log("xdplb");
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}\n{log}");
    assert!(log.contains("SIGTERM during start-up: stopping before serving"), "{log}");
    assert!(!xdp_attached(&c), "nothing attached:\n{log}");
    assert!(!c.pin_root.join("lb0/VIPS").exists(), "the maps of the cold start are removed");
}

#[test]
fn sighup_during_start_up_is_handled_once_serving() {
    let c = cluster(2, 0);
    let path = c.write_config("xdplb.yaml", &config(&[vip("web", 80, 2, SLOW_CHECK, "")]));
    c.start_xdplb("xdplb", &path, &[]);
    assert!(wait_log(&c, "xdplb", "waiting up to"), "{}", c.log("xdplb"));
    c.signal("xdplb", libc::SIGHUP);
    let s = c.wait_status(WAIT, "the reload SIGHUP asked for", |s| s["reloads_ok"] == 1);
    assert_eq!(s["config_generation"], 2);
    assert!(c.wait_exit("xdplb", Duration::from_millis(200)).is_none(), "still running:\n{}", c.log("xdplb"));
    assert!(c.log("xdplb").contains("reload (SIGHUP) applied"));
}

#[test]
fn a_cold_start_attaches_after_the_first_health_checks() {
    let c = cluster(2, 2);
    let check = "type: tcp, interval: 300ms, timeout: 200ms, rise: 2, fall: 2";
    let path = c.write_config("xdplb.yaml", &config(&[vip("web", 80, 2, check, "")]));
    c.start_xdplb("xdplb", &path, &[]);
    // The first status is written after attaching: both backends already up.
    // (Before it, `xdplb status` reads the pinned maps: pid 0, no controller.)
    let first = c.wait_status(WAIT, "the controller's first status", |s| s["pid"] != 0);
    assert_eq!(backend_states(&first, "web"), ["active", "active"], "{first}\n{}", c.log("xdplb"));
    let log = c.log("xdplb");
    let decided = log.find("first health checks decided in").expect(&log);
    let attached = log.find("XDP program attached").expect(&log);
    assert!(decided < attached, "health decided before the program was attached:\n{log}");
    assert!(log.contains("2 of 2 backends up"), "{log}");
}

#[test]
fn a_vip_that_cannot_be_applied_leaves_the_others_served_and_is_retried() {
    let c = cluster(4, 4);
    let check = "type: tcp, interval: 300ms, timeout: 200ms, rise: 1, fall: 2";
    let path = c.write_config("xdplb.yaml", &config(&[vip("web", 80, 2, check, "")]));
    c.start_xdplb("xdplb", &path, &[]);
    c.wait_backend_states("web", &["active", "active"], WAIT);
    c.signal("xdplb", libc::SIGTERM);
    assert!(c.wait_exit("xdplb", WAIT).is_some_and(|s| s.success()));
    // A restart adopts the maps with their sizes: a table larger than the
    // adopted Maglev pool cannot be applied. It sorts before `web` (port 79).
    let big = vip("big", 79, 1, check, "    table_size: 4194301\n");
    let yaml = config(&[big, vip("web", 80, 3, check, "")]).replace("vips:", "metrics_listen: 127.0.0.1:9464\nvips:");
    c.write_config("xdplb.yaml", &yaml);
    c.start_xdplb("xdplb2", &path, &[]);
    assert!(wait_log(&c, "xdplb2", "ready in"), "{}", c.log("xdplb2"));
    let s = c.wait_status(WAIT, "web applied and big retried", |s| {
        backend_states(s, "web") == ["active"; 3] && s["apply_failures"].as_u64() >= Some(3)
    });
    assert!(s["apply_pending"].as_str().unwrap().contains("VIP big"), "{s}");
    let names = c.requests(topology::target(VIP4, 80), 60);
    for b in ["b1", "b2", "b3"] {
        assert!(names.iter().any(|n| n == b), "{b} served none of {names:?}");
    }
    let log = c.log("xdplb2");
    assert_eq!(log.matches("VIP big: the Maglev pool has no free region").count(), 1, "logged once:\n{log}");
    assert!(log.contains("retrying every second"), "{log}");
    let metrics = c.metrics();
    assert!(metrics.contains("\nxdplb_apply_failures_total "), "{metrics}");
    // `big` still cannot be applied; a reload that changes only `web` (a
    // fourth backend) is applied all the same, and `big` stays retried.
    let big = vip("big", 79, 1, check, "    table_size: 4194301\n");
    let yaml = config(&[big, vip("web", 80, 4, check, "")]).replace("vips:", "metrics_listen: 127.0.0.1:9464\nvips:");
    c.write_config("xdplb.yaml", &yaml);
    c.signal("xdplb2", libc::SIGHUP);
    let s = c.wait_status(WAIT, "the reload adding a backend to web", |s| {
        s["reloads_ok"].as_u64() >= Some(1) && backend_states(s, "web") == ["active"; 4]
    });
    assert_eq!(s["reloads_failed"], 0, "{s}\n{}", c.log("xdplb2"));
    assert!(s["last_reload_errors"].as_array().unwrap().is_empty(), "{s}");
    assert!(s["apply_pending"].as_str().unwrap().contains("VIP big"), "{s}");
    let names = c.requests(topology::target(VIP4, 80), 80);
    assert!(names.iter().any(|n| n == "b4"), "the new backend served none of {names:?}");
}

#[test]
fn a_cold_start_whose_metrics_address_is_taken_stops_before_attaching() {
    let c = cluster(1, 1);
    // Another process in the balancer's namespace holds the address.
    let _holder = c.lb.enter(|| std::net::TcpListener::bind("127.0.0.1:9464").unwrap());
    let check = "type: tcp, interval: 300ms, timeout: 200ms, rise: 1, fall: 2";
    let yaml = config(&[vip("web", 80, 1, check, "")]).replace("vips:", "metrics_listen: 127.0.0.1:9464\nvips:");
    let path = c.write_config("xdplb.yaml", &yaml);
    c.start_xdplb("xdplb", &path, &[]);
    let exit = c.wait_exit("xdplb", WAIT);
    let log = c.log("xdplb");
    assert!(exit.is_some_and(|s| !s.success()), "{exit:?}\n{log}");
    assert!(log.contains("cannot listen for metrics on 127.0.0.1:9464"), "{log}");
    assert!(log.contains("ss -ltnp 'sport = :9464'"), "{log}");
    assert!(!xdp_attached(&c), "nothing attached:\n{log}");
    assert!(!c.pin_root.join("lb0/VIPS").exists(), "no maps pinned:\n{log}");
}

#[test]
fn a_map_entry_changed_behind_the_controllers_back_is_repaired() {
    let c = cluster(2, 2);
    let check = "type: tcp, interval: 300ms, timeout: 200ms, rise: 1, fall: 2";
    let path = c.write_config("xdplb.yaml", &config(&[vip("web", 80, 2, check, "")]));
    c.start_xdplb("xdplb", &path, &[]);
    c.wait_backend_states("web", &["active", "active"], WAIT);
    // The VIP's entry goes: its key is the address, the port (network
    // order), the protocol and the family.
    let key = "198 18 100 1 0 0 0 0 0 0 0 0 0 0 0 0 0 80 6 4";
    let vips = c.pin_root.join("lb0/VIPS");
    let mut cmd = c.lb.command("bpftool");
    cmd.args(["map", "delete", "pinned"]).arg(&vips).arg("key").args(key.split(' '));
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
    let lookup = || {
        let mut cmd = c.lb.command("bpftool");
        cmd.args(["map", "lookup", "pinned"]).arg(&vips).arg("key").args(key.split(' '));
        cmd.output().unwrap().status.success()
    };
    assert!(!lookup(), "deleted");
    // Compared every 30 s: repaired within two rounds.
    let s = c.wait_status(Duration::from_secs(70), "the repair", |s| s["drift_repairs"].as_u64() >= Some(1));
    assert_eq!(backend_states(&s, "web"), ["active", "active"]);
    assert!(lookup(), "the VIP entry is back");
    let log = c.log("xdplb");
    assert!(log.contains("map drift repaired: VIP 198.18.100.1:80: its entry was missing in the VIP map"), "{log}");
    c.requests(topology::target(VIP4, 80), 10);
}
