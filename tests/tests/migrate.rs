//! Upgrading over a dataplane of map layout version 1 (the layout before the
//! flood-resistant flow table): `xdplb run` migrates it in place, keeps every
//! flow and VIP, and traffic never stops.
//!
//! The version-1 dataplane is made from a running one, as a build of that
//! version would have left it: the four maps whose definition changed (VIPS,
//! BACKENDS, CONFIG, REASONS) are replaced by maps of their version-1
//! definition holding the same contents in the version-1 layout, and the
//! layout version is set to 1. The attached program keeps forwarding
//! meanwhile, as an old program would.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use lb_common::maps::{
    BPF_F_NO_PREALLOC, Backend, BackendSlot, FlowKey, FlowValue, LbConfig, MAPS_ABI, VipKey, VipMeta, names,
};
use lb_userspace::{migrate, pins};
use tests::topology::{self, Cluster, ClusterSpec, Servers, VIP4};

const WAIT: Duration = Duration::from_secs(30);

fn open(path: &Path) -> MapData {
    MapData::from_pin(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Replaces the map pinned at DIR/NAME by one of its version-1 definition,
/// filled by `fill`.
fn replace_with_v1(dir: &Path, name: &str, fill: impl FnOnce(MapData)) {
    let path = dir.join(name);
    let def = migrate::v1_def(name, pins::map_def(&path).unwrap());
    let staged = dir.join(format!("staged_{name}"));
    drop(pins::create_pinned(&staged, &def, name).unwrap());
    fill(open(&staged));
    std::fs::rename(&staged, &path).unwrap();
}

/// Turns the dataplane pinned in `dir` into what a version-1 build leaves.
fn downgrade_to_v1(dir: &Path) {
    let vips: Vec<(VipKey, VipMeta)> =
        HashMap::<_, VipKey, VipMeta>::try_from(Map::HashMap(open(&dir.join(names::VIPS))))
            .unwrap()
            .iter()
            .map(Result::unwrap)
            .collect();
    replace_with_v1(dir, names::VIPS, |m| {
        let mut m: HashMap<_, VipKey, VipMeta> = HashMap::try_from(Map::HashMap(m)).unwrap();
        for (k, v) in &vips {
            m.insert(k, v, 0).unwrap();
        }
    });
    let slots: Array<_, BackendSlot> = Array::try_from(Map::Array(open(&dir.join(names::BACKENDS)))).unwrap();
    let backends: Vec<(u32, Backend)> = (0..slots.len())
        .map(|i| (i, *slots.get(&i, 0).unwrap().current()))
        .filter(|(_, b)| *b != Backend::default())
        .collect();
    assert!(!backends.is_empty());
    replace_with_v1(dir, names::BACKENDS, |m| {
        let mut m: Array<_, Backend> = Array::try_from(Map::Array(m)).unwrap();
        for (i, b) in &backends {
            m.set(*i, b, 0).unwrap();
        }
    });
    let cfg: Array<_, LbConfig> = Array::try_from(Map::Array(open(&dir.join(names::CONFIG)))).unwrap();
    let cfg = cfg.get(&0, 0).unwrap();
    replace_with_v1(dir, names::CONFIG, |m| {
        // SAFETY: LbConfig is #[repr(C)], integers only; its first 56 bytes are version 1's whole entry.
        let bytes: [u8; 56] = unsafe { *(&cfg as *const LbConfig as *const [u8; 56]) };
        Array::<_, [u8; 56]>::try_from(Map::Array(m)).unwrap().set(0, bytes, 0).unwrap();
    });
    let reasons: PerCpuArray<_, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(open(&dir.join(names::REASONS)))).unwrap();
    let counts: Vec<_> = (0..19).map(|i| reasons.get(&i, 0).unwrap()).collect();
    replace_with_v1(dir, names::REASONS, |m| {
        let mut m: PerCpuArray<_, u64> = PerCpuArray::try_from(Map::PerCpuArray(m)).unwrap();
        for (i, c) in counts.into_iter().enumerate() {
            m.set(i as u32, c, 0).unwrap();
        }
    });
    pins::write_abi_version(dir, 1).unwrap();
}

fn flows(dir: &Path) -> Vec<(FlowKey, FlowValue)> {
    let m: HashMap<_, FlowKey, FlowValue> = HashMap::try_from(Map::LruHashMap(open(&dir.join(names::FLOWS)))).unwrap();
    let mut v: Vec<_> = m.iter().map(Result::unwrap).collect();
    v.sort_by_key(|(k, _)| *k);
    v
}

fn tx_count(dir: &Path) -> u64 {
    let m: PerCpuArray<_, u64> = PerCpuArray::try_from(Map::PerCpuArray(open(&dir.join(names::REASONS)))).unwrap();
    m.get(&lb_common::reasons::TX, 0).unwrap().iter().sum()
}

/// Two backends behind a DSR VIP; a controller served requests and was
/// killed, leaving its dataplane pinned and forwarding.
fn orphaned_dataplane() -> (Cluster, std::path::PathBuf) {
    let c =
        Cluster::new(ClusterSpec { backends: 2, servers: Servers::Builtin, bin_dir: topology::bin_dir(), nat: None });
    c.start_server(0, 80);
    c.start_server(1, 80);
    let yaml = format!(
        "interface: lb0\nvips:\n  - name: web4\n    address: {VIP4}\n    port: 80\n    forwarding: dsr\n    backends:\n      \
         - address: {}\n      - address: {}\n    health_check: {{type: tcp, interval: 200ms, timeout: 150ms, rise: 1, \
         fall: 2}}\n",
        c.backend4(0),
        c.backend4(1)
    );
    let config = c.write_config("xdplb.yaml", &yaml);
    c.start_xdplb("v2", &config, &[]);
    c.wait_backend_states("web4", &["active", "active"], WAIT);
    let target = topology::target(VIP4, 80);
    assert_eq!(c.requests(target, 20).len(), 20);
    c.kill("v2");
    (c, config)
}

#[test]
fn a_version_1_dataplane_is_migrated_in_place_keeping_flows_and_traffic() {
    let (c, config) = orphaned_dataplane();
    let target = topology::target(VIP4, 80);
    let dir = c.pin_root.join("lb0");
    downgrade_to_v1(&dir);
    let flows_before = flows(&dir);
    assert!(!flows_before.is_empty(), "the requests left tracked flows");
    let flows_id = open(&dir.join(names::FLOWS)).info().unwrap().id();
    let tx_before = tx_count(&dir);
    // Read-only commands do not touch a version-1 dataplane: they say how to migrate it.
    let out = c.xdplb_in(&c.lb, &["status", "--iface", "lb0"]).output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("migrates it in place"), "{said}");

    // Requests all along: the old program serves until the new one replaces it.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let traffic = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        c.client.spawn(move || {
            for _ in 0..3000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match topology::http_get(target, "/", Duration::from_secs(2)) {
                    Ok((200, _)) => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    c.start_xdplb("v2-again", &config, &[]);
    let migrated = topology::wait_until(WAIT, || c.log("v2-again").contains("migrated the pinned dataplane"));
    assert!(migrated, "{}", c.log("v2-again"));
    c.wait_backend_states("web4", &["active", "active"], WAIT);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("during the migration: {ok} requests served, {failed} failed");
    assert!(ok > 20, "{ok} requests");
    assert_eq!(failed, 0, "requests failed during the migration");

    // This build's layout, the same flow table (the very map), the counters carried over.
    let log = c.log("v2-again");
    assert!(log.contains("adopting the running dataplane"), "{log}");
    assert!(pins::verify(&dir, "lb0").unwrap() == pins::Pinned::Dataplane, "{log}");
    assert_eq!(pins::map_def(&dir.join(names::VIPS)).unwrap().flags & BPF_F_NO_PREALLOC, BPF_F_NO_PREALLOC);
    assert_eq!(pins::map_def(&dir.join(names::BACKENDS)).unwrap().value_size as usize, size_of::<BackendSlot>());
    assert_eq!(open(&dir.join(names::FLOWS)).info().unwrap().id(), flows_id, "FLOWS is the same map");
    let after = flows(&dir);
    for (k, v) in &flows_before {
        let kept = after.iter().find(|(a, _)| a == k).map(|(_, b)| (b.backend_id, b.generation, b.hash));
        assert_eq!(kept, Some((v.backend_id, v.generation, v.hash)), "flow {k:?} kept its backend");
    }
    assert!(tx_count(&dir) >= tx_before + ok as u64 / 2, "the tx counter went on from version 1's");
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("v1_") || n.contains("staged"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(log.contains("layout version 1") && MAPS_ABI == 2, "{log}");
}

/// A migration cut short (here: VIPS already set aside and made anew,
/// empty, the version still 1) is done again from the set-aside map.
#[test]
fn a_migration_cut_short_is_done_again() {
    let (c, config) = orphaned_dataplane();
    let dir = c.pin_root.join("lb0");
    downgrade_to_v1(&dir);
    std::fs::rename(dir.join(names::VIPS), migrate::aside(&dir, names::VIPS)).unwrap();
    let def = pins::map_def(&migrate::aside(&dir, names::VIPS)).unwrap();
    drop(
        pins::create_pinned(&dir.join(names::VIPS), &pins::MapDef { flags: BPF_F_NO_PREALLOC, ..def }, "VIPS").unwrap(),
    );
    c.start_xdplb("again", &config, &[]);
    let migrated = topology::wait_until(WAIT, || c.log("again").contains("migrated the pinned dataplane"));
    assert!(migrated, "{}", c.log("again"));
    c.wait_backend_states("web4", &["active", "active"], WAIT);
    assert_eq!(c.requests(topology::target(VIP4, 80), 10).len(), 10);
    let vips: HashMap<_, VipKey, VipMeta> = HashMap::try_from(Map::HashMap(open(&dir.join(names::VIPS)))).unwrap();
    assert_eq!(vips.iter().count(), 1, "the VIP came over from the set-aside map");
    assert!(!migrate::aside(&dir, names::VIPS).exists());
}
