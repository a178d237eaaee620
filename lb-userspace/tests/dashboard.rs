//! The Grafana dashboard the package installs only queries metrics and
//! labels that `/metrics` really exports: renaming a metric or a label in
//! web/metrics.rs without updating packaging/grafana-dashboard.json fails here.

use std::collections::{BTreeMap, BTreeSet};

use lb_userspace::{
    status::{BackendStatus, Status, VipStatus},
    web::metrics,
};
use serde_json::Value;

const DASHBOARD: &str = include_str!("../../packaging/grafana-dashboard.json");

/// Labels Prometheus adds to every scraped series.
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

/// Every metric family `/metrics` emits, with its label names, from a status
/// that has one of everything (a VIP, a backend, a reason).
fn exported() -> BTreeMap<String, BTreeSet<String>> {
    let status = Status {
        reasons: [("tx".to_string(), 1)].into(),
        vips: vec![VipStatus {
            name: "web".into(),
            backends: vec![BackendStatus { address: "198.18.0.11".into(), health: "up".into(), ..Default::default() }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut families: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in metrics::render(&status).lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            families.entry(rest.split(' ').next().unwrap().to_string()).or_default();
        } else if !line.starts_with('#') {
            let name_end = line.find(['{', ' ']).expect("a sample line has a name");
            let labels = families.entry(line[..name_end].to_string()).or_default();
            if line[name_end..].starts_with('{') {
                labels.extend(label_keys(&line[name_end + 1..]));
            }
        }
    }
    families
}

/// The label names of a selector or sample, `a="x",b=~"y"}...`: every key
/// before an operator, skipping the quoted values.
fn label_keys(s: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut chars = s.chars().peekable();
    let mut key = String::new();
    while let Some(c) = chars.next() {
        match c {
            '}' => break,
            '=' | '!' => {
                keys.push(key.trim().to_string());
                key.clear();
                // The rest of the operator, then the quoted value.
                while chars.next_if(|c| *c != '"').is_some() {}
                chars.next();
                while let Some(v) = chars.next() {
                    match v {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
            }
            ',' => key.clear(),
            c => key.push(c),
        }
    }
    keys
}

/// The names of every `xdplb_...` metric in a PromQL expression.
fn metric_names(expr: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut i = 0;
    while let Some(pos) = expr[i..].find("xdplb_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && ident(bytes[end]) {
            end += 1;
        }
        if start == 0 || !ident(bytes[start - 1]) {
            out.push((expr[start..end].to_string(), end));
        }
        i = end;
    }
    out
}

/// The labels an expression names outside selectors: `by (...)`,
/// `without (...)`, and the label argument of `label_values(metric, label)`.
fn grouping_labels(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    for word in ["by", "without"] {
        let mut rest = expr;
        while let Some(pos) = rest.find(&format!("{word} (")) {
            let args = &rest[pos + word.len() + 2..];
            let close = args.find(')').expect("a closed grouping");
            out.extend(args[..close].split(',').map(|l| l.trim().to_string()).filter(|l| !l.is_empty()));
            rest = &args[close..];
        }
    }
    if let Some(args) = expr.trim().strip_prefix("label_values(").and_then(|a| a.strip_suffix(')')) {
        out.extend(args.rsplit_once(',').map(|(_, label)| label.trim().to_string()));
    }
    out
}

/// Every PromQL string in the dashboard: panel targets and variable queries.
fn expressions(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition" | "query", Value::String(s)) if s.contains("xdplb_") => out.push(s.clone()),
                    _ => expressions(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| expressions(v, out)),
        _ => {}
    }
}

#[test]
fn the_dashboard_uses_only_exported_metrics_and_labels() {
    let families = exported();
    assert!(families.len() >= 10, "metrics.rs exports {families:?}");
    let dashboard: Value = serde_json::from_str(DASHBOARD).expect("grafana-dashboard.json is JSON");
    let mut exprs = Vec::new();
    expressions(&dashboard, &mut exprs);
    let mut used = BTreeSet::new();
    let mut problems = Vec::new();
    for expr in &exprs {
        let names = metric_names(expr);
        let mut known_labels: BTreeSet<String> = TARGET_LABELS.iter().map(|l| l.to_string()).collect();
        for (name, end) in &names {
            used.insert(name.clone());
            let Some(labels) = families.get(name) else {
                problems.push(format!("{name} is not exported by metrics.rs (in `{expr}`)"));
                continue;
            };
            known_labels.extend(labels.iter().cloned());
            if expr[*end..].starts_with('{') {
                for key in label_keys(&expr[end + 1..]) {
                    if !labels.contains(&key) && !TARGET_LABELS.contains(&key.as_str()) {
                        problems.push(format!("{name} has no label `{key}` (it has {labels:?}; in `{expr}`)"));
                    }
                }
            }
        }
        for label in grouping_labels(expr) {
            if !known_labels.contains(&label) {
                problems.push(format!("no metric of `{expr}` has the label `{label}`"));
            }
        }
    }
    assert!(problems.is_empty(), "the dashboard does not match metrics.rs:\n{}", problems.join("\n"));
    // Not vacuous: the panels really query the exported families.
    assert!(used.len() >= 10, "the dashboard uses only {used:?}");
}

#[test]
fn the_dashboard_has_a_datasource_variable_that_every_panel_uses() {
    let dashboard: Value = serde_json::from_str(DASHBOARD).unwrap();
    let vars = dashboard["templating"]["list"].as_array().expect("templating variables");
    assert!(
        vars.iter().any(|v| v["type"] == "datasource" && v["name"] == "datasource" && v["query"] == "prometheus"),
        "a Prometheus datasource variable named `datasource`"
    );
    let panels = dashboard["panels"].as_array().expect("panels");
    for p in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {}", p["title"]);
        assert!(p["targets"].as_array().is_some_and(|t| !t.is_empty()), "panel {} has no query", p["title"]);
    }
}

#[test]
fn the_checker_itself_finds_names_and_labels() {
    assert_eq!(
        metric_names(r#"8 * sum by (vip) (rate(xdplb_vip_bytes_total{vip=~"$vip"}[5m])) / xdplb_flows_tracked"#)
            .into_iter()
            .map(|(n, _)| n)
            .collect::<Vec<_>>(),
        ["xdplb_vip_bytes_total", "xdplb_flows_tracked"]
    );
    assert_eq!(label_keys(r#"instance=~"$i", reason!~"a,\"b}", vip="x"} 1"#), ["instance", "reason", "vip"]);
    assert_eq!(grouping_labels("sum by (vip, backend) (x) / sum without (port) (y)"), ["vip", "backend", "port"]);
    assert_eq!(grouping_labels(r#"label_values(xdplb_vip_packets_total{instance=~"$i"}, vip)"#), ["vip"]);
    // A renamed metric is caught.
    assert!(!exported().contains_key("xdplb_vip_packets"));
}
