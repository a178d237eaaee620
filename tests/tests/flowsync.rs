//! Flow sync between two nodes, each a real dataplane (the eBPF object
//! loaded twice, driven with BPF_PROG_TEST_RUN) with its own reconciler and
//! its own backend ids, talking over UDP inside a network namespace of
//! their own: a flow whose backend Maglev no longer chooses after a table
//! change reaches the other node, is installed there under that node's id
//! of the same backend, and keeps its backend there; but never in place of
//! a live entry of that node's own. A node's datagrams sent back to it, and
//! repeated ones, are refused, and a peer's requests for everything are
//! answered once a second at most.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use lb_common::{
    flow_hash,
    maglev::{self, MaglevBackend},
    maps::{FlowKey, FlowValue, LbConfig, PROTO_TCP},
};
use lb_userspace::{
    addr,
    config::{FlowSyncSettings, SyncKey},
    flowsync::{
        FlowSync, SyncView,
        wire::{self, FlowRecord, Message, Sealer, Session},
    },
    hash_seed,
    reconcile::{Forwarding, VipSpec},
    status::SyncStatus,
    walks::insert_batched,
};
use tests::{
    harness::{Engine, XDP_TX, backend_of, vip},
    packets::{L4, frame, syn},
    topology::{NETNS_PREFIX, Netns, unique_tag, wait_until},
};

const KEY: &[u8] = b"flow sync test key, 32 bytes ok.";
const NODE_A: &str = "198.18.200.1:7946";
const NODE_B: &str = "198.18.200.2:7946";
/// An address in the namespace that is no peer of anyone.
const STRANGER: &str = "198.18.200.3";
const VIP4: &str = "198.18.100.1";
const VIP6: &str = "2001:db8:100::1";
const BACKENDS4: [(&str, u32); 4] = [("198.18.0.11", 1), ("198.18.0.12", 1), ("198.18.0.13", 1), ("198.18.0.14", 1)];
const BACKENDS6: [(&str, u32); 4] =
    [("2001:db8::11", 1), ("2001:db8::12", 1), ("2001:db8::13", 1), ("2001:db8::14", 1)];
const TABLE: u32 = 65_537;
const WAIT: Duration = Duration::from_secs(20);

/// The synced VIP with its first `n` backends.
fn service(n: usize) -> VipSpec {
    vip("web", VIP4, 80, L4::Tcp, Forwarding::Dsr, &BACKENDS4[..n])
}

fn service6(n: usize) -> VipSpec {
    vip("web6", VIP6, 80, L4::Tcp, Forwarding::Dsr, &BACKENDS6[..n])
}

/// A VIP only node B has, applied first there: B's backend ids differ from A's.
fn other() -> VipSpec {
    vip("other", "198.18.100.2", 443, L4::Tcp, Forwarding::Dsr, &[("198.18.0.21", 1), ("198.18.0.22", 1)])
}

fn settings(listen: &str, peer: &str) -> FlowSyncSettings {
    FlowSyncSettings {
        listen: listen.parse().unwrap(),
        peers: vec![peer.parse().unwrap()],
        key: SyncKey { path: "/etc/xdplb/flowsync.key".into(), bytes: KEY.to_vec() },
        // Only the rounds the test causes.
        refresh: Duration::from_secs(3600),
        max_rate: 100_000,
    }
}

/// A namespace holding the nodes' (and a stranger's) addresses on loopback;
/// `body` runs on a thread inside it. Removed however `body` ends.
fn in_namespace<T: Send + 'static>(body: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = Netns::create(format!("{NETNS_PREFIX}fs{}", unique_tag()));
    for a in ["198.18.200.1", "198.18.200.2", STRANGER] {
        ns.ip(&format!("addr add {a}/32 dev lo"));
    }
    ns.enter(body)
}

/// One node: a dataplane, its reconciler, its sync channel and status.
struct Node {
    engine: Engine,
    sync: FlowSync,
    status: Arc<Mutex<SyncStatus>>,
    view: SyncView,
}

impl Node {
    fn start(mut engine: Engine, listen: &str, peer: &str) -> Self {
        // As the controller does: the seed derived from the shared key, the same on both nodes.
        let cfg = engine.dp.config().unwrap();
        engine.dp.set_config(&LbConfig { hash_seed: hash_seed::derive(KEY), ..cfg }).unwrap();
        let view = engine.reconciler.sync_view(&engine.dp, None);
        let status = Arc::new(Mutex::new(SyncStatus::default()));
        let flows = engine.dp.flows_map().unwrap();
        let sync = FlowSync::start(&settings(listen, peer), flows, view.clone(), status.clone()).unwrap();
        Self { engine, sync, status, view }
    }

    fn status(&self) -> SyncStatus {
        self.status.lock().unwrap().clone()
    }

    /// Applies `specs` and tells the sync channel.
    fn apply(&mut self, specs: &[VipSpec]) {
        self.engine.apply(specs);
        self.view = self.engine.reconciler.sync_view(&self.engine.dp, Some(&self.view));
        self.sync.tables_changed(self.view.clone());
    }

    /// Waits until the sync channel finished `n` rounds in all.
    fn wait_rounds(&self, n: u64) {
        assert!(wait_until(WAIT, || self.sync.rounds() >= n), "round {n} did not finish: {:?}", self.status());
    }
}

fn flow_key(src: IpAddr, sport: u16, vip: IpAddr) -> FlowKey {
    FlowKey {
        src: addr::words(src),
        dst: addr::words(vip),
        sport: sport.to_be(),
        dport: 80u16.to_be(),
        protocol: PROTO_TCP,
        family: addr::family(src),
        _pad: [0; 2],
    }
}

fn hash_of(k: &FlowKey) -> u32 {
    flow_hash::five_tuple(&hash_seed::derive(KEY), &k.src, &k.dst, k.sport, k.dport, k.protocol)
}

/// Maglev's table for `spec`, computed here from lb_common alone: the
/// backend's index in `spec.backends` in each slot.
fn expected_table(spec: &VipSpec) -> Vec<u32> {
    let members: Vec<MaglevBackend> = spec
        .backends
        .iter()
        .map(|b| MaglevBackend { key: maglev::backend_key(&addr::words(b.addr), b.port), weight: b.weight })
        .collect();
    maglev::build(&members, spec.table_size)
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

fn client(i: usize) -> (IpAddr, u16) {
    (format!("198.18.{}.{}", 1 + i / 200, 1 + i % 200).parse().unwrap(), 10_000 + i as u16)
}

#[test]
fn flows_maglev_moves_keep_their_backend_on_the_peer() {
    in_namespace(|| {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let _in_runtime = rt.enter();
        let mut a = Engine::new();
        a.apply(&[service(3)]);
        let mut b = Engine::new();
        b.apply(&[other()]);
        b.apply(&[other(), service(3)]);
        let mut a = Node::start(a, NODE_A, NODE_B);
        let mut b = Node::start(b, NODE_B, NODE_A);
        // Each asked the other for its deviating flows at start: none yet.
        a.wait_rounds(1);
        b.wait_rounds(1);
        assert_eq!(a.status().records_sent, 0);

        // 300 client flows through A: tracked on the backends Maglev chose.
        let vip_addr: IpAddr = VIP4.parse().unwrap();
        let old_table = expected_table(&service(3));
        let mut flows = Vec::new();
        for i in 0..300 {
            let (src, sport) = client(i);
            let out = a.engine.run(&syn(src, sport, vip_addr, 80));
            assert_eq!(out.action, XDP_TX);
            // The client's next segment confirms the flow into A's connection table.
            let next = a.engine.run(&frame(L4::Tcp, src, sport, vip_addr, 80));
            assert_eq!(backend_of(&next.frame), backend_of(&out.frame));
            let key = flow_key(src, sport, vip_addr);
            let old = backend_of(&out.frame);
            assert_eq!(old, old_table[(hash_of(&key) % TABLE) as usize] as usize, "A chose as Maglev does");
            flows.push((key, src, sport, old));
        }

        // A fourth backend on both nodes: Maglev moves about a quarter of the flows.
        let view_b_before = b.view.clone();
        a.apply(&[service(4)]);
        b.apply(&[other(), service(4)]);
        let new_table = expected_table(&service(4));
        let deviating: Vec<_> =
            flows.iter().filter(|(k, _, _, old)| new_table[(hash_of(k) % TABLE) as usize] as usize != *old).collect();
        eprintln!("{} of {} flows deviate after adding a backend", deviating.len(), flows.len());
        assert!(!deviating.is_empty() && deviating.len() < flows.len());

        // The unchanged VIP's ring is shared with B's previous view, the changed one read again.
        let ring = |v: &SyncView, s: &VipSpec| v.vip(&s.key()).unwrap().ring.clone();
        assert!(Arc::ptr_eq(&ring(&view_b_before, &other()), &ring(&b.view, &other())));
        assert!(!Arc::ptr_eq(&ring(&view_b_before, &service(3)), &ring(&b.view, &service(4))));

        a.wait_rounds(2);
        // B's own round after its change (changes within it are one round).
        b.wait_rounds(2);
        assert!(
            wait_until(WAIT, || b.status().flows_installed >= deviating.len() as u64),
            "B installed {} of {} flows: {:?}",
            b.status().flows_installed,
            deviating.len(),
            b.status()
        );
        let (sa, sb) = (a.status(), b.status());
        assert_eq!(sa.deviating_flows, deviating.len() as u64, "A's deviating count");
        assert_eq!(sa.records_sent, deviating.len() as u64, "A sent each deviating flow once");
        assert_eq!(sb.flows_installed, deviating.len() as u64);
        assert!(sb.records_rejected.is_empty() && sb.datagrams_refused.is_empty(), "{sb:?}");
        assert!(sb.peers[0].last_heard_unix_ms > 0);

        let spec = service(4);
        for &&(key, src, sport, old) in &deviating {
            let backend = spec.backends[old].addr;
            let id_a = a.engine.reconciler.backend_id(&spec.key(), backend, 0).unwrap();
            let id_b = b.engine.reconciler.backend_id(&spec.key(), backend, 0).unwrap();
            assert_ne!(id_a, id_b, "the nodes number their backends differently");
            let got = b.engine.dp.flow(&key).unwrap_or_else(|| panic!("{src}:{sport} is not in B's flow table"));
            let generation = b.engine.dp.backend(id_b).unwrap().generation;
            assert_eq!(got, FlowValue { backend_id: id_b, generation, hash: hash_of(&key), last_seen_s: 0 });
            // Without the synced entry B would send it elsewhere...
            assert_ne!(b.engine.predicted_backend(&spec, src, sport), old);
            // ...with it, the flow keeps its backend.
            let out = b.engine.run(&frame(L4::Tcp, src, sport, vip_addr, 80));
            assert_eq!(out.action, XDP_TX);
            assert_eq!(backend_of(&out.frame), old, "{src}:{sport} left B toward another backend");
        }
        for (key, src, sport, _) in &flows {
            if !deviating.iter().any(|d| d.0 == *key) {
                assert!(b.engine.dp.flow(key).is_none(), "{src}:{sport} follows Maglev: it was not sent");
            }
        }

        // B walks its table again: the flows it installed deviate there too,
        // but are not sent back.
        b.sync.tables_changed(b.view.clone());
        b.wait_rounds(3);
        assert_eq!(b.status().deviating_flows, deviating.len() as u64);
        assert_eq!(b.status().records_sent, 0);

        // A datagram sealed with another key, from A's address: refused, nothing installed.
        let (src, sport) = (IpAddr::from([198, 18, 9, 9]), 5555);
        let record = FlowRecord {
            flow: flow_key(src, sport, vip_addr),
            backend_addr: addr::words("198.18.0.11".parse().unwrap()),
            backend_port: 0,
        };
        let send = |from: &str, key: &[u8]| {
            let sealer = Sealer::new(key, NODE_A.parse().unwrap(), Arc::new(Session::new(1)));
            let (datagram, n) = sealer.flows(&[record], NODE_B.parse().unwrap(), unix_ms());
            assert_eq!(n, 1);
            let socket = UdpSocket::bind((from.parse::<IpAddr>().unwrap(), 0)).unwrap();
            socket.send_to(&datagram, NODE_B.parse::<SocketAddr>().unwrap()).unwrap();
        };
        send("198.18.200.1", b"not the key the nodes share......");
        let refused = |why: &str| b.status().datagrams_refused.get(why).copied().unwrap_or(0);
        assert!(wait_until(WAIT, || refused("bad key") == 1), "{:?}", b.status());
        // The right key from an address that is no peer: refused too.
        send(STRANGER, KEY);
        assert!(wait_until(WAIT, || refused("unknown peer") == 1), "{:?}", b.status());
        assert!(b.engine.dp.flow(&record.flow).is_none());
        assert_eq!(b.status().flows_installed, deviating.len() as u64);

        // A second channel on an address in use says so.
        let status = || Arc::new(Mutex::new(SyncStatus::default()));
        let flows = b.engine.dp.flows_map().unwrap();
        let taken = FlowSync::start(&settings(NODE_B, NODE_A), flows, SyncView::default(), status()).err().unwrap();
        assert!(taken.to_string().starts_with("flow_sync: cannot listen on 198.18.200.2:7946: "), "{taken}");
        // Reloads, from the event loop: each new channel takes the old one's socket.
        let Node { engine, sync, .. } = a;
        let last = status();
        let (sync, engine) = rt.block_on(async {
            let mut sync = sync;
            for i in 0..20 {
                let flows = engine.dp.flows_map().unwrap();
                let st = if i == 19 { last.clone() } else { status() };
                sync = sync.restart(&settings(NODE_A, NODE_B), flows, SyncView::default(), st).unwrap();
                tokio::task::yield_now().await;
            }
            (sync, engine)
        });
        // The last one receives on the socket it took over: B answered its request.
        let heard = || last.lock().unwrap().peers[0].last_heard_unix_ms;
        assert!(wait_until(WAIT, || heard() > 0), "{:?}", last.lock().unwrap());
        // A stopped channel's address is free once `stop` returns.
        rt.block_on(sync.stop());
        let flows = engine.dp.flows_map().unwrap();
        FlowSync::start(&settings(NODE_A, NODE_B), flows, SyncView::default(), status()).unwrap();
    });
}

/// `n` flows tracked on A directly, each on a backend Maglev does not
/// choose for it: `n` deviating flows.
fn deviating_flows(engine: &Engine, spec: &VipSpec, n: usize) -> Vec<(FlowKey, FlowValue)> {
    let vip_addr = spec.addr;
    (0..n)
        .map(|i| {
            let src: IpAddr = if vip_addr.is_ipv4() {
                format!("198.18.{}.{}", 16 + i / 250, 1 + i % 250).parse().unwrap()
            } else {
                format!("2001:db8:c::{:x}", i + 1).parse().unwrap()
            };
            let sport = 40_000 + (i % 1000) as u16;
            let (hash, _, chosen) = engine.maglev_choice(spec, src, sport);
            let chosen = engine.backend_index(spec, chosen).unwrap();
            let other = spec.backends[(chosen + 1) % spec.backends.len()].addr;
            let id = engine.reconciler.backend_id(&spec.key(), other, 0).unwrap();
            let generation = engine.dp.backend(id).unwrap().generation;
            (flow_key(src, sport, vip_addr), FlowValue { backend_id: id, generation, hash, last_seen_s: 0 })
        })
        .collect()
}

#[test]
fn bandwidth_of_ten_thousand_deviating_flows() {
    const N: usize = 10_000;
    const IP_UDP: u64 = 28;
    in_namespace(|| {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let _in_runtime = rt.enter();
        let specs = [service(4), service6(4)];
        let mut a = Engine::new();
        a.apply(&specs);
        let mut b = Engine::new();
        b.apply(&specs);
        let a = Node::start(a, NODE_A, NODE_B);
        let b = Node::start(b, NODE_B, NODE_A);
        a.wait_rounds(1);
        b.wait_rounds(1);
        let mut rounds = 1;
        let mut installed = 0;
        // (datagrams, bytes) of the previous round: each round sends every deviating flow again.
        let mut previous = (0, 0);
        for (family, spec) in [("IPv4", &specs[0]), ("IPv6", &specs[1])] {
            let flows = deviating_flows(&a.engine, spec, N);
            assert_eq!(insert_batched(&a.engine.dp.flows_map().unwrap(), &flows).unwrap(), N);
            let before = a.status();
            let started = Instant::now();
            a.sync.tables_changed(a.view.clone());
            rounds += 1;
            a.wait_rounds(rounds);
            let took = started.elapsed();
            installed += N as u64;
            assert!(
                wait_until(WAIT, || b.status().flows_installed >= installed),
                "B installed {} of {installed}: {:?}",
                b.status().flows_installed,
                b.status()
            );
            let after = a.status();
            assert_eq!(after.deviating_flows, installed);
            let records = after.records_sent - before.records_sent;
            assert_eq!(records, installed, "every deviating flow sent once per round");
            let datagrams = after.datagrams_sent - before.datagrams_sent;
            let bytes = after.bytes_sent - before.bytes_sent;
            // This family's share: what the round sent beyond the previous one.
            let (d, p) = (datagrams - previous.0, bytes - previous.1);
            previous = (datagrams, bytes);
            let wire = p + d * IP_UDP;
            eprintln!(
                "flow sync, {N} deviating {family} flows: {d} datagrams, {p} bytes of UDP payload ({:.1} B/flow), \
                 {wire} bytes with IP+UDP headers ({:.1} B/flow) per full refresh; at refresh 10 s: {:.0} bit/s \
                 per peer. (Round of all {records} deviating flows: {datagrams} datagrams, {bytes} bytes, took {took:?}.)",
                p as f64 / N as f64,
                wire as f64 / N as f64,
                wire as f64 * 8.0 / 10.0,
            );
            // Every flow reached B under B's ids.
            for (key, value) in flows.iter().step_by(97) {
                let got = b.engine.dp.flow(key).expect("installed on B");
                assert_eq!(got.hash, value.hash);
                let addr_of = |e: &Engine, id: u32| e.dp.backend(id).unwrap().addr;
                assert_eq!(addr_of(&b.engine, got.backend_id), addr_of(&a.engine, value.backend_id));
            }
        }
    });
}

#[test]
fn a_peers_record_replaces_only_stale_or_synced_entries() {
    in_namespace(|| {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let _in_runtime = rt.enter();
        let spec = service(4);
        let vip_addr = spec.addr;
        let mut a = Engine::new();
        a.apply(std::slice::from_ref(&spec));
        let mut b = Engine::new();
        b.apply(&[other()]);
        b.apply(&[other(), spec.clone()]);
        let a = Node::start(a, NODE_A, NODE_B);
        let mut b = Node::start(b, NODE_B, NODE_A);
        a.wait_rounds(1);
        b.wait_rounds(1);
        // Four flows deviating on A.
        let flows = deviating_flows(&a.engine, &spec, 4);
        assert_eq!(insert_batched(&a.engine.dp.flows_map().unwrap(), &flows).unwrap(), 4);
        let client = |k: &FlowKey| (addr::from_words(&k.src, k.family), u16::from_be(k.sport));
        // Flow 0: a connection of B's own (a client reusing the addresses and
        // ports), on Maglev's choice, up on B.
        let (k0, _) = flows[0];
        let (src0, sport0) = client(&k0);
        let own_backend = b.engine.predicted_backend(&spec, src0, sport0);
        assert_eq!(backend_of(&b.engine.run(&syn(src0, sport0, vip_addr, 80)).frame), own_backend);
        assert_eq!(backend_of(&b.engine.run(&frame(L4::Tcp, src0, sport0, vip_addr, 80)).frame), own_backend);
        let own = b.engine.dp.flow(&k0).unwrap();
        // Flow 1: a stale entry on B (its backend id now has another generation).
        let (k1, _) = flows[1];
        b.engine.dp.insert_flow(&k1, &FlowValue { generation: own.generation + 1000, ..own }).unwrap();
        // Flows 2 and 3: none on B.
        let addr_of = |e: &Engine, id: u32| e.dp.backend(id).unwrap().addr;
        let installed_as_on_a = |b: &Node, (k, v): &(FlowKey, FlowValue)| {
            b.engine
                .dp
                .flow(k)
                .is_some_and(|got| addr_of(&b.engine, got.backend_id) == addr_of(&a.engine, v.backend_id))
        };
        let kept = |b: &Node| b.status().records_rejected.get("local entry kept").copied().unwrap_or(0);
        a.sync.tables_changed(a.view.clone());
        a.wait_rounds(2);
        assert!(
            wait_until(WAIT, || b.status().records_received >= 4
                && flows[1..].iter().all(|f| installed_as_on_a(&b, f))),
            "{:?}",
            b.status()
        );
        assert_eq!(b.status().flows_installed, 3, "{:?}", b.status());
        assert_eq!(kept(&b), 1);
        assert_eq!(b.engine.dp.flow(&k0), Some(own), "B's own connection keeps its entry");
        let out = b.engine.run(&frame(L4::Tcp, src0, sport0, vip_addr, 80));
        assert_eq!((out.action, backend_of(&out.frame)), (XDP_TX, own_backend));
        assert!(installed_as_on_a(&b, &flows[1]), "the stale entry was replaced");

        // A moves flow 2 to yet another backend: B follows, as the entry is
        // one it installed from A. Flow 0 is still B's own.
        let (k2, v2) = flows[2];
        let (src2, sport2) = client(&k2);
        let chosen = a.engine.predicted_backend(&spec, src2, sport2);
        let was = a.engine.backend_index(&spec, v2.backend_id).unwrap();
        let next = (0..4).find(|&i| i != chosen && i != was).unwrap();
        let id = a.engine.reconciler.backend_id(&spec.key(), spec.backends[next].addr, 0).unwrap();
        let moved = (k2, FlowValue { backend_id: id, generation: a.engine.dp.backend(id).unwrap().generation, ..v2 });
        insert_batched(&a.engine.dp.flows_map().unwrap(), &[moved]).unwrap();
        a.sync.tables_changed(a.view.clone());
        a.wait_rounds(3);
        assert!(wait_until(WAIT, || installed_as_on_a(&b, &moved)), "{:?}", b.status());
        assert!(wait_until(WAIT, || kept(&b) == 2), "{:?}", b.status());
        assert_eq!(b.engine.dp.flow(&k0), Some(own));
    });
}

#[test]
fn own_datagrams_sent_back_copies_and_repeated_requests_are_not_answered() {
    in_namespace(|| {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let _in_runtime = rt.enter();
        let (a_addr, b_addr): (SocketAddr, SocketAddr) = (NODE_A.parse().unwrap(), NODE_B.parse().unwrap());
        // Node A is played here, on A's address.
        let a = UdpSocket::bind(a_addr).unwrap();
        a.set_read_timeout(Some(WAIT)).unwrap();
        let mut b = Engine::new();
        b.apply(&[service(4)]);
        let b = Node::start(b, NODE_B, NODE_A);
        let refused = |why: &str| b.status().datagrams_refused.get(why).copied().unwrap_or(0);

        // B asks A for its flows when it starts. Sent back to B, from A's
        // address: refused, it is addressed to A.
        let mut buf = [0u8; 2048];
        let (len, from) = a.recv_from(&mut buf).unwrap();
        assert_eq!(from, b_addr);
        let request = wire::parse(&buf[..len]).unwrap();
        assert_eq!((request.message, request.from, request.to), (Message::RequestFullSet, b_addr, a_addr));
        a.send_to(&buf[..len], b_addr).unwrap();
        assert!(wait_until(WAIT, || refused("not for this node") == 1), "{:?}", b.status());

        // A asks B: B answers (nothing deviates: an empty datagram)...
        let sealer = Sealer::new(KEY, a_addr, Arc::new(Session::new(7)));
        let ask = || sealer.request_full_set(b_addr, unix_ms());
        let first = ask();
        let asked = Instant::now();
        a.send_to(&first, b_addr).unwrap();
        assert!(wait_until(WAIT, || b.sync.rounds() == 1), "{:?}", b.status());
        let answer = loop {
            let (len, _) = a.recv_from(&mut buf).unwrap();
            let p = wire::parse(&buf[..len]).unwrap();
            if p.message != Message::RequestFullSet {
                break p;
            }
        };
        assert_eq!((answer.message, answer.from, answer.to), (Message::Flows(Vec::new()), b_addr, a_addr));
        // ...once: the same datagram again is refused...
        a.send_to(&first, b_addr).unwrap();
        assert!(wait_until(WAIT, || refused("replayed") == 1), "{:?}", b.status());
        // ...and new requests within the second are heard but not answered.
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(100));
            a.send_to(&ask(), b_addr).unwrap();
        }
        assert!(
            asked.elapsed() < Duration::from_millis(900),
            "took {:?}: the test is too slow to tell",
            asked.elapsed()
        );
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(b.sync.rounds(), 1, "{:?}", b.status());
        assert_eq!(b.status().datagrams_refused.values().sum::<u64>(), 2, "{:?}", b.status());
        // A second later, asked again: answered.
        std::thread::sleep(Duration::from_secs(1).saturating_sub(asked.elapsed()));
        a.send_to(&ask(), b_addr).unwrap();
        assert!(wait_until(WAIT, || b.sync.rounds() == 2), "{:?}", b.status());
    });
}
