//! The only place that touches the dataplane's maps and programs.
//!
//! `Dataplane` owns one loaded instance of the eBPF object: its programs and
//! typed handles to every map. The Maglev pool is written through a memory
//! mapping (the map is `BPF_F_MMAPABLE`): a 65537-slot table is one memcpy
//! instead of 65537 syscalls.
//!
//! An array map stores each element in `round_up(value_size, 8)` bytes, so
//! in the mapping every `u32` slot of the pool occupies a `u64` (low half
//! first on this little-endian machine).

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    ptr::NonNull,
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMap, HashMap, Map, MapData, PerCpuArray, PerCpuValues, RingBuf},
    programs::Xdp,
};
use lb_common::{
    decap::{DECAP_FILTER_SYMBOL, DecapFilter},
    maps::{
        AddrKey, Backend, BackendSlot, Counter, DEFAULT_CONNTRACK_SIZE, DEFAULT_MAGLEV_POOL, DEFAULT_MAX_BACKENDS,
        DEFAULT_MAX_VIPS, DEFAULT_NAT_TABLE_SIZE, FlowKey, FlowValue, LbConfig, NatFlow, NatReply, TX_PORT_BACKEND,
        TX_PORT_CLIENT, VipKey, VipMeta, names, programs,
    },
    reasons,
    trace::{TRACE_RING_DEFAULT_BYTES, TraceConfig},
};

/// Capacities of the maps, fixed when the object is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    pub max_vips: u32,
    pub max_backends: u32,
    pub conntrack: u32,
    /// Slots in the Maglev pool shared by all VIPs' tables.
    pub maglev_pool: u32,
    /// NAT connections (entries in each of NAT_FLOWS and NAT_REVERSE).
    pub nat_table: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            max_vips: DEFAULT_MAX_VIPS,
            max_backends: DEFAULT_MAX_BACKENDS,
            conntrack: DEFAULT_CONNTRACK_SIZE,
            maglev_pool: DEFAULT_MAGLEV_POOL,
            nat_table: DEFAULT_NAT_TABLE_SIZE,
        }
    }
}

/// The Maglev pool's memory mapping.
struct PoolMapping {
    ptr: NonNull<u64>,
    slots: usize,
    map_len: usize,
    _map: MapData,
}

impl PoolMapping {
    fn new(map: MapData, slots: u32) -> Result<Self> {
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let map_len = (slots as usize * 8).div_ceil(page) * page;
        // SAFETY: mapping a BPF array map's fd; the kernel checks the length
        // against the map and keeps the memory alive while it is mapped.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap of the MAGLEV_POOL map failed");
        }
        let ptr = NonNull::new(ptr.cast::<u64>()).context("mmap returned null")?;
        Ok(Self { ptr, slots: slots as usize, map_len, _map: map })
    }

    #[allow(clippy::mut_from_ref)]
    fn slots(&self) -> &mut [u64] {
        // SAFETY: the mapping is `slots` u64s long and lives as long as self;
        // the kernel only reads it concurrently (aligned stores are atomic).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.slots) }
    }
}

impl Drop for PoolMapping {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.map_len) };
    }
}

// SAFETY: the mapping is plain shared memory owned by this value.
unsafe impl Send for PoolMapping {}

pub struct Dataplane {
    ebpf: Ebpf,
    sizes: MapSizes,
    vips: HashMap<MapData, VipKey, VipMeta>,
    vip_addrs: HashMap<MapData, AddrKey, u32>,
    backends: Array<MapData, BackendSlot>,
    pool: PoolMapping,
    flows: HashMap<MapData, FlowKey, FlowValue>,
    config: Array<MapData, LbConfig>,
    vip_stats: PerCpuArray<MapData, Counter>,
    backend_stats: PerCpuArray<MapData, Counter>,
    reasons: PerCpuArray<MapData, u64>,
    decap_stats: PerCpuArray<MapData, u64>,
    nat_flows: HashMap<MapData, FlowKey, NatFlow>,
    nat_reverse: HashMap<MapData, FlowKey, NatReply>,
    tx_ports: DevMap<MapData>,
    trace_config: Array<MapData, TraceConfig>,
    trace_lost: PerCpuArray<MapData, u64>,
}

/// Every map pinned in the pin directory (see `pins`).
pub const PINNED_MAPS: &[&str] = &[
    names::VIPS,
    names::VIP_ADDRS,
    names::BACKENDS,
    names::MAGLEV_POOL,
    names::FLOWS,
    names::CONFIG,
    names::VIP_STATS,
    names::BACKEND_STATS,
    names::REASONS,
    names::DECAP_STATS,
    names::NAT_FLOWS,
    names::NAT_REVERSE,
    names::TX_PORTS,
    // The trace switch: pinned so that the controller can turn off a trace
    // whose `xdplb trace` died. Its ring buffer is each process's own.
    names::TRACE_CONFIG,
];

/// The maps whose capacity `sizes` sets, and that capacity.
pub fn sized_maps(sizes: MapSizes) -> [(&'static str, u32); 9] {
    [
        (names::VIPS, sizes.max_vips),
        (names::VIP_ADDRS, sizes.max_vips),
        (names::VIP_STATS, sizes.max_vips),
        (names::BACKENDS, sizes.max_backends),
        (names::BACKEND_STATS, sizes.max_backends),
        (names::FLOWS, sizes.conntrack),
        (names::MAGLEV_POOL, sizes.maglev_pool),
        (names::NAT_FLOWS, sizes.nat_table),
        (names::NAT_REVERSE, sizes.nat_table),
    ]
}

/// Sizes of maps already pinned in `dir`, if there are any.
fn pinned_sizes(dir: &Path) -> Option<MapSizes> {
    let size =
        |name: &str| -> Option<u32> { MapData::from_pin(dir.join(name)).ok()?.info().ok().map(|i| i.max_entries()) };
    Some(MapSizes {
        max_vips: size(names::VIPS)?,
        max_backends: size(names::BACKENDS)?,
        conntrack: size(names::FLOWS)?,
        maglev_pool: size(names::MAGLEV_POOL)?,
        nat_table: size(names::NAT_FLOWS)?,
    })
}

/// Whether `dir` holds a pinned dataplane to adopt.
pub fn has_pinned_state(dir: &Path) -> bool {
    pinned_sizes(dir).is_some()
}

/// Writes the verifier's log to a file an operator can read, and says where.
fn verifier_error(program: &str, e: aya::programs::ProgramError) -> anyhow::Error {
    let log = format!("{e:#?}");
    let path = std::env::temp_dir().join(format!("xdplb-verifier-{program}.log"));
    match std::fs::write(&path, &log) {
        Ok(()) => anyhow::anyhow!(
            "the kernel's verifier rejected XDP program {program}; its log is in {} \
             (report it with your kernel version: `uname -r`)",
            path.display()
        ),
        Err(_) => anyhow::anyhow!("the kernel's verifier rejected XDP program {program}: {log}"),
    }
}

fn take(ebpf: &mut Ebpf, name: &str) -> Result<Map> {
    ebpf.take_map(name).with_context(|| format!("the eBPF object has no map {name}"))
}

impl Dataplane {
    /// Loads the embedded eBPF object with maps of the given sizes, and its
    /// programs into the kernel (verifying them), without attaching anything.
    pub fn load(sizes: MapSizes) -> Result<Self> {
        Self::open(sizes, None)
    }

    /// Like `load`, but with every map pinned in `pin_dir`: maps already
    /// pinned there are reused (their contents and sizes win, which is how a
    /// restarted controller adopts a running dataplane), the others are
    /// created and pinned.
    pub fn open(sizes: MapSizes, pin_dir: Option<&Path>) -> Result<Self> {
        Self::open_with_trace_ring(sizes, pin_dir, TRACE_RING_DEFAULT_BYTES)
    }

    /// Like `open`, with a trace ring buffer of `trace_ring` bytes (a power
    /// of 2, at least a page): `xdplb trace` reads the traced program's
    /// events from it.
    pub fn open_with_trace_ring(sizes: MapSizes, pin_dir: Option<&Path>, trace_ring: u32) -> Result<Self> {
        Self::open_inner(sizes, pin_dir, trace_ring, None)
    }

    /// Like `load`, with the decapsulation program's filter set in its
    /// read-only data (what `xdplb decap` attaches; nothing is pinned).
    pub fn load_decap(sizes: MapSizes, filter: &DecapFilter) -> Result<Self> {
        Self::open_inner(sizes, None, TRACE_RING_DEFAULT_BYTES, Some(filter))
    }

    fn open_inner(
        sizes: MapSizes,
        pin_dir: Option<&Path>,
        trace_ring: u32,
        decap_filter: Option<&DecapFilter>,
    ) -> Result<Self> {
        let sizes = match pin_dir {
            Some(dir) => pinned_sizes(dir).unwrap_or(sizes),
            None => sizes,
        };
        let mut loader = EbpfLoader::new();
        let pin_paths: Vec<(&str, PathBuf)> = match pin_dir {
            Some(dir) => PINNED_MAPS.iter().map(|name| (*name, dir.join(name))).collect(),
            None => Vec::new(),
        };
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        for (name, entries) in sized_maps(sizes) {
            loader.map_max_entries(name, entries);
        }
        if let Some(filter) = decap_filter {
            loader.override_global(DECAP_FILTER_SYMBOL, filter, true);
        }
        let mut ebpf = loader
            .map_max_entries(names::TRACE_EVENTS, trace_ring)
            .load(crate::EBPF_OBJECT)
            .context(
                "loading the xdplb eBPF object failed (are you root, or do you have CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN? \
                 if pinned maps from an older xdplb are in the way, run `xdplb detach --iface IF` first)",
            )?;
        for name in [programs::BALANCER, programs::DECAP, programs::PASS, programs::BENCH_FLOOR] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .with_context(|| format!("the eBPF object has no program {name}"))?
                .try_into()
                .with_context(|| format!("program {name} is not an XDP program"))?;
            if let Err(e) = prog.load() {
                return Err(verifier_error(name, e));
            }
        }
        let pool = match take(&mut ebpf, names::MAGLEV_POOL)? {
            Map::Array(data) => PoolMapping::new(data, sizes.maglev_pool)?,
            other => bail!("map {} has the wrong type: {other:?}", names::MAGLEV_POOL),
        };
        let m = &mut ebpf;
        Ok(Self {
            vips: HashMap::try_from(take(m, names::VIPS)?)?,
            vip_addrs: HashMap::try_from(take(m, names::VIP_ADDRS)?)?,
            backends: Array::try_from(take(m, names::BACKENDS)?)?,
            flows: HashMap::try_from(take(m, names::FLOWS)?)?,
            config: Array::try_from(take(m, names::CONFIG)?)?,
            vip_stats: PerCpuArray::try_from(take(m, names::VIP_STATS)?)?,
            backend_stats: PerCpuArray::try_from(take(m, names::BACKEND_STATS)?)?,
            reasons: PerCpuArray::try_from(take(m, names::REASONS)?)?,
            decap_stats: PerCpuArray::try_from(take(m, names::DECAP_STATS)?)?,
            nat_flows: HashMap::try_from(take(m, names::NAT_FLOWS)?)?,
            nat_reverse: HashMap::try_from(take(m, names::NAT_REVERSE)?)?,
            tx_ports: DevMap::try_from(take(m, names::TX_PORTS)?)?,
            trace_config: Array::try_from(take(m, names::TRACE_CONFIG)?)?,
            trace_lost: PerCpuArray::try_from(take(m, names::TRACE_LOST)?)?,
            pool,
            sizes,
            ebpf,
        })
    }

    pub fn sizes(&self) -> MapSizes {
        self.sizes
    }

    /// One of the object's XDP programs (see `lb_common::maps::programs`).
    pub fn program(&mut self, name: &str) -> Result<&mut Xdp> {
        Ok(self.ebpf.program_mut(name).with_context(|| format!("the eBPF object has no program {name}"))?.try_into()?)
    }

    pub fn config(&self) -> Result<LbConfig> {
        self.config.get(&0, 0).context("reading the CONFIG map failed")
    }

    pub fn set_config(&mut self, cfg: &LbConfig) -> Result<()> {
        self.config.set(0, cfg, 0).context("writing the CONFIG map failed")
    }

    pub fn set_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<()> {
        self.vips.insert(key, meta, 0).with_context(|| format!("writing VIP {key:?} to the VIPS map failed"))
    }

    pub fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
        self.vips.remove(key).with_context(|| format!("removing VIP {key:?} from the VIPS map failed"))
    }

    pub fn vip(&self, key: &VipKey) -> Option<VipMeta> {
        self.vips.get(key, 0).ok()
    }

    /// Every VIP in the map (for adopting a running dataplane).
    pub fn vips(&self) -> Vec<(VipKey, VipMeta)> {
        self.vips.iter().filter_map(|kv| kv.ok()).collect()
    }

    pub fn set_vip_addr(&mut self, key: &AddrKey, vips_on_it: u32) -> Result<()> {
        self.vip_addrs
            .insert(key, vips_on_it, 0)
            .with_context(|| format!("writing address {key:?} to the VIP_ADDRS map failed"))
    }

    pub fn remove_vip_addr(&mut self, key: &AddrKey) -> Result<()> {
        self.vip_addrs.remove(key).with_context(|| format!("removing address {key:?} from the VIP_ADDRS map failed"))
    }

    /// Publishes `backend` as id `id` without a torn read (see
    /// `BackendSlot`): the copy packets do not read is written, then made
    /// the live one. A slot never written before is written at once: no
    /// table slot or flow can name it yet.
    pub fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        let failed = || format!("writing backend id {id} to the BACKENDS map failed");
        let mut slot = self.backends.get(&id, 0).with_context(failed)?;
        if *slot.current() == *backend {
            return Ok(());
        }
        if slot == BackendSlot::default() {
            return self.backends.set(id, BackendSlot { copies: [*backend; 2], ..slot }, 0).with_context(failed);
        }
        let next = (slot.live & 1) ^ 1;
        slot.copies[next as usize] = *backend;
        self.backends.set(id, slot, 0).with_context(failed)?;
        slot.live = next;
        self.backends.set(id, slot, 0).with_context(failed)
    }

    /// The copy of backend `id` that packets read.
    pub fn backend(&self, id: u32) -> Result<Backend> {
        Ok(*self.backends.get(&id, 0).with_context(|| format!("reading backend id {id} failed"))?.current())
    }

    /// Backend `id`'s slot as it is, both copies (for tests).
    pub fn backend_slot(&self, id: u32) -> Result<BackendSlot> {
        self.backends.get(&id, 0).with_context(|| format!("reading backend id {id} failed"))
    }

    /// Writes backend `id`'s slot as given, in one write (tests: a rewrite
    /// cut short; the controller publishes with [`Self::set_backend`]).
    pub fn set_backend_slot(&mut self, id: u32, slot: &BackendSlot) -> Result<()> {
        self.backends.set(id, slot, 0).with_context(|| format!("writing backend id {id} to the BACKENDS map failed"))
    }

    /// Writes `slots` into the Maglev pool at `offset`.
    pub fn write_pool(&mut self, offset: u32, slots: &[u32]) -> Result<()> {
        let pool = self.pool.slots();
        let start = offset as usize;
        let Some(region) = pool.get_mut(start..start + slots.len()) else {
            bail!(
                "Maglev pool overflow: {} slots at {offset} do not fit in {} (raise the pool size)",
                slots.len(),
                self.sizes.maglev_pool
            );
        };
        for (dst, &id) in region.iter_mut().zip(slots) {
            *dst = id as u64;
        }
        Ok(())
    }

    pub fn read_pool(&self, offset: u32, len: u32) -> Vec<u32> {
        self.pool.slots()[offset as usize..(offset + len) as usize].iter().map(|&s| s as u32).collect()
    }

    pub fn flow(&self, key: &FlowKey) -> Option<FlowValue> {
        self.flows.get(key, 0).ok()
    }

    pub fn insert_flow(&mut self, key: &FlowKey, value: &FlowValue) -> Result<()> {
        self.flows.insert(key, value, 0).context("writing a flow to the FLOWS map failed")
    }

    pub fn remove_flow(&mut self, key: &FlowKey) -> Result<()> {
        self.flows.remove(key).context("removing a flow from the FLOWS map failed")
    }

    /// Number of tracked flows (walks the table).
    pub fn flow_count(&self) -> usize {
        self.flows.keys().filter(|k| k.is_ok()).take(self.sizes.conntrack as usize).count()
    }

    /// Every tracked flow and its backend.
    /// A walk restarts from the first key when the program deletes the one
    /// it stands on, so it can see a flow twice: it stops at the table's capacity.
    pub fn flows(&self) -> Vec<(FlowKey, FlowValue)> {
        self.flows.iter().filter_map(|kv| kv.ok()).take(self.sizes.conntrack as usize).collect()
    }

    /// Where NAT sends packets: the client-facing and backend-facing interfaces.
    pub fn set_tx_ports(&mut self, client_ifindex: u32, backend_ifindex: u32) -> Result<()> {
        for (slot, ifindex) in [(TX_PORT_CLIENT, client_ifindex), (TX_PORT_BACKEND, backend_ifindex)] {
            self.tx_ports
                .set(slot, ifindex, None, 0)
                .with_context(|| format!("writing interface index {ifindex} to the TX_PORTS devmap failed"))?;
        }
        Ok(())
    }

    /// NAT connections: (client-side key, entry).
    pub fn nat_flows(&self) -> Vec<(FlowKey, NatFlow)> {
        self.nat_flows.iter().filter_map(|kv| kv.ok()).collect()
    }

    /// NAT reply mappings: (reply key, entry).
    pub fn nat_replies(&self) -> Vec<(FlowKey, NatReply)> {
        self.nat_reverse.iter().filter_map(|kv| kv.ok()).collect()
    }

    pub fn remove_nat_flow(&mut self, key: &FlowKey) {
        let _ = self.nat_flows.remove(key);
    }

    pub fn remove_nat_reply(&mut self, key: &FlowKey) {
        let _ = self.nat_reverse.remove(key);
    }

    /// Handles of their own to the maps the whole-table walks read, for a
    /// blocking thread (see `walks`).
    pub fn walk_maps(&self) -> Result<crate::walks::WalkMaps> {
        use crate::walks::{dup_map, dup_map_data};
        use aya::maps::IterableMap as _;
        Ok(crate::walks::WalkMaps {
            flows: dup_map_data(self.flows.map())?,
            conntrack: self.sizes.conntrack,
            nat: crate::walks::NatMaps {
                nat_flows: HashMap::try_from(dup_map(self.nat_flows.map())?)?,
                nat_reverse: HashMap::try_from(dup_map(self.nat_reverse.map())?)?,
                backends: Array::try_from(dup_map(self.backends.map())?)?,
            },
        })
    }

    /// A handle of its own to the FLOWS map (for flow sync's thread).
    pub fn flows_map(&self) -> Result<MapData> {
        use aya::maps::IterableMap as _;
        crate::walks::dup_map_data(self.flows.map())
    }

    /// Packets per reason (see `lb_common::reasons`), summed over CPUs.
    pub fn reasons(&self) -> Result<[u64; reasons::COUNT as usize]> {
        let mut out = [0u64; reasons::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let per_cpu = self.reasons.get(&(i as u32), 0).context("reading the REASONS map failed")?;
            *slot = per_cpu.iter().sum();
        }
        Ok(out)
    }

    /// Zeroes a VIP's counters (an id given to a new VIP starts from zero).
    pub fn reset_vip_counter(&mut self, vip_id: u32) -> Result<()> {
        let zeros = PerCpuValues::try_from(vec![Counter::default(); nr_cpus()?])?;
        self.vip_stats.set(vip_id, zeros, 0).with_context(|| format!("zeroing VIP_STATS[{vip_id}] failed"))
    }

    /// Zeroes a backend's counters.
    pub fn reset_backend_counter(&mut self, backend_id: u32) -> Result<()> {
        let zeros = PerCpuValues::try_from(vec![Counter::default(); nr_cpus()?])?;
        self.backend_stats
            .set(backend_id, zeros, 0)
            .with_context(|| format!("zeroing BACKEND_STATS[{backend_id}] failed"))
    }

    pub fn vip_counter(&self, vip_id: u32) -> Result<Counter> {
        sum_counters(&self.vip_stats, vip_id).with_context(|| format!("reading VIP_STATS[{vip_id}] failed"))
    }

    pub fn backend_counter(&self, backend_id: u32) -> Result<Counter> {
        sum_counters(&self.backend_stats, backend_id)
            .with_context(|| format!("reading BACKEND_STATS[{backend_id}] failed"))
    }

    /// Loads (verifies) the traced balancer, which `open` leaves out: only
    /// `xdplb trace`, the tests and the benchmarks run it.
    pub fn load_traced(&mut self) -> Result<&mut Xdp> {
        let prog = self.program(programs::TRACED)?;
        if prog.fd().is_err() {
            prog.load().map_err(|e| verifier_error(programs::TRACED, e))?;
        }
        Ok(prog)
    }

    pub fn trace_config(&self) -> Result<TraceConfig> {
        self.trace_config.get(&0, 0).context("reading the TRACE_CONFIG map failed")
    }

    pub fn set_trace_config(&mut self, cfg: &TraceConfig) -> Result<()> {
        self.trace_config.set(0, cfg, 0).context("writing the TRACE_CONFIG map failed")
    }

    /// The traced program's ring buffer of `lb_common::trace::TraceRecord`s
    /// (once: the caller owns it).
    pub fn take_trace_events(&mut self) -> Result<RingBuf<MapData>> {
        Ok(RingBuf::try_from(take(&mut self.ebpf, names::TRACE_EVENTS)?)?)
    }

    /// Trace records that found the ring buffer full, summed over CPUs.
    pub fn trace_lost(&self) -> Result<u64> {
        Ok(self.trace_lost.get(&0, 0).context("reading the TRACE_LOST map failed")?.iter().sum())
    }

    /// Decapsulation program counters: (decapsulated, refused): refused is
    /// IP-in-IP the program dropped (filter, or inner header cut).
    pub fn decap_counters(&self) -> Result<(u64, u64)> {
        let get = |i: u32| -> Result<u64> { Ok(self.decap_stats.get(&i, 0)?.iter().sum()) };
        Ok((get(0)?, get(1)?))
    }
}

fn nr_cpus() -> Result<usize> {
    aya::util::nr_cpus().map_err(|(path, e)| anyhow::anyhow!("reading {path} failed: {e}"))
}

fn sum_counters(map: &PerCpuArray<MapData, Counter>, index: u32) -> Result<Counter> {
    let per_cpu = map.get(&index, 0)?;
    Ok(per_cpu
        .iter()
        .fold(Counter::default(), |acc, c| Counter { packets: acc.packets + c.packets, bytes: acc.bytes + c.bytes }))
}
