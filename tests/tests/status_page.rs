//! The status page of `metrics_listen` in a real browser (headless Chromium,
//! run inside the balancer's namespace where the listener is), checked
//! against `xdplb status --json`; and the listener's limits: connections
//! beyond the limit are closed at once, a client that sends its headers
//! slowly is cut off, and neither hurts a well-behaved client afterwards.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::TcpStream,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use lb_userspace::web;
use tests::topology::{self, Cluster, ClusterSpec, RequestStream, Servers, VIP4, VIP6, target};

const WAIT: Duration = Duration::from_secs(30);
const LISTEN: &str = "127.0.0.1:9464";

/// A cluster of `backends` servers behind VIPs `web4` (IPv4; the last
/// backend drained with weight 0) and `web6` (IPv6), with the page on LISTEN.
fn cluster(backends: usize) -> Cluster {
    let c = Cluster::new(ClusterSpec { backends, servers: Servers::Builtin, bin_dir: topology::bin_dir(), nat: None });
    for i in 0..backends {
        c.start_server(i, 80);
    }
    let mut yaml = format!("interface: lb0\nmetrics_listen: {LISTEN}\nvips:\n");
    for (name, addr) in [("web4", VIP4), ("web6", VIP6)] {
        yaml += &format!("  - name: {name}\n    address: {addr}\n    port: 80\n    backends:\n");
        for i in 0..backends {
            let (a, w) = if name == "web4" {
                (topology::backend4(i), if i + 1 == backends { 0 } else { i + 1 })
            } else {
                (topology::backend6(i), 1)
            };
            yaml += &format!("      - address: {a}\n        weight: {w}\n");
        }
        yaml += "    health_check: {type: tcp, interval: 300ms, timeout: 200ms, rise: 1, fall: 2}\n";
    }
    let path = c.write_config("xdplb.yaml", &yaml);
    c.start_xdplb("xdplb", &path, &[]);
    let mut states = vec!["active"; backends];
    states[backends - 1] = "draining";
    c.wait_backend_states("web4", &states, WAIT);
    c.wait_backend_states("web6", &vec!["active"; backends], WAIT);
    c
}

/// Headless Chromium in the balancer's namespace, with a profile (and home)
/// of its own under the cluster's directory; killed, with every process it
/// started, on drop.
struct Chromium {
    child: Child,
}

impl Chromium {
    /// Runs chromium with `args` on `url` to completion; its stdout.
    fn run(c: &Cluster, run: &str, args: &[&str], url: &str) -> String {
        let dir = c.dir.join(format!("chromium-{run}"));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("stdout");
        let err = dir.join("stderr");
        let mut cmd = c.lb.command("chromium");
        cmd.args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check"])
            .args(["--disable-extensions", "--disable-background-networking", "--disable-sync"])
            .arg(format!("--user-data-dir={}", dir.join("profile").display()))
            .args(args)
            .arg(url)
            .env("HOME", &dir)
            .env("XDG_CONFIG_HOME", dir.join("config"))
            .env("XDG_CACHE_HOME", dir.join("cache"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            // A group of its own: the drop kills chromium's helpers with it.
            .process_group(0);
        let mut browser = Chromium { child: cmd.spawn().expect("chromium runs (apt-get install chromium)") };
        let start = Instant::now();
        let status = loop {
            if let Some(s) = browser.child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > Duration::from_secs(120) {
                panic!("chromium did not finish in 120 s: {}", tail(&err));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(status.success(), "chromium failed ({status}): {}", tail(&err));
        std::fs::read_to_string(&out).unwrap()
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group this test started; no memory is involved.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// The text of every `<td>` of a table row, tags removed.
fn cells(row: &str) -> Vec<String> {
    row.split("<td")
        .skip(1)
        .map(|cell| {
            let inner = &cell[cell.find('>').unwrap() + 1..cell.find("</td>").unwrap_or(cell.len())];
            let mut text = String::new();
            let mut in_tag = false;
            for ch in inner.chars() {
                match ch {
                    '<' => in_tag = true,
                    '>' => in_tag = false,
                    c if !in_tag => text.push(c),
                    _ => {}
                }
            }
            text.trim().to_string()
        })
        .collect()
}

/// The rendered DOM's VIP tables: (the name the header shows, its backend rows' cells).
fn vip_tables(dom: &str) -> Vec<(String, Vec<Vec<String>>)> {
    dom.split("<table class=\"vip\"")
        .skip(1)
        .map(|table| {
            let table = &table[..table.find("</table>").expect("a closed table")];
            const NAME: &str = "<span class=\"vip-name\">";
            let name_at = table.find(NAME).expect("the VIP's name") + NAME.len();
            let name = table[name_at..name_at + table[name_at..].find('<').unwrap()].to_string();
            let rows = table
                .split("<tr class=\"backend")
                .skip(1)
                .map(|r| cells(&r[..r.find("</tr>").unwrap_or(r.len())]))
                .collect();
            (name, rows)
        })
        .collect()
}

#[test]
fn the_page_shows_what_status_json_says_and_refreshes_itself() {
    let c = cluster(3);
    let stream4 = RequestStream::start(&c.client, target(VIP4, 80), Duration::from_millis(50), 100_000);
    let stream6 = RequestStream::start(&c.client, target(VIP6, 80), Duration::from_millis(50), 100_000);
    c.wait_status(WAIT, "traffic on both VIPs", |s| {
        s["vips"].as_array().is_some_and(|vs| vs.iter().all(|v| v["packets_per_second"].as_f64() > Some(0.0)))
    });
    // A few seconds of history for the sparklines.
    std::thread::sleep(Duration::from_secs(4));
    let url = format!("http://{LISTEN}/");
    // Virtual time runs the script's refreshes (each waits for its fetch).
    let dom = Chromium::run(&c, "dom", &["--virtual-time-budget=3000", "--dump-dom"], &url);
    let status = c.status().expect("xdplb status --json");

    assert!(dom.contains("<span id=\"live\" class=\"ok\">live, refreshed every second</span>"), "{dom}");
    let tables = vip_tables(&dom);
    let vips = status["vips"].as_array().unwrap();
    assert_eq!(tables.len(), vips.len(), "one table per VIP: {dom}");
    for (v, (name, rows)) in vips.iter().zip(&tables) {
        assert_eq!(v["name"].as_str().unwrap(), name);
        let backends = v["backends"].as_array().unwrap();
        assert_eq!(rows.len(), backends.len(), "VIP {name}: one row per backend: {rows:?}");
        for (b, row) in backends.iter().zip(rows) {
            let address = b["address"].as_str().unwrap();
            let expected = match b["port"].as_u64().unwrap() {
                0 => address.to_string(),
                p if address.contains(':') => format!("[{address}]:{p}"),
                p => format!("{address}:{p}"),
            };
            assert_eq!(row[0], expected, "{row:?}");
            assert_eq!(row[1], b["state"].as_str().unwrap(), "state of {address}: {row:?}");
            assert_eq!(row[2], b["weight"].to_string(), "weight of {address}: {row:?}");
            assert_eq!(row[3], b["health"].as_str().unwrap(), "health of {address}: {row:?}");
        }
    }
    assert_eq!(tables[0].1[2][1], "draining", "the weight-0 backend");
    assert!(dom.contains("<polyline points=\""), "sparklines: {dom}");
    assert!(dom.contains("No reload since the start (generation 1)."), "{dom}");
    assert!(dom.contains("<td>tx</td>") && dom.contains("<td>drop_no_backend</td>"), "packets by reason: {dom}");

    let png = c.dir.join("page.png");
    let shot = format!("--screenshot={}", png.display());
    Chromium::run(&c, "screenshot", &["--virtual-time-budget=3000", "--window-size=1400,1000", &shot], &url);
    let bytes = std::fs::read(&png).expect("chromium wrote the screenshot");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 20_000, "{} bytes", bytes.len());
    // To look at it: XDPLB_SCREENSHOT=/tmp/page.png cargo test -p tests --test status_page
    if let Some(keep) = std::env::var_os("XDPLB_SCREENSHOT") {
        std::fs::copy(&png, PathBuf::from(keep)).unwrap();
    }
    for s in [stream4.stop(), stream6.stop()] {
        assert!(s.iter().all(|s| s.result.is_ok()), "requests failed while the page was read");
    }
}

const REQUEST: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: lb\r\n\r\n";

/// One GET /metrics; what came back before the server closed, or why nothing did.
fn get_metrics() -> Result<String, String> {
    let mut s = TcpStream::connect(LISTEN).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(REQUEST).map_err(|e| format!("send: {e}"))?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(|e| format!("read: {e}"))?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// A well-behaved client gets the metrics, at the latest once the
/// connections before it are gone.
fn metrics_are_served() {
    let start = Instant::now();
    loop {
        match get_metrics() {
            Ok(r) if r.starts_with("HTTP/1.1 200 OK\r\n") && r.contains("\nxdplb_config_generation 1\n") => return,
            other if start.elapsed() > WAIT => panic!("no metrics for a well-behaved client: {other:?}"),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Opens the limit's worth of idle connections, then `extra` more that each
/// send a whole request; what each of those received before it was closed.
/// None when an idle one was cut off (by the header timeout) before the
/// extras were done: the machine stalled, so the round proves nothing.
fn beyond_the_limit(extra: usize) -> Option<Vec<String>> {
    let held: Vec<TcpStream> = (0..web::MAX_CONNECTIONS).map(|_| TcpStream::connect(LISTEN).unwrap()).collect();
    let answers = (0..extra)
        .map(|_| {
            let mut s = TcpStream::connect(LISTEN).unwrap();
            s.set_read_timeout(Some(WAIT)).unwrap();
            // Closed at once, the request may meet a closed socket: a reset, not an answer.
            let _ = s.write_all(REQUEST);
            let mut out = Vec::new();
            match s.read_to_end(&mut out) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
                Err(e) => panic!("a connection beyond the limit was neither answered nor closed: {e}"),
            }
            String::from_utf8_lossy(&out).into_owned()
        })
        .collect();
    let all_open = held.iter().all(|s| {
        s.set_nonblocking(true).unwrap();
        matches!(s.peek(&mut [0]), Err(e) if e.kind() == ErrorKind::WouldBlock)
    });
    all_open.then_some(answers)
}

#[test]
fn connections_beyond_the_limit_are_closed_at_once_and_metrics_still_served() {
    let c = cluster(2);
    c.lb.enter(metrics_are_served);
    let answers = c
        .lb
        .enter(|| (0..3).find_map(|_| beyond_the_limit(8)).expect("three rounds stalled beyond the header timeout"));
    assert!(answers.iter().all(String::is_empty), "connections beyond the limit got answers: {answers:?}");
    // The idle connections are closed now: their slots are free again.
    c.lb.enter(metrics_are_served);
    assert!(c.log("xdplb").contains("status page: closed 1 connection(s) at once"), "{}", c.log("xdplb"));
}

#[test]
fn a_client_sending_headers_slowly_is_cut_off() {
    let c = cluster(2);
    let (cut_off, received) = c.lb.enter(|| {
        let mut s = TcpStream::connect(LISTEN).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: lb\r\n").unwrap();
        let mut received = Vec::new();
        let start = Instant::now();
        // A header line every 300 ms, never the blank line that ends them.
        let cut_off = loop {
            if start.elapsed() > 4 * web::REQUEST_TIMEOUT {
                break false;
            }
            if s.write_all(b"X-Slow: 1\r\n").is_err() {
                break true;
            }
            let mut buf = [0u8; 512];
            match s.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => received.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => break true,
            }
        };
        (cut_off, String::from_utf8_lossy(&received).into_owned())
    });
    assert!(cut_off, "a client still sending headers after {:?} was not cut off", 4 * web::REQUEST_TIMEOUT);
    assert!(!received.contains(" 200 OK"), "an unfinished request got an answer: {received}");
    c.lb.enter(metrics_are_served);
}
