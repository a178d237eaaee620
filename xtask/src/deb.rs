//! `cargo xtask deb`: a Debian package of xdplb, installed like any service:
//! the binary, the systemd unit, the configuration as a conffile, examples,
//! shell completions, manual pages and the Grafana dashboard. Completions and
//! manual pages come from the freshly built binary itself, so they always
//! match its command line.

use std::{
    fmt::Write as _,
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{exec, step};

const PACKAGE: &str = "xdplb";
/// The workspace version (xtask shares it).
const VERSION: &str = env!("CARGO_PKG_VERSION");
const CONFFILE: &str = "/etc/xdplb/xdplb.yaml";
const MAINTAINER: &str = "xdplb maintainers <xdplb@example.org>";

const DESCRIPTION: &str = "\
XDP layer-4 load balancer with health checks and hitless reloads
 xdplb attaches an eBPF XDP program to a network interface and forwards
 packets for virtual IPs to real servers (direct server return, IP-in-IP or
 NAT), choosing them with Maglev consistent hashing. Its controller fills the
 dataplane from /etc/xdplb/xdplb.yaml, health-checks the servers, and reloads
 or restarts without dropping a flow.
 .
 This package installs the xdplb.service unit (not enabled: edit the
 configuration first), shell completions, manual pages and a Grafana
 dashboard for its Prometheus metrics.";

/// Maintainer scripts act on systemd only when it runs this machine, and
/// never when dpkg installs into another root (`dpkg --root`, DPKG_ROOT):
/// systemctl would then act on this machine instead of that root.
const SCRIPT_HEAD: &str = r#"#!/bin/sh
set -e

this_root() {
    [ -z "${DPKG_ROOT:-}" ] || [ "$DPKG_ROOT" = / ]
}

this_systemd() {
    this_root && [ -d /run/systemd/system ]
}
"#;

/// The service is not enabled or started: /etc/xdplb/xdplb.yaml must be
/// edited first. A running controller keeps running the old binary until
/// restarted (a restart adopts the pinned dataplane, losing no flow); it is
/// not restarted here because a new version with another map layout needs
/// `xdplb detach` first.
const POSTINST: &str = r#"
if [ "$1" = configure ] && this_systemd; then
    systemctl daemon-reload || true
    if [ -n "$2" ] && systemctl is-active --quiet xdplb.service; then
        echo "xdplb: the running controller is still the old version; 'systemctl restart xdplb' runs the new one (flows are kept)"
    fi
fi
exit 0
"#;

/// On removal, stop the controller and take its programs off the NICs:
/// nothing would manage them any more (stale health, no reloads).
const PRERM: &str = r#"
if [ "$1" = remove ]; then
    if this_systemd; then
        systemctl stop xdplb.service || true
    fi
    if this_root; then
        for dir in /sys/fs/bpf/xdplb/*/; do
            [ -d "$dir" ] || continue
            /usr/bin/xdplb detach --iface "$(basename "$dir")" || true
        done
    fi
fi
exit 0
"#;

const POSTRM: &str = r#"
if [ "$1" = remove ] || [ "$1" = purge ]; then
    if this_systemd; then
        systemctl daemon-reload || true
    fi
fi
if [ "$1" = purge ]; then
    # Left by `systemctl enable xdplb` (WantedBy=multi-user.target).
    rm -f "${DPKG_ROOT:-}/etc/systemd/system/multi-user.target.wants/xdplb.service"
fi
exit 0
"#;

/// Set up, build `xdplb`, package it; prints the package's path.
pub fn run(debug: bool) -> Result<()> {
    crate::setup::run()?;
    step(&format!("building xdplb ({})", if debug { "debug" } else { "release" }));
    if debug {
        crate::cargo(&["build", "--bin", "xdplb"])?;
    } else {
        crate::cargo(&["build", "--release", "--bin", "xdplb"])?;
    }
    let deb = package(debug)?;
    println!("{}", deb.display());
    Ok(())
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace().join("target"))
}

/// target/debian/xdplb_VERSION_ARCH.deb from the `xdplb` binary already
/// built (target/debug or target/release).
pub fn package(debug: bool) -> Result<PathBuf> {
    let root = workspace();
    let binary = target_dir().join(if debug { "debug" } else { "release" }).join("xdplb");
    if !binary.exists() {
        bail!("{} is missing: build it first (cargo xtask deb does)", binary.display());
    }
    let arch = output(Command::new("dpkg").arg("--print-architecture"))
        .context("`dpkg --print-architecture` failed: packages are built on Debian (dpkg is essential there)")?;
    let name = format!("{PACKAGE}_{VERSION}_{arch}");
    let out = target_dir().join("debian");
    let stage = out.join(&name);
    step(&format!("staging {}", stage.display()));
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing the old {} failed", stage.display()))?;
    }

    // The binary, stripped of debug information as Debian's dh_strip does.
    let installed = stage.join("usr/bin/xdplb");
    create_parent(&installed)?;
    exec(Command::new("strip").args(["--strip-debug", "-o"]).arg(&installed).arg(&binary))
        .context("`strip` (binutils, which the Rust linker needs too) failed")?;
    set_mode(&installed, 0o755)?;

    let packaging = root.join("packaging");
    copy(&packaging.join("xdplb.service"), &stage.join("lib/systemd/system/xdplb.service"))?;
    copy(&packaging.join("xdplb.yaml"), &stage.join(CONFFILE.trim_start_matches('/')))?;
    copy(&packaging.join("grafana-dashboard.json"), &stage.join("usr/share/xdplb/grafana-dashboard.json"))?;
    let examples = stage.join("usr/share/doc/xdplb/examples");
    for entry in fs::read_dir(root.join("examples")).context("reading examples/ failed")? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            copy(&path, &examples.join(path.file_name().unwrap()))?;
        }
    }
    // The active/standby pair: keepalived.conf and the xdplb file beside it.
    for name in ["keepalived.conf", "xdplb.yaml"] {
        copy(&root.join("examples/keepalived").join(name), &examples.join("keepalived").join(name))?;
    }

    // Completions and manual pages, from the binary's own command line.
    for (shell, path) in [
        ("bash", "usr/share/bash-completion/completions/xdplb"),
        ("zsh", "usr/share/zsh/vendor-completions/_xdplb"),
        ("fish", "usr/share/fish/vendor_completions.d/xdplb.fish"),
    ] {
        let script = Command::new(&installed)
            .args(["completions", shell])
            .output()
            .with_context(|| format!("running {} failed", installed.display()))?;
        if !script.status.success() || script.stdout.is_empty() {
            bail!("`xdplb completions {shell}` failed: {}", String::from_utf8_lossy(&script.stderr));
        }
        write(&stage.join(path), &script.stdout, 0o644)?;
    }
    let man = stage.join("usr/share/man/man1");
    exec(Command::new(&installed).arg("man").arg("--dir").arg(&man))?;
    for entry in fs::read_dir(&man)? {
        let page = entry?.path();
        set_mode(&page, 0o644)?;
        // -n: no name or time stamp inside, so a rebuild gives the same bytes.
        exec(Command::new("gzip").args(["-9", "-n", "-f"]).arg(&page))?;
    }

    let debian = stage.join("DEBIAN");
    write(&debian.join("conffiles"), format!("{CONFFILE}\n").as_bytes(), 0o644)?;
    for (script, body) in [("postinst", POSTINST), ("prerm", PRERM), ("postrm", POSTRM)] {
        write(&debian.join(script), format!("{SCRIPT_HEAD}{body}").as_bytes(), 0o755)?;
    }
    write(&debian.join("md5sums"), &md5sums(&stage)?, 0o644)?;
    // Directories as dpkg wants them, whatever the umask.
    for dir in dirs(&stage)? {
        set_mode(&dir, 0o755)?;
    }
    write(&debian.join("control"), control(&stage, &arch)?.as_bytes(), 0o644)?;

    let deb = out.join(format!("{name}.deb"));
    step(&format!("building {}", deb.display()));
    exec(Command::new("dpkg-deb").args(["--root-owner-group", "-Zxz", "--build"]).arg(&stage).arg(&deb))?;
    Ok(deb)
}

fn control(stage: &Path, arch: &str) -> Result<String> {
    // Installed-Size as dpkg-gencontrol counts it: KiB per file, rounded up, and one per directory.
    let mut kib = 0u64;
    for file in files(stage)? {
        kib += fs::metadata(&file)?.len().div_ceil(1024);
    }
    kib += dirs(stage)?.len() as u64;
    let maintainer = match (std::env::var("DEBFULLNAME"), std::env::var("DEBEMAIL")) {
        (Ok(name), Ok(email)) => format!("{name} <{email}>"),
        _ => MAINTAINER.to_string(),
    };
    let mut c = String::new();
    writeln!(c, "Package: {PACKAGE}")?;
    writeln!(c, "Version: {VERSION}")?;
    writeln!(c, "Architecture: {arch}")?;
    writeln!(c, "Maintainer: {maintainer}")?;
    writeln!(c, "Installed-Size: {kib}")?;
    // What the binary links (ldd): glibc 2.34+ (merged libpthread) and libgcc_s for unwinding.
    writeln!(c, "Depends: libc6 (>= 2.34), libgcc-s1")?;
    // `xdplb doctor` (and the start-up checks of `xdplb run`) read `ip -j` and `ethtool -k`.
    writeln!(c, "Recommends: bpftool, iproute2, ethtool")?;
    writeln!(c, "Section: net")?;
    writeln!(c, "Priority: optional")?;
    writeln!(c, "Description: {DESCRIPTION}")?;
    Ok(c)
}

/// DEBIAN/md5sums: what `dpkg --verify xdplb` checks the installed files against.
fn md5sums(stage: &Path) -> Result<Vec<u8>> {
    let relative: Vec<PathBuf> =
        files(stage)?.into_iter().map(|f| f.strip_prefix(stage).unwrap().to_path_buf()).collect();
    let out = Command::new("md5sum").current_dir(stage).args(&relative).output().context("running md5sum failed")?;
    if !out.status.success() {
        bail!("md5sum failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

/// Every regular file under `stage`, outside DEBIAN/, sorted.
fn files(stage: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    walk(stage, &mut |p, is_dir| {
        if !is_dir && !p.strip_prefix(stage).unwrap().starts_with("DEBIAN") {
            out.push(p.to_path_buf());
        }
    })?;
    out.sort();
    Ok(out)
}

/// Every directory under `stage`, itself included.
fn dirs(stage: &Path) -> Result<Vec<PathBuf>> {
    let mut out = vec![stage.to_path_buf()];
    walk(stage, &mut |p, is_dir| {
        if is_dir {
            out.push(p.to_path_buf());
        }
    })?;
    Ok(out)
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path, bool)) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {} failed", dir.display()))? {
        let entry = entry?;
        let is_dir = entry.file_type()?.is_dir();
        f(&entry.path(), is_dir);
        if is_dir {
            walk(&entry.path(), f)?;
        }
    }
    Ok(())
}

fn create_parent(path: &Path) -> Result<()> {
    let parent = path.parent().expect("a file in the tree");
    fs::create_dir_all(parent).with_context(|| format!("creating {} failed", parent.display()))
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    create_parent(to)?;
    fs::copy(from, to).with_context(|| format!("copying {} to {} failed", from.display(), to.display()))?;
    set_mode(to, 0o644)
}

fn write(path: &Path, content: &[u8], mode: u32) -> Result<()> {
    create_parent(path)?;
    fs::write(path, content).with_context(|| format!("writing {} failed", path.display()))?;
    set_mode(path, mode)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {} failed", path.display()))
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("could not start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
