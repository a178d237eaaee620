//! What flow sync needs to know of this node's tables: per VIP its
//! forwarding, flags, Maglev ring and backends. With it a node tells which
//! of its tracked flows deviate from Maglev's current choice (those it
//! sends), and turns a peer's record (backend by address and port) into an
//! entry of its own flow table (backend by its own id and generation).
//!
//! Built by `Reconciler::sync_view` after each apply. A ring is read from
//! the Maglev pool only when its VIP's table changed; unchanged rings are
//! shared with the previous view (`Arc`), so a thousand VIPs of 65537 slots
//! are not copied on every change.
//!
//! Only DSR and IP-in-IP VIPs are synced: a NAT connection's state lives in
//! NAT_FLOWS and its replies must come back through the node that
//! translated them, so another node could not carry it on anyway.

use std::{collections::HashMap, sync::Arc};

use lb_common::{
    flow_hash,
    maps::{BACKEND_ACTIVE, BACKEND_DRAINING, FWD_DSR, FWD_IPIP, FlowKey, FlowValue, VIP_F_HASH_SOURCE_IP, VipKey},
};

use super::wire::FlowRecord;

/// A backend of a VIP, as this node numbered it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendView {
    pub id: u32,
    pub addr: [u32; 4],
    /// Network order; 0: the VIP's port.
    pub port: u16,
    pub generation: u32,
    /// `lb_common::maps::BACKEND_*`.
    pub state: u8,
}

impl BackendView {
    /// Whether a tracked flow keeps this backend (the dataplane keeps a
    /// flow on an active or draining backend).
    fn keeps_flows(&self) -> bool {
        self.state == BACKEND_ACTIVE || self.state == BACKEND_DRAINING
    }
}

/// One VIP.
#[derive(Clone, Debug)]
pub struct VipView {
    /// `lb_common::maps::FWD_*`.
    pub forwarding: u32,
    /// `lb_common::maps::VIP_F_*`.
    pub flags: u32,
    pub ring_offset: u32,
    pub ring_size: u32,
    /// Identifies the table's contents (a digest of its members); with the
    /// region, decides whether the next view can share `ring`.
    pub table_id: u64,
    /// The backend id in each slot of the VIP's Maglev table (`ring_size`
    /// slots; empty for a VIP that is not synced).
    pub ring: Arc<[u32]>,
    by_id: HashMap<u32, BackendView>,
    by_addr: HashMap<([u32; 4], u16), u32>,
}

impl VipView {
    pub fn new(
        forwarding: u32,
        flags: u32,
        (ring_offset, ring_size, table_id): (u32, u32, u64),
        ring: Arc<[u32]>,
        backends: impl IntoIterator<Item = BackendView>,
    ) -> Self {
        let by_id: HashMap<u32, BackendView> = backends.into_iter().map(|b| (b.id, b)).collect();
        let by_addr = by_id.values().map(|b| ((b.addr, b.port), b.id)).collect();
        Self { forwarding, flags, ring_offset, ring_size, table_id, ring, by_id, by_addr }
    }

    /// DSR and IP-in-IP VIPs are synced; NAT ones are not (see the module docs).
    pub fn synced(&self) -> bool {
        self.forwarding == FWD_DSR || self.forwarding == FWD_IPIP
    }

    pub fn backend(&self, id: u32) -> Option<&BackendView> {
        self.by_id.get(&id)
    }

    pub fn backend_by_addr(&self, addr: &[u32; 4], port: u16) -> Option<&BackendView> {
        self.by_addr.get(&(*addr, port)).and_then(|id| self.by_id.get(id))
    }

    /// The backend id Maglev chooses for `hash` (None: the slot is empty,
    /// or the VIP has no table).
    pub fn maglev_choice(&self, hash: u32) -> Option<u32> {
        let len = self.ring.len() as u32;
        if len == 0 {
            return None;
        }
        Some(self.ring[(hash % len) as usize]).filter(|&id| id != lb_common::maps::NO_BACKEND)
    }

    /// The flow hash the dataplane computes for `flow` on this VIP with
    /// hash seed `seed`.
    pub fn hash(&self, seed: &[u32; 2], flow: &FlowKey) -> u32 {
        if self.flags & VIP_F_HASH_SOURCE_IP != 0 {
            flow_hash::source_ip(seed, &flow.src)
        } else {
            flow_hash::five_tuple(seed, &flow.src, &flow.dst, flow.sport, flow.dport, flow.protocol)
        }
    }
}

/// Why a peer's record was not installed (`SyncStatus::records_rejected`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reject {
    UnknownVip,
    NotSynced,
    UnknownBackend,
    BackendDown,
    RateLimit,
    LocalEntryKept,
}

impl Reject {
    pub fn name(self) -> &'static str {
        match self {
            Reject::UnknownVip => "unknown VIP",
            Reject::NotSynced => "not synced (nat)",
            Reject::UnknownBackend => "unknown backend",
            Reject::BackendDown => "backend down",
            Reject::RateLimit => "rate limit",
            Reject::LocalEntryKept => "local entry kept",
        }
    }

    /// For an operator: what it means and what to do.
    pub fn explain(self) -> &'static str {
        match self {
            Reject::UnknownVip => "a VIP this node does not have (the nodes' configurations differ: compare them)",
            Reject::NotSynced => "a NAT VIP here (NAT flows are not synced: the nodes' configurations differ)",
            Reject::UnknownBackend => {
                "a backend this VIP does not have here (the nodes' configurations differ, or one has not reloaded yet)"
            }
            Reject::BackendDown => "a backend that is down here (its health check fails on this node)",
            Reject::RateLimit => "more than max_rate records per second per peer arrived (raise flow_sync.max_rate)",
            Reject::LocalEntryKept => {
                "this node tracks the flow itself, on a backend that is up here: its own entry is kept (a client \
                 reused the connection's addresses and ports, or a peer holds an entry that outlived its connection)"
            }
        }
    }
}

/// Every VIP of this node, as flow sync needs it.
#[derive(Clone, Debug, Default)]
pub struct SyncView {
    vips: HashMap<VipKey, VipView>,
    /// The dataplane's flow hash seed (`LbConfig::hash_seed`).
    pub seed: [u32; 2],
}

/// The VIP a flow is addressed to.
pub fn vip_key_of(flow: &FlowKey) -> VipKey {
    VipKey { addr: flow.dst, port: flow.dport, protocol: flow.protocol, family: flow.family }
}

impl SyncView {
    pub fn insert(&mut self, key: VipKey, vip: VipView) {
        self.vips.insert(key, vip);
    }

    pub fn vip(&self, key: &VipKey) -> Option<&VipView> {
        self.vips.get(key)
    }

    pub fn len(&self) -> usize {
        self.vips.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vips.is_empty()
    }

    /// The ring of `key` in this view, if its table is the one at
    /// (`offset`, `size`) with contents `table_id`: the next view shares it.
    pub fn ring_if_unchanged(&self, key: &VipKey, offset: u32, size: u32, table_id: u64) -> Option<Arc<[u32]>> {
        let v = self.vips.get(key)?;
        (v.ring_offset == offset && v.ring_size == size && v.table_id == table_id && v.ring.len() == size as usize)
            .then(|| v.ring.clone())
    }

    /// The VIP of a tracked flow and the backend the dataplane keeps it on:
    /// one of the VIP's (id and generation), active or draining. None: the
    /// entry is stale, and the dataplane chooses again at the next packet.
    fn kept(&self, flow: &FlowKey, value: &FlowValue) -> Option<(&VipView, &BackendView)> {
        let vip = self.vips.get(&vip_key_of(flow))?;
        let b = vip.backend(value.backend_id).filter(|b| b.generation == value.generation && b.keeps_flows())?;
        Some((vip, b))
    }

    /// Whether the dataplane keeps the tracked flow on its backend (see `kept`).
    pub fn keeps(&self, flow: &FlowKey, value: &FlowValue) -> bool {
        self.kept(flow, value).is_some()
    }

    /// If the tracked flow deviates, its backend: the VIP is synced, the
    /// dataplane keeps the flow on its backend, and Maglev's choice for the
    /// flow's hash is another.
    pub fn deviation(&self, flow: &FlowKey, value: &FlowValue) -> Option<&BackendView> {
        let (vip, b) = self.kept(flow, value).filter(|(vip, _)| vip.synced())?;
        (vip.maglev_choice(value.hash) != Some(value.backend_id)).then_some(b)
    }

    /// The record a deviating flow is sent as.
    pub fn record(flow: &FlowKey, backend: &BackendView) -> FlowRecord {
        FlowRecord { flow: *flow, backend_addr: backend.addr, backend_port: backend.port }
    }

    /// This node's flow-table entry for a peer's record, or why there is none.
    pub fn resolve(&self, record: &FlowRecord) -> Result<FlowValue, Reject> {
        let vip = self.vips.get(&vip_key_of(&record.flow)).ok_or(Reject::UnknownVip)?;
        if !vip.synced() {
            return Err(Reject::NotSynced);
        }
        let b = vip.backend_by_addr(&record.backend_addr, record.backend_port).ok_or(Reject::UnknownBackend)?;
        if !b.keeps_flows() {
            return Err(Reject::BackendDown);
        }
        Ok(FlowValue {
            backend_id: b.id,
            generation: b.generation,
            hash: vip.hash(&self.seed, &record.flow),
            last_seen_s: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{
        maglev::{self, MaglevBackend},
        maps::{BACKEND_DOWN, FAMILY_V4, FWD_NAT, NO_BACKEND, PROTO_TCP},
    };

    const SIZE: u32 = 251;

    fn vip_key() -> VipKey {
        VipKey {
            addr: [u32::from_ne_bytes([198, 18, 100, 1]), 0, 0, 0],
            port: 80u16.to_be(),
            protocol: PROTO_TCP,
            family: 4,
        }
    }

    fn backend(id: u32, last: u8, state: u8) -> BackendView {
        BackendView {
            id,
            addr: [u32::from_ne_bytes([198, 18, 0, last]), 0, 0, 0],
            port: 0,
            generation: 100 + id,
            state,
        }
    }

    fn flow(i: u32) -> FlowKey {
        FlowKey {
            src: [u32::from_ne_bytes([198, 18, 1, i as u8]), 0, 0, 0],
            dst: vip_key().addr,
            sport: (1000 + i as u16).to_be(),
            dport: 80u16.to_be(),
            protocol: PROTO_TCP,
            family: FAMILY_V4,
            _pad: [0; 2],
        }
    }

    /// A VIP whose table holds `members` (ids), with backends 7 (active),
    /// 8 (active), 9 (draining, not in the table) and 10 (down).
    fn view(forwarding: u32, members: &[u32]) -> SyncView {
        let backends = [
            backend(7, 11, BACKEND_ACTIVE),
            backend(8, 12, BACKEND_ACTIVE),
            backend(9, 13, BACKEND_DRAINING),
            backend(10, 14, BACKEND_DOWN),
        ];
        let mb: Vec<MaglevBackend> = members
            .iter()
            .map(|id| {
                let b = backends.iter().find(|b| b.id == *id).unwrap();
                MaglevBackend { key: maglev::backend_key(&b.addr, b.port), weight: 1 }
            })
            .collect();
        let ring: Vec<u32> = maglev::build(&mb, SIZE)
            .into_iter()
            .map(|p| if p == maglev::EMPTY { NO_BACKEND } else { members[p as usize] })
            .collect();
        let mut v = SyncView::default();
        v.insert(vip_key(), VipView::new(forwarding, 0, (0, SIZE, 1), ring.into(), backends));
        v
    }

    fn tracked(v: &SyncView, f: &FlowKey, id: u32) -> FlowValue {
        let vip = v.vip(&vip_key()).unwrap();
        FlowValue { backend_id: id, generation: 100 + id, hash: vip.hash(&v.seed, f), last_seen_s: 0 }
    }

    #[test]
    fn a_flow_deviates_when_maglev_now_chooses_another_live_backend() {
        let v = view(FWD_DSR, &[7, 8]);
        let vip = v.vip(&vip_key()).unwrap();
        let mut seen = [0; 4];
        for i in 0..200 {
            let f = flow(i);
            let chosen = vip.maglev_choice(vip.hash(&v.seed, &f)).unwrap();
            let other = if chosen == 7 { 8 } else { 7 };
            // On Maglev's choice: not sent.
            assert!(v.deviation(&f, &tracked(&v, &f, chosen)).is_none());
            // On the other active backend (it was Maglev's choice under an older table): sent.
            assert_eq!(v.deviation(&f, &tracked(&v, &f, other)).map(|b| b.id), Some(other));
            // Draining: kept by the dataplane, never Maglev's choice: sent.
            assert_eq!(v.deviation(&f, &tracked(&v, &f, 9)).map(|b| b.id), Some(9));
            // Down: the dataplane chooses again, nothing to keep.
            assert!(v.deviation(&f, &tracked(&v, &f, 10)).is_none());
            // Another generation of the id (the slot went to another server): stale.
            let stale = FlowValue { generation: 1, ..tracked(&v, &f, other) };
            assert!(v.deviation(&f, &stale).is_none());
            // An id the VIP does not have.
            assert!(v.deviation(&f, &tracked(&v, &f, 42)).is_none());
            seen[(chosen - 7) as usize] += 1;
        }
        assert!(seen[0] > 50 && seen[1] > 50, "both backends chosen: {seen:?}");
    }

    #[test]
    fn an_entry_is_kept_on_a_backend_up_here_of_its_generation() {
        let v = view(FWD_DSR, &[7, 8]);
        let f = flow(4);
        for (id, kept) in [(7, true), (8, true), (9, true), (10, false), (42, false)] {
            assert_eq!(v.keeps(&f, &tracked(&v, &f, id)), kept, "backend {id}");
        }
        assert!(!v.keeps(&f, &FlowValue { generation: 1, ..tracked(&v, &f, 7) }), "another generation");
        // NAT VIPs too: whether an entry is stale does not depend on syncing.
        assert!(view(FWD_NAT, &[7]).keeps(&f, &tracked(&v, &f, 7)));
        assert!(!SyncView::default().keeps(&f, &tracked(&v, &f, 7)), "no such VIP");
    }

    #[test]
    fn nat_vips_and_unknown_vips_are_not_synced() {
        let v = view(FWD_NAT, &[7, 8]);
        let f = flow(1);
        assert!(v.deviation(&f, &tracked(&v, &f, 9)).is_none());
        let record = SyncView::record(&f, &backend(9, 13, BACKEND_DRAINING));
        assert_eq!(v.resolve(&record), Err(Reject::NotSynced));
        let elsewhere = FlowKey { dport: 443u16.to_be(), ..f };
        assert!(SyncView::default().deviation(&elsewhere, &tracked(&v, &f, 9)).is_none());
        assert_eq!(
            view(FWD_DSR, &[7]).resolve(&SyncView::record(&elsewhere, &backend(7, 11, 1))),
            Err(Reject::UnknownVip)
        );
    }

    #[test]
    fn an_empty_table_makes_every_kept_flow_deviate() {
        let v = view(FWD_IPIP, &[]);
        let f = flow(3);
        assert_eq!(v.deviation(&f, &tracked(&v, &f, 9)).map(|b| b.id), Some(9));
    }

    #[test]
    fn records_resolve_to_this_nodes_ids_generations_and_hash() {
        let v = view(FWD_DSR, &[7, 8]);
        let f = flow(5);
        // The peer numbered the backend otherwise: only the address and port count.
        let theirs = BackendView { id: 1234, generation: 99, ..backend(8, 12, BACKEND_ACTIVE) };
        let value = v.resolve(&SyncView::record(&f, &theirs)).unwrap();
        assert_eq!(value, tracked(&v, &f, 8));
        let wrong_port = BackendView { port: 8080u16.to_be(), ..theirs };
        assert_eq!(v.resolve(&SyncView::record(&f, &wrong_port)), Err(Reject::UnknownBackend));
        assert_eq!(v.resolve(&SyncView::record(&f, &backend(10, 14, BACKEND_DOWN))), Err(Reject::BackendDown));
        assert!(v.resolve(&SyncView::record(&f, &backend(9, 13, BACKEND_DRAINING))).is_ok());
    }

    #[test]
    fn source_ip_hashing_is_honoured() {
        let mut v = SyncView::default();
        let b = backend(7, 11, BACKEND_ACTIVE);
        v.insert(
            vip_key(),
            VipView::new(FWD_DSR, VIP_F_HASH_SOURCE_IP, (0, SIZE, 1), vec![7; SIZE as usize].into(), [b]),
        );
        let f = flow(9);
        let value = v.resolve(&SyncView::record(&f, &b)).unwrap();
        assert_eq!(value.hash, flow_hash::source_ip(&v.seed, &f.src));
    }

    #[test]
    fn a_ring_is_shared_only_while_its_table_is_the_same() {
        let v = view(FWD_DSR, &[7, 8]);
        let ring = v.ring_if_unchanged(&vip_key(), 0, SIZE, 1).unwrap();
        assert!(Arc::ptr_eq(&ring, &v.vip(&vip_key()).unwrap().ring));
        assert!(v.ring_if_unchanged(&vip_key(), SIZE, SIZE, 1).is_none(), "another region");
        assert!(v.ring_if_unchanged(&vip_key(), 0, SIZE, 2).is_none(), "other members in the same region");
    }
}
