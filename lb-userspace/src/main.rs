//! `xdplb`: an XDP layer-4 load balancer for highly available web clusters.

use std::{
    io::{IsTerminal as _, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, Result, bail};
use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum};
use lb_common::maps::programs;
use lb_userspace::{
    attach, config,
    config::XdpModeSetting,
    daemon::{self, RunOptions},
    dataplane::{Dataplane, MapSizes},
    pins, reload,
    runtime::{self, Request, Response},
    show, status, trace,
};

#[derive(Parser)]
#[command(
    name = "xdplb",
    version,
    about = "XDP layer-4 load balancer: VIPs from a YAML file, Maglev hashing, health checks, DSR and IP-in-IP",
    long_about = "xdplb attaches an XDP program to a network interface and forwards packets for virtual IPs (VIPs) \
to real servers, choosing them with Maglev consistent hashing and keeping established flows on their server. \
A controller (`xdplb run`) fills the dataplane from a YAML file, health-checks the servers and reloads on SIGHUP \
or when the file changes.\n\nTypical use:\n  xdplb check --config /etc/xdplb/xdplb.yaml\n  \
xdplb run --config /etc/xdplb/xdplb.yaml   # what xdplb.service runs\n  \
xdplb status\n  kill -HUP $(pidof xdplb)     # reload (systemctl reload xdplb)"
)]
struct Cli {
    /// Directory on a BPF filesystem where maps and links are pinned, one
    /// subdirectory per interface (mounted at /sys/fs/bpf if missing). It must
    /// outlive the process: under `ip netns exec` pass one the host mounted.
    #[arg(long, global = true, env = "XDPLB_PIN_ROOT", default_value = "/sys/fs/bpf/xdplb")]
    pin_root: PathBuf,
    /// Where the running controller publishes its status (IFACE.json).
    #[arg(long, global = true, env = "XDPLB_STATE_DIR", default_value = "/run/xdplb")]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    /// Native (driver) mode if the driver supports it, else generic (skb) mode.
    Auto,
    /// Native mode only: fail if the driver cannot run XDP.
    Driver,
    /// Generic mode: works everywhere, slower.
    Skb,
}

impl From<Mode> for XdpModeSetting {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Auto => XdpModeSetting::Auto,
            Mode::Driver => XdpModeSetting::Driver,
            Mode::Skb => XdpModeSetting::Skb,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Load and attach the load balancer, serve the VIPs of FILE, health-check
    /// the backends; reload on SIGHUP or when FILE changes. A restarted
    /// controller adopts the running dataplane without dropping a flow.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Interface to attach to (overrides `interface:` in the file).
        #[arg(long)]
        iface: Option<String>,
        /// XDP attach mode (overrides `xdp_mode:` in the file).
        #[arg(long, value_enum)]
        xdp_mode: Option<Mode>,
        /// On SIGTERM/SIGINT also detach the XDP program and remove the pinned
        /// maps. Without it the dataplane keeps forwarding with its last state,
        /// so an upgrade or restart loses no traffic.
        #[arg(long)]
        detach_on_exit: bool,
        /// Accept a pin root whose pins die with this process (as /sys/fs/bpf
        /// under `ip netns exec`): the XDP program then stops when xdplb
        /// exits, even by `kill -9`, and a restart cannot adopt the flows.
        #[arg(long)]
        ephemeral: bool,
    },
    /// Validate FILE: exit 0, or print every error as FILE:LINE:COL: field: problem.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Reload the running controller's file and wait for the verdict: print
    /// what changed and exit 0, or print every error and exit 1 (the previous
    /// configuration stays in effect). The unit's ExecReload.
    Reload {
        /// Interface of the controller (default: the only one running).
        #[arg(long)]
        iface: Option<String>,
        /// How long to wait for the verdict, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Show VIPs, backends (health, weight, state, overrides), counters, rates and drop reasons.
    Status {
        /// Interface of the controller to ask (default: the only one running).
        #[arg(long)]
        iface: Option<String>,
        /// Print the status as JSON (with --watch: one line per refresh).
        #[arg(long)]
        json: bool,
        /// Refresh every second until Ctrl-C.
        #[arg(long)]
        watch: bool,
        /// With --watch: stop after N refreshes.
        #[arg(long, value_name = "N", requires = "watch")]
        count: Option<u64>,
    },
    /// A compact table of every VIP and backend, as `ipvsadm -Ln`: scheduler,
    /// forwarding, weight (and the file's, when overridden), state, flows, since.
    Show {
        /// Interface of the controller (default: the only one running).
        #[arg(long)]
        iface: Option<String>,
    },
    /// Set a runtime override of a backend (runtime API; root only).
    Set {
        #[command(subcommand)]
        what: SetCmd,
    },
    /// Drain a backend: weight 0 at run time; established flows continue, new
    /// ones go to the others. Until `xdplb ready`; kept across reloads.
    /// Without VIP and BACKEND: drain the whole node — its BGP routes are
    /// withdrawn and keepalived's track file says fault, so the routers (or
    /// the standby) take its traffic, while its dataplane keeps forwarding
    /// whatever still arrives. Until `xdplb undrain`; kept across restarts.
    Drain(NodeOrBackendArgs),
    /// Serve again after `xdplb drain` (of the node): announce the VIPs again.
    Undrain {
        /// Interface of the controller (default: the only one running).
        #[arg(long)]
        iface: Option<String>,
    },
    /// Put a backend in maintenance: no traffic at all, as if down (its flows
    /// move to the others), while its health checks go on. Until `xdplb ready`.
    Maint(BackendArgs),
    /// Clear a backend's runtime override: it goes back to what the file says.
    Ready(BackendArgs),
    /// Clear the runtime overrides of one VIP, or all of them (--all).
    Clear {
        /// The VIP whose overrides go.
        #[arg(required_unless_present = "all")]
        vip: Option<String>,
        /// Every override of every VIP.
        #[arg(long, conflicts_with = "vip")]
        all: bool,
        /// Interface of the controller (default: the only one running).
        #[arg(long)]
        iface: Option<String>,
    },
    /// Show what XDP does with each packet (tcpdump cannot): VIP, connection
    /// table hit or miss, Maglev slot, backend, rewrite, action and reason.
    /// Optionally write the frames as they left XDP (the first 256 bytes) to
    /// a pcap file. Tracing is on while this runs, off when it ends.
    Trace {
        /// Interface of the controller (default: the only one running).
        #[arg(long)]
        iface: Option<String>,
        /// Only packets of this VIP: its name, ADDRESS or ADDRESS:PORT.
        #[arg(long)]
        vip: Option<String>,
        /// Only packets from this client address (and NAT replies to it).
        #[arg(long)]
        client: Option<std::net::IpAddr>,
        /// Stop after N packets.
        #[arg(short = 'c', long = "count", value_name = "N")]
        count: Option<u64>,
        /// Write the frames as they left XDP to FILE (pcap, for tcpdump -r and Wireshark).
        #[arg(short = 'w', long = "write", value_name = "FILE")]
        write: Option<PathBuf>,
    },
    /// Attach the IP-in-IP decapsulation program on a backend's interface
    /// (for `forwarding: ipip`; this replaces a kernel ipip device).
    Decap {
        #[arg(long)]
        iface: String,
        #[arg(long, value_enum, default_value = "auto")]
        xdp_mode: Mode,
        /// Accept a pin root whose pins die with this process: the program is
        /// detached again when xdplb exits (as `xdplb run --ephemeral`).
        #[arg(long)]
        ephemeral: bool,
        /// Decapsulate only packets whose outer source is in PREFIX (ADDRESS/LEN
        /// or ADDRESS; repeatable): the balancers' ipip_source_v4 and
        /// ipip_source_v6. Default: any source (a warning says so). Other
        /// IP-in-IP packets are dropped (counted refused), so that a kernel
        /// ipip device (tunl0) cannot decapsulate them; traffic that is not
        /// IP-in-IP passes untouched.
        #[arg(long = "allow-source", value_name = "PREFIX")]
        allow_source: Vec<lb_userspace::decap::SourcePrefix>,
        /// Decapsulate only packets whose inner destination is ADDRESS
        /// (repeatable: the VIPs this backend serves). Default: any.
        #[arg(long = "vip", value_name = "ADDRESS")]
        vip: Vec<std::net::IpAddr>,
    },
    /// Attach a pass-everything XDP program: needed on the peer of a veth that
    /// xdplb transmits on, or the veth drops XDP_TX frames.
    Pass {
        #[arg(long)]
        iface: String,
        /// As for `xdplb decap`.
        #[arg(long)]
        ephemeral: bool,
    },
    /// Detach xdplb programs from IFACE and remove its pinned maps.
    Detach {
        #[arg(long)]
        iface: String,
    },
    /// Check what makes a balancer silently forward nothing, on the load
    /// balancer or (--backend) on a backend: each finding says what is wrong,
    /// why it matters and the command that fixes it. Exit 0 without errors
    /// (warnings may be listed), 1 with errors, 2 if the checks could not run.
    Doctor(lb_userspace::doctor::Args),
    /// Print a completion script for SHELL to stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (xdplb.1 and xdplb-COMMAND.1 per command) into DIR.
    Man {
        #[arg(long)]
        dir: PathBuf,
    },
}

/// A backend of a VIP, as the runtime commands name it.
#[derive(clap::Args)]
struct BackendArgs {
    /// The VIP's name (`name:` in the file).
    vip: String,
    /// The backend's address, or ADDRESS:PORT ([V6]:PORT) for one with a port of its own (nat).
    backend: String,
    /// Interface of the controller (default: the only one running).
    #[arg(long)]
    iface: Option<String>,
}

/// `xdplb drain`: a backend of a VIP, or (neither given) the whole node.
#[derive(clap::Args)]
struct NodeOrBackendArgs {
    /// The VIP's name (`name:` in the file); omit both to drain the node.
    #[arg(requires = "backend")]
    vip: Option<String>,
    /// The backend's address, or ADDRESS:PORT ([V6]:PORT) for one with a port of its own (nat).
    backend: Option<String>,
    /// Interface of the controller (default: the only one running).
    #[arg(long)]
    iface: Option<String>,
}

#[derive(Subcommand)]
enum SetCmd {
    /// Give BACKEND weight N instead of the file's, until `xdplb ready` (0 drains).
    Weight {
        #[command(flatten)]
        backend: BackendArgs,
        /// The weight, 0 to 65535.
        #[arg(value_parser = clap::value_parser!(u32).range(0..=65535))]
        weight: u32,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xdplb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Cmd::Check { config: path } => match config::load(&path) {
            Ok(c) => {
                let backends: usize = c.vips.iter().map(|v| v.backends.len()).sum();
                let names: usize = c.vips.iter().map(|v| v.named_backends.len()).sum();
                let names =
                    if names > 0 { format!(", {names} backend names resolved at run time") } else { String::new() };
                println!("{}: ok ({} VIPs, {backends} backends{names})", path.display(), c.vips.len());
                if lb_userspace::hash_seed::unshared_with_bgp(&c) {
                    println!(
                        "warning: bgp: without hash_seed_file or flow_sync: each node hashes flows with a seed of its \
                         own, so a connection ECMP moves to another node changes backend; add `hash_seed_file:` (the \
                         same file on every node)"
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            Err(errs) => {
                println!("{errs}");
                eprintln!("{}: {} error(s)", path.display(), errs.0.len());
                Ok(ExitCode::from(2))
            }
        },
        Cmd::Run { config, iface, xdp_mode, detach_on_exit, ephemeral } => {
            require_root("load and attach eBPF programs")?;
            // Health checks, netlink and metrics run on worker threads, so the
            // control loop's map walks never delay a check.
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            rt.block_on(daemon::run(RunOptions {
                config,
                iface,
                xdp_mode: xdp_mode.map(Into::into),
                pin_root: cli.pin_root,
                state_dir: cli.state_dir,
                detach_on_exit,
                ephemeral,
            }))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Reload { iface, timeout } => {
            let iface = match iface {
                Some(i) => i,
                None => status::only_running(&cli.state_dir)?,
            };
            match reload::reload(&cli.state_dir, &iface, std::time::Duration::from_secs(timeout))? {
                reload::Verdict::Applied { generation, changes } => {
                    println!("{iface}: reload applied, generation {generation}");
                    for c in changes {
                        println!("  {c}");
                    }
                    Ok(ExitCode::SUCCESS)
                }
                reload::Verdict::Rejected { generation, errors } => {
                    println!("{iface}: reload REJECTED, still running generation {generation}");
                    for e in errors {
                        println!("  {e}");
                    }
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Cmd::Status { iface, json, watch, count } => {
            let iface = interface(&cli.state_dir, iface)?;
            let clear = watch && std::io::stdout().is_terminal();
            for shown in 1.. {
                let s = current_status(&cli.pin_root, &cli.state_dir, &iface)?;
                let text = match (json, watch) {
                    (true, false) => serde_json::to_string_pretty(&s)? + "\n",
                    (true, true) => serde_json::to_string(&s)? + "\n",
                    (false, _) => status::render(&s),
                };
                // A terminal shows the latest only, as watch(1) does; a pipe gets each in turn.
                print!("{}{text}", if clear { "\x1b[H\x1b[2J" } else { "" });
                std::io::stdout().flush()?;
                if !watch || count.is_some_and(|c| shown >= c) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Show { iface } => {
            let iface = interface(&cli.state_dir, iface)?;
            let s = current_status(&cli.pin_root, &cli.state_dir, &iface)?;
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
            print!("{}", show::render(&s, now));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Set { what: SetCmd::Weight { backend: b, weight } } => {
            let set = lb_userspace::desired::Override::Weight(weight);
            runtime_command(&cli.state_dir, b.iface, Request::Set { vip: b.vip, backend: b.backend, set })
        }
        Cmd::Drain(b) => match (b.vip, b.backend) {
            (Some(vip), Some(backend)) => {
                let set = lb_userspace::desired::Override::Drain;
                runtime_command(&cli.state_dir, b.iface, Request::Set { vip, backend, set })
            }
            _ => runtime_command(&cli.state_dir, b.iface, Request::Node { drained: true }),
        },
        Cmd::Undrain { iface } => runtime_command(&cli.state_dir, iface, Request::Node { drained: false }),
        Cmd::Maint(b) => {
            let set = lb_userspace::desired::Override::Maint;
            runtime_command(&cli.state_dir, b.iface, Request::Set { vip: b.vip, backend: b.backend, set })
        }
        Cmd::Ready(b) => runtime_command(&cli.state_dir, b.iface, Request::Ready { vip: b.vip, backend: b.backend }),
        Cmd::Clear { vip, all: _, iface } => runtime_command(&cli.state_dir, iface, Request::Clear { vip }),
        Cmd::Trace { iface, vip, client, count, write } => {
            require_root("trace the XDP program")?;
            let iface = match iface {
                Some(i) => i,
                None => trace::default_iface(&cli.pin_root, &cli.state_dir)?,
            };
            let names = trace::VipNames::read(&cli.state_dir, &iface);
            let filter = trace::Filter { vip: vip.map(|v| trace::parse_vip(&v, &names)).transpose()?, client };
            let opts =
                trace::Options { pin_root: cli.pin_root, state_dir: cli.state_dir, iface, filter, count, pcap: write };
            let summary = trace::run(&opts, &mut std::io::stdout().lock())?;
            eprintln!("xdplb: {summary}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Decap { iface, xdp_mode, ephemeral, allow_source, vip } => {
            require_root("attach eBPF programs")?;
            let opts = lb_userspace::decap::Options {
                iface,
                mode: xdp_mode.into(),
                ephemeral,
                allow_sources: allow_source,
                vips: vip,
            };
            let how = lb_userspace::decap::attach(&cli.pin_root, &opts)?;
            println!("{}: {} attached ({how:?})", opts.iface, programs::DECAP);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Pass { iface, ephemeral } => {
            attach_helper(&cli.pin_root, &iface, programs::PASS, XdpModeSetting::Auto, "pass_link", ephemeral)
        }
        Cmd::Doctor(args) => lb_userspace::doctor::main(&args, &cli.pin_root, &cli.state_dir),
        Cmd::Detach { iface } => {
            require_root("detach eBPF programs")?;
            if let Ok(s) = status::read(&cli.state_dir, &iface)
                && status::pid_alive(s.pid)
            {
                bail!("xdplb run (pid {}) is serving {iface}; stop it first (kill {}), then detach", s.pid, s.pid);
            }
            let dir = cli.pin_root.join(&iface);
            // A controller whose status lives in another state dir still holds the lock.
            let _lock = if dir.exists() { Some(pins::lock(&dir, &iface)?) } else { None };
            let any = pins::remove_all(&dir)?;
            println!("{iface}: {}", if any { "xdplb detached" } else { "nothing of xdplb was attached" });
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "xdplb", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Man { dir } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {} failed", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), &dir)
                .with_context(|| format!("writing manual pages into {} failed", dir.display()))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn attach_helper(
    pin_root: &std::path::Path,
    iface: &str,
    program: &str,
    mode: XdpModeSetting,
    pin: &str,
    ephemeral: bool,
) -> Result<ExitCode> {
    require_root("attach eBPF programs")?;
    pins::ensure_bpffs(pin_root, ephemeral)?;
    let dir = pin_root.join(iface);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {} failed", dir.display()))?;
    // Small maps: only the program's counters matter here.
    let sizes = MapSizes { max_vips: 1, max_backends: 1, conntrack: 1, maglev_pool: 1024, nat_table: 1 };
    let mut dp = Dataplane::load(sizes)?;
    let how = attach::attach(&mut dp, program, iface, mode, &dir.join(pin))?;
    println!("{iface}: {program} attached ({how:?})");
    Ok(ExitCode::SUCCESS)
}

/// The interface named, or the only one a controller runs on.
fn interface(state_dir: &Path, iface: Option<String>) -> Result<String> {
    match iface {
        Some(i) => Ok(i),
        None => status::only_running(state_dir),
    }
}

/// The running controller's status, or, with none, what its pinned dataplane holds.
fn current_status(pin_root: &Path, state_dir: &Path, iface: &str) -> Result<status::Status> {
    if let Some(s) = status::read(state_dir, iface).ok().filter(|s| status::pid_alive(s.pid)) {
        return Ok(s);
    }
    let dir = pin_root.join(iface);
    let nothing = || {
        anyhow::anyhow!(
            "nothing of xdplb runs on {iface}: no controller status and no pinned maps in {}",
            dir.display()
        )
    };
    if !dir.exists() {
        return Err(nothing());
    }
    require_root("read pinned BPF maps")?;
    // Read only a complete set of this build's layout: a changed struct would be read into a buffer of the wrong size.
    match pins::verify(&dir, iface)? {
        pins::Pinned::Nothing => return Err(nothing()),
        pins::Pinned::Version1 => anyhow::bail!(
            "the dataplane pinned in {} has map layout version 1 (an older xdplb), which this one reads only after \
             migrating it: start `xdplb run` for {iface}, which migrates it in place, keeping its flows",
            dir.display()
        ),
        pins::Pinned::Dataplane => {}
    }
    let dp = Dataplane::open(MapSizes::default(), Some(&dir))?;
    eprintln!("xdplb: no controller runs for {iface}; this is what its pinned dataplane holds");
    Ok(status::from_pinned(&dp, iface))
}

/// A runtime command: its lines on stdout, or its error (exit 1).
fn runtime_command(state_dir: &Path, iface: Option<String>, request: Request) -> Result<ExitCode> {
    let iface = interface(state_dir, iface)?;
    match runtime::call(state_dir, &iface, &request, std::time::Duration::from_secs(30))? {
        Response::Done { lines } => {
            for l in lines {
                println!("{l}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Response::Error { error } => bail!("{error}"),
        other => bail!("unexpected answer from the controller: {other:?}"),
    }
}

fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    // A service started without root (systemd's AmbientCapabilities=) may hold just these.
    let capable = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| has_bpf_capabilities(&s));
    if !root && !capable {
        bail!("xdplb needs root (or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN) to {what}; run it with sudo");
    }
    Ok(())
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Whether the effective set (`CapEff:` of /proc/self/status) holds CAP_BPF,
/// CAP_PERFMON and CAP_NET_ADMIN: what loading and attaching the XDP program
/// needs (without CAP_PERFMON the verifier refuses its pointer arithmetic).
fn has_bpf_capabilities(proc_status: &str) -> bool {
    let effective = proc_status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let needed = (1u64 << CAP_BPF) | (1u64 << CAP_PERFMON) | (1u64 << CAP_NET_ADMIN);
    effective & needed == needed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_bpf_cap_perfmon_and_cap_net_admin_are_all_needed() {
        let status = |eff: u64| format!("Name:\txdplb\nCapInh:\t0000000000000000\nCapEff:\t{eff:016x}\n");
        assert!(has_bpf_capabilities(&status(0x0000_01ff_feff_ffff)), "root's full set");
        assert!(has_bpf_capabilities(&status((1 << 39) | (1 << 38) | (1 << 12))), "exactly the three");
        assert!(!has_bpf_capabilities(&status((1 << 39) | (1 << 12))), "no CAP_PERFMON");
        assert!(!has_bpf_capabilities(&status(1 << 39)), "CAP_BPF alone");
        assert!(!has_bpf_capabilities(&status(1 << 12)), "CAP_NET_ADMIN alone");
        assert!(!has_bpf_capabilities("Name:\txdplb\n"), "no CapEff line");
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
