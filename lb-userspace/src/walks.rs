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
use lb_common::maps::{
    Backend, BackendSlot, FlowKey, FlowValue, NAT_CLOSED, NAT_CLOSING, NatFlow, NatReply, PROTO_TCP, nat_unconfirmed,
};
use tokio::sync::mpsc;

use crate::config::NatSettings;

/// Above this share of the NAT table (the fuller of its two maps, in
/// tenths), a collection reclaims embryonic connections, oldest first, down
/// to `NAT_LOW_WATER`; and the next collection follows `NAT_PRESSURE_PERIOD`
/// later instead of at the next second tick. The dataplane cannot scan for
/// an entry to give up, so this headroom is what lets a new connection in
/// while spoofed SYNs or datagrams fill the table.
pub const NAT_HIGH_WATER: u64 = 9;
pub const NAT_LOW_WATER: u64 = 8;
pub const NAT_PRESSURE_PERIOD: Duration = Duration::from_millis(250);

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
    /// Unconfirmed connections (embryonic or answered: the client never
    /// acknowledged the backend) past `embryonic_timeout` since their creation.
    pub evicted_embryonic: u64,
    /// Unconfirmed connections reclaimed, oldest first, because the table was
    /// above its high-water mark.
    pub reclaimed: u64,
    /// Entries in the fuller of the two maps, as read and as left.
    pub occupancy_before: u64,
    pub occupancy_after: u64,
    /// The maps' capacity (each).
    pub capacity: u64,
    /// The table was above its high-water mark: the next collection comes sooner.
    pub pressure: bool,
    /// Started by the previous collection's pressure, not by the tick.
    pub follow_up: bool,
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
    pub backends: Array<MapData, BackendSlot>,
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
    EvictEmbryonic,
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

/// Whether the connection was never confirmed: both entries embryonic or
/// answered (the dataplane opens both on the client's confirmation; one
/// open is enough to count as confirmed, should a race leave them apart).
/// The dataplane does not refresh an unconfirmed entry's `last_seen_ns`:
/// it is the connection's creation time.
fn embryonic(flow: &NatFlow, reply: Option<&NatReply>) -> bool {
    nat_unconfirmed(flow.state) && reply.is_none_or(|r| nat_unconfirmed(r.state))
}

/// Whether the connection read as `seen` is still there, unconfirmed and not
/// restarted since (a restart writes a new `last_seen_ns`): one lookup just
/// before it is removed, as the dataplane may have confirmed it meanwhile.
fn still_unconfirmed(now: Option<NatFlow>, seen: &NatFlow) -> bool {
    now.is_some_and(|f| nat_unconfirmed(f.state) && f.last_seen_ns == seen.last_seen_ns)
}

fn closed_state(state: u8) -> bool {
    state == NAT_CLOSING || state == NAT_CLOSED
}

/// Whether a connection stays, judged by the later of its two directions'
/// last packets, by whether the backend ever answered, and by either
/// direction having closed.
fn verdict(now: u64, protocol: u8, flow: &NatFlow, reply: Option<&NatReply>, nat: &NatSettings) -> Verdict {
    let last = flow.last_seen_ns.max(reply.map_or(0, |r| r.last_seen_ns));
    let embryonic = embryonic(flow, reply);
    let closed = !embryonic && (closed_state(flow.state) || reply.is_some_and(|r| closed_state(r.state)));
    let (timeout, evict) = if embryonic {
        (nat.embryonic_timeout, Verdict::EvictEmbryonic)
    } else if closed {
        (nat.closed_timeout, Verdict::EvictClosed)
    } else if protocol == PROTO_TCP {
        (nat.tcp_timeout, Verdict::EvictIdle)
    } else {
        (nat.udp_timeout, Verdict::EvictIdle)
    };
    if now.saturating_sub(last) <= timeout.as_nanos() as u64 { Verdict::Keep } else { evict }
}

/// Forgets NAT connections that closed (FIN/RST), went idle, or were never
/// confirmed by their client (embryonic or answered), both directions'
/// entries; also reply entries left behind by a re-steered flow. Above the
/// high-water mark (`NAT_HIGH_WATER`) it then reclaims unconfirmed
/// connections, oldest first, until the fuller map is down to the low-water
/// mark or none is left. An unconfirmed connection is read again just before
/// it goes, and stays if the dataplane confirmed or restarted it meanwhile.
pub fn sweep_nat(maps: &mut NatMaps, nat: &NatSettings, budget: Duration) -> Result<NatSweep> {
    sweep_nat_with(maps, nat, budget, || {})
}

/// `sweep_nat`, calling `after_read` between reading the tables and acting
/// on what it read: the tests' way into that window, where the dataplane
/// keeps running.
pub fn sweep_nat_with(
    maps: &mut NatMaps,
    nat: &NatSettings,
    budget: Duration,
    after_read: impl FnOnce(),
) -> Result<NatSweep> {
    let started = Instant::now();
    let deadline = started + budget;
    let now = monotonic_ns();
    let info = maps.nat_flows.map().info().context("reading the NAT_FLOWS map's info failed")?;
    let capacity = u64::from(info.max_entries());
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
    after_read();
    // Entries left in each map: what the reads found, less what is removed.
    let (mut flows_left, mut replies_left) = (flows.len() as u64, replies.len() as u64);
    let occupancy_before = flows_left.max(replies_left);
    let pressure = occupancy_before * 10 > capacity * NAT_HIGH_WATER;
    let mut sweep = NatSweep {
        complete: replies_complete && flows_complete,
        capacity,
        occupancy_before,
        pressure,
        ..NatSweep::default()
    };
    let mut live_replies = HashSet::new();
    // Unconfirmed connections kept: (creation, key, entry as read, reply key), reclaimable under pressure.
    let mut unanswered = Vec::new();
    let mut backends: HashMap<u32, Option<Backend>> = HashMap::new();
    for (key, flow) in flows {
        let b = *backends
            .entry(flow.backend_id)
            .or_insert_with(|| maps.backends.get(&flow.backend_id, 0).ok().map(|s| *s.current()));
        let Some(b) = b else { continue };
        if b.generation != flow.generation {
            // Its backend slot went to another server: the connection is dead.
            if maps.nat_flows.remove(&key).is_ok() {
                flows_left -= 1;
            }
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
            if pressure && embryonic(&flow, reply.as_ref()) {
                let last = flow.last_seen_ns.max(reply.map_or(0, |r| r.last_seen_ns));
                unanswered.push((last, key, flow, reply_key));
            }
            continue;
        }
        if verdict == Verdict::EvictEmbryonic && !still_unconfirmed(maps.nat_flows.get(&key, 0).ok(), &flow) {
            // Confirmed or restarted since the read: it stays.
            sweep.connections += 1;
            live_replies.insert(reply_key);
            continue;
        }
        if maps.nat_flows.remove(&key).is_ok() {
            flows_left -= 1;
        }
        if maps.nat_reverse.remove(&reply_key).is_ok() {
            replies_left = replies_left.saturating_sub(1);
        }
        match verdict {
            Verdict::EvictClosed => sweep.evicted_closed += 1,
            Verdict::EvictEmbryonic => sweep.evicted_embryonic += 1,
            _ => sweep.evicted_idle += 1,
        }
    }
    // A partial walk has not seen every connection: its replies are not
    // orphans. Under pressure an orphan goes whatever its age.
    if sweep.complete {
        let longest = nat.tcp_timeout.max(nat.udp_timeout).as_nanos() as u64;
        let linger = longest.min(nat.closed_timeout.as_nanos() as u64 * 6);
        for (key, r) in replies {
            if !live_replies.contains(&key)
                && (pressure || now.saturating_sub(r.last_seen_ns) > linger)
                && maps.nat_reverse.remove(&key).is_ok()
            {
                replies_left = replies_left.saturating_sub(1);
            }
        }
    }
    if pressure {
        let target = capacity * NAT_LOW_WATER / 10;
        unanswered.sort_unstable_by_key(|(last, ..)| *last);
        for (_, key, flow, reply_key) in unanswered {
            if flows_left.max(replies_left) <= target {
                break;
            }
            // Confirmed or restarted since the read: it stays.
            if !still_unconfirmed(maps.nat_flows.get(&key, 0).ok(), &flow) {
                continue;
            }
            if maps.nat_flows.remove(&key).is_ok() {
                flows_left -= 1;
            }
            if maps.nat_reverse.remove(&reply_key).is_ok() {
                replies_left = replies_left.saturating_sub(1);
            }
            sweep.reclaimed += 1;
            sweep.connections -= 1;
        }
    }
    sweep.occupancy_after = flows_left.max(replies_left);
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

    /// Collects idle, closed and unanswered NAT connections, unless a
    /// collection is already running. Returns whether one was started.
    pub fn sweep_nat(&self, nat: NatSettings, budget: Duration) -> bool {
        self.spawn_nat_sweep(nat, budget, None)
    }

    /// The same, `after` from now: the follow-up of a collection that found
    /// the table above its high-water mark. Holds the one-at-a-time claim
    /// while it waits, so the tick does not start another meanwhile.
    pub fn sweep_nat_after(&self, nat: NatSettings, budget: Duration, after: Duration) -> bool {
        self.spawn_nat_sweep(nat, budget, Some(after))
    }

    fn spawn_nat_sweep(&self, nat: NatSettings, budget: Duration, after: Option<Duration>) -> bool {
        let Some(busy) = Self::claim(&self.nat_busy) else { return false };
        let (maps, tx) = (self.nat.clone(), self.tx.clone());
        tokio::task::spawn_blocking(move || {
            if let Some(after) = after {
                std::thread::sleep(after);
            }
            let result = sweep_nat(&mut maps.lock().unwrap(), &nat, budget);
            // Released before the result is sent: its receiver may start the follow-up.
            drop(busy);
            match result {
                Ok(s) => {
                    let _ = tx.send(Walked::Nat(NatSweep { follow_up: after.is_some(), ..s }));
                }
                Err(e) => tracing::warn!("collecting NAT connections failed: {e:#}"),
            }
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use lb_common::maps::{NAT_ANSWERED, NAT_EMBRYONIC, NAT_OPEN, PROTO_UDP};

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

    #[test]
    fn an_unanswered_connection_goes_after_the_embryonic_timeout_and_an_answer_keeps_it() {
        let nat = NatSettings::default();
        let now = 10_000 * SECOND;
        let flow = NatFlow { last_seen_ns: now - 6 * SECOND, state: NAT_EMBRYONIC, ..NatFlow::default() };
        let reply = NatReply { last_seen_ns: now - 6 * SECOND, state: NAT_EMBRYONIC, ..NatReply::default() };
        for protocol in [PROTO_TCP, PROTO_UDP] {
            assert_eq!(verdict(now, protocol, &flow, Some(&reply), &nat), Verdict::EvictEmbryonic);
            assert_eq!(verdict(now, protocol, &flow, None, &nat), Verdict::EvictEmbryonic);
            // A client retransmitting its SYN keeps it a while, no longer than the timeout.
            let retried = NatFlow { last_seen_ns: now - SECOND, ..flow };
            assert_eq!(verdict(now, protocol, &retried, Some(&reply), &nat), Verdict::Keep);
        }
        // Answered (the dataplane opened both entries): the protocol's timeout.
        let open = NatFlow { state: NAT_OPEN, ..flow };
        let answered = NatReply { state: NAT_OPEN, ..reply };
        assert_eq!(verdict(now, PROTO_TCP, &open, Some(&answered), &nat), Verdict::Keep);
        assert_eq!(verdict(now, PROTO_UDP, &open, Some(&answered), &nat), Verdict::Keep);
        // One direction open is an answer, should a race leave them apart.
        assert_eq!(verdict(now, PROTO_TCP, &flow, Some(&answered), &nat), Verdict::Keep);
        // The backend answered, the client never confirmed: as embryonic.
        let syn_recv = NatFlow { state: NAT_ANSWERED, ..flow };
        let syn_ack = NatReply { state: NAT_ANSWERED, ..reply };
        for protocol in [PROTO_TCP, PROTO_UDP] {
            assert_eq!(verdict(now, protocol, &syn_recv, Some(&syn_ack), &nat), Verdict::EvictEmbryonic);
            assert_eq!(verdict(now, protocol, &flow, Some(&syn_ack), &nat), Verdict::EvictEmbryonic);
        }
        // A backend that answered with RST: closed, not embryonic.
        let reset = NatReply { state: NAT_CLOSED, last_seen_ns: now - 11 * SECOND, ..reply };
        let old = NatFlow { last_seen_ns: now - 11 * SECOND, ..open };
        assert_eq!(verdict(now, PROTO_TCP, &old, Some(&reset), &nat), Verdict::EvictClosed);
    }

    #[test]
    fn an_unconfirmed_connection_is_removed_only_as_it_was_read() {
        let seen = NatFlow { last_seen_ns: 5, state: NAT_EMBRYONIC, ..NatFlow::default() };
        assert!(still_unconfirmed(Some(seen), &seen));
        assert!(still_unconfirmed(Some(NatFlow { state: NAT_ANSWERED, ..seen }), &seen));
        assert!(!still_unconfirmed(Some(NatFlow { state: NAT_OPEN, ..seen }), &seen), "confirmed since");
        assert!(!still_unconfirmed(Some(NatFlow { last_seen_ns: 9, ..seen }), &seen), "restarted since");
        assert!(!still_unconfirmed(None, &seen), "gone already");
    }
}
