//! Will the pin root outlive the process? Pinned maps and the pinned XDP
//! link live on a BPF filesystem; if that filesystem is only mounted in a
//! mount namespace that dies with the process, so do the pins, and the XDP
//! program is detached when the process exits.
//!
//! `ip netns exec` runs its command in a new mount namespace with a fresh
//! /sys: /sys/fs/bpf there is an empty sysfs directory, and a BPF
//! filesystem mounted on it is gone when the command exits. /proc/1 cannot
//! be read on every machine, so the test here does not compare with PID 1:
//! it asks whether this process's mount namespace is held by this process
//! tree alone (no process outside it shares the namespace), and if so,
//! whether the filesystem under the pin root is also mounted in the
//! namespace this process was started from (the same `major:minor`).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use super::{findings::Finding, system::Mount};

/// One process, as /proc shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    pub ppid: u32,
    /// `readlink /proc/PID/ns/mnt`; None when it cannot be read.
    pub mnt_ns: Option<String>,
}

/// Who holds this process's mount namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NsOwner {
    /// Processes outside this process tree share it (the host's namespace,
    /// a container's): it outlives this process.
    Shared,
    /// It was created for this process tree (`ip netns exec`, `unshare -m`)
    /// and only this tree is in it: it is gone when the tree exits. `outer`
    /// is the nearest ancestor in another mount namespace.
    ThisProcessTree { outer: u32 },
    /// An ancestor's namespace cannot be read.
    Unknown,
}

/// Decides who holds the mount namespace of process `me`.
pub fn ns_owner(procs: &[Process], me: u32) -> NsOwner {
    let by_pid: HashMap<u32, &Process> = procs.iter().map(|p| (p.pid, p)).collect();
    let Some(own) = by_pid.get(&me).and_then(|p| p.mnt_ns.as_deref()) else { return NsOwner::Unknown };
    // The topmost ancestor in this namespace, and the one above it.
    let mut top = me;
    let outer = loop {
        let parent = by_pid[&top].ppid;
        if parent == 0 {
            // The first process of this PID namespace is in it: not ours alone.
            return NsOwner::Shared;
        }
        match by_pid.get(&parent).map(|p| p.mnt_ns.as_deref()) {
            Some(Some(ns)) if ns == own => top = parent,
            Some(Some(_)) => break parent,
            _ => return NsOwner::Unknown,
        }
    };
    let descends_from_top = |mut pid: u32| {
        for _ in 0..procs.len() + 1 {
            if pid == top {
                return true;
            }
            match by_pid.get(&pid) {
                Some(p) if p.ppid != 0 => pid = p.ppid,
                _ => return false,
            }
        }
        false
    };
    let alone = procs.iter().filter(|p| p.mnt_ns.as_deref() == Some(own)).all(|p| descends_from_top(p.pid));
    if alone { NsOwner::ThisProcessTree { outer } } else { NsOwner::Shared }
}

/// What decides whether pins under `pin_root` survive the process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinFacts {
    pub pin_root: PathBuf,
    /// The mount holding the pin root in this mount namespace.
    pub mount: Option<Mount>,
    pub owner: NsOwner,
    /// The mounts of the namespace this process was started from, when the
    /// namespace is this process tree's own and they can be read.
    pub outer_mounts: Option<Vec<Mount>>,
}

/// Where to mount a BPF filesystem that outlives `ip netns exec`.
const HOST_BPFFS: &str = "/run/xdplb-bpffs";

/// A finding if the pins would not outlive the process. At start-up
/// (`starting`), a pin root that is no BPF filesystem at all is left to
/// `xdplb run`, which refuses it with its own message.
pub fn decide(p: &PinFacts, starting: bool) -> Option<Finding> {
    let m = p.mount.as_ref()?;
    let root = p.pin_root.display();
    let private = matches!(p.owner, NsOwner::ThisProcessTree { .. });
    let gone = "this mount namespace was created for this process alone, as `ip netns exec` and `unshare -m` \
                create them, and its mounts vanish when the process exits: the pinned XDP link and maps go with \
                them, so the XDP program is detached (the balancer or decapsulation stops at once) and a restart \
                cannot adopt the flows";
    let host_fix = |f: Finding| {
        f.fix(format!(
            "mkdir -p {HOST_BPFFS} && mount -t bpf bpf {HOST_BPFFS}   # on the host, not under `ip netns exec`"
        ))
        .fix(format!(
            "export XDPLB_PIN_ROOT={HOST_BPFFS}/xdplb   # or --pin-root {HOST_BPFFS}/xdplb on every xdplb command"
        ))
    };
    if m.fstype == "bpf" {
        if !private {
            return None;
        }
        let outside = match &p.outer_mounts {
            Some(outer) => outer.iter().any(|o| o.fstype == "bpf" && o.dev == m.dev),
            // Cannot look outside: a propagating mount has a copy elsewhere.
            None => m.propagates(),
        };
        if outside {
            return None;
        }
        return Some(host_fix(Finding::error(
            "pin-root",
            format!(
                "the pin root {root} is on a BPF filesystem (mounted at {}) that exists only in this process's own mount namespace",
                m.mount_point.display()
            ),
            gone,
        )));
    }
    let sys_bpf = Path::new("/sys/fs/bpf");
    if p.pin_root.starts_with(sys_bpf) {
        if !private {
            // `xdplb run` mounts one at /sys/fs/bpf, and it stays.
            return None;
        }
        return Some(host_fix(Finding::error(
            "pin-root",
            format!(
                "the pin root {root} needs a BPF filesystem at /sys/fs/bpf, and there is none in this mount namespace \
                 (/sys/fs/bpf is on {}, as under `ip netns exec`, which mounts a fresh /sys)",
                m.fstype
            ),
            format!("xdplb would mount one there, but {gone}"),
        )));
    }
    if starting {
        return None;
    }
    Some(
        Finding::error(
            "pin-root",
            format!("the pin root {root} is on a filesystem of type {}, not on a BPF filesystem", m.fstype),
            "maps and links can only be pinned on a BPF filesystem: `xdplb run`, `xdplb decap` and `xdplb pass` \
             refuse to start",
        )
        .fix(format!("mkdir -p {root} && mount -t bpf bpf {root}")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::system::{mount_of, parse_mountinfo};

    fn p(pid: u32, ppid: u32, ns: &str) -> Process {
        Process { pid, ppid, mnt_ns: (!ns.is_empty()).then(|| format!("mnt:[{ns}]")) }
    }

    #[test]
    fn the_host_namespace_is_shared() {
        // init(1) → sshd(10) → bash(20) → xdplb(30), all in one namespace.
        let procs = [p(1, 0, "1"), p(10, 1, "1"), p(20, 10, "1"), p(30, 20, "1")];
        assert_eq!(ns_owner(&procs, 30), NsOwner::Shared);
    }

    #[test]
    fn ip_netns_exec_makes_a_namespace_of_its_own() {
        // bash(20) ran `ip netns exec NS xdplb`: ip unshared and exec'd into xdplb(30).
        let procs = [p(1, 0, "1"), p(20, 1, "1"), p(30, 20, "2"), p(40, 1, "1")];
        assert_eq!(ns_owner(&procs, 30), NsOwner::ThisProcessTree { outer: 20 });
        // A shell in between (`ip netns exec NS sh -c 'xdplb ...'`) is still this tree.
        let procs = [p(1, 0, "1"), p(20, 1, "1"), p(25, 20, "2"), p(30, 25, "2"), p(31, 30, "2")];
        assert_eq!(ns_owner(&procs, 30), NsOwner::ThisProcessTree { outer: 20 });
    }

    #[test]
    fn a_namespace_others_share_outlives_the_process() {
        // A container: its init(5) and a sibling(6) hold the namespace with xdplb(7).
        let procs = [p(1, 0, "1"), p(4, 1, "1"), p(5, 4, "2"), p(6, 5, "2"), p(7, 5, "2"), p(8, 1, "2")];
        assert_eq!(ns_owner(&procs, 7), NsOwner::Shared, "process 8 is outside xdplb's tree");
    }

    #[test]
    fn unreadable_ancestors_leave_it_open() {
        // PID 1 cannot be read here.
        let procs = [p(1, 0, ""), p(20, 1, "1"), p(30, 20, "1")];
        assert_eq!(ns_owner(&procs, 30), NsOwner::Unknown);
        assert_eq!(ns_owner(&procs, 99), NsOwner::Unknown);
    }

    fn facts(pin_root: &str, mountinfo: &str, owner: NsOwner, outer: Option<&str>) -> PinFacts {
        let mounts = parse_mountinfo(mountinfo);
        PinFacts {
            pin_root: pin_root.into(),
            mount: mount_of(&mounts, Path::new(pin_root)).cloned(),
            owner,
            outer_mounts: outer.map(parse_mountinfo),
        }
    }

    const HOST: &str = "27 1 254:0 / / rw - ext4 /dev/vda rw\n23 27 0:22 / /sys rw - sysfs sysfs rw\n\
                        60 27 0:50 / /tmp/t/bpffs rw - bpf bpf rw\n";
    /// `ip netns exec`: root copied, a fresh sysfs on /sys.
    const NETNS: &str = "45 44 254:0 / / rw - ext4 /dev/vda rw\n48 45 0:39 / /sys rw - sysfs ns1 rw\n\
                         70 45 0:50 / /tmp/t/bpffs rw - bpf bpf rw\n";
    const PRIVATE: NsOwner = NsOwner::ThisProcessTree { outer: 20 };

    #[test]
    fn sys_fs_bpf_under_ip_netns_exec_is_an_error() {
        let f = decide(&facts("/sys/fs/bpf/xdplb", NETNS, PRIVATE, Some(HOST)), false).expect("a finding");
        assert_eq!(f.check, "pin-root");
        assert!(f.what.contains("needs a BPF filesystem at /sys/fs/bpf") && f.what.contains("sysfs"), "{}", f.what);
        assert!(f.fix[0].contains("mount -t bpf bpf /run/xdplb-bpffs"));
        assert!(f.fix[1].contains("XDPLB_PIN_ROOT=/run/xdplb-bpffs/xdplb"));
        // Also at start-up: xdplb would mount one that dies with it.
        assert!(decide(&facts("/sys/fs/bpf/xdplb", NETNS, PRIVATE, Some(HOST)), true).is_some());
        // In the host's namespace, xdplb mounts one and it stays.
        assert_eq!(decide(&facts("/sys/fs/bpf/xdplb", HOST, NsOwner::Shared, None), false), None);
    }

    #[test]
    fn a_bpffs_from_outside_survives_one_mounted_inside_does_not() {
        assert_eq!(decide(&facts("/tmp/t/bpffs/xdplb", NETNS, PRIVATE, Some(HOST)), false), None);
        let inside = format!("{NETNS}80 48 0:77 / /sys/fs/bpf rw - bpf bpf rw\n");
        let f = decide(&facts("/sys/fs/bpf/xdplb", &inside, PRIVATE, Some(HOST)), false).expect("a finding");
        assert!(f.what.contains("exists only in this process's own mount namespace"), "{}", f.what);
        // Not our namespace alone: fine wherever it came from.
        assert_eq!(decide(&facts("/sys/fs/bpf/xdplb", &inside, NsOwner::Shared, None), false), None);
        // Outside unreadable: a propagating mount has its copy elsewhere.
        let slave = format!("{NETNS}80 48 0:77 / /sys/fs/bpf rw master:3 - bpf bpf rw\n");
        assert_eq!(decide(&facts("/sys/fs/bpf/xdplb", &slave, PRIVATE, None), false), None);
        assert!(decide(&facts("/sys/fs/bpf/xdplb", &inside, PRIVATE, None), false).is_some());
    }

    #[test]
    fn a_pin_root_on_another_filesystem_cannot_hold_pins() {
        let f = decide(&facts("/var/lib/xdplb", HOST, NsOwner::Shared, None), false).expect("a finding");
        assert!(f.what.contains("of type ext4"), "{}", f.what);
        assert_eq!(f.fix, vec!["mkdir -p /var/lib/xdplb && mount -t bpf bpf /var/lib/xdplb"]);
        assert_eq!(decide(&facts("/var/lib/xdplb", HOST, NsOwner::Shared, None), true), None, "xdplb run says it");
    }
}
