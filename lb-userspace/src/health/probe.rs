//! One health check of one backend, per check type: a TCP connect with
//! optional send/expect, an HTTP(S) request through hyper, or a command.
//! Errors are short sentences for `status`'s last-check column.

use std::{net::SocketAddr, process::Stdio};

use http_body_util::{BodyExt as _, Empty};
use hyper::{
    Request,
    body::Bytes,
    header::{CONNECTION, HOST, USER_AGENT},
};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpSocket, TcpStream},
    task::JoinHandle,
};
use tokio_rustls::{TlsConnector, rustls::pki_types::ServerName};

use super::{Target, tls};
use crate::config::{CheckKind, StatusMatch};

/// What a check reads at most: a body to search, a banner to match.
const READ_LIMIT: usize = 64 * 1024;

/// Why a check did not pass: the backend failed it, or (`not_run`) a local
/// reason kept it from running (no socket, a `source:` address this host
/// does not have), which says nothing about the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub not_run: bool,
    pub text: String,
}

impl From<String> for Failure {
    fn from(text: String) -> Self {
        Self { not_run: false, text }
    }
}

impl Failure {
    fn not_run(text: String) -> Self {
        Self { not_run: true, text }
    }
}

/// A target with what its checks need prepared once (the TLS client).
pub struct Probe {
    target: Target,
    /// Ok(connector) for `https`; the error if its settings cannot be used.
    tls: Option<Result<TlsConnector, String>>,
}

impl Probe {
    pub fn new(target: &Target) -> Self {
        let tls = match &target.check.kind {
            CheckKind::Http { tls: Some(t), .. } => Some(tls::connector(t).map(TlsConnector::from)),
            _ => None,
        };
        Self { target: target.clone(), tls }
    }

    /// One check, without the timeout (the caller applies it).
    pub async fn check(&self) -> Result<(), Failure> {
        let target = &self.target;
        match &target.check.kind {
            CheckKind::None => Ok(()),
            CheckKind::Tcp { send, expect } => {
                let mut stream = connect(target).await?;
                if let Some(bytes) = send {
                    stream.write_all(bytes).await.map_err(|e| format!("sending: {e}"))?;
                }
                // Ends a little before the caller's timeout, so a server that
                // answers something else says what it answered.
                let deadline = tokio::time::Instant::now() + target.check.timeout.mul_f64(0.9);
                match expect {
                    Some(want) => Ok(expect_bytes(&mut stream, want, deadline).await?),
                    None => Ok(()),
                }
            }
            CheckKind::Http { path, host, expect_status, expect_body, tls } => {
                let stream = connect(target).await?;
                let host = host.clone().unwrap_or_else(|| match target.addr {
                    std::net::IpAddr::V4(a) => a.to_string(),
                    std::net::IpAddr::V6(a) => format!("[{a}]"),
                });
                let want = Expect { status: expect_status, body: expect_body.as_deref() };
                match (tls, &self.tls) {
                    (Some(settings), Some(connector)) => {
                        let connector = connector.clone()?;
                        let name = match &settings.sni {
                            Some(n) => ServerName::try_from(n.clone()).map_err(|e| format!("sni {n}: {e}"))?,
                            None => ServerName::IpAddress(target.addr.into()),
                        };
                        let stream =
                            connector.connect(name, stream).await.map_err(|e| format!("TLS handshake: {e}"))?;
                        Ok(http_get(stream, path, &host, want).await?)
                    }
                    _ => Ok(http_get(stream, path, &host, want).await?),
                }
            }
            CheckKind::Exec { command } => run_command(command, target).await,
        }
    }
}

/// Kills the command's whole process group unless it was reaped: a check that
/// times out leaves no grandchild behind (a `sh -c` and the client it started).
struct KillGroup(Option<i32>);

impl Drop for KillGroup {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            // SAFETY: kill(2) with a negative pid signals the process group the
            // command leads (process_group(0) below); no memory is involved.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }
}

/// An exec check: exit 0 passes; a failure names the exit status and the
/// command's last line on stderr (what an operator needs: "Access denied…").
async fn run_command(command: &[String], target: &Target) -> Result<(), Failure> {
    let mut child = tokio::process::Command::new(&command[0])
        .args(&command[1..])
        // A cleared environment: what the controller was started with (a
        // systemd unit's, a shell's) never changes what a check does.
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("XDPLB_BACKEND_ADDRESS", target.addr.to_string())
        .env("XDPLB_BACKEND_PORT", target.port.to_string())
        .env("XDPLB_VIP", target.vip.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            let text = format!("cannot run {}: {e}", command[0]);
            // Out of processes or file descriptors: this host's trouble, not the backend's.
            match e.raw_os_error() {
                Some(libc::EMFILE | libc::ENFILE | libc::EAGAIN | libc::ENOMEM) => Failure::not_run(text),
                _ => Failure::from(text),
            }
        })?;
    let mut group = KillGroup(child.id().map(|p| p as i32));
    let mut stderr = child.stderr.take().expect("piped above");
    // Bounded: the last 4 KiB of stderr are kept, the rest read and dropped.
    let read_stderr = async {
        let mut tail = Vec::new();
        let mut chunk = vec![0u8; 4096];
        while let Ok(n) = stderr.read(&mut chunk).await {
            if n == 0 {
                break;
            }
            tail.extend_from_slice(&chunk[..n]);
            let excess = tail.len().saturating_sub(4096);
            tail.drain(..excess);
        }
        tail
    };
    let (status, tail) = tokio::join!(child.wait(), read_stderr);
    let status = status.map_err(|e| Failure::from(e.to_string()))?;
    // Reaped: its pid may be reused, so the group is not signalled again.
    group.0 = None;
    if status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&tail);
    match text.lines().rev().map(str::trim).find(|l| !l.is_empty()) {
        Some(line) => Err(format!("{} exited with {status}: {line}", command[0]).into()),
        None => Err(format!("{} exited with {status}", command[0]).into()),
    }
}

/// One check of `target`, preparing it first (tests and one-off checks).
pub async fn check_once(target: &Target) -> Result<(), String> {
    Probe::new(target).check().await.map_err(|f| f.text)
}

/// A connection to the target. Creating or binding the socket fails only
/// for local reasons (EMFILE, a `source:` address not on this host): then
/// the check was not run.
async fn connect(target: &Target) -> Result<TcpStream, Failure> {
    let addr = SocketAddr::new(target.addr, target.port);
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }
        .map_err(|e| Failure::not_run(format!("cannot create a socket: {e}")))?;
    if let Some(src) = target.check.source {
        socket
            .bind(SocketAddr::new(src, 0))
            .map_err(|e| Failure::not_run(format!("cannot use source address {src}: {e}")))?;
    }
    Ok(socket.connect(addr).await.map_err(|e| format!("connect to {addr}: {e}"))?)
}

/// Reads until `want` appears in what the server sent, up to READ_LIMIT.
async fn expect_bytes(stream: &mut TcpStream, want: &[u8], deadline: tokio::time::Instant) -> Result<(), String> {
    let mut buf = Vec::with_capacity(512);
    // On the heap: a future per backend stays small with thousands of backends.
    let mut chunk = vec![0u8; 4096];
    loop {
        if buf.windows(want.len()).any(|w| w == want) {
            return Ok(());
        }
        if buf.len() >= READ_LIMIT {
            return Err(format!("{} not in the first {READ_LIMIT} bytes received", show(want)));
        }
        let Ok(read) = tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await else {
            let got = &buf[..buf.len().min(40)];
            return Err(format!("{} not received in time ({} bytes came: {})", show(want), buf.len(), show(got)));
        };
        let n = read.map_err(|e| format!("reading: {e}"))?;
        if n == 0 {
            let got = &buf[..buf.len().min(40)];
            return Err(format!("{} not received (closed after {} bytes: {})", show(want), buf.len(), show(got)));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Bytes as an operator can read them in a log line: text, other bytes escaped.
fn show(bytes: &[u8]) -> String {
    format!("\"{}\"", bytes.escape_ascii())
}

struct Expect<'a> {
    status: &'a StatusMatch,
    body: Option<&'a str>,
}

/// Aborts the connection task when the check ends or times out.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn http_get<S>(stream: S, path: &str, host: &str, want: Expect<'_>) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let _conn = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let request = Request::get(path)
        .header(HOST, host)
        .header(USER_AGENT, "xdplb-health")
        .header(CONNECTION, "close")
        .body(Empty::new())
        .map_err(|e| format!("HTTP request: {e}"))?;
    let response = sender.send_request(request).await.map_err(|e| format!("HTTP: {e}"))?;
    let status = response.status().as_u16();
    if !want.status.matches(status) {
        return Err(format!("HTTP status {status}"));
    }
    if let Some(needle) = want.body {
        // Frame by frame, so a match early in a long body passes and memory stays bounded.
        let mut body = response.into_body();
        let mut seen = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("reading the body: {e}"))?;
            if let Some(data) = frame.data_ref() {
                seen.extend_from_slice(&data[..data.len().min(READ_LIMIT - seen.len())]);
            }
            if String::from_utf8_lossy(&seen).contains(needle) {
                return Ok(());
            }
            if seen.len() >= READ_LIMIT {
                break;
            }
        }
        return Err(format!("the body does not contain {needle:?} (searched {} bytes)", seen.len()));
    }
    Ok(())
}
