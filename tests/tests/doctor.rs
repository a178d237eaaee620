//! `xdplb doctor` in network-namespace clusters: every finding provoked on a
//! real balancer or backend, its message and fix command checked, and the
//! fix command run to show that it makes the finding go away; a healthy
//! cluster gives none.

use std::{process::Command, time::Duration};

use tests::topology::{self, Cluster, ClusterSpec, Netns, Servers, VIP4, VIP6};

const WAIT: Duration = Duration::from_secs(30);

fn cluster(backends: usize) -> Cluster {
    Cluster::new(ClusterSpec { backends, servers: Servers::Builtin, bin_dir: topology::bin_dir(), nat: None })
}

/// One VIP per (name, address, forwarding), over backends 0..n, fast checks.
fn config(c: &Cluster, vips: &[(&str, &str, &str)], n: usize) -> std::path::PathBuf {
    let mut y = format!(
        "interface: lb0\nipip_source_v4: {}\nipip_source_v6: {}\nvips:\n",
        topology::IPIP_SOURCE_V4,
        topology::IPIP_SOURCE_V6
    );
    for (name, addr, fwd) in vips {
        y += &format!("  - name: {name}\n    address: {addr}\n    port: 80\n    forwarding: {fwd}\n    backends:\n");
        for i in 0..n {
            let b = if addr.contains(':') { topology::backend6(i) } else { topology::backend4(i) };
            y += &format!("      - address: {b}\n");
        }
        y += "    health_check: {type: tcp, interval: 200ms, timeout: 150ms, rise: 1, fall: 2}\n";
    }
    c.write_config("xdplb.yaml", &y)
}

/// A finding as `xdplb doctor` prints it.
#[derive(Debug, Default)]
struct Found {
    severity: String,
    check: String,
    what: String,
    why: String,
    fix: Vec<String>,
}

struct Report {
    code: i32,
    text: String,
    findings: Vec<Found>,
}

impl Report {
    fn get(&self, check: &str) -> &Found {
        self.findings
            .iter()
            .find(|f| f.check == check)
            .unwrap_or_else(|| panic!("no {check} finding (exit {}):\n{}", self.code, self.text))
    }

    fn has(&self, check: &str) -> bool {
        self.findings.iter().any(|f| f.check == check)
    }

    fn assert_clean(&self) {
        assert!(
            self.code == 0 && self.findings.is_empty() && self.text.contains("no problem found"),
            "expected no finding, got exit {}:\n{}",
            self.code,
            self.text
        );
    }
}

fn parse(text: &str) -> Vec<Found> {
    let mut out: Vec<Found> = Vec::new();
    let mut in_fix = false;
    for line in text.lines() {
        let head = line.strip_prefix("ERROR   ").map(|r| ("ERROR", r));
        if let Some((severity, rest)) = head.or_else(|| line.strip_prefix("WARNING ").map(|r| ("WARNING", r))) {
            let (check, what) = rest.split_once(": ").expect("CHECK: what");
            out.push(Found { severity: severity.into(), check: check.into(), what: what.into(), ..Found::default() });
            in_fix = false;
            continue;
        }
        let Some(last) = out.last_mut() else { continue };
        let t = line.trim_start();
        if let Some(why) = t.strip_prefix("why: ") {
            last.why = why.into();
        } else if let Some(fix) = t.strip_prefix("fix: ") {
            last.fix.push(fix.into());
            in_fix = true;
        } else if t.starts_with("or: ") {
            in_fix = false;
        } else if in_fix && line.starts_with("             ") {
            last.fix.push(t.into());
        } else {
            in_fix = false;
        }
    }
    out
}

fn report(mut cmd: Command) -> Report {
    let out = cmd.output().expect("xdplb doctor runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = out.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 1,
        "xdplb doctor failed (exit {code}): {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The exit status follows the errors.
    let findings = parse(&text);
    assert_eq!(code == 1, findings.iter().any(|f| f.severity == "ERROR"), "exit {code} for:\n{text}");
    Report { code, text, findings }
}

fn doctor(c: &Cluster, ns: &Netns, args: &[&str]) -> Report {
    let mut all = vec!["doctor"];
    all.extend_from_slice(args);
    report(c.xdplb_in(ns, &all))
}

/// Runs a fix command as an operator would: through sh, in `ns` (or on the
/// host), with xdplb on the PATH and this cluster's pin root.
fn apply(c: &Cluster, ns: Option<&Netns>, command: &str) {
    let path = format!("{}:{}", c.bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let mut cmd = match ns {
        Some(ns) => ns.command("sh"),
        None => Command::new("sh"),
    };
    let out = cmd
        .args(["-c", command])
        .env("PATH", path)
        .env("XDPLB_PIN_ROOT", &c.pin_root)
        .env("XDPLB_STATE_DIR", &c.state_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "fix `{command}` failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Runs every fix command of `f`.
fn apply_all(c: &Cluster, ns: Option<&Netns>, f: &Found) {
    assert!(!f.fix.is_empty(), "{} has no fix", f.check);
    for cmd in &f.fix {
        apply(c, ns, cmd);
    }
}

fn xdp_on(ns: &Netns, iface: &str) -> bool {
    let out = ns.ip(&format!("-j link show {iface}"));
    String::from_utf8_lossy(&out.stdout).contains("\"xdp\"")
}

#[test]
fn a_healthy_cluster_has_no_finding() {
    let c = cluster(2);
    c.enable_decap();
    for i in 0..2 {
        c.start_server(i, 80);
    }
    let path = config(&c, &[("web4", VIP4, "dsr"), ("web6", VIP6, "ipip"), ("web4i", topology::VIP4_2, "ipip")], 2);
    c.start_xdplb("xdplb", &path, &[]);
    for vip in ["web4", "web6", "web4i"] {
        c.wait_backend_states(vip, &["active", "active"], WAIT);
    }
    let config = path.to_str().unwrap();
    let lb = doctor(&c, &c.lb, &["--config", config]);
    lb.assert_clean();
    assert!(lb.text.contains("load balancer on lb0: no problem found"), "{}", lb.text);
    for b in &c.backends {
        let r = doctor(&c, b, &["--backend", "--config", config]);
        r.assert_clean();
        assert!(r.text.contains("backend for 198.18.100.1 dsr, 2001:db8:100::1 ipip, 198.18.100.2 ipip"), "{}", r.text);
        doctor(&c, b, &["--backend", "--vip", VIP4, "--vip", VIP6]).assert_clean();
    }
    // `xdplb run` found nothing to warn about at its start either.
    assert!(!c.log("xdplb").contains("doctor:"), "{}", c.log("xdplb"));
}

#[test]
fn backend_findings_and_their_fixes() {
    let c = cluster(1);
    let b = &c.backends[0];
    let path = config(&c, &[("web4", VIP4, "dsr"), ("web6", VIP6, "ipip")], 1);
    let args = ["--backend", "--config", path.to_str().unwrap()];

    // The cluster attached no decapsulation program.
    let r = doctor(&c, b, &args);
    let f = r.get("no-decap");
    assert_eq!(f.severity, "ERROR");
    assert!(f.what.contains("nothing decapsulates IP-in-IP here"), "{}", f.what);
    assert!(f.why.contains("IP protocol 41"), "{}", f.why);
    assert_eq!(f.fix, vec!["xdplb decap --iface b1"]);
    assert_eq!(r.code, 1);
    apply_all(&c, Some(b), f);
    assert!(xdp_on(b, "b1"));
    doctor(&c, b, &args).assert_clean();

    // No VIP on this host at all.
    b.ip(&format!("addr del {VIP4}/32 dev lo"));
    let r = doctor(&c, b, &args);
    let f = r.get("vip-missing");
    assert_eq!(f.what, format!("the VIP {VIP4} is not an address of this host"));
    assert!(f.why.contains("with only the MAC address rewritten"), "{}", f.why);
    assert_eq!(f.fix, vec![format!("ip addr add {VIP4}/32 dev lo")]);
    apply_all(&c, Some(b), f);
    doctor(&c, b, &args).assert_clean();

    // The VIP on the interface that answers ARP.
    b.ip(&format!("addr add {VIP4}/32 dev b1"));
    let r = doctor(&c, b, &args);
    let f = r.get("vip-not-on-loopback");
    assert_eq!(f.severity, "ERROR");
    assert_eq!(f.what, format!("the VIP {VIP4} is on b1, not on a loopback"));
    assert!(f.why.contains("answers ARP for the VIP on b1"), "{}", f.why);
    assert_eq!(f.fix, vec![format!("ip addr del {VIP4}/32 dev b1")]);
    apply_all(&c, Some(b), f);
    doctor(&c, b, &args).assert_clean();

    // ARP settings.
    b.sysctl("net.ipv4.conf.all.arp_ignore", "0");
    let r = doctor(&c, b, &args);
    let f = r.get("arp-ignore");
    assert_eq!(f.severity, "ERROR", "a DSR VIP");
    assert!(f.what.contains("net.ipv4.conf.all.arp_ignore=0, net.ipv4.conf.b1.arp_ignore=0"), "{}", f.what);
    assert_eq!(f.fix, vec!["sysctl -w net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.b1.arp_ignore=1"]);
    apply_all(&c, Some(b), f);
    doctor(&c, b, &args).assert_clean();

    b.sysctl("net.ipv4.conf.all.arp_announce", "1");
    let r = doctor(&c, b, &args);
    let f = r.get("arp-announce");
    assert!(f.what.contains("net.ipv4.conf.all.arp_announce=1"), "{}", f.what);
    assert_eq!(f.fix, vec!["sysctl -w net.ipv4.conf.all.arp_announce=2 net.ipv4.conf.b1.arp_announce=2"]);
    apply_all(&c, Some(b), f);
    doctor(&c, b, &args).assert_clean();

    // Strict reverse-path filtering: a warning, so doctor still exits 0.
    b.sysctl("net.ipv4.conf.b1.rp_filter", "1");
    let r = doctor(&c, b, &args);
    assert_eq!(r.code, 0);
    let f = r.get("rp-filter");
    assert_eq!(f.severity, "WARNING");
    assert!(f.what.contains("strict reverse-path filtering (rp_filter=1) on b1"), "{}", f.what);
    assert!(f.fix[0].starts_with("sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.b1.rp_filter=2"));
    apply_all(&c, Some(b), f);
    doctor(&c, b, &args).assert_clean();

    // An MTU without room for the outer IPv6 header.
    b.ip("link set b1 mtu 1500");
    let r = doctor(&c, b, &args);
    let f = r.get("ipip-mtu");
    assert!(f.what.contains("b1 has MTU 1500") && f.what.contains("arrives as 1540 bytes"), "{}", f.what);
    assert!(f.fix[0].starts_with("ip link set dev b1 mtu 1540"));
    assert!(r.text.contains("advmss 1400"), "the MSS advice: {}", r.text);
    apply_all(&c, Some(b), f);
    doctor(&c, b, &args).assert_clean();

    // An interface named that is not there.
    let r = doctor(&c, b, &["--backend", "--config", path.to_str().unwrap(), "--iface", "eth7"]);
    let f = r.get("interface-missing");
    assert_eq!(f.what, "interface eth7 does not exist in this network namespace");

    // The same checks from --vip: a DSR-only backend needs no decapsulation.
    // (The fix above set b1's own arp_ignore too: the larger of all and b1 applies.)
    b.sysctl("net.ipv4.conf.all.arp_ignore", "0");
    doctor(&c, b, &args).assert_clean();
    b.sysctl("net.ipv4.conf.b1.arp_ignore", "0");
    let r = doctor(&c, b, &["--backend", "--vip", VIP4, "--forwarding", "dsr"]);
    assert_eq!(r.findings.iter().map(|f| f.check.as_str()).collect::<Vec<_>>(), vec!["arp-ignore"]);
    let r = doctor(&c, b, &["--backend", "--vip", VIP6, "--forwarding", "ipip"]);
    r.assert_clean();
}

#[test]
fn balancer_findings_and_their_fixes() {
    let c = cluster(1);
    c.start_server(0, 80);
    let path = config(&c, &[("web4", VIP4, "ipip")], 1);
    c.enable_decap();
    let config = path.to_str().unwrap();
    let args = ["--config", config];
    let run = format!("xdplb run --config {config} --iface lb0");

    // Nothing has run yet: a warning.
    let r = doctor(&c, &c.lb, &args);
    let f = r.get("xdp-not-attached");
    assert_eq!((f.severity.as_str(), r.code), ("WARNING", 0));
    assert_eq!(f.what, "no XDP program is attached to lb0: xdplb run has not run here");
    assert_eq!(f.fix, vec![run.clone()]);
    assert_eq!(r.findings.len(), 1, "{}", r.text);

    // Transmit checksum offload on the balancer's veth.
    let ethtool = |on: &str| {
        let out = c.lb.command("ethtool").args(["-K", "lb0", "tx", on]).output().unwrap();
        assert!(out.status.success());
    };
    ethtool("on");
    let r = doctor(&c, &c.lb, &args);
    let f = r.get("veth-tx-checksum");
    assert_eq!(f.severity, "WARNING");
    assert!(f.what.contains("lb0 is a veth in driver mode and keeps transmit checksum offload on"), "{}", f.what);
    assert!(f.why.contains("CHECKSUM_PARTIAL"), "{}", f.why);
    assert_eq!(f.fix[0], "ethtool -K lb0 tx off");
    apply(&c, Some(&c.lb), &f.fix[0]);
    assert!(!doctor(&c, &c.lb, &args).has("veth-tx-checksum"));

    // The veth peer (the switch's port) without an XDP program.
    let out = c.xdplb_in(&c.switch, &["detach", "--iface", "lb"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = doctor(&c, &c.lb, &args);
    let f = r.get("veth-peer-xdp");
    assert_eq!((f.severity.as_str(), r.code), ("ERROR", 1));
    assert_eq!(
        f.what,
        format!("lb0 is a veth in driver mode and its peer lb in namespace {} runs no XDP program", c.switch.name)
    );
    assert_eq!(f.fix, vec![format!("ip netns exec {} xdplb pass --iface lb", c.switch.name)]);
    apply_all(&c, None, f);
    assert!(xdp_on(&c.switch, "lb"));
    assert!(!doctor(&c, &c.lb, &args).has("veth-peer-xdp"));

    // An MTU without room for the outer IPv4 header.
    c.lb.ip("link set lb0 mtu 1510");
    let r = doctor(&c, &c.lb, &args);
    let f = r.get("ipip-mtu");
    assert_eq!(f.severity, "ERROR");
    assert!(f.what.contains("lb0 has MTU 1510") && f.what.contains("grows to 1520 bytes"), "{}", f.what);
    assert!(f.why.contains("drop_too_big"), "{}", f.why);
    assert!(f.fix[0].starts_with("ip link set dev lb0 mtu 1520"));
    apply_all(&c, Some(&c.lb), f);
    assert!(!doctor(&c, &c.lb, &args).has("ipip-mtu"));

    // Down, and not there.
    c.lb.ip("link set lb0 down");
    let r = doctor(&c, &c.lb, &args);
    let f = r.get("interface-down");
    assert_eq!(f.what, "interface lb0 is down");
    assert_eq!(f.fix, vec!["ip link set dev lb0 up"]);
    apply_all(&c, Some(&c.lb), f);
    assert!(!doctor(&c, &c.lb, &args).has("interface-down"));
    c.switch.ip("link set lb down");
    let r = doctor(&c, &c.lb, &args);
    let f = r.get("interface-down");
    assert!(f.what.starts_with("interface lb0 is up but has no carrier"), "{}", f.what);
    assert_eq!(f.fix, vec![format!("ip netns exec {} ip link set dev lb up", c.switch.name)]);
    apply_all(&c, None, f);
    assert!(!doctor(&c, &c.lb, &args).has("interface-down"));
    let r = doctor(&c, &c.lb, &["--config", config, "--iface", "eth7"]);
    let f = r.get("interface-missing");
    assert_eq!(f.what, "interface eth7 does not exist in this network namespace");
    assert_eq!(f.fix, vec![run.clone()]);

    // `xdplb run` logs the same findings as it starts.
    ethtool("on");
    c.start_xdplb("xdplb", &path, &[]);
    c.wait_backend_states("web4", &["active"], WAIT);
    assert!(
        topology::wait_until(WAIT, || c
            .log("xdplb")
            .contains("doctor: veth-tx-checksum: lb0 is a veth in driver mode")),
        "{}",
        c.log("xdplb")
    );
    assert!(c.log("xdplb").contains("fix: ethtool -K lb0 tx off"), "{}", c.log("xdplb"));
    ethtool("off");

    // Running: nothing to say.
    doctor(&c, &c.lb, &args).assert_clean();

    // The controller killed: the program forwards on, but nothing checks health.
    c.kill("xdplb");
    let r = doctor(&c, &c.lb, &args);
    let f = r.get("controller-not-running");
    assert_eq!((f.severity.as_str(), r.code), ("WARNING", 0));
    assert_eq!(f.fix, vec![run.clone()]);

    // Detached after a controller ran: an error now.
    let out = c.xdplb_in(&c.lb, &["detach", "--iface", "lb0"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = doctor(&c, &c.lb, &args);
    let f = r.get("xdp-not-attached");
    assert_eq!((f.severity.as_str(), r.code), ("ERROR", 1));
    assert!(f.what.contains("the controller that served it has stopped"), "{}", f.what);

    // Another program in the way.
    let out = c.xdplb_in(&c.lb, &["decap", "--iface", "lb0"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = doctor(&c, &c.lb, &args);
    let f = r.get("xdp-other-program");
    assert!(f.what.starts_with("another XDP program is attached to lb0: xdplb_decap (id "), "{}", f.what);
    assert_eq!(f.fix, vec!["xdplb detach --iface lb0".to_string(), run]);
    apply(&c, Some(&c.lb), &f.fix[0]);
    assert!(!xdp_on(&c.lb, "lb0"));
}

#[test]
fn a_pin_root_that_dies_with_the_process() {
    let c = cluster(1);
    let args = ["doctor", "--iface", "lb0"];
    // `ip netns exec` mounts a fresh /sys: no BPF filesystem at /sys/fs/bpf.
    let r = report({
        let mut cmd = c.xdplb_in(&c.lb, &args);
        cmd.env("XDPLB_PIN_ROOT", "/sys/fs/bpf/xdplb");
        cmd
    });
    let f = r.get("pin-root");
    assert_eq!(f.severity, "ERROR");
    assert!(
        f.what.contains("needs a BPF filesystem at /sys/fs/bpf, and there is none in this mount namespace"),
        "{}",
        f.what
    );
    assert!(f.why.contains("vanish when the process exits"), "{}", f.why);
    assert_eq!(
        f.fix[0],
        "mkdir -p /run/xdplb-bpffs && mount -t bpf bpf /run/xdplb-bpffs   # on the host, not under `ip netns exec`"
    );
    assert!(f.fix[1].starts_with("export XDPLB_PIN_ROOT=/run/xdplb-bpffs/xdplb"));

    // One mounted there inside that namespace (through a shell, as a script would).
    let xdplb = c.bin_dir.join("xdplb");
    let script = format!("mount -t bpf bpf /sys/fs/bpf && {} doctor --iface lb0", xdplb.display());
    let r = report({
        let mut cmd = c.lb.command("sh");
        cmd.args(["-c", &script]).env("XDPLB_PIN_ROOT", "/sys/fs/bpf/xdplb");
        cmd
    });
    let f = r.get("pin-root");
    assert!(f.what.contains("exists only in this process's own mount namespace"), "{}", f.what);

    // What the finding warns of: a program attached that way is gone when xdplb exits.
    // (`xdplb pass` refuses such a pin root unless told --ephemeral.)
    let out = c
        .xdplb_in(&c.client, &["pass", "--iface", "cl0", "--ephemeral"])
        .env("XDPLB_PIN_ROOT", "/sys/fs/bpf/xdplb")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(topology::wait_until(WAIT, || !xdp_on(&c.client, "cl0")), "the program stayed attached");

    // A directory on no BPF filesystem at all.
    let plain = c.dir.join("plain");
    let r = report({
        let mut cmd = c.xdplb_in(&c.lb, &args);
        cmd.env("XDPLB_PIN_ROOT", &plain);
        cmd
    });
    let f = r.get("pin-root");
    assert!(f.what.ends_with("not on a BPF filesystem"), "{}", f.what);
    assert!(f.why.contains("refuse to start"), "{}", f.why);
    assert_eq!(f.fix, vec![format!("mkdir -p {0} && mount -t bpf bpf {0}", plain.display())]);

    // The cluster's own BPF filesystem, mounted on the host, is fine.
    assert!(!report(c.xdplb_in(&c.lb, &args)).has("pin-root"));
}
