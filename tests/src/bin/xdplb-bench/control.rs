//! The control plane at scale: Maglev build time, start and reload with
//! 1,000 VIPs × 100 backends (the real `xdplb run`), how fast a running
//! controller answers signals and health changes and how old its status is
//! with 1M tracked flows, and the health checker's CPU for 2,000 backends
//! checked every second.

use std::{
    collections::HashMap,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, TcpListener},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use lb_common::maglev::{self, MaglevBackend};
use lb_userspace::{
    config::HealthCheck,
    health::{Checker, Key, Target},
};
use tests::topology::{self, NETNS_PREFIX, Netns, unique_tag};

use crate::report::Report;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

pub fn run(report: &mut Report, quick: bool) {
    println!("\n== control plane ==");
    for n in [10usize, 100, 1000] {
        let backends: Vec<MaglevBackend> =
            (0..n).map(|i| MaglevBackend { key: maglev::backend_key(&[i as u32, 7, 0, 0], 80), weight: 1 }).collect();
        let ms = median(
            (0..5)
                .map(|_| {
                    let t = Instant::now();
                    std::hint::black_box(maglev::build(&backends, maglev::DEFAULT_TABLE_SIZE));
                    t.elapsed().as_secs_f64() * 1000.0
                })
                .collect(),
        );
        report.add("control", &format!("maglev build, {n} backends, 65537 slots"), "xdplb", "milliseconds", ms, "ms");
    }
    scale(report);
    stalls(report, if quick { 3 } else { 5 });
    checker_cpu(report, if quick { 5 } else { 10 });
}

/// Milliseconds in a log line "... in N ms" / "(ready in N ms)" containing `marker`.
fn logged_ms(log: &str, marker: &str) -> Option<f64> {
    let line = log.lines().find(|l| l.contains(marker))?;
    let at = line.rfind(" ms")?;
    line[..at].rsplit(' ').next()?.parse().ok()
}

fn vm_hwm_mib(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// `xdplb run` with 1,000 VIPs × 100 backends (IPv6, behind one gateway).
fn scale(report: &mut Report) {
    const VIPS: usize = 1000;
    const PER_VIP: usize = 100;
    let tag = unique_tag();
    let ns = Netns::create(format!("{NETNS_PREFIX}{tag}-scale"));
    ns.ip("link add s0 type veth peer name s1");
    ns.ip("link set s1 up");
    ns.ip("addr add 2001:db8::1/64 dev s0 nodad");
    ns.ip("link set s0 up");
    ns.ip("neigh add 2001:db8::2 lladdr 02:00:00:00:00:02 dev s0 nud permanent");
    ns.ip("-6 route add 2001:db8:1::/48 via 2001:db8::2 dev s0");
    let dir = std::env::temp_dir().join(format!("xdplb-test-{tag}"));
    std::fs::create_dir_all(dir.join("bpffs")).unwrap();
    let mounted =
        Command::new("mount").args(["-t", "bpf", "bpf"]).arg(dir.join("bpffs")).status().is_ok_and(|s| s.success());
    assert!(mounted, "mounting a BPF filesystem failed");
    // 10007 slots per table: a prime over 100 × 100, so 100 backends stay within 1% (4099 would not).
    // IP-in-IP: the backends are behind a gateway, which DSR refuses.
    let mut y = String::from("interface: s0\nxdp_mode: skb\nvips:\n");
    for v in 0..VIPS {
        y += &format!(
            "  - name: v{v}\n    address: 2001:db8:100::{:x}\n    port: 80\n    forwarding: ipip\n    table_size: 10007\n    health_check: {{type: none}}\n    backends:\n",
            v + 1
        );
        for b in 0..PER_VIP {
            y += &format!("      - address: 2001:db8:1:{:x}::{:x}\n", v + 1, b + 1);
        }
    }
    let path = dir.join("scale.yaml");
    std::fs::write(&path, &y).unwrap();
    let log_path = dir.join("xdplb.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let started = Instant::now();
    let mut child = ns
        .command(topology::bin_dir().join("xdplb"))
        .args(["run", "--detach-on-exit", "--config"])
        .arg(&path)
        .env("XDPLB_PIN_ROOT", dir.join("bpffs/xdplb"))
        .env("XDPLB_STATE_DIR", dir.join("run"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let wait_for = |marker: &str, limit: Duration| -> bool {
        let t = Instant::now();
        while t.elapsed() < limit {
            if read_log().contains(marker) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    };
    if wait_for("ready in", Duration::from_secs(300)) {
        let wall = started.elapsed().as_secs_f64();
        let case = format!("start, {VIPS} VIPs x {PER_VIP} backends");
        report.add("control", &case, "xdplb", "seconds_to_ready", wall, "s");
        if let Some(ms) = logged_ms(&read_log(), "ready in") {
            report.add("control", &case, "xdplb", "seconds_in_controller", ms / 1000.0, "s");
        }
        // The first status snapshot of 100,000 backends, then the reload.
        std::thread::sleep(Duration::from_secs(2));
        let changed = y.replacen(
            "      - address: 2001:db8:1:1::1\n",
            "      - address: 2001:db8:1:1::1\n        weight: 2\n",
            1,
        );
        std::fs::write(&path, changed).unwrap();
        unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
        if wait_for("generation 2", Duration::from_secs(120)) {
            if let Some(ms) = logged_ms(&read_log(), "generation 2") {
                report.add("control", "reload changing one backend, same scale", "xdplb", "milliseconds", ms, "ms");
            }
        } else {
            report.note("scale: the reload did not finish within 120 s");
        }
        if let Some(mib) = vm_hwm_mib(child.id()) {
            report.add("control", &case, "xdplb", "peak_memory", mib, "MiB");
        }
    } else {
        report.note(format!("scale: xdplb did not become ready within 300 s; log:\n{}", read_log()));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    let _ = Command::new("umount").arg("-l").arg(dir.join("bpffs")).status();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Polls `done` every 2 ms for up to `limit`; the time it took, if it became true.
fn time_until(limit: Duration, mut done: impl FnMut() -> bool) -> Option<f64> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if done() {
            return Some(t.elapsed().as_secs_f64() * 1000.0);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

/// Reports NAME_median and NAME_max of `ms`, if any were measured.
fn add_median_max(report: &mut Report, case: &str, name: &str, ms: &[f64]) {
    if ms.is_empty() {
        return;
    }
    let max = ms.iter().copied().fold(0.0, f64::max);
    report.add("control", case, "xdplb", &format!("{name}_median"), median(ms.to_vec()), "ms");
    report.add("control", case, "xdplb", &format!("{name}_max"), max, "ms");
}

/// `xdplb run` with 1M flows in its connection table (written through the
/// pinned FLOWS map), while it counts them for the status every tick:
/// SIGHUP → new generation in the status file; a health check's result
/// changing → the backend's state in the BACKENDS map (this includes the
/// check's 100 ms interval); and the status file's age.
fn stalls(report: &mut Report, rounds: usize) {
    use aya::maps::{Array, Map, MapData};
    use lb_common::maps::{BackendSlot, FlowKey, FlowValue, names};

    const FLOWS: u32 = 1_000_000;
    let case = "1M tracked flows";
    let tag = unique_tag();
    let ns = Netns::create(format!("{NETNS_PREFIX}{tag}-stall"));
    ns.ip("link add s0 type veth peer name s1");
    ns.ip("link set s1 up");
    ns.ip("addr add 198.18.0.1/24 dev s0");
    ns.ip("link set s0 up");
    for b in ["198.18.0.2", "198.18.0.3"] {
        ns.ip(&format!("neigh add {b} lladdr 02:00:00:00:00:02 dev s0 nud permanent"));
    }
    let dir = std::env::temp_dir().join(format!("xdplb-test-{tag}"));
    std::fs::create_dir_all(dir.join("bpffs")).unwrap();
    let mounted =
        Command::new("mount").args(["-t", "bpf", "bpf"]).arg(dir.join("bpffs")).status().is_ok_and(|s| s.success());
    assert!(mounted, "mounting a BPF filesystem failed");
    let flag = dir.join("healthy");
    std::fs::write(&flag, "").unwrap();
    let y = format!(
        "interface: s0\nxdp_mode: skb\nvips:\n  - name: web\n    address: 198.18.100.1\n    port: 80\n    \
         health_check: {{type: exec, command: [/usr/bin/test, -e, {}], interval: 100ms, timeout: 100ms, rise: 1, fall: 1, initial_state: up}}\n    \
         backends:\n      - address: 198.18.0.2\n      - address: 198.18.0.3\n",
        flag.display()
    );
    let path = dir.join("stall.yaml");
    std::fs::write(&path, &y).unwrap();
    let (pin_root, state_dir) = (dir.join("bpffs/xdplb"), dir.join("run"));
    let log_path = dir.join("xdplb.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = ns
        .command(topology::bin_dir().join("xdplb"))
        .args(["run", "--detach-on-exit", "--config"])
        .arg(&path)
        .env("XDPLB_PIN_ROOT", &pin_root)
        .env("XDPLB_STATE_DIR", &state_dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let status = || lb_userspace::status::read(&state_dir, "s0").ok();
    let ready = time_until(Duration::from_secs(60), || read_log().contains("ready in")).is_some()
        && time_until(Duration::from_secs(10), || status().is_some()).is_some();
    if !ready {
        report.note(format!("stalls: xdplb did not become ready within 60 s; log:\n{}", read_log()));
    } else {
        let pins = pin_root.join("s0");
        let flows = MapData::from_pin(pins.join(names::FLOWS)).unwrap();
        let entries: Vec<(FlowKey, FlowValue)> = (0..FLOWS)
            .map(|i| {
                let key = FlowKey {
                    src: [(0xc612_0000 | (i >> 16)).to_be(), 0, 0, 0],
                    dst: [0xc612_6401u32.to_be(), 0, 0, 0],
                    sport: (i as u16).to_be(),
                    dport: 80u16.to_be(),
                    protocol: 6,
                    family: 4,
                    _pad: [0; 2],
                };
                (key, FlowValue { backend_id: i % 2, generation: 0, hash: i, last_seen_s: 0 })
            })
            .collect();
        let written = lb_userspace::walks::insert_batched(&flows, &entries).unwrap_or(0);
        println!("stalls: {written} flows written to FLOWS");
        let backends: Array<MapData, BackendSlot> =
            Array::try_from(Map::Array(MapData::from_pin(pins.join(names::BACKENDS)).unwrap())).unwrap();
        let states = || -> Vec<u8> { (0..8).map(|i| backends.get(&i, 0).map_or(0, |b| b.current().state)).collect() };
        // Let the first counts of the full table come and go.
        std::thread::sleep(Duration::from_secs(3));
        let mut age = Vec::new();
        let mut tracked = 0;
        for _ in 0..50 {
            if let Some(s) = status() {
                let now =
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
                age.push(now.saturating_sub(s.updated_unix_ms) as f64);
                tracked = tracked.max(s.flows_tracked);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let age_max = age.iter().copied().fold(0.0, f64::max);
        report.add("control", case, "xdplb", "status_age_max", age_max / 1000.0, "s");
        report.add("control", case, "xdplb", "flows_tracked", tracked as f64, "flows");
        let mut hup = Vec::new();
        for _ in 0..rounds {
            let generation = status().map_or(0, |s| s.config_generation);
            unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
            match time_until(Duration::from_secs(60), || status().is_some_and(|s| s.config_generation > generation)) {
                Some(ms) => hup.push(ms),
                None => report.note("stalls: a SIGHUP was not answered within 60 s"),
            }
            std::thread::sleep(Duration::from_millis(700));
        }
        add_median_max(report, case, "sighup_to_reload", &hup);
        let mut health = Vec::new();
        for round in 0..rounds * 2 {
            let before = states();
            if round % 2 == 0 {
                let _ = std::fs::remove_file(&flag);
            } else {
                std::fs::write(&flag, "").unwrap();
            }
            match time_until(Duration::from_secs(60), || states() != before) {
                Some(ms) => health.push(ms),
                None => report.note("stalls: a health change did not reach the dataplane within 60 s"),
            }
            std::thread::sleep(Duration::from_millis(700));
        }
        add_median_max(report, case, "check_change_to_dataplane", &health);
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    let _ = Command::new("umount").arg("-l").arg(dir.join("bpffs")).status();
    let _ = std::fs::remove_dir_all(&dir);
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU of the health checker (its own runtime thread) for 2,000 backends
/// with tcp checks every second, against listeners in a namespace.
fn checker_cpu(report: &mut Report, secs: u64) {
    const N: usize = 2000;
    let ns = Netns::create(format!("{NETNS_PREFIX}{}-checks", unique_tag()));
    // (No dummy driver on this kernel: one end of a veth pair holds the addresses.)
    ns.ip("link add d0 type veth peer name d1");
    ns.ip("link set d1 up");
    ns.ip("link set d0 up");
    let addrs: Vec<IpAddr> = (0..N).map(|i| IpAddr::V4(Ipv4Addr::from(0xc613_0000 + i as u32 + 1))).collect();
    let mut batch = Command::new("ip").args(["-n", &ns.name, "-batch", "-"]).stdin(Stdio::piped()).spawn().unwrap();
    {
        let stdin = batch.stdin.as_mut().unwrap();
        for a in &addrs {
            writeln!(stdin, "addr add {a}/32 dev d0").unwrap();
        }
    }
    assert!(batch.wait().unwrap().success(), "adding {N} addresses failed");
    let result = ns.enter(move || {
        // One listener on every address: the checks' connections end there.
        let listener = TcpListener::bind("0.0.0.0:80").unwrap();
        std::thread::spawn(move || {
            for c in listener.incoming() {
                drop(c);
            }
        });
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let mut checker = Checker::new(tx);
            let check = HealthCheck { rise: 1, ..HealthCheck::default() };
            let targets: Vec<Target> = addrs
                .iter()
                .map(|a| Target {
                    key: Key { vip: "198.18.100.1".parse().unwrap(), vip_port: 80, protocol: 6, addr: *a, port: 0 },
                    addr: *a,
                    port: 80,
                    vip: "198.18.100.1".parse().unwrap(),
                    check: check.clone(),
                })
                .collect();
            checker.sync(targets, |_| false);
            // Let every checker come up, then measure whole seconds.
            let mut up = HashMap::new();
            let deadline = Instant::now() + Duration::from_secs(10);
            while up.len() < N && Instant::now() < deadline {
                if let Ok(Some(t)) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
                    up.insert(t.key, t.up);
                }
            }
            let (c0, t0) = (thread_cpu(), Instant::now());
            let checks0: u64 = checker.table.lock().unwrap().values().map(|h| h.checks).sum();
            tokio::time::sleep(Duration::from_secs(secs)).await;
            let checks1: u64 = checker.table.lock().unwrap().values().map(|h| h.checks).sum();
            let cpu = (thread_cpu() - c0).as_secs_f64() / t0.elapsed().as_secs_f64();
            (up.len(), cpu, (checks1 - checks0) as f64 / secs as f64)
        })
    });
    let (up, cpu, rate) = result;
    let case = format!("health checker, {N} backends, tcp every 1s");
    report.add("control", &case, "xdplb", "cpu_share_of_one_core", cpu * 100.0, "%");
    report.add("control", &case, "xdplb", "checks_per_second", rate, "checks/s");
    if up < N {
        report.note(format!("health checker: only {up} of {N} backends came up"));
    }
}
