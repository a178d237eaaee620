//! The XDP link: attach, pin, adopt and atomically replace, detach.
//!
//! A pinned bpf_link keeps the program attached when the controller exits
//! (even by `kill -9`); the next controller swaps its own program into the
//! same link with `bpf_link_update`, so upgrading the XDP program never
//! leaves the interface without one.

use std::{ffi::CString, os::unix::ffi::OsStrExt as _, path::Path};

use anyhow::{Context as _, Result, bail};
use aya::programs::{
    links::{FdLink, PinnedLink},
    xdp::{XdpLink, XdpMode},
};
use tracing::{info, warn};

use crate::{config::XdpModeSetting, dataplane::Dataplane};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// How a program came to be on the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// Newly attached, in this mode.
    New(&'static str),
    /// Swapped into a link pinned by an earlier run.
    Replaced,
}

/// Makes sure `pin_root` exists on a BPF filesystem, mounting one at
/// /sys/fs/bpf if that is where it should be and none is mounted.
pub fn ensure_bpffs(pin_root: &Path) -> Result<()> {
    let is_bpffs = |p: &Path| -> bool {
        let Ok(c) = CString::new(p.as_os_str().as_bytes()) else { return false };
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type == BPF_FS_MAGIC }
    };
    let sys_bpf = Path::new("/sys/fs/bpf");
    if pin_root.starts_with(sys_bpf) && !is_bpffs(sys_bpf) {
        std::fs::create_dir_all(sys_bpf).ok();
        let (src, dst, fs) = (c"bpf", CString::new("/sys/fs/bpf").unwrap(), c"bpf");
        if unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) } != 0 {
            return Err(std::io::Error::last_os_error()).context("mounting a BPF filesystem at /sys/fs/bpf failed");
        }
        info!("mounted a BPF filesystem at /sys/fs/bpf");
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

/// Attaches `program` to `iface`, or swaps it into the link pinned at
/// `link_pin` by an earlier run. Pins a new link there.
pub fn attach(
    dp: &mut Dataplane,
    program: &str,
    iface: &str,
    mode: XdpModeSetting,
    link_pin: &Path,
) -> Result<Attached> {
    if link_pin.exists() {
        match replace(dp, program, link_pin) {
            Ok(()) => return Ok(Attached::Replaced),
            Err(e) => {
                warn!(
                    interface = iface,
                    "the pinned XDP link at {} is stale ({e:#}); attaching anew",
                    link_pin.display()
                );
                std::fs::remove_file(link_pin).ok();
            }
        }
    }
    let prog = dp.program(program)?;
    let tries: &[(XdpMode, &'static str)] = match mode {
        XdpModeSetting::Driver => &[(XdpMode::Driver, "driver")],
        XdpModeSetting::Skb => &[(XdpMode::Skb, "skb")],
        XdpModeSetting::Auto => &[(XdpMode::Driver, "driver"), (XdpMode::Skb, "skb")],
    };
    let mut last_err = None;
    for &(m, name) in tries {
        match prog.attach(iface, m) {
            Ok(id) => {
                let link = prog.take_link(id)?;
                let fd_link = FdLink::try_from(link).with_context(|| {
                    format!("the XDP attachment on {iface} is not a bpf_link, so it cannot be pinned")
                })?;
                fd_link
                    .pin(link_pin)
                    .with_context(|| format!("pinning the XDP link at {} failed", link_pin.display()))?;
                return Ok(Attached::New(name));
            }
            Err(e) => {
                if mode == XdpModeSetting::Auto && name == "driver" {
                    warn!(
                        interface = iface,
                        "native (driver) XDP is not available ({e}); falling back to generic (skb) mode"
                    );
                }
                last_err = Some((name, e));
            }
        }
    }
    let (name, e) = last_err.expect("at least one mode was tried");
    Err(anyhow::Error::new(e)).with_context(|| {
        format!("attaching XDP program {program} to interface {iface} in {name} mode failed (does the interface exist in this network namespace?)")
    })
}

fn replace(dp: &mut Dataplane, program: &str, link_pin: &Path) -> Result<()> {
    let pinned = PinnedLink::from_pin(link_pin).context("opening the pinned link failed")?;
    let link = XdpLink::try_from(FdLink::from(pinned)).context("the pinned link is not an XDP link")?;
    dp.program(program)?.attach_to_link(link).context("bpf_link_update failed")?;
    Ok(())
}

/// Removes the link pinned at `link_pin`: the program leaves the interface
/// once no process holds the link any more. Returns whether there was one.
pub fn detach(link_pin: &Path) -> Result<bool> {
    if !link_pin.exists() {
        return Ok(false);
    }
    match PinnedLink::from_pin(link_pin) {
        Ok(pinned) => {
            pinned.unpin().with_context(|| format!("unpinning {} failed", link_pin.display()))?;
        }
        Err(_) => std::fs::remove_file(link_pin).with_context(|| format!("removing {} failed", link_pin.display()))?,
    }
    Ok(true)
}
