//! `xdplb trace`: what XDP did with each packet, which tcpdump cannot see
//! (it sees frames before XDP, and never those XDP transmits).
//!
//! The controller attaches the untraced balancer, so tracing costs nothing
//! while it is off. `xdplb trace` loads the traced build of the same program
//! (`programs::TRACED`, sharing the pinned maps), checks that the link runs
//! this build's balancer (same instructions: same tag), and swaps the traced
//! one into the link with `bpf_link_update` (atomic, BPF_F_REPLACE: only if
//! the link still runs what it looked at). The traced program writes each
//! packet's decision and first 256 bytes, as they left XDP, to a ring buffer.
//! On exit, Ctrl-C or SIGTERM it swaps the balancer back.
//!
//! The switch `TRACE_CONFIG` holds a deadline that `xdplb trace` pushes 5 s
//! ahead every second: when a trace is killed (`kill -9`), the program stops
//! writing events within 5 s, and the controller, seeing the deadline past,
//! puts its untraced program back (`switch_off_abandoned`).

use std::{
    collections::HashMap,
    fmt::{self, Write as _},
    fs::File,
    io::{BufWriter, Write},
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::programs::ProgramFd;
use lb_common::{
    maps::{FWD_DSR, FWD_IPIP, FWD_NAT, PROTO_TCP, PROTO_UDP, programs},
    reasons,
    trace::{
        TRACE_F_BACKEND, TRACE_F_FLOW, TRACE_F_MAGLEV, TRACE_F_NAT_REPLY, TRACE_F_VIP, TRACE_F_VIP_ADDR, TRACE_POLL_MS,
        TRACE_RING_BYTES, TRACE_SNAPLEN, TraceConfig, TraceEvent, TraceRecord,
    },
};
use tracing::{info, warn};

use crate::{
    addr, attach,
    dataplane::{Dataplane, MapSizes},
    pcap::PcapWriter,
    status,
};

/// How long a trace stays on without being renewed.
pub const LEASE: Duration = Duration::from_secs(5);
/// The links the balancer may run in (see `daemon`): the client-facing
/// interface's and, for two-armed NAT, the backend-facing one's.
const LINKS: [&str; 2] = ["link", "backend_link"];

/// CLOCK_MONOTONIC in nanoseconds: the clock of bpf_ktime_get_ns().
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec, which we own.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Which packets to show.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// A VIP address, and port (0: any).
    pub vip: Option<(IpAddr, u16)>,
    pub client: Option<IpAddr>,
}

impl Filter {
    /// The switch that turns tracing on with this filter until `deadline_ns`.
    pub fn config(&self, deadline_ns: u64, owner_pid: u32) -> TraceConfig {
        let mut c = TraceConfig { deadline_ns, owner_pid, ..Default::default() };
        if let Some((a, port)) = self.vip {
            c.vip_addr = addr::words(a);
            c.vip_family = addr::family(a);
            c.vip_port = port.to_be();
        }
        if let Some(a) = self.client {
            c.client_addr = addr::words(a);
            c.client_family = addr::family(a);
        }
        c
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.vip {
            Some((a, 0)) => write!(f, " VIP {a}")?,
            Some((a, p)) => write!(f, " VIP {}", SocketAddr::new(a, p))?,
            None => {}
        }
        if let Some(c) = self.client {
            write!(f, " client {c}")?;
        }
        Ok(())
    }
}

/// VIP names from the running controller's status, for display and `--vip NAME`.
#[derive(Debug, Default)]
pub struct VipNames(Vec<(IpAddr, u16, u8, String)>);

impl VipNames {
    /// The names the controller of `iface` publishes; none without one.
    pub fn read(state_dir: &Path, iface: &str) -> Self {
        let Ok(s) = status::read(state_dir, iface) else { return Self::default() };
        Self(
            s.vips
                .into_iter()
                .filter_map(|v| {
                    let proto = if v.protocol == "udp" { PROTO_UDP } else { PROTO_TCP };
                    Some((v.address.parse().ok()?, v.port, proto, v.name))
                })
                .collect(),
        )
    }

    pub fn name(&self, addr: IpAddr, port: u16, protocol: u8) -> Option<&str> {
        self.0.iter().find(|(a, p, pr, _)| *a == addr && *p == port && *pr == protocol).map(|(.., n)| n.as_str())
    }

    fn by_name(&self, name: &str) -> Option<(IpAddr, u16)> {
        self.0.iter().find(|(.., n)| n == name).map(|(a, p, ..)| (*a, *p))
    }
}

/// `--vip`: ADDRESS, ADDRESS:PORT ([V6]:PORT) or a VIP name.
pub fn parse_vip(s: &str, names: &VipNames) -> Result<(IpAddr, u16)> {
    if let Ok(a) = s.parse::<IpAddr>() {
        return Ok((a, 0));
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok((sa.ip(), sa.port()));
    }
    if let Some(v) = names.by_name(s) {
        return Ok(v);
    }
    bail!("--vip {s}: neither an address, ADDRESS:PORT nor the name of a VIP of the running controller")
}

/// The interface to trace when none is given: the only controller's, or
/// the only one with a pinned link.
pub fn default_iface(pin_root: &Path, state_dir: &Path) -> Result<String> {
    if let Ok(i) = status::only_running(state_dir) {
        return Ok(i);
    }
    let with_link: Vec<String> = std::fs::read_dir(pin_root)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().join("link").exists())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    match with_link.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("xdplb is attached to no interface (no pinned link under {})", pin_root.display()),
        many => bail!("xdplb is attached to {}: choose one with --iface", many.join(", ")),
    }
}

/// A ring buffer record: the event and the frame bytes it carries.
pub fn parse_record(bytes: &[u8]) -> Option<(TraceEvent, &[u8])> {
    let head = size_of::<TraceEvent>();
    if bytes.len() < head {
        return None;
    }
    // SAFETY: at least size_of::<TraceEvent>() bytes; TraceEvent is
    // #[repr(C)] integers only, valid for any bit pattern; read unaligned.
    let e = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<TraceEvent>()) };
    let frame = &bytes[head..];
    Some((e, &frame[..(e.cap_len as usize).min(frame.len())]))
}

fn action_name(action: u32) -> String {
    match action {
        0 => "XDP_ABORTED".into(),
        1 => "XDP_DROP".into(),
        2 => "XDP_PASS".into(),
        3 => "XDP_TX".into(),
        4 => "XDP_REDIRECT".into(),
        n => format!("action_{n}"),
    }
}

fn reason_name(reason: u32) -> &'static str {
    reasons::NAMES.get(reason as usize).copied().unwrap_or("unknown")
}

fn endpoint(a: IpAddr, port: u16) -> String {
    SocketAddr::new(a, port).to_string()
}

fn protocol_name(p: u8) -> String {
    match p {
        PROTO_TCP => "tcp".into(),
        PROTO_UDP => "udp".into(),
        1 => "icmp".into(),
        58 => "icmp6".into(),
        n => format!("proto-{n}"),
    }
}

/// TCP flags as tcpdump writes them: S, F, R, P, U, and `.` for ACK.
fn tcp_flags(f: u8) -> String {
    let mut s = String::new();
    for (bit, c) in [(0x02, 'S'), (0x01, 'F'), (0x04, 'R'), (0x08, 'P'), (0x20, 'U'), (0x10, '.')] {
        if f & bit != 0 {
            s.push(c);
        }
    }
    if s.is_empty() { "none".into() } else { s }
}

/// What a frame is, for packets the program did not parse as TCP/UDP.
fn frame_summary(frame: &[u8]) -> String {
    let Some(ethertype) = frame.get(12..14).map(|t| u16::from_be_bytes([t[0], t[1]])) else {
        return "runt frame".into();
    };
    let ip = &frame[14..];
    match ethertype {
        0x0800 if ip.len() >= 20 => {
            let (src, dst) =
                (IpAddr::from([ip[12], ip[13], ip[14], ip[15]]), IpAddr::from([ip[16], ip[17], ip[18], ip[19]]));
            let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
            format!("{src} > {dst} {}{}", protocol_name(ip[9]), if fragment { " fragment" } else { "" })
        }
        0x86dd if ip.len() >= 40 => {
            let a = |i: usize| IpAddr::from(<[u8; 16]>::try_from(&ip[i..i + 16]).unwrap());
            format!("{} > {} next-header {}", a(8), a(24), ip[6])
        }
        0x0800 | 0x86dd => "truncated IP".into(),
        0x0806 => "ARP".into(),
        t => format!("ethertype 0x{t:04x}"),
    }
}

/// One line per packet: what came in, then the decision, as key=value.
pub fn describe(e: &TraceEvent, frame: &[u8], names: &VipNames, iface: &str) -> String {
    let mut s = format!("{iface} ");
    let family = e.flow.family;
    if e.flags & TRACE_F_FLOW != 0 {
        let (src, dst) = (addr::from_words(&e.flow.src, family), addr::from_words(&e.flow.dst, family));
        let (sport, dport) = (u16::from_be(e.flow.sport), u16::from_be(e.flow.dport));
        let _ = write!(s, "{} > {} {}", endpoint(src, sport), endpoint(dst, dport), protocol_name(e.flow.protocol));
        if e.flow.protocol == PROTO_TCP {
            let _ = write!(s, " [{}]", tcp_flags(e.tcp_flags));
        }
    } else {
        s.push_str(&frame_summary(frame));
    }
    let _ = write!(s, " len={}", e.frame_len);
    if e.flags & (TRACE_F_VIP | TRACE_F_NAT_REPLY) != 0 {
        let a = addr::from_words(&e.vip_addr, family);
        let port = u16::from_be(e.vip_port);
        let vip = match names.name(a, port, e.flow.protocol) {
            Some(n) => n.to_string(),
            None => format!("{}/{}", endpoint(a, port), protocol_name(e.flow.protocol)),
        };
        let _ = write!(s, " vip={vip}");
    } else if e.flags & TRACE_F_VIP_ADDR != 0 {
        let _ = write!(s, " vip_address={}", addr::from_words(&e.vip_addr, family));
    } else {
        s.push_str(" vip=none");
    }
    if matches!(
        e.conntrack,
        reasons::CONNTRACK_HIT
            | reasons::CONNTRACK_MISS
            | reasons::CONNTRACK_STALE
            | reasons::CONNTRACK_SYN_RESCHEDULED
            | reasons::CONNTRACK_CONFIRMED
            | reasons::CONNTRACK_FLOOD
            | reasons::CONNTRACK_EXPIRED
    ) {
        let _ = write!(s, " conntrack={}", reason_name(e.conntrack).trim_start_matches("conntrack_"));
    }
    if e.flags & TRACE_F_MAGLEV != 0 {
        let _ = write!(s, " maglev_slot={} hash={:#010x}", e.maglev_slot, e.hash);
    }
    if e.flags & TRACE_F_BACKEND != 0 {
        let a = addr::from_words(&e.backend_addr, family);
        let b = match u16::from_be(e.backend_port) {
            0 => a.to_string(),
            p => endpoint(a, p),
        };
        let _ = write!(s, " backend={b} backend_id={}", e.backend_id);
    }
    let forwarded = e.reason == reasons::TX || e.reason == reasons::NAT_REPLY;
    if forwarded {
        let rewrite = if e.flags & TRACE_F_NAT_REPLY != 0 {
            "nat-reply"
        } else {
            match e.forwarding as u32 {
                FWD_DSR => "dsr",
                FWD_IPIP => "ipip",
                FWD_NAT => "nat",
                _ => "unknown",
            }
        };
        let _ = write!(s, " rewrite={rewrite}");
    }
    let _ = write!(s, " action={} reason={}", action_name(e.action), reason_name(e.reason));
    s
}

/// `HH:MM:SS.micros` in local time.
fn clock_time(unix_ns: u64) -> String {
    let secs = (unix_ns / 1_000_000_000) as libc::time_t;
    // SAFETY: localtime_r reads `secs` and fills `tm`, both ours; an all-zero tm is valid.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&secs, &mut tm);
        tm
    };
    format!("{:02}:{:02}:{:02}.{:06}", tm.tm_hour, tm.tm_min, tm.tm_sec, unix_ns % 1_000_000_000 / 1000)
}

fn iface_name(ifindex: u32, cache: &mut HashMap<u32, String>) -> String {
    cache
        .entry(ifindex)
        .or_insert_with(|| {
            let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
            // SAFETY: if_indextoname writes at most IF_NAMESIZE bytes, NUL included, into buf.
            let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
            if p.is_null() {
                format!("if{ifindex}")
            } else {
                // SAFETY: on success buf holds a NUL-terminated name.
                unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned()
            }
        })
        .clone()
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// SIGINT, SIGTERM and SIGHUP end the trace (and interrupt its poll).
fn stop_on_signals() -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: an all-zero sigaction is valid; the handler only stores to
        // an atomic, which is async-signal-safe. No SA_RESTART: poll returns EINTR.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("installing a signal handler failed");
        }
    }
    Ok(())
}

pub struct Options {
    pub pin_root: PathBuf,
    pub state_dir: PathBuf,
    pub iface: String,
    pub filter: Filter,
    /// Stop after this many packets.
    pub count: Option<u64>,
    /// Write the frames as they left XDP to this pcap file.
    pub pcap: Option<PathBuf>,
}

pub struct Summary {
    pub iface: String,
    pub traced: u64,
    /// Events the ring buffer had no room for (the reader fell behind).
    pub lost: u64,
    /// Why the trace ended.
    pub ended: String,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} packets traced", self.traced)?;
        if self.lost > 0 {
            write!(f, ", {} more lost (the ring buffer was full: the output is slower than the traffic)", self.lost)?;
        }
        write!(f, "; {}; tracing is off on {}", self.ended, self.iface)
    }
}

/// One link swapped to the traced program, and what goes back into it.
struct Swapped {
    link: PathBuf,
    restore: ProgramFd,
}

/// The traced program in the links; `Drop` swaps the untraced one back and
/// clears the switch, also when the trace ends by an error.
struct Session {
    dp: Dataplane,
    traced: ProgramFd,
    traced_id: u32,
    swapped: Vec<Swapped>,
}

impl Session {
    /// Whether every swapped link still runs the traced program.
    fn still_traced(&self) -> Result<bool> {
        for s in &self.swapped {
            if !s.link.exists() || attach::link_program_id(&s.link)? != self.traced_id {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        for s in self.swapped.drain(..) {
            // Gone: `xdplb detach` removed the link (and with it the program).
            // false: the controller put its own program in meanwhile. Nothing to undo.
            if !s.link.exists() {
                continue;
            }
            if let Err(e) = attach::swap_if_current(&s.link, s.restore.as_fd(), self.traced.as_fd()) {
                eprintln!("xdplb: putting the untraced program back into {} failed: {e:#}", s.link.display());
            }
        }
        if self.dp.trace_config().is_ok_and(|c| c.owner_pid == std::process::id())
            && let Err(e) = self.dp.set_trace_config(&TraceConfig::default())
        {
            eprintln!("xdplb: clearing the trace switch failed: {e:#}");
        }
    }
}

/// Turns tracing on, prints a line per packet to `out` (and writes the
/// frames to the pcap file) until `count` packets, a signal, or the program
/// being replaced; turns tracing off again.
pub fn run(opts: &Options, out: &mut dyn Write) -> Result<Summary> {
    let pin_dir = opts.pin_root.join(&opts.iface);
    let links: Vec<PathBuf> = LINKS.iter().map(|l| pin_dir.join(l)).filter(|p| p.exists()).collect();
    if links.is_empty() {
        bail!(
            "no xdplb program is attached to {}: no pinned link in {} (is `xdplb run` serving it?)",
            opts.iface,
            pin_dir.display()
        );
    }
    stop_on_signals()?;
    let mut dp = Dataplane::open_with_trace_ring(MapSizes::default(), Some(&pin_dir), TRACE_RING_BYTES)?;
    let mut events = dp.take_trace_events()?;
    let me = std::process::id();
    let held = dp.trace_config()?;
    if held.deadline_ns > monotonic_ns() && held.owner_pid != me && status::pid_alive(held.owner_pid) {
        bail!("xdplb trace (pid {}) is already tracing {}: one trace at a time", held.owner_pid, opts.iface);
    }
    let balancer = dp.program(programs::BALANCER)?;
    let balancer_tag = balancer.info()?.tag();
    let balancer_fd = balancer.fd()?.try_clone()?;
    let traced_prog = dp.load_traced()?;
    let traced_info = traced_prog.info()?;
    let traced = traced_prog.fd()?.try_clone()?;

    // What each link runs now, and what goes back into it afterwards.
    let mut plan = Vec::new();
    for link in &links {
        let running = attach::program_by_id(attach::link_program_id(link)?)?;
        let restore = if running.tag() == balancer_tag {
            running.fd()?
        } else if running.tag() == traced_info.tag() {
            // Left by a trace that was killed: this build's balancer goes back.
            balancer_fd.try_clone()?
        } else {
            bail!(
                "the XDP program in {} is not the balancer of this xdplb build; trace with the xdplb binary \
                 of the running controller (or restart the controller with this one)",
                link.display()
            );
        };
        plan.push((link.clone(), running.fd()?, restore));
    }
    // Only now that the trace can start: a refused one leaves `-w FILE` as it was.
    let mut pcap = match &opts.pcap {
        Some(path) => {
            let f = File::create(path).with_context(|| format!("creating {} failed", path.display()))?;
            Some(PcapWriter::new(BufWriter::new(f), TRACE_SNAPLEN as u32)?)
        }
        None => None,
    };
    dp.set_trace_config(&opts.filter.config(monotonic_ns() + LEASE.as_nanos() as u64, me))?;
    let mut session = Session { dp, traced, traced_id: traced_info.id(), swapped: Vec::new() };
    for (link, running, restore) in plan {
        if !attach::swap_if_current(&link, session.traced.as_fd(), running.as_fd())? {
            bail!("the XDP program in {} changed meanwhile (did the controller restart?); try again", link.display());
        }
        session.swapped.push(Swapped { link, restore });
    }
    eprintln!(
        "xdplb: tracing {}{}{}; Ctrl-C to stop",
        opts.iface,
        if links.len() > 1 { " and its backend-facing interface" } else { "" },
        if opts.filter == Filter::default() { String::new() } else { format!(", only{}", opts.filter) }
    );

    let names = VipNames::read(&opts.state_dir, &opts.iface);
    let mut ifaces = HashMap::new();
    // Event times are CLOCK_MONOTONIC; this turns them into wall-clock time.
    let to_unix = clock_ns(libc::CLOCK_REALTIME).saturating_sub(monotonic_ns());
    let mut traced = 0u64;
    let mut renewed = Instant::now();
    let ended = 'trace: loop {
        if STOP.load(Ordering::Relaxed) {
            break 'trace "interrupted".to_string();
        }
        let mut pfd = libc::pollfd { fd: events.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd, ours; the ring buffer's fd is open.
        unsafe { libc::poll(&mut pfd, 1, TRACE_POLL_MS as i32) };
        // A ring's worth at most, then the lease: traffic faster than the
        // output must not keep the trace from renewing it.
        for _ in 0..TRACE_RING_BYTES as usize / size_of::<TraceRecord>() {
            let Some(item) = events.next() else { break };
            let Some((e, frame)) = parse_record(&item) else { continue };
            let unix_ns = e.timestamp_ns.saturating_add(to_unix);
            let line = describe(&e, frame, &names, &iface_name(e.ifindex, &mut ifaces));
            if writeln!(out, "{} {line}", clock_time(unix_ns)).is_err() {
                break 'trace "the output was closed".to_string();
            }
            if let Some(p) = pcap.as_mut() {
                p.write(unix_ns, e.frame_len, frame).context("writing the pcap file failed")?;
            }
            traced += 1;
            if opts.count == Some(traced) {
                break 'trace format!("stopped after {traced} packets (-c)");
            }
        }
        if out.flush().is_err() {
            break 'trace "the output was closed".to_string();
        }
        if let Some(p) = pcap.as_mut() {
            p.flush().context("writing the pcap file failed")?;
        }
        if renewed.elapsed() >= Duration::from_secs(1) {
            if !session.still_traced()? {
                break 'trace "the program was replaced (the controller restarted, or xdplb was detached)".to_string();
            }
            session.dp.set_trace_config(&opts.filter.config(monotonic_ns() + LEASE.as_nanos() as u64, me))?;
            renewed = Instant::now();
        }
    };
    if let Some(p) = pcap.as_mut() {
        p.flush().context("writing the pcap file failed")?;
    }
    let lost = session.dp.trace_lost()?;
    drop(session);
    Ok(Summary { iface: opts.iface.clone(), traced, lost, ended })
}

/// For the controller, every second: if a trace's deadline passed (its
/// `xdplb trace` was killed), puts the controller's balancer back into the
/// links that still run the traced program, and clears the switch.
pub fn switch_off_abandoned(dp: &mut Dataplane, pin_dir: &Path) {
    if let Err(e) = try_switch_off_abandoned(dp, pin_dir) {
        warn!("switching off an abandoned trace failed: {e:#}");
    }
}

fn try_switch_off_abandoned(dp: &mut Dataplane, pin_dir: &Path) -> Result<()> {
    let cfg = dp.trace_config()?;
    if cfg.deadline_ns == 0 || monotonic_ns() < cfg.deadline_ns {
        return Ok(());
    }
    let own = dp.program(programs::BALANCER)?;
    let own_id = own.info()?.id();
    let own_fd = own.fd()?.try_clone()?;
    for link in LINKS.iter().map(|l| pin_dir.join(l)).filter(|p| p.exists()) {
        let id = attach::link_program_id(&link)?;
        if id == own_id {
            continue;
        }
        let running = attach::program_by_id(id)?;
        if running.name_as_str() == Some(programs::TRACED)
            && attach::swap_if_current(&link, own_fd.as_fd(), running.fd()?.as_fd())?
        {
            info!(
                "`xdplb trace` (pid {}) stopped renewing its trace; the untraced program is back in {}",
                cfg.owner_pid,
                link.display()
            );
        }
    }
    dp.set_trace_config(&TraceConfig::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::maps::{FAMILY_V4, FlowKey};

    fn v4(s: &str) -> [u32; 4] {
        addr::words(s.parse().unwrap())
    }

    #[test]
    fn vip_arguments() {
        let names = VipNames(vec![("198.18.100.1".parse().unwrap(), 80, PROTO_TCP, "web".into())]);
        assert_eq!(parse_vip("198.18.100.1", &names).unwrap(), ("198.18.100.1".parse().unwrap(), 0));
        assert_eq!(parse_vip("198.18.100.1:443", &names).unwrap(), ("198.18.100.1".parse().unwrap(), 443));
        assert_eq!(parse_vip("[2001:db8::1]:80", &names).unwrap(), ("2001:db8::1".parse().unwrap(), 80));
        assert_eq!(parse_vip("2001:db8::1", &names).unwrap(), ("2001:db8::1".parse().unwrap(), 0));
        assert_eq!(parse_vip("web", &names).unwrap(), ("198.18.100.1".parse().unwrap(), 80));
        assert!(parse_vip("nosuch", &names).is_err());
        let f = Filter { vip: Some(("198.18.100.1".parse().unwrap(), 80)), client: None }.config(5, 9);
        assert_eq!((f.vip_addr, f.vip_port, f.vip_family, f.client_family), (v4("198.18.100.1"), 80u16.to_be(), 4, 0));
    }

    #[test]
    fn a_balanced_packet_reads_as_its_decision() {
        let e = TraceEvent {
            flow: FlowKey {
                src: v4("198.18.0.1"),
                dst: v4("198.18.100.1"),
                sport: 40000u16.to_be(),
                dport: 80u16.to_be(),
                protocol: PROTO_TCP,
                family: FAMILY_V4,
                _pad: [0; 2],
            },
            tcp_flags: 0x02,
            vip_addr: v4("198.18.100.1"),
            vip_port: 80u16.to_be(),
            flags: TRACE_F_FLOW | TRACE_F_VIP | TRACE_F_MAGLEV | TRACE_F_BACKEND,
            conntrack: reasons::CONNTRACK_MISS,
            maglev_slot: 40213,
            hash: 0xdead_beef,
            backend_addr: v4("198.18.0.12"),
            backend_id: 2,
            forwarding: FWD_DSR as u8,
            action: 3,
            reason: reasons::TX,
            frame_len: 74,
            ..Default::default()
        };
        let names = VipNames(vec![("198.18.100.1".parse().unwrap(), 80, PROTO_TCP, "web".into())]);
        assert_eq!(
            describe(&e, &[], &names, "lb0"),
            "lb0 198.18.0.1:40000 > 198.18.100.1:80 tcp [S] len=74 vip=web conntrack=miss maglev_slot=40213 \
             hash=0xdeadbeef backend=198.18.0.12 backend_id=2 rewrite=dsr action=XDP_TX reason=tx"
        );
        let unnamed = describe(&e, &[], &VipNames::default(), "lb0");
        assert!(unnamed.contains(" vip=198.18.100.1:80/tcp "), "{unnamed}");
    }

    #[test]
    fn other_packets_read_from_their_frame() {
        let arp = TraceEvent { action: 2, reason: reasons::PASS_NOT_VIP, frame_len: 42, ..Default::default() };
        let mut frame = vec![0u8; 42];
        frame[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(
            describe(&arp, &frame, &VipNames::default(), "lb0"),
            "lb0 ARP len=42 vip=none action=XDP_PASS reason=pass_not_vip"
        );
        let mut ip = vec![0u8; 34];
        ip[12..14].copy_from_slice(&[0x08, 0x00]);
        ip[14 + 6] = 0x20; // more fragments
        ip[14 + 9] = 17;
        ip[26..30].copy_from_slice(&[198, 18, 0, 1]);
        ip[30..34].copy_from_slice(&[198, 18, 100, 1]);
        let frag = TraceEvent {
            flags: TRACE_F_VIP_ADDR,
            vip_addr: v4("198.18.100.1"),
            flow: FlowKey { family: FAMILY_V4, ..Default::default() },
            action: 1,
            reason: reasons::DROP_FRAGMENT,
            frame_len: 34,
            ..Default::default()
        };
        assert_eq!(
            describe(&frag, &ip, &VipNames::default(), "lb0"),
            "lb0 198.18.0.1 > 198.18.100.1 udp fragment len=34 vip_address=198.18.100.1 action=XDP_DROP \
             reason=drop_fragment"
        );
    }

    #[test]
    fn records_carry_their_frame() {
        let e = TraceEvent { cap_len: 3, frame_len: 60, ..Default::default() };
        let mut bytes = vec![0u8; size_of::<TraceEvent>()];
        // SAFETY: the buffer holds exactly one TraceEvent; write unaligned.
        unsafe { std::ptr::write_unaligned(bytes.as_mut_ptr().cast::<TraceEvent>(), e) };
        bytes.extend_from_slice(&[7, 8, 9, 10]);
        let (got, frame) = parse_record(&bytes).unwrap();
        assert_eq!((got, frame), (e, &[7u8, 8, 9][..]));
        assert!(parse_record(&bytes[..10]).is_none());
    }
}
