//! `xdplb trace` end to end: a cluster in network namespaces, `xdplb run`
//! balancing it, and `xdplb trace` in the load balancer's namespace while a
//! client sends requests. The pcap file is read back here (and by tcpdump,
//! when installed): the frames are the rewritten ones, toward the backends.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    path::Path,
    process::{Child, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use lb_common::maps::programs;
use lb_userspace::attach;
use tests::topology::{self, Cluster, ClusterSpec, Netns, RequestStream, Servers, VIP4, target, wait_until};

const WAIT: Duration = Duration::from_secs(30);

/// Two backends behind VIP web4 (VIP4:80, dsr), served by `xdplb run`.
fn cluster() -> Cluster {
    let c =
        Cluster::new(ClusterSpec { backends: 2, servers: Servers::Builtin, bin_dir: topology::bin_dir(), nat: None });
    for i in 0..2 {
        c.start_server(i, 80);
    }
    let yaml = format!(
        "interface: lb0\nvips:\n  - name: web4\n    address: {VIP4}\n    port: 80\n    forwarding: dsr\n    backends:\n      \
         - address: {}\n      - address: {}\n    health_check: {{type: tcp, interval: 200ms, timeout: 150ms, rise: 1}}\n",
        topology::backend4(0),
        topology::backend4(1)
    );
    let path = c.write_config("xdplb.yaml", &yaml);
    c.start_xdplb("xdplb", &path, &[]);
    c.wait_backend_states("web4", &["active", "active"], WAIT);
    c
}

/// The MAC of `ifname` in `ns`.
fn mac(ns: &Netns, ifname: &str) -> [u8; 6] {
    let out = ns.ip(&format!("-j link show {ifname}"));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = v[0]["address"].as_str().expect("a MAC address").to_string();
    let bytes: Vec<u8> = text.split(':').map(|h| u8::from_str_radix(h, 16).unwrap()).collect();
    bytes.try_into().unwrap()
}

/// The name of the program in the balancer's pinned XDP link.
fn attached_program(c: &Cluster) -> String {
    let id = attach::link_program_id(&c.pin_root.join("lb0/link")).expect("the link is pinned");
    // The program may be swapped out and unloaded between the two look-ups.
    attach::program_by_id(id).map_or_else(|e| format!("({e})"), |p| p.name_as_str().unwrap_or("?").to_string())
}

/// A running `xdplb trace` with its output collected; killed on drop.
struct Trace {
    child: Option<Child>,
    stdout: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl Trace {
    /// Starts `xdplb trace ARGS` in the LB namespace; returns once it says it traces.
    fn start(c: &Cluster, args: &[&str]) -> Self {
        let mut cmd = c.xdplb_in(&c.lb, &[&["trace", "--iface", "lb0"], args].concat());
        let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let (tx, stdout) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let (mut err, collected) = (child.stderr.take().unwrap(), stderr.clone());
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                collected.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let t = Self { child: Some(child), stdout, stderr };
        let started = wait_until(WAIT, || t.stderr().contains("xdplb: tracing lb0"));
        assert!(started, "xdplb trace did not start: {}", t.stderr());
        t
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Waits (at most `timeout`) for the trace to exit; its status and stdout lines.
    fn wait(&mut self, timeout: Duration) -> (ExitStatus, Vec<String>) {
        let start = Instant::now();
        let child = self.child.as_mut().unwrap();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            assert!(start.elapsed() < timeout, "xdplb trace still runs after {timeout:?}: {}", self.stderr());
            thread::sleep(Duration::from_millis(50));
        };
        self.child = None;
        // The reader thread ends with the pipe; give it a moment to hand over the rest.
        let mut lines = Vec::new();
        while let Ok(l) = self.stdout.recv_timeout(Duration::from_secs(2)) {
            lines.push(l);
        }
        (status, lines)
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A pcap file as written by `xdplb trace`, parsed here from the format's
/// definition: (original length, captured bytes) per frame.
fn read_pcap(path: &Path) -> Vec<(u32, Vec<u8>)> {
    let b = std::fs::read(path).unwrap();
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
    assert!(b.len() >= 24, "a pcap file header");
    assert_eq!(u32_at(0), 0xa1b2_c3d4, "magic: microsecond pcap, little-endian");
    assert_eq!((u16::from_le_bytes([b[4], b[5]]), u16::from_le_bytes([b[6], b[7]])), (2, 4), "version 2.4");
    assert_eq!(u32_at(16), 256, "snapshot length");
    assert_eq!(u32_at(20), 1, "LINKTYPE_ETHERNET");
    let mut frames = Vec::new();
    let mut at = 24;
    while at < b.len() {
        let (incl, orig) = (u32_at(at + 8) as usize, u32_at(at + 12));
        assert!(incl <= 256 && incl as u32 <= orig, "record lengths {incl}/{orig}");
        frames.push((orig, b[at + 16..at + 16 + incl].to_vec()));
        at += 16 + incl;
    }
    assert_eq!(at, b.len(), "no partial record");
    frames
}

/// The value of `key=` in a trace line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(' ').find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn trace_shows_decisions_and_writes_the_rewritten_frames_to_pcap() {
    let c = cluster();
    let lb_mac = mac(&c.lb, "lb0");
    let backend_macs: Vec<[u8; 6]> = (0..2).map(|i| mac(&c.backends[i], &format!("b{}", i + 1))).collect();
    assert_eq!(attached_program(&c), programs::BALANCER);

    const N: usize = 12;
    let pcap = c.dir.join("trace.pcap");
    let mut trace = Trace::start(&c, &["--vip", "web4", "-c", &N.to_string(), "-w", pcap.to_str().unwrap()]);
    assert_eq!(attached_program(&c), programs::TRACED, "tracing: the traced program is in the link");
    let stream = RequestStream::start(&c.client, target(VIP4, 80), Duration::from_millis(50), 400);
    let (status, lines) = trace.wait(WAIT);
    let samples = stream.stop();
    assert!(status.success(), "xdplb trace failed: {}", trace.stderr());
    assert!(trace.stderr().contains(&format!("{N} packets traced")), "{}", trace.stderr());
    assert!(!samples.is_empty() && samples.iter().all(|s| s.result.is_ok()), "requests failed while tracing");
    assert_eq!(attached_program(&c), programs::BALANCER, "tracing is off again");

    println!("xdplb trace printed:\n{}\nand on stderr:\n{}", lines.join("\n"), trace.stderr());
    assert_eq!(lines.len(), N, "one line per packet, {N} asked for");
    for l in &lines {
        assert_eq!(field(l, "vip"), Some("web4"), "{l}");
        assert_eq!(field(l, "rewrite"), Some("dsr"), "{l}");
        assert_eq!((field(l, "action"), field(l, "reason")), (Some("XDP_TX"), Some("tx")), "{l}");
        assert!(matches!(field(l, "conntrack"), Some("hit" | "miss" | "confirmed")), "{l}");
        assert!(l.contains(&format!(" > {VIP4}:80 tcp [")), "{l}");
    }
    let first = &lines[0];
    assert!(first.contains("[S]") && field(first, "conntrack") == Some("miss"), "a new connection first: {first}");
    assert!(field(first, "maglev_slot").is_some(), "Maglev chose its backend: {first}");

    let frames = read_pcap(&pcap);
    assert_eq!(frames.len(), N, "one frame per traced packet");
    for ((orig, f), line) in frames.iter().zip(&lines) {
        let b = backend_macs.iter().position(|m| f[0..6] == m[..]).unwrap_or_else(|| {
            panic!("frame to {:02x?}, not to a backend ({line})", &f[0..6]);
        });
        assert_eq!(f[6..12], lb_mac, "source MAC: the balancer's");
        assert_eq!(f[12..14], [0x08, 0x00], "IPv4, as DSR leaves it");
        assert_eq!(f[30..34], VIP4.parse::<std::net::Ipv4Addr>().unwrap().octets(), "to the VIP, unchanged");
        assert_eq!(u16::from_be_bytes([f[36], f[37]]), 80);
        assert_eq!(*orig as usize, 14 + u16::from_be_bytes([f[16], f[17]]) as usize, "the whole frame's length");
        let backend = topology::backend4(b).to_string();
        assert_eq!(field(line, "backend"), Some(backend.as_str()), "the line names the backend the frame went to");
    }

    // tcpdump is in the setup's packages; -e shows the MACs, the rewrite DSR makes.
    if let Ok(out) = std::process::Command::new("tcpdump").args(["-nn", "-e", "-r"]).arg(&pcap).output() {
        let text = String::from_utf8_lossy(&out.stdout);
        println!("tcpdump -nn -e -r {}:\n{text}", pcap.display());
        assert!(out.status.success(), "tcpdump reads the file: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(text.lines().filter(|l| l.contains(&format!("> {VIP4}.80:"))).count(), N, "{text}");
    }
    // The balancer serves on, untraced.
    assert_eq!(c.requests(target(VIP4, 80), 4).len(), 4);
}

#[test]
fn sigterm_ends_a_trace_and_the_controller_ends_a_killed_one() {
    let c = cluster();
    let mut trace = Trace::start(&c, &["--client", topology::CLIENT4]);
    c.requests(target(VIP4, 80), 2);
    // doctor sees xdplb's traced program, not another one to detach.
    let out = c.xdplb_in(&c.lb, &["doctor", "--iface", "lb0"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("WARNING xdp-traced: lb0 runs the traced xdplb program"), "{text}");
    assert!(!text.contains("xdp-other-program") && !text.contains("detach"), "{text}");
    // SAFETY: kill(2) on the trace's own pid; no memory is involved.
    unsafe { libc::kill(trace.pid(), libc::SIGTERM) };
    let (status, lines) = trace.wait(WAIT);
    assert!(status.success(), "{}", trace.stderr());
    assert!(trace.stderr().contains("interrupted"), "{}", trace.stderr());
    assert!(lines.iter().any(|l| field(l, "vip") == Some("web4")), "the requests were traced: {lines:?}");
    assert!(
        lines.iter().all(|l| l.contains(&format!("lb0 {}:", topology::CLIENT4))),
        "only the client's packets: {lines:?}"
    );
    assert_eq!(attached_program(&c), programs::BALANCER, "SIGTERM: tracing off at once");

    // kill -9: nobody swaps back, but the lease runs out and the controller does.
    let started = Instant::now();
    let mut killed = Trace::start(&c, &[]);
    // SAFETY: as above.
    unsafe { libc::kill(killed.pid(), libc::SIGKILL) };
    killed.wait(WAIT);
    // The lease runs from within Trace::start: only well inside it is the
    // traced program sure to be still there (a loaded machine may be slower).
    if started.elapsed() < lb_userspace::trace::LEASE / 2 {
        assert_eq!(attached_program(&c), programs::TRACED, "a killed trace leaves its program");
    }
    assert!(
        wait_until(WAIT, || attached_program(&c) == programs::BALANCER),
        "the controller did not switch the abandoned trace off; log:\n{}",
        c.log("xdplb")
    );
    assert!(c.log("xdplb").contains("stopped renewing its trace"), "{}", c.log("xdplb"));
    assert_eq!(c.requests(target(VIP4, 80), 4).len(), 4);

    // And the next trace runs as usual; unfiltered, it shows everything
    // that reaches XDP on lb0 (health checks' answers too).
    let mut again = Trace::start(&c, &["-c", "20"]);
    let _stream = RequestStream::start(&c.client, target(VIP4, 80), Duration::from_millis(100), 100);
    let (status, lines) = again.wait(WAIT);
    println!("xdplb trace -c 20 printed:\n{}", lines.join("\n"));
    assert!(status.success() && lines.len() == 20, "{lines:?} {}", again.stderr());
    assert!(lines.iter().all(|l| field(l, "action").is_some() && field(l, "reason").is_some()), "{lines:?}");
}
