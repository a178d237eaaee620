//! NAT mode end to end (`forwarding: nat`, like `ipvsadm -m`): a client, a
//! load balancer with one or two arms, and three real servers on their own
//! subnet listening on port 8080 behind VIP port 80, using the balancer as
//! their gateway. The balancer's kernel does not forward (ip_forward = 0):
//! both directions are XDP's work.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use tests::topology::{
    self, Cluster, ClusterSpec, NatArms, RequestStream, Servers, VIP4, VIP6, backend_states, pattern,
};

const WAIT: Duration = Duration::from_secs(30);

fn cluster(arms: NatArms) -> Cluster {
    let c = Cluster::new(ClusterSpec {
        backends: 3,
        servers: Servers::Builtin,
        bin_dir: topology::bin_dir(),
        nat: Some(arms),
    });
    for i in 0..3 {
        c.start_server(i, 8080);
    }
    c
}

fn config(c: &Cluster, arms: NatArms) -> String {
    let mut y = String::from("interface: lb0\nmetrics_listen: 127.0.0.1:9464\n");
    if arms == NatArms::TwoArmed {
        y += "backend_interface: lb1\n";
    }
    y += "nat: {tcp_timeout: 60s, udp_timeout: 30s, closed_timeout: 2s}\nvips:\n";
    for (name, addr, port, proto) in
        [("web4", VIP4, 80, "tcp"), ("web6", VIP6, 80, "tcp"), ("dns4", VIP4, 53, "udp"), ("dns6", VIP6, 53, "udp")]
    {
        y += &format!(
            "  - name: {name}\n    address: {addr}\n    port: {port}\n    protocol: {proto}\n    forwarding: nat\n    backends:\n"
        );
        for i in 0..3 {
            let b = if addr.contains(':') { c.backend6(i) } else { c.backend4(i) };
            y += &format!("      - address: {b}\n        port: 8080\n");
        }
        y += "    health_check: {type: tcp, port: 8080, interval: 300ms, timeout: 200ms, rise: 1, fall: 2}\n";
    }
    y
}

fn start(arms: NatArms) -> Cluster {
    let c = cluster(arms);
    let path = c.write_config("xdplb.yaml", &config(&c, arms));
    c.start_xdplb("xdplb", &path, &[]);
    for vip in ["web4", "web6", "dns4", "dns6"] {
        c.wait_backend_states(vip, &["active"; 3], WAIT);
    }
    c
}

use topology::target as vip;

fn requests(c: &Cluster, target: SocketAddr, n: usize) -> Vec<String> {
    c.requests(target, n)
}

/// Downloads /bytes/N through `target` and checks every byte.
fn download(c: &Cluster, target: SocketAddr, n: u64) -> String {
    c.client.enter(move || {
        let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(3)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET /bytes/{n} HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n").unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).expect("response head");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_string();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0u64;
        loop {
            let k = s.read(&mut buf).expect("body");
            if k == 0 {
                break;
            }
            for (j, b) in buf[..k].iter().enumerate() {
                assert_eq!(*b, pattern(got + j as u64), "byte {} of the download is wrong", got + j as u64);
            }
            got += k as u64;
        }
        assert_eq!(got, n, "download length");
        head.lines().find_map(|l| l.strip_prefix("X-Backend: ")).unwrap().trim().to_string()
    })
}

fn udp_exchange(c: &Cluster, target: SocketAddr, n: usize) -> Vec<String> {
    c.client.enter(move || {
        (0..n)
            .map(|i| {
                let local = if target.is_ipv4() { topology::CLIENT4 } else { topology::CLIENT6 };
                let s = UdpSocket::bind(SocketAddr::new(local.parse().unwrap(), 0)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                s.send_to(format!("q{i}").as_bytes(), target).unwrap();
                let mut buf = [0u8; 256];
                let (k, from) = s.recv_from(&mut buf).expect("a UDP reply");
                assert_eq!(from, target, "the reply comes from the VIP");
                let text = String::from_utf8_lossy(&buf[..k]).to_string();
                assert!(text.ends_with(&format!(":q{i}")), "{text}");
                text.split(':').next().unwrap().to_string()
            })
            .collect()
    })
}

fn spread(names: &[String]) {
    for b in ["b1", "b2", "b3"] {
        assert!(names.iter().any(|n| n == b), "{b} served none of {names:?}");
    }
}

#[test]
fn two_armed_nat_serves_http_downloads_and_udp_over_ipv4_and_ipv6() {
    let c = start(NatArms::TwoArmed);
    assert_eq!(c.lb.command("sysctl").args(["-n", "net.ipv4.ip_forward"]).output().unwrap().stdout, b"0\n");
    spread(&requests(&c, vip(VIP4, 80), 60));
    spread(&requests(&c, vip(VIP6, 80), 60));
    for target in [vip(VIP4, 80), vip(VIP6, 80)] {
        download(&c, target, 100 << 20);
    }
    spread(&udp_exchange(&c, vip(VIP4, 53), 60));
    spread(&udp_exchange(&c, vip(VIP6, 53), 60));
    let s = c.wait_status(WAIT, "NAT counters", |s| s["reasons"]["nat_reply"].as_u64() > Some(1000));
    assert_eq!(s["reasons"]["drop_redirect_failed"], 0);
    assert_eq!(s["reasons"]["drop_nat_table_full"], 0);
    // Closed connections are forgotten after closed_timeout (2 s).
    let s = c.wait_status(WAIT, "closed connections collected", |s| s["nat_evicted_closed"].as_u64() >= Some(100));
    assert!(s["nat_connections"].as_u64().unwrap() < 300, "{}", s["nat_connections"]);
}

#[test]
fn one_armed_nat_serves_http_and_survives_a_restart() {
    let c = start(NatArms::OneArmed);
    spread(&requests(&c, vip(VIP4, 80), 60));
    spread(&requests(&c, vip(VIP6, 80), 60));
    download(&c, vip(VIP4, 80), 20 << 20);
    let stream = RequestStream::start(&c.client, vip(VIP4, 80), Duration::from_millis(10), 100_000);
    std::thread::sleep(Duration::from_millis(500));
    c.kill("xdplb");
    std::thread::sleep(Duration::from_secs(1));
    let path = c.dir.join("xdplb.yaml");
    c.start_xdplb("xdplb2", &path, &[]);
    c.wait_status(WAIT, "the restarted controller", |s| {
        s["xdp_mode"] == "adopted" && backend_states(s, "web4") == ["active"; 3]
    });
    std::thread::sleep(Duration::from_secs(1));
    let samples = stream.stop();
    let failed: Vec<_> = samples.iter().filter(|s| s.result.is_err()).collect();
    assert!(samples.len() > 100 && failed.is_empty(), "{} of {} failed: {failed:?}", failed.len(), samples.len());
}

#[test]
fn a_nat_server_failing_mid_stream_is_taken_out() {
    let c = start(NatArms::TwoArmed);
    let stream = RequestStream::start(&c.client, vip(VIP4, 80), Duration::from_millis(20), 100_000);
    std::thread::sleep(Duration::from_millis(500));
    c.kill_server(1);
    c.wait_backend_states("web4", &["active", "down", "active"], WAIT);
    let detected = stream.samples().len();
    std::thread::sleep(Duration::from_secs(2));
    let samples = stream.stop();
    let after = &samples[detected..];
    assert!(after.len() > 20 && after.iter().all(|s| s.result.is_ok()), "failures after detection: {after:?}");
    assert!(!after.iter().any(|s| s.result.as_deref() == Ok("b2")));
    let addr: IpAddr = c.backend4(1);
    assert!(
        c.log("xdplb").contains(&format!("backend DOWN: 2 consecutive checks failed, last: connect to {addr}:8080"))
    );
}

#[test]
fn a_reload_that_adds_the_first_nat_vip_turns_nat_on() {
    let c = cluster(NatArms::TwoArmed);
    let full = config(&c, NatArms::TwoArmed);
    let empty = full[..full.find("vips:").unwrap()].to_string() + "vips: []\n";
    let path = c.write_config("xdplb.yaml", &empty);
    c.start_xdplb("xdplb", &path, &[]);
    c.wait_status(WAIT, "the empty configuration", |s| s["vips"].as_array().is_some_and(|v| v.is_empty()));
    c.write_config("xdplb.yaml", &full);
    c.wait_backend_states("web4", &["active"; 3], WAIT);
    spread(&requests(&c, vip(VIP4, 80), 30));
}
