//! Connection tracking for DSR and IP-in-IP VIPs: a flow keeps its backend
//! when the VIP's table changes, and no flood of new flows takes that from
//! an established one.
//!
//! ```text
//!   1st packet ──> Maglev ──> FLOWS_NEW (this CPU's bucket for the flow's hash)    CONNTRACK_MISS
//!   2nd packet (TCP: not a SYN), within EMBRYONIC_S, found there ──> FLOWS          CONNTRACK_CONFIRMED
//!   later packets ──> FLOWS hit                                                     CONNTRACK_HIT
//! ```
//!
//! - **Floods.** A spoofed source sends one packet per tuple: it only ever
//!   takes a FLOWS_NEW slot (a plain per-CPU array store, no LRU insert; the
//!   oldest of its bucket's four goes), so the long-lived LRU table FLOWS,
//!   where established flows are, is never touched by it. A flood that
//!   sends two packets per tuple does reach FLOWS: each CPU enters at most
//!   `LbConfig::flood_rate` flows a second into it (Katran's flood mode);
//!   past that, flows are forwarded by Maglev alone, untracked, counted as
//!   CONNTRACK_FLOOD, and keep their FLOWS_NEW slot (so their backend).
//! - **Backends.** A tracked flow whose backend is down, gone or draining
//!   (for a new SYN) is chosen again (CONNTRACK_STALE, _SYN_RESCHEDULED).
//! - **UDP** flows idle longer than `LbConfig::udp_idle_s` are chosen again
//!   (CONNTRACK_EXPIRED): a draining server's UDP flows end.
//! - **Losing FLOWS_NEW** (a restart, a newer flow taking the slot) costs no
//!   flow: its next packet is chosen by the same Maglev table, and tracked.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    flow_hash,
    maps::{
        BACKEND_ACTIVE, BACKEND_DRAINING, Backend, EMBRYONIC_S, EMBRYONIC_SLOTS, EMBRYONIC_WAYS, EmbryonicFlow,
        FlowKey, FlowValue, LbConfig, PROTO_UDP, VipMeta,
    },
    reasons,
};

use crate::{
    count_conntrack, maglev_pick,
    maps::{FLOOD, FLOWS, FLOWS_NEW, backend, count_reason},
    parse::{TCP_ACK, TCP_SYN},
    trace::Observe,
    vip_hash,
};

/// What the tracked (`FlowValue`) backend is good for now.
enum Tracked {
    /// Live: keep sending the flow there. A reference, not a copy: the
    /// balancer's stack is near the verifier's 512 bytes, and the live copy
    /// of a `BackendSlot` is not written while it is live.
    Keep(&'static Backend),
    /// Draining, and this is a new connection reusing the tuple.
    Rescheduled,
    /// Down, gone, or its id given to another server.
    Stale,
}

#[inline(always)]
fn judge(t: &FlowValue, new_connection: bool) -> Tracked {
    match backend(t.backend_id).filter(|b| b.generation == t.generation) {
        Some(b) if b.state == BACKEND_ACTIVE || (b.state == BACKEND_DRAINING && !new_connection) => Tracked::Keep(b),
        Some(b) if b.state == BACKEND_DRAINING => Tracked::Rescheduled,
        _ => Tracked::Stale,
    }
}

#[inline(always)]
fn ktime() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// Whole seconds of a `ktime()` time, as `FlowValue::last_seen_s` holds them.
#[inline(always)]
fn seconds(ns: u64) -> u32 {
    (ns / 1_000_000_000) as u32
}

/// Whether this CPU may enter one more flow into FLOWS this second (`now`
/// from `ktime()`), and counts it if so.
#[inline(always)]
fn may_track(cfg: &LbConfig, now: u64) -> bool {
    if cfg.flood_rate == 0 {
        return true;
    }
    let Some(w) = FLOOD.get_ptr_mut(0) else { return true };
    // SAFETY: this CPU's own entry of a per-CPU array; XDP does not migrate
    // between CPUs, so nothing else writes it meanwhile.
    unsafe {
        if now.wrapping_sub((*w).start_ns) >= 1_000_000_000 {
            (*w).start_ns = now;
            (*w).tracked = 0;
        }
        if (*w).tracked >= cfg.flood_rate {
            return false;
        }
        (*w).tracked += 1;
    }
    true
}

/// Enters `flow` into FLOWS (unless this CPU is in flood mode: counted).
#[inline(always)]
fn track(flow: &FlowKey, value: &FlowValue, cfg: &LbConfig, now: u64) -> bool {
    if !may_track(cfg, now) {
        count_reason(reasons::CONNTRACK_FLOOD);
        return false;
    }
    if FLOWS.insert(flow, value, 0).is_err() {
        count_reason(reasons::CONNTRACK_INSERT_FAILED);
        return false;
    }
    true
}

/// Whether two flow keys are equal, compared as words.
#[inline(always)]
fn same_flow(a: &FlowKey, b: &FlowKey) -> bool {
    a.src == b.src
        && a.dst == b.dst
        && a.sport == b.sport
        && a.dport == b.dport
        && a.protocol == b.protocol
        && a.family == b.family
}

/// This CPU's slot of `flow` in FLOWS_NEW bucket `bucket`, and whether the
/// flow is there; if it is not, the slot a new flow takes: a free one, else
/// the oldest (None only if the map is smaller than this build says).
#[inline(always)]
fn embryonic_slot(flow: &FlowKey, bucket: u32, now_ns: u64) -> (Option<*mut EmbryonicFlow>, bool) {
    let mut victim: Option<*mut EmbryonicFlow> = None;
    let mut victim_age = 0u64;
    for way in 0..EMBRYONIC_WAYS {
        let Some(slot) = FLOWS_NEW.get_ptr_mut(bucket * EMBRYONIC_WAYS + way) else { continue };
        // SAFETY: this CPU's own slot of a per-CPU array (see `may_track`).
        let (key, seen_ns) = unsafe { (&(*slot).key, (*slot).seen_ns) };
        if key.family != 0 && same_flow(key, flow) {
            return (Some(slot), true);
        }
        let age = if key.family == 0 { u64::MAX } else { now_ns.wrapping_sub(seen_ns) };
        if victim.is_none() || age > victim_age {
            victim = Some(slot);
            victim_age = age;
        }
    }
    (victim, false)
}

/// The backend for `flow` of `vip` and the flow's hash; counts the table's
/// answer itself. Without `track_it` (an ICMP error about the flow) FLOWS is
/// only read and nothing is counted or entered.
#[inline(always)]
pub(crate) fn choose_backend(
    flow: &FlowKey,
    vip: &VipMeta,
    cfg: &LbConfig,
    tcp_flags: u8,
    track_it: bool,
    obs: &mut impl Observe,
) -> Result<(u32, Backend, u32), u32> {
    // A SYN never confirms a flow (a spoofer's retransmission would); a SYN
    // without ACK is a new connection, which a draining server does not get.
    let syn = tcp_flags & TCP_SYN != 0;
    let new_connection = syn && tcp_flags & TCP_ACK == 0;
    // A flow already in FLOWS whose backend no longer serves it is chosen
    // again and entered again.
    let mut known = false;
    if let Some(entry) = FLOWS.get_ptr_mut(flow) {
        // SAFETY: an LRU hash map value, valid for this program run; copied out at once.
        let t = unsafe { *entry };
        match judge(&t, new_connection) {
            Tracked::Keep(b) => {
                if !track_it {
                    return Ok((t.backend_id, *b, t.hash));
                }
                if flow.protocol != PROTO_UDP || cfg.udp_idle_s == 0 {
                    count_conntrack(reasons::CONNTRACK_HIT, obs);
                    return Ok((t.backend_id, *b, t.hash));
                }
                let now = seconds(ktime());
                if t.last_seen_s == 0 || now.wrapping_sub(t.last_seen_s) <= cfg.udp_idle_s {
                    if t.last_seen_s != now {
                        // SAFETY: as above; a 4-byte aligned store, at most once a second per flow.
                        unsafe { (*entry).last_seen_s = now };
                    }
                    count_conntrack(reasons::CONNTRACK_HIT, obs);
                    return Ok((t.backend_id, *b, t.hash));
                }
                count_conntrack(reasons::CONNTRACK_EXPIRED, obs);
            }
            _ if !track_it => {}
            Tracked::Rescheduled => count_conntrack(reasons::CONNTRACK_SYN_RESCHEDULED, obs),
            Tracked::Stale => count_conntrack(reasons::CONNTRACK_STALE, obs),
        }
        known = true;
    }
    if !track_it || known {
        let hash = vip_hash(vip, flow, cfg);
        let (id, b) = maglev_pick(vip, hash, obs)?;
        if known && track_it {
            // An established flow chosen again: its next packet is no proof
            // of anything new, so it goes back to FLOWS at once.
            let now = ktime();
            let value = FlowValue { backend_id: id, generation: b.generation, hash, last_seen_s: seconds(now) };
            track(flow, &value, cfg, now);
        }
        return Ok((id, b, hash));
    }
    // Seen once before, on this CPU?
    let bucket = flow_hash::five_tuple(&cfg.hash_seed, &flow.src, &flow.dst, flow.sport, flow.dport, flow.protocol)
        & (EMBRYONIC_SLOTS / EMBRYONIC_WAYS - 1);
    let now_ns = ktime();
    let now = seconds(now_ns);
    let (slot, found) = embryonic_slot(flow, bucket, now_ns);
    if !syn
        && found
        && let Some(slot) = slot
    {
        // SAFETY: this CPU's own slot of a per-CPU array (see `may_track`).
        let (seen, seen_ns) = unsafe { ((*slot).value, (*slot).seen_ns) };
        if now_ns.wrapping_sub(seen_ns) <= EMBRYONIC_S as u64 * 1_000_000_000
            && let Tracked::Keep(b) = judge(&seen, false)
        {
            let confirmed = FlowValue { last_seen_s: now, ..seen };
            if track(flow, &confirmed, cfg, now_ns) {
                count_conntrack(reasons::CONNTRACK_CONFIRMED, obs);
                // SAFETY: as above. The slot is free again.
                unsafe { (*slot).key.family = 0 };
            }
            // Not tracked (flood mode): the slot keeps the flow on its backend
            // until it can be, or its time is up.
            return Ok((seen.backend_id, *b, seen.hash));
        }
    }
    let hash = vip_hash(vip, flow, cfg);
    let (id, b) = maglev_pick(vip, hash, obs)?;
    count_conntrack(reasons::CONNTRACK_MISS, obs);
    if let Some(slot) = slot {
        // SAFETY: this CPU's own slot (see `may_track`).
        unsafe {
            (*slot).key = *flow;
            (*slot).value = FlowValue { backend_id: id, generation: b.generation, hash, last_seen_s: now };
            (*slot).seen_ns = now_ns;
        }
    }
    Ok((id, b, hash))
}
