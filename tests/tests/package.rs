//! The Debian package as an operator gets it: installed with dpkg into a
//! clean root, its files checked, and its unit's own command run the way
//! systemd runs it: the unit's capability bounding set and environment, a
//! NOTIFY_SOCKET, ExecReload for `systemctl reload`, SIGTERM for `systemctl stop`.
//!
//! The package is target/debian/xdplb_VERSION_ARCH.deb from
//! `cargo xtask deb --debug` (`cargo xtask test` builds it and passes its
//! path in XDPLB_TEST_DEB).

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use tests::topology::{NETNS_PREFIX, Netns, TestDir, unique_tag, wait_until};

const WAIT: Duration = Duration::from_secs(30);
/// The environment systemd gives a service (before the unit's Environment=).
const SYSTEMD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn deb() -> PathBuf {
    let deb = match std::env::var_os("XDPLB_TEST_DEB") {
        Some(p) => PathBuf::from(p),
        None => {
            let arch = text(&run(Command::new("dpkg").arg("--print-architecture")));
            let target = tests::topology::bin_dir().parent().unwrap().to_path_buf();
            target.join(format!("debian/xdplb_{}_{}.deb", env!("CARGO_PKG_VERSION"), arch.trim()))
        }
    };
    assert!(
        deb.exists(),
        "{} is missing: build it with `cargo xtask deb --debug` (cargo xtask test does)",
        deb.display()
    );
    deb
}

/// The package installed into DIR/root: a root with nothing but an empty
/// dpkg database, as a fresh machine's dpkg would see it.
struct Installed {
    root: PathBuf,
}

impl Installed {
    fn new(dir: &TestDir) -> Self {
        let root = dir.path.join("root");
        let admin = root.join("var/lib/dpkg");
        for d in ["info", "updates", "triggers"] {
            std::fs::create_dir_all(admin.join(d)).unwrap();
        }
        for f in ["status", "available"] {
            std::fs::write(admin.join(f), "").unwrap();
        }
        let installed = Self { root };
        // Maintainer scripts run on this machine (no chroot: the root has no
        // /bin/sh), with DPKG_ROOT set, so they must not touch this machine's
        // systemd. Dependencies (libc6) are this machine's.
        run(installed.dpkg(dir).args(["--force-depends", "-i"]).arg(deb()));
        installed
    }

    fn dpkg(&self, dir: &TestDir) -> Command {
        let mut c = Command::new("dpkg");
        c.arg(format!("--root={}", self.root.display()))
            .arg(format!("--log={}", dir.path.join("dpkg.log").display()))
            .arg("--force-script-chrootless");
        c
    }

    fn path(&self, installed: &str) -> PathBuf {
        self.root.join(installed.trim_start_matches('/'))
    }

    fn xdplb(&self) -> Command {
        Command::new(self.path("/usr/bin/xdplb"))
    }

    fn unit(&self) -> Unit {
        Unit(std::fs::read_to_string(self.path("/lib/systemd/system/xdplb.service")).expect("the unit is installed"))
    }

    /// `key: value` of the installed configuration (comments cut).
    fn config_value(&self, key: &str) -> Option<String> {
        let config = std::fs::read_to_string(self.path("/etc/xdplb/xdplb.yaml")).unwrap();
        config.lines().find_map(|l| {
            let value = l.strip_prefix(key)?.strip_prefix(':')?;
            Some(value.split('#').next().unwrap().trim().to_string())
        })
    }
}

/// The installed unit file.
struct Unit(String);

impl Unit {
    /// Every value of `key`, in order (systemd merges or overrides them).
    fn values(&self, key: &str) -> Vec<String> {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with(';'))
            .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(|v| v.trim().to_string())
            .collect()
    }

    fn value(&self, key: &str) -> String {
        let v = self.values(key);
        assert_eq!(v.len(), 1, "{key}= once in the unit: {v:?}");
        v[0].clone()
    }

    /// A capability list (CapabilityBoundingSet=, AmbientCapabilities=), as
    /// systemd merges its lines, in setpriv's spelling (`bpf` for CAP_BPF).
    fn capabilities(&self, key: &str) -> Vec<String> {
        let mut caps: Vec<String> = Vec::new();
        for v in self.values(key) {
            assert!(!v.starts_with('~'), "{key}=~ (all but) is not modelled by this test");
            if v.is_empty() {
                caps.clear();
            }
            caps.extend(
                v.split_whitespace().map(|c| {
                    c.strip_prefix("CAP_").unwrap_or_else(|| panic!("{key}: {c} is not CAP_...")).to_lowercase()
                }),
            );
        }
        caps
    }

    /// Environment= as KEY=VALUE pairs.
    fn environment(&self) -> Vec<(String, String)> {
        self.values("Environment")
            .iter()
            .flat_map(|v| {
                assert!(!v.contains('"') && !v.contains('\''), "quoted Environment= is not modelled: {v}");
                v.split_whitespace().map(|kv| {
                    let (k, v) = kv.split_once('=').expect("Environment=KEY=VALUE");
                    (k.to_string(), v.to_string())
                })
            })
            .collect()
    }
}

#[test]
fn the_package_installs_its_files_into_a_clean_root_and_purges_them() {
    let dir = TestDir::new(&unique_tag());
    let pkg = Installed::new(&dir);
    let status = text(&run(Command::new("dpkg-query")
        .arg(format!("--admindir={}", pkg.path("/var/lib/dpkg").display()))
        .args(["-W", "-f=${Status} ${Version}", "xdplb"])));
    assert_eq!(status, format!("install ok installed {}", env!("CARGO_PKG_VERSION")));
    // Every file as DEBIAN/md5sums lists it.
    run(pkg.dpkg(&dir).args(["--verify", "xdplb"]));

    let version = text(&run(pkg.xdplb().arg("--version")));
    assert_eq!(version.trim(), format!("xdplb {}", env!("CARGO_PKG_VERSION")));

    // The conffile: registered as one, and valid as shipped.
    let conffiles = std::fs::read_to_string(pkg.path("/var/lib/dpkg/info/xdplb.conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/xdplb/xdplb.yaml");
    let config = pkg.path("/etc/xdplb/xdplb.yaml");
    let check = text(&run(pkg.xdplb().arg("check").arg("--config").arg(&config)));
    assert!(check.contains("ok (1 VIPs, 3 backends)"), "{check}");
    for example in std::fs::read_dir(pkg.path("/usr/share/doc/xdplb/examples")).unwrap() {
        let path = example.unwrap().path();
        assert!(path.extension().is_some_and(|e| e == "yaml") || path.ends_with("keepalived"), "{}", path.display());
    }
    assert!(pkg.path("/usr/share/doc/xdplb/examples/cluster.yaml").exists());
    assert!(pkg.path("/usr/share/doc/xdplb/examples/keepalived/keepalived.conf").exists());

    for completion in [
        "/usr/share/bash-completion/completions/xdplb",
        "/usr/share/zsh/vendor-completions/_xdplb",
        "/usr/share/fish/vendor_completions.d/xdplb.fish",
    ] {
        let script = std::fs::read_to_string(pkg.path(completion)).unwrap();
        for sub in ["run", "check", "status", "detach"] {
            assert!(script.contains(sub), "{completion} does not complete `{sub}`");
        }
    }
    for page in ["xdplb", "xdplb-run", "xdplb-check", "xdplb-status"] {
        let path = pkg.path(&format!("/usr/share/man/man1/{page}.1.gz"));
        let roff = text(&run(Command::new("gzip").arg("-dc").arg(&path)));
        assert!(roff.contains(".TH"), "{} is not a manual page", path.display());
    }
    let dashboard = std::fs::read_to_string(pkg.path("/usr/share/xdplb/grafana-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    assert!(dashboard["panels"].as_array().is_some_and(|p| !p.is_empty()));

    let unit = pkg.unit();
    assert_eq!(unit.value("Type"), "notify");
    assert_eq!(unit.value("ExecReload"), "/usr/bin/xdplb reload");
    assert_eq!(unit.value("RuntimeDirectory"), "xdplb");
    assert_eq!(unit.value("LimitMEMLOCK"), "infinity");
    assert_eq!(unit.value("LimitNOFILE"), "65536");
    assert_eq!(unit.value("Restart"), "on-failure");
    // systemd-analyze verify works without systemd as PID 1. It checks that
    // the commands exist, so it reads a copy whose paths point into the
    // root; --man=no: Documentation= names pages of the root, not of this
    // machine. It prints problems (unknown keys...) as warnings: none allowed.
    let verify = dir.path.join("verify/xdplb.service");
    std::fs::create_dir_all(verify.parent().unwrap()).unwrap();
    std::fs::write(&verify, rooted(&unit.0, &pkg)).unwrap();
    let out = run(Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&verify));
    assert!(out.stderr.is_empty(), "systemd-analyze verify: {}", String::from_utf8_lossy(&out.stderr));

    // Purging removes every file, the conffile too; the maintainer scripts
    // see DPKG_ROOT and leave this machine alone.
    run(pkg.dpkg(&dir).args(["--purge", "xdplb"]));
    for gone in ["/usr/bin/xdplb", "/lib/systemd/system/xdplb.service", "/etc/xdplb/xdplb.yaml"] {
        assert!(!pkg.path(gone).exists(), "{gone} is still there after --purge");
    }
}

/// The unit text with the package's paths pointing into the root.
fn rooted(unit: &str, pkg: &Installed) -> String {
    unit.replace("/usr/bin/xdplb", &pkg.path("/usr/bin/xdplb").display().to_string())
        .replace("/etc/xdplb/", &pkg.path("/etc/xdplb/").display().to_string())
}

/// What systemd does with NOTIFY_SOCKET: a datagram socket it reads.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    /// Every message so far, for failure reports.
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind(path: PathBuf) -> Self {
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        Self { sock, path, seen: Vec::new() }
    }

    /// The next message, if one comes within 200 ms.
    fn next(&mut self) -> Option<String> {
        let mut buf = [0u8; 4096];
        let n = self.sock.recv(&mut buf).ok()?;
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        self.seen.push(message.clone());
        Some(message)
    }

    /// The next message with the line `field` (`READY=1`...); messages
    /// before it are skipped. Panics after WAIT or when the controller exits.
    fn expect(&mut self, field: &str, controller: &mut Controller) -> String {
        let start = Instant::now();
        while start.elapsed() < WAIT {
            if let Some(message) = self.next() {
                if message.lines().any(|l| l == field) {
                    return message;
                }
            } else if let Some(status) = controller.exited() {
                panic!("xdplb exited ({status}) before sending {field}; sent {:?}\n{}", self.seen, controller.log());
            }
        }
        panic!("no {field} within {WAIT:?}; sent {:?}\n{}", self.seen, controller.log());
    }
}

/// `xdplb run` as the unit runs it; killed on drop if still running.
struct Controller {
    child: Child,
    log: PathBuf,
    state_dir: PathBuf,
}

impl Controller {
    /// The unit's ExecStart in `ns`: its paths moved into the root, pins and
    /// state under the test's directory, the unit's capabilities and
    /// environment, NOTIFY_SOCKET.
    fn start(pkg: &Installed, dir: &TestDir, ns: &Netns, notify: &NotifySocket, log: &str) -> Self {
        let bounding = pkg.unit().capabilities("CapabilityBoundingSet");
        assert!(!bounding.is_empty(), "the unit restricts its capabilities");
        Self::start_with(pkg, dir, ns, notify, log, &bounding, &dir.bpffs().join("xdplb"))
    }

    /// `start` with another capability bounding set and pin root.
    fn start_with(
        pkg: &Installed,
        dir: &TestDir,
        ns: &Netns,
        notify: &NotifySocket,
        log: &str,
        bounding: &[String],
        pin_root: &Path,
    ) -> Self {
        let unit = pkg.unit();
        assert!(unit.values("User").is_empty(), "the unit runs as root (User= is not modelled by this test)");
        let exec_start = rooted(&unit.value("ExecStart"), pkg);
        assert!(!exec_start.contains(['"', '\'', '$', '%']), "a plain ExecStart: {exec_start}");
        let ambient = unit.capabilities("AmbientCapabilities");
        let caps = |set: &[String]| -> String {
            std::iter::once("-all".to_string()).chain(set.iter().map(|c| format!("+{c}"))).collect::<Vec<_>>().join(",")
        };
        // RuntimeDirectory=: systemd creates it before the start.
        let state_dir = dir.path.join("run").join(unit.value("RuntimeDirectory"));
        std::fs::create_dir_all(&state_dir).unwrap();
        let log = dir.path.join(log);
        let mut cmd = ns.command("setpriv");
        // As systemd runs a root service: the bounding set limits what root
        // gets on exec; the inheritable and ambient sets hold only
        // AmbientCapabilities=. (LimitNOFILE=/LimitMEMLOCK= are not applied:
        // raising a hard limit needs CAP_SYS_RESOURCE, which this machine's
        // bounding set lacks; the controller runs under the lower limits.)
        cmd.arg(format!("--bounding-set={}", caps(bounding)))
            .arg(format!("--inh-caps={}", caps(&ambient)))
            .arg(format!("--ambient-caps={}", caps(&ambient)))
            .arg("--")
            .args(exec_start.split_whitespace())
            .arg("--pin-root")
            .arg(pin_root)
            .arg("--state-dir")
            .arg(&state_dir)
            .env_clear()
            .env("PATH", SYSTEMD_PATH)
            .env("NOTIFY_SOCKET", &notify.path)
            // A verifier log (a start that fails) stays in the test's directory.
            .env("TMPDIR", &dir.path)
            .envs(unit.environment())
            .stdin(Stdio::null());
        let file = std::fs::File::create(&log).unwrap();
        cmd.stdout(file.try_clone().unwrap()).stderr(file);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Self { child, log, state_dir }
    }

    /// The unit's ExecReload, run as systemd would (in the namespace, with the
    /// controller's state directory); it returns once the reload is decided.
    fn exec_reload(&self, pkg: &Installed, ns: &Netns) -> std::process::Output {
        let exec_reload = rooted(&pkg.unit().value("ExecReload"), pkg);
        ns.command("env")
            .args(exec_reload.split_whitespace())
            .arg("--state-dir")
            .arg(&self.state_dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {exec_reload}: {e}"))
    }

    /// The pid systemd would see: `ip netns exec` and setpriv exec, so it is xdplb's own.
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
        assert_eq!(unsafe { libc::kill(self.pid() as i32, signal) }, 0, "kill {}", self.pid());
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let mut status = None;
        wait_until(WAIT, || {
            status = self.exited();
            status.is_some()
        });
        status.unwrap_or_else(|| panic!("xdplb did not exit within {WAIT:?}\n{}", self.log()))
    }

    fn log(&self) -> String {
        format!("log of xdplb:\n{}", std::fs::read_to_string(&self.log).unwrap_or_default())
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

fn field<'a>(message: &'a str, key: &str) -> &'a str {
    message
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in {message:?}"))
}

/// `GET /metrics` inside `ns`.
fn metrics(ns: &Netns, listen: String) -> String {
    ns.enter(move || {
        let mut s = TcpStream::connect(&listen).unwrap_or_else(|e| panic!("metrics on {listen}: {e}"));
        // Bounded: a server that kept the connection open would otherwise hang the test.
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: xdplb\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap_or_else(|e| panic!("reading /metrics on {listen}: {e}"));
        out
    })
}

#[test]
fn the_unit_starts_reloads_restarts_and_stops_with_only_its_capabilities() {
    let tag = unique_tag();
    let dir = TestDir::new(&tag);
    let pkg = Installed::new(&dir);
    // A machine with the interface the packaged configuration names. No
    // traffic is sent, so the peer needs no XDP program.
    let iface = pkg.config_value("interface").expect("the packaged configuration names an interface");
    let ns = Netns::create(format!("{NETNS_PREFIX}{tag}-pkg"));
    ns.ip(&format!("link add {iface} type veth peer name peer0"));
    ns.ip(&format!("addr add 198.18.0.2/24 dev {iface}"));
    ns.ip(&format!("link set {iface} up"));
    ns.ip("link set peer0 up");
    let mut notify = NotifySocket::bind(dir.path.join("notify.sock"));

    // Every capability the unit grants is needed: without any one of them
    // xdplb does not start (each try on pins of its own).
    let bounding = pkg.unit().capabilities("CapabilityBoundingSet");
    for missing in &bounding {
        let fewer: Vec<String> = bounding.iter().filter(|c| *c != missing).cloned().collect();
        let pins = dir.bpffs().join(format!("without-{missing}"));
        let log = format!("xdplb-without-{missing}.log");
        let mut attempt = Controller::start_with(&pkg, &dir, &ns, &notify, &log, &fewer, &pins);
        let start = Instant::now();
        let exited = loop {
            if let Some(status) = attempt.exited() {
                break status;
            }
            let ready = notify.next().is_some_and(|m| m.lines().any(|l| l == "READY=1"));
            assert!(!ready, "xdplb starts with only {fewer:?}: the unit's {bounding:?} is not minimal");
            assert!(start.elapsed() < WAIT, "xdplb without CAP_{} neither failed nor started", missing.to_uppercase());
        };
        assert!(!exited.success(), "{}", attempt.log());
    }
    let link = text(&ns.ip(&format!("link show {iface}")));
    assert!(!link.contains("prog/xdp"), "a failed start left a program attached: {link}");

    let mut xdplb = Controller::start(&pkg, &dir, &ns, &notify, "xdplb.log");
    let ready = notify.expect("READY=1", &mut xdplb);
    assert_eq!(
        field(&ready, "MAINPID"),
        xdplb.pid().to_string(),
        "systemd accepts only its main pid (NotifyAccess=main)"
    );
    assert!(field(&ready, "STATUS").starts_with("serving 1 VIPs, 3 backends"), "{ready}");
    // READY=1 means attached, with the maps filled.
    let link = text(&ns.ip(&format!("link show {iface}")));
    assert!(link.contains("prog/xdp") && link.contains("xdplb_balancer"), "no XDP program on {iface}: {link}");
    let status_file = dir.path.join(format!("run/xdplb/{iface}.json"));
    assert!(wait_until(WAIT, || status_file.exists()), "no status file {}", status_file.display());
    let status: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&status_file).unwrap()).unwrap();
    assert_eq!(status["pid"], xdplb.pid());
    // The metrics the packaged dashboard queries are the ones this binary serves.
    let listen = pkg.config_value("metrics_listen").expect("the packaged configuration serves metrics");
    let served = metrics(&ns, listen);
    let dashboard = std::fs::read_to_string(pkg.path("/usr/share/xdplb/grafana-dashboard.json")).unwrap();
    let mut queried: Vec<&str> = dashboard
        .match_indices("xdplb_")
        .map(|(i, _)| {
            let end = dashboard[i..]
                .find(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                .map_or(dashboard.len(), |e| i + e);
            &dashboard[i..end]
        })
        .collect();
    queried.sort();
    queried.dedup();
    assert!(queried.len() >= 10, "{queried:?}");
    for name in queried {
        assert!(
            served.contains(&format!("# TYPE {name} ")),
            "the dashboard queries {name}, /metrics has no such family"
        );
    }

    // `systemctl reload`: ExecReload (`xdplb reload`) asks over the runtime socket
    // and waits for the verdict; xdplb also says RELOADING=1, then READY=1.
    let before = monotonic_usec();
    let out = xdplb.exec_reload(&pkg, &ns);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ExecReload failed: {said}{}", String::from_utf8_lossy(&out.stderr));
    assert!(said.starts_with("eth0: reload applied, generation 2\n"), "{said}");
    let reloading = notify.expect("RELOADING=1", &mut xdplb);
    let after = monotonic_usec();
    let stamp: u64 = field(&reloading, "MONOTONIC_USEC").parse().unwrap();
    assert!((before..=after).contains(&stamp), "MONOTONIC_USEC={stamp} is not CLOCK_MONOTONIC ({before}..{after})");
    let ready = notify.expect("READY=1", &mut xdplb);
    assert!(field(&ready, "STATUS").contains("generation 2"), "{ready}");
    assert!(
        wait_until(WAIT, || std::fs::read_to_string(&xdplb.log)
            .unwrap_or_default()
            .contains("reload (xdplb reload) applied")),
        "{}",
        xdplb.log()
    );

    // `systemctl stop`: SIGTERM, STOPPING=1, a clean exit; the dataplane stays.
    xdplb.signal(libc::SIGTERM);
    notify.expect("STOPPING=1", &mut xdplb);
    let status = xdplb.wait_exit();
    assert!(status.success(), "exit on SIGTERM: {status}\n{}", xdplb.log());
    assert!(text(&ns.ip(&format!("link show {iface}"))).contains("prog/xdp"), "the dataplane keeps forwarding");

    // `systemctl restart` (or Restart=on-failure): the new process adopts the
    // pinned dataplane with the same capabilities.
    let mut again = Controller::start(&pkg, &dir, &ns, &notify, "xdplb-again.log");
    notify.expect("READY=1", &mut again);
    assert!(std::fs::read_to_string(&again.log).unwrap().contains("adopting the running dataplane"), "{}", again.log());
    again.signal(libc::SIGTERM);
    notify.expect("STOPPING=1", &mut again);
    assert!(again.wait_exit().success(), "{}", again.log());
    // The journal gets plain text: the unit's NO_COLOR=1 is honoured.
    assert!(!again.log().contains('\u{1b}'), "{}", again.log());
}
