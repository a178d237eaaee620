//! The runtime API end to end: `xdplb drain|maint|ready|set weight|clear|
//! reload|show` against `xdplb run` in a namespace cluster with real HTTP
//! servers, under a steady stream of new connections and a keep-alive one.

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    process::Output,
    time::{Duration, Instant},
};

use tests::topology::{
    self, Cluster, ClusterSpec, KeepAlive, RequestStream, Sample, Servers, VIP4, VIP6, backend_states, wait_until,
};

const WAIT: Duration = Duration::from_secs(30);
const CHECK: &str = "{type: tcp, interval: 300ms, timeout: 200ms, rise: 2, fall: 2}";

fn cluster(backends: usize) -> Cluster {
    let c = Cluster::new(ClusterSpec { backends, servers: Servers::Builtin, bin_dir: topology::bin_dir(), nat: None });
    for i in 0..backends {
        c.start_server(i, 80);
    }
    c
}

/// VIP `name` at `addr`:80 over backends `backends` (indexes), fast checks.
fn vip_yaml(name: &str, addr: &str, backends: &[usize]) -> String {
    let v6 = addr.contains(':');
    let mut y = format!("  - name: {name}\n    address: {addr}\n    port: 80\n    backends:\n");
    for i in backends {
        let a = if v6 { topology::backend6(*i) } else { topology::backend4(*i) };
        y += &format!("      - address: {a}\n");
    }
    y + &format!("    health_check: {CHECK}\n")
}

fn config(vips: &[String]) -> String {
    format!("interface: lb0\nvips:\n{}", vips.concat())
}

fn target(addr: &str) -> SocketAddr {
    SocketAddr::new(addr.parse().unwrap(), 80)
}

/// `xdplb ARGS` in the balancer's namespace, as root.
fn xdplb(c: &Cluster, args: &[&str]) -> Output {
    c.xdplb_in(&c.lb, args).output().unwrap()
}

/// `xdplb ARGS` that must succeed; its stdout.
fn ok(c: &Cluster, args: &[&str]) -> String {
    let out = xdplb(c, args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "xdplb {args:?} failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    text
}

/// `xdplb ARGS` that must fail with exit 1; its stderr.
fn fails(c: &Cluster, args: &[&str]) -> String {
    let out = xdplb(c, args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "xdplb {args:?}: {}{err}", String::from_utf8_lossy(&out.stdout));
    err
}

/// Backend `i` of VIP `vip` in the status.
fn backend(s: &serde_json::Value, vip: &str, i: usize) -> serde_json::Value {
    let v = s["vips"].as_array().unwrap().iter().find(|v| v["name"] == vip).unwrap();
    v["backends"][i].clone()
}

/// Waits for `n` more samples of `stream` than `from`; those samples.
fn next_samples(stream: &RequestStream, from: usize, n: usize) -> Vec<Sample> {
    assert!(wait_until(WAIT, || stream.samples().len() >= from + n), "the request stream stalled");
    stream.samples()[from..].to_vec()
}

fn served(samples: &[Sample]) -> Vec<String> {
    samples.iter().map(|s| s.result.clone().unwrap_or_else(|e| panic!("a request failed: {e}"))).collect()
}

#[test]
fn drain_maint_ready_and_set_weight_steer_new_connections() {
    let c = cluster(3);
    let path = c.write_config("xdplb.yaml", &config(&[vip_yaml("web", VIP4, &[0, 1, 2])]));
    c.start_xdplb("xdplb", &path, &[]);
    c.wait_backend_states("web", &["active"; 3], WAIT);
    let mut long = loop {
        let mut k = KeepAlive::open(&c.client, target(VIP4));
        if k.get("/").unwrap().1 == "b1" {
            break k;
        }
    };
    let stream = RequestStream::start(&c.client, target(VIP4), Duration::from_millis(20), 100_000);
    next_samples(&stream, 0, 20);

    // drain: the keep-alive connection stays on b1, new connections go elsewhere.
    assert_eq!(ok(&c, &["drain", "web", "198.18.0.11"]), "web 198.18.0.11: drain (file: weight 1)\n");
    // The status shows it when the command returns.
    let s = c.status().unwrap();
    assert_eq!(backend_states(&s, "web"), ["draining", "active", "active"]);
    assert_eq!(backend(&s, "web", 0)["override"], "drain");
    assert_eq!(
        (backend(&s, "web", 0)["weight"].as_u64(), backend(&s, "web", 0)["configured_weight"].as_u64()),
        (Some(0), Some(1))
    );
    let mark = stream.samples().len();
    for _ in 0..5 {
        assert_eq!(long.get("/").expect("a drained backend keeps its connections").1, "b1");
    }
    let drained = served(&next_samples(&stream, mark, 40));
    assert!(!drained.contains(&"b1".to_string()), "no new connection to a drained backend: {drained:?}");

    // maint: nothing at all; the keep-alive connection is re-steered like one
    // of a down backend, and b2 or b3, which never saw it, reset it.
    assert_eq!(ok(&c, &["maint", "web", "198.18.0.11"]), "web 198.18.0.11: maint (file: weight 1)\n");
    let s = c.status().unwrap();
    assert_eq!(backend_states(&s, "web"), ["maint", "active", "active"]);
    assert_eq!(
        (backend(&s, "web", 0)["override"].as_str(), backend(&s, "web", 0)["health"].as_str()),
        (Some("maint"), Some("up"))
    );
    assert!(long.get("/").is_err(), "the connection of a backend in maintenance moves, and breaks");
    let mark = stream.samples().len();
    assert!(!served(&next_samples(&stream, mark, 30)).contains(&"b1".to_string()));
    // Its checks go on: a dead server shows down, and up again, still in maintenance.
    c.kill_server(0);
    c.wait_status(WAIT, "b1 down under maint", |s| backend(s, "web", 0)["health"] == "down");
    assert_eq!(backend_states(&c.status().unwrap(), "web"), ["maint", "active", "active"]);
    c.start_server(0, 80);
    c.wait_status(WAIT, "b1 up under maint", |s| backend(s, "web", 0)["health"] == "up");

    // ready: back to the file, and to new connections.
    assert_eq!(
        ok(&c, &["ready", "web", "198.18.0.11"]),
        "web 198.18.0.11: ready, weight 1 as in the file (override maint cleared)\n"
    );
    let s = c.status().unwrap();
    assert_eq!(backend_states(&s, "web"), ["active", "active", "active"]);
    assert_eq!(backend(&s, "web", 0)["override"], "");
    let mark = stream.samples().len();
    let start = Instant::now();
    while !served(&stream.samples()[mark..]).contains(&"b1".to_string()) {
        assert!(start.elapsed() < WAIT, "b1 takes no new connection after `ready`");
        std::thread::sleep(Duration::from_millis(50));
    }

    // set weight: b2 at 20 against 1 and 1 takes the clear majority of new connections.
    assert_eq!(ok(&c, &["set", "weight", "web", "198.18.0.12", "20"]), "web 198.18.0.12: weight 20 (file: 1)\n");
    assert_eq!(backend(&c.status().unwrap(), "web", 1)["override"], "weight 20 (file: 1)");
    let names = c.requests(target(VIP4), 90);
    let b2 = names.iter().filter(|n| *n == "b2").count();
    assert!(b2 > 60, "weight 20 of 22 takes most new connections: b2 served {b2} of 90: {names:?}");
    let samples = stream.stop();
    let failed: Vec<_> = samples.iter().filter(|s| s.result.is_err()).collect();
    assert!(failed.is_empty(), "{} of {} new connections failed: {failed:?}", failed.len(), samples.len());
    let log = c.log("xdplb");
    assert!(log.contains("runtime API: web 198.18.0.11: drain (file: weight 1)"), "{log}");
}

#[test]
fn overrides_show_in_status_and_show_and_survive_reloads_and_restarts() {
    let c = cluster(3);
    let vips = |web: &[usize]| config(&[vip_yaml("web", VIP4, web), vip_yaml("web6", VIP6, &[0, 1])]);
    let path = c.write_config("xdplb.yaml", &vips(&[0, 1]));
    c.start_xdplb("xdplb", &path, &[]);
    c.wait_backend_states("web", &["active"; 2], WAIT);
    c.wait_backend_states("web6", &["active"; 2], WAIT);
    assert_eq!(ok(&c, &["set", "weight", "web6", "2001:db8::11", "5"]), "web6 2001:db8::11: weight 5 (file: 1)\n");
    assert_eq!(ok(&c, &["maint", "web", "198.18.0.12"]), "web 198.18.0.12: maint (file: weight 1)\n");

    // show: one row per backend, the VIP's columns on its first; columns as
    // wide as an IPv6 VIP needs, so every row lines up under the header.
    let text = ok(&c, &["show"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "{text}");
    assert!(lines[0].starts_with("VIP   ADDRESS"), "{text}");
    let col = |name: &str| lines[0].find(name).unwrap();
    for (line, vip, address, backend, weight, state) in [
        (lines[1], "web", "tcp 198.18.100.1:80", "198.18.0.11", "1", "active"),
        (lines[2], "", "", "198.18.0.12", "1", "maint"),
        (lines[3], "web6", "tcp [2001:db8:100::1]:80", "2001:db8::11", "5 (file: 1)", "active"),
        (lines[4], "", "", "2001:db8::12", "1", "active"),
    ] {
        let cell = |name: &str| line[col(name)..].split("  ").next().unwrap().trim();
        assert_eq!(line[..col("ADDRESS")].trim(), vip, "{text}");
        assert_eq!(cell("ADDRESS"), address, "{text}");
        assert_eq!(cell("BACKEND"), backend, "{text}");
        assert_eq!(cell("WEIGHT"), weight, "{text}");
        assert_eq!(cell("STATE"), state, "{text}");
        if !vip.is_empty() {
            assert_eq!(cell("SCHEDULER"), "maglev five-tuple", "{text}");
            assert_eq!(cell("FORWARD"), "dsr", "{text}");
        }
    }
    let status = ok(&c, &["status"]);
    assert!(status.contains("override") && status.contains("weight 5 (file: 1)"), "{status}");
    assert!(status.lines().any(|l| l.contains("198.18.0.12") && l.contains("maint")), "{status}");

    // A reload of the file keeps them; one whose backend left drops it and
    // says so. (The controller also follows the file by itself: whichever
    // reload comes first says what changed, the other one "nothing changed".)
    c.write_config("xdplb.yaml", &vips(&[0, 1, 2]));
    let said = ok(&c, &["reload"]);
    assert!(said.starts_with("lb0: reload applied, generation "), "{said}");
    assert!(c.log("xdplb").contains(": VIP web: backend 198.18.0.13 added (weight 1)"), "{said}");
    let s = c.wait_backend_states("web", &["active", "maint", "active"], WAIT);
    assert_eq!(backend(&s, "web6", 0)["override"], "weight 5 (file: 1)");
    // SIGHUP still reloads.
    let generation = s["config_generation"].as_u64().unwrap();
    c.signal("xdplb", libc::SIGHUP);
    c.wait_status(WAIT, "the SIGHUP reload", |s| s["config_generation"].as_u64() == Some(generation + 1));
    c.write_config("xdplb.yaml", &vips(&[0, 2]));
    let said = ok(&c, &["reload"]);
    assert!(said.starts_with("lb0: reload applied, generation "), "{said}");
    let dropped = "web 198.18.0.12: override maint dropped: the backend is no longer configured";
    let log = c.log("xdplb");
    assert!(log.contains(": VIP web: backend 198.18.0.12 removed") && log.contains(dropped), "{log}");
    assert!(said.contains(dropped) || said.ends_with("  nothing changed\n"), "{said}");
    assert_eq!(backend_states(&c.status().unwrap(), "web"), ["active", "active"]);

    // kill -9 leaves the socket behind; the next controller replaces it and
    // takes the overrides over from the state directory.
    c.kill("xdplb");
    assert!(c.state_dir.join("lb0.sock").exists(), "a killed controller leaves its socket");
    c.start_xdplb("xdplb2", &path, &[]);
    let s = c.wait_status(WAIT, "the restarted controller", |s| s["xdp_mode"] == "adopted");
    assert_eq!(backend(&s, "web6", 0)["override"], "weight 5 (file: 1)");
    assert_eq!(backend(&s, "web6", 0)["weight"], 5);
    assert!(
        c.log("xdplb2").contains("runtime override kept from the previous run: web6 2001:db8::11: weight 5 (file: 1)")
    );

    assert_eq!(ok(&c, &["clear", "--all"]), "web6 2001:db8::11: weight 5 (file: 1) cleared\n");
    assert_eq!(ok(&c, &["clear", "--all"]), "no override was set\n");
    assert!(!c.state_dir.join("lb0.overrides.json").exists());
    assert_eq!(backend(&c.status().unwrap(), "web6", 0)["weight"], 1);
}

#[test]
fn the_socket_is_root_only_and_errors_name_what_exists() {
    let c = cluster(2);
    let path = c.write_config("xdplb.yaml", &config(&[vip_yaml("web", VIP4, &[0, 1])]));
    c.start_xdplb("xdplb", &path, &[]);
    c.wait_backend_states("web", &["active"; 2], WAIT);
    let socket = c.state_dir.join("lb0.sock");
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600);

    // Unknown VIPs and backends: what was not found, and what there is.
    assert_eq!(fails(&c, &["drain", "www", "198.18.0.11"]), "xdplb: no VIP named \"www\"; the VIPs are: web\n");
    assert_eq!(
        fails(&c, &["maint", "web", "198.18.0.99"]),
        "xdplb: VIP web has no backend 198.18.0.99; its backends are: 198.18.0.11, 198.18.0.12\n"
    );
    assert_eq!(fails(&c, &["clear", "www"]), "xdplb: no VIP named \"www\"; the VIPs are: web\n");
    let err = fails(&c, &["drain", "web", "198.18.0.11", "--iface", "eth9"]);
    assert!(err.starts_with("xdplb: no controller serves eth9: "), "{err}");

    // Another user may read the status, not use the socket.
    let as_nobody = |args: &[&str]| {
        c.lb.command("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(c.bin_dir.join("xdplb"))
            .args(args)
            .env("XDPLB_PIN_ROOT", &c.pin_root)
            .env("XDPLB_STATE_DIR", &c.state_dir)
            .output()
            .unwrap()
    };
    let out = as_nobody(&["drain", "web", "198.18.0.11"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("permission denied on {}", socket.display())), "{err}");
    // The socket's mode is not all: with it opened to everyone (0666), the
    // controller still refuses another uid.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody(&["drain", "web", "198.18.0.11"]);
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("permission denied: the runtime API is for root"), "{err}");
    assert!(err.contains("not uid 65534"), "{err}");
    assert!(as_nobody(&["show"]).status.success());
    assert_eq!(backend_states(&c.status().unwrap(), "web"), ["active", "active"], "nothing changed");

    // status --watch refreshes until stopped; --count bounds it.
    let watched = ok(&c, &["status", "--watch", "--count", "2"]);
    assert_eq!(watched.matches("xdplb on lb0 (").count(), 2, "{watched}");

    // The socket goes with the controller.
    c.signal("xdplb", libc::SIGTERM);
    assert!(c.wait_exit("xdplb", WAIT).is_some_and(|s| s.success()));
    assert!(!socket.exists(), "the socket is removed on shutdown");
    let err = fails(&c, &["drain", "web", "198.18.0.11"]);
    assert!(err.starts_with("xdplb: no xdplb controller is running"), "{err}");

    // A state directory others can write to: refused, saying how to fix it.
    std::fs::set_permissions(&c.state_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    c.start_xdplb("xdplb2", &path, &[]);
    let exit = c.wait_exit("xdplb2", WAIT);
    assert!(exit.is_some_and(|s| !s.success()), "xdplb starts with a state directory others can write");
    let log = c.log("xdplb2");
    let want = format!(
        "the state directory {} is writable by other users (mode 0777): they could replace the control socket; fix: chmod go-w {}",
        c.state_dir.display(),
        c.state_dir.display()
    );
    assert!(log.contains(&want), "{log}");
}
