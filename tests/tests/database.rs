//! A replicated database tier behind xdplb, exactly as examples/database.yaml
//! configures it: MariaDB from Debian's packages, a primary on b1 and a
//! replica on b2, a write VIP whose exec check passes only on the writable
//! server and a read VIP over the replica with the primary as sorry server.
//! Real `mariadb` clients in the client namespace, real replication, a real
//! crash and promotion.

use std::{
    net::{Ipv4Addr, TcpListener},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use tests::{
    mariadb::{self, Client, Server},
    topology::{self, CLIENT4, Cluster, ClusterSpec, LB4, Servers, VIP4, VIP4_2, backend_states, backend4},
};

const EXAMPLE: &str = include_str!("../../examples/database.yaml");
const WAIT: Duration = Duration::from_secs(30);
const WRITE_VIP: &str = "db-write";
const READ_VIP: &str = "db-read";
const APP_PASSWORD: &str = "app-secret";
const QUERY: Duration = Duration::from_secs(5);
/// How long one write attempt of the failover may take while no writable
/// server is known: a connection whose SYN the balancer drops is given up
/// after this. Once the status shows the new primary, attempts get QUERY, so
/// a slow machine (a client process taking longer than this) cannot fail the test.
const ATTEMPT: Duration = Duration::from_millis(250);
/// The pause between two write attempts.
const PAUSE: Duration = Duration::from_millis(50);

/// The same accounts on every server, created before replication starts.
fn users() -> Vec<String> {
    vec![
        "CREATE USER 'repl'@'198.18.0.%' IDENTIFIED BY 'repl-secret'".into(),
        "GRANT REPLICATION SLAVE ON *.* TO 'repl'@'198.18.0.%'".into(),
        // The balancer's checks: no privileges, no password, only from the balancer.
        format!("CREATE USER 'monitor'@'{LB4}'"),
        format!("CREATE USER 'app'@'{CLIENT4}' IDENTIFIED BY '{APP_PASSWORD}'"),
        format!("GRANT ALL ON appdb.* TO 'app'@'{CLIENT4}'"),
    ]
}

/// Backend `i` of VIP `vip` in a status document.
fn backend<'s>(s: &'s serde_json::Value, vip: &str, i: usize) -> &'s serde_json::Value {
    let vips = s["vips"].as_array().expect("a status lists VIPs");
    &vips.iter().find(|v| v["name"] == vip).unwrap_or_else(|| panic!("no VIP {vip} in {s}"))["backends"][i]
}

/// Waits until `client` answers `sql` with `want`; panics with the last answer.
fn wait_answer(client: &Client, sql: &str, want: &str) {
    let start = Instant::now();
    loop {
        let got = client.query(sql, QUERY);
        if got.as_deref() == Ok(want) {
            return;
        }
        if start.elapsed() > WAIT {
            panic!("{client:?}: `{sql}` still answers {got:?}, not {want:?}, after {WAIT:?}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// One write attempt: when it started and ended, and the server id that
/// took it (or why not).
#[derive(Clone, Debug)]
struct Attempt {
    started: Instant,
    ended: Instant,
    result: Result<String, String>,
}

/// Writes through a VIP in a loop, each on a new connection, until one
/// succeeds (or it is stopped, or 60 s or 2000 attempts pass).
struct WriteAttempts {
    stop: Arc<AtomicBool>,
    /// Set once the status shows a writable backend: attempts get QUERY from then on.
    switched: Arc<AtomicBool>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    handle: Option<thread::JoinHandle<()>>,
}

impl WriteAttempts {
    fn start(client: Client) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let switched = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let (st, sw, at) = (stop.clone(), switched.clone(), attempts.clone());
        let handle = thread::spawn(move || {
            let begin = Instant::now();
            for n in 0..2000 {
                if st.load(Ordering::Relaxed) || begin.elapsed() > Duration::from_secs(60) {
                    break;
                }
                let sql = format!("INSERT INTO appdb.kv VALUES ('failover-{n}', 'x'); SELECT @@server_id");
                let started = Instant::now();
                let result = client.query(&sql, if sw.load(Ordering::Relaxed) { QUERY } else { ATTEMPT });
                let ok = result.is_ok();
                at.lock().unwrap().push(Attempt { started, ended: Instant::now(), result });
                if ok {
                    break;
                }
                thread::sleep(PAUSE);
            }
        });
        Self { stop, switched, attempts, handle: Some(handle) }
    }

    /// The status shows a writable backend: from now on, attempts are not cut short.
    fn switched(&self) {
        self.switched.store(true, Ordering::Relaxed);
    }

    /// Waits for the loop to end (it ends at its first success).
    fn finish(mut self, timeout: Duration) -> Vec<Attempt> {
        let start = Instant::now();
        while !self.handle.as_ref().unwrap().is_finished() && start.elapsed() < timeout {
            thread::sleep(Duration::from_millis(20));
        }
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap();
        self.attempts.lock().unwrap().clone()
    }
}

impl Drop for WriteAttempts {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[test]
fn the_write_vip_follows_the_primary_and_reads_fall_back_to_it() {
    // The example and this cluster must agree on every address.
    for a in [VIP4.to_string(), VIP4_2.to_string(), backend4(0).to_string(), backend4(1).to_string()] {
        let has =
            EXAMPLE.lines().any(|l| l.split('#').next().unwrap_or("").trim_end().ends_with(&format!("address: {a}")));
        assert!(has, "examples/database.yaml has no address {a}");
    }
    let c =
        Cluster::new(ClusterSpec { backends: 2, servers: Servers::Builtin, bin_dir: topology::bin_dir(), nat: None });
    let primary = Server::install(&c, 0, 1);
    let replica = Server::install(&c, 1, 2);
    primary.start();
    replica.start();
    let users = users();
    let users: Vec<&str> = users.iter().map(String::as_str).collect();
    primary.create_users(&users);
    replica.create_users(&users);
    primary.make_writable();
    replica.replicate_from(&primary, "repl", "repl-secret");
    // The schema goes through the binary log: the replica gets it by replication.
    primary.exec("CREATE DATABASE appdb; CREATE TABLE appdb.kv (k VARCHAR(64) PRIMARY KEY, v VARCHAR(64) NOT NULL)");

    let config = c.write_config("database.yaml", EXAMPLE);
    c.start_xdplb("xdplb", &config, &[]);
    let s = c.wait_backend_states(WRITE_VIP, &["active", "down"], WAIT);
    c.wait_backend_states(READ_VIP, &["active"], WAIT);
    let replica_check = backend(&s, WRITE_VIP, 1)["last_check"].as_str().unwrap_or_default().to_string();
    assert!(replica_check.contains("exited with exit status: 1"), "the replica fails the write check: {replica_check}");

    // 1. Writes reach the primary; the replica serves them to readers.
    let writer = Client::new(&c.client, VIP4, "app", APP_PASSWORD);
    let reader = Client::new(&c.client, VIP4_2, "app", APP_PASSWORD);
    for _ in 0..5 {
        assert_eq!(writer.server_id(), Ok(1), "the write VIP reaches the primary");
    }
    let wrote = writer.query("INSERT INTO appdb.kv VALUES ('greeting', 'hello'); SELECT @@server_id", QUERY);
    assert_eq!(wrote.as_deref(), Ok("1"));
    wait_answer(&reader, "SELECT @@server_id, v FROM appdb.kv WHERE k = 'greeting'", "2\thello");
    let refused = reader.query("INSERT INTO appdb.kv VALUES ('via-read-vip', 'x')", QUERY);
    assert!(refused.as_ref().is_err_and(|e| e.contains("read-only")), "the read VIP takes no writes: {refused:?}");

    // 2. Without a replica, the primary answers reads as the sorry server.
    replica.stop();
    c.wait_backend_states(READ_VIP, &["down", "sorry"], WAIT);
    wait_answer(&reader, "SELECT @@server_id, v FROM appdb.kv WHERE k = 'greeting'", "1\thello");
    let wrote = writer.query("INSERT INTO appdb.kv VALUES ('while-away', 'missed'); SELECT @@server_id", QUERY);
    assert_eq!(wrote.as_deref(), Ok("1"), "writes go on without the replica");
    // An open port is not a database: the check waits for the greeting, so a
    // listener that never sends one keeps the replica out.
    let silent = c.backends[1].enter(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, mariadb::PORT)).unwrap());
    let s = c.wait_status(WAIT, "a check of the silent listener", |s| {
        backend(s, READ_VIP, 0)["last_check"].as_str().is_some_and(|l| l.contains("\"MariaDB\" not received in time"))
    });
    assert_eq!(backend_states(&s, READ_VIP), ["down", "sorry"], "a silent port is not a replica");
    drop(silent);
    replica.start();
    c.wait_backend_states(READ_VIP, &["active"], WAIT);
    // Back on the replica, which caught up with what it missed.
    wait_answer(&reader, "SELECT @@server_id, v FROM appdb.kv WHERE k = 'while-away'", "2\tmissed");

    // 3. Failover: the primary crashes, the replica is promoted, the write VIP follows.
    let died = Instant::now();
    primary.kill();
    let attempts = WriteAttempts::start(writer.clone());
    c.wait_backend_states(WRITE_VIP, &["down", "down"], WAIT);
    let promoted = Instant::now();
    replica.promote();
    c.wait_backend_states(WRITE_VIP, &["down", "active"], WAIT);
    attempts.switched();
    let attempts = attempts.finish(WAIT);
    let (failed, first): (Vec<&Attempt>, Vec<&Attempt>) = attempts.iter().partition(|a| a.result.is_err());
    let first = first.first().unwrap_or_else(|| panic!("no write succeeded after the promotion: {attempts:?}"));
    assert_eq!(first.result.as_deref(), Ok("2"), "the first write after the failover lands on the new primary");
    assert!(first.ended > promoted, "no write succeeded before the promotion");
    let unanswered = failed.iter().filter(|a| a.result.as_ref().is_err_and(|e| e.starts_with("no answer"))).count();
    eprintln!(
        "write VIP failover: {} ms after promotion, {} ms after the primary died",
        (first.ended - promoted).as_millis(),
        (first.ended - died).as_millis()
    );
    // The last attempt that found no writable server bounds the switch from below.
    let last_failed = failed.iter().map(|a| a.started).max().unwrap_or(promoted).max(promoted);
    eprintln!(
        "write VIP failover: {} failed write attempts ({} refused or failed, {} unanswered within {} ms, \
         one every {} ms); the VIP switched {}..{} ms after promotion",
        failed.len(),
        failed.len() - unanswered,
        unanswered,
        ATTEMPT.as_millis(),
        PAUSE.as_millis(),
        (last_failed - promoted).as_millis(),
        (first.ended - promoted).as_millis()
    );
    for _ in 0..5 {
        let wrote = writer.query("INSERT INTO appdb.kv VALUES (UUID(), 'after'); SELECT @@server_id", QUERY);
        assert_eq!(wrote.as_deref(), Ok("2"), "writes go to the new primary");
    }
    // What the old primary had replicated is all there.
    wait_answer(
        &writer,
        "SELECT @@server_id, GROUP_CONCAT(v ORDER BY k) FROM appdb.kv WHERE k IN ('greeting', 'while-away')",
        "2\thello,missed",
    );
}
