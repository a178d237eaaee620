//! `cargo xtask demo`: a highly available web cluster on one machine.
//!
//! Builds a cluster in network namespaces (the integration tests' topology:
//! a client, the load balancer, three nginx servers), runs `xdplb run` with
//! examples/cluster.yaml, drives a bounded stream of client requests, shows
//! a live table, and tells a short story: a server dies, comes back, is
//! drained, and the configuration is reloaded. Then it prints a summary and
//! removes everything (also on Ctrl-C or error), unless --keep.
//!
//! Flags: --keep (leave the cluster running), --non-interactive (no live
//! table; one line per step and a final `SUMMARY {json}` line).

use std::{
    collections::BTreeMap,
    io::{IsTerminal as _, Write as _},
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use tests::topology::{self, Cluster, ClusterSpec, KeepAlive, RequestStream, Sample, Servers, VIP4};

const EXAMPLE: &str = include_str!("../../../examples/cluster.yaml");
const SERVERS: usize = 3;
/// Upper bound on requests the demo sends (100 per second at most).
const MAX_REQUESTS: usize = 20_000;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

struct Ui {
    live: bool,
    step: String,
    started: Instant,
}

impl Ui {
    fn say(&mut self, sentence: &str) {
        self.step = sentence.to_string();
        let t = self.started.elapsed().as_secs_f32();
        if self.live {
            print!("\x1b[H\x1b[J");
        }
        println!("[{t:5.1}s] {sentence}");
    }

    fn progress(&self, done: usize, total: usize, what: &str) {
        let width = 30;
        let filled = width * done / total;
        if self.live {
            print!("\r[{}{}] {done}/{total} {what:<40}", "#".repeat(filled), " ".repeat(width - filled));
            let _ = std::io::stdout().flush();
            if done == total {
                println!();
            }
        } else {
            println!("setup {done}/{total}: {what}");
        }
    }
}

fn stopped() -> bool {
    STOP.load(Ordering::Relaxed)
}

fn read_status(c: &Cluster) -> serde_json::Value {
    std::fs::read(c.state_dir.join("lb0.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null)
}

fn server_states(s: &serde_json::Value) -> Vec<(String, String)> {
    s["vips"][0]["backends"]
        .as_array()
        .map(|bs| {
            bs.iter()
                .map(|b| {
                    (b["health"].as_str().unwrap_or("?").to_string(), b["state"].as_str().unwrap_or("?").to_string())
                })
                .collect()
        })
        .unwrap_or_default()
}

fn render(ui: &Ui, c: &Cluster, samples: &[Sample]) {
    let s = read_status(c);
    let now = Instant::now();
    let mut rate: BTreeMap<String, usize> = BTreeMap::new();
    let mut total: BTreeMap<String, usize> = BTreeMap::new();
    for x in samples {
        if let Ok(b) = &x.result {
            *total.entry(b.clone()).or_default() += 1;
            if now.duration_since(x.at) < Duration::from_secs(1) {
                *rate.entry(b.clone()).or_default() += 1;
            }
        }
    }
    let failed = samples.iter().filter(|x| x.result.is_err()).count();
    let states = server_states(&s);
    let t = ui.started.elapsed().as_secs_f32();
    let r = &s["reasons"];
    let n = |k: &str| r[k].as_u64().unwrap_or(0);
    let drops: u64 = ["drop_malformed_l4", "drop_fragment", "drop_no_backend", "drop_too_big", "drop_encap_failed"]
        .iter()
        .map(|k| n(k))
        .sum();
    if ui.live {
        let mut o = String::new();
        o += &format!("\x1b[H\x1b[Jxdplb demo, VIP {VIP4}:80 (dsr) on lb0, {t:.0}s\n\n  {}\n\n", ui.step);
        o += &format!("  {:<8} {:<7} {:<10} {:>7} {:>8}\n", "server", "health", "state", "req/s", "served");
        for i in 0..SERVERS {
            let name = format!("b{}", i + 1);
            let (h, st) = states.get(i).cloned().unwrap_or_default();
            o += &format!(
                "  {:<8} {:<7} {:<10} {:>7} {:>8}\n",
                name,
                h,
                st,
                rate.get(&name).copied().unwrap_or(0),
                total.get(&name).copied().unwrap_or(0)
            );
        }
        o += &format!(
            "\n  XDP: {} forwarded (conntrack {} hits, {} new), {} passed to the host, {} dropped ({} no backend)\n",
            n("tx"),
            n("conntrack_hit"),
            n("conntrack_miss"),
            n("pass_not_vip"),
            drops,
            n("drop_no_backend")
        );
        o += &format!("  client: {} requests, {} failed\n", samples.len(), failed);
        print!("{o}");
        let _ = std::io::stdout().flush();
    } else {
        let per: Vec<String> =
            (1..=SERVERS).map(|i| format!("b{i}={}", rate.get(&format!("b{i}")).copied().unwrap_or(0))).collect();
        let health: Vec<String> = states.iter().map(|(h, st)| format!("{h}/{st}")).collect();
        println!(
            "  [{t:5.1}s] req/s {} | health {} | xdp tx {} drops {} | {} requests, {} failed",
            per.join(" "),
            health.join(" "),
            n("tx"),
            drops,
            samples.len(),
            failed
        );
    }
}

/// Shows the live view for `d`, or until `until` holds (at most `d`).
fn watch(
    ui: &Ui,
    c: &Cluster,
    stream: &RequestStream,
    d: Duration,
    until: impl Fn(&serde_json::Value) -> bool,
) -> bool {
    let start = Instant::now();
    let period = if ui.live { Duration::from_millis(250) } else { Duration::from_secs(1) };
    let mut last = Instant::now() - period;
    while start.elapsed() < d && !stopped() {
        if last.elapsed() >= period {
            render(ui, c, &stream.samples());
            last = Instant::now();
        }
        if until(&read_status(c)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn config_with_weights(w: [u32; 3]) -> String {
    let mut y = EXAMPLE.to_string();
    for (i, weight) in w.iter().enumerate() {
        let from = format!("address: 198.18.0.{}\n        weight: 1", 11 + i);
        let to = format!("address: 198.18.0.{}\n        weight: {weight}", 11 + i);
        y = y.replace(&from, &to);
    }
    y
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let keep = args.iter().any(|a| a == "--keep");
    let live = !args.iter().any(|a| a == "--non-interactive") && std::io::stdout().is_terminal();
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    let mut ui = Ui { live, step: String::new(), started: Instant::now() };
    let outcome = run(&mut ui, keep);
    std::process::exit(match outcome {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("demo failed: {e}");
            1
        }
    });
}

fn run(ui: &mut Ui, keep: bool) -> Result<(), String> {
    let steps = 3 + SERVERS;
    ui.progress(0, steps, "creating namespaces, bridge and veths");
    let c = Cluster::new(ClusterSpec {
        backends: SERVERS,
        servers: Servers::Nginx,
        bin_dir: topology::bin_dir(),
        nat: None,
    });
    for i in 0..SERVERS {
        ui.progress(1 + i, steps, &format!("starting nginx on b{}", i + 1));
        c.start_server(i, 80);
    }
    ui.progress(1 + SERVERS, steps, "starting xdplb run with examples/cluster.yaml");
    let config = c.write_config("cluster.yaml", EXAMPLE);
    c.start_xdplb("xdplb", &config, &[]);
    ui.progress(2 + SERVERS, steps, "waiting for the health checks to pass");
    let healthy = |s: &serde_json::Value| server_states(s).iter().filter(|(_, st)| st == "active").count() == SERVERS;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !healthy(&read_status(&c)) {
        if Instant::now() > deadline || stopped() {
            return Err(format!("xdplb did not report all servers healthy; its log:\n{}", c.log("xdplb")));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    ui.progress(steps, steps, "ready");

    let vip: SocketAddr = SocketAddr::new(VIP4.parse().unwrap(), 80);
    let stream = RequestStream::start(&c.client, vip, Duration::from_millis(10), MAX_REQUESTS);
    let mut windows: Vec<(Instant, Instant)> = Vec::new();

    ui.say("All three nginx servers are healthy; xdplb spreads new connections over them.");
    watch(ui, &c, &stream, Duration::from_secs(4), |_| false);

    ui.say("Killing web server b2 (kill -9): its health check will fail.");
    let killed = Instant::now();
    c.kill_server(1);
    let b2_down = |s: &serde_json::Value| server_states(s).get(1).is_some_and(|(_, st)| st == "down");
    watch(ui, &c, &stream, Duration::from_secs(20), b2_down);
    // Requests hashed to b2 between the kill and its removal fail: the story causes those.
    windows.push((killed, Instant::now() + Duration::from_millis(100)));
    ui.say("The health check took b2 out of the table; traffic shifted to b1 and b3, no request fails now.");
    watch(ui, &c, &stream, Duration::from_secs(4), |_| false);

    ui.say("Starting b2 again: it rejoins after passing two checks.");
    c.start_server(1, 80);
    let b2_up = |s: &serde_json::Value| server_states(s).get(1).is_some_and(|(_, st)| st == "active");
    watch(ui, &c, &stream, Duration::from_secs(20), b2_up);
    ui.say("b2 passed its checks and serves new connections again.");
    watch(ui, &c, &stream, Duration::from_secs(4), |_| false);

    ui.say("Draining b3 (weight 0) while a long-lived keep-alive connection to it stays open.");
    let mut long = (0..200)
        .map(|_| KeepAlive::open(&c.client, vip))
        .find_map(|mut k| (k.get("/").ok()?.1 == "b3").then_some(k))
        .ok_or("no connection reached b3")?;
    c.write_config("cluster.yaml", &config_with_weights([1, 1, 0]));
    let b3_draining = |s: &serde_json::Value| server_states(s).get(2).is_some_and(|(_, st)| st == "draining");
    watch(ui, &c, &stream, Duration::from_secs(20), b3_draining);
    let drained_at = stream.samples().len();
    let mut long_ok = 0;
    for _ in 0..8 {
        if long.get("/").map(|r| r.1 == "b3").unwrap_or(false) {
            long_ok += 1;
        }
        watch(ui, &c, &stream, Duration::from_millis(500), |_| false);
    }
    let new_to_b3 = stream.samples()[drained_at..].iter().filter(|s| s.result.as_deref() == Ok("b3")).count();
    ui.say(&format!(
        "b3 took {new_to_b3} new connections while draining; its open connection answered {long_ok} of 8 requests."
    ));
    watch(ui, &c, &stream, Duration::from_secs(2), |_| false);

    ui.say("Reloading a changed configuration: b3 back at weight 1, b1 at weight 2.");
    let before_reload = stream.samples().len();
    c.write_config("cluster.yaml", &config_with_weights([2, 1, 1]));
    let gen2 = |s: &serde_json::Value| s["config_generation"].as_u64() >= Some(3);
    watch(ui, &c, &stream, Duration::from_secs(20), gen2);
    watch(ui, &c, &stream, Duration::from_secs(4), |_| false);
    let reload_failures = stream.samples()[before_reload..].iter().filter(|s| s.result.is_err()).count();
    ui.say(&format!("Reload applied (generation 3) with {reload_failures} failed requests."));

    let samples = stream.stop();
    if stopped() {
        println!("interrupted: cleaning up");
    }
    let mut per_server: BTreeMap<String, usize> = BTreeMap::new();
    for s in &samples {
        if let Ok(b) = &s.result {
            *per_server.entry(b.clone()).or_default() += 1;
        }
    }
    let failed = samples.iter().filter(|s| s.result.is_err()).count();
    let unexpected =
        samples.iter().filter(|s| s.result.is_err() && !windows.iter().any(|(a, b)| s.at >= *a && s.at <= *b)).count();
    println!("\nSummary: {} requests sent, {failed} failed", samples.len());
    println!("  {} failed while b2 was dead and not yet detected (caused by the story)", failed - unexpected);
    println!("  {unexpected} failed at any other time");
    for (server, n) in &per_server {
        println!("  {server}: {n} requests");
    }
    let summary = serde_json::json!({
        "requests": samples.len(),
        "failed": failed,
        "unexpected_failures": unexpected,
        "per_server": per_server,
        "drain_new_connections_to_b3": new_to_b3,
        "drain_long_connection_ok": long_ok,
        "reload_failures": reload_failures,
        "interrupted": stopped(),
    });
    if !ui.live {
        println!("SUMMARY {summary}");
    }

    if keep && !stopped() {
        print_keep_instructions(&c);
        std::mem::forget(c);
    }
    Ok(())
}

fn print_keep_instructions(c: &Cluster) {
    let env = format!("XDPLB_PIN_ROOT={} XDPLB_STATE_DIR={}", c.pin_root.display(), c.state_dir.display());
    let xdplb = c.bin_dir.join("xdplb");
    println!("\nThe cluster keeps running. Try:");
    println!("  ip netns exec {} curl -s http://{VIP4}/", c.client.name);
    println!("  {env} ip netns exec {} {} status", c.lb.name, xdplb.display());
    println!("  ip netns exec {} curl -s http://127.0.0.1:9464/metrics", c.lb.name);
    println!("  edit {} (xdplb reloads it on change)", c.dir.join("cluster.yaml").display());
    println!("To remove it: `cargo xtask demo --clean` (or any `cargo xtask test` run).");
}
