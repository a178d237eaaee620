//! `cargo xtask`: the project's one entry point for setup, build, demo, test
//! and bench. Every command first makes sure the machine has what it needs
//! (idempotent: a second run costs nothing).

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
        /// Only one suite: dataplane, e2e or control.
        #[arg(long)]
        only: Option<String>,
    },
    /// Set up, build, check formatting and lints, and run every test.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
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
        Cmd::Demo { keep, non_interactive, clean } => {
            setup::require_root("the demo creates network namespaces and loads eBPF programs")?;
            if clean {
                setup::remove_test_leftovers();
                return Ok(());
            }
            setup::run()?;
            setup::remove_test_leftovers();
            step("building xdplb and the demo (release)");
            cargo(&["build", "--release", "--bin", "xdplb", "--bin", "xdplb-demo"])?;
            let mut demo = Command::new("target/release/xdplb-demo");
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
            step("running all tests");
            let mut test = vec!["test"];
            test.extend(args.iter().map(String::as_str));
            cargo(&test)
        }
    }
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
