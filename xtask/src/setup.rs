//! Idempotent machine setup: each step checks first and says what it does.
//! The steps and versions are the verified ones in ../shared/TOOLCHAIN.md.

use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

use crate::{exec, step};

/// Debian packages: LLVM for bpf-linker, then the tools tests, demo and
/// benchmarks drive (iproute2 for namespaces, nginx as demo web servers,
/// MariaDB as the replicated database tier of the database test, which runs
/// its own `mariadbd` processes and never the package's service,
/// dnsmasq-base as the DNS server of the backends-by-name test (the binary
/// only: no service that would take port 53 on the host),
/// haproxy/nftables/wrk/iperf3 as the alternatives benchmarked, a font for
/// the benchmark chart).
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "iproute2",
    "ethtool",
    "bpftool",
    "tcpdump",
    "curl",
    "nginx",
    "mariadb-server",
    "mariadb-client",
    "dnsmasq-base",
    "haproxy",
    "nftables",
    "wrk",
    "iperf3",
    "fonts-dejavu-core",
    // Headless browser of the status page test (tests/tests/status_page.rs).
    "chromium",
    // Certificates for the HTTPS check tests (openssl), the README's CA file
    // (ca-certificates), `systemd-analyze verify` of the unit (systemd): on
    // the base image already, named so a leaner machine gets them too.
    "openssl",
    "ca-certificates",
    "systemd",
    // High availability (tests/tests/{ha,vrrp}.rs, `cargo xtask demo --ha`):
    // BGP announcement through BIRD, an active/standby pair through keepalived.
    "bird2",
    "keepalived",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> Result<()> {
    apt_packages()?;
    bpf_linker()?;
    rust_src()?;
    Ok(())
}

pub fn require_root(why: &str) -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("run this as root: {why}");
    }
    Ok(())
}

fn quiet(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", p]).output();
            !out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        step("setup: apt packages present");
        return Ok(());
    }
    require_root("installing apt packages")?;
    step(&format!("setup: installing apt packages: {}", missing.join(" ")));
    exec(Command::new("apt-get").args(["update", "-q"]).stdout(Stdio::null()))?;
    exec(
        Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null()),
    )
    .context("apt-get install failed")
}

fn bpf_linker() -> Result<()> {
    let have = Command::new("bpf-linker").arg("--version").output();
    if let Ok(out) = have
        && String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION)
    {
        step(&format!("setup: bpf-linker {BPF_LINKER_VERSION} present"));
        return Ok(());
    }
    step(&format!("setup: installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 2 minutes)"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    exec(
        Command::new(cargo)
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
    )
    .context("installing bpf-linker failed (is llvm-22-dev installed?)")
}

fn rust_src() -> Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("rustup is needed to build the eBPF program with the nightly toolchain")?;
    if String::from_utf8_lossy(&out.stdout).lines().any(|l| l.starts_with("rust-src")) {
        step("setup: nightly rust-src present");
        return Ok(());
    }
    step("setup: adding rust-src to the nightly toolchain");
    if !quiet(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"])) {
        bail!("`rustup component add rust-src --toolchain nightly` failed");
    }
    Ok(())
}

/// Namespaces and BPF filesystems of test runs that were killed before they
/// could clean up (every test removes its own otherwise). Only names the
/// tests create are touched: namespaces `xdplbt-*`, mounts under
/// /tmp/xdplb-test-*.
pub fn remove_test_leftovers() {
    let out = Command::new("ip").args(["netns", "list"]).output();
    let names: Vec<String> = out
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let stale: Vec<&String> = names.iter().filter(|n| n.starts_with("xdplbt-")).collect();
    let tmp = std::env::temp_dir();
    let dirs: Vec<std::path::PathBuf> = std::fs::read_dir(&tmp)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("xdplb-test-")))
                .collect()
        })
        .unwrap_or_default();
    if stale.is_empty() && dirs.is_empty() {
        return;
    }
    step(&format!("removing {} namespaces and {} directories left by interrupted test runs", stale.len(), dirs.len()));
    for n in stale {
        // Servers and controllers still running in the namespace go first.
        if let Ok(out) = Command::new("ip").args(["netns", "pids", n]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        quiet(Command::new("ip").args(["netns", "del", n]));
    }
    for d in dirs {
        quiet(Command::new("umount").arg("-l").arg(d.join("bpffs")));
        let _ = std::fs::remove_dir_all(d);
    }
}
