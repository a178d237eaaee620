//! keepalived's view of this node: `STATE_DIR/IFACE.track` holds `0` while
//! the node can serve and `1` while it cannot. keepalived reads it as a
//! `track_file` with `weight 0`, which makes any value other than 0 a FAULT
//! and hands the VIP to the other node:
//!
//! ```text
//! track_file xdplb { file "/run/xdplb/eth0.track"; weight 0 }
//! vrrp_instance vips { ... track_file { xdplb } }
//! ```
//!
//! keepalived re-reads the file when inotify reports it written or moved
//! in; the file is replaced by a rename, so it never reads half of one.

use std::path::{Path, PathBuf};

use anyhow::Result;
use tracing::{info, warn};

pub fn track_path(state_dir: &Path, iface: &str) -> PathBuf {
    state_dir.join(format!("{iface}.track"))
}

/// Writes `0\n` (can serve) or `1\n` (cannot) when the file does not hold it
/// already: a rename over the old file, mode 0644 (keepalived may run as
/// another user).
pub fn write_track_file(state_dir: &Path, iface: &str, can_serve: bool) -> Result<()> {
    let path = track_path(state_dir, iface);
    let want: &[u8] = if can_serve { b"0\n" } else { b"1\n" };
    if std::fs::read(&path).is_ok_and(|held| held == want) {
        return Ok(());
    }
    crate::runtime::check_state_dir(state_dir)?;
    let tmp = state_dir.join(format!(".{iface}.track.{}.tmp", std::process::id()));
    crate::status::replace_file(&path, &tmp, want)
}

/// Keeps the track file saying what it should. `say` is called each second
/// (the daemon's tick) and reads the file every time: one removed or
/// changed behind xdplb's back is written again (keepalived reads a missing
/// file as 0, can serve), and a failed write is retried, its error logged
/// once while it stays the same.
#[derive(Debug, Default)]
pub struct TrackFile {
    said: Option<bool>,
    error: Option<String>,
}

impl TrackFile {
    pub fn say(&mut self, state_dir: &Path, iface: &str, can_serve: bool) {
        match write_track_file(state_dir, iface, can_serve) {
            Ok(()) => {
                self.said = Some(can_serve);
                if self.error.take().is_some() {
                    info!("keepalived's track file is written again");
                }
            }
            Err(e) => {
                let text = format!("{e:#}");
                if self.error.as_ref() != Some(&text) {
                    warn!("cannot write keepalived's track file: {text}; retrying every second");
                    self.error = Some(text);
                }
            }
        }
    }

    /// What the file said when last written: Some(true) can serve (None: never written).
    pub fn said(&self) -> Option<bool> {
        self.said
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    use super::*;

    struct Gone(PathBuf);
    impl Drop for Gone {
        fn drop(&mut self) {
            std::fs::remove_dir_all(&self.0).ok();
        }
    }

    #[test]
    fn the_track_file_says_0_to_serve_and_1_not_to_and_is_rewritten_only_on_change() {
        let dir = std::env::temp_dir().join(format!("xdplb-track-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        let _gone = Gone(dir.clone());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = track_path(&dir, "lb0");
        assert_eq!(path, dir.join("lb0.track"));

        write_track_file(&dir, "lb0", true).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "0\n");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o644, "keepalived must be able to read it");
        let inode = meta.ino();

        write_track_file(&dir, "lb0", true).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode, "the same content is not written again");

        write_track_file(&dir, "lb0", false).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n");
        assert_ne!(std::fs::metadata(&path).unwrap().ino(), inode, "a change is a new file renamed over the old");
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left, ["lb0.track"], "no temporary file is left");
    }

    #[test]
    fn a_track_file_removed_changed_or_not_written_is_written_at_the_next_say() {
        let dir = std::env::temp_dir().join(format!("xdplb-track-keep-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        let _gone = Gone(dir.clone());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = track_path(&dir, "lb0");
        let mut track = TrackFile::default();
        assert_eq!(track.said(), None);
        track.say(&dir, "lb0", true);
        assert_eq!((std::fs::read_to_string(&path).unwrap(), track.said()), ("0\n".into(), Some(true)));

        // keepalived reads a missing file as 0: the next tick puts it back.
        std::fs::remove_file(&path).unwrap();
        track.say(&dir, "lb0", false);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n");
        std::fs::remove_file(&path).unwrap();
        track.say(&dir, "lb0", false);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n", "written again with the same content");
        std::fs::write(&path, "0\n").unwrap();
        track.say(&dir, "lb0", false);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n", "changed behind xdplb's back");

        // A write that fails (a state directory others may write to is
        // refused) is tried again at each call, and succeeds once it can.
        std::fs::remove_file(&path).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        track.say(&dir, "lb0", true);
        assert!(!path.exists());
        assert_eq!(track.said(), Some(false), "what the file said when last written");
        track.say(&dir, "lb0", true);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        track.say(&dir, "lb0", true);
        assert_eq!((std::fs::read_to_string(&path).unwrap(), track.said()), ("0\n".into(), Some(true)));
    }
}
