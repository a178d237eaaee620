//! Why a packet left the XDP program the way it did. Every early exit of the
//! dataplane increments exactly one of these, so an operator can always tell
//! why a packet was passed or dropped.

/// Not VIP traffic (not IP, or no VIP has this address/port/protocol): XDP_PASS, untouched.
pub const PASS_NOT_VIP: u32 = 0;
/// Ethernet or IP header truncated or invalid, so it cannot be VIP traffic we
/// can balance: XDP_PASS untouched, the kernel's own checks drop it.
pub const PASS_MALFORMED_L3: u32 = 1;
/// Addressed to a VIP address, but not TCP/UDP (ICMP, ...): XDP_PASS to the host.
pub const PASS_VIP_OTHER_PROTO: u32 = 2;
/// Addressed to a VIP address, but the TCP/UDP header (or the IPv6 extension
/// header chain) is truncated or too long to walk; an ICMP message whose
/// header or quoted header is truncated or invalid; an IP length longer than
/// the frame (IP-in-IP VIPs); an echo request from a non-unicast sender; a
/// TCP segment other than a SYN of an untracked NAT connection: XDP_DROP.
pub const DROP_MALFORMED_L4: u32 = 3;
/// An IP fragment addressed to a VIP address: XDP_DROP (no ports in
/// non-first fragments, so no consistent backend choice; as Katran).
pub const DROP_FRAGMENT: u32 = 4;
/// The VIP has no usable backend (empty table, or the slot's backend is gone): XDP_DROP.
pub const DROP_NO_BACKEND: u32 = 5;
/// The encapsulated packet would exceed the interface MTU: dropped, and the
/// client answered with ICMP "fragmentation needed" / "packet too big"
/// (XDP_TX) within the rate limit, else XDP_DROP.
pub const DROP_TOO_BIG: u32 = 6;
/// bpf_xdp_adjust_head failed (no headroom): XDP_DROP.
pub const DROP_ENCAP_FAILED: u32 = 7;
/// The packet was rewritten and transmitted (XDP_TX).
pub const TX: u32 = 8;
/// The flow was found in the connection table with a live backend.
pub const CONNTRACK_HIT: u32 = 9;
/// The flow was not tracked: Maglev chose its backend, and the flow is
/// remembered as seen once (embryonic, in this CPU's `FLOWS_NEW`); its
/// second packet confirms it into the connection table.
pub const CONNTRACK_MISS: u32 = 10;
/// The flow was tracked, but its backend is down or gone: chosen again.
pub const CONNTRACK_STALE: u32 = 11;
/// Inserting the flow into the connection table failed (it still is forwarded).
pub const CONNTRACK_INSERT_FAILED: u32 = 12;
/// The backend's slot in the backend table was invalid (controller bug guard): XDP_DROP.
pub const DROP_BAD_BACKEND: u32 = 13;

/// The VIP has no backend up and is configured `on_all_down: pass`: XDP_PASS.
pub const PASS_ALL_DOWN: u32 = 14;

/// A TCP SYN (a new connection reusing the 5-tuple of a tracked flow) whose
/// tracked backend is draining: chosen again, so a drained server gets no
/// new connection even when a client reuses a source port (as IPVS's
/// conn_reuse_mode).
pub const CONNTRACK_SYN_RESCHEDULED: u32 = 15;

/// NAT: a reply of a tracked connection, translated back to the VIP and sent to the client;
/// also an ICMP error from the backend side about a tracked connection, translated for its client.
pub const NAT_REPLY: u32 = 16;
/// NAT: the connection table is full; a new connection is refused so that
/// established ones keep their entries.
pub const DROP_NAT_TABLE_FULL: u32 = 17;
/// NAT: sending to the other interface (XDP_REDIRECT) failed.
pub const DROP_REDIRECT_FAILED: u32 = 18;

/// The flow's second packet (for TCP, not a SYN) came while it was embryonic:
/// it entered the connection table with the backend its first packet went to.
pub const CONNTRACK_CONFIRMED: u32 = 19;
/// This CPU tracked more new flows this second than `conntrack_flood_rate`
/// (flood mode): the flow was forwarded by Maglev alone, untracked.
pub const CONNTRACK_FLOOD: u32 = 20;
/// A tracked UDP flow had been idle longer than `conntrack_udp_idle`: chosen again.
pub const CONNTRACK_EXPIRED: u32 = 21;

/// Number of reasons; the size of the reasons counter map.
pub const COUNT: u32 = 22;

/// Names for logs, `status` and metrics, indexed by reason.
pub const NAMES: [&str; COUNT as usize] = [
    "pass_not_vip",
    "pass_malformed_l3",
    "pass_vip_other_proto",
    "drop_malformed_l4",
    "drop_fragment",
    "drop_no_backend",
    "drop_too_big",
    "drop_encap_failed",
    "tx",
    "conntrack_hit",
    "conntrack_miss",
    "conntrack_stale",
    "conntrack_insert_failed",
    "drop_bad_backend",
    "pass_all_down",
    "conntrack_syn_rescheduled",
    "nat_reply",
    "drop_nat_table_full",
    "drop_redirect_failed",
    "conntrack_confirmed",
    "conntrack_flood",
    "conntrack_expired",
];
