//! The benchmarks' restore wrapper. BPF_PROG_TEST_RUN hands a program the
//! frame as the previous run left it: `repeat` re-runs on the rewritten
//! bytes, and live-frames mode recycles its pages without copying the input
//! in again. A program whose rewrite changes its own path (IP-in-IP, NAT, a
//! DSR frame now addressed to a backend's MAC) would then be measured on
//! another path. This puts the frame's length and first 64 bytes back as the
//! benchmark saved them, then tail-calls the program under test. Never
//! attached; its two maps are the benchmark's own and are never pinned.

use aya_ebpf::{
    bindings::xdp_action::XDP_ABORTED,
    helpers::bpf_xdp_adjust_head,
    macros::map,
    maps::{Array, ProgramArray},
    programs::XdpContext,
};

use crate::parse::ptr_at;

/// Slot 0: the program under test. Written by the benchmark.
#[map]
static BENCH_TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Word 0: the frame's length; words 1..=8: its first 64 bytes (every
/// header any path rewrites: Ethernet, IPv4 and TCP, or Ethernet alone for
/// IPv6-in-IPv6). Written by the benchmark.
#[map]
static BENCH_FRAME: Array<[u64; 9]> = Array::with_max_entries(1, 0);

#[inline(always)]
pub fn restore(ctx: &XdpContext) -> u32 {
    let Some(saved) = BENCH_FRAME.get(0) else { return XDP_ABORTED };
    // An encapsulation moved the start of the frame back: move it forward again.
    // Bounded: the verifier allows no packet-pointer arithmetic with an unbounded value.
    let len = (saved[0] & 0x3fff) as i64;
    let grown = (ctx.data_end() - ctx.data()) as i64 - len;
    if grown != 0 && unsafe { bpf_xdp_adjust_head(ctx.ctx, grown as i32) } != 0 {
        return XDP_ABORTED;
    }
    let Some(head) = ptr_at::<[u64; 8]>(ctx, 0) else { return XDP_ABORTED };
    // SAFETY: ptr_at checked that 64 bytes lie within the frame; the frame
    // starts where the kernel put it, 8-byte aligned.
    unsafe {
        *head = [saved[1], saved[2], saved[3], saved[4], saved[5], saved[6], saved[7], saved[8]];
        BENCH_TARGET.tail_call(ctx, 0);
    }
    XDP_ABORTED
}
