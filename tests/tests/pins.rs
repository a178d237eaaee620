//! The pin directory end to end: `xdplb run` through `ip netns exec` with the
//! default pin root, one controller per interface, refusing pinned maps of
//! another layout, `xdplb detach` of a two-armed NAT cluster, the status
//! file never written through a symlink, and one BPF filesystem mount when
//! several controllers mount at once.

use std::{path::Path, process::Output, time::Duration};

use tests::topology::{self, Cluster, ClusterSpec, NatArms, Servers, VIP4};

const WAIT: Duration = Duration::from_secs(30);

fn dsr_cluster() -> Cluster {
    let c =
        Cluster::new(ClusterSpec { backends: 1, servers: Servers::Builtin, bin_dir: topology::bin_dir(), nat: None });
    c.start_server(0, 80);
    c
}

fn dsr_config(c: &Cluster) -> std::path::PathBuf {
    let yaml = format!(
        "interface: lb0\nvips:\n  - name: web4\n    address: {VIP4}\n    port: 80\n    forwarding: dsr\n    backends:\n      \
         - address: {}\n    health_check: {{type: tcp, interval: 200ms, timeout: 150ms, rise: 1, fall: 2}}\n",
        c.backend4(0)
    );
    c.write_config("xdplb.yaml", &yaml)
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// `xdplb ARGS` in the balancer's namespace with the cluster's pin root; its
/// output once it exits (bounded: a `run` that does not exit is a failure).
fn xdplb(c: &Cluster, args: &[&str]) -> Output {
    let mut cmd = c.xdplb_in(&c.lb, args);
    run_bounded(&mut cmd)
}

fn run_bounded(cmd: &mut std::process::Command) -> Output {
    cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    let pid = child.id();
    let out = std::thread::spawn(move || child.wait_with_output().unwrap());
    if !topology::wait_until(WAIT, || out.is_finished()) {
        // SAFETY: signalling the child this test started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        panic!("xdplb did not exit within {WAIT:?}");
    }
    out.join().unwrap()
}

#[test]
fn the_default_pin_root_under_ip_netns_exec_is_refused_with_the_fix_or_accepted_as_ephemeral() {
    let c = dsr_cluster();
    let config = dsr_config(&c);
    let config = config.to_str().unwrap();
    // Exactly what a newcomer types: no --pin-root, no XDPLB_PIN_ROOT.
    let newcomer = |extra: &[&str]| {
        let mut cmd = c.lb.command(c.bin_dir.join("xdplb"));
        cmd.env_remove("XDPLB_PIN_ROOT").env("XDPLB_STATE_DIR", &c.state_dir);
        cmd.args(["run", "--config", config, "--iface", "lb0"]).args(extra);
        cmd
    };
    let out = run_bounded(&mut newcomer(&[]));
    let said = text(&out);
    assert!(!out.status.success(), "xdplb run started with pins that die with it:\n{said}");
    for needed in [
        "the pin root /sys/fs/bpf/xdplb needs a BPF filesystem at /sys/fs/bpf",
        "mkdir -p /run/xdplb-bpffs && mount -t bpf bpf /run/xdplb-bpffs",
        "export XDPLB_PIN_ROOT=/run/xdplb-bpffs/xdplb",
        "--ephemeral",
    ] {
        assert!(said.contains(needed), "the refusal does not say {needed:?}:\n{said}");
    }
    assert!(!said.contains("mounted a BPF filesystem"), "{said}");
    let lb0 = String::from_utf8_lossy(&c.lb.ip("link show lb0").stdout).to_string();
    assert!(!lb0.contains("prog/xdp"), "nothing was attached: {lb0}");

    // Accepted as ephemeral: it serves, and says the dataplane dies with it.
    let log = std::fs::File::create(c.dir.join("ephemeral.log")).unwrap();
    let mut cmd = newcomer(&["--ephemeral"]);
    cmd.env("RUST_LOG", "info").stdin(std::process::Stdio::null()).stderr(log);
    let _ephemeral = Killed(cmd.spawn().unwrap());
    c.wait_backend_states("web4", &["active"], WAIT);
    assert_eq!(c.requests(topology::target(VIP4, 80), 5).len(), 5);
    let said = std::fs::read_to_string(c.dir.join("ephemeral.log")).unwrap();
    assert!(
        said.contains("--ephemeral: mounted a BPF filesystem at /sys/fs/bpf in this process's own mount namespace"),
        "{said}"
    );
}

/// A child process killed (and reaped) on drop, also when the test fails.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_second_controller_on_the_interface_is_refused_naming_the_first() {
    let c = dsr_cluster();
    let config = dsr_config(&c);
    c.start_xdplb("xdplb", &config, &[]);
    c.wait_backend_states("web4", &["active"], WAIT);
    let first = c.pid("xdplb").unwrap();
    // Another state dir: only the pin directory's lock can tell.
    let mut cmd = c.xdplb_in(&c.lb, &["run", "--config", config.to_str().unwrap(), "--iface", "lb0"]);
    cmd.env("XDPLB_STATE_DIR", c.dir.join("other-run"));
    let out = run_bounded(&mut cmd);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains(&format!("another xdplb controller serves lb0: pid {first} holds the lock")), "{said}");
    // The first one still serves.
    assert_eq!(c.requests(topology::target(VIP4, 80), 5).len(), 5);
}

/// Starts a controller, waits for it to serve, kills it with SIGKILL: its
/// dataplane stays pinned in PIN_ROOT/lb0.
fn orphaned_dataplane() -> (Cluster, std::path::PathBuf) {
    let c = dsr_cluster();
    let config = dsr_config(&c);
    c.start_xdplb("xdplb", &config, &[]);
    c.wait_backend_states("web4", &["active"], WAIT);
    c.kill("xdplb");
    (c, config)
}

fn bpftool(args: &[&str]) {
    let out = std::process::Command::new("bpftool").args(args).output().unwrap();
    assert!(out.status.success(), "bpftool {args:?}: {}", text(&out));
}

fn restart_refused(c: &Cluster, config: &Path, needed: &str) {
    let out = xdplb(c, &["run", "--config", config.to_str().unwrap(), "--iface", "lb0"]);
    let said = text(&out);
    assert!(!out.status.success(), "adopted what it should refuse:\n{said}");
    for needed in [needed, "run `xdplb detach --iface lb0`"] {
        assert!(said.contains(needed), "the refusal does not say {needed:?}:\n{said}");
    }
    // `xdplb status` without a controller reads the maps too: it refuses them alike.
    let out = xdplb(c, &["status", "--iface", "lb0"]);
    assert!(!out.status.success() && text(&out).contains(needed), "xdplb status: {}", text(&out));
    // The way out the message gives works.
    let out = xdplb(c, &["detach", "--iface", "lb0"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!c.pin_root.join("lb0").exists(), "detach left pins");
}

#[test]
fn a_pinned_map_of_another_size_is_refused_naming_the_map() {
    let (c, config) = orphaned_dataplane();
    let flows = c.pin_root.join("lb0/FLOWS");
    std::fs::remove_file(&flows).unwrap();
    // As an older build with an 8-byte flow value would have left it.
    let key = std::mem::size_of::<lb_common::maps::FlowKey>().to_string();
    let entries = lb_common::maps::DEFAULT_CONNTRACK_SIZE.to_string();
    let path = flows.to_str().unwrap();
    bpftool(&[
        "map", "create", path, "type", "lru_hash", "key", &key, "value", "8", "entries", &entries, "name", "FLOWS",
    ]);
    restart_refused(&c, &config, "map FLOWS has value size 8 (this xdplb expects");
}

#[test]
fn another_layout_version_is_refused() {
    let (c, config) = orphaned_dataplane();
    let abi = c.pin_root.join("lb0/ABI");
    std::fs::remove_file(&abi).unwrap();
    let path = abi.to_str().unwrap();
    bpftool(&["map", "create", path, "type", "array", "key", "4", "value", "4", "entries", "1", "name", "xdplb_abi"]);
    let next = (lb_common::maps::MAPS_ABI + 1).to_le_bytes().map(|b| b.to_string());
    let mut update = vec!["map", "update", "pinned", path, "key", "0", "0", "0", "0", "value"];
    update.extend(next.iter().map(String::as_str));
    bpftool(&update);
    let needed = format!(
        "map ABI says map layout version {}, this xdplb uses version {}",
        lb_common::maps::MAPS_ABI + 1,
        lb_common::maps::MAPS_ABI
    );
    restart_refused(&c, &config, &needed);
}

#[test]
fn a_partial_set_of_pins_is_refused() {
    let (c, config) = orphaned_dataplane();
    std::fs::remove_file(c.pin_root.join("lb0/REASONS")).unwrap();
    restart_refused(&c, &config, "it holds only part of a dataplane (map REASONS missing");
}

#[test]
fn a_restart_adopts_what_a_killed_controller_left() {
    let (c, config) = orphaned_dataplane();
    // No controller: the pinned program still forwards.
    assert_eq!(c.requests(topology::target(VIP4, 80), 5).len(), 5);
    c.start_xdplb("again", &config, &[]);
    let adopted = topology::wait_until(WAIT, || c.log("again").contains("adopting the running dataplane"));
    assert!(adopted, "{}", c.log("again"));
    c.wait_backend_states("web4", &["active"], WAIT);
    assert!(c.log("again").contains("adopting the running dataplane"), "{}", c.log("again"));
}

#[test]
fn detach_removes_the_backend_side_link_of_two_armed_nat() {
    let c = Cluster::new(ClusterSpec {
        backends: 1,
        servers: Servers::Builtin,
        bin_dir: topology::bin_dir(),
        nat: Some(NatArms::TwoArmed),
    });
    c.start_server(0, 8080);
    let yaml = format!(
        "interface: lb0\nbackend_interface: lb1\nvips:\n  - name: web4\n    address: {VIP4}\n    port: 80\n    \
         forwarding: nat\n    backends:\n      - address: {}\n        port: 8080\n    \
         health_check: {{type: tcp, port: 8080, interval: 200ms, timeout: 150ms, rise: 1, fall: 2}}\n",
        c.backend4(0)
    );
    let config = c.write_config("xdplb.yaml", &yaml);
    c.start_xdplb("xdplb", &config, &[]);
    c.wait_backend_states("web4", &["active"], WAIT);
    let has_xdp =
        |iface: &str| String::from_utf8_lossy(&c.lb.ip(&format!("link show {iface}")).stdout).contains("prog/xdp");
    assert!(has_xdp("lb0") && has_xdp("lb1"), "both arms carry the program");
    c.kill("xdplb");
    let out = xdplb(&c, &["detach", "--iface", "lb0"]);
    assert!(out.status.success(), "{}", text(&out));
    // The kernel releases a link once its last holder is gone, not at once.
    assert!(
        topology::wait_until(WAIT, || !has_xdp("lb0")),
        "lb0 still has an XDP program: {}",
        String::from_utf8_lossy(&c.lb.ip("-d link show lb0").stdout)
    );
    assert!(topology::wait_until(WAIT, || !has_xdp("lb1")), "the backend side lb1 still has an XDP program");
    assert!(!c.pin_root.join("lb0").exists(), "detach left pins: {:?}", std::fs::read_dir(c.pin_root.join("lb0")));
}

#[test]
fn the_status_file_is_never_written_through_a_symlink() {
    let c = dsr_cluster();
    let config = dsr_config(&c);
    std::fs::create_dir_all(&c.state_dir).unwrap();
    let victim = c.dir.join("victim");
    std::fs::write(&victim, "precious").unwrap();
    // Where a writer that follows symlinks would write: the file. Its temporary,
    // `.lb0.json.PID.tmp`, carries the controller's pid, unknown here:
    // `status::tests` plants a symlink at that name and calls the writer.
    std::os::unix::fs::symlink(&victim, c.state_dir.join("lb0.json")).unwrap();
    c.start_xdplb("xdplb", &config, &[]);
    c.wait_backend_states("web4", &["active"], WAIT);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    let meta = std::fs::symlink_metadata(c.state_dir.join("lb0.json")).unwrap();
    assert!(meta.file_type().is_file(), "the status replaced the symlink with a file of its own");
}

/// Controllers starting together each find no BPF filesystem and mount one:
/// without a lock around the check and the mount, the later mounts stack on
/// the first and hide the pins made under it.
#[test]
fn controllers_starting_together_mount_one_bpf_filesystem() {
    let dir = std::env::temp_dir().join(format!("xdplb-mount-once-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mounts_at = |dir: &Path| {
        let want = dir.to_str().unwrap().to_string();
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        info.lines().filter(|l| l.split(' ').nth(4) == Some(want.as_str())).count()
    };
    let unmount_all = |dir: &Path| {
        let c = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
        // SAFETY: `c` is a NUL-terminated path alive for the call.
        while unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {}
    };
    for round in 0..20 {
        let start = std::sync::Arc::new(std::sync::Barrier::new(4));
        let racers: Vec<_> = (0..4)
            .map(|_| {
                let (start, dir) = (start.clone(), dir.clone());
                std::thread::spawn(move || {
                    start.wait();
                    lb_userspace::pins::mount_bpffs_once(&dir).unwrap()
                })
            })
            .collect();
        let mounted = racers.into_iter().map(|r| r.join().unwrap()).filter(|m| *m).count();
        let stacked = mounts_at(&dir);
        unmount_all(&dir);
        assert_eq!((mounted, stacked), (1, 1), "round {round}: mounts made, mounts at {}", dir.display());
    }
    std::fs::remove_dir_all(&dir).ok();
}
