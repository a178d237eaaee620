//! Test clusters in network namespaces, shared by the integration tests,
//! the demo and the benchmarks (one module, not copies).
//!
//! ```text
//!   client ns            switch ns (bridge br0)             backend ns 1..n
//!   cl0 198.18.0.1 ──── cl │                        │ b1 ──── b1 198.18.0.11 (+ VIPs on lo)
//!                          br0                        ...
//!   lb ns                  │                        │ bN ──── bN 198.18.0.1N
//!   lb0 198.18.0.2 ──── lb (xdplb pass: veth XDP_TX needs an XDP program on the peer)
//! ```
//! The client routes the VIPs (198.18.100.1, 2001:db8:100::1, and a second
//! pair 198.18.100.2, 2001:db8:100::2) via the load balancer; backends hold
//! them on loopback and answer clients directly (DSR). Links behind the load
//! balancer have an MTU of 1600 so IP-in-IP fits full-size client packets. Every name carries a
//! unique tag, and `Drop` removes namespaces, processes and mounts, also when
//! a test fails. Addresses are in 198.18.0.0/15 and 2001:db8::/32 only.

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

pub const VIP4: &str = "198.18.100.1";
pub const VIP6: &str = "2001:db8:100::1";
/// A second VIP pair, for two services on one port (a database's write and
/// read VIPs): DSR cannot change the port, so they differ in address.
pub const VIP4_2: &str = "198.18.100.2";
pub const VIP6_2: &str = "2001:db8:100::2";
pub const CLIENT4: &str = "198.18.0.1";
pub const CLIENT6: &str = "2001:db8::1";
pub const LB4: &str = "198.18.0.2";
pub const LB6: &str = "2001:db8::2";
/// Outer sources of the balancer's IP-in-IP packets.
pub const IPIP_SOURCE_V4: &str = "198.19.255.0/24";
pub const IPIP_SOURCE_V6: &str = "2001:db8:ffff::/96";
/// MTU of the load balancer's and the backends' links (the client's is 1500).
pub const JUMBO_MTU: u32 = 1600;
/// Prefix of every namespace the tests create (xtask removes leftovers).
pub const NETNS_PREFIX: &str = "xdplbt-";

pub fn backend4(i: usize) -> IpAddr {
    format!("198.18.0.{}", 11 + i).parse().unwrap()
}

pub fn backend6(i: usize) -> IpAddr {
    format!("2001:db8::{}", 11 + i).parse().unwrap()
}

/// Backend `i`'s addresses in a NAT cluster.
pub fn nat_backend4(i: usize) -> IpAddr {
    format!("198.19.0.{}", 11 + i).parse().unwrap()
}

pub fn nat_backend6(i: usize) -> IpAddr {
    format!("2001:db8:2::{}", 11 + i).parse().unwrap()
}

/// The byte at position `i` of every /bytes/N body of xdplb-test-server.
pub fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

fn sh(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    out
}

/// `ip` with a string of arguments.
pub fn ip(args: &str) -> Output {
    sh(Command::new("ip").args(args.split_whitespace()))
}

/// A unique short tag for this process and call.
pub fn unique_tag() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{:x}", (std::process::id() << 12) ^ (n << 8) ^ (t >> 12) & 0xff_ffff)
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: String) -> Self {
        ip(&format!("netns add {name}"));
        let ns = Self { name };
        ns.ip("link set lo up");
        ns
    }

    /// `ip -n NAME ...`
    pub fn ip(&self, args: &str) -> Output {
        ip(&format!("-n {} {args}", self.name))
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        sh(self.command("sysctl").args(["-qw", &format!("{key}={value}")]));
    }

    /// Runs `f` on a thread inside the namespace; sockets it creates stay there.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// Starts `f` on a thread inside the namespace, without waiting for it.
    pub fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        thread::spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns on this new thread, with a descriptor it owns.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                panic!("setns into {path}: {}", std::io::Error::last_os_error());
            }
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// The web servers behind the VIPs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Servers {
    /// xdplb-test-server: names itself, status code from a file, /bytes/N, UDP echo.
    Builtin,
    /// nginx from Debian, one per backend, serving a page that names it.
    Nginx,
}

/// Where NAT backends live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatArms {
    /// On a segment of their own behind the balancer's second interface lb1.
    TwoArmed,
    /// On the client's segment, but in another subnet routed via the balancer.
    OneArmed,
}

pub struct ClusterSpec {
    pub backends: usize,
    pub servers: Servers,
    /// Lay the backends out for NAT: addresses 198.19.0.11.. and
    /// 2001:db8:2::11.., default route via the balancer (198.19.0.1,
    /// 2001:db8:2::1), no VIP on loopback.
    pub nat: Option<NatArms>,
    /// Directory of the binaries (xdplb, xdplb-test-server).
    pub bin_dir: PathBuf,
}

pub struct Cluster {
    pub tag: String,
    pub dir: PathBuf,
    pub pin_root: PathBuf,
    pub state_dir: PathBuf,
    pub bin_dir: PathBuf,
    pub servers: Servers,
    pub client: Netns,
    pub lb: Netns,
    pub switch: Netns,
    /// The backends' own segment of a two-armed NAT cluster.
    pub switch2: Option<Netns>,
    pub nat: Option<NatArms>,
    pub backends: Vec<Netns>,
    processes: Mutex<Vec<(String, Child)>>,
}

impl Cluster {
    pub fn new(spec: ClusterSpec) -> Self {
        let tag = unique_tag();
        let dir = std::env::temp_dir().join(format!("xdplb-test-{tag}"));
        std::fs::create_dir_all(dir.join("bpffs")).unwrap();
        let ns = |role: &str| Netns::create(format!("{NETNS_PREFIX}{tag}-{role}"));
        let cluster = Self {
            pin_root: dir.join("bpffs/xdplb"),
            state_dir: dir.join("run"),
            bin_dir: spec.bin_dir,
            servers: spec.servers,
            switch: ns("sw"),
            switch2: (spec.nat == Some(NatArms::TwoArmed)).then(|| ns("sw2")),
            nat: spec.nat,
            client: ns("cl"),
            lb: ns("lb"),
            backends: (1..=spec.backends).map(|i| ns(&format!("b{i}"))).collect(),
            processes: Mutex::new(Vec::new()),
            dir,
            tag,
        };
        // A BPF filesystem of this cluster's own: pins of one test never meet another's.
        sh(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(cluster.dir.join("bpffs")));
        cluster.wire();
        cluster
    }

    /// Backend `i`'s IPv4 address in this cluster.
    pub fn backend4(&self, i: usize) -> IpAddr {
        if self.nat.is_some() { nat_backend4(i) } else { backend4(i) }
    }

    pub fn backend6(&self, i: usize) -> IpAddr {
        if self.nat.is_some() { nat_backend6(i) } else { backend6(i) }
    }

    fn wire(&self) {
        for sw in std::iter::once(&self.switch).chain(self.switch2.as_ref()) {
            sw.ip("link add br0 type bridge mcast_snooping 0");
            sw.ip("link set br0 up");
        }
        let mut hosts: Vec<(&Netns, &Netns, String, String, String)> = vec![
            (&self.switch, &self.client, "cl0".into(), CLIENT4.into(), CLIENT6.into()),
            (&self.switch, &self.lb, "lb0".into(), LB4.into(), LB6.into()),
        ];
        let backend_switch = self.switch2.as_ref().unwrap_or(&self.switch);
        if let Some(sw2) = &self.switch2 {
            hosts.push((sw2, &self.lb, "lb1".into(), "198.19.0.1".into(), "2001:db8:2::1".into()));
        }
        for (i, b) in self.backends.iter().enumerate() {
            hosts.push((
                backend_switch,
                b,
                format!("b{}", i + 1),
                self.backend4(i).to_string(),
                self.backend6(i).to_string(),
            ));
        }
        for (sw, host, ifname, a4, a6) in hosts {
            self.plug(sw, host, &ifname, &a4, &a6);
        }
        for (v4, v6) in [(VIP4, VIP6), (VIP4_2, VIP6_2)] {
            self.client.ip(&format!("route add {v4}/32 via {LB4}"));
            self.client.ip(&format!("-6 route add {v6}/128 via {LB6}"));
        }
        match self.nat {
            None => {
                for b in &self.backends {
                    // DSR and IP-in-IP deliver packets addressed to the VIP: backends hold it on loopback.
                    for (v4, v6) in [(VIP4, VIP6), (VIP4_2, VIP6_2)] {
                        b.ip(&format!("addr add {v4}/32 dev lo"));
                        b.ip(&format!("addr add {v6}/128 dev lo"));
                    }
                    // ...and answer no ARP for it (LVS-DR's rule; `xdplb doctor --backend` checks it).
                    b.sysctl("net.ipv4.conf.all.arp_ignore", "1");
                    b.sysctl("net.ipv4.conf.all.arp_announce", "2");
                }
            }
            Some(arms) => {
                if arms == NatArms::OneArmed {
                    // One interface, two subnets: clients' and backends'.
                    self.lb.ip("addr add 198.19.0.1/24 dev lb0");
                    self.lb.ip("addr add 2001:db8:2::1/64 dev lb0 nodad");
                }
                for (i, b) in self.backends.iter().enumerate() {
                    let dev = format!("b{}", i + 1);
                    b.ip(&format!("route add default via 198.19.0.1 dev {dev}"));
                    b.ip(&format!("-6 route add default via 2001:db8:2::1 dev {dev}"));
                }
            }
        }
        // veth drops frames sent with XDP_TX or redirected unless the peer runs an XDP program.
        let mut peers = vec![(&self.switch, "lb")];
        if let Some(sw2) = &self.switch2 {
            peers.push((sw2, "lbb"));
        }
        for (sw, port) in peers {
            let out = self.xdplb_in(sw, &["pass", "--iface", port]).output().unwrap();
            assert!(out.status.success(), "xdplb pass failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }

    /// Wires `host` to switch `sw` through a veth named `ifname` on the host's side.
    fn plug(&self, sw: &Netns, host: &Netns, ifname: &str, a4: &str, a6: &str) {
        let port = match ifname {
            "lb1" => "lbb".to_string(),
            n if n.ends_with('0') => n.trim_end_matches('0').to_string(),
            n => format!("s{n}"),
        };
        self.plug_port(sw, host, &port, ifname, a4, a6);
    }

    /// As `plug`, with the switch's side of the veth named `port`.
    fn plug_port(&self, sw: &Netns, host: &Netns, port: &str, ifname: &str, a4: &str, a6: &str) {
        sw.ip(&format!("link add {port} type veth peer name {ifname} netns {}", host.name));
        // Jumbo frames behind the load balancer, as IP-in-IP deployments
        // use: an encapsulated 1500-byte client packet (1520) must fit.
        let mtu = if ifname == "cl0" { 1500 } else { JUMBO_MTU };
        sw.ip(&format!("link set {port} mtu {mtu}"));
        host.ip(&format!("link set {ifname} mtu {mtu}"));
        sw.ip(&format!("link set {port} master br0 up"));
        host.sysctl("net.ipv6.conf.all.accept_dad", "0");
        host.sysctl(&format!("net.ipv6.conf.{ifname}.accept_dad"), "0");
        host.sysctl(&format!("net.ipv6.conf.{ifname}.accept_ra"), "0");
        host.ip(&format!("addr add {a4}/24 dev {ifname}"));
        host.ip(&format!("addr add {a6}/64 dev {ifname} nodad"));
        host.ip(&format!("link set {ifname} up"));
        // veth leaves TCP/UDP checksums to "hardware" (CHECKSUM_PARTIAL);
        // a frame that XDP retransmits loses that note and would arrive
        // with a half-done checksum. Real NICs finish checksums on send.
        sh(host.command("ethtool").args(["-K", ifname, "tx", "off"]));
    }

    /// Another host on the clients' and balancer's segment (a DNS server,
    /// say), in a namespace of its own that the caller owns.
    pub fn add_host(&self, role: &str, a4: &str, a6: &str) -> Netns {
        let host = Netns::create(format!("{NETNS_PREFIX}{}-{role}", self.tag));
        self.plug(&self.switch, &host, &format!("{role}0"), a4, a6);
        host
    }

    /// Another host on the clients' segment whose interface is named `ifname`
    /// (`eth0`, as on a real machine), behind the switch's port `role`; the
    /// caller owns its namespace.
    pub fn add_host_with_iface(&self, role: &str, ifname: &str, a4: &str, a6: &str) -> Netns {
        let host = Netns::create(format!("{NETNS_PREFIX}{}-{role}", self.tag));
        self.plug_port(&self.switch, &host, role, ifname, a4, a6);
        host
    }

    /// The xdplb binary, run in `ns` with this cluster's pin root and state dir.
    pub fn xdplb_in(&self, ns: &Netns, args: &[&str]) -> Command {
        let mut c = ns.command(self.bin_dir.join("xdplb"));
        c.args(args).env("XDPLB_PIN_ROOT", &self.pin_root).env("XDPLB_STATE_DIR", &self.state_dir);
        c
    }

    /// Attaches the IP-in-IP decapsulation program on every backend.
    pub fn enable_decap(&self) {
        for (i, b) in self.backends.iter().enumerate() {
            let iface = format!("b{}", i + 1);
            let out = self.xdplb_in(b, &["decap", "--iface", &iface]).output().unwrap();
            assert!(out.status.success(), "xdplb decap on {iface} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }

    fn track(&self, name: String, child: Child) {
        self.processes.lock().unwrap().push((name, child));
    }

    /// Starts `cmd` and kills it (and its children) with the cluster.
    pub fn spawn(&self, name: &str, cmd: &mut Command) {
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        self.track(name.to_string(), child);
    }

    /// As `spawn`, with its output in DIR/NAME.log (see `log`).
    pub fn spawn_logged(&self, name: &str, cmd: &mut Command) {
        let log = File::create(self.dir.join(format!("{name}.log"))).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        self.track(name.to_string(), child);
    }

    /// The pid of the tracked process `name`.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.processes.lock().unwrap().iter().find(|(n, _)| n == name).map(|(_, c)| c.id())
    }

    /// Starts the web server of backend `i` (0-based), listening on its own
    /// addresses and the VIPs, port `port`.
    pub fn start_server(&self, i: usize, port: u16) {
        let name = format!("b{}", i + 1);
        let ns = &self.backends[i];
        let child = match self.servers {
            Servers::Builtin => {
                let mut c = ns.command(self.bin_dir.join("xdplb-test-server"));
                c.args(["--name", &name, "--udp", "--status-file"]).arg(self.status_file(i));
                let mut addrs = vec![self.backend4(i), self.backend6(i)];
                if self.nat.is_none() {
                    addrs.extend([VIP4.parse::<IpAddr>().unwrap(), VIP6.parse().unwrap()]);
                }
                for a in addrs {
                    c.args(["--listen", &SocketAddr::new(a, port).to_string()]);
                }
                c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()
            }
            Servers::Nginx => {
                let conf = self.nginx_config(i, port);
                ns.command("nginx")
                    .args(["-e", "stderr", "-c"])
                    .arg(&conf)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap()
            }
        };
        self.track(format!("server-{name}"), child);
        let addr = SocketAddr::new(self.backend4(i), port);
        let ok = ns.enter(move || wait_until(Duration::from_secs(10), || TcpStream::connect(addr).is_ok()));
        assert!(ok, "server {name} did not start listening on {addr}");
    }

    fn nginx_config(&self, i: usize, port: u16) -> PathBuf {
        let d = self.dir.join(format!("nginx-b{}", i + 1));
        std::fs::create_dir_all(&d).unwrap();
        let name = format!("b{}", i + 1);
        let mut addrs = vec![self.backend4(i).to_string(), format!("[{}]", self.backend6(i))];
        if self.nat.is_none() {
            addrs.extend([VIP4.to_string(), format!("[{VIP6}]")]);
        }
        let listens: String = addrs.iter().map(|a| format!("    listen {a}:{port};\n")).collect();
        let conf = format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log stderr;\nevents {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
             keepalive_requests 100000;\n  server {{\n{listens}    location / {{ add_header X-Backend {name}; return 200 \"served by {name}\\n\"; }}\n  }}\n}}\n",
            d = d.display()
        );
        let path = d.join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        path
    }

    /// The file whose content sets the builtin server's HTTP status (default 200).
    pub fn status_file(&self, i: usize) -> PathBuf {
        self.dir.join(format!("status-b{}", i + 1))
    }

    /// Makes backend `i`'s builtin server answer `code` from now on.
    pub fn set_status(&self, i: usize, code: u16) {
        std::fs::write(self.status_file(i), code.to_string()).unwrap();
    }

    /// Kills backend `i`'s server (SIGKILL: a crash, not a shutdown).
    pub fn kill_server(&self, i: usize) {
        self.kill(&format!("server-b{}", i + 1));
    }

    /// Kills the tracked process `name` with SIGKILL and reaps it.
    pub fn kill(&self, name: &str) {
        let mut procs = self.processes.lock().unwrap();
        if let Some(pos) = procs.iter().position(|(n, _)| n == name) {
            let (_, mut child) = procs.remove(pos);
            kill_tree(&mut child, libc::SIGKILL);
        }
    }

    /// Sends `signal` to the tracked process `name` (and its children).
    pub fn signal(&self, name: &str, signal: i32) {
        let procs = self.processes.lock().unwrap();
        if let Some((_, child)) = procs.iter().find(|(n, _)| n == name) {
            signal_tree(child.id(), signal);
        }
    }

    /// Waits for the tracked process `name` to exit, at most `timeout`.
    pub fn wait_exit(&self, name: &str, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            let mut procs = self.processes.lock().unwrap();
            if let Some(pos) = procs.iter().position(|(n, _)| n == name) {
                if let Ok(Some(st)) = procs[pos].1.try_wait() {
                    procs.remove(pos);
                    return Some(st);
                }
            } else {
                return None;
            }
            drop(procs);
            thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn write_config(&self, name: &str, yaml: &str) -> PathBuf {
        let path = self.dir.join(name);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }

    /// Starts `xdplb run` in the load balancer namespace; returns once its
    /// status file shows every listed backend `up`, or panics after `timeout`.
    /// Its log goes to DIR/xdplb-NAME.log.
    pub fn start_xdplb(&self, name: &str, config: &Path, extra: &[&str]) {
        let log = File::create(self.dir.join(format!("{name}.log"))).unwrap();
        let mut args = vec!["run", "--config", config.to_str().unwrap(), "--iface", "lb0"];
        args.extend_from_slice(extra);
        let child = self
            .xdplb_in(&self.lb, &args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.track(name.to_string(), child);
    }

    /// `n` GETs on new connections from the client; the server names, in order.
    /// Panics on any failed request.
    pub fn requests(&self, target: SocketAddr, n: usize) -> Vec<String> {
        self.client.enter(move || {
            (0..n)
                .map(|i| match http_get(target, "/", Duration::from_secs(3)) {
                    Ok((200, b)) => b,
                    other => panic!("request {i} to {target}: {other:?}"),
                })
                .collect()
        })
    }

    /// The Prometheus text the controller serves on 127.0.0.1:9464 in the LB namespace.
    pub fn metrics(&self) -> String {
        self.lb.enter(|| {
            let mut s = TcpStream::connect("127.0.0.1:9464").expect("the metrics endpoint listens");
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: lb\r\n\r\n").unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        })
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// `xdplb status --json`, parsed; None while no controller publishes one.
    pub fn status(&self) -> Option<serde_json::Value> {
        let out = self.xdplb_in(&self.lb, &["status", "--iface", "lb0", "--json"]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Waits until `pred` holds for the status, at most `timeout`.
    pub fn wait_status(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let start = Instant::now();
        loop {
            if let Some(s) = self.status()
                && pred(&s)
            {
                return s;
            }
            if start.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; status: {:?}\nlog:\n{}",
                    self.status(),
                    self.log("xdplb")
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the backends of VIP `vip` have exactly these states.
    pub fn wait_backend_states(&self, vip: &str, states: &[&str], timeout: Duration) -> serde_json::Value {
        let want: Vec<String> = states.iter().map(|s| s.to_string()).collect();
        self.wait_status(timeout, &format!("VIP {vip} backends {states:?}"), |s| backend_states(s, vip) == want)
    }
}

/// `addr:port` as a socket address.
pub fn target(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(addr.parse().expect("an IP address"), port)
}

/// The `state` of every backend of VIP `vip` in a status document.
pub fn backend_states(s: &serde_json::Value, vip: &str) -> Vec<String> {
    s["vips"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["name"] == vip))
        .and_then(|v| v["backends"].as_array())
        .map(|bs| bs.iter().map(|b| b["state"].as_str().unwrap_or("").to_string()).collect())
        .unwrap_or_default()
}

fn signal_tree(pid: u32, signal: i32) {
    // `ip netns exec` execs the program, so the pid is the program's own;
    // children (nginx workers) share its process group only if asked, so
    // signal known children first.
    if let Ok(children) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        for c in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
            signal_tree(c, signal);
        }
    }
    unsafe { libc::kill(pid as i32, signal) };
}

fn kill_tree(child: &mut Child, signal: i32) {
    signal_tree(child.id(), signal);
    let _ = child.wait();
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, mut child) in self.processes.lock().unwrap().drain(..) {
            kill_tree(&mut child, libc::SIGKILL);
        }
        // Namespaces go (and their interfaces, which detaches every program),
        // then the BPF filesystem with its pins.
        for ns in self.backends.drain(..) {
            drop(ns);
        }
        self.switch2.take();
        let bpffs = self.dir.join("bpffs");
        let _ = Command::new("umount").arg("-l").arg(&bpffs).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

/// One HTTP/1.1 GET on a new connection; returns (status, server name).
pub fn http_get(target: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&target, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout)).ok();
    s.set_write_timeout(Some(timeout)).ok();
    let host = target.ip();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").map_err(|e| format!("send: {e}"))?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).map_err(|e| format!("read: {e}"))?;
    parse_response(&body)
}

fn parse_response(raw: &[u8]) -> Result<(u16, String), String> {
    let text = String::from_utf8_lossy(raw);
    let status = text.get(9..12).and_then(|s| s.parse().ok()).ok_or_else(|| format!("not HTTP: {text:?}"))?;
    let backend = text
        .lines()
        .find_map(|l| l.strip_prefix("X-Backend: "))
        .map(|s| s.trim().to_string())
        .ok_or_else(|| "no X-Backend header".to_string())?;
    Ok((status, backend))
}

/// A keep-alive HTTP/1.1 connection.
pub struct KeepAlive {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl KeepAlive {
    /// Connects from inside `ns`.
    pub fn open(ns: &Netns, target: SocketAddr) -> Self {
        let s =
            ns.enter(move || TcpStream::connect_timeout(&target, Duration::from_secs(3)).expect("keep-alive connect"));
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        Self { reader: BufReader::new(s.try_clone().unwrap()), writer: s }
    }

    /// One request on the connection; returns (status, server name).
    pub fn get(&mut self, path: &str) -> Result<(u16, String), String> {
        write!(self.writer, "GET {path} HTTP/1.1\r\nHost: vip\r\n\r\n").map_err(|e| format!("send: {e}"))?;
        let mut head = Vec::new();
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).map_err(|e| format!("read: {e}"))? == 0 {
                return Err("connection closed".into());
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length: ") {
                len = v.trim().parse().unwrap_or(0);
            }
            head.extend_from_slice(line.as_bytes());
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0u8; len];
        self.reader.read_exact(&mut body).map_err(|e| format!("read body: {e}"))?;
        parse_response(&head)
    }
}

/// The outcome of one request of a `RequestStream`.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Instant,
    /// How long the request took, failed or not.
    pub took: Duration,
    pub result: Result<String, String>,
}

/// A steady stream of HTTP requests, each on a new connection, from inside
/// a namespace, until stopped (or `max` requests, or 5 minutes).
pub struct RequestStream {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    handle: Option<thread::JoinHandle<()>>,
}

impl RequestStream {
    pub fn start(ns: &Netns, target: SocketAddr, every: Duration, max: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let path = format!("/var/run/netns/{}", ns.name);
        let (st, sa) = (stop.clone(), samples.clone());
        let handle = thread::spawn(move || {
            let file = File::open(&path).unwrap();
            assert_eq!(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let begin = Instant::now();
            for _ in 0..max {
                if st.load(Ordering::Relaxed) || begin.elapsed() > Duration::from_secs(300) {
                    break;
                }
                let at = Instant::now();
                let result = http_get(target, "/", Duration::from_secs(2))
                    .and_then(|(code, b)| if code == 200 { Ok(b) } else { Err(format!("HTTP {code} from {b}")) });
                sa.lock().unwrap().push(Sample { at, took: at.elapsed(), result });
                thread::sleep(every.saturating_sub(at.elapsed()));
            }
        });
        Self { stop, samples, handle: Some(handle) }
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap().clone()
    }

    pub fn stop(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
        self.samples()
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Directory of the binaries: $XDPLB_BIN_DIR, or the one next to the running
/// executable (target/debug for target/debug/deps/TEST).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDPLB_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    let dir = if dir.ends_with("deps") { dir.parent().unwrap() } else { dir };
    assert!(
        dir.join("xdplb").exists(),
        "{} has no xdplb binary: build it first (`cargo build --bin xdplb`; `cargo xtask test` does)",
        dir.display()
    );
    dir.to_path_buf()
}

/// A scratch directory, /tmp/xdplb-test-TAG, with a BPF filesystem of its
/// own at DIR/bpffs: pins of one test never meet another's. Unmounted and
/// removed on drop, also when a test fails (xtask removes what a killed run
/// leaves, by this name).
pub struct TestDir {
    pub path: PathBuf,
}

impl TestDir {
    pub fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("xdplb-test-{tag}"));
        std::fs::create_dir_all(path.join("bpffs")).unwrap();
        let dir = Self { path };
        sh(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(dir.bpffs()));
        dir
    }

    pub fn bpffs(&self) -> PathBuf {
        self.path.join("bpffs")
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.bpffs()).status();
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
