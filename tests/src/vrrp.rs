//! An active/standby pair of xdplb nodes sharing a VIP through keepalived
//! (VRRP), on the clients' segment of a `Cluster`:
//!
//! ```text
//!   client ns   cl0  198.18.0.1  ──┐
//!   lb1 ns      eth0 198.18.0.21 ──┤ br0 ──── b1..bN 198.18.0.11.. (DSR: VIP on lo)
//!   lb2 ns      eth0 198.18.0.22 ──┘
//! ```
//! keepalived puts the VIP (198.18.100.1/32) on the master's eth0 and
//! announces it with gratuitous ARPs; the client reaches it on the segment.
//! Both nodes run `xdplb run` all the time (a hot standby) with `flow_sync`
//! between them. Their configurations are the files of examples/keepalived/
//! with this topology's addresses and paths put in, so the example an
//! operator copies is the one tested. Each node has its own pin root and
//! state dir: both interfaces are named eth0. (The cluster's own `lb`
//! namespace stays idle.)

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use crate::topology::{self, Cluster, ClusterSpec, Netns, Servers, VIP4, http_get, wait_until};

pub const EXAMPLE_KEEPALIVED: &str = include_str!("../../examples/keepalived/keepalived.conf");
pub const EXAMPLE_XDPLB: &str = include_str!("../../examples/keepalived/xdplb.yaml");

/// The examples' addresses and paths, replaced by this topology's.
const EX_NODES: [&str; 2] = ["198.18.40.11", "198.18.40.12"];
const EX_VIP: &str = "198.18.40.10";
const EX_BACKENDS: [&str; 3] = ["198.18.40.21", "198.18.40.22", "198.18.40.23"];
const EX_TRACK_FILE: &str = "/run/xdplb/eth0.track";
const EX_KEY_FILE: &str = "/etc/xdplb/sync.key";
/// What the test writes to the flow sync key file.
const SYNC_KEY: &str = "a flow sync key of 32 characters";

/// The nodes' addresses on the clients' segment.
pub const NODES4: [&str; 2] = ["198.18.0.21", "198.18.0.22"];
pub const NODES6: [&str; 2] = ["2001:db8::21", "2001:db8::22"];
/// The VIP keepalived moves, and its HTTP port.
pub const VIP: &str = VIP4;
pub const PORT: u16 = 80;
/// The keepalived binary (Debian's package).
pub const KEEPALIVED: &str = "/usr/sbin/keepalived";

/// `text` with every `from` replaced by its `to`, all at once (so two
/// addresses can swap); panics if a `from` does not occur, so an example
/// that changed shape fails here instead of testing something else.
fn fill(text: &str, pairs: &[(&str, String)]) -> String {
    let mut out = text.to_string();
    for (i, (from, _)) in pairs.iter().enumerate() {
        assert!(out.contains(from), "the example no longer contains `{from}`:\n{text}");
        out = out.replace(from, &format!("\u{0}{i}\u{0}"));
    }
    for (i, (_, to)) in pairs.iter().enumerate() {
        out = out.replace(&format!("\u{0}{i}\u{0}"), to);
    }
    out
}

/// One xdplb node with its keepalived.
pub struct Node {
    /// `lb1` (the active node of the example) or `lb2`.
    pub name: String,
    pub ns: Netns,
    pub state_dir: PathBuf,
    pub pin_root: PathBuf,
}

pub struct Pair {
    /// Dropped first: its processes (the nodes' too) are killed before the
    /// nodes' namespaces go.
    pub cluster: Cluster,
    pub nodes: [Node; 2],
    key_file: PathBuf,
}

impl Pair {
    /// A cluster of `backends` DSR backends serving HTTP on `PORT`, and two
    /// nodes on its segment, nothing running on them yet.
    pub fn new(backends: usize) -> Self {
        assert!(Path::new(KEEPALIVED).exists(), "{KEEPALIVED} is missing: `cargo xtask setup` installs keepalived");
        let cluster =
            Cluster::new(ClusterSpec { backends, servers: Servers::Builtin, nat: None, bin_dir: topology::bin_dir() });
        for i in 0..backends {
            cluster.start_server(i, PORT);
        }
        // The VIP lives on this segment (on whichever node is master), not behind a router.
        cluster.client.ip(&format!("route replace {VIP}/32 dev cl0"));
        let node = |i: usize| {
            let name = format!("lb{}", i + 1);
            let ns = cluster.add_host_with_iface(&name, "eth0", NODES4[i], NODES6[i]);
            // veth drops frames sent with XDP_TX unless the peer runs an XDP program.
            let out = cluster.xdplb_in(&cluster.switch, &["pass", "--iface", &name]).output().unwrap();
            assert!(out.status.success(), "xdplb pass on {name}: {}", String::from_utf8_lossy(&out.stderr));
            // A NIC takes only frames for its own MAC; a veth takes whatever the
            // bridge floods, and XDP would serve frames meant for the other node
            // (once a dead node's port is down and forgotten, say). No flooding of
            // unknown unicast to the nodes stands in for the NIC's filter.
            cluster.switch.ip(&format!("link set dev {name} type bridge_slave flood off"));
            let state_dir = cluster.dir.join(format!("{name}-run"));
            // keepalived drops a track file whose directory is missing when it starts.
            std::fs::create_dir_all(&state_dir).unwrap();
            Node { pin_root: cluster.dir.join(format!("bpffs/{name}")), name, ns, state_dir }
        };
        let nodes = [node(0), node(1)];
        let key_file = cluster.dir.join("sync.key");
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::write(&key_file, format!("{SYNC_KEY}\n")).unwrap();
            std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        Self { cluster, nodes, key_file }
    }

    /// examples/keepalived/xdplb.yaml for node `i`, with the first `backends` backends.
    /// The flow hash seed both nodes derive from the flow sync key.
    pub fn hash_seed(&self) -> [u32; 2] {
        lb_userspace::hash_seed::derive(SYNC_KEY.as_bytes())
    }

    pub fn xdplb_config(&self, i: usize, backends: usize) -> String {
        let mut text = EXAMPLE_XDPLB.to_string();
        for b in &EX_BACKENDS[backends..] {
            let line = format!("      - address: {b}\n");
            assert!(text.contains(&line), "the example's backend {b} is not listed as `{line}`");
            text = text.replace(&line, "");
        }
        let mut pairs = vec![
            (EX_NODES[0], NODES4[i].to_string()),
            (EX_NODES[1], NODES4[1 - i].to_string()),
            (EX_VIP, VIP.to_string()),
            (EX_KEY_FILE, self.key_file.display().to_string()),
        ];
        for (b, ex) in EX_BACKENDS.iter().enumerate().take(backends) {
            pairs.push((ex, self.cluster.backend4(b).to_string()));
        }
        fill(&text, &pairs)
    }

    /// examples/keepalived/keepalived.conf for node `i`: as is for lb1, with
    /// the lines marked `lb2:` changed for lb2.
    pub fn keepalived_config(&self, i: usize) -> String {
        let node = &self.nodes[i];
        let mut pairs = vec![
            (EX_NODES[0], NODES4[i].to_string()),
            (EX_NODES[1], NODES4[1 - i].to_string()),
            (EX_VIP, VIP.to_string()),
            (EX_TRACK_FILE, node.state_dir.join("eth0.track").display().to_string()),
        ];
        if i == 1 {
            pairs.push(("router_id xdplb-lb1", "router_id xdplb-lb2".into()));
            pairs.push(("priority 150", "priority 100".into()));
        }
        fill(EXAMPLE_KEEPALIVED, &pairs)
    }

    /// The xdplb binary for node `i`, with its pin root and state dir.
    pub fn xdplb(&self, i: usize, args: &[&str]) -> Command {
        let node = &self.nodes[i];
        let mut c = node.ns.command(self.cluster.bin_dir.join("xdplb"));
        c.arg("--pin-root").arg(&node.pin_root).arg("--state-dir").arg(&node.state_dir).args(args);
        c
    }

    /// Runs `xdplb ARGS` on node `i`; panics unless it succeeds. Its stdout.
    pub fn xdplb_ok(&self, i: usize, args: &[&str]) -> String {
        let out = self.xdplb(i, args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let name = &self.nodes[i].name;
        assert!(
            out.status.success(),
            "xdplb {args:?} on {name}: {stdout}{}\n--- xdplb-{name}.log\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.cluster.log(&format!("xdplb-{name}"))
        );
        stdout
    }

    fn write_xdplb_config(&self, i: usize, backends: usize) -> PathBuf {
        self.cluster.write_config(&format!("{}.yaml", self.nodes[i].name), &self.xdplb_config(i, backends))
    }

    /// Starts `xdplb run` on node `i` with the first `backends` backends;
    /// returns once they are all active and the track file says 0.
    pub fn start_xdplb(&self, i: usize, backends: usize) {
        let path = self.write_xdplb_config(i, backends);
        let mut cmd = self.xdplb(i, &["run", "--config", path.to_str().unwrap()]);
        cmd.env("RUST_LOG", "info").env("NO_COLOR", "1");
        self.cluster.spawn_logged(&format!("xdplb-{}", self.nodes[i].name), &mut cmd);
        self.wait_ready(i, backends);
    }

    /// Waits until node `i` has `backends` active backends and says it can serve.
    pub fn wait_ready(&self, i: usize, backends: usize) {
        let active = vec!["active".to_string(); backends];
        self.wait_status(i, "every backend active", |s| topology::backend_states(s, "web") == active);
        let ok = wait_until(Duration::from_secs(30), || self.track_file(i).as_deref() == Some("0\n"));
        assert!(ok, "{}'s track file says {:?}, not 0\n{}", self.nodes[i].name, self.track_file(i), self.logs());
    }

    /// Writes node `i`'s configuration with the first `backends` backends and
    /// has it reloaded; waits for them all to be active.
    pub fn reload(&self, i: usize, backends: usize) -> String {
        self.write_xdplb_config(i, backends);
        let out = self.xdplb_ok(i, &["reload", "--timeout", "30"]);
        self.wait_ready(i, backends);
        out
    }

    /// Starts keepalived on node `i` (the configuration checked with
    /// `keepalived -t` first), in the foreground, logging to DIR/keepalived-NODE.log.
    pub fn start_keepalived(&self, i: usize) {
        let name = &self.nodes[i].name;
        let conf = self.cluster.write_config(&format!("keepalived-{name}.conf"), &self.keepalived_config(i));
        let pid = |what: &str| self.cluster.dir.join(format!("keepalived-{name}{what}.pid"));
        let args = |c: &mut Command| {
            c.arg("-f").arg(&conf).arg("-p").arg(pid("")).arg("-r").arg(pid("-vrrp")).arg("-c").arg(pid("-checkers"));
        };
        let mut check = self.nodes[i].ns.command(KEEPALIVED);
        check.args(["--config-test", "--log-console"]);
        args(&mut check);
        let out = check.output().unwrap();
        assert!(
            out.status.success(),
            "keepalived -t rejects {}:\n{}{}",
            conf.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // -P: VRRP only; -n -l -D: foreground, log to the console, in detail.
        let mut run = self.nodes[i].ns.command(KEEPALIVED);
        run.args(["-P", "-n", "-l", "-D"]);
        args(&mut run);
        self.cluster.spawn_logged(&format!("keepalived-{name}"), &mut run);
    }

    /// `xdplb status --json` of node `i`; None while it publishes none.
    pub fn status(&self, i: usize) -> Option<serde_json::Value> {
        let out = self.xdplb(i, &["status", "--iface", "eth0", "--json"]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Waits (30 s at most) until `pred` holds for node `i`'s status.
    pub fn wait_status(&self, i: usize, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let start = Instant::now();
        loop {
            if let Some(s) = self.status(i)
                && pred(&s)
            {
                return s;
            }
            if start.elapsed() > Duration::from_secs(30) {
                panic!(
                    "timed out waiting for {what} on {}; status: {:#?}\n{}",
                    self.nodes[i].name,
                    self.status(i),
                    self.logs()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The content of node `i`'s track file.
    pub fn track_file(&self, i: usize) -> Option<String> {
        std::fs::read_to_string(self.nodes[i].state_dir.join("eth0.track")).ok()
    }

    /// Whether node `i`'s eth0 holds the VIP.
    pub fn has_vip(&self, i: usize) -> bool {
        has_vip(&self.nodes[i].ns.name)
    }

    /// Waits (30 s at most) until node `i` holds the VIP or, with `held`
    /// false, does not; panics with the logs if not.
    pub fn wait_vip(&self, i: usize, held: bool) {
        if !wait_until(Duration::from_secs(30), || self.has_vip(i) == held) {
            panic!("{} {} the VIP\n{}", self.nodes[i].name, if held { "never took" } else { "kept" }, self.logs());
        }
    }

    /// The VRRP state keepalived on node `i` last entered (MASTER, BACKUP,
    /// FAULT), from its log.
    pub fn vrrp_state(&self, i: usize) -> Option<String> {
        vrrp_state(&self.cluster.log(&format!("keepalived-{}", self.nodes[i].name)))
    }

    /// Waits (30 s at most) until keepalived on node `i` is in `state`.
    pub fn wait_vrrp_state(&self, i: usize, state: &str) {
        if !wait_until(Duration::from_secs(30), || self.vrrp_state(i).as_deref() == Some(state)) {
            panic!("keepalived on {} is {:?}, not {state}\n{}", self.nodes[i].name, self.vrrp_state(i), self.logs());
        }
    }

    /// The node dies as a machine does: keepalived and xdplb are killed
    /// (SIGKILL, nothing said to anyone) and its link goes down.
    pub fn kill(&self, i: usize) {
        let name = &self.nodes[i].name;
        self.cluster.kill(&format!("keepalived-{name}"));
        self.cluster.kill(&format!("xdplb-{name}"));
        self.nodes[i].ns.ip("link set eth0 down");
    }

    /// Every log of the pair, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            for what in ["xdplb", "keepalived"] {
                let name = format!("{what}-{}", n.name);
                out += &format!("--- {name}.log\n{}", self.cluster.log(&name));
            }
        }
        out
    }
}

/// Whether the eth0 of namespace `ns` holds the VIP.
pub fn has_vip(ns: &str) -> bool {
    let out = Command::new("ip").args(["-n", ns, "-br", "-4", "addr", "show", "dev", "eth0"]).output();
    out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!(" {VIP}/32")))
}

/// The state keepalived's log says it entered last: "(I) Entering MASTER
/// STATE", "(I): entering FAULT state (tracked file ...)".
pub fn vrrp_state(log: &str) -> Option<String> {
    log.lines().rev().find_map(|l| {
        let l = l.to_ascii_uppercase();
        let rest = &l[l.find("ENTERING ")? + "ENTERING ".len()..];
        let (state, after) = rest.split_once(' ')?;
        after.starts_with("STATE").then(|| state.to_string())
    })
}

/// From `ns`, new connections to `target` (each given `timeout`) every
/// `every` until one is answered, for at most `limit`: when that answer
/// came and how many attempts failed before it.
pub fn first_answer(
    ns: &Netns,
    target: SocketAddr,
    timeout: Duration,
    every: Duration,
    limit: Duration,
) -> (Option<Instant>, usize) {
    ns.enter(move || {
        let begin = Instant::now();
        let mut failed = 0;
        while begin.elapsed() < limit {
            let at = Instant::now();
            if let Ok((200, _)) = http_get(target, "/", timeout) {
                return (Some(Instant::now()), failed);
            }
            failed += 1;
            thread::sleep(every.saturating_sub(at.elapsed()));
        }
        (None, failed)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalived_states_are_read_from_its_log() {
        let log = "Wed Nov 25 00:11:02 2026: (web): entering FAULT state (tracked file xdplb has status -254)\n\
                   Wed Nov 25 00:11:02 2026: (web) entering FAULT state\n\
                   Wed Nov 25 00:11:07 2026: (web) Entering BACKUP STATE (init)\n\
                   Wed Nov 25 00:11:07 2026: (web) Entering MASTER STATE\n\
                   Wed Nov 25 00:11:07 2026: (web) Sending/queueing gratuitous ARPs on eth0 for 198.18.100.1\n";
        assert_eq!(vrrp_state(log).as_deref(), Some("MASTER"));
        assert_eq!(vrrp_state(&log[..log.find("Wed Nov 25 00:11:07").unwrap()]).as_deref(), Some("FAULT"));
        assert_eq!(vrrp_state("Startup complete\n"), None);
    }

    #[test]
    fn fill_swaps_addresses() {
        let t = "src 198.18.40.11 peer 198.18.40.12";
        assert_eq!(
            fill(t, &[("198.18.40.11", "198.18.40.12".into()), ("198.18.40.12", "198.18.40.11".into())]),
            "src 198.18.40.12 peer 198.18.40.11"
        );
    }
}
