//! The pin directory of one interface, PIN_ROOT/IFACE: the pinned maps, the
//! pinned XDP links and the `ABI` map, on a BPF filesystem.
//!
//! `xdplb run` calls [`prepare`] once at start-up. It
//! - makes sure the pins will outlive the process (or refuses, unless the
//!   operator accepted a dataplane that dies with it: `--ephemeral`);
//! - takes an exclusive lock on the directory, held until the process exits,
//!   so a second controller for the interface stops before it opens a map;
//! - decides whether there is a dataplane to adopt, and refuses one pinned
//!   by a build with another map layout (or a partial set of pins).
//!
//! A BPF filesystem holds only pinned objects and directories (no regular
//! files), so the lock is a `flock` on the directory itself (its holder's pid
//! is in /proc/locks), and the layout version is a one-entry array map.

use std::{
    collections::HashMap,
    ffi::CString,
    fs::File,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use lb_common::maps::MAPS_ABI;
use tracing::{info, warn};

use crate::{
    dataplane::{self, MapSizes},
    mounts::{self, Mount},
};

/// The pinned array map holding the layout version ([`MAPS_ABI`]).
pub const ABI_PIN: &str = "ABI";
/// Every XDP link xdplb pins: the balancer, the backend side of two-armed
/// NAT, the decapsulation and pass programs.
pub const LINK_PINS: &[&str] = &["link", "backend_link", "decap_link", "pass_link"];

/// Where to mount a BPF filesystem that outlives `ip netns exec`.
pub const HOST_BPFFS: &str = "/run/xdplb-bpffs";

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// A locked pin directory; the lock goes with this value (or the process).
#[derive(Debug)]
pub struct PinDir {
    pub path: PathBuf,
    /// A complete dataplane of this build's layout is pinned there.
    pub adopting: bool,
    _lock: File,
}

impl PinDir {
    /// The directory and whether to adopt, the lock held until the process
    /// exits (its descriptor stays open, and goes with the process, even by `kill -9`).
    pub fn locked_for_life(self) -> (PathBuf, bool) {
        use std::os::fd::IntoRawFd as _;
        let _held_until_exit = self._lock.into_raw_fd();
        (self.path, self.adopting)
    }
}

/// The start-up step for the pin directory of `iface` (see the module text).
pub fn prepare(pin_root: &Path, iface: &str, ephemeral: bool) -> Result<PinDir> {
    ensure_bpffs(pin_root, ephemeral)?;
    let path = pin_root.join(iface);
    std::fs::create_dir_all(&path).with_context(|| format!("creating the pin directory {} failed", path.display()))?;
    let lock = lock(&path, iface)?;
    let adopting = match verify(&path, iface)? {
        Pinned::Dataplane => {
            // What a migration cut short after its last step left.
            crate::migrate::remove_aside(&path);
            true
        }
        Pinned::Version1 => {
            crate::migrate::from_v1(&path, iface)?;
            true
        }
        Pinned::Nothing => {
            write_abi(&path)?;
            false
        }
    };
    Ok(PinDir { path, adopting, _lock: lock })
}

// ---- Will the pins outlive the process? ----

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

/// Decides who holds the mount namespace of process `me`. /proc/1 cannot be
/// read on every machine, so this does not compare with PID 1: it asks
/// whether processes outside this process tree share the namespace.
pub fn ns_owner(procs: &[Process], me: u32) -> NsOwner {
    let by_pid: HashMap<u32, &Process> = procs.iter().map(|p| (p.pid, p)).collect();
    let Some(own) = by_pid.get(&me).and_then(|p| p.mnt_ns.as_deref()) else { return NsOwner::Unknown };
    // The topmost ancestor in this namespace, and the one above it. /proc is
    // read one process at a time: a pid reused meanwhile can make the parents
    // a cycle, so the walk stops after as many steps as there are processes.
    let mut top = me;
    let mut outer = None;
    for _ in 0..procs.len() {
        let parent = by_pid[&top].ppid;
        if parent == 0 {
            // The first process of this PID namespace is in it: not ours alone.
            return NsOwner::Shared;
        }
        match by_pid.get(&parent).map(|p| p.mnt_ns.as_deref()) {
            Some(Some(ns)) if ns == own => top = parent,
            Some(Some(_)) => {
                outer = Some(parent);
                break;
            }
            _ => return NsOwner::Unknown,
        }
    }
    let Some(outer) = outer else { return NsOwner::Unknown };
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

/// How long pins under a pin root live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lifetime {
    /// On a BPF filesystem that outlives the process.
    Survives,
    /// /sys/fs/bpf has no BPF filesystem, in a mount namespace not known to
    /// be this process tree's own: mounting one there makes pins that
    /// survive where the namespace is [`NsOwner::Shared`]; with
    /// [`NsOwner::Unknown`] nobody can say (see [`mounted_note`]).
    MountSysFsBpf,
    /// On a BPF filesystem mounted at `.0` only in this process's own mount
    /// namespace: it vanishes with the process.
    DiesMountedAt(PathBuf),
    /// Under /sys/fs/bpf, which holds a `.0` (sysfs under `ip netns exec`),
    /// in this process's own mount namespace: a BPF filesystem mounted there
    /// would vanish with the process.
    DiesNeedsMount(String),
    /// Not on a BPF filesystem at all (of this type).
    NotBpffs(String),
    /// The mounts cannot be read.
    Unknown,
}

/// Decides how long pins under `p.pin_root` live.
pub fn lifetime(p: &PinFacts) -> Lifetime {
    let Some(m) = p.mount.as_ref() else { return Lifetime::Unknown };
    let private = matches!(p.owner, NsOwner::ThisProcessTree { .. });
    if m.fstype == "bpf" {
        let outside = !private
            || match &p.outer_mounts {
                Some(outer) => outer.iter().any(|o| o.fstype == "bpf" && o.dev == m.dev),
                // Cannot look outside: a propagating mount has a copy elsewhere.
                None => m.propagates(),
            };
        return if outside { Lifetime::Survives } else { Lifetime::DiesMountedAt(m.mount_point.clone()) };
    }
    if p.pin_root.starts_with("/sys/fs/bpf") {
        return if private { Lifetime::DiesNeedsMount(m.fstype.clone()) } else { Lifetime::MountSysFsBpf };
    }
    Lifetime::NotBpffs(m.fstype.clone())
}

/// The commands that give a pin root which outlives `ip netns exec`.
pub fn host_bpffs_fix() -> [String; 2] {
    [
        format!("mkdir -p {HOST_BPFFS} && mount -t bpf bpf {HOST_BPFFS}   # on the host, not under `ip netns exec`"),
        format!("export XDPLB_PIN_ROOT={HOST_BPFFS}/xdplb   # or --pin-root {HOST_BPFFS}/xdplb on every xdplb command"),
    ]
}

/// Why pins die with the process, for `ip netns exec` users.
pub const DIES_WITH_PROCESS: &str = "this mount namespace was created for this process alone, as `ip netns exec` and \
    `unshare -m` create them, and its mounts vanish when the process exits: the pinned XDP link and maps go with \
    them, so the XDP program is detached (the balancer or decapsulation stops at once) and a restart cannot adopt \
    the flows";

/// The facts about `pin_root` in this process.
pub fn facts(pin_root: &Path) -> PinFacts {
    let pin_root = resolve(pin_root);
    let mounts =
        std::fs::read_to_string("/proc/self/mountinfo").map(|t| mounts::parse_mountinfo(&t)).unwrap_or_default();
    let owner = ns_owner(&processes(), std::process::id());
    let outer_mounts = match owner {
        NsOwner::ThisProcessTree { outer } => {
            std::fs::read_to_string(format!("/proc/{outer}/mountinfo")).ok().map(|t| mounts::parse_mountinfo(&t))
        }
        _ => None,
    };
    PinFacts { mount: mounts::mount_of(&mounts, &pin_root).cloned(), pin_root, owner, outer_mounts }
}

/// `path` made absolute with symlinks resolved, also when its last parts do not exist yet.
fn resolve(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_else(|_| "/".into()).join(path)
    };
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    while !existing.exists() {
        let (Some(name), Some(parent)) = (existing.file_name(), existing.parent()) else { break };
        rest.push(name);
        existing = parent;
    }
    let mut out = existing.canonicalize().unwrap_or_else(|_| existing.to_path_buf());
    for part in rest.into_iter().rev() {
        out.push(part);
    }
    out
}

/// Every process: its parent and mount namespace.
fn processes() -> Vec<Process> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let ppid = mounts::parse_ppid(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)?;
            let mnt_ns = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok().map(|p| p.display().to_string());
            Some(Process { pid, ppid, mnt_ns })
        })
        .collect()
}

fn is_bpffs(p: &Path) -> bool {
    let Ok(c) = CString::new(p.as_os_str().as_bytes()) else { return false };
    // SAFETY: statfs only writes into `st`, a plain C struct that all-zeros is valid for.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path alive for the call; `st` is writable.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type == BPF_FS_MAGIC }
}

/// Mounts a BPF filesystem at `dir` unless one is there already; whether
/// this call mounted it. The check and the mount are done under an
/// exclusive flock on `dir` itself (the directory mounted over, outside any
/// BPF filesystem), so of two controllers starting together only one mounts:
/// a second mount on top of the first would hide the first one's pins.
pub fn mount_bpffs_once(dir: &Path) -> Result<bool> {
    if is_bpffs(dir) {
        return Ok(false);
    }
    std::fs::create_dir_all(dir).ok();
    let held = File::open(dir).with_context(|| format!("opening {} failed", dir.display()))?;
    // SAFETY: flock on an fd this function owns; no memory is involved.
    if unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("locking {} failed", dir.display()));
    }
    // Another process may have mounted one while this one waited for the lock.
    if is_bpffs(dir) {
        return Ok(false);
    }
    let dst = CString::new(dir.as_os_str().as_bytes())?;
    let (src, fs) = (c"bpf", c"bpf");
    // SAFETY: all three are NUL-terminated strings alive for the call; no data argument.
    if unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mounting a BPF filesystem at {} failed", dir.display()));
    }
    Ok(true)
}

fn mount_sys_fs_bpf() -> Result<bool> {
    mount_bpffs_once(Path::new("/sys/fs/bpf"))
}

/// What xdplb says after mounting a BPF filesystem at /sys/fs/bpf, and
/// whether it is a warning: it says the pins outlive xdplb only where it
/// knows the mount namespace is shared ([`NsOwner::Shared`]).
pub fn mounted_note(owner: NsOwner) -> (bool, String) {
    match owner {
        NsOwner::Unknown => (
            true,
            "mounted a BPF filesystem at /sys/fs/bpf; whether this mount namespace outlives xdplb could not be \
             determined (the mount namespace of an ancestor process cannot be read, as with a reduced capability \
             set): if it was made for xdplb alone (`ip netns exec`, `unshare -m`), the pins go when xdplb exits. \
             Check with `xdplb doctor`, run as root with every capability in the same way xdplb is started"
                .to_string(),
        ),
        NsOwner::Shared => (
            false,
            "mounted a BPF filesystem at /sys/fs/bpf (in a mount namespace that other processes share: the pins \
             outlive xdplb)"
                .to_string(),
        ),
        NsOwner::ThisProcessTree { .. } => (
            true,
            "--ephemeral: mounted a BPF filesystem at /sys/fs/bpf in this process's own mount namespace: it, the \
             XDP program and its maps go when xdplb exits"
                .to_string(),
        ),
    }
}

/// The error of a pin root whose pins would die with the process.
fn refusal(pin_root: &Path, what: &str) -> anyhow::Error {
    let [mount, export] = host_bpffs_fix();
    anyhow!(
        "{what}; {DIES_WITH_PROCESS}.\n\
         Give xdplb a BPF filesystem that the host holds:\n  {mount}\n  {export}\n\
         or accept a dataplane that dies with this process: xdplb run --ephemeral ...\n\
         (`xdplb doctor` checks this; the pin root was {})",
        pin_root.display()
    )
}

/// Makes sure `pin_root` exists on a BPF filesystem that outlives the
/// process, mounting one at /sys/fs/bpf where that is where it belongs.
/// With `ephemeral`, a BPF filesystem that dies with the process is
/// accepted (and mounted at /sys/fs/bpf if need be), with a warning.
pub fn ensure_bpffs(pin_root: &Path, ephemeral: bool) -> Result<()> {
    let known = facts(pin_root);
    match lifetime(&known) {
        Lifetime::Survives | Lifetime::Unknown | Lifetime::NotBpffs(_) => {}
        Lifetime::MountSysFsBpf => {
            if mount_sys_fs_bpf()? {
                match mounted_note(known.owner) {
                    (true, note) => warn!("{note}"),
                    (false, note) => info!("{note}"),
                }
            }
        }
        Lifetime::DiesMountedAt(at) if ephemeral => warn!(
            "--ephemeral: the BPF filesystem at {} exists only in this process's mount namespace: the XDP program \
             and its maps go when xdplb exits",
            at.display()
        ),
        Lifetime::DiesMountedAt(at) => {
            let what = format!(
                "the pin root {} is on a BPF filesystem (mounted at {}) that exists only in this process's own mount \
                 namespace",
                pin_root.display(),
                at.display()
            );
            return Err(refusal(pin_root, &what));
        }
        Lifetime::DiesNeedsMount(_) if ephemeral => {
            // Only this process tree is in the namespace: mounted now or by its own member, it dies with it.
            mount_sys_fs_bpf()?;
            warn!("{}", mounted_note(known.owner).1);
        }
        Lifetime::DiesNeedsMount(fstype) => {
            let what = format!(
                "the pin root {} needs a BPF filesystem at /sys/fs/bpf, and there is none in this mount namespace \
                 (/sys/fs/bpf is on {fstype}, as under `ip netns exec`, which mounts a fresh /sys); xdplb could \
                 mount one there, but it would die with this process",
                pin_root.display()
            );
            return Err(refusal(pin_root, &what));
        }
    }
    std::fs::create_dir_all(pin_root)
        .with_context(|| format!("creating the pin directory {} failed", pin_root.display()))?;
    if !is_bpffs(pin_root) {
        bail!(
            "{} is not on a BPF filesystem, so pinned maps would not survive a restart; \
             mount one (mount -t bpf bpf DIR) and pass --pin-root DIR",
            pin_root.display()
        );
    }
    Ok(())
}

// ---- One controller per interface ----

/// Locks `dir` (exclusive, for as long as the returned file is open), or
/// says which process holds it.
pub fn lock(dir: &Path, iface: &str) -> Result<File> {
    let f = File::open(dir).with_context(|| format!("opening the pin directory {} failed", dir.display()))?;
    // SAFETY: flock on an fd this function owns; no memory is involved.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(f);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
        return Err(e).with_context(|| format!("locking the pin directory {} failed", dir.display()));
    }
    let holder = f
        .metadata()
        .ok()
        .and_then(|m| lock_holder(&std::fs::read_to_string("/proc/locks").unwrap_or_default(), m.dev(), m.ino()));
    let who = holder.map_or("another process".to_string(), |pid| format!("pid {pid}"));
    let stop = holder.map_or(String::new(), |pid| format!(" (kill {pid})"));
    bail!(
        "another xdplb controller serves {iface}: {who} holds the lock on its pin directory {}; stop it first{stop}",
        dir.display()
    )
}

/// The pid of the process holding a flock on the inode (`dev`, `ino`), from /proc/locks.
pub fn lock_holder(proc_locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let want = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    proc_locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // `1: FLOCK  ADVISORY  WRITE 16133 00:27:388587 0 EOF`; blocked waiters have `->` first.
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&want.as_str())).then(|| f[4].parse().ok()).flatten()
    })
}

// ---- The layout of a pinned dataplane ----

/// What the pin directory holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pinned {
    /// No map: a new dataplane is created.
    Nothing,
    /// Every map, of this build's layout: adopt it.
    Dataplane,
    /// Every map, of layout version 1: migrate it (see `migrate`), then adopt it.
    Version1,
}

/// A map's definition as the kernel reports it (the head of `bpf_map_info`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapDef {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

/// How `pinned` differs from `expected`, in words; None when it does not.
pub fn difference(expected: &MapDef, pinned: &MapDef) -> Option<String> {
    let fields = [
        ("type", expected.map_type, pinned.map_type),
        ("key size", expected.key_size, pinned.key_size),
        ("value size", expected.value_size, pinned.value_size),
        ("max entries", expected.max_entries, pinned.max_entries),
        ("flags", expected.flags, pinned.flags),
    ];
    let diffs: Vec<String> = fields
        .iter()
        .filter(|(_, e, p)| e != p)
        .map(|(what, e, p)| format!("{what} {p} (this xdplb expects {e})"))
        .collect();
    (!diffs.is_empty()).then(|| diffs.join(", "))
}

/// The definition this build gives every pinned map, with the sizes of
/// the dataplane being adopted.
pub(crate) fn expected_defs(sizes: MapSizes) -> Result<Vec<(&'static str, MapDef)>> {
    let obj = aya_obj::Object::parse(crate::EBPF_OBJECT).context("parsing the embedded eBPF object failed")?;
    let sized: HashMap<&str, u32> = dataplane::sized_maps(sizes).into_iter().collect();
    dataplane::PINNED_MAPS
        .iter()
        .map(|&name| {
            let m = obj.maps.get(name).with_context(|| format!("the eBPF object has no map {name}"))?;
            // The kernel makes every devmap read-only for programs (BPF_F_RDONLY_PROG) and says so.
            let kernel_flags = if KERNEL_RDONLY_TYPES.contains(&m.map_type()) { BPF_F_RDONLY_PROG } else { 0 };
            Ok((
                name,
                MapDef {
                    map_type: m.map_type(),
                    key_size: m.key_size(),
                    value_size: m.value_size(),
                    max_entries: sized.get(name).copied().unwrap_or(m.max_entries()),
                    flags: m.map_flags() | kernel_flags,
                },
            ))
        })
        .collect()
}

/// The command that clears a pin directory, for error messages.
fn detach_hint(iface: &str) -> String {
    format!(
        "run `xdplb detach --iface {iface}` (the program leaves {iface} and the pinned maps and flows go), then \
         start xdplb again"
    )
}

/// Whether `dir` holds a dataplane this build can adopt; an error naming
/// the map and the fix when it holds one of another layout, or part of one.
/// Creates and changes nothing.
pub fn verify(dir: &Path, iface: &str) -> Result<Pinned> {
    // A map a migration set aside (`migrate`) counts as that map.
    let pinned_at = |name: &str| -> Option<PathBuf> {
        [crate::migrate::aside(dir, name), dir.join(name)].into_iter().find(|p| p.exists())
    };
    let present: Vec<&str> = dataplane::PINNED_MAPS.iter().copied().filter(|n| pinned_at(n).is_some()).collect();
    if present.is_empty() {
        return Ok(Pinned::Nothing);
    }
    let refuse = |why: String| {
        anyhow!("refusing to adopt the dataplane pinned in {}: {why}; {}", dir.display(), detach_hint(iface))
    };
    if present.len() < dataplane::PINNED_MAPS.len() {
        let missing: Vec<&str> = dataplane::PINNED_MAPS.iter().copied().filter(|n| !present.contains(n)).collect();
        return Err(refuse(format!(
            "it holds only part of a dataplane (map {} missing: left by a crash or by another xdplb version)",
            missing.join(", map ")
        )));
    }
    let version = match read_abi(&dir.join(ABI_PIN)) {
        Ok(v) if v == MAPS_ABI || v == 1 => v,
        Ok(v) => {
            return Err(refuse(format!(
                "map {ABI_PIN} says map layout version {v}, this xdplb uses version {MAPS_ABI} (and migrates version 1)"
            )));
        }
        Err(e) => {
            return Err(refuse(format!(
                "map {ABI_PIN}, the map layout version, cannot be read ({e:#}): the maps were pinned by an \
                 xdplb of unknown layout"
            )));
        }
    };
    let mut pinned = HashMap::new();
    for name in dataplane::PINNED_MAPS {
        // Version 1's own maps first: a migration cut short left its new maps beside them.
        let path = if version == 1 { pinned_at(name) } else { Some(dir.join(name)) };
        let def = path
            .ok_or_else(|| anyhow!("missing"))
            .and_then(|p| map_def(&p))
            .map_err(|e| refuse(format!("map {name} cannot be read ({e:#})")))?;
        pinned.insert(*name, def);
    }
    // The sizes the adopted dataplane was created with: its sizing maps say them.
    let sizes = MapSizes {
        max_vips: pinned[lb_common::maps::names::VIPS].max_entries,
        max_backends: pinned[lb_common::maps::names::BACKENDS].max_entries,
        conntrack: pinned[lb_common::maps::names::FLOWS].max_entries,
        maglev_pool: pinned[lb_common::maps::names::MAGLEV_POOL].max_entries,
        nat_table: pinned[lb_common::maps::names::NAT_FLOWS].max_entries,
    };
    for (name, mut want) in expected_defs(sizes)? {
        if version == 1 {
            want = crate::migrate::v1_def(name, want);
        }
        if let Some(diff) = difference(&want, &pinned[name]) {
            let version = if version == 1 { " (for layout version 1)" } else { "" };
            return Err(refuse(format!("map {name} has {diff}{version}")));
        }
    }
    Ok(if version == 1 { Pinned::Version1 } else { Pinned::Dataplane })
}

// ---- Clean-up ----

/// Detaches every link xdplb pinned in `dir` and removes its maps and the
/// directory. Returns whether a link was there.
pub fn remove_all(dir: &Path) -> Result<bool> {
    let mut any = false;
    for link in LINK_PINS {
        any |= crate::attach::detach(&dir.join(link))?;
    }
    remove_maps(dir);
    Ok(any)
}

/// Removes the pinned maps (and the layout version), not the links; and
/// the directory if that leaves it empty.
pub fn remove_maps(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if !LINK_PINS.iter().any(|l| e.file_name() == *l) {
                std::fs::remove_file(e.path()).ok();
            }
        }
    }
    std::fs::remove_dir(dir).ok();
}

// ---- bpf(2) for the small things aya does not do ----

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_F_RDONLY_PROG: u32 = 1 << 7;
/// BPF_MAP_TYPE_DEVMAP and BPF_MAP_TYPE_DEVMAP_HASH.
const KERNEL_RDONLY_TYPES: [u32; 2] = [14, 25];

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: `attr` is a #[repr(C)] head of `union bpf_attr` for `cmd`, alive
    // and writable for the call; the kernel reads (and for INFO writes through
    // pointers in it) no more than size_of::<T>() and what those point to.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>()) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc) }
}

#[repr(C)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn obj_get(path: &Path) -> Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    let mut attr = ObjAttr { pathname: c.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    let fd = bpf(BPF_OBJ_GET, &mut attr).with_context(|| format!("opening {} failed", path.display()))?;
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The definition of the map pinned at `path`.
pub fn map_def(path: &Path) -> Result<MapDef> {
    let fd = obj_get(path)?;
    #[repr(C)]
    #[derive(Default)]
    struct Info {
        map_type: u32,
        id: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut info = Info::default();
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<Info>() as u32,
        info: &mut info as *mut Info as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).with_context(|| format!("reading {} failed", path.display()))?;
    Ok(MapDef {
        map_type: info.map_type,
        key_size: info.key_size,
        value_size: info.value_size,
        max_entries: info.max_entries,
        flags: info.map_flags,
    })
}

/// The layout version pinned at `path`.
fn read_abi(path: &Path) -> Result<u32> {
    let def = map_def(path)?;
    if (def.map_type, def.key_size, def.value_size) != (BPF_MAP_TYPE_ARRAY, 4, 4) {
        bail!("it is not an array of one u32");
    }
    let fd = obj_get(path)?;
    let (key, mut value) = (0u32, 0u32);
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: &key as *const u32 as u64,
        value: &mut value as *mut u32 as u64,
        flags: 0,
    };
    bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).context("reading its entry failed")?;
    Ok(value)
}

/// Pins a one-entry array map holding [`MAPS_ABI`] at DIR/ABI (replacing
/// any there: it is only written where no map is pinned, or by a migration).
pub(crate) fn write_abi(dir: &Path) -> Result<()> {
    write_abi_version(dir, MAPS_ABI)
}

/// Like [`write_abi`], with any version (tests build older dataplanes).
/// The new map is pinned beside the old one, filled, then renamed over it:
/// cut short at any point, DIR/ABI holds one version or the other.
pub fn write_abi_version(dir: &Path, version: u32) -> Result<()> {
    let path = dir.join(ABI_PIN);
    let staged = dir.join(format!("{ABI_PIN}_staged"));
    std::fs::remove_file(&staged).ok();
    let def = MapDef { map_type: BPF_MAP_TYPE_ARRAY, key_size: 4, value_size: 4, max_entries: 1, flags: 0 };
    let fd = create_pinned(&staged, &def, "xdplb_abi").context("creating the ABI map failed")?;
    let (key, value) = (0u32, version);
    let mut update = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: &key as *const u32 as u64,
        value: &value as *const u32 as u64,
        flags: 0,
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut update).context("writing the ABI map failed")?;
    std::fs::rename(&staged, &path).with_context(|| format!("renaming {} to {}", staged.display(), path.display()))
}

/// Creates a map of definition `def` named `name` (at most 15 bytes) and
/// pins it at `path`.
pub fn create_pinned(path: &Path, def: &MapDef, name: &str) -> Result<OwnedFd> {
    #[repr(C)]
    struct CreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        inner_map_fd: u32,
        numa_node: u32,
        map_name: [u8; 16],
    }
    let mut map_name = [0u8; 16];
    let n = name.len().min(15);
    map_name[..n].copy_from_slice(&name.as_bytes()[..n]);
    let mut create = CreateAttr {
        map_type: def.map_type,
        key_size: def.key_size,
        value_size: def.value_size,
        max_entries: def.max_entries,
        // The kernel adds BPF_F_RDONLY_PROG to some types itself (see `expected_defs`).
        map_flags: def.flags & !BPF_F_RDONLY_PROG,
        inner_map_fd: 0,
        numa_node: 0,
        map_name,
    };
    let fd = bpf(BPF_MAP_CREATE, &mut create).with_context(|| format!("creating map {name} failed"))?;
    // SAFETY: a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let c = CString::new(path.as_os_str().as_bytes())?;
    let mut pin = ObjAttr { pathname: c.as_ptr() as u64, bpf_fd: fd.as_raw_fd() as u32, file_flags: 0 };
    bpf(BPF_OBJ_PIN, &mut pin).with_context(|| format!("pinning {} failed", path.display()))?;
    Ok(fd)
}

/// Mount tables of the host and of `ip netns exec`, shared by the tests of
/// this module and of `doctor`.
#[cfg(test)]
pub(crate) mod fixtures {
    use std::path::Path;

    use super::{NsOwner, PinFacts};
    use crate::mounts::parse_mountinfo;

    pub(crate) fn pin_facts(pin_root: &str, mountinfo: &str, owner: NsOwner, outer: Option<&str>) -> PinFacts {
        let mounts = parse_mountinfo(mountinfo);
        PinFacts {
            pin_root: pin_root.into(),
            mount: crate::mounts::mount_of(&mounts, Path::new(pin_root)).cloned(),
            owner,
            outer_mounts: outer.map(parse_mountinfo),
        }
    }

    pub(crate) const HOST: &str = "27 1 254:0 / / rw - ext4 /dev/vda rw\n23 27 0:22 / /sys rw - sysfs sysfs rw\n\
                        60 27 0:50 / /tmp/t/bpffs rw - bpf bpf rw\n";
    pub(crate) const NETNS: &str = "45 44 254:0 / / rw - ext4 /dev/vda rw\n48 45 0:39 / /sys rw - sysfs ns1 rw\n\
                         70 45 0:50 / /tmp/t/bpffs rw - bpf bpf rw\n";
    pub(crate) const PRIVATE: NsOwner = NsOwner::ThisProcessTree { outer: 20 };
}

#[cfg(test)]
mod tests {
    use super::{fixtures::*, *};

    fn p(pid: u32, ppid: u32, ns: &str) -> Process {
        Process { pid, ppid, mnt_ns: (!ns.is_empty()).then(|| format!("mnt:[{ns}]")) }
    }

    #[test]
    fn pins_the_host_namespace_is_shared() {
        // init(1) → sshd(10) → bash(20) → xdplb(30), all in one namespace.
        let procs = [p(1, 0, "1"), p(10, 1, "1"), p(20, 10, "1"), p(30, 20, "1")];
        assert_eq!(ns_owner(&procs, 30), NsOwner::Shared);
    }

    #[test]
    fn pins_ip_netns_exec_makes_a_namespace_of_its_own() {
        // bash(20) ran `ip netns exec NS xdplb`: ip unshared and exec'd into xdplb(30).
        let procs = [p(1, 0, "1"), p(20, 1, "1"), p(30, 20, "2"), p(40, 1, "1")];
        assert_eq!(ns_owner(&procs, 30), NsOwner::ThisProcessTree { outer: 20 });
        // A shell in between (`ip netns exec NS sh -c 'xdplb ...'`) is still this tree.
        let procs = [p(1, 0, "1"), p(20, 1, "1"), p(25, 20, "2"), p(30, 25, "2"), p(31, 30, "2")];
        assert_eq!(ns_owner(&procs, 30), NsOwner::ThisProcessTree { outer: 20 });
    }

    #[test]
    fn pins_a_namespace_others_share_outlives_the_process() {
        // A container: its init(5) and a sibling(6) hold the namespace with xdplb(7).
        let procs = [p(1, 0, "1"), p(4, 1, "1"), p(5, 4, "2"), p(6, 5, "2"), p(7, 5, "2"), p(8, 1, "2")];
        assert_eq!(ns_owner(&procs, 7), NsOwner::Shared, "process 8 is outside xdplb's tree");
    }

    #[test]
    fn pins_unreadable_ancestors_leave_it_open() {
        let procs = [p(1, 0, ""), p(20, 1, "1"), p(30, 20, "1")];
        assert_eq!(ns_owner(&procs, 30), NsOwner::Unknown);
        assert_eq!(ns_owner(&procs, 99), NsOwner::Unknown);
    }

    #[test]
    fn pins_a_parent_cycle_from_reused_pids_ends_the_walk() {
        // /proc read while 20 exited and its pid went to a child of 30.
        let procs = [p(1, 0, "1"), p(20, 30, "1"), p(30, 20, "1")];
        assert_eq!(ns_owner(&procs, 30), NsOwner::Unknown);
        let procs = [p(30, 30, "1")];
        assert_eq!(ns_owner(&procs, 30), NsOwner::Unknown);
    }

    #[test]
    fn pins_an_unknown_namespace_owner_claims_no_lifetime() {
        let (warns, note) = mounted_note(NsOwner::Unknown);
        assert!(warns, "{note}");
        assert!(!note.contains("outlive xdplb"), "it cannot know that: {note}");
        assert!(note.contains("could not be determined") && note.contains("xdplb doctor"), "{note}");
        let (warns, note) = mounted_note(NsOwner::Shared);
        assert!(!warns && note.contains("the pins outlive xdplb"), "{note}");
        let (warns, note) = mounted_note(PRIVATE);
        assert!(warns && note.contains("go when xdplb exits"), "{note}");
    }

    #[test]
    fn pins_lifetime_of_each_pin_root() {
        let l = |root, info, owner, outer| lifetime(&pin_facts(root, info, owner, outer));
        assert_eq!(l("/sys/fs/bpf/xdplb", NETNS, PRIVATE, Some(HOST)), Lifetime::DiesNeedsMount("sysfs".into()));
        assert_eq!(l("/sys/fs/bpf/xdplb", HOST, NsOwner::Shared, None), Lifetime::MountSysFsBpf);
        assert_eq!(l("/tmp/t/bpffs/xdplb", NETNS, PRIVATE, Some(HOST)), Lifetime::Survives);
        let inside = format!("{NETNS}80 48 0:77 / /sys/fs/bpf rw - bpf bpf rw\n");
        assert_eq!(l("/sys/fs/bpf/xdplb", &inside, PRIVATE, Some(HOST)), Lifetime::DiesMountedAt("/sys/fs/bpf".into()));
        assert_eq!(l("/sys/fs/bpf/xdplb", &inside, NsOwner::Shared, None), Lifetime::Survives);
        let slave = format!("{NETNS}80 48 0:77 / /sys/fs/bpf rw master:3 - bpf bpf rw\n");
        assert_eq!(l("/sys/fs/bpf/xdplb", &slave, PRIVATE, None), Lifetime::Survives);
        assert_eq!(l("/var/lib/xdplb", HOST, NsOwner::Shared, None), Lifetime::NotBpffs("ext4".into()));
        assert_eq!(l("/x", "", NsOwner::Shared, None), Lifetime::Unknown);
    }

    #[test]
    fn pins_the_lock_holder_comes_from_proc_locks() {
        let locks = "1: POSIX  ADVISORY  WRITE 99 00:27:388587 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 16133 00:27:388587 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 7 fe:00:388587 0 EOF\n";
        let dev = libc::makedev(0, 0x27);
        assert_eq!(lock_holder(locks, dev, 388587), Some(16133));
        assert_eq!(lock_holder(locks, dev, 1), None);
        assert_eq!(lock_holder(locks, libc::makedev(0xfe, 0), 388587), Some(7));
    }

    #[test]
    fn pins_a_difference_names_every_field() {
        let want = MapDef { map_type: 1, key_size: 40, value_size: 24, max_entries: 1024, flags: 0 };
        assert_eq!(difference(&want, &want), None);
        let got = MapDef { value_size: 16, max_entries: 8, ..want };
        assert_eq!(
            difference(&want, &got).unwrap(),
            "value size 16 (this xdplb expects 24), max entries 8 (this xdplb expects 1024)"
        );
    }

    #[test]
    fn pins_this_build_knows_every_pinned_map() {
        let defs = expected_defs(MapSizes::default()).unwrap();
        assert_eq!(defs.len(), dataplane::PINNED_MAPS.len());
        let flows = defs.iter().find(|(n, _)| *n == lb_common::maps::names::FLOWS).unwrap().1;
        assert_eq!(flows.key_size as usize, size_of::<lb_common::maps::FlowKey>());
        assert_eq!(flows.value_size as usize, size_of::<lb_common::maps::FlowValue>());
        assert_eq!(flows.max_entries, MapSizes::default().conntrack);
    }
}
