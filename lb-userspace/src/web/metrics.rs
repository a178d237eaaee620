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
    o
}
