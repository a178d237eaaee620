//! The policy (`decide`, `can_serve`) without BIRD, and the announcer
//! against a real BIRD 2 (Debian's bird2), each test starting its own in a
//! network namespace of its own (`unshare -n`: it dies with BIRD).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::*;
use crate::reconcile::{BackendSpec, Forwarding, HashMode};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn backend(addr: &str, weight: u32, healthy: bool) -> BackendSpec {
    BackendSpec { addr: ip(addr), port: 0, weight, mac: [2, 0, 0, 0, 0, 1], healthy }
}

fn vip(addr: &str, port: u16, backends: Vec<BackendSpec>) -> VipSpec {
    VipSpec {
        name: format!("{addr}:{port}"),
        addr: ip(addr),
        port,
        protocol: lb_common::maps::PROTO_TCP,
        forwarding: Forwarding::Dsr,
        hash: HashMode::FiveTuple,
        table_size: 65537,
        backends,
        pass_when_empty: false,
        icmp_echo: true,
    }
}

const SERVING: NodeState = NodeState { drained: false, warming: false, stopping: false };

/// Every VIP served by the dataplane.
fn all(_: &VipSpec) -> bool {
    true
}

fn decision(announce: bool, why: &'static str) -> Decision {
    Decision { announce, why }
}

#[test]
fn an_address_is_announced_when_a_vip_on_it_has_a_healthy_weighted_backend() {
    let specs = [
        vip("198.18.0.10", 80, vec![backend("198.18.1.1", 1, true)]),
        vip("198.18.0.11", 80, vec![backend("198.18.1.1", 1, false), backend("198.18.1.2", 0, true)]),
        vip("198.18.0.12", 80, vec![]),
        vip("2001:db8::10", 80, vec![backend("2001:db8:1::1", 3, true)]),
    ];
    let got = decide(&specs, SERVING, all);
    assert_eq!(
        got,
        BTreeMap::from([
            (ip("198.18.0.10"), decision(true, WHY_HEALTHY)),
            // Down, or up but drained (weight 0): neither serves new flows.
            (ip("198.18.0.11"), decision(false, WHY_NO_BACKEND)),
            (ip("198.18.0.12"), decision(false, WHY_NO_BACKEND)),
            (ip("2001:db8::10"), decision(true, WHY_HEALTHY)),
        ])
    );
}

#[test]
fn vips_sharing_an_address_make_one_decision_announced_if_any_serves() {
    let specs = [
        vip("198.18.0.10", 80, vec![backend("198.18.1.1", 1, false)]),
        vip("198.18.0.10", 443, vec![backend("198.18.1.1", 1, true)]),
        vip("198.18.0.11", 80, vec![backend("198.18.1.1", 1, false)]),
        vip("198.18.0.11", 443, vec![backend("198.18.1.2", 0, true)]),
    ];
    let got = decide(&specs, SERVING, all);
    assert_eq!(got.len(), 2);
    assert_eq!(got[&ip("198.18.0.10")], decision(true, WHY_HEALTHY));
    assert_eq!(got[&ip("198.18.0.11")], decision(false, WHY_NO_BACKEND));
}

#[test]
fn the_node_state_withdraws_everything_stopping_first_then_drained_then_warming() {
    let specs = [
        vip("198.18.0.10", 80, vec![backend("198.18.1.1", 1, true)]),
        vip("198.18.0.11", 80, vec![backend("198.18.1.1", 1, false)]),
    ];
    let every = |node: NodeState| -> BTreeSet<Decision> { decide(&specs, node, all).into_values().collect() };
    let state = |drained, warming, stopping| NodeState { drained, warming, stopping };
    assert_eq!(every(state(false, true, false)), BTreeSet::from([decision(false, WHY_WARMING)]));
    assert_eq!(every(state(true, true, false)), BTreeSet::from([decision(false, WHY_DRAINED)]));
    assert_eq!(every(state(true, false, false)), BTreeSet::from([decision(false, WHY_DRAINED)]));
    assert_eq!(every(state(true, true, true)), BTreeSet::from([decision(false, WHY_STOPPING)]));
    assert_eq!(every(state(false, false, true)), BTreeSet::from([decision(false, WHY_STOPPING)]));
    assert_eq!(decide(&specs, SERVING, all).len(), 2, "one decision per address, whatever the node state");
    assert!(decide(&[], state(true, true, true), all).is_empty());
}

#[test]
fn a_vip_the_dataplane_does_not_serve_counts_as_having_no_healthy_backend() {
    let specs = [
        vip("198.18.0.10", 80, vec![backend("198.18.1.1", 1, true)]),
        // Its apply failed (no room left in the maps): the dataplane passes
        // its traffic to the kernel, so its address must draw none.
        vip("198.18.0.11", 80, vec![backend("198.18.1.1", 1, true)]),
        // :80 not applied, :443 served: the address is announced for :443.
        vip("198.18.0.12", 80, vec![backend("198.18.1.1", 1, true)]),
        vip("198.18.0.12", 443, vec![backend("198.18.1.2", 1, true)]),
        // Served (an old table is still in place), but down in the specs.
        vip("198.18.0.13", 80, vec![backend("198.18.1.1", 1, false)]),
    ];
    let not_applied = |v: &VipSpec| v.addr == ip("198.18.0.11") || (v.addr == ip("198.18.0.12") && v.port == 80);
    let got = decide(&specs, SERVING, |v| !not_applied(v));
    assert_eq!(
        got,
        BTreeMap::from([
            (ip("198.18.0.10"), decision(true, WHY_HEALTHY)),
            (ip("198.18.0.11"), decision(false, WHY_NO_BACKEND)),
            (ip("198.18.0.12"), decision(true, WHY_HEALTHY)),
            (ip("198.18.0.13"), decision(false, WHY_NO_BACKEND)),
        ])
    );
    assert!(!can_serve(&decide(&specs[1..2], SERVING, |v| !not_applied(v)), false, false));
}

#[test]
fn two_announcers_of_one_routes_file_write_through_temporary_files_of_their_own() {
    // A retiring announcer and its successor may write at once.
    let path = PathBuf::from("/run/xdplb/lb0.bird.conf");
    let (a, b) = (RoutesFile::new(path.clone()), RoutesFile::new(path));
    let (ta, tb) = (a.temp_path().unwrap(), b.temp_path().unwrap());
    assert_ne!(ta, tb);
    for t in [ta, tb] {
        assert_eq!(t.parent(), Some(Path::new("/run/xdplb")));
        let name = t.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with(".lb0.bird.conf.") && name.ends_with(".tmp"), "{name}: `*.bird.conf` never matches");
    }
}

#[test]
fn the_node_can_serve_unless_drained_stopping_or_no_vip_address_would_be_announced() {
    let up = BTreeMap::from([
        (ip("198.18.0.10"), decision(true, WHY_HEALTHY)),
        (ip("198.18.0.11"), decision(false, WHY_NO_BACKEND)),
    ]);
    let down = BTreeMap::from([(ip("198.18.0.11"), decision(false, WHY_NO_BACKEND))]);
    let warming = BTreeMap::from([(ip("198.18.0.10"), decision(false, WHY_WARMING))]);
    assert!(can_serve(&up, false, false), "one address with a healthy backend is enough");
    assert!(can_serve(&BTreeMap::new(), false, false), "a node without VIPs is not at fault");
    assert!(!can_serve(&down, false, false));
    assert!(!can_serve(&warming, false, false), "not before the warm-up ends");
    assert!(!can_serve(&up, true, false));
    assert!(!can_serve(&up, false, true));
    assert!(!can_serve(&BTreeMap::new(), true, false));
}

#[test]
fn routes_go_to_state_dir_iface_bird_conf_by_default() {
    assert_eq!(default_routes_file(Path::new("/run/xdplb"), "eth0"), PathBuf::from("/run/xdplb/eth0.bird.conf"));
}

// ---- against a real BIRD ----

/// A directory removed when dropped (a failed test too).
struct Gone(PathBuf);

impl Drop for Gone {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

/// Waits for `f` to hold, polling every 100 ms, at most `limit`; panics
/// saying what was awaited and what `show` reports at the end.
async fn until(limit: Duration, what: &str, mut f: impl FnMut() -> bool, show: impl Fn() -> String) {
    let deadline = Instant::now() + limit;
    while !f() {
        if Instant::now() > deadline {
            panic!("waited {limit:?} for {what}; at the end:\n{}", show());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A BIRD of the test's own: a directory with its configuration, control
/// socket and routes directory, and the process in a new network namespace.
/// Dropped (a failed test too), BIRD is killed and the directory removed.
struct Bird {
    dir: PathBuf,
    child: Option<Child>,
}

impl Bird {
    /// A directory for a BIRD whose bird.conf includes `routes/*.bird.conf`
    /// (which matches nothing yet).
    fn new(tag: &str) -> Self {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("xdplb-announce-{tag}-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        std::fs::create_dir_all(dir.join("routes")).unwrap();
        for d in [dir.clone(), dir.join("routes")] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let bird = Bird { dir, child: None };
        bird.write_conf("");
        bird
    }

    /// bird.conf: a device protocol, a static protocol of the operator's own
    /// and the include; `extra` after them.
    fn write_conf(&self, extra: &str) {
        let conf = format!(
            "router id 198.18.0.1;\n\
             log \"{dir}/bird.log\" all;\n\
             protocol device {{}}\n\
             protocol static operators4 {{ ipv4; route 198.18.5.0/24 blackhole; }}\n\
             include \"{dir}/routes/*.bird.conf\";\n\
             {extra}",
            dir = self.dir.display()
        );
        std::fs::write(self.conf(), conf).unwrap();
        // BIRD reads it as user bird.
        std::fs::set_permissions(self.conf(), std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    }

    fn conf(&self) -> PathBuf {
        self.dir.join("bird.conf")
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("bird.ctl")
    }

    fn routes_file(&self) -> PathBuf {
        self.dir.join("routes/lb0.bird.conf")
    }

    fn settings(&self) -> BgpSettings {
        BgpSettings { bird_socket: self.socket(), ..Default::default() }
    }

    /// Starts BIRD in the foreground (so it stays our child), in a network
    /// namespace of its own, as Debian runs it: as user bird (its socket
    /// bird:bird 0660, the routes file read as bird). Waits for its socket.
    async fn start(&mut self) {
        assert!(self.child.is_none());
        std::fs::remove_file(self.socket()).ok();
        // BIRD opens its log as bird.
        std::fs::File::create(self.dir.join("bird.log")).unwrap();
        let chown = Command::new("chown").arg("bird:bird").arg(self.dir.join("bird.log")).status().unwrap();
        assert!(chown.success(), "the bird2 package's user bird exists");
        let child = Command::new("unshare")
            .arg("-n")
            .arg("bird")
            .arg("-f")
            .args(["-u", "bird", "-g", "bird"])
            .arg("-c")
            .arg(self.conf())
            .arg("-s")
            .arg(self.socket())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("bird.stderr")).unwrap())
            .spawn()
            .expect("bird2 is installed (/usr/sbin/bird)");
        self.child = Some(child);
        let sock = self.socket();
        let log = self.dir.clone();
        until(
            Duration::from_secs(10),
            "BIRD's control socket",
            || std::os::unix::net::UnixStream::connect(&sock).is_ok(),
            || std::fs::read_to_string(log.join("bird.stderr")).unwrap_or_default(),
        )
        .await;
        let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(self.socket()).unwrap());
        assert_ne!(owner, 0, "BIRD made its socket as user bird");
    }

    /// SIGSTOP: BIRD accepts connections (the socket's backlog) but answers
    /// nothing; SIGCONT: it answers them.
    fn pause(&self, paused: bool) {
        let pid = self.child.as_ref().expect("BIRD runs").id();
        let signal = if paused { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: kill(2) signals the BIRD this test started; no memory is involved.
        assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0);
    }

    /// How many times BIRD's log says it reconfigured.
    fn reconfigurations(&self) -> usize {
        std::fs::read_to_string(self.dir.join("bird.log")).unwrap_or_default().matches("<INFO> Reconfiguring").count()
    }

    /// Kills BIRD (SIGKILL: its socket file stays, refusing connections).
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }

    fn birdc(&self, command: &str) -> String {
        let out = Command::new("timeout")
            .args(["5", "birdc", "-s"])
            .arg(self.socket())
            .args(command.split(' '))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    /// The prefixes of `show route`.
    fn routes(&self) -> BTreeSet<String> {
        self.birdc("show route")
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|w| w.contains('/'))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        self.stop();
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

fn set(prefixes: &[&str]) -> BTreeSet<String> {
    prefixes.iter().map(|p| p.to_string()).collect()
}

fn route<'a>(s: &'a BgpStatus, prefix: &str) -> &'a RouteStatus {
    s.routes.iter().find(|r| r.prefix == prefix).unwrap_or_else(|| panic!("no route {prefix} in {s:?}"))
}

const OPERATORS: &str = "198.18.5.0/24";
const V4: &str = "198.18.0.10/32";
const V6: &str = "2001:db8::10/128";

fn both(v4: Decision, v6: Decision) -> BTreeMap<IpAddr, Decision> {
    BTreeMap::from([(ip("198.18.0.10"), v4), (ip("2001:db8::10"), v6)])
}

/// `show protocols` lines of the protocols that are not xdplb's: name,
/// state and since (a restart would change it).
fn others(bird: &Bird) -> Vec<String> {
    bird.birdc("show protocols")
        .lines()
        .filter(|l| l.starts_with("device1") || l.starts_with("operators4"))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bird_announces_and_withdraws_what_the_announcer_wants() {
    use std::os::unix::fs::PermissionsExt as _;
    let mut bird = Bird::new("routes");
    // No routes file yet: the include matches nothing, and BIRD starts.
    bird.start().await;
    assert_eq!(bird.routes(), set(&[OPERATORS]));
    let before = others(&bird);
    assert_eq!(before.len(), 2, "{before:?}");

    let up = decision(true, WHY_HEALTHY);
    let a = Announcer::start(&bird.settings(), bird.routes_file(), both(up, up));
    until(
        Duration::from_secs(10),
        "both routes in BIRD",
        || bird.routes() == set(&[OPERATORS, V4, V6]),
        || format!("{}\n{:?}", bird.birdc("show route"), a.status()),
    )
    .await;
    until(
        Duration::from_secs(5),
        "the status to say so",
        || a.status().routes.iter().all(|r| r.announced),
        || format!("{:?}", a.status()),
    )
    .await;
    let s = a.status();
    assert_eq!(s.bird_error, "");
    assert!(s.configured_unix_ms > 0);
    assert_eq!(s.configure_failures, 0);
    assert_eq!(route(&s, V4).why, WHY_HEALTHY);
    assert_eq!(s.routes_file, bird.routes_file().display().to_string());
    let mode = std::fs::metadata(bird.routes_file()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644, "BIRD runs as user bird and must read it");
    assert_eq!(others(&bird), before, "configure restarted none of the operator's protocols");

    a.want(both(decision(false, WHY_NO_BACKEND), up));
    until(
        Duration::from_secs(10),
        "the v4 route withdrawn",
        || bird.routes() == set(&[OPERATORS, V6]),
        || bird.birdc("show route"),
    )
    .await;
    until(
        Duration::from_secs(5),
        "the status to say so",
        || !route(&a.status(), V4).announced,
        || format!("{:?}", a.status()),
    )
    .await;
    let s = a.status();
    assert_eq!(route(&s, V4).why, WHY_NO_BACKEND);
    assert!(route(&s, V4).since_unix_ms >= route(&s, V6).since_unix_ms);
    assert!(route(&s, V6).announced);

    a.withdraw_all(Duration::from_secs(5)).await.unwrap();
    assert_eq!(bird.routes(), set(&[OPERATORS]), "withdraw_all returns once BIRD took it");
    let s = a.status();
    assert!(s.routes.iter().all(|r| !r.announced && r.why == WHY_STOPPING), "{s:?}");
    a.want(both(up, up));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(bird.routes(), set(&[OPERATORS]), "nothing is announced after withdraw_all");
    assert_eq!(others(&bird), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bird_that_is_down_is_retried_every_second_until_it_takes_the_routes() {
    let mut bird = Bird::new("retry");
    bird.start().await;
    let up = decision(true, WHY_HEALTHY);
    let a = Announcer::start(&bird.settings(), bird.routes_file(), both(up, decision(false, WHY_NO_BACKEND)));
    until(
        Duration::from_secs(10),
        "the v4 route",
        || bird.routes() == set(&[OPERATORS, V4]),
        || bird.birdc("show route"),
    )
    .await;

    bird.stop();
    a.want(both(up, up));
    until(
        Duration::from_secs(10),
        "two failures in a row",
        || a.status().configure_failures >= 2,
        || format!("{:?}", a.status()),
    )
    .await;
    let s = a.status();
    assert!(
        s.bird_error.starts_with(&format!("cannot reach BIRD at {}: connection refused", bird.socket().display())),
        "{}",
        s.bird_error
    );
    assert!(s.bird_error.ends_with("(is BIRD running? systemctl start bird)"), "{}", s.bird_error);
    assert!(route(&s, V4).announced, "BIRD took it before it went");
    assert!(!route(&s, V6).announced, "BIRD never took it");
    assert_eq!(route(&s, V6).why, WHY_HEALTHY, "the why is what the daemon wants");

    bird.start().await;
    // BIRD read the file at its start; the status follows once the retry's configure succeeds.
    until(
        Duration::from_secs(10),
        "the retry to succeed",
        || a.status().bird_error.is_empty(),
        || format!("{:?}", a.status()),
    )
    .await;
    let s = a.status();
    assert!(route(&s, V6).announced, "{s:?}");
    assert_eq!(bird.routes(), set(&[OPERATORS, V4, V6]));

    // Someone removes the routes file: it is written again (checked every
    // 10 s), however often the daemon says something new meanwhile (here a
    // why that changes no route, every 300 ms).
    std::fs::remove_file(bird.routes_file()).unwrap();
    let wishing = async {
        for i in 0.. {
            let why = if i % 2 == 0 { WHY_DRAINED } else { WHY_NO_BACKEND };
            let mut wish = both(up, up);
            wish.insert(ip("198.18.0.11"), decision(false, why));
            a.want(wish);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    tokio::select! {
        () = until(
            Duration::from_secs(15),
            "the routes file written again",
            || bird.routes_file().exists(),
            || format!("{:?}", a.status()),
        ) => {}
        () = wishing => unreachable!(),
    }
    assert_eq!(bird.routes(), set(&[OPERATORS, V4, V6]));
    assert_eq!(a.status().bird_error, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_announcer_withdraws_its_routes_before_its_successor_writes() {
    let mut bird = Bird::new("retire");
    bird.start().await;
    let up = decision(true, WHY_HEALTHY);
    let a = Announcer::start(&bird.settings(), bird.routes_file(), both(up, up));
    until(
        Duration::from_secs(10),
        "both routes in BIRD",
        || bird.routes() == set(&[OPERATORS, V4, V6]),
        || format!("{}\n{:?}", bird.birdc("show route"), a.status()),
    )
    .await;

    // routes_file changes at a reload: the old announcer withdraws and
    // removes its file, and only then does the new one write its own (the
    // include `routes/*.bird.conf` would find both protocols twice).
    let moved = bird.dir.join("routes/lb0-moved.bird.conf");
    let retiring = a.retire(true, Duration::from_secs(5));
    let v4 = BTreeMap::from([(ip("198.18.0.10"), up)]);
    let b = Announcer::start_after(retiring.clone(), &bird.settings(), moved.clone(), v4);
    tokio::time::timeout(Duration::from_secs(6), retiring.done()).await.expect("retired within its limit");
    assert!(!bird.routes_file().exists(), "the old routes file is removed");
    until(
        Duration::from_secs(10),
        "the new announcer's route",
        || bird.routes() == set(&[OPERATORS, V4]) && b.status().routes.iter().all(|r| r.announced),
        || format!("{}\n{:?}", bird.birdc("show route"), b.status()),
    )
    .await;
    let s = b.status();
    assert_eq!(
        (s.configure_failures, s.bird_error.as_str()),
        (0, ""),
        "BIRD never saw two files defining the protocols"
    );
    assert!(std::fs::read_to_string(&moved).unwrap().contains("route 198.18.0.10/32 blackhole;"));

    // `bgp:` removed at a reload: the routes go, the file stays, empty
    // (bird.conf may include it by name).
    let retired = b.retire(false, Duration::from_secs(5));
    tokio::time::timeout(Duration::from_secs(6), retired.done()).await.expect("retired within its limit");
    assert_eq!(bird.routes(), set(&[OPERATORS]), "retired: BIRD took the withdrawal");
    assert!(!std::fs::read_to_string(&moved).unwrap().contains("route"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawal_while_bird_hangs_leaves_a_routes_file_that_withdraws() {
    let mut bird = Bird::new("hung");
    bird.start().await;
    let up = decision(true, WHY_HEALTHY);
    let a = Announcer::start(&bird.settings(), bird.routes_file(), both(up, up));
    until(
        Duration::from_secs(10),
        "both routes taken",
        || bird.routes() == set(&[OPERATORS, V4, V6]) && a.status().routes.iter().all(|r| r.announced),
        || format!("{}\n{:?}", bird.birdc("show route"), a.status()),
    )
    .await;

    // BIRD stops answering while a change is on its way: `configure` waits
    // for a greeting that does not come (5 s per step).
    bird.pause(true);
    let reconfigured = bird.reconfigurations();
    a.want(both(up, decision(false, WHY_NO_BACKEND)));
    let file = bird.routes_file();
    until(
        Duration::from_secs(5),
        "the change written",
        || !std::fs::read_to_string(&file).unwrap().contains(V6),
        || std::fs::read_to_string(&file).unwrap(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = Instant::now();
    let err = a.withdraw_all(Duration::from_secs(1)).await.unwrap_err().to_string();
    assert!(started.elapsed() < Duration::from_millis(1500), "{:?}", started.elapsed());
    assert!(err.contains("BIRD has not taken the withdrawal") && err.contains("announces nothing now"), "{err}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains("route"), "whatever BIRD reads next withdraws:\n{text}");

    bird.pause(false);
    until(
        Duration::from_secs(15),
        "BIRD to take the withdrawal once it answers",
        || bird.routes() == set(&[OPERATORS]) && a.status().bird_error.is_empty(),
        || format!("{}\n{:?}", bird.birdc("show route"), a.status()),
    )
    .await;
    // The attempt the withdrawal overtook was abandoned: BIRD read the
    // configuration once, not once for it and again for the withdrawal.
    assert_eq!(bird.reconfigurations() - reconfigured, 1);
    assert!(a.status().routes.iter().all(|r| !r.announced && r.why == WHY_STOPPING));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_announcer_with_nothing_to_announce_withdraws_what_a_killed_one_left() {
    let mut bird = Bird::new("leftover");
    // A killed predecessor's routes file: BIRD announces it from its start.
    let up = decision(true, WHY_HEALTHY);
    std::fs::write(bird.routes_file(), bird::routes_file_text(&both(up, up))).unwrap();
    std::fs::set_permissions(bird.routes_file(), std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    bird.start().await;
    until(
        Duration::from_secs(10),
        "the leftover routes",
        || bird.routes() == set(&[OPERATORS, V4, V6]),
        || bird.birdc("show route"),
    )
    .await;

    let a = Announcer::start(&bird.settings(), bird.routes_file(), BTreeMap::new());
    // What `xdplb drain` waits for: BIRD took a real wish, the first.
    let s = a.taken_later().wait(Duration::from_secs(10)).await.unwrap();
    assert!(s.configured_unix_ms > 0 && s.bird_error.is_empty(), "{s:?}");
    assert_eq!(bird.routes(), set(&[OPERATORS]), "taken: the leftover routes are gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_in_bird_conf_is_reported_with_its_file_and_line_and_retried() {
    let mut bird = Bird::new("syntax");
    bird.start().await;
    // Line 6 of bird.conf, after the include.
    bird.write_conf("protocol nonsense {}\n");
    let a = Announcer::start(
        &bird.settings(),
        bird.routes_file(),
        both(decision(true, WHY_HEALTHY), decision(true, WHY_HEALTHY)),
    );
    until(
        Duration::from_secs(10),
        "BIRD's refusal",
        || !a.status().bird_error.is_empty(),
        || format!("{:?}", a.status()),
    )
    .await;
    let s = a.status();
    let conf = bird.conf().display().to_string();
    assert!(s.bird_error.starts_with(&format!("BIRD refused the new routes: {conf}:6:")), "{}", s.bird_error);
    assert!(
        s.bird_error.ends_with(&format!(
            "(the routes file {} stays; fix bird.conf, xdplb retries every second)",
            bird.routes_file().display()
        )),
        "{}",
        s.bird_error
    );
    assert!(s.configure_failures >= 1);
    assert!(s.routes.iter().all(|r| !r.announced));
    assert_eq!(bird.routes(), set(&[OPERATORS]), "BIRD keeps its running configuration");
    let err = a.withdraw_all(Duration::from_millis(1500)).await.unwrap_err().to_string();
    assert!(err.contains("BIRD has not taken the withdrawal") && err.contains(&conf), "{err}");

    let b = Announcer::start(
        &bird.settings(),
        bird.routes_file(),
        both(decision(true, WHY_HEALTHY), decision(true, WHY_HEALTHY)),
    );
    drop(a);
    bird.write_conf("");
    until(
        Duration::from_secs(10),
        "the routes once bird.conf is fixed",
        || bird.routes() == set(&[OPERATORS, V4, V6]),
        || format!("{}\n{:?}", bird.birdc("show route"), b.status()),
    )
    .await;
}

#[tokio::test]
async fn without_bird_the_error_says_to_start_it_and_withdraw_all_gives_up_in_time() {
    let dir = std::env::temp_dir().join(format!("xdplb-announce-nobird-{}", std::process::id()));
    let _gone = Gone(dir.clone());
    let settings = BgpSettings { bird_socket: dir.join("bird.ctl"), ..Default::default() };
    // The directory does not exist yet: the announcer makes it.
    let a = Announcer::start(
        &settings,
        dir.join("lb0.bird.conf"),
        BTreeMap::from([(ip("198.18.0.10"), decision(true, WHY_HEALTHY))]),
    );
    until(Duration::from_secs(5), "the error", || !a.status().bird_error.is_empty(), || format!("{:?}", a.status()))
        .await;
    assert_eq!(
        a.status().bird_error,
        format!(
            "cannot reach BIRD at {}: No such file or directory (is BIRD running? systemctl start bird)",
            settings.bird_socket.display()
        )
    );
    assert!(std::fs::read_to_string(dir.join("lb0.bird.conf")).unwrap().contains("route 198.18.0.10/32 blackhole;"));
    let started = Instant::now();
    let mut withdrawal = std::pin::pin!(a.withdraw_all(Duration::from_millis(300)));
    // Polled once, before the announcer's task could run (one thread): the
    // routes file announces nothing already, whatever BIRD does next.
    let first =
        std::future::Future::poll(withdrawal.as_mut(), &mut std::task::Context::from_waker(std::task::Waker::noop()));
    assert!(first.is_pending());
    assert!(!std::fs::read_to_string(dir.join("lb0.bird.conf")).unwrap().contains("route"));
    let err = withdrawal.await.unwrap_err().to_string();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(err.contains("No such file or directory") && err.contains("announces nothing now"), "{err}");
    assert!(!std::fs::read_to_string(dir.join("lb0.bird.conf")).unwrap().contains("route"));
}

/// Documents BIRD 2.0.12's include: a pattern that matches no file is
/// accepted when its directory exists, refused when the directory is missing
/// (as /run/xdplb is after a reboot until xdplb starts), and accepted again
/// when the directory part is a pattern too.
#[test]
fn birds_include_needs_the_directory_unless_it_is_a_pattern_too() {
    let dir = std::env::temp_dir().join(format!("xdplb-announce-include-{}", std::process::id()));
    let _gone = Gone(dir.clone());
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    let parses = |include: &str| {
        let conf = dir.join("bird.conf");
        std::fs::write(&conf, format!("router id 198.18.0.1;\nprotocol device {{}}\ninclude \"{include}\";\n"))
            .unwrap();
        let out = Command::new("bird").arg("-p").arg("-c").arg(&conf).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let d = dir.display();
    assert!(parses(&format!("{d}/empty/*.bird.conf")).0, "an existing directory with no match");
    let (ok, err) = parses(&format!("{d}/missing/*.bird.conf"));
    assert!(!ok && err.contains("Unable to match pattern"), "{err}");
    assert!(parses(&format!("{d}/missin[g]/*.bird.conf")).0, "a pattern that matches no directory");
}
