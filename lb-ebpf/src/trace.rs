//! Per-packet decisions for `xdplb trace` (see lb_common::trace).
//!
//! `balance` reports what it decides to an `Observe`r. The attached
//! program passes `Untraced`, whose methods are empty, so its code is the
//! same as if nothing were observed: tracing costs nothing while it is off.
//! The traced program (`xdplb_traced`, swapped in by `xdplb trace`) passes
//! `Traced`, which fills a `TraceEvent`, and writes that with the frame's
//! first bytes to a ring buffer on the way out. The event lives in a per-CPU
//! map, not on the stack: the balancer leaves no room there for 128 bytes.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns, bpf_xdp_get_buff_len, bpf_xdp_load_bytes},
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
    programs::XdpContext,
};
use lb_common::{
    maps::{AddrKey, Backend, FlowKey, NatReply, VipKey, VipMeta},
    trace::{
        TRACE_F_BACKEND, TRACE_F_FLOW, TRACE_F_MAGLEV, TRACE_F_NAT_REPLY, TRACE_F_VIP, TRACE_F_VIP_ADDR, TRACE_NONE,
        TRACE_RING_DEFAULT_BYTES, TRACE_SNAPLEN, TRACE_WAKEUP_BYTES, TraceConfig, TraceEvent, TraceRecord,
    },
};

/// Whether and what to trace: a deadline and filters. Written by `xdplb trace`
/// (and cleared by the controller once the deadline passed). Pinned.
#[map]
pub static TRACE_CONFIG: Array<TraceConfig> = Array::with_max_entries(1, 0);

/// One `TraceRecord` per traced packet. Read by `xdplb trace`, which loads
/// it with its real size (TRACE_RING_BYTES).
#[map]
pub static TRACE_EVENTS: RingBuf = RingBuf::with_byte_size(TRACE_RING_DEFAULT_BYTES, 0);

/// Records that did not fit in TRACE_EVENTS (the reader fell behind). Written here.
#[map]
pub static TRACE_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The event being filled for the packet at hand, per CPU. Written here.
#[map]
static TRACE_SCRATCH: PerCpuArray<TraceEvent> = PerCpuArray::with_max_entries(1, 0);

/// What the balancer tells about its decision, step by step.
pub trait Observe {
    /// A TCP/UDP packet, as parsed.
    #[inline(always)]
    fn packet(&mut self, _flow: &FlowKey, _tcp_flags: u8) {}
    /// Not balanced, but addressed to a VIP's address.
    #[inline(always)]
    fn vip_address(&mut self, _dst: &AddrKey) {}
    #[inline(always)]
    fn vip(&mut self, _key: &VipKey, _vip: &VipMeta) {}
    /// The connection table's answer (`reasons::CONNTRACK_*`).
    #[inline(always)]
    fn conntrack(&mut self, _reason: u32) {}
    /// Maglev's choice: the flow hash and the slot in the VIP's table.
    #[inline(always)]
    fn maglev(&mut self, _hash: u32, _slot: u32) {}
    #[inline(always)]
    fn backend(&mut self, _id: u32, _backend: &Backend) {}
    /// A backend's reply of a NAT connection, translated back to this VIP.
    #[inline(always)]
    fn nat_reply(&mut self, _reply: &NatReply) {}
}

/// The attached program's observer: sees nothing, costs nothing.
pub struct Untraced;

impl Observe for Untraced {}

/// The traced program's observer: fills this CPU's TRACE_SCRATCH event,
/// or nothing (None) while no trace is on.
pub struct Traced(Option<*mut TraceEvent>);

impl Traced {
    /// This CPU's event, with nothing decided yet, if a trace is on: its
    /// deadline not passed. Otherwise (a killed `xdplb trace` left the
    /// program attached) every observation is a skipped branch.
    #[inline(always)]
    pub fn start() -> Self {
        let Some(cfg) = TRACE_CONFIG.get(0) else { return Self(None) };
        if cfg.deadline_ns == 0 {
            return Self(None);
        }
        // The coarse clock (CLOCK_MONOTONIC_COARSE, a tick behind at most)
        // reads no clock source: a few ns where bpf_ktime_get_ns() costs
        // about 30 here, on every packet while a killed trace's program runs.
        // SAFETY: a helper without arguments.
        if unsafe { bpf_ktime_get_coarse_ns() } >= cfg.deadline_ns {
            return Self(None);
        }
        let event = TRACE_SCRATCH.get_ptr_mut(0);
        if let Some(e) = event {
            // SAFETY: this CPU's slot; nothing else runs on it meanwhile.
            unsafe {
                *e = TraceEvent {
                    backend_id: TRACE_NONE,
                    vip_id: TRACE_NONE,
                    maglev_slot: TRACE_NONE,
                    conntrack: TRACE_NONE,
                    ..TraceEvent::default()
                }
            };
        }
        Self(event)
    }

    #[inline(always)]
    fn with(&mut self, f: impl FnOnce(&mut TraceEvent)) {
        if let Some(e) = self.0 {
            // SAFETY: as in start().
            f(unsafe { &mut *e });
        }
    }
}

impl Observe for Traced {
    #[inline(always)]
    fn packet(&mut self, flow: &FlowKey, tcp_flags: u8) {
        self.with(|e| {
            e.flow = *flow;
            e.tcp_flags = tcp_flags;
            e.flags |= TRACE_F_FLOW;
        });
    }

    #[inline(always)]
    fn vip_address(&mut self, dst: &AddrKey) {
        self.with(|e| {
            e.vip_addr = dst.addr;
            e.flow.family = dst.family;
            e.flags |= TRACE_F_VIP_ADDR;
        });
    }

    #[inline(always)]
    fn vip(&mut self, key: &VipKey, vip: &VipMeta) {
        self.with(|e| {
            e.vip_addr = key.addr;
            e.vip_port = key.port;
            e.vip_id = vip.vip_id;
            e.forwarding = vip.forwarding as u8;
            e.flags |= TRACE_F_VIP;
        });
    }

    #[inline(always)]
    fn conntrack(&mut self, reason: u32) {
        self.with(|e| e.conntrack = reason);
    }

    #[inline(always)]
    fn maglev(&mut self, hash: u32, slot: u32) {
        self.with(|e| {
            e.hash = hash;
            e.maglev_slot = slot;
            e.flags |= TRACE_F_MAGLEV;
        });
    }

    #[inline(always)]
    fn backend(&mut self, id: u32, backend: &Backend) {
        self.with(|e| {
            e.backend_id = id;
            e.backend_addr = backend.addr;
            e.backend_port = backend.port;
            e.flags |= TRACE_F_BACKEND;
        });
    }

    #[inline(always)]
    fn nat_reply(&mut self, reply: &NatReply) {
        self.with(|e| {
            e.vip_addr = reply.vip_addr;
            e.vip_port = reply.vip_port;
            e.flags |= TRACE_F_NAT_REPLY;
        });
    }
}

/// Writes the decision, the time and the frame as it leaves into
/// TRACE_EVENTS, if a trace was on when the packet came and the packet
/// passes its filters.
#[inline(always)]
pub fn emit(ctx: &XdpContext, action: u32, reason: u32, traced: Traced) {
    let Some(event) = traced.0 else { return };
    // SAFETY: as in Traced::start().
    let event = unsafe { &mut *event };
    let Some(cfg) = TRACE_CONFIG.get(0) else { return };
    if !cfg.matches(event) {
        return;
    }
    // SAFETY: a helper without arguments.
    event.timestamp_ns = unsafe { bpf_ktime_get_ns() };
    let Some(mut entry) = TRACE_EVENTS.reserve::<TraceRecord>(0) else {
        if let Some(lost) = TRACE_LOST.get_ptr_mut(0) {
            // SAFETY: a per-CPU slot, written only by this CPU.
            unsafe { *lost += 1 };
        }
        return;
    };
    // SAFETY: ctx.ctx is the program's own xdp_md.
    let frame_len = unsafe { bpf_xdp_get_buff_len(ctx.ctx) } as u32;
    let mut cap = frame_len;
    if cap > TRACE_SNAPLEN as u32 {
        cap = TRACE_SNAPLEN as u32;
    }
    let record = entry.as_mut_ptr();
    if cap > 0 {
        // SAFETY: the record was reserved for us and holds TRACE_SNAPLEN
        // bytes of frame; cap is at most that and at most the frame.
        let copied = unsafe { bpf_xdp_load_bytes(ctx.ctx, 0, (*record).frame.as_mut_ptr().cast(), cap) };
        if copied != 0 {
            cap = 0;
        }
    }
    event.action = action;
    event.reason = reason;
    event.ifindex = ctx.ingress_ifindex() as u32;
    event.frame_len = frame_len;
    event.cap_len = cap;
    // SAFETY: as above; the event part is written whole.
    unsafe { (*record).event = *event };
    // Waking the reader is an interrupt to its CPU: about 6 us a record in
    // a VM. The reader polls every 50 ms instead, and is woken only when
    // the ring fills up faster than that.
    let wake = if TRACE_EVENTS.query(BPF_RB_AVAIL_DATA as u64) > TRACE_WAKEUP_BYTES as u64 {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(wake as u64);
}
