//! MariaDB servers from Debian's packages on a test cluster's backends: each
//! `mariadbd` has a datadir, socket and log of its own under the cluster's
//! directory and runs in its backend's namespace, never as the package's
//! service. Also the `mariadb` client, run inside a namespace, so tests talk
//! to the servers over the network as real clients do.

use std::{
    io::Read as _,
    path::PathBuf,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::topology::{Cluster, Netns, wait_until};

pub const PORT: u16 = 3306;
const MARIADBD: &str = "/usr/sbin/mariadbd";
const INSTALL_DB: &str = "/usr/bin/mariadb-install-db";
pub const CLIENT: &str = "/usr/bin/mariadb";
/// A smaller redo log than the default 96 MiB: a test's datadir stays small.
const REDO_LOG: &str = "--innodb-log-file-size=8M";
const WAIT: Duration = Duration::from_secs(30);

/// Runs `cmd` for at most `timeout`; its stdout, or why it failed.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<String, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    // Readers on threads: a full pipe must never stall the child.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break Some(status);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(5));
    };
    let (out, err) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
    match status {
        Some(s) if s.success() => Ok(out),
        Some(s) => Err(format!("{s}: {}", err.trim())),
        None => Err(format!("no answer in {timeout:?}")),
    }
}

/// A `mariadb` client account as seen from one namespace: every query is a
/// new connection (and so a new flow through the balancer).
#[derive(Clone, Debug)]
pub struct Client {
    netns: String,
    host: String,
    user: String,
    password: String,
}

impl Client {
    pub fn new(ns: &Netns, host: &str, user: &str, password: &str) -> Self {
        Self { netns: ns.name.clone(), host: host.into(), user: user.into(), password: password.into() }
    }

    /// Runs `sql` (statements separated by `;`) and returns the result rows,
    /// tab-separated, without column names. The whole run, process start
    /// included, is bounded by `timeout`.
    pub fn query(&self, sql: &str, timeout: Duration) -> Result<String, String> {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns, CLIENT, "--no-defaults", "--connect-timeout=2", "-N", "-B"])
            .args(["-h", &self.host, "-P", &PORT.to_string(), "-u", &self.user, "-e", sql])
            // Not on the command line, where `ps` would show it.
            .env("MYSQL_PWD", &self.password);
        run(&mut c, timeout).map(|s| s.trim_end().to_string())
    }

    /// `@@server_id` of the server that answers a new connection.
    pub fn server_id(&self) -> Result<u32, String> {
        let out = self.query("SELECT @@server_id", Duration::from_secs(5))?;
        out.parse().map_err(|_| format!("not a server id: {out:?}"))
    }
}

/// One `mariadbd` on backend `backend` (0-based) of a cluster, killed with it.
pub struct Server<'c> {
    cluster: &'c Cluster,
    pub backend: usize,
    pub server_id: u32,
    dir: PathBuf,
    name: String,
}

impl<'c> Server<'c> {
    /// Creates an empty datadir: system tables, `root` without a password
    /// for logins from the same host only, no test database.
    pub fn install(cluster: &'c Cluster, backend: usize, server_id: u32) -> Self {
        let name = format!("mariadb-b{}", backend + 1);
        let dir = cluster.dir.join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        let server = Self { cluster, backend, server_id, dir, name };
        let out = run(
            Command::new(INSTALL_DB)
                .args(["--no-defaults", "--user=root", "--auth-root-authentication-method=normal", "--skip-test-db"])
                .arg(format!("--datadir={}", server.datadir().display()))
                .arg(REDO_LOG),
            Duration::from_secs(120),
        );
        if let Err(e) = out {
            panic!("mariadb-install-db for {}: {e}", server.name);
        }
        server
    }

    fn datadir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("mariadb.sock")
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    /// Starts `mariadbd` in the backend's namespace, read-only (only a
    /// promotion makes a server writable), with a binary log (for replicas of
    /// it, and so a replica can be promoted); returns once it answers.
    pub fn start(&self) {
        let c = self.cluster;
        let d = |f: &str| self.dir.join(f).display().to_string();
        let mut cmd = c.backends[self.backend].command(MARIADBD);
        cmd.args(["--no-defaults", "--user=root", &format!("--port={PORT}"), "--bind-address=0.0.0.0"])
            .arg(format!("--datadir={}", self.datadir().display()))
            .arg(format!("--socket={}", self.socket().display()))
            .arg(format!("--pid-file={}", d("mariadb.pid")))
            .arg(format!("--log-error={}", d("error.log")))
            .arg(format!("--server-id={}", self.server_id))
            .args(["--log-bin=mariadb-bin", "--relay-log=mariadb-relay-bin", "--log-slave-updates"])
            .args(["--read-only", "--skip-name-resolve"])
            .args([REDO_LOG, "--innodb-buffer-pool-size=32M"]);
        c.spawn(&self.name, &mut cmd);
        let start = Instant::now();
        loop {
            if c.wait_exit(&self.name, Duration::from_millis(1)).is_some() {
                panic!("{} exited at start; error log:\n{}", self.name, self.error_log());
            }
            if self.sql("SELECT 1").is_ok() {
                return;
            }
            if start.elapsed() > WAIT {
                panic!("{} did not answer in {WAIT:?}; error log:\n{}", self.name, self.error_log());
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// A clean shutdown (SIGTERM), waited for.
    pub fn stop(&self) {
        self.cluster.signal(&self.name, libc::SIGTERM);
        if self.cluster.wait_exit(&self.name, WAIT).is_none() {
            panic!("{} did not shut down in {WAIT:?}; error log:\n{}", self.name, self.error_log());
        }
    }

    /// A crash: SIGKILL, reaped.
    pub fn kill(&self) {
        self.cluster.kill(&self.name);
    }

    /// Runs `sql` as root over the server's socket; the result rows.
    pub fn sql(&self, sql: &str) -> Result<String, String> {
        self.root_client(&["-N", "-B", "-e", sql])
    }

    fn root_client(&self, args: &[&str]) -> Result<String, String> {
        let mut c = Command::new(CLIENT);
        c.args(["--no-defaults", "-u", "root"]).arg(format!("--socket={}", self.socket().display())).args(args);
        run(&mut c, WAIT).map(|s| s.trim_end().to_string())
    }

    /// `SHOW SLAVE STATUS`, one `Name: value` line per column.
    pub fn replica_status(&self) -> Result<String, String> {
        self.root_client(&["-E", "-e", "SHOW SLAVE STATUS"])
    }

    /// `sql` that must succeed.
    pub fn exec(&self, sql: &str) -> String {
        self.sql(sql).unwrap_or_else(|e| panic!("{} on {}: {e}", sql, self.name))
    }

    /// Creates accounts on this server only (not written to its binary log,
    /// so replicas do not apply them a second time).
    pub fn create_users(&self, users: &[&str]) {
        let mut sql = "SET SESSION sql_log_bin = 0;".to_string();
        for u in users {
            sql += u;
            sql += ";";
        }
        self.exec(&sql);
    }

    /// Makes the first primary writable (a replica becomes so by `promote`).
    pub fn make_writable(&self) {
        self.exec("SET GLOBAL read_only = 0");
    }

    /// Starts replicating from `primary` with GTIDs, as `user`/`password`,
    /// and waits until both replication threads run.
    pub fn replicate_from(&self, primary: &Server, user: &str, password: &str) {
        let host = self.cluster.backend4(primary.backend);
        self.exec(&format!(
            "CHANGE MASTER TO MASTER_HOST='{host}', MASTER_PORT={PORT}, MASTER_USER='{user}', \
             MASTER_PASSWORD='{password}', MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1; START SLAVE"
        ));
        let running = wait_until(WAIT, || {
            self.replica_status()
                .is_ok_and(|s| s.contains("Slave_IO_Running: Yes") && s.contains("Slave_SQL_Running: Yes"))
        });
        assert!(running, "{} does not replicate: {:?}\n{}", self.name, self.replica_status(), self.error_log());
    }

    /// Promotes a replica: forgets its primary and becomes writable.
    pub fn promote(&self) {
        self.exec("STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = 0");
    }
}
