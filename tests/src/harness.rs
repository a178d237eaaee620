//! Drives one freshly loaded instance of the real eBPF object through
//! BPF_PROG_TEST_RUN. Each `Engine` has its own maps, so tests run in
//! parallel without seeing each other's flows or counters.

use std::net::IpAddr;

use aya::{
    maps::{MapData, RingBuf},
    programs::{TestRun as _, TestRunOptions},
};
use lb_common::{
    flow_hash,
    maps::{CFG_NAT, LbConfig, VipKey, programs},
    reasons,
    trace::{TraceConfig, TraceEvent},
};
use lb_userspace::{
    addr,
    dataplane::{Dataplane, MapSizes},
    reconcile::{BackendSpec, Forwarding, HashMode, Reconciler, VipSpec},
    trace,
};

use crate::packets::{L4, LB_MAC};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// The MTU the tests configure on the (virtual) interface.
pub const MTU: u32 = 1500;

/// MAC the tests give backend `i`.
pub fn backend_mac(i: usize) -> [u8; 6] {
    [0x02, 0xbe, 0, 0, (i >> 8) as u8, i as u8]
}

pub fn vip(name: &str, addr: &str, port: u16, l4: L4, forwarding: Forwarding, backends: &[(&str, u32)]) -> VipSpec {
    VipSpec {
        name: name.to_string(),
        addr: addr.parse().expect("test VIP address"),
        port,
        protocol: l4.number(),
        forwarding,
        hash: HashMode::FiveTuple,
        table_size: 65_537,
        pass_when_empty: false,
        icmp_echo: true,
        backends: backends
            .iter()
            .enumerate()
            .map(|(i, (a, w))| BackendSpec {
                addr: a.parse().expect("test backend address"),
                port: 0,
                weight: *w,
                mac: backend_mac(i),
                healthy: true,
            })
            .collect(),
    }
}

/// Keeps the calling thread on the CPU it runs on. BPF_PROG_TEST_RUN runs
/// the program on the caller's CPU, and a flow's first packet is kept in
/// that CPU's embryonic cache (`FLOWS_NEW`, per CPU, as a NIC's receive-side
/// scaling keeps a flow on one queue): a test thread the scheduler moved
/// between a flow's packets would see its second packet as a first one.
pub fn pin_to_this_cpu() {
    // SAFETY: sched_getcpu and sched_setaffinity on this thread, with a
    // cpu_set_t on the stack that lives through the call.
    unsafe {
        let cpu = libc::sched_getcpu();
        if cpu < 0 {
            return;
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

pub struct Outcome {
    pub action: u32,
    pub frame: Vec<u8>,
}

pub struct Engine {
    pub dp: Dataplane,
    pub reconciler: Reconciler,
}

impl Engine {
    pub fn new() -> Self {
        Self::with_sizes(MapSizes {
            max_vips: 64,
            max_backends: 4096,
            conntrack: 65_536,
            maglev_pool: 8 * 65_537,
            nat_table: 65_536,
        })
    }

    /// With `sizes`; the calling thread stays on its CPU (`pin_to_this_cpu`).
    pub fn with_sizes(sizes: MapSizes) -> Self {
        pin_to_this_cpu();
        Self::unpinned(sizes)
    }

    /// Without pinning the caller (the benchmarks choose their CPUs).
    pub fn unpinned(sizes: MapSizes) -> Self {
        let mut dp = Dataplane::load(sizes).expect("the eBPF object loads and verifies (run as root)");
        dp.set_config(&LbConfig {
            if_mac: LB_MAC,
            backend_if_mac: LB_MAC,
            // Interface indexes 0: NAT answers with XDP_TX, as one-armed.
            flags: CFG_NAT,
            mtu: MTU,
            // 198.19.0.0/16 and 2001:db8:ffff::/96: outer sources of IP-in-IP.
            ipip_src_v4: u32::from_ne_bytes([198, 19, 0, 0]),
            ipip_src_v4_host_mask: u32::from_ne_bytes([0, 0, 0xff, 0xff]),
            ipip_src_v6: addr::words("2001:db8:ffff::".parse().unwrap()),
            ipip_src_v6_host_mask: u32::MAX,
            ..Default::default()
        })
        .expect("CONFIG is writable");
        let reconciler = Reconciler::new(&dp);
        Self { dp, reconciler }
    }

    /// Whether the program looks for NAT replies among non-VIP packets (the
    /// controller turns this on only when a VIP uses NAT).
    pub fn set_nat(&mut self, on: bool) {
        let mut cfg = self.dp.config().expect("CONFIG readable");
        cfg.flags = if on { CFG_NAT } else { 0 };
        self.dp.set_config(&cfg).expect("CONFIG writable");
    }

    pub fn apply(&mut self, specs: &[VipSpec]) {
        self.reconciler.apply(&mut self.dp, specs).expect("apply succeeds");
    }

    pub fn run(&mut self, frame: &[u8]) -> Outcome {
        self.run_program(programs::BALANCER, frame)
    }

    pub fn run_program(&mut self, name: &str, frame: &[u8]) -> Outcome {
        let prog = self.dp.program(name).expect("program is loaded");
        let mut out = vec![0u8; frame.len() + 256];
        let result = prog
            .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..Default::default() })
            .expect("BPF_PROG_TEST_RUN succeeds");
        out.truncate(result.data_size_out as usize);
        Outcome { action: result.return_value, frame: out }
    }

    pub fn reasons(&self) -> [u64; reasons::COUNT as usize] {
        self.dp.reasons().expect("REASONS readable")
    }

    /// The backend (its index in `spec.backends`) that Maglev assigns to a new
    /// flow, computed in userspace from the table in the kernel.
    pub fn predicted_backend(&self, spec: &VipSpec, src: IpAddr, sport: u16) -> usize {
        let (_, _, id) = self.maglev_choice(spec, src, sport);
        self.backend_index(spec, id).expect("slot holds one of the VIP's backends")
    }

    /// For a new flow, computed in userspace: its hash, its slot in the
    /// VIP's Maglev table, and the backend id in that slot.
    pub fn maglev_choice(&self, spec: &VipSpec, src: IpAddr, sport: u16) -> (u32, u32, u32) {
        let key: VipKey = spec.key();
        let meta = self.reconciler.vip_meta(&key).expect("VIP applied");
        let (s, d) = (addr::words(src), addr::words(spec.addr));
        let seed = self.dp.config().expect("CONFIG readable").hash_seed;
        let hash = match spec.hash {
            HashMode::FiveTuple => {
                flow_hash::five_tuple(&seed, &s, &d, sport.to_be(), spec.port.to_be(), spec.protocol)
            }
            HashMode::SourceIp => flow_hash::source_ip(&seed, &s),
        };
        let index = hash % meta.ring_size;
        (hash, index, self.dp.read_pool(meta.ring_offset + index, 1)[0])
    }

    /// Loads the traced balancer and turns tracing on, with `filter`, until
    /// a minute from now; returns the reader of its ring buffer.
    pub fn start_trace(&mut self, filter: &trace::Filter) -> RingBuf<MapData> {
        self.dp.load_traced().expect("the traced balancer loads and verifies");
        self.set_trace(filter.config(trace::monotonic_ns() + 60_000_000_000, std::process::id()));
        self.dp.take_trace_events().expect("TRACE_EVENTS is a ring buffer")
    }

    pub fn set_trace(&mut self, cfg: TraceConfig) {
        self.dp.set_trace_config(&cfg).expect("TRACE_CONFIG writable");
    }

    /// Runs the traced balancer (loaded by `start_trace`).
    pub fn run_traced(&mut self, frame: &[u8]) -> Outcome {
        self.run_program(programs::TRACED, frame)
    }

    /// Index in `spec.backends` of backend id `id`.
    pub fn backend_index(&self, spec: &VipSpec, id: u32) -> Option<usize> {
        spec.backends.iter().position(|b| self.reconciler.backend_id(&spec.key(), b.addr, b.port) == Some(id))
    }
}

impl Default for Engine {
    fn default() -> Self {
        Self::new()
    }
}

/// Every record in the trace ring buffer: the event and its frame bytes.
pub fn trace_events(ring: &mut RingBuf<MapData>) -> Vec<(TraceEvent, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        let (e, frame) = trace::parse_record(&item).expect("a whole record");
        out.push((e, frame.to_vec()));
    }
    out
}

/// Pins the calling thread to `cpus`: BPF_PROG_TEST_RUN runs the program on
/// the caller's CPU.
pub fn pin_to(cpus: &[usize]) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET and sched_setaffinity only touch it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        assert_eq!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set), 0, "pin to {cpus:?}");
    }
}

/// The CPUs this thread may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: as in `pin_to`; sched_getaffinity fills the set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set), 0);
        (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    }
}

/// Index of the backend whose MAC a transmitted frame is addressed to.
pub fn backend_of(frame: &[u8]) -> usize {
    assert_eq!(frame[0..4], backend_mac(0)[0..4], "destination MAC {:02x?} is not a backend's", &frame[0..6]);
    ((frame[4] as usize) << 8) | frame[5] as usize
}
