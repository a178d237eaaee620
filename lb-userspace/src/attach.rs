//! The XDP link: attach, pin, adopt and atomically replace, detach.
//!
//! A pinned bpf_link keeps the program attached when the controller exits
//! (even by `kill -9`); the next controller swaps its own program into the
//! same link with `bpf_link_update`, so upgrading the XDP program never
//! leaves the interface without one.

use std::{
    ffi::CString,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{
    ProgramInfo,
    links::{FdLink, PinnedLink},
    loaded_programs,
    xdp::{XdpLink, XdpMode},
};
use tracing::warn;

use crate::{config::XdpModeSetting, dataplane::Dataplane};

/// How a program came to be on the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// Newly attached, in this mode.
    New(&'static str),
    /// Swapped into a link pinned by an earlier run.
    Replaced,
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

/// The id of the program in the XDP link pinned at `link_pin`.
pub fn link_program_id(link_pin: &Path) -> Result<u32> {
    let pinned = PinnedLink::from_pin(link_pin)
        .with_context(|| format!("opening the pinned link {} failed", link_pin.display()))?;
    let info = FdLink::from(pinned).info().with_context(|| format!("reading {} failed", link_pin.display()))?;
    Ok(info.program_id())
}

/// A loaded program, by id. A program unloaded while the list is read
/// fails to open and is passed over; that error is returned only if `id`
/// is not found.
pub fn program_by_id(id: u32) -> Result<ProgramInfo> {
    let mut failed = None;
    for info in loaded_programs() {
        match info {
            Ok(info) if info.id() == id => return Ok(info),
            Ok(_) => {}
            Err(e) => failed = failed.or(Some(e)),
        }
    }
    match failed {
        Some(e) => Err(e).context("listing the loaded BPF programs failed"),
        None => bail!("no BPF program has id {id} (it was unloaded meanwhile)"),
    }
}

/// Swaps `new` into the XDP link pinned at `link_pin` if the link still
/// runs `old` (bpf_link_update with BPF_F_REPLACE, atomic). Returns false,
/// changing nothing, if the link runs another program.
pub fn swap_if_current(link_pin: &Path, new: BorrowedFd<'_>, old: BorrowedFd<'_>) -> Result<bool> {
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_UPDATE: libc::c_long = 29;
    const BPF_F_REPLACE: u32 = 1 << 2;
    // The head of `union bpf_attr` for BPF_OBJ_GET and BPF_LINK_UPDATE; the
    // kernel accepts a shorter attr and reads the rest as zeros.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let path = CString::new(link_pin.as_os_str().as_bytes())?;
    let get = ObjGet { pathname: path.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    // SAFETY: BPF_OBJ_GET reads `get` (and the path it points to, alive
    // until the end of this function) and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, &get as *const ObjGet, size_of::<ObjGet>()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("opening the pinned link {} failed", link_pin.display()));
    }
    // SAFETY: a new fd that nothing else owns.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let update = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: new.as_raw_fd() as u32,
        flags: BPF_F_REPLACE,
        old_prog_fd: old.as_raw_fd() as u32,
    };
    // SAFETY: BPF_LINK_UPDATE only reads `update`; the fds in it are open.
    let rc =
        unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_UPDATE, &update as *const LinkUpdate, size_of::<LinkUpdate>()) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    // EPERM: the link runs another program than `old`.
    if e.raw_os_error() == Some(libc::EPERM) {
        return Ok(false);
    }
    Err(e).with_context(|| format!("bpf_link_update of {} failed", link_pin.display()))
}
