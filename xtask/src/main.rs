//! `cargo xtask`: the project's one entry point for setup, build, demo, test
//! and bench. Every command first makes sure the machine has what it needs
//! (idempotent: a second run costs nothing).

mod deb;
mod setup;

use std::process::Command;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, set up, demo, test and benchmark xdplb")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what a fresh machine lacks: apt packages, bpf-linker, nightly rust-src.
    Setup,
    /// Set up, then build the eBPF object and the `xdplb` binary (release).
    Build,
    /// Set up, build, and run the demo: a web cluster in network namespaces,
    /// balanced by xdplb, with a live view and a scripted failure story.
    Demo {
        /// The high-availability scene: three xdplb nodes behind a router's
        /// ECMP, BGP through BIRD, flow sync, a node drained and one killed.
        #[arg(long)]
        ha: bool,
        /// Leave the cluster running afterwards and print how to poke at it.
        #[arg(long)]
        keep: bool,
        /// No live table: one line per step and a final SUMMARY line.
        #[arg(long)]
        non_interactive: bool,
        /// Only remove a cluster left by `--keep` (or an interrupted run).
        #[arg(long)]
        clean: bool,
    },
    /// Set up, build (release) and run the benchmarks: per-packet cost against
    /// a floor program, end to end against direct, HAProxy and nftables, and
    /// the control plane at scale. Writes bench/RESULTS.md.
    Bench {
        /// A shorter run (under 5 minutes).
        #[arg(long)]
        quick: bool,
        /// Only one suite: dataplane, e2e or control; or flood, the
        /// dataplane suite's flood case alone.
        #[arg(long)]
        only: Option<String>,
    },
    /// Set up, build `xdplb` (release) and package it as a Debian package:
    /// target/debian/xdplb_VERSION_ARCH.deb (its path is printed).
    Deb {
        /// Package the debug build instead (what `cargo xtask test` installs).
        #[arg(long)]
        debug: bool,
    },
    /// Fuzz for a while: generated and mutated frames through the real
    /// balancer (BPF_PROG_TEST_RUN, needs root), and YAML through the
    /// configuration loader. Prints the seed of any failure and saves the
    /// failing inputs under tests/fuzz/found/. (`cargo xtask test` runs a
    /// short, fixed-seed pass of both.)
    Fuzz {
        /// Seconds for each fuzzer.
        #[arg(long, default_value_t = 60)]
        time: u64,
        /// Replay one batch: the seed a failure printed (hex).
        #[arg(long)]
        seed: Option<String>,
        /// Only one fuzzer: frames or config.
        #[arg(long)]
        only: Option<String>,
    },
    /// Set up, build, check formatting and lints, and run every test.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::run(),
        Cmd::Build => {
            setup::run()?;
            cargo(&["build", "--release", "--bin", "xdplb"])
        }
        Cmd::Demo { ha, keep, non_interactive, clean } => {
            setup::require_root("the demo creates network namespaces and loads eBPF programs")?;
            if clean {
                setup::remove_test_leftovers();
                return Ok(());
            }
            setup::run()?;
            setup::remove_test_leftovers();
            step("building xdplb and the demo (release)");
            let mut build = vec!["build", "--release", "--bin", "xdplb", "--bin", "xdplb-demo"];
            if ha {
                // The group's backends are the tests' HTTP server.
                build.extend(["--bin", "xdplb-test-server"]);
            }
            cargo(&build)?;
            let mut demo = Command::new("target/release/xdplb-demo");
            if ha {
                demo.arg("--ha");
            }
            if keep {
                demo.arg("--keep");
            }
            if non_interactive {
                demo.arg("--non-interactive");
            }
            exec(&mut demo)
        }
        Cmd::Bench { quick, only } => {
            setup::require_root("the benchmarks load eBPF programs and create network namespaces")?;
            setup::run()?;
            setup::remove_test_leftovers();
            step("building xdplb and the benchmarks (release)");
            cargo(&["build", "--release", "--bin", "xdplb", "--bin", "xdplb-bench", "--bin", "xdplb-test-server"])?;
            let mut bench = Command::new("target/release/xdplb-bench");
            if quick {
                bench.arg("--quick");
            }
            if let Some(suite) = only {
                bench.args(["--only", &suite]);
            }
            exec(&mut bench)
        }
        Cmd::Deb { debug } => deb::run(debug),
        Cmd::Fuzz { time, seed, only } => fuzz(time, seed.as_deref(), only.as_deref()),
        Cmd::Test { args } => {
            setup::run()?;
            setup::require_root("the tests load eBPF programs and create network namespaces")?;
            step("checking formatting (cargo fmt --check)");
            cargo(&["fmt", "--all", "--check"])?;
            step("checking lints (cargo clippy --all-targets -- -D warnings)");
            cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
            setup::remove_test_leftovers();
            step("building the xdplb binary the integration tests run");
            cargo(&["build", "--bin", "xdplb"])?;
            step("packaging it for tests/tests/package.rs (cargo xtask deb --debug, without the build)");
            let deb = deb::package(true)?;
            step("running all tests");
            let mut test = vec!["test"];
            test.extend(args.iter().map(String::as_str));
            run_tests(&test, &deb)
        }
    }
}

/// Runs each fuzzer's `long_run` test (ignored by a plain `cargo test`) with
/// its time and seed in the environment.
fn fuzz(time: u64, seed: Option<&str>, only: Option<&str>) -> Result<()> {
    let fuzzers = [("frames", "tests", "fuzz_frames"), ("config", "lb-userspace", "fuzz_config")];
    if let Some(o) = only
        && !fuzzers.iter().any(|(name, _, _)| *name == o)
    {
        bail!("--only takes frames or config, not {o}");
    }
    let chosen: Vec<_> = fuzzers.iter().filter(|(name, _, _)| only.is_none_or(|o| o == *name)).collect();
    if chosen.iter().any(|(name, _, _)| *name == "frames") {
        setup::require_root("the frame fuzzer loads the eBPF object")?;
    }
    setup::run()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    for (name, package, test) in chosen {
        step(&format!("fuzzing {name} for {time} s"));
        let mut cmd = Command::new(&cargo);
        cmd.args(["test", "-p", package, "--test", test, "--", "--ignored", "--exact", "long_run", "--nocapture"])
            .env("XDPLB_FUZZ_TIME", time.to_string());
        if let Some(seed) = seed {
            cmd.env("XDPLB_FUZZ_SEED", seed);
        }
        exec(&mut cmd)?;
    }
    Ok(())
}

/// Runs `cargo test`, passing its output through, and ends with one line
/// that totals every test binary: `tests: N passed, M failed`. The package
/// test installs `deb` (env XDPLB_TEST_DEB).
fn run_tests(args: &[&str], deb: &std::path::Path) -> Result<()> {
    use std::io::{BufRead as _, BufReader};
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut child = Command::new(cargo)
        .args(args)
        .env("XDPLB_TEST_DEB", deb)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("could not start cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        part.trim().strip_suffix(word).map(|n| {
                            n.trim().trim_start_matches("ok.").trim_start_matches("FAILED.").trim().to_string()
                        })
                    })
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0)
            };
            passed += count("passed");
            failed += count("failed");
        }
    }
    let status = child.wait()?;
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    Ok(())
}

/// One line per step, so a log shows where time goes.
pub fn step(what: &str) {
    eprintln!("xtask: {what}");
}

pub fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    exec(Command::new(cargo).args(args))
}

pub fn exec(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
