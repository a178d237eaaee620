//! Prometheus text exposition of the status snapshot (`GET /metrics`).

use std::fmt::Write as _;

use crate::status::Status;

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

pub fn render(s: &Status) -> String {
    let mut o = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(o, "{name}{labels} {v}");
        }
    };
    let vip = |f: &dyn Fn(&crate::status::VipStatus) -> f64| -> Vec<(String, f64)> {
        s.vips.iter().map(|v| (format!("{{vip=\"{}\"}}", esc(&v.name)), f(v))).collect()
    };
    let backend = |f: &dyn Fn(&crate::status::BackendStatus) -> f64| -> Vec<(String, f64)> {
        s.vips
            .iter()
            .flat_map(|v| {
                v.backends.iter().map(move |b| {
                    (format!("{{vip=\"{}\",backend=\"{}\",port=\"{}\"}}", esc(&v.name), esc(&b.address), b.port), f(b))
                })
            })
            .collect()
    };
    family("xdplb_vip_packets_total", "counter", "Packets received for the VIP.", vip(&|v| v.packets as f64));
    family("xdplb_vip_bytes_total", "counter", "Bytes received for the VIP.", vip(&|v| v.bytes as f64));
    family("xdplb_backend_packets_total", "counter", "Packets sent to the backend.", backend(&|b| b.packets as f64));
    family("xdplb_backend_bytes_total", "counter", "Bytes sent to the backend.", backend(&|b| b.bytes as f64));
    family(
        "xdplb_backend_up",
        "gauge",
        "1 if the backend passes its health check.",
        backend(&|b| f64::from(u8::from(b.health == "up"))),
    );
    family(
        "xdplb_backend_health_transitions_total",
        "counter",
        "Up/down changes of the backend's health.",
        backend(&|b| b.transitions as f64),
    );
    family("xdplb_backend_weight", "gauge", "Configured weight (0 = draining).", backend(&|b| b.weight as f64));
    family("xdplb_backend_flows", "gauge", "Tracked flows pointing to the backend.", backend(&|b| b.flows as f64));
    family(
        "xdplb_flows_tracked",
        "gauge",
        "Flows in the connection table.",
        vec![(String::new(), s.flows_tracked as f64)],
    );
    family(
        "xdplb_nat_connections",
        "gauge",
        "Connections in the NAT table.",
        vec![(String::new(), s.nat_connections as f64)],
    );
    family(
        "xdplb_nat_evictions_total",
        "counter",
        "NAT connections forgotten by the collector, by why.",
        vec![
            ("{reason=\"idle\"}".into(), s.nat_evicted_idle as f64),
            ("{reason=\"closed\"}".into(), s.nat_evicted_closed as f64),
        ],
    );
    family(
        "xdplb_packets_total",
        "counter",
        "Packets by what the dataplane did with them.",
        s.reasons.iter().map(|(k, v)| (format!("{{reason=\"{k}\"}}"), *v as f64)).collect(),
    );
    family(
        "xdplb_config_reloads_total",
        "counter",
        "Configuration reloads by result.",
        vec![
            ("{result=\"success\"}".into(), s.reloads_ok as f64),
            ("{result=\"failure\"}".into(), s.reloads_failed as f64),
        ],
    );
    family(
        "xdplb_apply_failures_total",
        "counter",
        "Failed attempts to write the desired state to the maps (retried every second).",
        vec![(String::new(), s.apply_failures as f64)],
    );
    family(
        "xdplb_map_drift_repairs_total",
        "counter",
        "Map entries found changed behind the controller's back, and rewritten.",
        vec![(String::new(), s.drift_repairs as f64)],
    );
    family(
        "xdplb_config_generation",
        "gauge",
        "Generation of the configuration in effect.",
        vec![(String::new(), s.config_generation as f64)],
    );
    family(
        "xdplb_config_last_reload_failed",
        "gauge",
        "1 if the last reload was rejected (the previous configuration stays in effect).",
        vec![(String::new(), f64::from(u8::from(!s.last_reload_errors.is_empty())))],
    );
    let name = |f: &dyn Fn(&crate::status::DnsStatus) -> f64| -> Vec<(String, f64)> {
        s.dns.iter().map(|d| (format!("{{name=\"{}\"}}", esc(&d.name)), f(d))).collect()
    };
    family(
        "xdplb_dns_addresses",
        "gauge",
        "Addresses a backend name resolves to (kept from the last good answer when resolution fails).",
        name(&|d| d.addresses.len() as f64),
    );
    family(
        "xdplb_dns_resolution_failures_total",
        "counter",
        "Failed resolutions of a backend name.",
        name(&|d| d.failures as f64),
    );
    family(
        "xdplb_dns_resolution_failing",
        "gauge",
        "1 if the last resolution of the backend name failed.",
        name(&|d| f64::from(u8::from(!d.last_error.is_empty()))),
    );
    family(
        "xdplb_node_drained",
        "gauge",
        "1 while the node is drained by `xdplb drain` (nothing announced, keepalived's track file says fault).",
        vec![(String::new(), f64::from(u8::from(s.node_drained)))],
    );
    let bgp = s.bgp.as_ref();
    family(
        "xdplb_bgp_route_announced",
        "gauge",
        "1 if BIRD has taken the VIP address's host route (announced to its BGP peers).",
        bgp.map_or(vec![], |b| {
            b.routes
                .iter()
                .map(|r| (format!("{{prefix=\"{}\"}}", esc(&r.prefix)), f64::from(u8::from(r.announced))))
                .collect()
        }),
    );
    family(
        "xdplb_bgp_bird_up",
        "gauge",
        "1 if BIRD took the last routes; 0 while it cannot be reached or refuses them (retried every second).",
        bgp.map_or(vec![], |b| vec![(String::new(), f64::from(u8::from(b.bird_error.is_empty())))]),
    );
    family(
        "xdplb_bgp_configure_failures_total",
        "counter",
        "Reconfigurations BIRD refused or could not be asked for.",
        bgp.map_or(vec![], |b| vec![(String::new(), b.configure_failures as f64)]),
    );
    let sync = s.flow_sync.as_ref();
    let one = |f: &dyn Fn(&crate::status::SyncStatus) -> u64| -> Vec<(String, f64)> {
        sync.map_or(vec![], |y| vec![(String::new(), f(y) as f64)])
    };
    family(
        "xdplb_sync_deviating_flows",
        "gauge",
        "Flows whose backend is not the one Maglev chooses now, at the last walk (the ones shared with the peers).",
        one(&|y| y.deviating_flows),
    );
    family("xdplb_sync_records_sent_total", "counter", "Flow records sent to the peers.", one(&|y| y.records_sent));
    family("xdplb_sync_datagrams_sent_total", "counter", "Datagrams sent to the peers.", one(&|y| y.datagrams_sent));
    family("xdplb_sync_bytes_sent_total", "counter", "Bytes sent to the peers.", one(&|y| y.bytes_sent));
    family(
        "xdplb_sync_records_received_total",
        "counter",
        "Flow records received from the peers.",
        one(&|y| y.records_received),
    );
    family(
        "xdplb_sync_flows_installed_total",
        "counter",
        "Flows installed in this node's flow table from the peers' records.",
        one(&|y| y.flows_installed),
    );
    let whys = |m: &dyn Fn(&crate::status::SyncStatus) -> &std::collections::BTreeMap<String, u64>| {
        sync.map_or(vec![], |y| m(y).iter().map(|(k, v)| (format!("{{why=\"{}\"}}", esc(k)), *v as f64)).collect())
    };
    family(
        "xdplb_sync_records_rejected_total",
        "counter",
        "Flow records received and not installed, by why.",
        whys(&|y| &y.records_rejected),
    );
    family(
        "xdplb_sync_datagrams_refused_total",
        "counter",
        "Datagrams refused (bad key, replayed, too old, unknown peer, malformed), by why.",
        whys(&|y| &y.datagrams_refused),
    );
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    family(
        "xdplb_sync_peer_last_heard_seconds",
        "gauge",
        "Seconds since a valid datagram came from the peer (absent until one came).",
        sync.map_or(vec![], |y| {
            y.peers
                .iter()
                .filter(|p| p.last_heard_unix_ms != 0)
                .map(|p| {
                    let age = now.saturating_sub(p.last_heard_unix_ms) as f64 / 1000.0;
                    (format!("{{peer=\"{}\"}}", esc(&p.address)), age)
                })
                .collect()
        }),
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{BgpStatus, PeerStatus, RouteStatus, SyncStatus};

    #[test]
    fn bgp_and_flow_sync_export_their_routes_bird_and_counters() {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        let s = Status {
            node_drained: true,
            bgp: Some(BgpStatus {
                bird_error: "cannot reach BIRD".into(),
                configure_failures: 3,
                routes: vec![
                    RouteStatus { prefix: "198.18.0.10/32".into(), announced: true, ..Default::default() },
                    RouteStatus { prefix: "2001:db8::10/128".into(), announced: false, ..Default::default() },
                ],
                ..Default::default()
            }),
            flow_sync: Some(SyncStatus {
                peers: vec![
                    PeerStatus {
                        address: "198.18.0.2:7946".into(),
                        last_heard_unix_ms: now - 3000,
                        ..Default::default()
                    },
                    PeerStatus { address: "198.18.0.3:7946".into(), ..Default::default() },
                ],
                deviating_flows: 7,
                records_sent: 11,
                records_rejected: [("rate limit".to_string(), 2)].into(),
                datagrams_refused: [("bad key".to_string(), 5)].into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let text = render(&s);
        for line in [
            "xdplb_node_drained 1",
            "xdplb_bgp_route_announced{prefix=\"198.18.0.10/32\"} 1",
            "xdplb_bgp_route_announced{prefix=\"2001:db8::10/128\"} 0",
            "xdplb_bgp_bird_up 0",
            "xdplb_bgp_configure_failures_total 3",
            "xdplb_sync_deviating_flows 7",
            "xdplb_sync_records_sent_total 11",
            "xdplb_sync_records_rejected_total{why=\"rate limit\"} 2",
            "xdplb_sync_datagrams_refused_total{why=\"bad key\"} 5",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
        }
        let heard: Vec<&str> = text.lines().filter(|l| l.starts_with("xdplb_sync_peer_last_heard_seconds{")).collect();
        assert_eq!(heard.len(), 1, "only the peer heard from: {heard:?}");
        let age: f64 = heard[0]
            .strip_prefix("xdplb_sync_peer_last_heard_seconds{peer=\"198.18.0.2:7946\"} ")
            .unwrap()
            .parse()
            .unwrap();
        assert!((3.0..60.0).contains(&age), "{age}");

        let off = render(&Status::default());
        assert!(off.contains("xdplb_node_drained 0"));
        assert!(!off.lines().any(|l| l.starts_with("xdplb_bgp_bird_up ") || l.starts_with("xdplb_sync_")), "{off}");
    }
}
