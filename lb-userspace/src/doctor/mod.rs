//! `xdplb doctor`: finds what makes an XDP balancer silently forward
//! nothing, on the load balancer and on a backend, and says how to fix it.
//!
//! `collect` reads the system into facts; `lb`, `backend` and `bpffs`
//! decide findings from facts without touching the system (tested on
//! facts); `findings` renders them. `xdplb run` calls [`warn_at_start`]
//! to log the load balancer's findings as it starts.

mod backend;
mod bpffs;
mod collect;
mod findings;
mod lb;
pub(crate) mod system;

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, Result, anyhow, bail};
pub use findings::{Finding, Severity};
use tracing::{error, warn};

use crate::{
    config::{self, Config, XdpModeSetting},
    reconcile::Forwarding,
};

/// How packets reach a backend given with `--vip`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendForwarding {
    /// Direct server return: only the MAC address is rewritten.
    Dsr,
    /// IP-in-IP: the packet arrives inside an outer IP header.
    Ipip,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Check this host as a backend (run it there, for example through
    /// `ip netns exec NAMESPACE xdplb doctor --backend ...`).
    #[arg(long)]
    pub backend: bool,
    /// The xdplb configuration: interface, VIPs and their forwarding.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Load balancer: the balanced interface (default: `interface:` of the
    /// file). Backend: the interface facing the balancer (default: every
    /// interface that is up and does ARP).
    #[arg(long)]
    pub iface: Option<String>,
    /// Backend: a VIP this host serves (repeat it for several), instead of --config.
    #[arg(long, requires = "backend", conflicts_with = "config")]
    pub vip: Vec<IpAddr>,
    /// Backend: how the VIPs of --vip reach this host.
    #[arg(long, value_enum, default_value = "dsr", requires = "vip")]
    pub forwarding: BackendForwarding,
    /// The largest IP packet clients send, in bytes: IP-in-IP must carry it
    /// plus 20 (IPv4) or 40 (IPv6) bytes.
    #[arg(long, default_value_t = 1500)]
    pub client_mtu: u32,
}

/// `xdplb doctor`: prints the findings. Exit 0 without errors (warnings
/// may be there), 1 with at least one error, 2 if the checks could not run.
pub fn main(args: &Args, pin_root: &Path, state_dir: &Path) -> Result<ExitCode> {
    match run(args, pin_root, state_dir) {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("xdplb doctor: {e:#}");
            Ok(ExitCode::from(2))
        }
    }
}

fn run(args: &Args, pin_root: &Path, state_dir: &Path) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (findings, subject) = if args.backend {
        let (vips, from) = backend_vips(args)?;
        if vips.is_empty() {
            println!("{from} has no dsr or ipip VIP: a NAT backend needs nothing of this kind");
            return Ok(ExitCode::SUCCESS);
        }
        let facts = collect::backend(vips, args.iface.as_deref(), args.client_mtu, pin_root)?;
        let list: Vec<String> = facts.vips.iter().map(|(a, f)| format!("{a} {}", f.name())).collect();
        (backend::decide(&facts), format!("backend for {}", list.join(", ")))
    } else {
        let config = args.config.as_deref().map(load).transpose()?;
        let iface = args
            .iface
            .clone()
            .or_else(|| config.as_ref().and_then(|c| c.interface.clone()))
            .context("which interface? Pass --iface, or --config with `interface:` in the file")?;
        let input = collect::LbInput {
            starting: false,
            config: config.as_ref(),
            config_file: args.config.as_deref(),
            iface: &iface,
            mode: config.as_ref().map_or(XdpModeSetting::Auto, |c| c.xdp_mode),
            client_mtu: args.client_mtu,
            pin_root,
            state_dir,
        };
        let facts = rt.block_on(collect::lb(&input))?;
        (lb::decide(&facts), format!("load balancer on {iface}"))
    };
    print!("{}", findings::render(&findings, &subject));
    Ok(if findings::has_errors(&findings) { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

fn load(path: &Path) -> Result<Config> {
    config::load(path).map_err(|e| anyhow!("{e}\n{}: {} error(s)", path.display(), e.0.len()))
}

/// The VIPs a backend serves, and where they came from.
fn backend_vips(args: &Args) -> Result<(Vec<(IpAddr, Forwarding)>, String)> {
    if !args.vip.is_empty() {
        let fwd = match args.forwarding {
            BackendForwarding::Dsr => Forwarding::Dsr,
            BackendForwarding::Ipip => Forwarding::Ipip,
        };
        return Ok((args.vip.iter().map(|&a| (a, fwd)).collect(), "--vip".into()));
    }
    let Some(path) = &args.config else {
        bail!("which VIPs? Pass --config FILE, or --vip ADDR [--forwarding dsr|ipip]")
    };
    let mut vips: Vec<(IpAddr, Forwarding)> = load(path)?
        .vips
        .iter()
        .filter(|v| v.forwarding != Forwarding::Nat)
        .map(|v| (v.address, v.forwarding))
        .collect();
    let mut seen = Vec::new();
    vips.retain(|v| {
        let new = !seen.contains(v);
        seen.push(*v);
        new
    });
    Ok((vips, path.display().to_string()))
}

/// Logs the load balancer's findings as `xdplb run` starts (before it
/// attaches): the same checks as `xdplb doctor`, but for the program not
/// being attached yet. Never fails: a check that cannot run says nothing.
///
/// With `--ephemeral` the operator accepted pins that die with the process:
/// the pin-root finding about that is not repeated (start-up warns once).
pub async fn warn_at_start(
    config: &Config,
    config_file: &Path,
    iface: &str,
    mode: XdpModeSetting,
    pin_root: &Path,
    ephemeral: bool,
) {
    let input = collect::LbInput {
        starting: true,
        config: Some(config),
        config_file: Some(config_file),
        iface,
        mode,
        client_mtu: 1500,
        pin_root,
        state_dir: Path::new(""),
    };
    match collect::lb(&input).await {
        Ok(facts) => {
            for f in lb::decide(&facts).into_iter().filter(|f| !(ephemeral && f.check == "pin-root")) {
                match f.severity {
                    Severity::Error => error!(interface = iface, "doctor: {}", f.log_line()),
                    Severity::Warning => warn!(interface = iface, "doctor: {}", f.log_line()),
                }
            }
        }
        Err(e) => warn!(interface = iface, "doctor: the start-up checks could not run: {e:#}"),
    }
}
