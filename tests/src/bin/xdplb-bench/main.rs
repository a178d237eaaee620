//! `cargo xtask bench`: xdplb's speed, side by side with the alternatives in
//! the same run, reported as ratios. Numbers are reported, never asserted.
//!
//! Writes bench/RESULTS.md, target/bench/results.jsonl and
//! target/bench/e2e-ratios.png, and prints every figure as it is measured.
//! Flags: --quick (under 5 minutes), --only SUITE (dataplane, e2e, control),
//! or --only flood for the dataplane suite's flood case alone.

mod control;
mod dataplane;
mod e2e;
mod flood;
mod report;

use std::{path::PathBuf, process::Command, time::Instant};

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).cloned();
    let wants = |s: &str| only.as_deref().is_none_or(|o| o == s);
    let started = Instant::now();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let mut report = report::Report::default();
    if wants("dataplane") {
        dataplane::run(&mut report, quick);
    } else if only.as_deref() == Some("flood") {
        flood::run(&mut report, quick);
    }
    if wants("e2e") {
        e2e::run(&mut report, quick);
    }
    if wants("control") {
        control::run(&mut report, quick);
    }
    let cpu = sh("sh", &["-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"]);
    let header = format!(
        "# xdplb benchmark results\n\n{} run of {}, on {} ({} cores, {}), kernel {}, in {:.0} s.\n\
         Reproduce with `cargo xtask bench` (or `--quick`). Ratios: ns ÷ floor's ns (lower is better); \
         requests or throughput ÷ direct's (higher is better).\n",
        if quick { "A quick" } else { "A full" },
        sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        sh("hostname", &[]),
        sh("nproc", &[]),
        cpu.trim(),
        sh("uname", &["-r"]),
        started.elapsed().as_secs_f64()
    );
    let md = report.markdown(&header);
    std::fs::create_dir_all(root.join("bench")).unwrap();
    std::fs::write(root.join("bench/RESULTS.md"), &md).unwrap();
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("results.jsonl"), report.jsonl()).unwrap();
    if let Err(e) = report.chart(&out.join("e2e-ratios.png")) {
        eprintln!("chart not drawn: {e}");
    }
    println!("\n{md}");
    println!("wrote bench/RESULTS.md, target/bench/results.jsonl, target/bench/e2e-ratios.png");
}
