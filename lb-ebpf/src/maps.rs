//! The dataplane's maps. The controller (lb-userspace `dataplane` module)
//! writes all of them except FLOWS and the counters, which only this program
//! writes. Sizes here are defaults; the controller sets real ones at load.

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMap, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    maps::{
        AddrKey, BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, Backend, BackendSlot, Counter, DEFAULT_CONNTRACK_SIZE,
        DEFAULT_MAGLEV_POOL, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_VIPS, DEFAULT_NAT_TABLE_SIZE, EMBRYONIC_SLOTS,
        EmbryonicFlow, FloodWindow, FlowKey, FlowValue, LbConfig, NatFlow, NatReply, VipKey, VipMeta,
    },
    reasons,
};

/// (VIP address, port, protocol) → how to balance it. Written by the
/// controller. Not preallocated: an element replaced by an update is freed
/// after an RCU grace period, so a packet still reading it never sees it
/// reused for another VIP's value (a preallocated map recycles it at once).
#[map]
pub static VIPS: HashMap<VipKey, VipMeta> = HashMap::with_max_entries(DEFAULT_MAX_VIPS, BPF_F_NO_PREALLOC);

/// Addresses that have a VIP → number of VIPs on it. Written by the controller.
#[map]
pub static VIP_ADDRS: HashMap<AddrKey, u32> = HashMap::with_max_entries(DEFAULT_MAX_VIPS, 0);

/// Backend id → server address, next-hop MAC, state, in two copies of which
/// one is live (see `BackendSlot`). Written by the controller; read through
/// [`backend`].
#[map]
pub static BACKENDS: Array<BackendSlot> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// The live copy of backend `id`.
#[inline(always)]
pub fn backend(id: u32) -> Option<&'static Backend> {
    BACKENDS.get(id).map(BackendSlot::current)
}

/// All VIPs' Maglev tables, each a region `VipMeta::ring_offset ..+ ring_size`,
/// each slot a backend id. Written by the controller.
#[map]
pub static MAGLEV_POOL: Array<u32> = Array::with_max_entries(DEFAULT_MAGLEV_POOL, BPF_F_MMAPABLE);

/// Connection tracking: flow → backend. Written here; LRU evicts idle flows.
#[map]
pub static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(DEFAULT_CONNTRACK_SIZE, 0);

/// Flows seen once, per CPU, in buckets of `EMBRYONIC_WAYS` slots chosen by
/// the flow's hash: a flow enters FLOWS only with its second packet (see
/// `conntrack`). Written here; never pinned (losing it costs no flow: its
/// next packet is chosen by the same Maglev table).
#[map]
pub static FLOWS_NEW: PerCpuArray<EmbryonicFlow> = PerCpuArray::with_max_entries(EMBRYONIC_SLOTS, 0);

/// Per CPU: new flows tracked in the current second (flood mode past
/// `LbConfig::flood_rate`). Written here; never pinned.
#[map]
pub static FLOOD: PerCpuArray<FloodWindow> = PerCpuArray::with_max_entries(1, 0);

/// NAT connections by their client-side 5-tuple → backend, TCP state, last
/// packet. A plain hash map, not LRU: when full, new connections are refused
/// and established ones keep their entries; the controller removes closed
/// and idle ones. Written here (new flows, state) and by the controller (expiry).
#[map]
pub static NAT_FLOWS: HashMap<FlowKey, NatFlow> = HashMap::with_max_entries(DEFAULT_NAT_TABLE_SIZE, 0);

/// NAT replies by their 5-tuple (backend → client) → the VIP to answer from
/// and the client's MAC. Written here; expired by the controller.
#[map]
pub static NAT_REVERSE: HashMap<FlowKey, NatReply> = HashMap::with_max_entries(DEFAULT_NAT_TABLE_SIZE, 0);

/// NAT's way out: slot 0 the client-facing interface, slot 1 the backend-facing one.
/// Written by the controller.
#[map]
pub static TX_PORTS: DevMap = DevMap::with_max_entries(2, 0);

/// Interface facts (MAC, MTU, IP-in-IP source). Written by the controller.
#[map]
pub static CONFIG: Array<LbConfig> = Array::with_max_entries(1, 0);

/// Per VIP id: packets and bytes received. Written here.
#[map]
pub static VIP_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(DEFAULT_MAX_VIPS, 0);

/// Per backend id: packets and bytes forwarded. Written here.
#[map]
pub static BACKEND_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Per reason (lb_common::reasons): packets. Written here.
#[map]
pub static REASONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(reasons::COUNT, 0);

/// Decapsulation program counters: [decapsulated, refused IP-in-IP (dropped)]. Written here.
#[map]
pub static DECAP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

#[inline(always)]
pub fn count_reason(reason: u32) {
    if let Some(c) = REASONS.get_ptr_mut(reason) {
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn count_bytes(map: &PerCpuArray<Counter>, index: u32, bytes: u64) {
    if let Some(c) = map.get_ptr_mut(index) {
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}
