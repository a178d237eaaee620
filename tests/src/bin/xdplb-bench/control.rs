//! The control plane at scale: Maglev build time, start and reload with
//! 1,000 VIPs × 100 backends (the real `xdplb run`), and the health
//! checker's CPU for 2,000 backends checked every second.

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
    desired::BackendRef,
    health::{Checker, Target},
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
    let mut y = String::from("interface: s0\nxdp_mode: skb\nvips:\n");
    for v in 0..VIPS {
        y += &format!(
            "  - name: v{v}\n    address: 2001:db8:100::{:x}\n    port: 80\n    table_size: 10007\n    health_check: {{type: none}}\n    backends:\n",
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
                    backend: BackendRef { vip: "v".into(), addr: *a, port: 0 },
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
                    up.insert(t.backend, t.up);
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
