//! Checks against real servers on loopback: a banner server, an HTTP server
//! that answers chunked, and a TLS server with certificates made by openssl.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::Command,
    sync::{Arc, Mutex},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpListener,
};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self, ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    },
};

use super::*;
use crate::config::{self, TlsCheck};

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn target(port: u16, yaml_check: &str) -> Target {
    let text = format!(
        "vips:\n  - name: t\n    address: 198.18.100.1\n    port: 80\n    backends: [{{address: 198.18.0.11}}]\n    health_check: {yaml_check}\n"
    );
    let c = config::parse("t.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
    Target {
        key: Key { vip: c.vips[0].address, vip_port: 80, protocol: 6, addr: LOCAL, port: 0 },
        addr: LOCAL,
        port,
        vip: c.vips[0].address,
        check: c.vips[0].health_check.clone(),
    }
}

/// A server that accepts connections and hands each to `serve`.
async fn server<F, Fut>(serve: F) -> u16
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind(SocketAddr::new(LOCAL, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(serve(s));
        }
    });
    port
}

#[tokio::test]
async fn tcp_expect_matches_a_banner_and_says_what_came_instead() {
    // A MariaDB-like greeting: binary length prefix, version text, NUL.
    let port = server(|mut s| async move {
        let _ = s.write_all(b"\x4a\x00\x00\x00\x0a5.5.5-10.11.6-MariaDB-0+deb12u1\x00rest").await;
    })
    .await;
    assert_eq!(check_once(&target(port, "{type: tcp, expect: MariaDB}")).await, Ok(()));
    assert_eq!(check_once(&target(port, "{type: tcp, expect_hex: 0a352e352e35}")).await, Ok(()));
    let err = check_once(&target(port, "{type: tcp, expect: PostgreSQL}")).await.unwrap_err();
    assert!(err.starts_with("\"PostgreSQL\" not received (closed after 41 bytes: \"J\\x00\\x00\\x00\\n5.5.5"), "{err}");
    // Without expect, a connect is enough.
    assert_eq!(check_once(&target(port, "{type: tcp}")).await, Ok(()));
}

#[tokio::test]
async fn tcp_send_then_expect_speaks_a_line_protocol() {
    // Redis-like: answers +PONG to PING and keeps the connection open; -ERR and closes otherwise.
    let port = server(|mut s| async move {
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.unwrap_or(0);
        if &buf[..n] == b"PING\r\n" {
            let _ = s.write_all(b"+PONG\r\n").await;
            let _ = s.read(&mut buf).await;
        } else {
            let _ = s.write_all(b"-ERR unknown\r\n").await;
        }
    })
    .await;
    assert_eq!(check_once(&target(port, r#"{type: tcp, send: "PING\r\n", expect: "+PONG"}"#)).await, Ok(()));
    let err = check_once(&target(port, r#"{type: tcp, send: "PONG\r\n", expect: "+PONG"}"#)).await.unwrap_err();
    assert!(err.contains("\"+PONG\" not received") && err.contains("-ERR unknown"), "{err}");
    // A server that keeps quiet until the check hangs up: only the caller's timeout ends the check.
    let quiet = server(|mut s| async move {
        let _ = s.read(&mut [0u8; 1]).await;
    })
    .await;
    let t = target(quiet, "{type: tcp, expect: hello, timeout: 300ms}");
    let err = tokio::time::timeout(std::time::Duration::from_secs(5), check_once(&t)).await.expect("ends by itself");
    assert_eq!(err, Err("\"hello\" not received in time (0 bytes came: \"\")".into()));
    // A Redis with a password answers, and keeps the connection open: the error shows the answer.
    let noauth = server(|mut s| async move {
        let _ = s.write_all(b"-NOAUTH Authentication required.\r\n").await;
        let _ = s.read(&mut [0u8; 64]).await;
        let _ = s.read(&mut [0u8; 64]).await;
    })
    .await;
    let t = target(noauth, r#"{type: tcp, send: "PING\r\n", expect: "+PONG", timeout: 300ms}"#);
    let err = tokio::time::timeout(std::time::Duration::from_secs(5), check_once(&t)).await.expect("ends by itself");
    assert_eq!(
        err,
        Err("\"+PONG\" not received in time (34 bytes came: \"-NOAUTH Authentication required.\\r\\n\")".into())
    );
}

#[tokio::test]
async fn tcp_expect_reads_at_most_64_kib() {
    // A server that talks on and on without ever saying the word: the check gives up at the limit
    // instead of reading until the server closes.
    let port = server(|mut s| async move {
        let _ = s.write_all(&vec![b'x'; 1 << 20]).await;
    })
    .await;
    let err = check_once(&target(port, "{type: tcp, expect: hello}")).await.unwrap_err();
    assert_eq!(err, "\"hello\" not in the first 65536 bytes received");
}

/// Reads one request head, up to its blank line; None if the client went away first.
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> Option<Vec<u8>> {
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    Some(req)
}

/// Reads one request head; records it; answers with `status` and a chunked body.
async fn http_answer<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, status: u16, seen: Arc<Mutex<Vec<String>>>) {
    let Some(req) = read_head(&mut s).await else { return };
    seen.lock().unwrap().push(String::from_utf8_lossy(&req).into_owned());
    // The word "healthy" is split across two chunks: only a real HTTP client joins them.
    let resp = format!(
        "HTTP/1.1 {status} X\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n\
         9\r\nstate: he\r\n5\r\nalthy\r\n0\r\n\r\n"
    );
    let _ = s.write_all(resp.as_bytes()).await;
    let _ = s.shutdown().await;
}

#[tokio::test]
async fn http_checks_status_and_a_chunked_body_and_send_the_host() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let port = server(move |s| http_answer(s, 200, s2.clone())).await;
    let ok = "{type: http, path: /health, host: web.example, expect_status: 200, expect_body: healthy}";
    assert_eq!(check_once(&target(port, ok)).await, Ok(()));
    let req = seen.lock().unwrap().pop().unwrap();
    assert!(req.starts_with("GET /health HTTP/1.1\r\n"), "{req}");
    assert!(req.to_ascii_lowercase().contains("host: web.example\r\n"), "{req}");
    let err = check_once(&target(port, "{type: http, expect_body: sick}")).await.unwrap_err();
    assert!(err.contains("does not contain \"sick\""), "{err}");
    let s3 = seen.clone();
    let failing = server(move |s| http_answer(s, 503, s3.clone())).await;
    assert_eq!(check_once(&target(failing, "{type: http}")).await, Err("HTTP status 503".into()));
    // Not HTTP at all.
    let banner = server(|mut s| async move {
        let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await;
    })
    .await;
    let err = check_once(&target(banner, "{type: http}")).await.unwrap_err();
    assert!(err.starts_with("HTTP: "), "{err}");
}

#[tokio::test]
async fn http_expect_body_searches_at_most_64_kib() {
    // A 1 MiB body without the word: the check stops reading at the limit.
    let port = server(|mut s| async move {
        if read_head(&mut s).await.is_some() {
            let body = vec![b'x'; 1 << 20];
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(&body).await;
        }
    })
    .await;
    let err = check_once(&target(port, "{type: http, expect_body: healthy}")).await.unwrap_err();
    assert_eq!(err, "the body does not contain \"healthy\" (searched 65536 bytes)");
}

/// A CA, and a server certificate it signed for web.test and 127.0.0.1.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("xdplb-test-pki-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let run = |args: &[&str]| {
            let out = Command::new("openssl").args(args).current_dir(&dir).output().expect("openssl runs");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
        for ca in ["ca", "other-ca"] {
            let subj = format!("/CN=xdplb test {ca}");
            let (key, pem) = (format!("{ca}.key"), format!("{ca}.pem"));
            let mut a = vec!["req", "-x509"];
            a.extend(ec);
            a.extend(["-keyout", &key, "-out", &pem, "-days", "2", "-subj", &subj]);
            run(&a);
        }
        let mut a = vec!["req"];
        a.extend(ec);
        a.extend(["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=web.test"]);
        run(&a);
        std::fs::write(dir.join("san.ext"), "subjectAltName=DNS:web.test,IP:127.0.0.1\n").unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ]);
        Self { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn acceptor(&self) -> TlsAcceptor {
        let certs: Vec<CertificateDer> =
            CertificateDer::pem_file_iter(self.dir.join("server.pem")).unwrap().map(Result::unwrap).collect();
        let key = PrivateKeyDer::from_pem_file(self.dir.join("server.key")).unwrap();
        let config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        TlsAcceptor::from(Arc::new(config))
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An HTTPS server that records the SNI of every handshake ("" for none).
async fn https_server(pki: &Pki, sni_seen: Arc<Mutex<Vec<String>>>) -> u16 {
    let acceptor = pki.acceptor();
    server(move |s| {
        let (acceptor, sni_seen) = (acceptor.clone(), sni_seen.clone());
        async move {
            let Ok(tls) = acceptor.accept(s).await else { return };
            sni_seen.lock().unwrap().push(tls.get_ref().1.server_name().unwrap_or("").to_string());
            http_answer(tls, 200, Arc::default()).await;
        }
    })
    .await
}

#[tokio::test]
async fn https_checks_verify_against_a_ca_file_and_send_sni() {
    let pki = Pki::new("https");
    let sni = Arc::new(Mutex::new(Vec::new()));
    let port = https_server(&pki, sni.clone()).await;
    let ca = pki.path("ca.pem");
    let other = pki.path("other-ca.pem");

    // No ca_file: encrypted, any certificate, no SNI for an address.
    assert_eq!(check_once(&target(port, "{type: https, expect_body: healthy}")).await, Ok(()));
    assert_eq!(sni.lock().unwrap().pop().as_deref(), Some(""));
    // Verified by name, sent as SNI.
    assert_eq!(check_once(&target(port, &format!("{{type: https, sni: web.test, ca_file: {ca}}}"))).await, Ok(()));
    assert_eq!(sni.lock().unwrap().pop().as_deref(), Some("web.test"));
    // `host` gives the SNI when `sni` is not set.
    assert_eq!(check_once(&target(port, &format!("{{type: https, host: web.test, ca_file: {ca}}}"))).await, Ok(()));
    assert_eq!(sni.lock().unwrap().pop().as_deref(), Some("web.test"));
    // Verified by the IP address in the certificate.
    assert_eq!(check_once(&target(port, &format!("{{type: https, ca_file: {ca}}}"))).await, Ok(()));
    assert_eq!(sni.lock().unwrap().pop().as_deref(), Some(""));
    // Another CA did not sign it.
    let err = check_once(&target(port, &format!("{{type: https, sni: web.test, ca_file: {other}}}"))).await;
    assert!(err.as_ref().unwrap_err().contains("TLS handshake: invalid peer certificate"), "{err:?}");
    // The certificate does not name other.test.
    let err = check_once(&target(port, &format!("{{type: https, sni: other.test, ca_file: {ca}}}"))).await;
    assert!(err.as_ref().unwrap_err().contains("certificate not valid for name \"other.test\""), "{err:?}");
    // Plain HTTP to a TLS port fails.
    assert!(check_once(&target(port, "{type: http}")).await.is_err());
}

#[test]
fn a_ca_file_that_cannot_be_used_is_a_check_failure_that_says_so() {
    let bad = crate::config::CaFile {
        path: "/etc/xdplb/bad.pem".into(),
        pem: "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n".into(),
    };
    let err = tls::connector(&TlsCheck { sni: None, ca_file: Some(bad) }).unwrap_err();
    assert!(err.starts_with("ca_file /etc/xdplb/bad.pem: "), "{err}");
}

#[tokio::test]
async fn exec_checks_report_the_last_stderr_line_and_get_their_environment() {
    let t = target(
        3306,
        r#"{type: exec, command: ["/bin/sh", "-c", "test \"$XDPLB_BACKEND_ADDRESS:$XDPLB_BACKEND_PORT\" = 127.0.0.1:3306"]}"#,
    );
    assert_eq!(check_once(&t).await, Ok(()));
    let t = target(
        80,
        r#"{type: exec, command: ["/bin/sh", "-c", "echo connecting >&2; echo 'ERROR 1045: Access denied' >&2; echo >&2; exit 3"]}"#,
    );
    assert_eq!(check_once(&t).await, Err("/bin/sh exited with exit status: 3: ERROR 1045: Access denied".into()));
    // Only PATH and the documented variables reach the command.
    // SAFETY: set_var in a test before any check runs; no other thread reads this variable.
    unsafe { std::env::set_var("XDPLB_TEST_SECRET", "leaked") };
    let t = target(
        80,
        r#"{type: exec, command: ["/bin/sh", "-c", "test -z \"$XDPLB_TEST_SECRET\" && test -n \"$XDPLB_VIP\" && test -n \"$PATH\""]}"#,
    );
    assert_eq!(check_once(&t).await, Ok(()));
    let t = target(80, r#"{type: exec, command: ["/nonexistent/check"]}"#);
    assert!(check_once(&t).await.unwrap_err().starts_with("cannot run /nonexistent/check: "));
}

/// Whether `pid` is gone or a zombie (killed, not yet reaped by whoever inherited it).
fn dead(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_or(true, |s| s.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')))
}

#[tokio::test]
async fn an_exec_check_that_times_out_leaves_no_process_behind() {
    let dir = std::env::temp_dir().join(format!("xdplb-test-exec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pidfile = dir.join("grandchild.pid");
    let script = format!("sleep 60 & echo $! > {}; wait", pidfile.display());
    let t = target(80, &format!("{{type: exec, command: [/bin/sh, -c, \"{script}\"]}}"));
    let timed_out = tokio::time::timeout(std::time::Duration::from_millis(500), check_once(&t)).await;
    assert!(timed_out.is_err(), "the check runs until its timeout");
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    // SIGKILL is delivered at once, but the kernel may take a moment to tear it down: bounded wait.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !dead(pid) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let alive = !dead(pid);
    if alive {
        // SAFETY: kill(2) on a pid this test started; no memory is involved.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!alive, "the check's grandchild (sleep, pid {pid}) outlived the check");
}

// The rise/fall state machine, without time: a list of outcomes in, the
// transitions out.
fn run_steps(up: bool, outcomes: &[Outcome], rise: u32, fall: u32) -> (RiseFall, Vec<(usize, bool)>) {
    let mut s = RiseFall::new(up);
    let mut changes = Vec::new();
    for (i, o) in outcomes.iter().enumerate() {
        let (n, changed) = step(s, o, rise, fall);
        s = n;
        if let Some(up) = changed {
            changes.push((i, up));
        }
    }
    (s, changes)
}

fn fail() -> Outcome {
    Outcome::Failed("connection refused".into())
}

fn not_run() -> Outcome {
    Outcome::NotRun("cannot create a socket: Too many open files".into())
}

#[test]
fn rise_passes_bring_a_backend_up_and_fall_failures_take_it_down() {
    use Outcome::Passed;
    let (s, changes) = run_steps(false, &[Passed, Passed, fail(), fail(), fail(), Passed], 2, 3);
    assert_eq!(changes, [(1, true), (4, false)]);
    assert!(!s.up && s.passes == 1 && s.decided);
    // A failure in between starts the count again.
    let (_, changes) = run_steps(false, &[Passed, fail(), Passed, Passed], 2, 3);
    assert_eq!(changes, [(3, true)]);
    // Already up: passes change nothing.
    assert_eq!(run_steps(true, &[Passed, Passed, Passed], 2, 3).1, []);
}

#[test]
fn a_check_not_run_neither_passes_nor_fails() {
    // Up, two failures, then local trouble for a while: the third failure is still needed.
    let (s, changes) = run_steps(true, &[fail(), fail(), not_run(), not_run(), not_run()], 2, 3);
    assert_eq!(changes, []);
    assert!(s.up && s.fails == 2 && !s.decided);
    let (_, changes) = run_steps(true, &[fail(), fail(), not_run(), fail()], 2, 3);
    assert_eq!(changes, [(3, false)]);
    // Never run: never decided, never up.
    let (s, changes) = run_steps(false, &[not_run(), not_run(), not_run()], 1, 1);
    assert!(changes.is_empty() && !s.up && !s.decided);
}

#[test]
fn the_first_decision_is_rise_passes_or_fall_failures() {
    use Outcome::Passed;
    let (s, _) = run_steps(true, &[Passed], 2, 3);
    assert!(!s.decided, "one pass of two");
    let (s, _) = run_steps(true, &[Passed, Passed], 2, 3);
    assert!(s.decided && s.up, "up and confirmed: decided without a transition");
    let (s, _) = run_steps(false, &[fail(), fail(), fail()], 2, 3);
    assert!(s.decided && !s.up);
}

#[tokio::test]
async fn a_check_without_a_free_slot_is_not_run_after_its_timeout() {
    let t = target(1, "{type: tcp, timeout: 100ms}");
    let none_free = tokio::sync::Semaphore::new(0);
    let outcome = check_with_permit(&Probe::new(&t), &none_free, t.check.timeout).await;
    assert_eq!(outcome, Outcome::NotRun("no check slot free within 100ms (too many checks at once)".into()));
}

#[tokio::test]
async fn a_source_address_this_host_lacks_means_the_check_was_not_run() {
    // 192.0.2.1 (TEST-NET-1) is on no interface here: bind fails with EADDRNOTAVAIL.
    let port = server(|_| async {}).await;
    let t = target(port, "{type: tcp, source: 192.0.2.1}");
    let permits = tokio::sync::Semaphore::new(1);
    let outcome = check_with_permit(&Probe::new(&t), &permits, t.check.timeout).await;
    match outcome {
        Outcome::NotRun(e) => assert!(e.starts_with("cannot use source address 192.0.2.1:"), "{e}"),
        other => panic!("a local error is not a backend failure: {other:?}"),
    }
}

#[tokio::test]
async fn a_backend_whose_checks_cannot_run_keeps_its_state_and_says_why() {
    let port = server(|_| async {}).await;
    let mut t = target(port, "{type: tcp, source: 192.0.2.1, interval: 100ms, timeout: 100ms, rise: 1, fall: 1}");
    t.check.initial_state = crate::config::InitialState::Up;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut checker = Checker::with_limit(tx, 4);
    checker.sync(vec![t.clone()], |_| true);
    let last = loop {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let h = checker.table.lock().unwrap()[&t.key].clone();
        if h.last_result != "not checked yet" {
            break h;
        }
    };
    assert!(last.up && !last.decided && last.failures == 0, "{last:?}");
    assert!(last.last_result.starts_with("check not run: cannot use source address 192.0.2.1"), "{last:?}");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(rx.try_recv().is_err(), "no transition");
    assert!(checker.is_up(&t.key));
}

#[test]
fn the_open_files_limit_is_raised_to_the_hard_limit() {
    let limit = raise_open_files_limit().unwrap();
    assert_eq!(open_files_limit().unwrap(), (limit, limit));
}
