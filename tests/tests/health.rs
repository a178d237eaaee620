//! Health checks keep the cluster whole: real HTTP servers behind a VIP, a
//! client sending a steady stream of new connections, servers that die, come
//! back, answer 500, or are drained.

use std::{net::SocketAddr, time::Duration};

use tests::topology::{
    self, Cluster, ClusterSpec, KeepAlive, RequestStream, Sample, Servers, VIP4, VIP6, backend_states, http_get,
};

const WAIT: Duration = Duration::from_secs(30);
const CHECK: &str = "interval: 300ms, timeout: 200ms, rise: 2, fall: 2";

fn cluster(backends: usize) -> Cluster {
    let c = Cluster::new(ClusterSpec { backends, servers: Servers::Builtin, bin_dir: topology::bin_dir(), nat: None });
    for i in 0..backends {
        c.start_server(i, 80);
    }
    c
}

fn vip_yaml(name: &str, addr: &str, backends: &[(usize, u32)], check: &str, extra: &str) -> String {
    let v6 = addr.contains(':');
    let mut y = format!("  - name: {name}\n    address: {addr}\n    port: 80\n{extra}    backends:\n");
    for (i, w) in backends {
        let a = if v6 { topology::backend6(*i) } else { topology::backend4(*i) };
        y += &format!("      - address: {a}\n        weight: {w}\n");
    }
    y + &format!("    health_check: {{{check}}}\n")
}

fn start(c: &Cluster, vips: &[String]) -> std::path::PathBuf {
    let yaml = format!("interface: lb0\nmetrics_listen: 127.0.0.1:9464\nvips:\n{}", vips.concat());
    let path = c.write_config("xdplb.yaml", &yaml);
    c.start_xdplb("xdplb", &path, &[]);
    path
}

fn target(addr: &str) -> SocketAddr {
    SocketAddr::new(addr.parse().unwrap(), 80)
}

fn served_by(samples: &[Sample]) -> Vec<String> {
    samples.iter().filter_map(|s| s.result.clone().ok()).collect()
}

#[test]
fn a_killed_server_leaves_after_fall_checks_and_returns_after_rise() {
    let c = cluster(3);
    start(&c, &[vip_yaml("web", VIP4, &[(0, 1), (1, 1), (2, 1)], &format!("type: tcp, {CHECK}"), "")]);
    c.wait_backend_states("web", &["active"; 3], WAIT);
    // Established connections to the servers that stay.
    let mut kept: Vec<(KeepAlive, String)> = Vec::new();
    while kept.len() < 6 {
        let mut k = KeepAlive::open(&c.client, target(VIP4));
        let (_, b) = k.get("/").unwrap();
        if b != "b2" {
            kept.push((k, b));
        }
    }
    let stream = RequestStream::start(&c.client, target(VIP4), Duration::from_millis(20), 100_000);
    std::thread::sleep(Duration::from_millis(500));
    c.kill_server(1);
    let s = c.wait_backend_states("web", &["active", "down", "active"], WAIT);
    let b2 = &s["vips"][0]["backends"][1];
    assert!(b2["last_check"].as_str().unwrap().contains("198.18.0.12:80"), "{b2}");
    let detected = stream.samples().len();
    std::thread::sleep(Duration::from_secs(2));
    let after_detection: Vec<Sample> = stream.samples()[detected..].to_vec();
    let failed: Vec<_> = after_detection.iter().filter(|s| s.result.is_err()).collect();
    assert!(after_detection.len() > 20 && failed.is_empty(), "failures after detection: {failed:?}");
    assert!(!served_by(&after_detection).contains(&"b2".to_string()));
    for (k, b) in &mut kept {
        assert_eq!(k.get("/").expect("connections to other servers are untouched").1, *b);
    }
    // The log names the failed checks: exactly `fall` of them took it down.
    let log = c.log("xdplb");
    assert!(log.contains("backend DOWN: 2 consecutive checks failed, last: connect to 198.18.0.12:80"), "{log}");

    c.start_server(1, 80);
    c.wait_backend_states("web", &["active"; 3], WAIT);
    assert!(c.log("xdplb").contains("backend UP: 2 consecutive checks passed"));
    let back = c.wait_status(WAIT, "b2 serving again", |s| {
        s["vips"][0]["backends"][1]["packets_per_second"].as_f64() > Some(0.0)
    });
    // Up after start (backends start down), down, up again.
    assert_eq!(back["vips"][0]["backends"][1]["transitions"], 3);
    let samples = stream.stop();
    assert!(served_by(&samples[detected..]).contains(&"b2".to_string()), "b2 serves new connections again");
    let metrics = c.metrics();
    assert!(
        metrics.contains("xdplb_backend_health_transitions_total{vip=\"web\",backend=\"198.18.0.12\",port=\"0\"} 3")
    );
}

#[test]
fn http_checks_take_out_a_server_answering_500_and_tcp_checks_keep_it() {
    let c = cluster(2);
    start(
        &c,
        &[
            vip_yaml(
                "http",
                VIP4,
                &[(0, 1), (1, 1)],
                &format!("type: http, path: /, expect_status: 200-299, {CHECK}"),
                "",
            ),
            vip_yaml("tcp", VIP6, &[(0, 1), (1, 1)], &format!("type: tcp, {CHECK}"), ""),
        ],
    );
    c.wait_backend_states("http", &["active", "active"], WAIT);
    c.set_status(0, 500);
    let s = c.wait_backend_states("http", &["down", "active"], WAIT);
    assert!(s["vips"][0]["backends"][0]["last_check"].as_str().unwrap().contains("HTTP status 500"));
    assert_eq!(backend_states(&s, "tcp"), ["active", "active"]);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(backend_states(&c.status().unwrap(), "tcp"), ["active", "active"], "tcp checks keep b1");
    c.set_status(0, 200);
    c.wait_backend_states("http", &["active", "active"], WAIT);
}

#[test]
fn an_exec_check_script_decides() {
    let c = cluster(2);
    let flag = |i: usize| c.dir.join(format!("up-{}", topology::backend4(i)));
    std::fs::write(flag(0), "").unwrap();
    std::fs::write(flag(1), "").unwrap();
    // The script sees the backend in its environment, as LVS check scripts do.
    let script = c.dir.join("check.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n[ \"$XDPLB_VIP\" = {VIP4} ] && [ \"$XDPLB_BACKEND_PORT\" = 80 ] && test -e {}/up-$XDPLB_BACKEND_ADDRESS\n",
            c.dir.display()
        ),
    )
    .unwrap();
    std::process::Command::new("chmod").arg("+x").arg(&script).status().unwrap();
    start(
        &c,
        &[vip_yaml(
            "web",
            VIP4,
            &[(0, 1), (1, 1)],
            &format!("type: exec, command: [{}], {CHECK}", script.display()),
            "",
        )],
    );
    c.wait_backend_states("web", &["active", "active"], WAIT);
    std::fs::remove_file(flag(1)).unwrap();
    let s = c.wait_backend_states("web", &["active", "down"], WAIT);
    assert!(s["vips"][0]["backends"][1]["last_check"].as_str().unwrap().contains("exited with exit status: 1"));
    std::fs::write(flag(1), "").unwrap();
    c.wait_backend_states("web", &["active", "active"], WAIT);
}

#[test]
fn draining_keeps_a_long_lived_connection_and_takes_no_new_one() {
    let c = cluster(2);
    let path = start(&c, &[vip_yaml("web", VIP4, &[(0, 1), (1, 1)], &format!("type: tcp, {CHECK}"), "")]);
    c.wait_backend_states("web", &["active", "active"], WAIT);
    let mut long = loop {
        let mut k = KeepAlive::open(&c.client, target(VIP4));
        if k.get("/").unwrap().1 == "b1" {
            break k;
        }
    };
    let yaml = std::fs::read_to_string(&path).unwrap().replacen("weight: 1", "weight: 0", 1);
    c.write_config("xdplb.yaml", &yaml);
    c.wait_backend_states("web", &["draining", "active"], WAIT);
    let stream = RequestStream::start(&c.client, target(VIP4), Duration::from_millis(20), 100);
    for _ in 0..10 {
        assert_eq!(long.get("/").expect("the drained connection lives on").1, "b1");
        std::thread::sleep(Duration::from_millis(200));
    }
    let samples = stream.stop();
    assert!(samples.iter().all(|s| s.result.as_deref() == Ok("b2")), "new connections only to b2: {samples:?}");
    let s = c.wait_status(WAIT, "b1's tracked flows", |s| s["vips"][0]["backends"][0]["flows"].as_u64() >= Some(1));
    assert_eq!(s["vips"][0]["backends"][0]["health"], "up");
}

fn all_down(action: &str) -> (Cluster, serde_json::Value) {
    let c = cluster(3);
    let extra = match action {
        "sorry_server" => {
            format!("    on_all_down: sorry_server\n    sorry_server: {{address: {}}}\n", topology::backend4(2))
        }
        other => format!("    on_all_down: {other}\n"),
    };
    start(&c, &[vip_yaml("web", VIP4, &[(0, 1), (1, 1)], &format!("type: tcp, {CHECK}"), &extra)]);
    c.wait_backend_states("web", &["active", "active"], WAIT);
    c.kill_server(0);
    c.kill_server(1);
    let s = c.wait_status(WAIT, "all backends down", |s| {
        let st = backend_states(s, "web");
        st.len() >= 2 && st[0] == "down" && st[1] == "down"
    });
    (c, s)
}

#[test]
fn all_down_with_a_sorry_server_sends_new_flows_there() {
    let (c, s) = all_down("sorry_server");
    assert_eq!(backend_states(&s, "web"), ["down", "down", "sorry"]);
    let names: Vec<String> = c.client.enter(|| {
        (0..10)
            .map(|_| http_get(target(VIP4), "/", Duration::from_secs(3)).expect("the sorry server answers").1)
            .collect()
    });
    assert!(names.iter().all(|n| n == "b3"), "{names:?}");
    // A backend coming back replaces the sorry server.
    c.start_server(0, 80);
    c.wait_backend_states("web", &["active", "down"], WAIT);
}

#[test]
fn all_down_with_drop_drops_and_counts() {
    let (c, _) = all_down("drop");
    let r = c.client.enter(|| http_get(target(VIP4), "/", Duration::from_millis(1500)));
    assert!(r.is_err(), "{r:?}");
    let s = c.wait_status(WAIT, "drop_no_backend counted", |s| s["reasons"]["drop_no_backend"].as_u64() >= Some(1));
    assert_eq!(s["reasons"]["pass_all_down"], 0);
}

#[test]
fn all_down_with_pass_hands_flows_to_the_local_stack() {
    let (c, _) = all_down("pass");
    // The balancer's own stack owns the VIP here and refuses the connection.
    c.lb.ip(&format!("addr add {VIP4}/32 dev lo"));
    let r = c.client.enter(|| http_get(target(VIP4), "/", Duration::from_millis(1500)));
    assert!(r.as_ref().is_err_and(|e| e.contains("refused")), "the LB's kernel answered with a reset: {r:?}");
    let s = c.wait_status(WAIT, "pass_all_down counted", |s| s["reasons"]["pass_all_down"].as_u64() >= Some(1));
    assert_eq!(s["reasons"]["drop_no_backend"], 0);
}
