//! Will the pin root outlive the process? Pinned maps and the pinned XDP
//! link live on a BPF filesystem; if that filesystem is only mounted in a
//! mount namespace that dies with the process, so do the pins, and the XDP
//! program is detached when the process exits.
//!
//! `ip netns exec` runs its command in a new mount namespace with a fresh
//! /sys: /sys/fs/bpf there is an empty sysfs directory, and a BPF
//! filesystem mounted on it is gone when the command exits. The decision is
//! [`crate::pins::lifetime`], which `xdplb run` also acts on; this turns it
//! into findings.

use super::findings::Finding;
pub use crate::pins::PinFacts;
use crate::pins::{DIES_WITH_PROCESS, Lifetime, host_bpffs_fix, lifetime};

/// A finding if the pins would not outlive the process. At start-up
/// (`starting`), a pin root that is no BPF filesystem at all is left to
/// `xdplb run`, which refuses it with its own message.
pub fn decide(p: &PinFacts, starting: bool) -> Option<Finding> {
    let root = p.pin_root.display();
    let host_fix = |f: Finding| {
        let [mount, export] = host_bpffs_fix();
        f.fix(mount).fix(export)
    };
    match lifetime(p) {
        Lifetime::Survives | Lifetime::MountSysFsBpf | Lifetime::Unknown => None,
        Lifetime::DiesMountedAt(at) => Some(host_fix(Finding::error(
            "pin-root",
            format!(
                "the pin root {root} is on a BPF filesystem (mounted at {}) that exists only in this process's own mount namespace",
                at.display()
            ),
            DIES_WITH_PROCESS,
        ))),
        Lifetime::DiesNeedsMount(fstype) => Some(host_fix(Finding::error(
            "pin-root",
            format!(
                "the pin root {root} needs a BPF filesystem at /sys/fs/bpf, and there is none in this mount namespace \
                 (/sys/fs/bpf is on {fstype}, as under `ip netns exec`, which mounts a fresh /sys)"
            ),
            format!(
                "xdplb would mount one there, but {DIES_WITH_PROCESS}; `xdplb run` refuses to start without --ephemeral"
            ),
        ))),
        Lifetime::NotBpffs(_) if starting => None,
        Lifetime::NotBpffs(fstype) => Some(
            Finding::error(
                "pin-root",
                format!("the pin root {root} is on a filesystem of type {fstype}, not on a BPF filesystem"),
                "maps and links can only be pinned on a BPF filesystem: `xdplb run`, `xdplb decap` and `xdplb pass` \
                 refuse to start",
            )
            .fix(format!("mkdir -p {root} && mount -t bpf bpf {root}")),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pins::{NsOwner, fixtures::*};

    #[test]
    fn sys_fs_bpf_under_ip_netns_exec_is_an_error() {
        let f = decide(&pin_facts("/sys/fs/bpf/xdplb", NETNS, PRIVATE, Some(HOST)), false).expect("a finding");
        assert_eq!(f.check, "pin-root");
        assert!(f.what.contains("needs a BPF filesystem at /sys/fs/bpf") && f.what.contains("sysfs"), "{}", f.what);
        assert!(f.fix[0].contains("mount -t bpf bpf /run/xdplb-bpffs"));
        assert!(f.fix[1].contains("XDPLB_PIN_ROOT=/run/xdplb-bpffs/xdplb"));
        // Also at start-up: xdplb would mount one that dies with it.
        assert!(decide(&pin_facts("/sys/fs/bpf/xdplb", NETNS, PRIVATE, Some(HOST)), true).is_some());
        // In the host's namespace, xdplb mounts one and it stays.
        assert_eq!(decide(&pin_facts("/sys/fs/bpf/xdplb", HOST, NsOwner::Shared, None), false), None);
    }

    #[test]
    fn a_bpffs_from_outside_survives_one_mounted_inside_does_not() {
        assert_eq!(decide(&pin_facts("/tmp/t/bpffs/xdplb", NETNS, PRIVATE, Some(HOST)), false), None);
        let inside = format!("{NETNS}80 48 0:77 / /sys/fs/bpf rw - bpf bpf rw\n");
        let f = decide(&pin_facts("/sys/fs/bpf/xdplb", &inside, PRIVATE, Some(HOST)), false).expect("a finding");
        assert!(f.what.contains("exists only in this process's own mount namespace"), "{}", f.what);
        // Not our namespace alone: fine wherever it came from.
        assert_eq!(decide(&pin_facts("/sys/fs/bpf/xdplb", &inside, NsOwner::Shared, None), false), None);
        // Outside unreadable: a propagating mount has its copy elsewhere.
        let slave = format!("{NETNS}80 48 0:77 / /sys/fs/bpf rw master:3 - bpf bpf rw\n");
        assert_eq!(decide(&pin_facts("/sys/fs/bpf/xdplb", &slave, PRIVATE, None), false), None);
        assert!(decide(&pin_facts("/sys/fs/bpf/xdplb", &inside, PRIVATE, None), false).is_some());
    }

    #[test]
    fn a_pin_root_on_another_filesystem_cannot_hold_pins() {
        let f = decide(&pin_facts("/var/lib/xdplb", HOST, NsOwner::Shared, None), false).expect("a finding");
        assert!(f.what.contains("of type ext4"), "{}", f.what);
        assert_eq!(f.fix, vec!["mkdir -p /var/lib/xdplb && mount -t bpf bpf /var/lib/xdplb"]);
        assert_eq!(decide(&pin_facts("/var/lib/xdplb", HOST, NsOwner::Shared, None), true), None, "xdplb run says it");
    }
}
