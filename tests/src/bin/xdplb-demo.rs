//! `cargo xtask demo`: a highly available web service on one machine.
//!
//! Two scenes, each built in network namespaces by the integration tests'
//! own topology code, each with a live view and a short story told one
//! sentence per step:
//! - the default, one load balancer (tests::topology): a client, xdplb with
//!   examples/cluster.yaml, three nginx servers. A server dies, comes back,
//!   is drained, and the configuration is reloaded.
//! - `--ha`, a group of nodes (tests::ha): three xdplb nodes behind a
//!   router's ECMP, each announcing the VIP over BGP through its own BIRD,
//!   with flow sync between them. The nodes share new connections; a reload
//!   adds a backend and flow sync copies the connections that now deviate
//!   from Maglev's choice; a node is drained and undrained; a node is killed
//!   and the router converges without breaking an established connection.
//!
//! Both drive a bounded stream of client requests, print a summary, and
//! remove everything (also on Ctrl-C or error), unless --keep.
//!
//! Flags: --ha (the group scene), --keep (leave the cluster running),
//! --non-interactive (no live table: one line per step and per second, and
//! a final `SUMMARY {json}` line).

use std::{
    cell::Cell,
    collections::{BTreeMap, VecDeque},
    io::{IsTerminal as _, Write as _},
    net::{Ipv4Addr, SocketAddr},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use tests::{
    ha::{
        self, HaCluster, HaSpec, HaVip, Held, KeepAliveFleet, MaglevChoice, VIP, backend_addr, backend_name, node_addr,
        route,
    },
    topology::{self, Cluster, ClusterSpec, KeepAlive, RequestStream, Sample, Servers, VIP4, backend_states},
};

const EXAMPLE: &str = include_str!("../../../examples/cluster.yaml");
const SERVERS: usize = 3;
/// Upper bound on requests the demo sends on new connections (100 per second at most).
const MAX_REQUESTS: usize = 20_000;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn stopped() -> bool {
    STOP.load(Ordering::Relaxed)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let keep = args.iter().any(|a| a == "--keep");
    let live = !args.iter().any(|a| a == "--non-interactive") && std::io::stdout().is_terminal();
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    let mut ui = Ui { live, story: Vec::new(), started: Instant::now(), shown: Cell::new(None) };
    let outcome = if args.iter().any(|a| a == "--ha") { run_ha(&mut ui, keep) } else { run(&mut ui, keep) };
    std::process::exit(match outcome {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("demo failed: {e}");
            1
        }
    });
}

// The live view, shared by both scenes: a scene looks at its sources every
// `Scene::POLL` and turns what it saw into a `Frame`; `watch` shows frames
// until a step's effect is visible.

struct Ui {
    live: bool,
    /// Every sentence said so far, with its time: the live view shows them all.
    story: Vec<String>,
    started: Instant,
    /// When the last frame was shown.
    shown: Cell<Option<Instant>>,
}

impl Ui {
    fn say(&mut self, sentence: &str) {
        let line = format!("[{:5.1}s] {sentence}", self.started.elapsed().as_secs_f32());
        println!("{line}");
        self.story.push(line);
    }

    fn progress(&self, done: usize, total: usize, what: &str) {
        let width = 30;
        let filled = width * done / total;
        if self.live {
            print!("\r[{}{}] {done}/{total} {what:<60}", "#".repeat(filled), " ".repeat(width - filled));
            let _ = std::io::stdout().flush();
            if done == total {
                println!();
            }
        } else {
            println!("setup {done}/{total}: {what}");
        }
    }

    /// A frame every 250 ms live, every second as plain lines.
    fn frame_due(&self) -> bool {
        let period = if self.live { Duration::from_millis(250) } else { Duration::from_secs(1) };
        self.shown.get().is_none_or(|at| at.elapsed() >= period)
    }

    fn show(&self, f: &Frame) {
        self.shown.set(Some(Instant::now()));
        let t = self.started.elapsed().as_secs_f32();
        if !self.live {
            println!("  [{t:5.1}s] {}", f.line);
            return;
        }
        let mut o = format!("\x1b[H\x1b[Jxdplb demo: {}, {t:.0}s\n\n", f.title);
        for line in &self.story {
            o += &format!("  {line}\n");
        }
        o += "\n";
        o += &table(&f.columns, &f.rows);
        o += "\n";
        for n in &f.notes {
            o += &format!("  {n}\n");
        }
        print!("{o}");
        let _ = std::io::stdout().flush();
    }
}

/// One picture of the live view.
struct Frame {
    /// What the scene is (after "xdplb demo: ").
    title: String,
    columns: Vec<Column>,
    rows: Vec<Vec<String>>,
    /// Lines under the table.
    notes: Vec<String>,
    /// The whole picture as one line, for --non-interactive.
    line: String,
}

struct Column {
    name: &'static str,
    right: bool,
}

fn columns(spec: &[(&'static str, bool)]) -> Vec<Column> {
    spec.iter().map(|&(name, right)| Column { name, right }).collect()
}

/// The rows under their header, each column as wide as its widest cell.
fn table(columns: &[Column], rows: &[Vec<String>]) -> String {
    let head: Vec<String> = columns.iter().map(|c| c.name.to_string()).collect();
    let width: Vec<usize> = (0..columns.len())
        .map(|k| rows.iter().chain([&head]).filter_map(|r| r.get(k)).map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    let mut o = String::new();
    for row in std::iter::once(&head).chain(rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(columns.iter().zip(&width))
            .map(|(s, (c, &w))| if c.right { format!("{s:>w$}") } else { format!("{s:<w$}") })
            .collect();
        o += &format!("  {}\n", cells.join("  ").trim_end());
    }
    o
}

/// What a scene watches and how it shows it.
trait Scene {
    /// What one look at the scene's sources saw.
    type Look;
    /// How often to look.
    const POLL: Duration;
    fn look(&mut self) -> Self::Look;
    fn frame(&self, look: &Self::Look) -> Frame;
}

/// Shows the live view for `d`, or until `until` holds (at most `d`, or
/// Ctrl-C); whether it held.
fn watch<S: Scene>(ui: &Ui, scene: &mut S, d: Duration, until: impl Fn(&S::Look) -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < d && !stopped() {
        let look = scene.look();
        if ui.frame_due() {
            ui.show(&scene.frame(&look));
        }
        if until(&look) {
            return true;
        }
        std::thread::sleep(S::POLL);
    }
    false
}

/// Polls `cond` every `every` until it holds (true), or `timeout` passes or
/// Ctrl-C comes (false).
fn wait(timeout: Duration, every: Duration, mut cond: impl FnMut() -> bool) -> bool {
    ha::wait_for(timeout, every, || if stopped() { Some(false) } else { cond().then_some(true) }).unwrap_or(false)
}

// The default scene: one load balancer, three nginx servers.

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

struct ClusterScene<'a> {
    c: &'a Cluster,
    stream: &'a RequestStream,
}

impl Scene for ClusterScene<'_> {
    /// The load balancer's status file.
    type Look = serde_json::Value;
    const POLL: Duration = Duration::from_millis(50);

    fn look(&mut self) -> serde_json::Value {
        read_status(self.c)
    }

    fn frame(&self, s: &serde_json::Value) -> Frame {
        let samples = self.stream.samples();
        let now = Instant::now();
        let mut rate: BTreeMap<String, usize> = BTreeMap::new();
        let mut total: BTreeMap<String, usize> = BTreeMap::new();
        for x in &samples {
            if let Ok(b) = &x.result {
                *total.entry(b.clone()).or_default() += 1;
                if now.duration_since(x.at) < Duration::from_secs(1) {
                    *rate.entry(b.clone()).or_default() += 1;
                }
            }
        }
        let failed = samples.iter().filter(|x| x.result.is_err()).count();
        let states = server_states(s);
        let r = &s["reasons"];
        let n = |k: &str| r[k].as_u64().unwrap_or(0);
        let drops: u64 = ["drop_malformed_l4", "drop_fragment", "drop_no_backend", "drop_too_big", "drop_encap_failed"]
            .iter()
            .map(|k| n(k))
            .sum();
        let names: Vec<String> = (1..=SERVERS).map(|i| format!("b{i}")).collect();
        let count = |m: &BTreeMap<String, usize>, name: &str| m.get(name).copied().unwrap_or(0);
        let rows = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let (h, st) = states.get(i).cloned().unwrap_or_default();
                vec![name.clone(), h, st, count(&rate, name).to_string(), count(&total, name).to_string()]
            })
            .collect();
        let per: Vec<String> = names.iter().map(|name| format!("{name}={}", count(&rate, name))).collect();
        let health: Vec<String> = states.iter().map(|(h, st)| format!("{h}/{st}")).collect();
        Frame {
            title: format!("VIP {VIP4}:80 (dsr) on lb0"),
            columns: columns(&[
                ("server", false),
                ("health", false),
                ("state", false),
                ("req/s", true),
                ("served", true),
            ]),
            rows,
            notes: vec![
                format!(
                    "XDP: {} forwarded (conntrack {} hits, {} new), {} passed to the host, {drops} dropped ({} no backend)",
                    n("tx"),
                    n("conntrack_hit"),
                    n("conntrack_miss"),
                    n("pass_not_vip"),
                    n("drop_no_backend")
                ),
                format!("client: {} requests, {failed} failed", samples.len()),
            ],
            line: format!(
                "req/s {} | health {} | xdp tx {} drops {drops} | {} requests, {failed} failed",
                per.join(" "),
                health.join(" "),
                n("tx"),
                samples.len()
            ),
        }
    }
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
    if !wait(Duration::from_secs(60), Duration::from_millis(100), || healthy(&read_status(&c))) {
        return Err(format!("xdplb did not report all servers healthy; its log:\n{}", c.log("xdplb")));
    }
    ui.progress(steps, steps, "ready");

    let vip: SocketAddr = SocketAddr::new(VIP4.parse().unwrap(), 80);
    let stream = RequestStream::start(&c.client, vip, Duration::from_millis(10), MAX_REQUESTS);
    let mut scene = ClusterScene { c: &c, stream: &stream };
    let mut windows: Vec<(Instant, Instant)> = Vec::new();

    ui.say("All three nginx servers are healthy; xdplb spreads new connections over them.");
    watch(ui, &mut scene, Duration::from_secs(4), |_| false);

    ui.say("Killing web server b2 (kill -9): its health check will fail.");
    let killed = Instant::now();
    c.kill_server(1);
    let b2_down = |s: &serde_json::Value| server_states(s).get(1).is_some_and(|(_, st)| st == "down");
    watch(ui, &mut scene, Duration::from_secs(20), b2_down);
    // Requests hashed to b2 between the kill and its removal fail: the story causes those.
    windows.push((killed, Instant::now() + Duration::from_millis(100)));
    ui.say("The health check took b2 out of the table; traffic shifted to b1 and b3, no request fails now.");
    watch(ui, &mut scene, Duration::from_secs(4), |_| false);

    ui.say("Starting b2 again: it rejoins after passing two checks.");
    c.start_server(1, 80);
    let b2_up = |s: &serde_json::Value| server_states(s).get(1).is_some_and(|(_, st)| st == "active");
    watch(ui, &mut scene, Duration::from_secs(20), b2_up);
    ui.say("b2 passed its checks and serves new connections again.");
    watch(ui, &mut scene, Duration::from_secs(4), |_| false);

    ui.say("Draining b3 (weight 0) while a long-lived keep-alive connection to it stays open.");
    let mut long = (0..200)
        .map(|_| KeepAlive::open(&c.client, vip))
        .find_map(|mut k| (k.get("/").ok()?.1 == "b3").then_some(k))
        .ok_or("no connection reached b3")?;
    c.write_config("cluster.yaml", &config_with_weights([1, 1, 0]));
    let b3_draining = |s: &serde_json::Value| server_states(s).get(2).is_some_and(|(_, st)| st == "draining");
    watch(ui, &mut scene, Duration::from_secs(20), b3_draining);
    let drained_at = stream.samples().len();
    let mut long_ok = 0;
    for _ in 0..8 {
        if long.get("/").map(|r| r.1 == "b3").unwrap_or(false) {
            long_ok += 1;
        }
        watch(ui, &mut scene, Duration::from_millis(500), |_| false);
    }
    let new_to_b3 = stream.samples()[drained_at..].iter().filter(|s| s.result.as_deref() == Ok("b3")).count();
    ui.say(&format!(
        "b3 took {new_to_b3} new connections while draining; its open connection answered {long_ok} of 8 requests."
    ));
    watch(ui, &mut scene, Duration::from_secs(2), |_| false);

    ui.say("Reloading a changed configuration: b3 back at weight 1, b1 at weight 2.");
    let before_reload = stream.samples().len();
    c.write_config("cluster.yaml", &config_with_weights([2, 1, 1]));
    let gen2 = |s: &serde_json::Value| s["config_generation"].as_u64() >= Some(3);
    watch(ui, &mut scene, Duration::from_secs(20), gen2);
    watch(ui, &mut scene, Duration::from_secs(4), |_| false);
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
    // A request in flight when b2 was killed (begun before, ended after) is the story's too.
    let in_window = |s: &Sample| windows.iter().any(|(a, b)| s.at + s.took >= *a && s.at <= *b);
    let unexpected = samples.iter().filter(|s| s.result.is_err() && !in_window(s)).count();
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

// The `--ha` scene: three nodes behind a router's ECMP (tests::ha).

const NODES: usize = 3;
/// HTTP backends: the VIP starts with three, the fourth joins in step 2.
const HA_BACKENDS: usize = 4;
/// Long-lived keep-alive connections, each asking every KEEPALIVE_EVERY.
const KEEPALIVES: usize = 30;
const KEEPALIVE_EVERY: Duration = Duration::from_millis(300);
/// New connections: one every 15 ms at most, about 60 per second.
const NEW_EVERY: Duration = Duration::from_millis(15);
/// How long a keep-alive request may wait for its answer before its connection counts as broken.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// The bound on every wait for an effect.
const WAIT: Duration = Duration::from_secs(30);
/// How long a step's effect stays on screen before the story goes on.
const HOLD: Duration = Duration::from_secs(4);

struct HaScene<'a> {
    c: &'a HaCluster,
    stream: &'a RequestStream,
    fleet: &'a KeepAliveFleet,
    /// The node killed in step 4: its status file, left behind, is not read.
    killed: Option<usize>,
    /// (when, requests answered so far) over the last second or so: the request rate.
    answered: VecDeque<(Instant, u64)>,
}

struct HaLook {
    /// Each node's `xdplb status --json`; None: killed, or none published.
    status: Vec<Option<serde_json::Value>>,
    /// The router's next hops for the VIP.
    hops: Vec<Ipv4Addr>,
    samples: Vec<Sample>,
    held: Vec<Held>,
    /// Requests the client had answered per second, new connections and keep-alive ones.
    rate: f64,
}

impl HaLook {
    /// The VIP packets node `i` forwarded per second (its last status second).
    fn pps(&self, i: usize) -> f64 {
        let vip = self.status[i].as_ref().and_then(|s| s["vips"].as_array()?.iter().find(|v| v["name"] == "web"));
        vip.and_then(|v| v["packets_per_second"].as_f64()).unwrap_or(0.0)
    }

    /// The requests per second node `i` carries: the client's rate, shared
    /// out in proportion to the VIP packets each node forwards (a node sees
    /// only the client's half of each connection: requests, not answers).
    fn requests_per_second(&self, i: usize) -> f64 {
        let all: f64 = (0..NODES).map(|j| self.pps(j)).sum();
        if all > 0.0 { self.rate * self.pps(i) / all } else { 0.0 }
    }

    fn drained(&self, i: usize) -> bool {
        self.status[i].as_ref().is_some_and(|s| s["node_drained"] == true)
    }

    fn sync(&self, i: usize, field: &str) -> u64 {
        self.status[i].as_ref().and_then(|s| s["flow_sync"][field].as_u64()).unwrap_or(0)
    }

    fn hop_names(&self) -> Vec<String> {
        self.hops.iter().map(|&a| node_name(a)).collect()
    }

    fn failed(&self) -> usize {
        self.samples.iter().filter(|s| s.result.is_err()).count() + self.broken()
    }

    /// Keep-alive connections that failed: closed, reset, timed out, or answered by another backend.
    fn broken(&self) -> usize {
        self.held.iter().filter(|h| h.failure.is_some()).count()
    }
}

/// "lb1 A, lb2 B, lb3 C".
fn by_node(value: impl Fn(usize) -> String) -> String {
    (0..NODES).map(|i| format!("lb{} {}", i + 1, value(i))).collect::<Vec<_>>().join(", ")
}

fn node_name(a: Ipv4Addr) -> String {
    (0..NODES).find(|&i| node_addr(i) == a).map(|i| format!("lb{}", i + 1)).unwrap_or_else(|| a.to_string())
}

/// Requests answered: on new connections, and on keep-alive ones (their first included).
fn answered(samples: &[Sample], held: &[Held]) -> u64 {
    samples.iter().filter(|s| s.result.is_ok()).count() as u64 + held.iter().map(|h| h.requests).sum::<u64>()
}

impl Scene for HaScene<'_> {
    type Look = HaLook;
    /// Each look runs `xdplb status` on every node and `ip route` on the router.
    const POLL: Duration = Duration::from_millis(250);

    fn look(&mut self) -> HaLook {
        let status = (0..NODES).map(|i| if self.killed == Some(i) { None } else { self.c.status(i) }).collect();
        let (samples, held) = (self.stream.samples(), self.fleet.snapshot());
        let now = Instant::now();
        let n = answered(&samples, &held);
        self.answered.push_back((now, n));
        while self.answered.len() > 1 && now.duration_since(self.answered[1].0) >= Duration::from_secs(1) {
            self.answered.pop_front();
        }
        let (t0, n0) = self.answered[0];
        let secs = now.duration_since(t0).as_secs_f64();
        let rate = if secs > 0.0 { (n - n0) as f64 / secs } else { 0.0 };
        HaLook { status, hops: self.c.nexthops(VIP), samples, held, rate }
    }

    fn frame(&self, l: &HaLook) -> Frame {
        let rows = (0..NODES)
            .map(|i| {
                let mut row = vec![format!("lb{}", i + 1), node_addr(i).to_string()];
                let Some(s) = &l.status[i] else {
                    let why = if self.killed == Some(i) { "killed" } else { "no status" };
                    row.push(why.to_string());
                    return row;
                };
                let routes = s["bgp"]["routes"].as_array().map_or(0, Vec::len);
                row.extend([
                    format!("{:.0}", l.requests_per_second(i)),
                    format!("{:.0}", l.pps(i)),
                    format!("{}/{routes}", route_count(s)),
                    if l.drained(i) { "drained" } else { "no" }.to_string(),
                    l.sync(i, "deviating_flows").to_string(),
                    l.sync(i, "records_sent").to_string(),
                    l.sync(i, "flows_installed").to_string(),
                ]);
                row
            })
            .collect();
        let state = |i: usize| match (&l.status[i], l.drained(i)) {
            (None, _) if self.killed == Some(i) => "killed".to_string(),
            (None, _) => "-".to_string(),
            (Some(_), true) => "drained".to_string(),
            (Some(_), false) => format!("{:.0}", l.requests_per_second(i)),
        };
        let keepalive: u64 = l.held.iter().map(|h| h.requests).sum();
        let (failed, broken) = (l.failed(), l.broken());
        let hops = l.hop_names();
        Frame {
            title: format!("{NODES} xdplb nodes behind a router's ECMP, VIP {VIP}:80 (dsr, BGP through BIRD)"),
            columns: columns(&[
                ("node", false),
                ("address", false),
                ("req/s", true),
                ("VIP pkt/s", true),
                ("routes", true),
                ("drained", true),
                ("deviating", true),
                ("sync sent", true),
                ("installed", true),
            ]),
            rows,
            notes: vec![
                format!("router: {VIP}/32 via {} ({} next hops)", hops.join(", "), hops.len()),
                format!(
                    "client: {:.0} req/s; {} requests on new connections, {keepalive} on {} keep-alive ones; {failed} \
                     failed; {broken} keep-alive connections broken",
                    l.rate,
                    l.samples.len(),
                    l.held.len()
                ),
            ],
            line: format!(
                "req/s {} | routes {} | sync sent/installed {} | next hops {} | {} requests, {failed} failed, \
                 {broken} keep-alive broken",
                (0..NODES).map(|i| format!("lb{}={}", i + 1, state(i))).collect::<Vec<_>>().join(" "),
                (0..NODES)
                    .map(|i| l.status[i].as_ref().map_or(0, route_count).to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
                (0..NODES)
                    .map(|i| format!("{}/{}", l.sync(i, "records_sent"), l.sync(i, "flows_installed")))
                    .collect::<Vec<_>>()
                    .join(" "),
                if hops.is_empty() { "none".to_string() } else { hops.join(",") },
                l.samples.len() as u64 + keepalive,
            ),
        }
    }
}

/// The routes a node's status says it announces.
fn route_count(s: &serde_json::Value) -> usize {
    s["bgp"]["routes"].as_array().map_or(0, |rs| rs.iter().filter(|r| r["announced"] == true).count())
}

/// What the story measured, for the summary.
#[derive(Default)]
struct HaOutcome {
    /// Steps told, of five.
    told: u32,
    /// Effects not seen within their bound, in words.
    unseen: Vec<String>,
    /// Keep-alive connections that deviate from Maglev's choice after the reload, by node.
    deviating_by_node: [usize; NODES],
    /// How long the router took to drop the drained node, to take it back, to drop the killed one.
    drain: Option<Duration>,
    undrain: Option<Duration>,
    kill: Option<Duration>,
    drain_failures: usize,
    kill_failures: usize,
    /// After the kill: keep-alive connections the router moved to another node, and the deviating ones among them.
    moved: usize,
    moved_deviating: usize,
}

impl HaOutcome {
    fn step(&mut self, ui: &mut Ui, sentence: &str) {
        self.told += 1;
        ui.say(&format!("Step {} of 5: {sentence}", self.told));
    }

    /// Notes an effect that did not show within its bound (Ctrl-C aside).
    fn expect(&mut self, seen: bool, what: &str) -> bool {
        if !seen && !stopped() {
            println!("  (not seen within {WAIT:?}: {what})");
            self.unseen.push(what.to_string());
        }
        seen
    }
}

/// The story's cast: the group, the client's traffic, the live view.
struct Ha<'a> {
    c: &'a HaCluster,
    view: HaScene<'a>,
    target: SocketAddr,
    /// Each keep-alive connection deviates from Maglev's choice (from step 2 on).
    deviating: Vec<bool>,
    /// The node drained in step 3.
    drained: Option<usize>,
}

impl Ha<'_> {
    /// The node the router sends each keep-alive connection to now.
    fn nodes_of(&self, held: &[Held]) -> Vec<Option<usize>> {
        held.iter().map(|h| self.c.node_for(h.local, self.target)).collect()
    }

    /// Requests failed since `t`: on new connections, and the last of each broken keep-alive connection.
    fn failures_since(&self, t: Instant) -> usize {
        let new = self.view.stream.samples().iter().filter(|s| s.at >= t && s.result.is_err()).count();
        let held = self.view.fleet.snapshot();
        new + held.iter().filter(|h| h.failure.as_ref().is_some_and(|(at, _)| *at >= t)).count()
    }

    /// Waits until the router's next hops for the VIP satisfy `want`; how long that took.
    fn converge(&self, since: Instant, want: impl Fn(&[Ipv4Addr]) -> bool) -> Option<Duration> {
        wait(WAIT, Duration::from_millis(20), || want(&self.c.nexthops(VIP))).then(|| since.elapsed())
    }

    fn share(&mut self, ui: &mut Ui, o: &mut HaOutcome) {
        o.step(
            ui,
            "three nodes share the new connections: each announces the VIP, the router's route has 3 next hops and \
             hashes each connection to one of them.",
        );
        let all_carry = |l: &HaLook| l.hops.len() == NODES && (0..NODES).all(|i| l.pps(i) > 0.0);
        let seen = watch(ui, &mut self.view, WAIT, all_carry);
        if o.expect(seen, "every node carrying traffic") {
            watch(ui, &mut self.view, HOLD, |_| false);
            let l = self.view.look();
            let per = by_node(|i| format!("{:.0}", l.requests_per_second(i)));
            ui.say(&format!("The three nodes share the {:.0} requests per second: {per}.", l.rate));
        }
    }

    fn reload(&mut self, ui: &mut Ui, o: &mut HaOutcome) -> Result<(), String> {
        o.step(
            ui,
            "a reload adds a fourth backend, b4, on every node: open connections stay on their backend, so some now \
             deviate from Maglev's new choice, and flow sync copies those to the peers.",
        );
        let held = self.view.fleet.snapshot();
        let node_of = self.nodes_of(&held);
        let web4 = HaVip::new("web", VIP, 80, 0..HA_BACKENDS);
        for i in 0..NODES {
            self.c.write_config(i, &self.c.node_yaml(i, std::slice::from_ref(&web4)))?;
            self.c.reload(i).map_err(|e| format!("lb{}: xdplb reload: {e}", i + 1))?;
        }
        let four_active = |l: &HaLook| {
            l.status.iter().all(|s| s.as_ref().is_some_and(|s| backend_states(s, "web") == ["active"; HA_BACKENDS]))
        };
        let seen = watch(ui, &mut self.view, WAIT, four_active);
        if !o.expect(seen, "4 active backends on every node") {
            return Ok(());
        }
        let maglev = MaglevChoice::new(&(0..HA_BACKENDS).map(backend_addr).collect::<Vec<_>>(), self.c.hash_seed());
        self.deviating = held.iter().map(|h| h.backend != backend_name(maglev.backend(h.local, self.target))).collect();
        for (k, n) in node_of.iter().enumerate() {
            if let Some(n) = n {
                o.deviating_by_node[*n] += self.deviating[k] as usize;
            }
        }
        // Synced: every node has installed at least the deviating connections
        // its peers carry, and the tables agree (no flow is removed, and a
        // flow begun since the reload follows Maglev: once each node holds
        // every deviating flow, their counts stay equal).
        let d = o.deviating_by_node;
        let total = d.iter().sum::<usize>() as u64;
        let synced = |l: &HaLook| {
            let from_peers = |i: usize| (0..NODES).filter(|&j| j != i).map(|j| d[j] as u64).sum::<u64>();
            let held = l.sync(0, "deviating_flows");
            (0..NODES).all(|i| {
                l.sync(i, "flows_installed") >= from_peers(i) && l.sync(i, "deviating_flows") == held && held >= total
            })
        };
        let seen = watch(ui, &mut self.view, WAIT, synced);
        if o.expect(seen, "every node's table holding every deviating flow") {
            let l = self.view.look();
            ui.say(&format!(
                "{total} of the {} keep-alive connections now deviate from Maglev's choice ({}); flow sync copied \
                 every deviating flow (closed short connections' too) to the peers, so each node's table holds all \
                 {} of them (flows installed from peers: {}).",
                held.len(),
                by_node(|i| d[i].to_string()),
                l.sync(0, "deviating_flows"),
                by_node(|i| l.sync(i, "flows_installed").to_string())
            ));
            watch(ui, &mut self.view, HOLD, |_| false);
        }
        Ok(())
    }

    fn drain(&mut self, ui: &mut Ui, o: &mut HaOutcome) -> Result<(), String> {
        let v = (0..NODES).max_by_key(|&i| (o.deviating_by_node[i], NODES - i)).unwrap_or(0);
        let (name, addr) = (format!("lb{}", v + 1), node_addr(v));
        o.step(
            ui,
            &format!(
                "`xdplb drain` on {name}: it withdraws its route, the router drops it, its share moves to the other \
                 two, and no request fails."
            ),
        );
        self.drained = Some(v);
        let start = Instant::now();
        self.c.drain(v).map_err(|e| format!("{name}: xdplb drain: {e}"))?;
        o.drain = self.converge(start, |h| h.len() == NODES - 1 && !h.contains(&addr));
        let quiet =
            |l: &HaLook| l.drained(v) && l.pps(v) == 0.0 && (0..NODES).filter(|&i| i != v).all(|i| l.pps(i) > 0.0);
        let seen = watch(ui, &mut self.view, WAIT, quiet);
        if o.expect(o.drain.is_some() && seen, "the drained node without traffic") {
            watch(ui, &mut self.view, HOLD, |_| false);
            ui.say(&format!(
                "The router dropped {name} {:.2} s after the drain; {name} carries nothing now, and {} requests \
                 failed.",
                o.drain.unwrap_or_default().as_secs_f64(),
                self.failures_since(start)
            ));
        }

        ui.say(&format!("`xdplb undrain` on {name}: it announces the VIP again and the router takes it back."));
        let back = Instant::now();
        self.c.undrain(v).map_err(|e| format!("{name}: xdplb undrain: {e}"))?;
        o.undrain = self.converge(back, |h| h.len() == NODES);
        let carries = |l: &HaLook| !l.drained(v) && l.pps(v) > 0.0;
        let seen = watch(ui, &mut self.view, WAIT, carries);
        o.drain_failures = self.failures_since(start);
        if o.expect(o.undrain.is_some() && seen, "the undrained node carrying traffic") {
            ui.say(&format!(
                "The router took {name} back {:.2} s after the undrain and it carries its share again; {} requests \
                 failed during the drain and the undrain.",
                o.undrain.unwrap_or_default().as_secs_f64(),
                o.drain_failures
            ));
            watch(ui, &mut self.view, HOLD, |_| false);
        }
        Ok(())
    }

    fn kill(&mut self, ui: &mut Ui, o: &mut HaOutcome) {
        // The victim: the node (other than the drained one) carrying the most
        // deviating connections, which only flow sync keeps on their backend
        // once the router moves them elsewhere.
        let held = self.view.fleet.snapshot();
        let before = self.nodes_of(&held);
        let carried = |i: usize| (0..held.len()).filter(|&k| before[k] == Some(i) && self.deviating[k]).count();
        let v = (0..NODES).filter(|&i| Some(i) != self.drained).max_by_key(|&i| (carried(i), NODES - i)).unwrap_or(0);
        let (name, addr) = (format!("lb{}", v + 1), node_addr(v));
        o.step(
            ui,
            &format!(
                "{name} crashes (kill -9 of its xdplb and its BIRD, carrying {} deviating connections): its BGP \
                 session drops, the router converges, and no established connection breaks.",
                carried(v)
            ),
        );
        let start = Instant::now();
        self.c.kill_node(v);
        self.view.killed = Some(v);
        o.kill = self.converge(start, |h| h.len() == NODES - 1 && !h.contains(&addr));
        let Some(converged) = o.kill.map(|d| start + d) else {
            o.expect(false, "the router dropping the killed node");
            return;
        };
        // Every keep-alive connection answers again after the convergence (or has broken).
        let answering = |l: &HaLook| {
            l.held.iter().all(|h| h.failure.is_some() || h.last_ok > converged + Duration::from_millis(500))
        };
        let seen = watch(ui, &mut self.view, WAIT, answering);
        watch(ui, &mut self.view, HOLD, |_| false);
        let after = self.nodes_of(&held);
        let moved: Vec<usize> = (0..held.len()).filter(|&k| after[k] != before[k]).collect();
        o.moved = moved.len();
        o.moved_deviating = moved.iter().filter(|&&k| self.deviating[k]).count();
        o.kill_failures = self.failures_since(start);
        let broken = self.view.fleet.snapshot().iter().filter(|h| h.failure.is_some()).count();
        if o.expect(seen, "every keep-alive connection answering after the convergence") {
            ui.say(&format!(
                "The router dropped {name} {:.3} s after the kill; {} keep-alive connections changed node ({} of \
                 them deviating, kept on their backend by flow sync); {} broke, and {} requests failed.",
                o.kill.unwrap_or_default().as_secs_f64(),
                o.moved,
                o.moved_deviating,
                broken,
                o.kill_failures
            ));
        }
    }
}

fn run_ha(ui: &mut Ui, keep: bool) -> Result<(), String> {
    let steps = 4;
    ui.progress(0, steps, "namespaces, the router's and three nodes' BIRD, four HTTP backends");
    let c = HaCluster::new(HaSpec { nodes: NODES, backends: HA_BACKENDS, bin_dir: topology::bin_dir() })?;
    let web = HaVip::new("web", VIP, 80, 0..3);
    ui.progress(1, steps, "starting xdplb on lb1, lb2 and lb3");
    for i in 0..NODES {
        c.write_config(i, &c.node_yaml(i, std::slice::from_ref(&web)))?;
        c.start_xdplb(i)?;
    }
    ui.progress(2, steps, "waiting for the health checks and the BGP announcements");
    let prefix = format!("{VIP}/32");
    for i in 0..NODES {
        let ready = || {
            c.status(i).is_some_and(|s| {
                backend_states(&s, "web") == ["active"; 3] && route(&s, &prefix).is_some_and(|(announced, _)| announced)
            })
        };
        if !wait(WAIT, Duration::from_millis(100), ready) && !stopped() {
            return Err(format!(
                "lb{} did not announce {VIP} with 3 active backends; its log:\n{}",
                i + 1,
                c.xdplb_log(i)
            ));
        }
    }
    ui.progress(3, steps, "waiting for the router's route with 3 next hops");
    if !wait(WAIT, Duration::from_millis(50), || c.nexthops(VIP).len() == NODES) && !stopped() {
        return Err(format!(
            "the router has next hops {:?} for {VIP}; its BIRD log:\n{}",
            c.nexthops(VIP),
            c.router_log()
        ));
    }
    ui.progress(steps, steps, "ready");
    if stopped() {
        println!("interrupted: cleaning up");
        return Ok(());
    }

    let target = web.target();
    let fleet = KeepAliveFleet::start(&c.client, target, KEEPALIVES, KEEPALIVE_EVERY, KEEPALIVE_TIMEOUT)?;
    let stream = RequestStream::start(&c.client, target, NEW_EVERY, MAX_REQUESTS);
    let view = HaScene { c: &c, stream: &stream, fleet: &fleet, killed: None, answered: VecDeque::new() };
    let mut ha = Ha { c: &c, view, target, deviating: vec![false; KEEPALIVES], drained: None };
    let mut o = HaOutcome::default();

    ha.share(ui, &mut o);
    if !stopped() {
        ha.reload(ui, &mut o)?;
    }
    if !stopped() {
        ha.drain(ui, &mut o)?;
    }
    if !stopped() {
        ha.kill(ui, &mut o);
    }
    let killed = ha.view.killed;
    if !stopped() {
        o.step(ui, "summary.");
    }

    let samples = stream.stop();
    let held = fleet.stop();
    if stopped() {
        println!("interrupted: cleaning up");
    }
    let new_failed = samples.iter().filter(|s| s.result.is_err()).count();
    let broken: Vec<&Held> = held.iter().filter(|h| h.failure.is_some()).collect();
    let keepalive_requests: u64 = held.iter().map(|h| h.requests).sum();
    let requests = samples.len() as u64 + keepalive_requests + broken.len() as u64;
    let failed = new_failed + broken.len();
    let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
    let secs = |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.3} s", d.as_secs_f64()));
    println!(
        "\nSummary: {requests} requests ({} on new connections, {} on {} keep-alive connections), {} ok, {failed} failed",
        samples.len(),
        keepalive_requests + broken.len() as u64,
        held.len(),
        requests - failed as u64
    );
    println!("  keep-alive connections broken: {} of {}", broken.len(), held.len());
    for h in &broken {
        println!("    {} (on {}): {}", h.local, h.backend, h.failure.as_ref().map_or("", |f| &f.1));
    }
    println!(
        "  keep-alive connections deviating from Maglev's choice after the reload: {} (kept on their backend by flow \
         sync); after the kill {} changed node, {} of them deviating",
        o.deviating_by_node.iter().sum::<usize>(),
        o.moved,
        o.moved_deviating
    );
    println!("  router convergence: drain {}, undrain {}, kill -9 {}", secs(o.drain), secs(o.undrain), secs(o.kill));
    println!(
        "  requests failed during the drain and undrain: {}, after the kill: {}",
        o.drain_failures, o.kill_failures
    );
    for u in &o.unseen {
        println!("  not seen: {u}");
    }
    let summary = serde_json::json!({
        "scene": "ha",
        "steps": o.told,
        "unseen": o.unseen,
        "requests": requests,
        "new_connection_requests": samples.len(),
        "keepalive_requests": keepalive_requests,
        "failed": failed,
        "keepalive_connections": held.len(),
        "keepalive_broken": broken.len(),
        "deviating": o.deviating_by_node.iter().sum::<usize>(),
        "moved_deviating": o.moved_deviating,
        "convergence_ms": { "drain": ms(o.drain), "undrain": ms(o.undrain), "kill": ms(o.kill) },
        "interrupted": stopped(),
    });
    if !ui.live {
        println!("SUMMARY {summary}");
    }

    if keep && !stopped() {
        print_ha_keep_instructions(&c, killed);
        std::mem::forget(c);
    }
    Ok(())
}

fn print_ha_keep_instructions(c: &HaCluster, killed: Option<usize>) {
    println!(
        "\nThe group keeps running{}. Try:",
        killed.map_or(String::new(), |k| format!(" (lb{} was killed)", k + 1))
    );
    println!("  ip netns exec {} curl -s http://{VIP}/", c.client.name);
    println!("  ip netns exec {} ip route show {VIP}", c.router.name);
    println!("  birdc -s {} show protocols", c.router_socket().display());
    for i in (0..NODES).filter(|&i| Some(i) != killed) {
        let cmd = c.xdplb_cmd(i);
        let words: Vec<String> = std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        println!("  {} status   (or drain, undrain)", words.join(" "));
    }
    println!("To remove it: `cargo xtask demo --clean` (or any `cargo xtask test` run).");
}
