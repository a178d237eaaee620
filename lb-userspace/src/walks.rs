//! Whole-map walks, off the control loop.
//!
//! Counting the flows per backend (for `status`) and collecting idle NAT
//! connections read whole tables: at 1M tracked flows a walk of one syscall
//! per entry took 20–70 s, and the event loop answered nothing meanwhile.
//! Here a walk reads thousands of entries per syscall (`BPF_MAP_LOOKUP_BATCH`,
//! which aya 0.14 does not expose), runs on a blocking thread with its own
//! handles to the maps, stops at a time budget, and comes back to the loop as
//! a message (`Walked`). One walk of each kind runs at a time.

use std::{
    collections::{HashMap, HashSet},
    os::fd::{AsFd as _, AsRawFd as _},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::{
    Pod,
    maps::{Array, HashMap as BpfHashMap, IterableMap as _, Map, MapData, MapType},
};
use lb_common::maps::{Backend, FlowKey, FlowValue, NAT_OPEN, NatFlow, NatReply, PROTO_TCP};
use tokio::sync::mpsc;

use crate::config::NatSettings;

/// Entries asked for per batch: more than any hash bucket holds (the kernel
/// answers ENOSPC when one bucket does not fit), few enough to stay small.
const BATCH: usize = 8192;

/// `BPF_MAP_LOOKUP_BATCH` and `BPF_MAP_UPDATE_BATCH` (include/uapi/linux/bpf.h).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Issues a batch command.
///
/// # Safety
///
/// `attr.keys` and `attr.values` must point to buffers of at least
/// `attr.count` entries of the map's own key and value sizes (which
/// `check_layout` makes `size_of::<K>()` and `size_of::<V>()`), and a
/// non-zero `attr.in_batch` or `attr.out_batch` to a readable or writable
/// u64 (a hash map's cursor is a u32).
unsafe fn bpf_batch(cmd: libc::c_long, attr: &mut BatchAttr) -> std::io::Result<()> {
    // SAFETY: bpf(2) reads and writes `attr` (ours, the size we pass) and touches only the buffers the caller vouches for above.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut BatchAttr, size_of::<BatchAttr>()) };
    if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// Checks that `map` is a (non-per-CPU) hash map of `K` keys and `V` values:
/// a batch command moves `count` entries of the map's own key and value
/// sizes, so buffers of `count` `K`s and `V`s must be exactly that large. A
/// per-CPU map's values are rounded up to 8 bytes and repeated per CPU, and
/// other map types keep other cursors: neither is accepted.
fn check_layout<K, V>(map: &MapData) -> Result<()> {
    let info = map.info().context("reading a map's info failed")?;
    let kind = info.map_type().context("reading a map's type failed")?;
    anyhow::ensure!(
        matches!(kind, MapType::Hash | MapType::LruHash),
        "batched access needs a hash map, not a {kind:?} map"
    );
    anyhow::ensure!(
        info.key_size() as usize == size_of::<K>() && info.value_size() as usize == size_of::<V>(),
        "the map holds {}-byte keys and {}-byte values, not {} and {}",
        info.key_size(),
        info.value_size(),
        size_of::<K>(),
        size_of::<V>()
    );
    Ok(())
}

/// Reads a hash map in batches, calling `each` on every entry, until the map
/// ends, `each` answers false or `deadline` passes. Returns whether it
/// reached the end. Fails, reading nothing, unless the map holds `K` keys and
/// `V` values.
///
/// A hash map's batches go bucket by bucket, so an entry deleted meanwhile
/// does not restart the walk (unlike `BPF_MAP_GET_NEXT_KEY`).
pub fn for_each_batched<K: Pod + Default, V: Pod + Default>(
    map: &MapData,
    deadline: Instant,
    mut each: impl FnMut(&K, &V) -> bool,
) -> Result<bool> {
    check_layout::<K, V>(map)?;
    let mut keys = vec![K::default(); BATCH];
    let mut values = vec![V::default(); BATCH];
    // The cursor: a bucket index for hash maps (a u32), room for more.
    let (mut cursor_in, mut cursor_out) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &raw mut cursor_in as u64 },
            out_batch: &raw mut cursor_out as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: check_layout made the map a non-per-CPU hash map with size_of::<K>()/size_of::<V>() keys/values, `keys`/`values` hold BATCH (= count) of them, and the cursors are u64s we own.
        let result = unsafe { bpf_batch(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let end = match result {
            Ok(()) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => return Err(e).context("BPF_MAP_LOOKUP_BATCH failed"),
        };
        for i in 0..(attr.count as usize).min(BATCH) {
            if !each(&keys[i], &values[i]) {
                return Ok(false);
            }
        }
        if end {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        first = false;
        cursor_in = cursor_out;
    }
}

/// Writes `entries` to a hash map in batches (the benchmark fills a
/// connection table with it). Returns how many were written. Fails, writing
/// nothing, unless the map holds `K` keys and `V` values.
pub fn insert_batched<K: Pod, V: Pod>(map: &MapData, entries: &[(K, V)]) -> Result<usize> {
    check_layout::<K, V>(map)?;
    let mut written = 0;
    for chunk in entries.chunks(BATCH) {
        let keys: Vec<K> = chunk.iter().map(|(k, _)| *k).collect();
        let values: Vec<V> = chunk.iter().map(|(_, v)| *v).collect();
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: check_layout made the map a non-per-CPU hash map with size_of::<K>()/size_of::<V>() keys/values, `keys`/`values` hold chunk.len() (= count) of them, and no cursor is passed.
        let result = unsafe { bpf_batch(BPF_MAP_UPDATE_BATCH, &mut attr) };
        written += attr.count as usize;
        result.context("BPF_MAP_UPDATE_BATCH failed")?;
    }
    Ok(written)
}

/// Flows per backend id, from one walk of the connection table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowCensus {
    pub by_backend: HashMap<u32, u64>,
    /// Flows counted: never more than the table's capacity.
    pub total: u64,
    /// Whether the walk reached the end within its budget (else a lower bound).
    pub complete: bool,
    pub took: Duration,
}

/// What a NAT collection did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NatSweep {
    /// Connections left after the collection.
    pub connections: u64,
    pub evicted_idle: u64,
    pub evicted_closed: u64,
    pub complete: bool,
    pub took: Duration,
}

/// A walk's result, for the event loop.
#[derive(Debug)]
pub enum Walked {
    Flows(FlowCensus),
    Nat(NatSweep),
}

/// The walks' own handles to the maps (duplicated descriptors), so a
/// blocking thread can read them while the loop owns the `Dataplane`.
pub struct WalkMaps {
    pub flows: MapData,
    /// The connection table's capacity.
    pub conntrack: u32,
    pub nat: NatMaps,
}

/// What a NAT collection reads and writes.
pub struct NatMaps {
    pub nat_flows: BpfHashMap<MapData, FlowKey, NatFlow>,
    pub nat_reverse: BpfHashMap<MapData, FlowKey, NatReply>,
    pub backends: Array<MapData, Backend>,
}

/// Another handle to the map behind `data`.
pub fn dup_map(data: &MapData) -> Result<Map> {
    let fd = data.fd().as_fd().try_clone_to_owned().context("duplicating a map descriptor failed")?;
    Ok(Map::from_map_data(MapData::from_fd(fd)?)?)
}

/// Another handle to the map behind `data`, untyped.
pub fn dup_map_data(data: &MapData) -> Result<MapData> {
    let fd = data.fd().as_fd().try_clone_to_owned().context("duplicating a map descriptor failed")?;
    Ok(MapData::from_fd(fd)?)
}

/// Counts the flows per backend, at most `capacity` of them.
pub fn census_flows(flows: &MapData, capacity: u32, budget: Duration) -> Result<FlowCensus> {
    let started = Instant::now();
    let mut census = FlowCensus::default();
    let complete = for_each_batched::<FlowKey, FlowValue>(flows, started + budget, |_, v| {
        // One more than the table holds: stop, the count is a lower bound.
        // A full table read to its end is complete.
        if census.total >= u64::from(capacity) {
            return false;
        }
        *census.by_backend.entry(v.backend_id).or_default() += 1;
        census.total += 1;
        true
    })?;
    census.complete = complete;
    census.took = started.elapsed();
    Ok(census)
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime(2) writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What a NAT collection does with one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Keep,
    EvictIdle,
    EvictClosed,
}

/// A connection's reply entry: from `replies` (a read of the reply table,
/// `complete` if it reached the end), or, when a partial read did not reach
/// it, from `lookup` (one lookup in the map). Without it a server that talks
/// on a connection whose client is silent would look idle.
fn reply_of(
    replies: &HashMap<FlowKey, NatReply>,
    complete: bool,
    reply_key: &FlowKey,
    lookup: impl FnOnce(&FlowKey) -> Option<NatReply>,
) -> Option<NatReply> {
    match replies.get(reply_key) {
        Some(r) => Some(*r),
        None if !complete => lookup(reply_key),
        None => None,
    }
}

/// Whether a connection stays, judged by the later of its two directions'
/// last packets and by either direction having closed.
fn verdict(now: u64, protocol: u8, flow: &NatFlow, reply: Option<&NatReply>, nat: &NatSettings) -> Verdict {
    let last = flow.last_seen_ns.max(reply.map_or(0, |r| r.last_seen_ns));
    let closed = flow.state != NAT_OPEN || reply.is_some_and(|r| r.state != NAT_OPEN);
    let timeout = if closed {
        nat.closed_timeout
    } else if protocol == PROTO_TCP {
        nat.tcp_timeout
    } else {
        nat.udp_timeout
    };
    if now.saturating_sub(last) <= timeout.as_nanos() as u64 {
        Verdict::Keep
    } else if closed {
        Verdict::EvictClosed
    } else {
        Verdict::EvictIdle
    }
}

/// Forgets NAT connections that closed (FIN/RST) or went idle, both
/// directions' entries; also reply entries left behind by a re-steered flow.
pub fn sweep_nat(maps: &mut NatMaps, nat: &NatSettings, budget: Duration) -> Result<NatSweep> {
    let started = Instant::now();
    let deadline = started + budget;
    let now = monotonic_ns();
    let mut replies = HashMap::new();
    let replies_complete = for_each_batched::<FlowKey, NatReply>(maps.nat_reverse.map(), deadline, |k, r| {
        replies.insert(*k, *r);
        true
    })?;
    let mut flows = Vec::new();
    let flows_complete = for_each_batched::<FlowKey, NatFlow>(maps.nat_flows.map(), deadline, |k, f| {
        flows.push((*k, *f));
        true
    })?;
    let mut sweep = NatSweep { complete: replies_complete && flows_complete, ..NatSweep::default() };
    let mut live_replies = HashSet::new();
    let mut backends: HashMap<u32, Option<Backend>> = HashMap::new();
    for (key, flow) in flows {
        let b = *backends.entry(flow.backend_id).or_insert_with(|| maps.backends.get(&flow.backend_id, 0).ok());
        let Some(b) = b else { continue };
        if b.generation != flow.generation {
            // Its backend slot went to another server: the connection is dead.
            let _ = maps.nat_flows.remove(&key);
            sweep.evicted_idle += 1;
            continue;
        }
        let reply_key = FlowKey {
            src: b.addr,
            dst: key.src,
            sport: if b.port != 0 { b.port } else { key.dport },
            dport: key.sport,
            protocol: key.protocol,
            family: key.family,
            _pad: [0; 2],
        };
        let reply = reply_of(&replies, replies_complete, &reply_key, |k| maps.nat_reverse.get(k, 0).ok());
        let verdict = verdict(now, key.protocol, &flow, reply.as_ref(), nat);
        if verdict == Verdict::Keep {
            sweep.connections += 1;
            live_replies.insert(reply_key);
            continue;
        }
        let _ = maps.nat_flows.remove(&key);
        let _ = maps.nat_reverse.remove(&reply_key);
        if verdict == Verdict::EvictClosed {
            sweep.evicted_closed += 1;
        } else {
            sweep.evicted_idle += 1;
        }
    }
    // A partial walk has not seen every connection: its replies are not orphans.
    if sweep.complete {
        let longest = nat.tcp_timeout.max(nat.udp_timeout).as_nanos() as u64;
        for (key, r) in replies {
            if !live_replies.contains(&key)
                && now.saturating_sub(r.last_seen_ns) > longest.min(nat.closed_timeout.as_nanos() as u64 * 6)
            {
                let _ = maps.nat_reverse.remove(&key);
            }
        }
    }
    sweep.took = started.elapsed();
    Ok(sweep)
}

/// Starts walks on blocking threads, one of each kind at a time; their
/// results arrive on the receiver `new` returns.
pub struct Walker {
    flows: Arc<MapData>,
    conntrack: u32,
    nat: Arc<std::sync::Mutex<NatMaps>>,
    flows_busy: Arc<AtomicBool>,
    nat_busy: Arc<AtomicBool>,
    tx: mpsc::UnboundedSender<Walked>,
}

/// Clears a busy flag when the walk ends, however it ends.
struct Busy(Arc<AtomicBool>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Walker {
    pub fn new(maps: WalkMaps) -> (Self, mpsc::UnboundedReceiver<Walked>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let walker = Self {
            flows: Arc::new(maps.flows),
            conntrack: maps.conntrack,
            nat: Arc::new(std::sync::Mutex::new(maps.nat)),
            flows_busy: Arc::default(),
            nat_busy: Arc::default(),
            tx,
        };
        (walker, rx)
    }

    fn claim(flag: &Arc<AtomicBool>) -> Option<Busy> {
        (!flag.swap(true, Ordering::AcqRel)).then(|| Busy(flag.clone()))
    }

    /// Counts flows per backend, unless a count is already running.
    /// Returns whether one was started.
    pub fn census(&self, budget: Duration) -> bool {
        let Some(busy) = Self::claim(&self.flows_busy) else { return false };
        let (flows, capacity, tx) = (self.flows.clone(), self.conntrack, self.tx.clone());
        tokio::task::spawn_blocking(move || {
            let _busy = busy;
            match census_flows(&flows, capacity, budget) {
                Ok(c) => {
                    let _ = tx.send(Walked::Flows(c));
                }
                Err(e) => tracing::warn!("counting the tracked flows failed: {e:#}"),
            }
        });
        true
    }

    /// Collects idle and closed NAT connections, unless a collection is
    /// already running. Returns whether one was started.
    pub fn sweep_nat(&self, nat: NatSettings, budget: Duration) -> bool {
        let Some(busy) = Self::claim(&self.nat_busy) else { return false };
        let (maps, tx) = (self.nat.clone(), self.tx.clone());
        tokio::task::spawn_blocking(move || {
            let _busy = busy;
            let result = sweep_nat(&mut maps.lock().unwrap(), &nat, budget);
            match result {
                Ok(s) => {
                    let _ = tx.send(Walked::Nat(s));
                }
                Err(e) => tracing::warn!("collecting NAT connections failed: {e:#}"),
            }
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn key(i: u32) -> FlowKey {
        FlowKey {
            src: [i, 0, 0, 0],
            dst: [1, 0, 0, 0],
            sport: 1000,
            dport: 80,
            protocol: PROTO_TCP,
            family: 4,
            _pad: [0; 2],
        }
    }

    /// The client went quiet long ago; the server talked a second ago.
    fn quiet_client(now: u64) -> (NatFlow, NatReply) {
        let flow = NatFlow { last_seen_ns: 1, state: NAT_OPEN, ..NatFlow::default() };
        let reply = NatReply { last_seen_ns: now - SECOND, state: NAT_OPEN, ..NatReply::default() };
        (flow, reply)
    }

    #[test]
    fn a_reply_a_partial_read_missed_is_looked_up_and_keeps_its_connection() {
        let nat = NatSettings::default();
        let now = 10_000 * SECOND;
        let (flow, reply) = quiet_client(now);
        // The reply table's read stopped before this connection's entry.
        let replies = HashMap::from([(key(2), reply)]);
        let mut looked_up = Vec::new();
        let found = reply_of(&replies, false, &key(1), |k| {
            looked_up.push(*k);
            Some(reply)
        });
        assert_eq!(looked_up, [key(1)], "one lookup of the missing reply");
        assert_eq!(verdict(now, PROTO_TCP, &flow, found.as_ref(), &nat), Verdict::Keep);
        // Without the lookup the connection looked idle: the bug.
        assert_eq!(verdict(now, PROTO_TCP, &flow, None, &nat), Verdict::EvictIdle);
    }

    #[test]
    fn a_complete_read_is_trusted_without_lookups() {
        let now = 10_000 * SECOND;
        let (_, reply) = quiet_client(now);
        let replies = HashMap::from([(key(1), reply)]);
        let no_lookup = |_: &FlowKey| -> Option<NatReply> { panic!("looked up a reply the read had") };
        assert_eq!(reply_of(&replies, false, &key(1), no_lookup), Some(reply));
        assert_eq!(reply_of(&replies, true, &key(1), no_lookup), Some(reply));
        let no_lookup = |_: &FlowKey| -> Option<NatReply> { panic!("looked up a reply a complete read lacks") };
        assert_eq!(reply_of(&replies, true, &key(2), no_lookup), None);
    }

    #[test]
    fn either_direction_closing_or_both_going_quiet_evicts() {
        let nat = NatSettings::default();
        let now = 10_000 * SECOND;
        let (flow, reply) = quiet_client(now);
        let closed = NatReply { state: lb_common::maps::NAT_CLOSED, last_seen_ns: now - 11 * SECOND, ..reply };
        assert_eq!(verdict(now, PROTO_TCP, &flow, Some(&closed), &nat), Verdict::EvictClosed);
        let stale = NatReply { last_seen_ns: now - 901 * SECOND, ..reply };
        assert_eq!(verdict(now, PROTO_TCP, &flow, Some(&stale), &nat), Verdict::EvictIdle);
        let fresh = NatFlow { last_seen_ns: now - SECOND, ..flow };
        assert_eq!(verdict(now, PROTO_TCP, &fresh, Some(&stale), &nat), Verdict::Keep);
    }
}
