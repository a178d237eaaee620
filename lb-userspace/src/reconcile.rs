//! Declarative reconciliation: the desired VIPs (from the configuration,
//! health checks and neighbour resolution) in, the smallest set of map
//! writes that takes the dataplane there out.
//!
//! Ordering is what keeps every packet safe while maps change:
//! 1. backends that will be *in* a table are written before the table;
//! 2. a changed table is written to a fresh region of the Maglev pool and
//!    published by replacing the VIP's `VipMeta` (one atomic hash-map
//!    update), so no packet ever sees a half-written table;
//! 3. only then do backends that left the table change state (draining,
//!    down, unused);
//! 4. freed pool regions and backend ids rest for a grace period before
//!    reuse, longer than any XDP program run that may still hold them.

use std::{
    collections::{BTreeMap, VecDeque},
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_common::{
    maglev::{self, MaglevBackend},
    maps::{
        BACKEND_ACTIVE, BACKEND_DOWN, BACKEND_DRAINING, BACKEND_UNUSED, Backend, FWD_DSR, FWD_IPIP, FWD_NAT,
        NO_BACKEND, VIP_ADDR_F_ICMP_ECHO, VIP_F_HASH_SOURCE_IP, VIP_F_ICMP_ECHO, VIP_F_PASS_WHEN_EMPTY, VipKey,
        VipMeta,
    },
};

use crate::{
    addr,
    dataplane::Dataplane,
    flowsync::view::{BackendView, SyncView, VipView},
};

/// How long a freed pool region or backend id rests before reuse.
const GRACE: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forwarding {
    Dsr,
    Ipip,
    Nat,
}

impl Forwarding {
    pub fn name(self) -> &'static str {
        match self {
            Forwarding::Dsr => "dsr",
            Forwarding::Ipip => "ipip",
            Forwarding::Nat => "nat",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashMode {
    FiveTuple,
    SourceIp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub addr: IpAddr,
    /// 0: the VIP's port.
    pub port: u16,
    /// 0 drains: no new flows, established ones continue.
    pub weight: u32,
    /// MAC of the backend or of its next hop.
    pub mac: [u8; 6],
    /// From the health checker; a down backend gets no flows at all.
    pub healthy: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipSpec {
    pub name: String,
    pub addr: IpAddr,
    pub port: u16,
    /// IANA protocol number (lb_common::maps::PROTO_TCP / PROTO_UDP).
    pub protocol: u8,
    pub forwarding: Forwarding,
    pub hash: HashMode,
    /// Maglev table size, a prime.
    pub table_size: u32,
    pub backends: Vec<BackendSpec>,
    /// With no backend up, pass new flows to the local stack instead of dropping them.
    pub pass_when_empty: bool,
    /// Answer ICMP echo requests to the VIP's address (if any VIP on it says so).
    pub icmp_echo: bool,
}

impl VipSpec {
    pub fn key(&self) -> VipKey {
        VipKey {
            addr: addr::words(self.addr),
            port: self.port.to_be(),
            protocol: self.protocol,
            family: addr::family(self.addr),
        }
    }
}

type BackendIdentity = (IpAddr, u16);

struct AppliedBackend {
    id: u32,
    value: Backend,
}

struct AppliedVip {
    meta: VipMeta,
    addr: IpAddr,
    backends: BTreeMap<BackendIdentity, AppliedBackend>,
    /// (id, maglev key, weight) of the backends in the table, sorted by id.
    table_members: Vec<(u32, u64, u32)>,
    /// The spec last applied in full: an equal one changes nothing, and is
    /// skipped without a look at its backends (a reload that edits one VIP
    /// of thousands costs that VIP). None after a failed or partial apply,
    /// and for an adopted VIP, so that the next apply looks at everything.
    spec: Option<VipSpec>,
}

/// Free-list allocator of Maglev pool regions, first fit, coalescing.
struct Regions {
    free: Vec<(u32, u32)>,
    resting: VecDeque<(u32, u32, Instant)>,
}

impl Regions {
    fn new(slots: u32) -> Self {
        Self { free: vec![(0, slots)], resting: VecDeque::new() }
    }

    fn wake(&mut self, now: Instant) {
        while let Some(&(start, len, since)) = self.resting.front() {
            if now.duration_since(since) < GRACE {
                break;
            }
            self.resting.pop_front();
            self.release(start, len);
        }
    }

    fn release(&mut self, start: u32, len: u32) {
        let at = self.free.partition_point(|&(s, _)| s < start);
        self.free.insert(at, (start, len));
        // Coalesce with the neighbours.
        if at + 1 < self.free.len() && self.free[at].0 + self.free[at].1 == self.free[at + 1].0 {
            self.free[at].1 += self.free[at + 1].1;
            self.free.remove(at + 1);
        }
        if at > 0 && self.free[at - 1].0 + self.free[at - 1].1 == self.free[at].0 {
            self.free[at - 1].1 += self.free[at].1;
            self.free.remove(at);
        }
    }

    fn alloc(&mut self, len: u32) -> Option<u32> {
        loop {
            self.wake(Instant::now());
            if let Some(i) = self.free.iter().position(|&(_, l)| l >= len) {
                let (start, l) = self.free[i];
                if l == len {
                    self.free.remove(i);
                } else {
                    self.free[i] = (start + len, l - len);
                }
                return Some(start);
            }
            // Wait for the oldest resting region, if there is one.
            let &(_, _, since) = self.resting.front()?;
            std::thread::sleep(GRACE.saturating_sub(since.elapsed()));
        }
    }

    /// Marks a region as in use (when adopting a running dataplane).
    fn reserve(&mut self, start: u32, len: u32) -> bool {
        let Some(i) = self.free.iter().position(|&(s, l)| s <= start && start + len <= s + l) else {
            return false;
        };
        let (s, l) = self.free.remove(i);
        if start > s {
            self.free.insert(i, (s, start - s));
        }
        if start + len < s + l {
            let at = self.free.partition_point(|&(fs, _)| fs < start + len);
            self.free.insert(at, (start + len, s + l - start - len));
        }
        true
    }

    fn retire(&mut self, start: u32, len: u32) {
        self.resting.push_back((start, len, Instant::now()));
    }
}

/// What the dataplane holds, as far as this controller wrote it.
pub struct Reconciler {
    vips: BTreeMap<VipKey, AppliedVip>,
    free_vip_ids: Vec<u32>,
    next_vip_id: u32,
    max_vips: u32,
    resting_backend_ids: VecDeque<(u32, Instant)>,
    free_backend_ids: Vec<u32>,
    next_backend_id: u32,
    max_backends: u32,
    next_generation: u32,
    regions: Regions,
}

/// What one VIP's apply allocated, to give back if it fails.
#[derive(Default)]
struct Taken {
    backend_ids: Vec<u32>,
    region: Option<(u32, u32)>,
}

/// A backend found in a pinned dataplane.
#[derive(Debug, Clone)]
pub struct AdoptedBackend {
    pub vip: VipKey,
    pub addr: IpAddr,
    pub port: u16,
    pub value: Backend,
}

/// What one `apply` changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    pub vips_added: usize,
    pub vips_removed: usize,
    pub tables_swapped: usize,
    pub backends_written: usize,
}

impl Reconciler {
    pub fn new(dp: &Dataplane) -> Self {
        let sizes = dp.sizes();
        Self {
            vips: BTreeMap::new(),
            free_vip_ids: Vec::new(),
            next_vip_id: 0,
            max_vips: sizes.max_vips,
            resting_backend_ids: VecDeque::new(),
            free_backend_ids: Vec::new(),
            next_backend_id: 0,
            max_backends: sizes.max_backends,
            next_generation: 1,
            regions: Regions::new(sizes.maglev_pool),
        }
    }

    /// Rebuilds what a previous controller wrote from the maps themselves,
    /// so that the next `apply` changes only what differs. Tables are
    /// rebuilt on that first apply (weights are not in the maps); Maglev is
    /// deterministic, so an unchanged configuration rebuilds the same table.
    pub fn adopt(dp: &Dataplane) -> Result<(Self, Vec<AdoptedBackend>)> {
        let mut r = Self::new(dp);
        let mut vip_ids = Vec::new();
        let mut by_id: BTreeMap<u32, VipKey> = BTreeMap::new();
        for (key, meta) in dp.vips() {
            if !r.regions.reserve(meta.ring_offset, meta.ring_size) {
                bail!(
                    "the pinned VIP {key:?} has a Maglev region that overlaps another; run `xdplb detach` and start again"
                );
            }
            vip_ids.push(meta.vip_id);
            by_id.insert(meta.vip_id, key);
            let addr = addr::from_words(&key.addr, key.family);
            r.vips.insert(
                key,
                AppliedVip { meta, addr, backends: BTreeMap::new(), table_members: Vec::new(), spec: None },
            );
        }
        r.next_vip_id = vip_ids.iter().max().map_or(0, |m| m + 1);
        r.free_vip_ids = (0..r.next_vip_id).filter(|i| !vip_ids.contains(i)).collect();

        let mut adopted = Vec::new();
        let mut used_ids = Vec::new();
        for id in 0..r.max_backends {
            let b = dp.backend(id)?;
            if b.generation == 0 {
                continue;
            }
            r.next_generation = r.next_generation.max(b.generation);
            let Some(key) = by_id.get(&b.vip_id).filter(|_| b.state != BACKEND_UNUSED) else {
                continue;
            };
            used_ids.push(id);
            let ident = (addr::from_words(&b.addr, b.family), u16::from_be(b.port));
            adopted.push(AdoptedBackend { vip: *key, addr: ident.0, port: ident.1, value: b });
            r.vips.get_mut(key).expect("indexed above").backends.insert(ident, AppliedBackend { id, value: b });
        }
        r.next_backend_id = used_ids.iter().max().map_or(0, |m| m + 1);
        r.free_backend_ids = (0..r.next_backend_id).filter(|i| !used_ids.contains(i)).rev().collect();
        Ok((r, adopted))
    }

    /// Number of VIPs applied.
    pub fn vip_count(&self) -> usize {
        self.vips.len()
    }

    /// The VIP id (index of its counters) of an applied VIP.
    pub fn vip_meta(&self, key: &VipKey) -> Option<VipMeta> {
        self.vips.get(key).map(|v| v.meta)
    }

    /// Whether the dataplane serves the VIP: it is applied and its Maglev
    /// table has a member. One whose apply failed (no room) is not, nor one
    /// whose every backend is down or drained.
    pub fn serving(&self, key: &VipKey) -> bool {
        self.vips.get(key).is_some_and(|v| !v.table_members.is_empty())
    }

    /// The backend id of an applied backend.
    pub fn backend_id(&self, vip: &VipKey, addr: IpAddr, port: u16) -> Option<u32> {
        self.vips.get(vip)?.backends.get(&(addr, port)).map(|b| b.id)
    }

    fn alloc_vip_id(&mut self, name: &str) -> Result<u32> {
        if let Some(id) = self.free_vip_ids.pop() {
            return Ok(id);
        }
        if self.next_vip_id >= self.max_vips {
            bail!("VIP {name}: no room for more than {} VIPs (raise max_vips)", self.max_vips);
        }
        self.next_vip_id += 1;
        Ok(self.next_vip_id - 1)
    }

    fn alloc_backend_id(&mut self, vip: &str, addr: IpAddr) -> Result<u32> {
        let now = Instant::now();
        while let Some(&(id, since)) = self.resting_backend_ids.front() {
            if now.duration_since(since) < GRACE {
                break;
            }
            self.resting_backend_ids.pop_front();
            self.free_backend_ids.push(id);
        }
        if let Some(id) = self.free_backend_ids.pop() {
            return Ok(id);
        }
        if self.next_backend_id >= self.max_backends {
            if let Some(&(_, since)) = self.resting_backend_ids.front() {
                std::thread::sleep(GRACE.saturating_sub(since.elapsed()));
                return self.alloc_backend_id(vip, addr);
            }
            bail!(
                "VIP {vip}: no room for backend {addr}: all {} backend slots are used (raise max_backends)",
                self.max_backends
            );
        }
        self.next_backend_id += 1;
        Ok(self.next_backend_id - 1)
    }

    /// Takes the dataplane to `specs`, writing only what differs.
    pub fn apply(&mut self, dp: &mut Dataplane, specs: &[VipSpec]) -> Result<ApplyReport> {
        let mut report = ApplyReport::default();
        let mut wanted = BTreeMap::new();
        for spec in specs {
            if wanted.insert(spec.key(), spec).is_some() {
                bail!("VIP {}: {}:{} is declared twice", spec.name, spec.addr, spec.port);
            }
        }
        // One VIP that cannot be applied does not stop the others: each is
        // applied (or removed) on its own, and the errors come back together.
        let mut failed = Vec::new();
        for (key, spec) in &wanted {
            if self.vips.get(key).is_some_and(|v| v.spec.as_ref() == Some(*spec)) {
                continue;
            }
            if let Err(e) = self.apply_vip(dp, key, spec, &mut report) {
                failed.push(format!("{e:#}"));
            }
        }
        let gone: Vec<VipKey> = self.vips.keys().filter(|k| !wanted.contains_key(k)).copied().collect();
        for key in gone {
            match self.remove_vip(dp, &key) {
                Ok(()) => report.vips_removed += 1,
                Err(e) => failed.push(format!("removing VIP {key:?}: {e:#}")),
            }
        }
        if !failed.is_empty() {
            bail!("{} of {} VIPs not applied: {}", failed.len(), wanted.len(), failed.join("; "));
        }
        Ok(report)
    }

    /// Compares the VIP and backend maps with what this reconciler wrote
    /// and rewrites what differs (an entry changed or removed behind its
    /// back, a VIP it does not know); a line per repair. The Maglev pool is
    /// not read back (megabytes per VIP): its region is checked by the VIP
    /// entry that points to it.
    pub fn repair_drift(&mut self, dp: &mut Dataplane) -> Vec<String> {
        let mut repaired = Vec::new();
        for (key, vip) in &self.vips {
            let name = format!("VIP {}:{}", vip.addr, u16::from_be(key.port));
            match dp.vip(key) {
                Some(meta) if meta == vip.meta => {}
                found => {
                    let what = if found.is_some() { "changed" } else { "missing" };
                    match dp.set_vip(key, &vip.meta) {
                        Ok(()) => repaired.push(format!("{name}: its entry was {what} in the VIP map; rewritten")),
                        Err(e) => repaired.push(format!("{name}: its entry was {what}; rewriting it failed: {e:#}")),
                    }
                }
            }
            for ((addr, port), b) in &vip.backends {
                if dp.backend(b.id).is_ok_and(|v| v == b.value) {
                    continue;
                }
                let who = match port {
                    0 => format!("{name}: backend {addr}"),
                    p => format!("{name}: backend {addr} port {p}"),
                };
                match dp.set_backend(b.id, &b.value) {
                    Ok(()) => repaired.push(format!("{who}: slot {} differed from what was written; rewritten", b.id)),
                    Err(e) => repaired.push(format!("{who}: slot {} differs; rewriting it failed: {e:#}", b.id)),
                }
            }
        }
        for (key, _) in dp.vips() {
            if !self.vips.contains_key(&key) {
                let a = addr::from_words(&key.addr, key.family);
                let line = match dp.remove_vip(&key) {
                    Ok(()) => format!("VIP {a}:{}: in the VIP map but not configured; removed", u16::from_be(key.port)),
                    Err(e) => format!("VIP {a}:{}: not configured; removing it failed: {e:#}", u16::from_be(key.port)),
                };
                repaired.push(line);
            }
        }
        repaired
    }

    /// Applies one VIP; if that fails, gives back what it took (new backend
    /// ids, an unpublished table region, a never-published VIP) so that the
    /// next apply starts clean.
    fn apply_vip(&mut self, dp: &mut Dataplane, key: &VipKey, spec: &VipSpec, report: &mut ApplyReport) -> Result<()> {
        let is_new = !self.vips.contains_key(key);
        if let Some(applied) = self.vips.get_mut(key) {
            applied.spec = None;
        }
        let mut taken = Taken::default();
        let result = self.apply_vip_inner(dp, key, spec, report, &mut taken);
        if result.is_err() {
            let now = Instant::now();
            for id in taken.backend_ids {
                let _ = dp.set_backend(id, &Backend::default());
                self.resting_backend_ids.push_back((id, now));
            }
            if let Some((start, len)) = taken.region {
                self.regions.retire(start, len);
            }
            if is_new && let Some(vip) = self.vips.remove(key) {
                self.free_vip_ids.push(vip.meta.vip_id);
            }
        }
        result
    }

    fn apply_vip_inner(
        &mut self,
        dp: &mut Dataplane,
        key: &VipKey,
        spec: &VipSpec,
        report: &mut ApplyReport,
        taken: &mut Taken,
    ) -> Result<()> {
        if !maglev::is_prime(spec.table_size) {
            bail!("VIP {}: Maglev table size {} is not prime", spec.name, spec.table_size);
        }
        let mut seen = std::collections::HashSet::new();
        for b in &spec.backends {
            if !seen.insert((b.addr, b.port)) {
                bail!("VIP {}: backend {}:{} is listed twice", spec.name, b.addr, b.port);
            }
            if addr::family(b.addr) != key.family {
                bail!("VIP {}: backend {} is not of the VIP's address family", spec.name, b.addr);
            }
        }
        let is_new = !self.vips.contains_key(key);
        if is_new {
            let vip_id = self.alloc_vip_id(&spec.name)?;
            dp.reset_vip_counter(vip_id)?;
            let meta = VipMeta { vip_id, ..Default::default() };
            self.vips.insert(
                *key,
                AppliedVip { meta, addr: spec.addr, backends: BTreeMap::new(), table_members: Vec::new(), spec: None },
            );
            report.vips_added += 1;
        }
        let vip_id = self.vips[key].meta.vip_id;

        // Backend ids and values, as they should be (and the weights, in the same order).
        let mut desired: BTreeMap<BackendIdentity, AppliedBackend> = BTreeMap::new();
        let mut weights: BTreeMap<BackendIdentity, u32> = BTreeMap::new();
        for b in &spec.backends {
            let ident = (b.addr, b.port);
            let existing = self.vips[key].backends.get(&ident).map(|a| (a.id, a.value.generation));
            let (id, generation) = match existing {
                Some(found) => found,
                None => {
                    let id = self.alloc_backend_id(&spec.name, b.addr)?;
                    taken.backend_ids.push(id);
                    dp.reset_backend_counter(id)?;
                    self.next_generation = self.next_generation.wrapping_add(1).max(1);
                    (id, self.next_generation)
                }
            };
            let state = match (b.healthy, b.weight) {
                (false, _) => BACKEND_DOWN,
                (true, 0) => BACKEND_DRAINING,
                (true, _) => BACKEND_ACTIVE,
            };
            let value = Backend {
                addr: addr::words(b.addr),
                mac: b.mac,
                family: key.family,
                state,
                generation,
                port: b.port.to_be(),
                _pad: 0,
                vip_id,
            };
            desired.insert(ident, AppliedBackend { id, value });
            weights.insert(ident, b.weight);
        }

        // 1. Backends entering (or staying in) the table, before the table.
        for (ident, want) in &desired {
            let have = self.vips[key].backends.get(ident).map(|a| a.value);
            if want.value.state == BACKEND_ACTIVE && have != Some(want.value) {
                // Published whole: the copy packets read is never rewritten
                // (`Dataplane::set_backend`), so a reused id's new server and
                // generation appear together.
                dp.set_backend(want.id, &want.value)?;
                report.backends_written += 1;
            }
        }

        // 2. The table, if its members changed: new region, then publish.
        let members: Vec<(u32, u64, u32)> = desired
            .iter()
            .zip(weights.values())
            .filter(|((_, b), _)| b.value.state == BACKEND_ACTIVE)
            .map(|(((addr, port), b), &weight)| (b.id, maglev::backend_key(&addr::words(*addr), *port), weight))
            .collect();
        let mut flags = if spec.hash == HashMode::SourceIp { VIP_F_HASH_SOURCE_IP } else { 0 };
        if spec.pass_when_empty {
            flags |= VIP_F_PASS_WHEN_EMPTY;
        }
        if spec.icmp_echo {
            flags |= VIP_F_ICMP_ECHO;
        }
        let forwarding = match spec.forwarding {
            Forwarding::Dsr => FWD_DSR,
            Forwarding::Ipip => FWD_IPIP,
            Forwarding::Nat => FWD_NAT,
        };
        let applied = &self.vips[key];
        let echo_changed = (applied.meta.flags ^ flags) & VIP_F_ICMP_ECHO != 0;
        let table_changed = is_new || applied.table_members != members || applied.meta.ring_size != spec.table_size;
        let mut meta = VipMeta { vip_id, forwarding, flags, ..applied.meta };
        if table_changed {
            let maglev_backends: Vec<MaglevBackend> =
                members.iter().map(|&(_, key, weight)| MaglevBackend { key, weight }).collect();
            let table: Vec<u32> = maglev::build(&maglev_backends, spec.table_size)
                .into_iter()
                .map(|pos| if pos == maglev::EMPTY { NO_BACKEND } else { members[pos as usize].0 })
                .collect();
            let offset = self.regions.alloc(spec.table_size).with_context(|| {
                format!(
                    "VIP {}: the Maglev pool has no free region of {} slots (raise maglev_pool)",
                    spec.name, spec.table_size
                )
            })?;
            taken.region = Some((offset, spec.table_size));
            dp.write_pool(offset, &table)?;
            meta.ring_offset = offset;
            meta.ring_size = spec.table_size;
        }
        if is_new || meta != applied.meta {
            dp.set_vip(key, &meta)?;
        }
        // Published: from here on nothing is given back on error.
        taken.region = None;
        taken.backend_ids.clear();
        if table_changed {
            report.tables_swapped += 1;
            if !is_new {
                self.regions.retire(applied.meta.ring_offset, applied.meta.ring_size);
            }
        }
        if is_new || echo_changed {
            self.write_vip_addr(dp, spec.addr, Some((key, flags)))?;
        }

        // 3. Backends leaving the table change state only now, after a pause
        // longer than any packet still reading the old table (an XDP run is
        // microseconds): such a packet finds its backend still active.
        let leaving = desired.iter().any(|(ident, want)| {
            want.value.state != BACKEND_ACTIVE
                && self.vips[key].backends.get(ident).map(|a| a.value) != Some(want.value)
        }) || self.vips[key].backends.keys().any(|i| !desired.contains_key(i));
        if leaving && !is_new {
            std::thread::sleep(Duration::from_millis(1));
        }
        for (ident, want) in &desired {
            let have = self.vips[key].backends.get(ident).map(|a| a.value);
            if want.value.state != BACKEND_ACTIVE && have != Some(want.value) {
                dp.set_backend(want.id, &want.value)?;
                report.backends_written += 1;
            }
        }
        let removed: Vec<AppliedBackend> = {
            let applied = self.vips.get_mut(key).expect("applied above");
            let gone: Vec<BackendIdentity> =
                applied.backends.keys().filter(|i| !desired.contains_key(i)).copied().collect();
            gone.iter().filter_map(|i| applied.backends.remove(i)).collect()
        };
        for b in removed {
            self.release_backend(dp, b)?;
            report.backends_written += 1;
        }
        let applied = self.vips.get_mut(key).expect("applied above");
        applied.meta = meta;
        applied.backends = desired;
        applied.table_members = members;
        applied.spec = Some(spec.clone());
        Ok(())
    }

    fn release_backend(&mut self, dp: &mut Dataplane, b: AppliedBackend) -> Result<()> {
        let unused = Backend { state: BACKEND_UNUSED, ..b.value };
        dp.set_backend(b.id, &unused)?;
        self.resting_backend_ids.push_back((b.id, Instant::now()));
        Ok(())
    }

    /// `VIP_ADDRS`' value for `ip`: how many VIPs it has, with
    /// `VIP_ADDR_F_ICMP_ECHO` if any of them answers echo requests. `pending`
    /// is a VIP's flags about to replace the applied ones.
    fn vip_addr_value(&self, ip: IpAddr, pending: Option<(&VipKey, u32)>) -> u32 {
        let mut value = 0;
        for (key, v) in self.vips.iter().filter(|(_, v)| v.addr == ip) {
            let flags = match pending {
                Some((k, flags)) if k == key => flags,
                _ => v.meta.flags,
            };
            value += 1;
            if flags & VIP_F_ICMP_ECHO != 0 {
                value |= VIP_ADDR_F_ICMP_ECHO;
            }
        }
        value
    }

    fn write_vip_addr(&mut self, dp: &mut Dataplane, ip: IpAddr, pending: Option<(&VipKey, u32)>) -> Result<()> {
        match self.vip_addr_value(ip, pending) {
            0 => dp.remove_vip_addr(&addr::addr_key(ip)),
            n => dp.set_vip_addr(&addr::addr_key(ip), n),
        }
    }

    fn remove_vip(&mut self, dp: &mut Dataplane, key: &VipKey) -> Result<()> {
        let vip = self.vips.remove(key).expect("caller checked");
        dp.remove_vip(key)?;
        self.write_vip_addr(dp, vip.addr, None)?;
        self.regions.retire(vip.meta.ring_offset, vip.meta.ring_size);
        for (_, b) in vip.backends {
            self.release_backend(dp, b)?;
        }
        self.free_vip_ids.push(vip.meta.vip_id);
        Ok(())
    }

    /// What flow sync needs of the applied VIPs (see `flowsync::view`).
    /// A VIP's ring is read from the pool only when its table is not the
    /// one `previous` holds (same region, same members); otherwise shared.
    /// NAT VIPs get no ring: they are not synced.
    pub fn sync_view(&self, dp: &Dataplane, previous: Option<&SyncView>) -> SyncView {
        use std::hash::{Hash as _, Hasher as _};
        // The seed is written before the VIPs (see `Daemon::write_desired`).
        let seed = dp.config().map(|c| c.hash_seed).unwrap_or_default();
        let mut view = SyncView::default();
        view.seed = seed;
        for (key, vip) in &self.vips {
            let mut digest = std::hash::DefaultHasher::new();
            vip.table_members.hash(&mut digest);
            let table_id = digest.finish();
            let (offset, size) = (vip.meta.ring_offset, vip.meta.ring_size);
            let ring: Arc<[u32]> = if vip.meta.forwarding == FWD_NAT {
                Arc::from(Vec::new())
            } else {
                previous
                    .and_then(|p| p.ring_if_unchanged(key, offset, size, table_id))
                    .unwrap_or_else(|| dp.read_pool(offset, size).into())
            };
            let backends = vip.backends.values().map(|b| BackendView {
                id: b.id,
                addr: b.value.addr,
                port: b.value.port,
                generation: b.value.generation,
                state: b.value.state,
            });
            view.insert(
                *key,
                VipView::new(vip.meta.forwarding, vip.meta.flags, (offset, size, table_id), ring, backends),
            );
        }
        view
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_carves_a_region_out() {
        let mut r = Regions::new(100);
        assert!(r.reserve(30, 20));
        assert_eq!(r.free, vec![(0, 30), (50, 50)]);
        assert!(!r.reserve(40, 20), "already in use");
        assert_eq!(r.alloc(50), Some(50));
    }

    #[test]
    fn a_vip_is_served_once_applied_with_a_member_in_its_table() {
        let mut r = Reconciler {
            vips: BTreeMap::new(),
            free_vip_ids: Vec::new(),
            next_vip_id: 0,
            max_vips: 4,
            resting_backend_ids: VecDeque::new(),
            free_backend_ids: Vec::new(),
            next_backend_id: 0,
            max_backends: 4,
            next_generation: 1,
            regions: Regions::new(100),
        };
        let vip: IpAddr = "198.18.0.10".parse().unwrap();
        let key = |port: u16| VipKey {
            addr: addr::words(vip),
            port: port.to_be(),
            protocol: lb_common::maps::PROTO_TCP,
            family: addr::family(vip),
        };
        assert!(!r.serving(&key(80)), "not applied: its apply failed, or it was never wanted");
        let applied = AppliedVip {
            meta: VipMeta::default(),
            addr: vip,
            backends: BTreeMap::new(),
            table_members: vec![],
            spec: None,
        };
        r.vips.insert(key(80), applied);
        assert!(!r.serving(&key(80)), "applied, but every backend is down or drained");
        r.vips.get_mut(&key(80)).unwrap().table_members.push((0, 1, 1));
        assert!(r.serving(&key(80)));
        assert!(!r.serving(&key(443)), "another port of the address is another VIP");
    }

    #[test]
    fn regions_coalesce_and_rest_before_reuse() {
        let mut r = Regions::new(100);
        let a = r.alloc(40).unwrap();
        let b = r.alloc(40).unwrap();
        assert_eq!((a, b), (0, 40));
        assert_eq!(r.alloc(40), None, "only 20 slots left and nothing resting");
        r.retire(a, 40);
        r.retire(b, 40);
        // Resting regions are not handed out before the grace period.
        let start = Instant::now();
        assert_eq!(r.alloc(100), Some(0), "coalesced into one region again");
        assert!(start.elapsed() >= GRACE);
    }
}
