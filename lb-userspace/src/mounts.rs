//! The mounts a process sees (/proc/PID/mountinfo), for deciding whether a
//! BPF filesystem outlives the process: shared by `pins` (which refuses a
//! pin root that dies with the process) and `doctor` (which reports it).

use std::path::PathBuf;

/// One line of /proc/PID/mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub id: u32,
    /// The filesystem instance, `major:minor`: the same in every namespace that shows it.
    pub dev: String,
    pub mount_point: PathBuf,
    /// Optional fields: `shared:N`, `master:N`, `propagate_from:N`, `unbindable`.
    pub propagation: Vec<String>,
    pub fstype: String,
}

impl Mount {
    /// Mounts that propagate to or from another peer group.
    pub fn propagates(&self) -> bool {
        self.propagation.iter().any(|p| p.starts_with("shared:") || p.starts_with("master:"))
    }
}

/// /proc/PID/mountinfo (proc(5)): `ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER`.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (head, tail) = line.split_once(" - ")?;
            let mut f = head.split(' ');
            let id = f.next()?.parse().ok()?;
            let _parent = f.next()?;
            let dev = f.next()?.to_string();
            let _root = f.next()?;
            let mount_point = PathBuf::from(unescape_octal(f.next()?));
            let _options = f.next()?;
            let propagation = f.map(str::to_string).collect();
            let fstype = tail.split(' ').next()?.to_string();
            Some(Mount { id, dev, mount_point, propagation, fstype })
        })
        .collect()
}

/// Mount points escape space, tab, newline and backslash as `\NNN` (octal).
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
            && let Ok(n) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(n);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount that holds `path` (absolute, symlinks resolved): the one with
/// the longest mount point above it, the last of those (the top of a stack).
pub fn mount_of<'a>(mounts: &'a [Mount], path: &std::path::Path) -> Option<&'a Mount> {
    let mut best: Option<&Mount> = None;
    for m in mounts {
        if path.starts_with(&m.mount_point)
            && best.is_none_or(|b| m.mount_point.components().count() >= b.mount_point.components().count())
        {
            best = Some(m);
        }
    }
    best
}

/// `PPid:` of /proc/PID/status.
pub fn parse_ppid(status: &str) -> Option<u32> {
    status.lines().find_map(|l| l.strip_prefix("PPid:")).and_then(|v| v.trim().parse().ok())
}
