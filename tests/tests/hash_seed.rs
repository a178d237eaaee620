//! The flow hash seed end to end, with `xdplb run` as an operator starts it:
//! random at a new dataplane's first start and kept across restarts (it is
//! pinned in CONFIG); taken from `hash_seed_file` at a reload; kept when a
//! later reload drops the file.

use std::{os::unix::fs::PermissionsExt as _, path::Path, time::Duration};

use aya::maps::{Array, Map, MapData};
use lb_common::maps::{LbConfig, names};
use tests::topology::{self, Cluster, ClusterSpec, Servers, VIP4};

const WAIT: Duration = Duration::from_secs(30);

fn seed(c: &Cluster) -> [u32; 2] {
    let data = MapData::from_pin(c.pin_root.join("lb0").join(names::CONFIG)).unwrap();
    let cfg: Array<_, LbConfig> = Array::try_from(Map::Array(data)).unwrap();
    cfg.get(&0, 0).unwrap().hash_seed
}

fn config(c: &Cluster, seed_file: Option<&Path>) -> std::path::PathBuf {
    let seed = seed_file.map_or(String::new(), |p| format!("hash_seed_file: {}\n", p.display()));
    let yaml = format!(
        "interface: lb0\n{seed}vips:\n  - name: web4\n    address: {VIP4}\n    port: 80\n    forwarding: dsr\n    \
         backends:\n      - address: {}\n    health_check: {{type: tcp, interval: 200ms, timeout: 150ms, rise: 1, \
         fall: 2}}\n",
        c.backend4(0)
    );
    c.write_config("xdplb.yaml", &yaml)
}

fn reload(c: &Cluster) {
    let out = c.xdplb_in(&c.lb, &["reload"]).output().unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_seed_is_random_kept_across_restarts_and_follows_hash_seed_file() {
    let c =
        Cluster::new(ClusterSpec { backends: 1, servers: Servers::Builtin, bin_dir: topology::bin_dir(), nat: None });
    c.start_server(0, 80);
    let path = config(&c, None);
    c.start_xdplb("first", &path, &[]);
    c.wait_backend_states("web4", &["active"], WAIT);
    let random = seed(&c);
    assert_ne!(random, [0, 0], "a new dataplane gets a random seed");
    assert!(c.log("first").contains("flow hash seed: this dataplane's own"), "{}", c.log("first"));

    // A restart adopts the dataplane, and its seed with it.
    c.kill("first");
    c.start_xdplb("second", &path, &[]);
    assert!(topology::wait_until(WAIT, || c.log("second").contains("adopting the running dataplane")));
    c.wait_backend_states("web4", &["active"], WAIT);
    assert_eq!(seed(&c), random, "kept across the restart");
    assert_eq!(c.requests(topology::target(VIP4, 80), 5).len(), 5);

    // A reload that names a seed file: the seed derived from it, as on every node with the same file.
    let file = c.dir.join("hash-seed.key");
    std::fs::write(&file, "a hash seed of thirty-two chars\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    config(&c, Some(&file));
    reload(&c);
    let derived = lb_userspace::hash_seed::derive(b"a hash seed of thirty-two chars");
    assert!(topology::wait_until(WAIT, || seed(&c) == derived), "seed {:x?}, want {derived:x?}", seed(&c));
    assert_eq!(c.requests(topology::target(VIP4, 80), 5).len(), 5);

    // A reload that drops the file keeps the seed the dataplane has.
    config(&c, None);
    reload(&c);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(seed(&c), derived, "no configured seed: the dataplane's stays");
}
