use super::*;

const GOOD: &str = r#"
interface: eth0
xdp_mode: auto
metrics_listen: 127.0.0.1:9464
vips:
  - name: web
    address: 198.18.0.100
    port: 80
    protocol: tcp
    forwarding: dsr
    hash: five-tuple
    backends:
      - address: 198.18.0.11
        weight: 1
      - address: 198.18.0.12
        weight: 0
    health_check:
      type: http
      path: /
      expect_status: 200
      interval: 1s
      timeout: 500ms
      rise: 2
      fall: 3
  - name: dns6
    address: 2001:db8::53
    port: 53
    protocol: udp
    forwarding: ipip
    hash: source-ip
    table_size: 4099
    backends:
      - address: 2001:db8::1
"#;

#[test]
fn the_issue_example_parses() {
    let c = parse("cluster.yaml", GOOD).unwrap();
    assert_eq!(c.interface.as_deref(), Some("eth0"));
    assert_eq!(c.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
    assert_eq!(c.vips.len(), 2);
    let web = &c.vips[0];
    assert_eq!((web.port, web.protocol, web.forwarding), (80, Protocol::Tcp, Forwarding::Dsr));
    assert_eq!(web.backends[1].weight, 0);
    assert_eq!(web.health_check.timeout, Duration::from_millis(500));
    assert_eq!(web.table_size, 65_537);
    let CheckKind::Http { expect_status, .. } = &web.health_check.kind else { panic!() };
    assert!(expect_status.matches(200) && !expect_status.matches(201));
    let dns = &c.vips[1];
    assert_eq!((dns.hash, dns.table_size, dns.protocol), (HashMode::SourceIp, 4099, Protocol::Udp));
    assert_eq!(dns.health_check, HealthCheck::default());
}

#[test]
fn every_error_is_reported_with_file_line_column_and_field() {
    let bad = r#"
interfce: eth0
vips:
  - name: web
    address: 198.18.0.300
    port: 80
    forwarding: magic
    backends:
      - address: 198.18.0.11
        weight: -1
    health_check:
      interval: 5
      timeout: 2x
  - name: web
    address: 198.18.0.100
    port: 80
    table_size: 65536
    backends: []
"#;
    let errs = parse("c.yaml", bad).unwrap_err();
    let text = errs.to_string();
    let lines: Vec<&str> = text.lines().collect();
    for want in [
        "c.yaml:2:1: interfce: unknown key",
        "c.yaml:5:14: vips[0].address: `198.18.0.300` is not an IPv4 or IPv6 address",
        "c.yaml:7:17: vips[0].forwarding: `magic` is not one of dsr, ipip, nat",
        "c.yaml:10:17: vips[0].backends[0].weight: `-1` is not a weight",
        "c.yaml:12:17: vips[0].health_check.interval: `5` needs a unit",
        "c.yaml:13:16: vips[0].health_check.timeout: unknown unit `x`",
        "c.yaml:17:17: vips[1].table_size: 65536 is not prime (Maglev needs a prime; the next one is 65537)",
    ] {
        assert!(lines.iter().any(|l| l.contains(want)), "missing `{want}` in:\n{text}");
    }
}

#[test]
fn required_fields_and_shapes() {
    let errs = parse("c.yaml", "vips:\n  - name: x\n    port: 0\n    backends: {}\n").unwrap_err().to_string();
    assert!(errs.contains("c.yaml:2:5: vips[0].address: is required"), "{errs}");
    assert!(errs.contains("vips[0].port: `0` is not a port"), "{errs}");
    assert!(errs.contains("vips[0].backends: must be a list, not a mapping"), "{errs}");
    let errs = parse("c.yaml", "vips: [\n").unwrap_err().to_string();
    assert!(errs.starts_with("c.yaml:"), "{errs}");
}

#[test]
fn same_address_port_protocol_twice_is_an_error() {
    let t = "vips:\n  - {name: a, address: 198.18.0.1, port: 80, backends: []}\n  - {name: b, address: 198.18.0.1, port: 80, backends: []}\n";
    let names = t.replace("name: b", "name: a").replace("port: 80, backends: []}\n", "port: 81, backends: []}\n");
    let errs = parse("c.yaml", &names).unwrap_err().to_string();
    assert!(errs.contains("c.yaml:3:6: vips[1].name: `a` is already the name of the VIP at line 2"), "{errs}");
    let errs = parse("c.yaml", t).unwrap_err().to_string();
    assert!(errs.contains("vips[1].address: 198.18.0.1:80/tcp is already used by VIP `a`"), "{errs}");
    // Another protocol on the same address and port is a different VIP.
    let ok = t.replace("port: 80, backends: []}\n  - {name: b", "port: 80, backends: []}\n  - {protocol: udp, name: b");
    parse("c.yaml", &ok).unwrap();
}

#[test]
fn families_must_match() {
    let t = "vips:\n  - name: a\n    address: 198.18.0.1\n    port: 80\n    backends:\n      - address: 2001:db8::1\n";
    let errs = parse("c.yaml", t).unwrap_err().to_string();
    assert!(
        errs.contains("c.yaml:6:9: vips[0].backends[0].address: 2001:db8::1 is not of the VIP's address family"),
        "{errs}"
    );
}

#[test]
fn health_check_variants() {
    let t = r#"
vips:
  - name: a
    address: 198.18.0.1
    port: 80
    backends: [{address: 198.18.0.2}]
    health_check:
      type: exec
      command: [/bin/true, --fast]
      port: 8080
      source: 198.18.0.9
      initial_state: up
  - name: b
    address: 198.18.0.1
    port: 81
    backends: [{address: 198.18.0.2}]
    health_check:
      type: http
      expect_status: [200, "300-399"]
      expect_body: ok
      host: www.example
"#;
    let c = parse("c.yaml", t).unwrap();
    assert_eq!(c.vips[0].health_check.kind, CheckKind::Exec { command: vec!["/bin/true".into(), "--fast".into()] });
    assert_eq!(c.vips[0].health_check.initial_state, InitialState::Up);
    let CheckKind::Http { expect_status, host, expect_body, .. } = &c.vips[1].health_check.kind else { panic!() };
    assert!(expect_status.matches(200) && expect_status.matches(302) && !expect_status.matches(204));
    assert_eq!((host.as_deref(), expect_body.as_deref()), (Some("www.example"), Some("ok")));
    let errs = parse("c.yaml", &t.replace("type: exec", "type: tcp")).unwrap_err().to_string();
    assert!(errs.contains("vips[0].health_check.command: only applies to checks of type exec"), "{errs}");
}

#[test]
fn durations() {
    use fields::parse_duration as d;
    assert_eq!(d("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(d("2s"), Ok(Duration::from_secs(2)));
    assert_eq!(d("1.5s"), Ok(Duration::from_millis(1500)));
    assert_eq!(d("1m"), Ok(Duration::from_secs(60)));
    assert!(d("0s").is_err() && d("5").is_err() && d("fast").is_err());
}

fn one_check(check: &str) -> Result<HealthCheck, ConfigErrors> {
    let text = format!(
        "vips:\n  - name: t\n    address: 198.18.100.1\n    port: 80\n    backends: [{{address: 198.18.0.11}}]\n    health_check: {check}\n"
    );
    parse("c.yaml", &text).map(|c| c.vips[0].health_check.clone())
}

#[test]
fn tcp_send_expect_as_text_or_hex() {
    let c = one_check(r#"{type: tcp, send: "PING\r\n", expect: "+PONG"}"#).unwrap();
    assert_eq!(c.kind, CheckKind::Tcp { send: Some(b"PING\r\n".to_vec()), expect: Some(b"+PONG".to_vec()) });
    let c = one_check("{type: tcp, send_hex: 0d0a 00ff, expect_hex: 4d617269}").unwrap();
    assert_eq!(c.kind, CheckKind::Tcp { send: Some(vec![13, 10, 0, 255]), expect: Some(b"Mari".to_vec()) });
    let e = one_check("{type: tcp, send: a, send_hex: 61}").unwrap_err().to_string();
    assert!(e.contains("health_check.send_hex: give either send or send_hex, not both"), "{e}");
    let e = one_check("{type: tcp, expect_hex: 0g}").unwrap_err().to_string();
    assert!(e.contains("health_check.expect_hex: `0g` is not hex"), "{e}");
    let e = one_check("{type: tcp, expect_hex: abc}").unwrap_err().to_string();
    assert!(e.contains("is not an even number of hex digits"), "{e}");
    let e = one_check("{type: http, expect: x}").unwrap_err().to_string();
    assert!(e.contains("health_check.expect: only applies to checks of type tcp"), "{e}");
}

#[test]
fn https_takes_sni_from_sni_or_host_and_needs_a_readable_ca_file() {
    let c = one_check("{type: https, host: \"web.example:8443\"}").unwrap();
    let CheckKind::Http { tls: Some(tls), .. } = c.kind else { panic!() };
    assert_eq!(tls, TlsCheck { sni: Some("web.example".into()), ca_file: None });
    let c = one_check("{type: https, host: 198.18.0.11, sni: api.example}").unwrap();
    let CheckKind::Http { tls: Some(tls), host, .. } = c.kind else { panic!() };
    assert_eq!((tls.sni.as_deref(), host.as_deref()), (Some("api.example"), Some("198.18.0.11")));
    let c = one_check("{type: https}").unwrap();
    assert!(matches!(c.kind, CheckKind::Http { tls: Some(TlsCheck { sni: None, ca_file: None }), .. }));
    let c = one_check("{type: http}").unwrap();
    assert!(matches!(c.kind, CheckKind::Http { tls: None, .. }));
    let e = one_check("{type: https, ca_file: /nonexistent/ca.pem}").unwrap_err().to_string();
    assert!(e.starts_with("c.yaml:6:") && e.contains("health_check.ca_file: cannot read /nonexistent/ca.pem"), "{e}");
    let not_pem = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let e = one_check(&format!("{{type: https, ca_file: {not_pem}}}")).unwrap_err().to_string();
    assert!(e.contains("holds no PEM certificate"), "{e}");
    let e = one_check("{type: https, ca_file: ca.pem}").unwrap_err().to_string();
    assert!(e.contains("health_check.ca_file: `ca.pem` must be an absolute path"), "{e}");
    // A device or a directory is never read (a FIFO or /dev/zero would hang a reload).
    for path in ["/dev/zero", "/etc"] {
        let e = one_check(&format!("{{type: https, ca_file: {path}}}")).unwrap_err().to_string();
        assert!(e.contains("must be a regular file of PEM certificates, at most 1 MiB"), "{e}");
    }
    let e = one_check("{type: https, sni: \"not a name\"}").unwrap_err().to_string();
    assert!(e.contains("health_check.sni: `not a name` is not a DNS name"), "{e}");
    let e = one_check("{type: http, sni: web.example}").unwrap_err().to_string();
    assert!(e.contains("health_check.sni: only applies to checks of type https"), "{e}");
}

#[test]
fn backends_by_name_and_resolvers() {
    let text = "resolvers:\n  nameservers: [198.18.0.53, \"[2001:db8::53]:5353\"]\n  interval: 2s\n  hold_obsolete: 1m\nvips:\n  - name: web\n    address: 198.18.100.1\n    port: 80\n    backends:\n      - address: Web.Pool.Test.\n        weight: 4\n      - address: 198.18.0.11\n";
    let c = parse("c.yaml", text).unwrap();
    assert_eq!(c.resolvers.nameservers, ["198.18.0.53:53".parse().unwrap(), "[2001:db8::53]:5353".parse().unwrap()]);
    assert_eq!((c.resolvers.interval, c.resolvers.hold_obsolete), (Duration::from_secs(2), Duration::from_secs(60)));
    assert_eq!(c.resolvers.timeout, Resolvers::default().timeout);
    assert_eq!(c.vips[0].backends.len(), 1);
    let n = &c.vips[0].named_backends[0];
    assert_eq!((n.name.as_str(), n.weight, n.pos.line), ("web.pool.test", 4, 10));
    // No resolvers section: the system's.
    let c =
        parse("c.yaml", "vips:\n  - {name: w, address: 198.18.100.1, port: 80, backends: [{address: db}]}\n").unwrap();
    assert!(c.resolvers.nameservers.is_empty() && c.vips[0].named_backends[0].name == "db");

    let bad = "resolvers:\n  nameservers: [dns.example]\n  timeout: 5s\n  interval: 1s\nvips:\n  - name: web\n    address: 198.18.100.1\n    port: 80\n    backends:\n      - address: -bad-.example\n      - address: web.example\n      - address: web.example\n";
    let e = parse("c.yaml", bad).unwrap_err().to_string();
    assert!(e.contains("c.yaml:2:17: resolvers.nameservers: `dns.example` is not an address or address:port"), "{e}");
    assert!(e.contains("c.yaml:3:12: resolvers.timeout: must not be longer than interval"), "{e}");
    assert!(
        e.contains("vips[0].backends[0].address: `-bad-.example` is not an IPv4 or IPv6 address or a DNS name"),
        "{e}"
    );
    assert!(e.contains("c.yaml:12:9: vips[0].backends[2].address: web.example is listed twice"), "{e}");
    let e =
        parse("c.yaml", "vips:\n  - {name: w, address: 198.18.100.1, port: 80, backends: [{address: 198.18.0.999}]}\n")
            .unwrap_err()
            .to_string();
    assert!(e.contains("`198.18.0.999` is not an IPv4 or IPv6 address or a DNS name"), "{e}");
}

#[test]
fn addresses_that_cannot_be_a_vip_or_a_server_are_rejected() {
    let cases = [
        ("0.0.0.0", "198.18.0.11", "vips[0].address: 0.0.0.0 cannot be a VIP: it is the unspecified address"),
        ("255.255.255.255", "198.18.0.11", "it is the broadcast address"),
        ("224.0.0.1", "198.18.0.11", "224.0.0.1 cannot be a VIP: it is a multicast address"),
        (
            "198.18.100.1",
            "127.0.0.1",
            "vips[0].backends[0].address: 127.0.0.1 cannot be a backend: it is a loopback address",
        ),
        ("2001:db8:100::1", "::", ":: cannot be a backend: it is the unspecified address"),
        ("ff02::1", "2001:db8::11", "ff02::1 cannot be a VIP: it is a multicast address"),
        ("::ffff:198.18.100.1", "2001:db8::11", "it is an IPv4-mapped address (write the IPv4 address)"),
    ];
    for (vip, backend, want) in cases {
        let text =
            format!("vips:\n  - {{name: w, address: \"{vip}\", port: 80, backends: [{{address: \"{backend}\"}}]}}\n");
        let e = parse("c.yaml", &text).unwrap_err().to_string();
        assert!(e.contains(want), "{vip} / {backend}: {e}");
    }
    let sorry = "vips:\n  - {name: w, address: 198.18.100.1, port: 80, backends: [{address: 198.18.0.11}], on_all_down: sorry_server, sorry_server: {address: 127.0.0.1}}\n";
    assert!(parse("c.yaml", sorry).unwrap_err().to_string().contains("127.0.0.1 cannot be a sorry server"));
}

#[test]
fn exec_commands_start_with_an_absolute_path() {
    let e = one_check("{type: exec, command: [check.sh, --fast]}").unwrap_err().to_string();
    assert!(
        e.contains("health_check.command: must be a list of words starting with an absolute path")
            && e.contains("`check.sh`"),
        "{e}"
    );
    let e = one_check("{type: exec, command: [/bin/check, [nested]]}").unwrap_err().to_string();
    assert!(e.contains("must be a list of words"), "{e}");
    assert!(one_check("{type: exec, command: [/bin/true]}").is_ok());
}

#[test]
fn vips_is_required_so_an_empty_file_is_no_configuration() {
    for empty in ["", "\n", "# nothing yet\n", "interface: eth0\n"] {
        let e = parse("c.yaml", empty).unwrap_err().to_string();
        assert!(e.contains("c.yaml:1:1: vips: is required (write `vips: []` for a configuration without VIPs)"), "{e}");
    }
    assert!(parse("c.yaml", "vips: []\n").unwrap().vips.is_empty());
}

/// A directory of key files for one test, removed with it.
struct KeyDir(std::path::PathBuf);

impl KeyDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("xdplb-config-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// Writes a key file of `mode`; returns its path.
    fn key(&self, name: &str, bytes: &[u8], mode: u32) -> String {
        use std::os::unix::fs::PermissionsExt as _;
        let path = self.0.join(name);
        std::fs::write(&path, bytes).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path.to_str().unwrap().to_string()
    }
}

impl Drop for KeyDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `flow_sync:` section with `key_file: KEY` on line 6 (value at column 13).
const FLOW_SYNC: &str = "flow_sync:
  listen: 198.18.40.11:7946
  peers:
    - 198.18.40.12:7946
    - \"[2001:db8::13]:7946\"
  key_file: KEY
  refresh: 5s
  max_rate: 20000
vips: []
";

/// The errors of `FLOW_SYNC` with `key` as its key file and `edits` made, one per line.
fn flow_sync_errors(key: &str, edits: &[(&str, &str)]) -> String {
    let mut text = FLOW_SYNC.replace("KEY", key);
    for (from, to) in edits {
        assert!(text.contains(from), "`{from}` is not in the text");
        text = text.replace(from, to);
    }
    parse("c.yaml", &text).unwrap_err().to_string()
}

#[test]
fn flow_sync_parses_and_its_key_file_is_checked() {
    let dir = KeyDir::new("key");
    let good = dir.key("good.key", b"0123456789abcdef\n\n", 0o600);
    let c = parse("c.yaml", &FLOW_SYNC.replace("KEY", &good)).unwrap();
    let fs = c.flow_sync.unwrap();
    assert_eq!(fs.listen, "198.18.40.11:7946".parse().unwrap());
    assert_eq!(fs.peers, ["198.18.40.12:7946".parse().unwrap(), "[2001:db8::13]:7946".parse().unwrap()]);
    assert_eq!((fs.refresh, fs.max_rate), (Duration::from_secs(5), 20_000));
    assert_eq!(fs.key.bytes, b"0123456789abcdef", "the trailing newlines are not part of the key");
    assert_eq!(format!("{:?}", fs.key), format!("SyncKey({good}, 16 bytes)"), "never the secret");
    // Defaults.
    let c = parse("c.yaml", &FLOW_SYNC.replace("KEY", &good).replace("  refresh: 5s\n  max_rate: 20000\n", ""));
    let fs = c.unwrap().flow_sync.unwrap();
    assert_eq!((fs.refresh, fs.max_rate), (ha::DEFAULT_SYNC_REFRESH, ha::DEFAULT_SYNC_MAX_RATE));
    // 4 KiB is the most.
    let longest = dir.key("longest.key", &[b'k'; 4096], 0o400);
    assert_eq!(parse("c.yaml", &FLOW_SYNC.replace("KEY", &longest)).unwrap().flow_sync.unwrap().key.bytes.len(), 4096);

    let group = dir.key("group.key", b"0123456789abcdef", 0o640);
    let other = dir.key("other.key", b"0123456789abcdef", 0o604);
    let short = dir.key("short.key", b"0123456789abcde\n", 0o600);
    let long = dir.key("long.key", &[b'k'; 4097], 0o600);
    let dir_path = dir.0.to_str().unwrap().to_string();
    let cases = [
        ("sync.key".to_string(), "`sync.key` must be an absolute path".to_string()),
        (
            "/nonexistent/sync.key".to_string(),
            "cannot read /nonexistent/sync.key: No such file or directory (os error 2)".to_string(),
        ),
        (group.clone(), format!("{group} can be read by others: `chmod 600 {group}`")),
        (other.clone(), format!("{other} can be read by others: `chmod 600 {other}`")),
        (
            short.clone(),
            format!(
                "{short} holds 15 bytes; a key needs at least 16 (e.g. `head -c 32 /dev/urandom | base64 > {short}`)"
            ),
        ),
        (long.clone(), format!("{long} must be a regular file of at most 4 KiB")),
        (dir_path.clone(), format!("{dir_path} must be a regular file of at most 4 KiB")),
    ];
    for (key, want) in cases {
        let e = flow_sync_errors(&key, &[]);
        assert_eq!(e, format!("c.yaml:6:13: flow_sync.key_file: {want}"));
    }
}

#[test]
fn flow_sync_errors_name_their_line_and_field() {
    let dir = KeyDir::new("fields");
    let key = dir.key("k", b"0123456789abcdef", 0o600);
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("- \"[2001:db8::13]:7946\"", "- 198.18.40.11:7946")],
            "c.yaml:5:7: flow_sync.peers: 198.18.40.11:7946 is this node's own listen address",
        ),
        (
            &[("- \"[2001:db8::13]:7946\"", "- 198.18.40.12:7946")],
            "c.yaml:5:7: flow_sync.peers: 198.18.40.12:7946 is listed twice",
        ),
        (
            &[("    - 198.18.40.12:7946\n    - \"[2001:db8::13]:7946\"\n", ""), ("  peers:\n", "  peers: []\n")],
            "c.yaml:3:10: flow_sync.peers: needs at least one peer",
        ),
        (
            &[("    - 198.18.40.12:7946\n    - \"[2001:db8::13]:7946\"\n", ""), ("  peers:\n", "")],
            "c.yaml:2:3: flow_sync.peers: is required (the other nodes' listen addresses)",
        ),
        (
            &[("- 198.18.40.12:7946", "- 198.18.40.12")],
            "c.yaml:4:7: flow_sync.peers: `198.18.40.12` is not an address:port (e.g. 198.18.0.11:7946, \
             [2001:db8::11]:7946)",
        ),
        (
            &[("- 198.18.40.12:7946", "- [198.18.40.12:7946]")],
            "c.yaml:4:7: flow_sync.peers: must be a list of address:port",
        ),
        (
            &[("max_rate: 20000", "max_rate: 99")],
            "c.yaml:8:13: flow_sync.max_rate: `99` is not a number of flows per second from 100 to 10000000",
        ),
        (
            &[("max_rate: 20000", "max_rate: 10000001")],
            "c.yaml:8:13: flow_sync.max_rate: `10000001` is not a number of flows per second from 100 to 10000000",
        ),
        (
            &[("max_rate: 20000", "max_rate: -5")],
            "c.yaml:8:13: flow_sync.max_rate: `-5` is not a number of flows per second from 100 to 10000000",
        ),
        (
            &[("listen: 198.18.40.11:7946", "listen: 198.18.40.11:0")],
            "c.yaml:2:11: flow_sync.listen: `198.18.40.11:0` needs a port other than 0",
        ),
        (
            &[("listen: 198.18.40.11:7946", "listen: 0.0.0.0:7946")],
            "c.yaml:2:11: flow_sync.listen: 0.0.0.0 cannot be a flow sync address: it is the unspecified address",
        ),
        (&[("  listen: 198.18.40.11:7946\n", "")], "c.yaml:2:3: flow_sync.listen: is required"),
        (&[("refresh: 5s", "refresh: 5")], "c.yaml:7:12: flow_sync.refresh: `5` needs a unit: ms, s or m (e.g. 5s)"),
        (
            &[("refresh: 5s", "refresh: 0s")],
            "c.yaml:7:12: flow_sync.refresh: `0s` is out of range (more than 0, at most a day)",
        ),
        (
            &[("  refresh: 5s\n", "  refresh: 5s\n  mtu: 1400\n")],
            "c.yaml:8:3: flow_sync.mtu: unknown key (known here: listen, peers, key_file, refresh, max_rate)",
        ),
    ];
    for (edits, want) in cases {
        assert_eq!(flow_sync_errors(&key, edits), *want, "{edits:?}");
    }
}

#[test]
fn bgp_durations_and_paths() {
    let c = parse(
        "c.yaml",
        "bgp:\n  routes_file: /run/xdplb/eth0.bird.conf\n  bird_socket: /run/bird2.ctl\n  warmup: 0s\n  withdraw_wait: 500ms\nvips: []\n",
    )
    .unwrap();
    let bgp = c.bgp.unwrap();
    assert_eq!(bgp.routes_file.as_deref(), Some(std::path::Path::new("/run/xdplb/eth0.bird.conf")));
    assert_eq!(bgp.bird_socket, std::path::Path::new("/run/bird2.ctl"));
    assert_eq!((bgp.warmup, bgp.withdraw_wait), (Duration::ZERO, Duration::from_millis(500)));
    let c = parse("c.yaml", "bgp:\n  warmup: 0\n  withdraw_wait: 0\nvips: []\n").unwrap();
    let bgp = c.bgp.unwrap();
    assert_eq!((bgp.warmup, bgp.withdraw_wait), (Duration::ZERO, Duration::ZERO));
    assert_eq!(parse("c.yaml", "bgp: {}\nvips: []\n").unwrap().bgp, Some(BgpSettings::default()));

    let bad = "bgp:\n  routes_file: xdplb.bird.conf\n  bird_socket: bird.ctl\n  warmup: 5\n  withdraw_wait: 2 hours\nvips: []\n";
    let e = parse("c.yaml", bad).unwrap_err().to_string();
    let lines: Vec<&str> = e.lines().collect();
    assert_eq!(
        lines,
        [
            "c.yaml:2:16: bgp.routes_file: `xdplb.bird.conf` must be an absolute path",
            "c.yaml:3:16: bgp.bird_socket: `bird.ctl` must be an absolute path",
            "c.yaml:4:11: bgp.warmup: `5` needs a unit: ms, s or m (e.g. 5s)",
            "c.yaml:5:18: bgp.withdraw_wait: unknown unit `hours` in `2 hours` (use ms, s or m)",
        ]
    );
}

#[test]
fn conntrack_limits_and_the_hash_seed_file() {
    let dir = KeyDir::new("seed");
    let seed = dir.key("seed.key", b"0123456789abcdef-seed\n", 0o600);
    let c = parse("c.yaml", "vips: []\n").unwrap();
    assert_eq!((c.conntrack_udp_idle, c.conntrack_flood_rate), (Duration::from_secs(30), 125_000), "defaults");
    assert!(c.hash_seed_file.is_none());
    let text = format!("conntrack_udp_idle: 2m\nconntrack_flood_rate: 0\nhash_seed_file: {seed}\nvips: []\n");
    let c = parse("c.yaml", &text).unwrap();
    assert_eq!((c.conntrack_udp_idle, c.conntrack_flood_rate), (Duration::from_secs(120), 0));
    assert_eq!(c.hash_seed_file.unwrap().bytes, b"0123456789abcdef-seed");

    let group = dir.key("group.key", b"0123456789abcdef", 0o640);
    let cases = [
        (
            "conntrack_udp_idle: 500ms",
            "1:21: conntrack_udp_idle: `500ms` is shorter than 1s (the dataplane counts whole seconds)",
        ),
        (
            "conntrack_flood_rate: 10",
            "1:23: conntrack_flood_rate: `10` is not 0 (no limit) or a number of new flows per second per CPU of 1000 or more",
        ),
        ("hash_seed_file: seed.key", "1:17: hash_seed_file: `seed.key` must be an absolute path"),
    ];
    for (line, want) in cases {
        assert_eq!(parse("c.yaml", &format!("{line}\nvips: []\n")).unwrap_err().to_string(), format!("c.yaml:{want}"));
    }
    let e = parse("c.yaml", &format!("hash_seed_file: {group}\nvips: []\n")).unwrap_err().to_string();
    assert_eq!(e, format!("c.yaml:1:17: hash_seed_file: {group} can be read by others: `chmod 600 {group}`"));
}
