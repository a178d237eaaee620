//! Keys and values of the dataplane's BPF maps, defined once for both sides.
//!
//! Addresses are `[u32; 4]` of raw network-order bytes (IPv4 in word 0, the
//! other words zero); ports are network order. Every struct is `#[repr(C)]`
//! with explicit padding so that no uninitialised byte ever reaches a hash
//! map key.

/// `family` values.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// `protocol` values (IANA numbers).
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Default sizes; the controller may override them at load time.
pub const DEFAULT_MAX_VIPS: u32 = 1024;
pub const DEFAULT_MAX_BACKENDS: u32 = 65_536;
pub const DEFAULT_CONNTRACK_SIZE: u32 = 1 << 20;
/// Default size of the Maglev pool: room for two 65537-slot tables (a VIP's
/// live table and the one being written during a swap) times 16.
pub const DEFAULT_MAGLEV_POOL: u32 = 32 * 65_537;

/// `BPF_F_MMAPABLE`: the Maglev pool is written through a memory mapping,
/// not one syscall per slot.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// `BPF_F_NO_PREALLOC`: hash map elements are allocated on update and freed
/// after an RCU grace period (see `VIPS`).
pub const BPF_F_NO_PREALLOC: u32 = 1;

/// The layout version of the pinned maps: bump it on any change to a
/// `#[repr(C)]` type stored in a map, or to a map's meaning. `xdplb run`
/// refuses to adopt maps pinned with another version (`xdplb detach` first).
///
/// Version 2 (from version 1): `LbConfig` grew the hash seed, the UDP idle
/// time and the flood limit; `BACKENDS` holds a [`BackendSlot`] (two copies
/// and the live one's index) instead of a `Backend`; `VIPS` is
/// `BPF_F_NO_PREALLOC`. `xdplb run` migrates a version-1 dataplane in place
/// (see lb-userspace `migrate`).
pub const MAPS_ABI: u32 = 2;

/// Sentinel in a Maglev slot: the VIP has no backend.
pub const NO_BACKEND: u32 = u32::MAX;

/// Map names as they appear in the object file (and under the pin directory).
pub mod names {
    pub const VIPS: &str = "VIPS";
    pub const VIP_ADDRS: &str = "VIP_ADDRS";
    pub const BACKENDS: &str = "BACKENDS";
    pub const MAGLEV_POOL: &str = "MAGLEV_POOL";
    pub const FLOWS: &str = "FLOWS";
    pub const CONFIG: &str = "CONFIG";
    pub const VIP_STATS: &str = "VIP_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const REASONS: &str = "REASONS";
    pub const DECAP_STATS: &str = "DECAP_STATS";
    pub const FLOWS_NEW: &str = "FLOWS_NEW";
    pub const NAT_FLOWS: &str = "NAT_FLOWS";
    pub const NAT_REVERSE: &str = "NAT_REVERSE";
    pub const TX_PORTS: &str = "TX_PORTS";
    pub const TRACE_CONFIG: &str = "TRACE_CONFIG";
    pub const TRACE_EVENTS: &str = "TRACE_EVENTS";
    pub const TRACE_LOST: &str = "TRACE_LOST";
}

/// Program names in the object file.
pub mod programs {
    /// The load balancer, attached to the client-facing interface.
    pub const BALANCER: &str = "xdplb_balancer";
    /// The same, reporting every packet's decision (`xdplb trace` swaps it in).
    pub const TRACED: &str = "xdplb_traced";
    /// IP-in-IP decapsulation, attached on backends (`xdplb decap`).
    pub const DECAP: &str = "xdplb_decap";
    /// Plain XDP_PASS, for the peer of a veth the balancer transmits on.
    pub const PASS: &str = "xdplb_pass";
    /// Parse + MAC swap + XDP_TX: the benchmarks' floor, never attached.
    pub const BENCH_FLOOR: &str = "xdplb_bench_floor";
    /// Restores the frame the benchmark saved, then tail-calls the program
    /// measured: `repeat` and live-frames runs stay on one path. In flood
    /// mode each run gets another source (`crate::bench`). Never attached.
    pub const BENCH_RESTORE: &str = "xdplb_bench_restore";
}

/// A VIP: address, port and protocol. Key of `VIPS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct VipKey {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub protocol: u8,
    pub family: u8,
}

/// Forwarding modes (`VipMeta::forwarding`).
pub const FWD_DSR: u32 = 0;
pub const FWD_IPIP: u32 = 1;
/// Destination address and port rewritten to the backend's; replies are
/// translated back on the way out (LVS `-m`).
pub const FWD_NAT: u32 = 2;

/// Default capacity of the NAT connection table (each flow has two entries,
/// one per direction, in two maps of this size).
pub const DEFAULT_NAT_TABLE_SIZE: u32 = 1 << 18;

/// `TX_PORTS` (a devmap) slots: where NAT sends packets.
pub const TX_PORT_CLIENT: u32 = 0;
pub const TX_PORT_BACKEND: u32 = 1;

/// VIP feature flags (`VipMeta::flags`).
/// Hash the client address only (session affinity) instead of the 5-tuple.
pub const VIP_F_HASH_SOURCE_IP: u32 = 1 << 0;
/// With no backend up, pass new flows to the local stack (`on_all_down: pass`).
pub const VIP_F_PASS_WHEN_EMPTY: u32 = 1 << 1;
/// Answer ICMP echo requests to the VIP's address (`icmp_echo: true`). The
/// dataplane reads it per address, from `VIP_ADDRS` (see below): an echo
/// request names no port, so it cannot find one VIP.
pub const VIP_F_ICMP_ECHO: u32 = 1 << 2;

/// In a `VIP_ADDRS` value, above the number of VIPs on the address: some VIP
/// on it has `VIP_F_ICMP_ECHO`. The count never reaches this bit, and a
/// dataplane that only tests the entry's presence ignores it.
pub const VIP_ADDR_F_ICMP_ECHO: u32 = 1 << 31;

/// Value of `VIPS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipMeta {
    /// Index into `VIP_STATS`.
    pub vip_id: u32,
    pub forwarding: u32,
    pub flags: u32,
    /// Where this VIP's Maglev table starts in `MAGLEV_POOL`.
    ///
    /// A table is replaced by writing the new one to a free region of the
    /// pool and then updating this value: `VIPS` is a hash map, whose update
    /// swaps the whole element under RCU, so a packet sees either the old
    /// (offset, size) pair or the new one, never half of each.
    pub ring_offset: u32,
    /// The table's size, a prime.
    pub ring_size: u32,
}

/// Key of `VIP_ADDRS`: an address that has at least one VIP, so that
/// fragments and unparseable packets to it can be told from host traffic.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct AddrKey {
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// `Backend::state` values.
/// The slot is unused; a flow tracked to it is chosen again.
pub const BACKEND_UNUSED: u8 = 0;
/// Receives new and established flows.
pub const BACKEND_ACTIVE: u8 = 1;
/// Weight 0: not in the Maglev table, established flows continue.
pub const BACKEND_DRAINING: u8 = 2;
/// Failed its health check: established flows are chosen again.
pub const BACKEND_DOWN: u8 = 3;

/// A backend as the dataplane reads it: one of the two copies in a
/// [`BackendSlot`] (`BACKENDS` is an array indexed by backend id). One per
/// (VIP, real server) pair, so counters are per VIP and backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    pub addr: [u32; 4],
    /// MAC address of the backend, or of its next hop.
    pub mac: [u8; 6],
    pub family: u8,
    pub state: u8,
    /// Changes whenever this id is given to another server; a tracked flow
    /// whose generation differs is chosen again rather than misdirected.
    pub generation: u32,
    /// Network byte order; 0 keeps the VIP's port.
    pub port: u16,
    pub _pad: u16,
    /// The VIP this backend serves (lets a restarted controller adopt the maps).
    pub vip_id: u32,
}

/// Value of `BACKENDS`: a backend, published without a torn read.
///
/// An array element is written in place, byte by byte as far as a reader on
/// another CPU can tell: a packet copying a `Backend` while the controller
/// rewrites it could take half of the old MAC and half of the new one. So the
/// controller never rewrites the copy packets read: it writes the other copy
/// (`copies[live ^ 1]`, bytes of the live copy rewritten unchanged), and only
/// then, in a second write, flips `live`, a single byte that changes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendSlot {
    /// Which copy packets read: 0 or 1 (only bit 0 counts).
    pub live: u32,
    pub _pad: u32,
    pub copies: [Backend; 2],
}

impl BackendSlot {
    /// The copy packets read now.
    #[inline(always)]
    pub fn current(&self) -> &Backend {
        &self.copies[(self.live & 1) as usize]
    }
}

/// Key of `FLOWS`: a flow as seen arriving from the client.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct FlowKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// Value of `FLOWS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowValue {
    pub backend_id: u32,
    pub generation: u32,
    /// The flow's hash, kept so a tracked packet need not compute it again.
    pub hash: u32,
    /// Seconds (bpf_ktime_get_ns() / 10^9) of the flow's last packet, kept
    /// for UDP flows (`LbConfig::udp_idle_s`); 0: not known (an entry written
    /// by the controller, or by a version-1 dataplane, where this was padding).
    pub last_seen_s: u32,
}

/// An entry of `FLOWS_NEW`, the per-CPU cache of flows seen once: a flow
/// enters `FLOWS` only with its second packet (`embryonic`), so a flood of
/// one-packet flows (spoofed SYNs) never evicts an established one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EmbryonicFlow {
    /// `family` 0: the slot is free.
    pub key: FlowKey,
    pub value: FlowValue,
    /// bpf_ktime_get_ns() of the flow's first packet.
    pub seen_ns: u64,
}

/// An embryonic flow's second packet must come within this many seconds of
/// its first (a SYN's retransmissions included) to confirm it.
pub const EMBRYONIC_S: u32 = 10;

/// Number of `FLOWS_NEW` slots per CPU (a power of two): buckets of
/// [`EMBRYONIC_WAYS`] slots, the bucket chosen by the flow's hash.
pub const EMBRYONIC_SLOTS: u32 = 1 << 15;
/// Slots per `FLOWS_NEW` bucket: a new flow takes a free one, else the
/// oldest, so a flood replaces the oldest first.
pub const EMBRYONIC_WAYS: u32 = 4;

/// `FLOOD`'s one per-CPU entry: new flows tracked in the current second.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FloodWindow {
    pub start_ns: u64,
    pub tracked: u32,
    pub _pad: u32,
}

/// `LbConfig::flags`: some VIP uses NAT, so replies must be looked for.
pub const CFG_NAT: u16 = 1 << 0;

/// The one entry of `CONFIG`: per-interface facts the controller learns.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LbConfig {
    /// Source MAC of transmitted frames (the interface's own).
    pub if_mac: [u8; 6],
    pub flags: u16,
    /// NAT: the interface toward the backends (= the client one when one-armed).
    pub backend_if_mac: [u8; 6],
    pub _pad: [u8; 2],
    pub client_ifindex: u32,
    pub backend_ifindex: u32,
    /// Interface MTU; an encapsulated packet larger than this is dropped.
    /// 0 disables the check.
    pub mtu: u32,
    /// IP-in-IP outer source: `base | (flow hash & host_mask)`, so the
    /// backend's receive-side scaling still spreads flows.
    pub ipip_src_v4: u32,
    pub ipip_src_v4_host_mask: u32,
    pub ipip_src_v6: [u32; 4],
    /// Host mask of the last word of the IPv6 outer source.
    pub ipip_src_v6_host_mask: u32,
    /// The flow hash's secret seed (`flow_hash`): every node of a site has
    /// the same one, an attacker none.
    pub hash_seed: [u32; 2],
    /// A tracked UDP flow idle this many seconds is chosen again (a draining
    /// server's UDP flows end); 0: never.
    pub udp_idle_s: u32,
    /// New flows one CPU tracks per second at most; past it the CPU is in
    /// flood mode: new flows are forwarded by Maglev alone, untracked, and
    /// counted (`reasons::CONNTRACK_FLOOD`). 0: no limit.
    pub flood_rate: u32,
}

/// `NatFlow::state` / `NatReply::state`: how far a connection is.
///
/// ```text
///   TCP: SYN ──> EMBRYONIC ──backend's SYN-ACK──> ANSWERED ──client's ACK of it──> OPEN
///   UDP: datagram ──> EMBRYONIC ──backend's reply──> ANSWERED ──client's next datagram──> OPEN
///   OPEN ──FIN──> CLOSING ──RST──> CLOSED      (RST from OPEN: CLOSED)
///   CLOSING / CLOSED ──SYN (the client reuses its port)──> EMBRYONIC
/// ```
///
/// Only a TCP SYN (without ACK) creates TCP state: any other segment of an
/// untracked 5-tuple is dropped. EMBRYONIC and ANSWERED are *unconfirmed*:
/// the client has not shown it receives the backend's packets (a backend
/// answers a spoofed SYN with a SYN-ACK too). The TCP ACK that opens must
/// acknowledge the backend's SYN-ACK (`ack == NatFlow::backend_isn + 1`).
/// No packet refreshes an unconfirmed connection's `last_seen_ns`, so the
/// controller forgets it `nat.embryonic_timeout` after it was created, and
/// reclaims unconfirmed ones first when the table nears full.
pub const NAT_OPEN: u8 = 0;
/// A FIN was seen: expires after the closed timeout without packets.
pub const NAT_CLOSING: u8 = 1;
/// A RST was seen.
pub const NAT_CLOSED: u8 = 2;
/// The client's SYN (or first UDP datagram) went to the backend, nothing
/// came back yet. Added without a layout change: an older controller reads
/// it as "not open" and forgets it after its closed timeout.
pub const NAT_EMBRYONIC: u8 = 3;
/// The backend answered (its SYN-ACK, or a UDP reply), the client has not
/// confirmed (the ACK of that SYN-ACK, or another datagram). Unconfirmed,
/// like EMBRYONIC. An older controller would hold it as OPEN: the
/// dataplane and the controller are upgraded together.
pub const NAT_ANSWERED: u8 = 4;

/// Whether a connection in `state` is unconfirmed (EMBRYONIC or ANSWERED).
pub const fn nat_unconfirmed(state: u8) -> bool {
    state == NAT_EMBRYONIC || state == NAT_ANSWERED
}

/// Value of `NAT_FLOWS`, keyed by the client-side `FlowKey`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatFlow {
    pub backend_id: u32,
    pub generation: u32,
    /// bpf_ktime_get_ns() of the last packet from the client; of the
    /// connection's creation while it is unconfirmed.
    pub last_seen_ns: u64,
    pub state: u8,
    pub _pad: [u8; 3],
    /// The backend's initial sequence number (host order), from its SYN-ACK:
    /// the client's ACK must acknowledge it to open the connection. Was
    /// padding (`_pad: [u8; 7]`): the layout is byte-identical.
    pub backend_isn: u32,
}

/// Value of `NAT_REVERSE`, keyed by the reply's `FlowKey` (source: the
/// backend's address and port; destination: the client's).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatReply {
    /// The VIP address and port the reply must come from.
    pub vip_addr: [u32; 4],
    pub vip_port: u16,
    /// MAC the client's packets came from (the client or its router): the
    /// reply goes back to it.
    pub client_mac: [u8; 6],
    pub state: u8,
    pub _pad: [u8; 7],
    /// bpf_ktime_get_ns() of the last reply.
    pub last_seen_ns: u64,
}

/// Packets and bytes, per CPU, in `VIP_STATS` and `BACKEND_STATS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)] with explicit padding fields and
    // only integer members, so every bit pattern is valid.
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipMeta {}
    unsafe impl aya::Pod for super::AddrKey {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::BackendSlot {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::EmbryonicFlow {}
    unsafe impl aya::Pod for super::LbConfig {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::NatFlow {}
    unsafe impl aya::Pod for super::NatReply {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<VipKey>(), 20);
        assert_eq!(size_of::<VipMeta>(), 20);
        assert_eq!(size_of::<AddrKey>(), 20);
        assert_eq!(size_of::<Backend>(), 36);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<BackendSlot>(), 80);
        assert_eq!(size_of::<FlowValue>(), 16);
        assert_eq!(size_of::<LbConfig>(), 72);
        assert_eq!(size_of::<NatFlow>(), 24);
        // `backend_isn` took the last 4 of the 7 padding bytes after `state`.
        assert_eq!((core::mem::offset_of!(NatFlow, state), core::mem::offset_of!(NatFlow, backend_isn)), (16, 20));
        assert_eq!(size_of::<NatReply>(), 40);
        assert_eq!(size_of::<Counter>(), 16);
    }
}
