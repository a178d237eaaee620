//! A DSR backend must be on a network of the balanced interface: DSR keeps
//! the VIP as the IP destination and changes only the MAC, so a router in
//! between would route the packet by the VIP. `xdplb run` refuses such a
//! file, a reload that brings one is rejected and the running
//! configuration keeps serving; IP-in-IP behind a router stays allowed.
//! A backend already serving whose route moves behind a gateway is left
//! out (and named in a warning) until the route is direct again, and does
//! not block later reloads.

use std::{
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use tests::topology::{self, Cluster, ClusterSpec, RequestStream, Servers, VIP4, VIP4_2, backend_states};

const WAIT: Duration = Duration::from_secs(30);
/// A network behind a router: backend 2 (198.18.0.12) routes it for the balancer.
const ROUTED_NET: &str = "198.19.5.0/24";
const ROUTER: &str = "198.18.0.12";
const ROUTED_BACKEND: &str = "198.19.5.5";

fn vip(name: &str, addr: &str, forwarding: &str, backends: &[String]) -> String {
    let mut y =
        format!("  - name: {name}\n    address: {addr}\n    port: 80\n    forwarding: {forwarding}\n    backends:\n");
    for b in backends {
        y += &format!("      - address: {b}\n");
    }
    y + "    health_check: {type: tcp, interval: 200ms, timeout: 150ms, rise: 1, fall: 2}\n"
}

fn config(vips: &[String]) -> String {
    format!(
        "interface: lb0\nipip_source_v4: {}\nipip_source_v6: {}\nvips:\n{}",
        topology::IPIP_SOURCE_V4,
        topology::IPIP_SOURCE_V6,
        vips.concat()
    )
}

/// Runs `cmd` to its end, or kills it after `limit` (then the test fails).
fn run_bounded(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            child.kill().ok();
            let out = child.wait_with_output().unwrap();
            panic!("still running after {limit:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_dsr_backend_behind_a_router_is_refused_at_start_and_at_reload() {
    let c =
        Cluster::new(ClusterSpec { backends: 2, servers: Servers::Builtin, bin_dir: topology::bin_dir(), nat: None });
    for i in 0..2 {
        c.start_server(i, 80);
    }
    c.lb.ip(&format!("route add {ROUTED_NET} via {ROUTER} dev lb0"));
    let direct: Vec<String> = (0..2).map(|i| topology::backend4(i).to_string()).collect();
    let mut with_routed = direct.clone();
    with_routed.push(ROUTED_BACKEND.to_string());
    let want = format!(
        "vips `web`: backend {ROUTED_BACKEND} of DSR VIP {VIP4}:80 is reached through gateway {ROUTER}, not on a \
         network of lb0"
    );
    let fix = "use forwarding: ipip, or put the backend on a network of lb0";

    // At start: refused, nothing attached.
    let bad = c.write_config("bad.yaml", &config(&[vip("web", VIP4, "dsr", &with_routed)]));
    let out = run_bounded(c.xdplb_in(&c.lb, &["run", "--config", bad.to_str().unwrap(), "--iface", "lb0"]), WAIT);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&want) && err.contains(fix), "{err}");
    assert!(err.contains("nothing was started"), "{err}");
    assert!(!c.pin_root.join("lb0/link").exists(), "nothing may be attached");

    // At reload: rejected, the running configuration keeps serving.
    let good = config(&[vip("web", VIP4, "dsr", &direct)]);
    let path = c.write_config("xdplb.yaml", &good);
    c.start_xdplb("xdplb", &path, &[]);
    c.wait_backend_states("web", &["active", "active"], WAIT);
    let stream = RequestStream::start(&c.client, topology::target(VIP4, 80), Duration::from_millis(20), 10_000);
    std::thread::sleep(Duration::from_millis(500));
    c.write_config("xdplb.yaml", &config(&[vip("web", VIP4, "dsr", &with_routed)]));
    let s = c.wait_status(WAIT, "the rejected reload", |s| s["reloads_failed"] == 1);
    let errors = s["last_reload_errors"].to_string();
    assert!(errors.contains(&want) && errors.contains(fix), "{errors}");
    assert_eq!(s["config_generation"], 1);
    assert_eq!(backend_states(&s, "web"), ["active", "active"]);
    std::thread::sleep(Duration::from_millis(500));
    let samples = stream.stop();
    let failed: Vec<_> = samples.iter().filter(|s| s.result.is_err()).collect();
    assert!(samples.len() > 30 && failed.is_empty(), "{} requests, failures: {failed:?}", samples.len());
    assert!(c.log("xdplb").contains("reload (the file changed) rejected"), "{}", c.log("xdplb"));
    let out = c.xdplb_in(&c.lb, &["reload"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.starts_with("lb0: reload REJECTED, still running generation 1\n") && text.contains(&want), "{text}");

    // IP-in-IP behind the router is fine: the outer header is addressed to the backend.
    let tunnel = vip("tunnel", VIP4_2, "ipip", &[ROUTED_BACKEND.to_string()]);
    c.write_config("xdplb.yaml", &config(&[vip("web", VIP4, "dsr", &direct), tunnel]));
    let s = c.wait_status(WAIT, "the IP-in-IP reload", |s| s["reloads_ok"] == 1);
    assert_eq!(s["config_generation"], 2, "{}", s["last_reload_errors"]);
    assert_eq!(backend_states(&s, "web"), ["active", "active"]);
}

#[test]
fn a_serving_backend_whose_route_moves_behind_a_gateway_is_left_out_and_reloads_go_on() {
    let c =
        Cluster::new(ClusterSpec { backends: 2, servers: Servers::Builtin, bin_dir: topology::bin_dir(), nat: None });
    for i in 0..2 {
        c.start_server(i, 80);
    }
    let (b1, b2) = (topology::backend4(0), topology::backend4(1));
    let direct: Vec<String> = [b1, b2].iter().map(ToString::to_string).collect();
    let path = c.write_config("xdplb.yaml", &config(&[vip("web", VIP4, "dsr", &direct)]));
    c.start_xdplb("xdplb", &path, &[]);
    c.wait_backend_states("web", &["active", "active"], WAIT);

    // Backend 2 routes for backend 1 now: the health checks still reach it
    // (backend 2 forwards them), DSR would not.
    c.backends[1].sysctl("net.ipv4.ip_forward", "1");
    c.lb.ip(&format!("route add {b1}/32 via {b2} dev lb0"));
    let s = c.wait_backend_states("web", &["down", "active"], WAIT);
    let health: Vec<&str> =
        s["vips"][0]["backends"].as_array().unwrap().iter().map(|b| b["health"].as_str().unwrap()).collect();
    assert_eq!(health, ["up", "up"], "left out by its route, not its health");
    let warning = format!(
        "backend not used: vips `web`: backend {b1} of DSR VIP {VIP4}:80 is reached through gateway {b2}, not on a \
         network of lb0"
    );
    assert!(c.log("xdplb").contains(&warning), "{}", c.log("xdplb"));
    let names = c.requests(topology::target(VIP4, 80), 20);
    assert!(names.iter().all(|n| n.contains("b2")), "{names:?}");

    // An unrelated edit is applied; backend 1 stays out while its route is routed.
    let tunnel = vip("tunnel", VIP4_2, "ipip", &[b2.to_string()]);
    c.write_config("xdplb.yaml", &config(&[vip("web", VIP4, "dsr", &direct), tunnel]));
    let s = c.wait_status(WAIT, "the unrelated reload", |s| s["reloads_ok"] == 1 || s["reloads_failed"] == 1);
    assert_eq!(s["reloads_failed"], 0, "{}", s["last_reload_errors"]);
    assert_eq!(s["config_generation"], 2);
    c.wait_backend_states("tunnel", &["active"], WAIT);
    assert_eq!(backend_states(&c.status().unwrap(), "web"), ["down", "active"]);

    // The route is direct again: backend 1 is back.
    c.lb.ip(&format!("route del {b1}/32 via {b2} dev lb0"));
    c.wait_backend_states("web", &["active", "active"], WAIT);
}
