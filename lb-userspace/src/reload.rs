//! `xdplb reload`: ask the running controller to reload its file and wait
//! for its verdict, so a script, or systemd's `ExecReload=`, knows whether
//! the new file is in effect. The request goes over the runtime socket; a
//! controller without one (an older version, during an upgrade) gets SIGHUP
//! and its verdict is read from the status file.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::{
    runtime::{self, Request, Response},
    status::{self, Status},
};

/// How a reload ended.
pub enum Verdict {
    /// Applied: the new generation and what changed.
    Applied { generation: u64, changes: Vec<String> },
    /// Rejected: every error; the previous configuration stays in effect.
    Rejected { generation: u64, errors: Vec<String> },
}

/// Asks the controller of `iface` to reload and waits up to `timeout` for the result.
pub fn reload(state_dir: &Path, iface: &str, timeout: Duration) -> Result<Verdict> {
    if !runtime::has_socket(state_dir, iface) {
        return reload_by_signal(state_dir, iface, timeout);
    }
    match runtime::call(state_dir, iface, &Request::Reload, timeout)? {
        Response::Applied { generation, changes } => Ok(Verdict::Applied { generation, changes }),
        Response::Rejected { generation, errors } => Ok(Verdict::Rejected { generation, errors }),
        Response::Error { error } => bail!("{error}"),
        other => bail!("unexpected answer from the controller: {other:?}"),
    }
}

/// SIGHUP, and the verdict from the status file.
fn reload_by_signal(state_dir: &Path, iface: &str, timeout: Duration) -> Result<Verdict> {
    let before = status::read(state_dir, iface)?;
    if !status::pid_alive(before.pid) {
        bail!(
            "the controller of {iface} (pid {}) is not running; start it with `xdplb run` (or `systemctl start xdplb`)",
            before.pid
        );
    }
    // SAFETY: kill(2) sends a signal to the pid the status file names; no memory is involved.
    if unsafe { libc::kill(before.pid as i32, libc::SIGHUP) } != 0 {
        bail!("cannot signal xdplb (pid {}): {}", before.pid, std::io::Error::last_os_error());
    }
    let started = Instant::now();
    while started.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(50));
        let Ok(now) = status::read(state_dir, iface) else { continue };
        if let Some(v) = verdict(&before, &now) {
            return Ok(v);
        }
    }
    bail!(
        "xdplb (pid {}) gave no verdict within {timeout:?}; see its log (journalctl -u xdplb) and `xdplb status`",
        before.pid
    )
}

/// The outcome, once the status shows one more reload than `before`.
fn verdict(before: &Status, now: &Status) -> Option<Verdict> {
    if now.pid != before.pid {
        return None;
    }
    if now.reloads_ok > before.reloads_ok {
        return Some(Verdict::Applied { generation: now.config_generation, changes: now.last_reload_changes.clone() });
    }
    if now.reloads_failed > before.reloads_failed {
        return Some(Verdict::Rejected { generation: now.config_generation, errors: now.last_reload_errors.clone() });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verdict_is_the_next_reload_of_the_same_process() {
        let before = Status { pid: 7, reloads_ok: 2, reloads_failed: 1, config_generation: 3, ..Status::default() };
        assert!(verdict(&before, &before).is_none());
        let other = Status { pid: 8, reloads_ok: 3, ..before.clone() };
        assert!(verdict(&before, &other).is_none(), "a restarted controller's counters are not this reload");
        let applied = Status {
            reloads_ok: 3,
            config_generation: 4,
            last_reload_changes: vec!["VIP web removed".into()],
            ..before.clone()
        };
        assert!(
            matches!(verdict(&before, &applied), Some(Verdict::Applied { generation: 4, changes }) if changes.len() == 1)
        );
        let rejected = Status { reloads_failed: 2, last_reload_errors: vec!["f:1:1: x: y".into()], ..before.clone() };
        assert!(matches!(verdict(&before, &rejected), Some(Verdict::Rejected { generation: 3, .. })));
    }
}
