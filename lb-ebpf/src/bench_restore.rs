//! The benchmarks' restore wrapper. BPF_PROG_TEST_RUN hands a program the
//! frame as the previous run left it: `repeat` re-runs on the rewritten
//! bytes, and live-frames mode recycles its pages without copying the input
//! in again. A program whose rewrite changes its own path (IP-in-IP, NAT, a
//! DSR frame now addressed to a backend's MAC) would then be measured on
//! another path. This puts the frame's length and first 64 bytes back as the
//! benchmark saved them, then tail-calls the program under test. Never
//! attached; its maps are the benchmark's own and are never pinned.
//!
//! The flood mode (`BENCH_VARY`) also gives every run another client: one
//! `repeat` call then sends that many distinct new flows (see
//! `lb_common::bench`).

use aya_ebpf::{
    bindings::xdp_action::XDP_ABORTED,
    helpers::{bpf_get_smp_processor_id, bpf_xdp_adjust_head},
    macros::map,
    maps::{Array, PerCpuArray, ProgramArray},
    programs::XdpContext,
};
use lb_common::bench::{VARY_SOURCE_V4, checksum_replace, varied_source_v4};

use crate::parse::ptr_at;

/// Slot 0: the program under test. Written by the benchmark.
#[map]
static BENCH_TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Word 0: the frame's length; words 1..=8: its first 64 bytes (every
/// header any path rewrites: Ethernet, IPv4 and TCP, or Ethernet alone for
/// IPv6-in-IPv6). Written by the benchmark.
#[map]
static BENCH_FRAME: Array<[u64; 9]> = Array::with_max_entries(1, 0);

/// Word 0: the mode (`lb_common::bench::VARY_*`, 0 = off); word 1: the seed.
/// Written by the benchmark.
#[map]
static BENCH_VARY: Array<[u32; 2]> = Array::with_max_entries(1, 0);

/// Runs made in a varying mode on this CPU: the index of the next source. Written here.
#[map]
static BENCH_RUNS: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

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
    unsafe { *head = [saved[1], saved[2], saved[3], saved[4], saved[5], saved[6], saved[7], saved[8]] };
    if let Some(vary) = BENCH_VARY.get(0)
        && vary[0] == VARY_SOURCE_V4
    {
        // SAFETY: the same 64 checked bytes, seen as bytes (alignment 1).
        if !vary_source_v4(unsafe { &mut *(head as *mut [u8; 64]) }, vary[1]) {
            return XDP_ABORTED;
        }
    }
    // SAFETY: a tail call to the program the benchmark put in slot 0; it
    // returns only if the slot is empty.
    unsafe { BENCH_TARGET.tail_call(ctx, 0) };
    XDP_ABORTED
}

/// Gives an IPv4 TCP or UDP frame without options (the first 64 bytes, just
/// restored) this run's source address and port, and updates the IPv4 and
/// transport checksums to match. False for any other frame.
#[inline(always)]
fn vary_source_v4(f: &mut [u8; 64], seed: u32) -> bool {
    // IPv4 (EtherType 0x0800), version 4 with a 20-byte header, TCP or UDP.
    if f[12] != 0x08 || f[13] != 0x00 || f[14] != 0x45 || (f[23] != 6 && f[23] != 17) {
        return false;
    }
    let Some(runs) = BENCH_RUNS.get_ptr_mut(0) else { return false };
    // SAFETY: this CPU's element of a per-CPU array; a program run is not
    // preempted on its CPU, so nothing else writes it meanwhile.
    let run = unsafe {
        let run = *runs;
        *runs = run.wrapping_add(1);
        run
    };
    // SAFETY: a helper without arguments or side effects.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let (addr, port) = varied_source_v4(seed, cpu, run);
    let old =
        [u16::from_be_bytes([f[26], f[27]]), u16::from_be_bytes([f[28], f[29]]), u16::from_be_bytes([f[34], f[35]])];
    let new = [(addr >> 16) as u16, addr as u16, port];
    f[26..28].copy_from_slice(&new[0].to_be_bytes());
    f[28..30].copy_from_slice(&new[1].to_be_bytes());
    f[34..36].copy_from_slice(&new[2].to_be_bytes());
    // The IPv4 header covers the address; TCP and UDP cover the address
    // (pseudo-header) and the port.
    let ip = replace(u16::from_be_bytes([f[24], f[25]]), &old[..2], &new[..2]);
    f[24..26].copy_from_slice(&ip.to_be_bytes());
    if f[23] == 6 {
        let tcp = replace(u16::from_be_bytes([f[50], f[51]]), &old, &new);
        f[50..52].copy_from_slice(&tcp.to_be_bytes());
    } else {
        let check = u16::from_be_bytes([f[40], f[41]]);
        // 0: the sender computed no UDP checksum; a computed 0 is sent as all ones.
        if check != 0 {
            let udp = match replace(check, &old, &new) {
                0 => 0xffff,
                c => c,
            };
            f[40..42].copy_from_slice(&udp.to_be_bytes());
        }
    }
    true
}

#[inline(always)]
fn replace(mut check: u16, old: &[u16], new: &[u16]) -> u16 {
    for (o, n) in old.iter().zip(new) {
        check = checksum_replace(check, *o, *n);
    }
    check
}
