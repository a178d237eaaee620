//! A highly available group in network namespaces: xdplb nodes that
//! announce their VIPs over eBGP, each through its own BIRD, to a router
//! that spreads them with ECMP. Shared by the HA integration tests and the
//! demo's `--ha` scene.
//!
//! ```text
//!  client ns                router ns: BIRD AS 65000,          lan ns: bridge br0
//!  eth0 198.18.60.2 ─────── eth1 198.18.60.1   kernel ECMP
//!                           eth0 198.18.40.1 ───────────────── rt ──┐
//!  node ns lb1..lbN: xdplb + BIRD AS 65001                          │
//!  eth0 198.18.40.11.. ─────────────────────────────────────── lbN ─┤ (xdplb pass on lbN)
//!  backend ns b1..bM: HTTP server, the VIPs on lo                   │
//!  eth0 198.18.40.21.. ─────────────────────────────────────── bM ──┘
//! ```
//! Nodes forward with DSR: backends answer the client through the router.
//! Every node's interface is `eth0`, so each has a state dir of its own
//! (and node 1 runs as a newcomer would: `ip netns exec` with the default
//! pin root, `--ephemeral`, the default routes file). `Drop` kills BIRD,
//! xdplb and the servers, then deletes the namespaces, also when a test
//! fails. Addresses are in 198.18.0.0/15 only.

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use lb_common::{flow_hash, maglev};

use crate::topology::{NETNS_PREFIX, Netns, TestDir, unique_tag};

pub const ROUTER_LAN: &str = "198.18.40.1";
pub const ROUTER_CLIENT: &str = "198.18.60.1";
pub const CLIENT: &str = "198.18.60.2";
/// The VIP addresses the group announces.
pub const VIP: &str = "198.18.50.10";
pub const VIP_2: &str = "198.18.50.11";
pub const ROUTER_AS: u32 = 65000;
pub const NODE_AS: u32 = 65001;
pub const SYNC_PORT: u16 = 7946;
/// Quick checks: a dead server leaves after about 0.6 s.
pub const HEALTH_CHECK: &str = "{type: http, path: /, interval: 300ms, timeout: 200ms, rise: 2, fall: 2}";
/// BGP timers of every session: a lost peer is noticed within 3 s even
/// without a TCP close, and sessions come up within a second or two.
const BGP_TIMERS: &str = "hold time 3; keepalive time 1; connect delay time 1; connect retry time 1; \
                          error wait time 1, 5; graceful restart off;";

/// LB node `i`'s (0-based) address on the LAN.
pub fn node_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 40, 11 + i as u8)
}

/// Backend `i`'s (0-based) address on the LAN.
pub fn backend_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 40, 21 + i as u8)
}

pub struct HaSpec {
    /// LB nodes, 1 to 9.
    pub nodes: usize,
    /// HTTP backends, 1 to 9 (their servers are started, answering `bN`).
    pub backends: usize,
    /// Directory of the binaries (xdplb, xdplb-test-server).
    pub bin_dir: PathBuf,
}

/// A VIP of the group, DSR, TCP.
#[derive(Clone, Debug)]
pub struct HaVip {
    pub name: String,
    pub address: Ipv4Addr,
    pub port: u16,
    /// Backend indexes (0-based).
    pub backends: Vec<usize>,
}

impl HaVip {
    pub fn new(name: &str, address: &str, port: u16, backends: impl IntoIterator<Item = usize>) -> Self {
        Self {
            name: name.into(),
            address: address.parse().expect("an IPv4 address"),
            port,
            backends: backends.into_iter().collect(),
        }
    }

    pub fn target(&self) -> SocketAddr {
        SocketAddr::new(self.address.into(), self.port)
    }
}

/// One LB node: its namespace and files.
pub struct HaNode {
    pub name: String,
    pub ns: Netns,
    pub addr: Ipv4Addr,
    /// DIR/lbN: bird.conf, bird.ctl, xdplb.yaml, the logs.
    pub dir: PathBuf,
    /// xdplb's `--state-dir`.
    pub state_dir: PathBuf,
    /// xdplb's `--pin-root`; None: the default, with `--ephemeral`.
    pub pin_root: Option<PathBuf>,
    pub bird_socket: PathBuf,
    /// `bgp.routes_file`; None: xdplb's default, STATE_DIR/eth0.bird.conf.
    pub routes_file: Option<PathBuf>,
}

impl HaNode {
    /// The file xdplb writes and this node's bird.conf includes.
    pub fn effective_routes_file(&self) -> PathBuf {
        self.routes_file.clone().unwrap_or_else(|| self.state_dir.join("eth0.bird.conf"))
    }

    pub fn config_file(&self) -> PathBuf {
        self.dir.join("xdplb.yaml")
    }
}

pub struct HaCluster {
    pub tag: String,
    pub bin_dir: PathBuf,
    pub nodes: Vec<HaNode>,
    pub backends: Vec<Netns>,
    pub router: Netns,
    pub client: Netns,
    pub lan: Netns,
    processes: Mutex<Vec<(String, Child)>>,
    /// Last: unmounted once the namespaces are gone.
    pub dir: TestDir,
}

impl HaCluster {
    /// Namespaces, links, BIRD on the router and on every node (no routes
    /// yet), the backends' servers. xdplb is not started.
    pub fn new(spec: HaSpec) -> Result<Self, String> {
        if !(1..=9).contains(&spec.nodes) || !(1..=9).contains(&spec.backends) {
            return Err(format!("{} nodes and {} backends: 1 to 9 of each", spec.nodes, spec.backends));
        }
        let tag = unique_tag();
        let dir = TestDir::new(&tag);
        let ns = |role: &str| Netns::create(format!("{NETNS_PREFIX}{tag}-{role}"));
        let nodes = (0..spec.nodes)
            .map(|i| {
                let name = format!("lb{}", i + 1);
                let d = dir.path.join(&name);
                let newcomer = i == 0;
                HaNode {
                    ns: ns(&name),
                    addr: node_addr(i),
                    state_dir: d.join("run"),
                    pin_root: (!newcomer).then(|| dir.bpffs().join(&name)),
                    bird_socket: d.join("bird.ctl"),
                    routes_file: (!newcomer).then(|| d.join("routes/xdplb.bird.conf")),
                    dir: d,
                    name,
                }
            })
            .collect();
        let c = Self {
            nodes,
            backends: (1..=spec.backends).map(|i| ns(&format!("b{i}"))).collect(),
            router: ns("rt"),
            client: ns("cl"),
            lan: ns("lan"),
            bin_dir: spec.bin_dir,
            processes: Mutex::new(Vec::new()),
            dir,
            tag,
        };
        c.wire()?;
        c.write_sync_key()?;
        c.start_router_bird()?;
        for i in 0..c.nodes.len() {
            c.start_node_bird(i)?;
        }
        for i in 0..c.backends.len() {
            c.start_server(i)?;
        }
        Ok(c)
    }

    fn wire(&self) -> Result<(), String> {
        run(self.lan.command("ip").args(["link", "add", "br0", "type", "bridge", "mcast_snooping", "0"]))?;
        run(self.lan.command("ip").args(["link", "set", "br0", "up"]))?;
        self.plug(&self.router, "rt", ROUTER_LAN)?;
        for (i, n) in self.nodes.iter().enumerate() {
            self.plug(&n.ns, &n.name, &node_addr(i).to_string())?;
        }
        for (i, b) in self.backends.iter().enumerate() {
            self.plug(b, &format!("b{}", i + 1), &backend_addr(i).to_string())?;
            run(b.command("ip").args(["route", "add", "default", "via", ROUTER_LAN]))?;
            // DSR delivers packets addressed to the VIP: backends hold it on
            // loopback and answer no ARP for it (LVS-DR's rule).
            for v in [VIP, VIP_2] {
                run(b.command("ip").args(["addr", "add", &format!("{v}/32"), "dev", "lo"]))?;
            }
            sysctl(b, "net.ipv4.conf.all.arp_ignore", "1")?;
            sysctl(b, "net.ipv4.conf.all.arp_announce", "2")?;
        }
        // The client's own link to the router.
        run(self
            .router
            .command("ip")
            .args(["link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns"])
            .arg(&self.client.name))?;
        for (ns, ifname, addr) in [(&self.router, "eth1", ROUTER_CLIENT), (&self.client, "eth0", CLIENT)] {
            self.address(ns, ifname, addr)?;
        }
        run(self.client.command("ip").args(["route", "add", "default", "via", ROUTER_CLIENT]))?;
        // Forward, and choose the ECMP path by a hash of the 5-tuple, so one
        // client's connections spread over every node (policy 0 hashes the
        // addresses only). Not policy 1: it takes a hash the packet already
        // carries, and a packet from a socket on this host carries the
        // socket's random one, which TCP changes at every retransmission
        // timeout, so connections would hop between nodes at random. Policy
        // 3 with these fields hashes the headers as a real router does (and
        // as `ip route get ... sport dport` computes it).
        sysctl(&self.router, "net.ipv4.ip_forward", "1")?;
        sysctl(&self.router, "net.ipv4.fib_multipath_hash_policy", "3")?;
        // Source and destination address, protocol, source and destination port.
        sysctl(&self.router, "net.ipv4.fib_multipath_hash_fields", "0x0037")?;
        // Replies come back from the backends, not from the nodes the requests went to.
        sysctl(&self.router, "net.ipv4.conf.all.rp_filter", "0")?;
        sysctl(&self.router, "net.ipv4.conf.default.rp_filter", "0")?;
        // veth drops frames sent with XDP_TX unless the peer runs an XDP program.
        for n in &self.nodes {
            let out = self
                .lan
                .command(self.bin_dir.join("xdplb"))
                .args(["pass", "--iface", &n.name])
                .env("XDPLB_PIN_ROOT", self.dir.bpffs().join("pass"))
                .output()
                .map_err(|e| format!("xdplb pass: {e}"))?;
            if !out.status.success() {
                return Err(format!("xdplb pass --iface {}: {}", n.name, String::from_utf8_lossy(&out.stderr)));
            }
        }
        Ok(())
    }

    /// Wires `host`'s eth0 to the LAN bridge through port `port`.
    fn plug(&self, host: &Netns, port: &str, addr: &str) -> Result<(), String> {
        run(self
            .lan
            .command("ip")
            .args(["link", "add", port, "type", "veth", "peer", "name", "eth0", "netns"])
            .arg(&host.name))?;
        run(self.lan.command("ip").args(["link", "set", port, "master", "br0", "up"]))?;
        self.address(host, "eth0", addr)
    }

    fn address(&self, ns: &Netns, ifname: &str, addr: &str) -> Result<(), String> {
        run(ns.command("ip").args(["addr", "add", &format!("{addr}/24"), "dev", ifname]))?;
        run(ns.command("ip").args(["link", "set", ifname, "up"]))?;
        // veth leaves checksums to "hardware"; a frame that XDP retransmits
        // loses that note and would arrive with a half-done checksum.
        run(ns.command("ethtool").args(["-K", ifname, "tx", "off"])).map(drop)
    }

    /// The flow sync key all nodes share (mode 0600, as xdplb requires).
    pub fn sync_key(&self) -> PathBuf {
        self.dir.path.join("sync.key")
    }

    fn sync_key_text(&self) -> String {
        format!("xdplb-ha-test-key-{}", self.tag)
    }

    /// The flow hash seed every node derives from the flow sync key.
    pub fn hash_seed(&self) -> [u32; 2] {
        lb_userspace::hash_seed::derive(self.sync_key_text().as_bytes())
    }

    fn write_sync_key(&self) -> Result<(), String> {
        let path = self.sync_key();
        std::fs::write(&path, format!("{}\n", self.sync_key_text())).map_err(|e| e.to_string())?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(|e| e.to_string())
    }

    fn router_dir(&self) -> PathBuf {
        self.dir.path.join("router")
    }

    pub fn router_socket(&self) -> PathBuf {
        self.router_dir().join("bird.ctl")
    }

    /// The router: eBGP with every node, the VIP routes into the kernel,
    /// equal routes merged into one multipath route (ECMP).
    fn start_router_bird(&self) -> Result<(), String> {
        let d = self.router_dir();
        std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
        let mut conf = format!(
            "log stderr all;\nrouter id {ROUTER_LAN};\nprotocol device {{}}\n\
             protocol kernel {{\n  ipv4 {{ import none; export all; }};\n  merge paths on;\n}}\n\
             template bgp lbnode {{\n  local {ROUTER_LAN} as {ROUTER_AS};\n  {BGP_TIMERS}\n  \
             ipv4 {{ import all; export none; }};\n}}\n"
        );
        for (i, n) in self.nodes.iter().enumerate() {
            conf += &format!("protocol bgp {} from lbnode {{ neighbor {} as {NODE_AS}; }}\n", n.name, node_addr(i));
        }
        self.start_bird("bird-router", &self.router, &d, &conf, &self.router_socket())
    }

    /// A node's BIRD: the routes file xdplb writes, exported to the router
    /// only (no kernel protocol: the blackhole routes stay out of the node's
    /// own table). The include is a glob, which matches nothing until xdplb
    /// writes the file, so BIRD can start first (BIRD 2.0.12 accepts a glob
    /// that matches nothing, but not a missing directory).
    fn start_node_bird(&self, i: usize) -> Result<(), String> {
        let n = &self.nodes[i];
        let routes_dir = n.effective_routes_file().parent().unwrap().to_path_buf();
        for d in [&n.dir, &n.state_dir, &routes_dir] {
            std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
        }
        let conf = format!(
            "log stderr all;\nrouter id {addr};\nprotocol device {{}}\ninclude \"{routes}/*.bird.conf\";\n\
             protocol bgp upstream {{\n  local {addr} as {NODE_AS};\n  neighbor {ROUTER_LAN} as {ROUTER_AS};\n  \
             {BGP_TIMERS}\n  ipv4 {{ import none; export where proto = \"xdplb_vips4\"; }};\n}}\n",
            addr = n.addr,
            routes = routes_dir.display(),
        );
        self.start_bird(&format!("bird-{}", n.name), &n.ns, &n.dir, &conf, &n.bird_socket)
    }

    fn start_bird(&self, name: &str, ns: &Netns, dir: &Path, conf: &str, socket: &Path) -> Result<(), String> {
        let path = dir.join("bird.conf");
        std::fs::write(&path, conf).map_err(|e| e.to_string())?;
        let mut cmd = ns.command("bird");
        cmd.arg("-f").arg("-c").arg(&path).arg("-s").arg(socket).arg("-P").arg(dir.join("bird.pid"));
        self.spawn(name, &mut cmd, &dir.join("bird.log"))?;
        let up =
            wait_for(Duration::from_secs(10), Duration::from_millis(50), || birdc(socket, &["show", "status"]).ok());
        up.map(drop).ok_or_else(|| {
            format!("{name} did not answer on {}; log:\n{}", socket.display(), read(&dir.join("bird.log")))
        })
    }

    /// Starts backend `i`'s xdplb-test-server on port 80 (every address:
    /// its own and the VIPs); it answers with its name, `bN`.
    pub fn start_server(&self, i: usize) -> Result<(), String> {
        let name = format!("b{}", i + 1);
        let mut cmd = self.backends[i].command(self.bin_dir.join("xdplb-test-server"));
        cmd.args(["--name", &name, "--listen", "0.0.0.0:80"]);
        self.spawn(&format!("server-{name}"), &mut cmd, &self.dir.path.join(format!("server-{name}.log")))?;
        let addr = SocketAddr::new(backend_addr(i).into(), 80);
        let ok = self.backends[i].enter(move || {
            wait_for(Duration::from_secs(10), Duration::from_millis(20), || TcpStream::connect(addr).ok()).is_some()
        });
        if ok { Ok(()) } else { Err(format!("server {name} did not start listening on {addr}")) }
    }

    /// Kills backend `i`'s server (SIGKILL).
    pub fn kill_server(&self, i: usize) {
        self.kill(&format!("server-b{}", i + 1));
    }

    /// A node's xdplb configuration: these VIPs, announced through its BIRD,
    /// flows shared with every other node (refreshed every 2 s).
    pub fn node_yaml(&self, i: usize, vips: &[HaVip]) -> String {
        format!("interface: eth0\n{}{}", vips_yaml(vips), self.ha_yaml(i))
    }

    /// A node's `bgp:` and `flow_sync:` sections.
    pub fn ha_yaml(&self, i: usize) -> String {
        let n = &self.nodes[i];
        let mut y = String::from("bgp:\n");
        if let Some(f) = &n.routes_file {
            y += &format!("  routes_file: {}\n", f.display());
        }
        y += &format!("  bird_socket: {}\n  warmup: 0s\n  withdraw_wait: 1s\n", n.bird_socket.display());
        let peers: Vec<String> =
            (0..self.nodes.len()).filter(|&j| j != i).map(|j| format!("{}:{SYNC_PORT}", node_addr(j))).collect();
        y += &format!(
            "flow_sync:\n  listen: {}:{SYNC_PORT}\n  peers: [{}]\n  key_file: {}\n  refresh: 2s\n",
            n.addr,
            peers.join(", "),
            self.sync_key().display()
        );
        y
    }

    /// Writes node `i`'s configuration file (atomically: a running xdplb
    /// watching it never reads half of it).
    pub fn write_config(&self, i: usize, yaml: &str) -> Result<PathBuf, String> {
        let path = self.nodes[i].config_file();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, yaml).map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, &path).map_err(|e| e.to_string())?;
        Ok(path)
    }

    /// Starts `xdplb run` on node `i` with its configuration file. Node 1
    /// runs as the README tells a newcomer: `ip netns exec NS xdplb
    /// --state-dir DIR run --config FILE --ephemeral`; the others keep their
    /// pins in this cluster's BPF filesystem.
    pub fn start_xdplb(&self, i: usize) -> Result<(), String> {
        let n = &self.nodes[i];
        let mut cmd = self.xdplb_cmd(i);
        cmd.arg("run").arg("--config").arg(n.config_file());
        if n.pin_root.is_none() {
            cmd.arg("--ephemeral");
        }
        self.spawn(&format!("xdplb-{}", n.name), &mut cmd, &n.dir.join("xdplb.log"))
    }

    /// The xdplb binary, in node `i`'s namespace, with its state dir (and pin root).
    pub fn xdplb_cmd(&self, i: usize) -> Command {
        let n = &self.nodes[i];
        let mut cmd = n.ns.command(self.bin_dir.join("xdplb"));
        cmd.arg("--state-dir").arg(&n.state_dir);
        if let Some(p) = &n.pin_root {
            cmd.arg("--pin-root").arg(p);
        }
        cmd
    }

    /// `xdplb ARGS` on node `i`: its standard output, or why it failed.
    pub fn xdplb(&self, i: usize, args: &[&str]) -> Result<String, String> {
        run(self.xdplb_cmd(i).args(args)).map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// `xdplb drain` (the whole node: its routes are withdrawn).
    pub fn drain(&self, i: usize) -> Result<String, String> {
        self.xdplb(i, &["drain"])
    }

    pub fn undrain(&self, i: usize) -> Result<String, String> {
        self.xdplb(i, &["undrain"])
    }

    /// `xdplb reload`: the verdict's text.
    pub fn reload(&self, i: usize) -> Result<String, String> {
        self.xdplb(i, &["reload", "--iface", "eth0", "--timeout", "30"])
    }

    /// Node `i`'s `xdplb status --json`; None while none is published.
    pub fn status(&self, i: usize) -> Option<serde_json::Value> {
        let out = self.xdplb(i, &["status", "--iface", "eth0", "--json"]).ok()?;
        serde_json::from_str(&out).ok()
    }

    /// Waits until `pred` holds for node `i`'s status; the status, or why not.
    pub fn wait_status(
        &self,
        i: usize,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value, String> {
        wait_for(timeout, Duration::from_millis(100), || self.status(i).filter(|s| pred(s))).ok_or_else(|| {
            format!(
                "{}: no {what} within {timeout:?}; status: {}\nlog:\n{}",
                self.nodes[i].name,
                self.status(i).map(|s| s.to_string()).unwrap_or_default(),
                self.xdplb_log(i)
            )
        })
    }

    pub fn xdplb_log(&self, i: usize) -> String {
        read(&self.nodes[i].dir.join("xdplb.log"))
    }

    pub fn bird_log(&self, i: usize) -> String {
        read(&self.nodes[i].dir.join("bird.log"))
    }

    pub fn router_log(&self) -> String {
        read(&self.router_dir().join("bird.log"))
    }

    /// Kills node `i` as a crash would: xdplb and its BIRD, SIGKILL.
    pub fn kill_node(&self, i: usize) {
        let name = &self.nodes[i].name;
        self.kill(&format!("xdplb-{name}"));
        self.kill(&format!("bird-{name}"));
    }

    /// The next hops of the router's route to `vip` (empty: no route).
    pub fn nexthops(&self, vip: &str) -> Vec<Ipv4Addr> {
        let Ok(out) = run(self.router.command("ip").args(["-j", "-4", "route", "show", &format!("{vip}/32")])) else {
            return Vec::new();
        };
        let routes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let mut hops = Vec::new();
        for r in routes.as_array().into_iter().flatten() {
            let gateways = match r["nexthops"].as_array() {
                Some(nh) => nh.iter().map(|h| &h["gateway"]).collect(),
                None => vec![&r["gateway"]],
            };
            hops.extend(gateways.into_iter().filter_map(|g| g.as_str()?.parse::<Ipv4Addr>().ok()));
        }
        hops.sort();
        hops
    }

    /// Waits until the router's route to `vip` has exactly `n` next hops;
    /// how long that took, or what it had instead.
    pub fn wait_nexthops(&self, vip: &str, n: usize, timeout: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        match wait_for(timeout, Duration::from_millis(20), || (self.nexthops(vip).len() == n).then_some(())) {
            Some(()) => Ok(start.elapsed()),
            None => Err(format!(
                "the router's route to {vip} has next hops {:?}, not {n}, after {timeout:?}; router BIRD:\n{}\n{}",
                self.nexthops(vip),
                birdc(&self.router_socket(), &["show", "protocols", "all"]).unwrap_or_else(|e| e),
                self.router_log()
            )),
        }
    }

    /// Which node the router sends a TCP packet from `client` to `vip` to
    /// (the kernel's own multipath choice, `ip route get ... sport dport`).
    pub fn node_for(&self, client: SocketAddr, vip: SocketAddr) -> Option<usize> {
        let out = run(self.router.command("ip").args([
            "-j",
            "-4",
            "route",
            "get",
            &vip.ip().to_string(),
            "from",
            &client.ip().to_string(),
            "iif",
            "eth1",
            "ipproto",
            "tcp",
            "sport",
            &client.port().to_string(),
            "dport",
            &vip.port().to_string(),
        ]))
        .ok()?;
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let gw: Ipv4Addr = r[0]["gateway"].as_str()?.parse().ok()?;
        (0..self.nodes.len()).find(|&i| node_addr(i) == gw)
    }

    /// Node `i`'s BGP session to the router is established.
    pub fn bgp_established(&self, i: usize) -> bool {
        birdc(&self.nodes[i].bird_socket, &["show", "protocols", "upstream"]).is_ok_and(|s| s.contains("Established"))
    }

    fn spawn(&self, name: &str, cmd: &mut Command, log: &Path) -> Result<(), String> {
        let log = File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        self.processes.lock().unwrap().push((name.to_string(), child));
        Ok(())
    }

    /// Kills the process `name` (SIGKILL) and reaps it.
    pub fn kill(&self, name: &str) {
        let mut procs = self.processes.lock().unwrap();
        if let Some(pos) = procs.iter().position(|(n, _)| n == name) {
            let (_, mut child) = procs.remove(pos);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The pid of process `name` (`xdplb-lb1`, `bird-lb1`, `bird-router`, `server-b1`).
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.processes.lock().unwrap().iter().find(|(n, _)| n == name).map(|(_, c)| c.id())
    }
}

impl Drop for HaCluster {
    fn drop(&mut self) {
        // The processes first (`ip netns exec` execs them: the pid is
        // theirs), then the namespaces, then the BPF filesystem (fields).
        for (_, mut child) in self.processes.lock().unwrap().drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn run(cmd: &mut Command) -> Result<Output, String> {
    let out = cmd.output().map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!("{cmd:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}

fn sysctl(ns: &Netns, key: &str, value: &str) -> Result<(), String> {
    run(ns.command("sysctl").args(["-qw", &format!("{key}={value}")])).map(drop)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// `birdc -s SOCKET ARGS`: its output, or why it failed.
pub fn birdc(socket: &Path, args: &[&str]) -> Result<String, String> {
    run(Command::new("birdc").arg("-s").arg(socket).args(args)).map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The `vips:` section: DSR, TCP, HTTP health checks.
pub fn vips_yaml(vips: &[HaVip]) -> String {
    let mut y = String::from("vips:\n");
    for v in vips {
        y += &format!(
            "  - name: {}\n    address: {}\n    port: {}\n    protocol: tcp\n    forwarding: dsr\n    backends:\n",
            v.name, v.address, v.port
        );
        for b in &v.backends {
            y += &format!("      - address: {}\n", backend_addr(*b));
        }
        y += &format!("    health_check: {HEALTH_CHECK}\n");
    }
    y
}

/// Polls `f` every `every` until it gives a value or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, every: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > timeout {
            return None;
        }
        thread::sleep(every);
    }
}

/// Maglev's choice among a VIP's backends, computed as every node computes
/// it (lb-common's table and flow hash, the default table size, equal
/// weights, DSR backends without a port of their own).
pub struct MaglevChoice {
    backends: Vec<Ipv4Addr>,
    table: Vec<u32>,
    seed: [u32; 2],
}

impl MaglevChoice {
    /// With the nodes' flow hash seed (`HaCluster::hash_seed`).
    pub fn new(backends: &[Ipv4Addr], seed: [u32; 2]) -> Self {
        let members: Vec<maglev::MaglevBackend> = backends
            .iter()
            .map(|a| maglev::MaglevBackend { key: maglev::backend_key(&words(*a), 0), weight: 1 })
            .collect();
        Self { backends: backends.to_vec(), table: maglev::build(&members, maglev::DEFAULT_TABLE_SIZE), seed }
    }

    /// The backend a new TCP flow from `client` to `vip` goes to.
    pub fn backend(&self, client: SocketAddr, vip: SocketAddr) -> Ipv4Addr {
        let (IpAddr::V4(c), IpAddr::V4(v)) = (client.ip(), vip.ip()) else { panic!("IPv4 only") };
        let hash =
            flow_hash::five_tuple(&self.seed, &words(c), &words(v), client.port().to_be(), vip.port().to_be(), 6);
        self.backends[self.table[(hash % self.table.len() as u32) as usize] as usize]
    }
}

/// Address words as the dataplane reads them (network-order bytes as native words).
fn words(a: Ipv4Addr) -> [u32; 4] {
    [u32::from_ne_bytes(a.octets()), 0, 0, 0]
}

/// The name of the backend at `addr` (`bN`), as its server answers.
pub fn backend_name(addr: Ipv4Addr) -> String {
    format!("b{}", addr.octets()[3] - 20)
}

/// One HTTP/1.1 request on a keep-alive connection: the X-Backend header.
fn request(reader: &mut BufReader<TcpStream>, writer: &mut TcpStream) -> Result<String, String> {
    writer.write_all(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n").map_err(|e| format!("send: {e}"))?;
    let (mut len, mut backend, mut status) = (0usize, None, None);
    for _ in 0..64 {
        let mut line = String::new();
        if reader.read_line(&mut line).map_err(|e| format!("read: {e}"))? == 0 {
            return Err("connection closed".into());
        }
        let lower = line.to_ascii_lowercase();
        if status.is_none() {
            status = line.get(9..12).map(str::to_string);
        } else if let Some(v) = lower.strip_prefix("content-length: ") {
            len = v.trim().parse().unwrap_or(0);
        } else if lower.starts_with("x-backend: ") {
            backend = Some(line[11..].trim().to_string());
        } else if line == "\r\n" {
            let mut body = vec![0u8; len];
            reader.read_exact(&mut body).map_err(|e| format!("read body: {e}"))?;
            return match (status.as_deref(), backend) {
                (Some("200"), Some(b)) => Ok(b),
                (s, b) => Err(format!("HTTP {s:?} from {b:?}")),
            };
        }
    }
    Err("no end of the header".into())
}

/// One GET on a new connection from inside `ns`: the connection's local
/// address and the backend that answered.
pub fn get_once(ns: &Netns, target: SocketAddr, timeout: Duration) -> Result<(SocketAddr, String), String> {
    ns.enter(move || {
        let s = TcpStream::connect_timeout(&target, timeout).map_err(|e| format!("connect: {e}"))?;
        let local = s.local_addr().map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(timeout)).ok();
        let mut w = s.try_clone().map_err(|e| e.to_string())?;
        request(&mut BufReader::new(s), &mut w).map(|b| (local, b)).map_err(|e| format!("{local}: {e}"))
    })
}

/// How one long-lived connection of a `KeepAliveFleet` fared.
#[derive(Clone, Debug)]
pub struct Held {
    pub local: SocketAddr,
    /// The backend of the first answer; every later one must be the same.
    pub backend: String,
    pub requests: u64,
    /// The first failure (the connection stops there): when and what.
    pub failure: Option<(Instant, String)>,
    /// The slowest request (retransmissions while routes move show here).
    pub slowest: Duration,
    /// When the last good answer came.
    pub last_ok: Instant,
}

/// Long-lived keep-alive connections, each asking again every `every` on
/// its own thread, until stopped (or 5 minutes, or 20 000 requests each).
pub struct KeepAliveFleet {
    stop: Arc<AtomicBool>,
    conns: Vec<Arc<Mutex<Held>>>,
    handles: Vec<thread::JoinHandle<()>>,
}

impl KeepAliveFleet {
    /// Opens `n` connections from inside `ns` (each answered once) and starts them.
    pub fn start(ns: &Netns, target: SocketAddr, n: usize, every: Duration, timeout: Duration) -> Result<Self, String> {
        let streams = ns.enter(move || {
            (0..n)
                .map(|_| {
                    let s = TcpStream::connect_timeout(&target, timeout).map_err(|e| format!("connect: {e}"))?;
                    s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
                    Ok(s)
                })
                .collect::<Result<Vec<TcpStream>, String>>()
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut fleet = Self { stop: stop.clone(), conns: Vec::new(), handles: Vec::new() };
        for s in streams {
            let local = s.local_addr().map_err(|e| e.to_string())?;
            let mut w = s.try_clone().map_err(|e| e.to_string())?;
            let mut r = BufReader::new(s);
            let backend = request(&mut r, &mut w).map_err(|e| format!("{local}: first request: {e}"))?;
            let held = Arc::new(Mutex::new(Held {
                local,
                backend,
                requests: 1,
                failure: None,
                slowest: Duration::ZERO,
                last_ok: Instant::now(),
            }));
            let (h, st) = (held.clone(), stop.clone());
            fleet.handles.push(thread::spawn(move || {
                let begin = Instant::now();
                for _ in 0..20_000 {
                    thread::sleep(every);
                    if st.load(Ordering::Relaxed) || begin.elapsed() > Duration::from_secs(300) {
                        break;
                    }
                    let at = Instant::now();
                    let answer = request(&mut r, &mut w);
                    let mut h = h.lock().unwrap();
                    h.slowest = h.slowest.max(at.elapsed());
                    match answer {
                        Ok(b) if b == h.backend => {
                            h.requests += 1;
                            h.last_ok = Instant::now();
                        }
                        Ok(b) => h.failure = Some((at, format!("answered by {b}, not {}", h.backend))),
                        Err(e) => h.failure = Some((at, e)),
                    }
                    if h.failure.is_some() {
                        break;
                    }
                }
            }));
            fleet.conns.push(held);
        }
        Ok(fleet)
    }

    pub fn snapshot(&self) -> Vec<Held> {
        self.conns.iter().map(|h| h.lock().unwrap().clone()).collect()
    }

    pub fn stop(mut self) -> Vec<Held> {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
        self.snapshot()
    }
}

impl Drop for KeepAliveFleet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// The packets a node's dataplane counted for VIP `name`.
pub fn vip_packets(status: &serde_json::Value, name: &str) -> Option<u64> {
    status["vips"].as_array()?.iter().find(|v| v["name"] == name)?["packets"].as_u64()
}

/// The BGP route of `prefix` in a node's status: (announced, why).
pub fn route(status: &serde_json::Value, prefix: &str) -> Option<(bool, String)> {
    let r = status["bgp"]["routes"].as_array()?.iter().find(|r| r["prefix"] == prefix)?;
    Some((r["announced"].as_bool()?, r["why"].as_str().unwrap_or("").to_string()))
}
