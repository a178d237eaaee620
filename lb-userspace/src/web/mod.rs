//! The listener of `metrics_listen`: the status page, its parts, and the
//! Prometheus text, served by hyper (HTTP/1.1) from the controller's shared
//! status snapshot.
//!
//! | path | what |
//! |---|---|
//! | `/` | the status page ([`page`]) |
//! | `/status.html` | the part of the page that refreshes itself |
//! | `/status.json` | the status, as `xdplb status --json` prints it |
//! | `/metrics` | Prometheus text ([`metrics`]) |
//!
//! It is exposed to whoever can reach it, so it is bounded: at most
//! [`MAX_CONNECTIONS`] at once (more are closed as soon as they are
//! accepted), request headers within [`HEADER_READ_TIMEOUT`], the whole
//! exchange within [`REQUEST_TIMEOUT`], one request per connection, and
//! request headers of at most [`MAX_REQUEST_HEAD`] bytes.

pub mod history;
pub mod metrics;
pub mod page;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tracing::{debug, warn};

use self::history::History;
use crate::status::Status;

/// Connections served at once; a Prometheus server or two and a few browsers
/// need far fewer, and each costs a task and two buffers.
pub const MAX_CONNECTIONS: usize = 64;
/// From accepting a connection to the end of its request headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// From accepting a connection to the end of its response.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// hyper's read buffer, which bounds the request line and headers (8 KiB is
/// hyper's least).
pub const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// What the requests read: the controller's snapshot, and the rates the
/// sampler keeps of it.
struct Shared {
    status: Arc<Mutex<Status>>,
    history: Mutex<History>,
}

/// Serves on a bound socket until the process ends.
pub fn spawn(listener: TcpListener, status: Arc<Mutex<Status>>) {
    let shared = Arc::new(Shared { status, history: Mutex::new(History::default()) });
    tokio::spawn(sample(shared.clone()));
    tokio::spawn(accept(listener, shared));
}

/// Records every status the controller publishes (each second) in the history.
async fn sample(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let status = shared.status.lock().unwrap();
        shared.history.lock().unwrap().record(&status);
    }
}

async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut refused = Throttled::default();
    let mut failed = Throttled::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors, say: wait a little rather than spin.
                failed.warn(|n| warn!("status page: accepting connections failed {n} time(s), last: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(stream);
            refused.warn(|n| {
                warn!("status page: closed {n} connection(s) at once, last from {peer}: {MAX_CONNECTIONS} are open")
            });
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            serve_connection(stream, peer, shared).await;
            drop(permit);
        });
    }
}

async fn serve_connection(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let service = service_fn(move |req: Request<Incoming>| {
        let response = respond(&shared, &req);
        async move { Ok::<_, Infallible>(response) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(false)
        .max_buf_size(MAX_REQUEST_HEAD)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(REQUEST_TIMEOUT, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!("status page: connection from {peer}: {e}"),
        Err(_) => debug!("status page: connection from {peer} cut off after {REQUEST_TIMEOUT:?}"),
    }
}

fn respond(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", "only GET and HEAD\n".into());
        r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let path = req.uri().path();
    if !matches!(path, "/" | "/status.html" | "/status.json" | "/metrics") {
        return text(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: try / (status page), /metrics or /status.json\n".into(),
        );
    }
    // Rendered from a copy: the controller's publishing does not wait on a slow page.
    let status = shared.status.lock().unwrap().clone();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    match path {
        "/metrics" => text(StatusCode::OK, "text/plain; version=0.0.4", metrics::render(&status)),
        "/status.json" => {
            let json = serde_json::to_string_pretty(&status).unwrap_or_default() + "\n";
            text(StatusCode::OK, "application/json", json)
        }
        "/status.html" => html(page::section(&status, &shared.history.lock().unwrap(), now)),
        _ => html(page::document(&status, &shared.history.lock().unwrap(), now)),
    }
}

fn text(code: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn html(body: String) -> Response<Full<Bytes>> {
    let mut r = text(StatusCode::OK, "text/html; charset=utf-8", body);
    let h = r.headers_mut();
    // Nothing but the page's own inline style and script, and requests back here.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'; \
             img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    r
}

/// A warning at most once a minute, with how often it happened meanwhile.
#[derive(Default)]
struct Throttled {
    count: u64,
    last: Option<Instant>,
}

impl Throttled {
    fn warn(&mut self, log: impl FnOnce(u64)) {
        self.count += 1;
        if self.last.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            log(self.count);
            self.count = 0;
            self.last = Some(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpStream,
    };

    use super::*;
    use crate::status::{BackendStatus, VipStatus};

    async fn start() -> (SocketAddr, Arc<Mutex<Status>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let status = Arc::new(Mutex::new(Status {
            interface: "eth0".into(),
            updated_unix_ms: 1,
            vips: vec![VipStatus {
                name: "web".into(),
                backends: vec![BackendStatus { address: "198.18.0.11".into(), ..Default::default() }],
                ..Default::default()
            }],
            ..Default::default()
        }));
        spawn(listener, status.clone());
        (addr, status)
    }

    /// One request on a new connection; the whole answer as the server sent it.
    async fn get(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await.unwrap().unwrap();
        String::from_utf8(out).unwrap()
    }

    fn body(response: &str) -> &str {
        &response[response.find("\r\n\r\n").unwrap() + 4..]
    }

    #[tokio::test]
    async fn routes_and_closes_each_connection_after_one_answer() {
        let (addr, status) = start().await;
        // No `Connection: close` from the client: the server closes anyway,
        // as the hand-written server did (a client reading to EOF relies on it).
        let m = get(addr, "GET /metrics HTTP/1.1\r\nHost: lb\r\n\r\n").await;
        assert!(m.starts_with("HTTP/1.1 200 OK\r\n"), "{m}");
        assert!(m.contains("content-type: text/plain; version=0.0.4\r\n"), "{m}");
        assert_eq!(body(&m), metrics::render(&status.lock().unwrap()), "the body is the Prometheus text as is");
        let j = get(addr, "GET /status.json HTTP/1.1\r\nHost: lb\r\n\r\n").await;
        let expected = serde_json::to_string_pretty(&*status.lock().unwrap()).unwrap() + "\n";
        assert_eq!(body(&j), expected, "as `xdplb status --json` prints it");
        let p = get(addr, "GET / HTTP/1.1\r\nHost: lb\r\n\r\n").await;
        assert!(p.contains("content-type: text/html; charset=utf-8\r\n"), "{p}");
        assert!(p.contains("content-security-policy: default-src 'none'"), "{p}");
        assert!(body(&p).starts_with("<!DOCTYPE html>") && body(&p).contains("198.18.0.11"), "{p}");
        let part = get(addr, "GET /status.html HTTP/1.0\r\n\r\n").await;
        assert!(!body(&part).contains("<html") && body(&part).contains("198.18.0.11"), "{part}");
        assert!(get(addr, "GET /nope HTTP/1.1\r\nHost: lb\r\n\r\n").await.starts_with("HTTP/1.1 404 "));
        let post = get(addr, "POST /metrics HTTP/1.1\r\nHost: lb\r\nContent-Length: 0\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405 ") && post.contains("allow: GET, HEAD\r\n"), "{post}");
        let head = get(addr, "HEAD /metrics HTTP/1.1\r\nHost: lb\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n") && body(&head).is_empty(), "{head}");
    }

    #[tokio::test]
    async fn oversized_request_headers_are_refused() {
        let (addr, _) = start().await;
        let big = format!("GET /metrics HTTP/1.1\r\nHost: lb\r\nX-Big: {}\r\n\r\n", "a".repeat(2 * MAX_REQUEST_HEAD));
        let mut s = TcpStream::connect(addr).await.unwrap();
        // The server may close before it has read everything: a reset is a refusal too.
        let _ = s.write_all(big.as_bytes()).await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await.unwrap();
        let out = String::from_utf8_lossy(&out);
        assert!(out.is_empty() || out.starts_with("HTTP/1.1 431 "), "{out}");
    }

    #[tokio::test]
    async fn the_page_follows_the_published_status() {
        let (addr, status) = start().await;
        status.lock().unwrap().vips[0].backends[0].state = "draining".into();
        let part = get(addr, "GET /status.html HTTP/1.1\r\nHost: lb\r\n\r\n").await;
        assert!(part.contains("<td class=\"state\">draining</td>"), "{part}");
    }
}
