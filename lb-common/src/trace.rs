//! `xdplb trace`: what the traced balancer (`programs::TRACED`) reports for
//! every packet it handles while a trace runs.
//!
//! The controller attaches the untraced balancer, so tracing costs nothing
//! when off. `xdplb trace` swaps the traced build of the same program into
//! the XDP link and back. The traced program writes one `TraceRecord` per
//! packet into the `TRACE_EVENTS` ring buffer: the decision and the first
//! `TRACE_SNAPLEN` bytes of the frame as it left XDP (after the rewrite),
//! while `bpf_ktime_get_ns()` is before `TraceConfig::deadline_ns`. The
//! tracer renews that deadline every second, so a trace whose process died
//! stops by itself; the controller then swaps the untraced program back.

use crate::maps::FlowKey;

/// Bytes of each frame copied into its record (pcap's snapshot length).
pub const TRACE_SNAPLEN: usize = 256;

/// Default size of the ring buffer (the object's); `xdplb trace` loads it
/// with `TRACE_RING_BYTES`.
pub const TRACE_RING_DEFAULT_BYTES: u32 = 4096;
/// Ring buffer of `xdplb trace`: about 2,700 records.
pub const TRACE_RING_BYTES: u32 = 1 << 20;
/// The traced program wakes the reader only when this much waits in the
/// ring; otherwise the reader finds the records when it polls (every 50 ms).
pub const TRACE_WAKEUP_BYTES: u32 = TRACE_RING_BYTES / 4;
/// How often `xdplb trace` looks for records it was not woken for.
pub const TRACE_POLL_MS: u32 = 50;

/// "No value" in the `u32` fields of `TraceEvent`.
pub const TRACE_NONE: u32 = u32::MAX;

/// `TraceEvent::flags`.
/// A TCP or UDP packet: `flow` and `tcp_flags` hold what was parsed.
pub const TRACE_F_FLOW: u16 = 1 << 0;
/// The packet matched a VIP (address, port, protocol): `vip_*`, `forwarding`.
pub const TRACE_F_VIP: u16 = 1 << 1;
/// Addressed to a VIP's address but not balanced (fragment, other protocol,
/// truncated transport header): `vip_addr` holds the address, `vip_port` 0.
pub const TRACE_F_VIP_ADDR: u16 = 1 << 2;
/// A backend was chosen: `backend_*`.
pub const TRACE_F_BACKEND: u16 = 1 << 3;
/// Maglev chose the backend: `maglev_slot` and `hash` are set.
pub const TRACE_F_MAGLEV: u16 = 1 << 4;
/// A NAT reply of a tracked connection: `vip_*` is what it is translated
/// back to; the client is the flow's destination.
pub const TRACE_F_NAT_REPLY: u16 = 1 << 5;

/// One packet's decision, as the traced program saw it. Followed in its
/// `TraceRecord` by the frame's first bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TraceEvent {
    /// bpf_ktime_get_ns() (CLOCK_MONOTONIC) when the packet left.
    pub timestamp_ns: u64,
    /// As parsed from the packet that came in (before any rewrite). Only
    /// `family` is set without TRACE_F_FLOW (with TRACE_F_VIP_ADDR).
    pub flow: FlowKey,
    pub vip_addr: [u32; 4],
    pub backend_addr: [u32; 4],
    pub backend_id: u32,
    /// Network byte order; 0: the VIP's port.
    pub backend_port: u16,
    /// Network byte order.
    pub vip_port: u16,
    pub vip_id: u32,
    /// The flow hash Maglev used.
    pub hash: u32,
    /// Index into the VIP's Maglev table (hash % table size).
    pub maglev_slot: u32,
    /// XDP action (XDP_DROP 1, XDP_PASS 2, XDP_TX 3, XDP_REDIRECT 4).
    pub action: u32,
    /// The outcome counted for this packet (`reasons`).
    pub reason: u32,
    /// How the connection table answered (`reasons::CONNTRACK_*`), or TRACE_NONE.
    pub conntrack: u32,
    /// Interface the packet came in on.
    pub ifindex: u32,
    /// Length of the frame as it left XDP.
    pub frame_len: u32,
    /// Bytes of it in the record (at most TRACE_SNAPLEN).
    pub cap_len: u32,
    pub flags: u16,
    /// `maps::FWD_*` of the VIP (with TRACE_F_VIP).
    pub forwarding: u8,
    pub tcp_flags: u8,
}

/// What the traced program writes into `TRACE_EVENTS`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TraceRecord {
    pub event: TraceEvent,
    pub frame: [u8; TRACE_SNAPLEN],
}

/// The one entry of `TRACE_CONFIG` (pinned with the other maps): whether
/// and what to trace. Written by `xdplb trace`, cleared by it or, once the
/// deadline passed, by the controller.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TraceConfig {
    /// bpf_ktime_get_ns() until which events are written; 0: off.
    pub deadline_ns: u64,
    /// Only packets of this VIP (with `vip_family` != 0).
    pub vip_addr: [u32; 4],
    /// Only packets from (or NAT replies to) this client (with `client_family` != 0).
    pub client_addr: [u32; 4],
    /// Network byte order; 0: any port of `vip_addr`.
    pub vip_port: u16,
    /// 0: any VIP; else `maps::FAMILY_V4`/`FAMILY_V6`.
    pub vip_family: u8,
    /// 0: any client.
    pub client_family: u8,
    /// The `xdplb trace` process that holds the lease.
    pub owner_pid: u32,
}

impl TraceConfig {
    /// Whether `event` passes the VIP and client filters.
    #[inline(always)]
    pub fn matches(&self, e: &TraceEvent) -> bool {
        if self.vip_family != 0 {
            let vip_known = e.flags & (TRACE_F_VIP | TRACE_F_VIP_ADDR | TRACE_F_NAT_REPLY) != 0;
            if !vip_known
                || e.flow.family != self.vip_family
                || e.vip_addr != self.vip_addr
                || (self.vip_port != 0 && e.vip_port != self.vip_port)
            {
                return false;
            }
        }
        if self.client_family != 0 {
            if e.flags & TRACE_F_FLOW == 0 || e.flow.family != self.client_family {
                return false;
            }
            let client = if e.flags & TRACE_F_NAT_REPLY != 0 { &e.flow.dst } else { &e.flow.src };
            if *client != self.client_addr {
                return false;
            }
        }
        true
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)] with explicit padding and only integer members, so
    // every bit pattern is valid.
    unsafe impl aya::Pod for super::TraceConfig {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::{FAMILY_V4, FAMILY_V6};
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<TraceEvent>(), 128);
        assert_eq!(size_of::<TraceRecord>(), 128 + TRACE_SNAPLEN);
        assert_eq!(size_of::<TraceConfig>(), 48);
    }

    fn event(flags: u16, src: u32, dst: u32, port: u16) -> TraceEvent {
        TraceEvent {
            flow: FlowKey { src: [src, 0, 0, 0], dst: [dst, 0, 0, 0], family: FAMILY_V4, ..Default::default() },
            vip_addr: [dst, 0, 0, 0],
            vip_port: port,
            flags,
            ..Default::default()
        }
    }

    #[test]
    fn filters() {
        let hit = event(TRACE_F_FLOW | TRACE_F_VIP, 7, 100, 80);
        let any = TraceConfig::default();
        assert!(any.matches(&hit));
        assert!(any.matches(&TraceEvent::default()), "no filter: everything, even non-IP");

        let vip = TraceConfig { vip_addr: [100, 0, 0, 0], vip_family: FAMILY_V4, ..Default::default() };
        assert!(vip.matches(&hit));
        assert!(!vip.matches(&event(TRACE_F_FLOW, 7, 100, 80)), "not a VIP hit");
        assert!(!vip.matches(&event(TRACE_F_FLOW | TRACE_F_VIP, 7, 101, 80)), "another VIP");
        assert!(vip.matches(&event(TRACE_F_VIP_ADDR, 0, 100, 0)), "a fragment to the VIP address");
        let v6 = TraceConfig { vip_family: FAMILY_V6, ..vip };
        assert!(!v6.matches(&hit), "other family");
        let port = TraceConfig { vip_port: 80, ..vip };
        assert!(port.matches(&hit));
        assert!(!port.matches(&event(TRACE_F_FLOW | TRACE_F_VIP, 7, 100, 443)));
        assert!(!port.matches(&event(TRACE_F_VIP_ADDR, 0, 100, 0)), "a fragment has no port");

        let client = TraceConfig { client_addr: [7, 0, 0, 0], client_family: FAMILY_V4, ..Default::default() };
        assert!(client.matches(&hit));
        assert!(!client.matches(&event(TRACE_F_FLOW | TRACE_F_VIP, 8, 100, 80)));
        assert!(!client.matches(&event(TRACE_F_VIP_ADDR, 0, 100, 0)), "no flow, no client");
        // A NAT reply goes from the backend to the client.
        assert!(client.matches(&event(TRACE_F_FLOW | TRACE_F_NAT_REPLY, 55, 7, 80)));
    }
}
