//! `xdplb show`: the compact view of `ipvsadm -Ln` — a row per backend
//! under its VIP, with the scheduler, the forwarding method, the weight in
//! effect (and the file's, when a runtime override changes it), the state,
//! the flows it holds and how long it has been in that state.

use crate::status::{self, Status};

/// How long ago `since_ms` was, at `now_ms`: `42s`, `3m07s`, `2h05m`, `3d04h`;
/// `-` when not known.
pub fn age(since_ms: u64, now_ms: u64) -> String {
    if since_ms == 0 {
        return "-".into();
    }
    let s = now_ms.saturating_sub(since_ms) / 1000;
    match s {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// The weight column: the one in effect, and the file's when they differ
/// by an override (`0 (file: 1)`).
fn weight(b: &status::BackendStatus) -> String {
    if b.r#override.is_empty() || b.weight == b.configured_weight {
        b.weight.to_string()
    } else {
        format!("{} (file: {})", b.weight, b.configured_weight)
    }
}

/// The table `xdplb show` prints, ages taken at `now_ms`.
pub fn render(s: &Status, now_ms: u64) -> String {
    let mut t =
        status::table(&["VIP", "ADDRESS", "SCHEDULER", "FORWARD", "BACKEND", "WEIGHT", "STATE", "FLOWS", "SINCE"]);
    for v in &s.vips {
        let address = match v.address.parse::<std::net::IpAddr>() {
            Ok(a) => format!("{} {}", v.protocol, crate::desired::fmt_backend(a, v.port)),
            Err(_) => format!("{} {}:{}", v.protocol, v.address, v.port),
        };
        let scheduler = if v.scheduler.is_empty() { "maglev" } else { v.scheduler.as_str() };
        let head = [v.name.clone(), address, scheduler.to_string(), v.forwarding.clone()];
        if v.backends.is_empty() {
            t.add_row(head.iter().cloned().chain(["-".into(), "".into(), "".into(), "".into(), "".into()]));
        }
        for (i, b) in v.backends.iter().enumerate() {
            // The VIP's columns on its first row only, as ipvsadm groups them.
            let vip_cells = head.iter().map(|c| if i == 0 { c.clone() } else { String::new() });
            let since = age(b.state_since_unix_ms, now_ms);
            let cells = [status::backend_text(b), weight(b), b.state.clone(), b.flows.to_string(), since];
            t.add_row(vip_cells.chain(cells));
        }
    }
    status::align_right(&mut t, &[7]);
    let mut out = String::new();
    for line in t.lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{BackendStatus, VipStatus};

    #[test]
    fn ages_read_like_durations() {
        assert_eq!(age(0, 5_000), "-");
        assert_eq!(age(1_000, 43_500), "42s");
        assert_eq!(age(1, 187_001), "3m07s");
        assert_eq!(age(1, 7_500_001), "2h05m");
        assert_eq!(age(1, 3 * 86_400_000 + 4 * 3_600_000 + 1), "3d04h");
    }

    #[test]
    fn columns_fit_ipv6_addresses_and_overrides_show_the_file_weight() {
        let backend = |address: &str, port, weight, configured, state: &str, set: &str| BackendStatus {
            address: address.into(),
            port,
            weight,
            configured_weight: configured,
            state: state.into(),
            r#override: set.into(),
            flows: 12,
            state_since_unix_ms: 1_000,
            ..Default::default()
        };
        let s = Status {
            vips: vec![
                VipStatus {
                    name: "web".into(),
                    address: "198.18.100.1".into(),
                    port: 80,
                    protocol: "tcp".into(),
                    forwarding: "dsr".into(),
                    scheduler: "maglev five-tuple".into(),
                    backends: vec![
                        backend("198.18.0.11", 0, 5, 1, "active", "weight 5 (file: 1)"),
                        backend("198.18.0.12", 0, 0, 1, "draining", "drain"),
                    ],
                    ..Default::default()
                },
                VipStatus {
                    name: "api6".into(),
                    address: "2001:db8:100:ffff:ffff:ffff:ffff:1".into(),
                    port: 443,
                    protocol: "tcp".into(),
                    forwarding: "nat".into(),
                    scheduler: "maglev source-ip".into(),
                    backends: vec![backend("2001:db8:2:ffff:ffff:ffff:ffff:11", 8443, 1, 1, "maint", "maint")],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let text = render(&s, 62_000);
        let expected = "\
VIP   ADDRESS                                       SCHEDULER          FORWARD  BACKEND                                   WEIGHT       STATE     FLOWS  SINCE
web   tcp 198.18.100.1:80                           maglev five-tuple  dsr      198.18.0.11                               5 (file: 1)  active       12  1m01s
                                                                                198.18.0.12                               0 (file: 1)  draining     12  1m01s
api6  tcp [2001:db8:100:ffff:ffff:ffff:ffff:1]:443  maglev source-ip   nat      [2001:db8:2:ffff:ffff:ffff:ffff:11]:8443  1            maint        12  1m01s
";
        assert_eq!(text, expected, "\n{text}");
    }
}
