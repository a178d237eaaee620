//! The status page at `/`, after HAProxy's stats page: one table per VIP
//! with its backends, the reload state, backend names, and packets by
//! reason. Everything is inline (no external asset); every string that
//! comes from the configuration, a check or DNS is escaped.
//!
//! The page is rendered here, in one place, and refreshes itself: a few
//! lines of script fetch `status.html` (the same `<main>`, rendered anew)
//! every second; without script, a meta refresh reloads it every 5 s.

use std::fmt::Write as _;

use super::history::{self, History, Key};
use crate::status::{self, BackendStatus, Status, VipStatus};

/// HTML-escapes text for element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

const STYLE: &str = r#"
body { font: 13px/1.35 system-ui, "DejaVu Sans", sans-serif; margin: 0; background: #f4f5f7; color: #1d2126; }
header { display: flex; align-items: baseline; gap: 1em; padding: .6em 1em; background: #253040; color: #fff; }
header h1 { font-size: 18px; margin: 0; }
#live { font-size: 12px; padding: .1em .6em; border-radius: 1em; background: #66707c; }
#live.ok { background: #2f7d32; }
#live.bad { background: #b3261e; }
main { padding: .5em 1em; }
footer { padding: .5em 1em 1.5em; color: #66707c; }
a { color: #2456a6; }
.facts { display: flex; flex-wrap: wrap; gap: .3em 1.6em; margin: .4em 0 .6em; }
.facts b { font-weight: 600; }
.stale { color: #b3261e; font-weight: 600; }
.reload { margin: .4em 0 .8em; padding: .4em .7em; border-left: 4px solid #8a939e; background: #fff; }
.reload.applied { border-color: #2f7d32; }
.reload.rejected { border-color: #b3261e; background: #fdecea; }
.reload ul { margin: .2em 0 0; padding-left: 1.4em; }
table { border-collapse: collapse; background: #fff; margin: 0 0 1em; }
th, td { border: 1px solid #c9ced6; padding: .2em .5em; text-align: left; vertical-align: middle; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
thead th { background: #e3e7ed; font-weight: 600; }
tr.vip-head th { background: #253040; color: #fff; font-weight: normal; }
tr.vip-head .vip-name { font-weight: 700; font-size: 14px; margin-right: .6em; }
tr.vip-head .spark polyline { stroke: #9cc3ff; }
tr.vip-head .spark polygon { fill: #9cc3ff33; }
td.addr { font-family: ui-monospace, "DejaVu Sans Mono", monospace; white-space: nowrap; }
td.check { max-width: 32em; overflow-wrap: anywhere; color: #3c434c; }
td.state { font-weight: 600; }
tr.s-active td.state { background: #c8efc8; }
tr.s-draining td.state { background: #fbe7a8; }
tr.s-down td.state { background: #f6b8b3; }
tr.s-unresolved td.state { background: #f9cf9d; }
tr.s-sorry td.state { background: #dcc9f2; }
tr.s-maint td.state { background: #c9d3e0; }
.override { display: block; font-weight: normal; font-size: 11px; color: #3c434c; }
td.h-down { color: #b3261e; font-weight: 600; }
.spark { display: block; }
.spark polyline { fill: none; stroke: #2456a6; stroke-width: 1.2; }
.spark polygon { fill: #2456a622; stroke: none; }
.reasons { display: flex; flex-wrap: wrap; gap: 0 1em; align-items: flex-start; }
tr.hot td { background: #fdecea; color: #b3261e; font-weight: 600; }
h2 { font-size: 15px; margin: .8em 0 .3em; }
"#;

/// Fetches the page's `<main>` anew every second; says so, or why not.
const SCRIPT: &str = r#"
(function () {
  var main = document.getElementById("status"), live = document.getElementById("live");
  function refresh() {
    fetch("status.html", { cache: "no-store" })
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.text(); })
      .then(function (html) {
        main.innerHTML = html;
        live.textContent = "live, refreshed every second";
        live.className = "ok";
      })
      .catch(function (e) { live.textContent = "not refreshing: " + e.message; live.className = "bad"; })
      .then(function () { setTimeout(refresh, 1000); });
  }
  refresh();
})();
"#;

/// The whole page.
pub fn document(s: &Status, h: &History, now_unix_ms: u64) -> String {
    let iface = esc(&s.interface);
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>xdplb on {iface}</title>\
         <noscript><meta http-equiv=\"refresh\" content=\"5\"></noscript>\
         <style>{STYLE}</style></head>\n<body>\
         <header><h1>xdplb on {iface}</h1><span id=\"live\">not refreshing (no script)</span></header>\n\
         <main id=\"status\">{}</main>\n\
         <footer>Read-only. The same data: <a href=\"status.json\">status.json</a> \
         (as <code>xdplb status --json</code>), <a href=\"metrics\">metrics</a> (Prometheus).</footer>\n\
         <script>{SCRIPT}</script>\n</body></html>\n",
        section(s, h, now_unix_ms)
    )
}

/// The content of `<main>`: what the page refreshes.
pub fn section(s: &Status, h: &History, now_unix_ms: u64) -> String {
    let mut o = String::new();
    summary(&mut o, s, now_unix_ms);
    reload_state(&mut o, s);
    for v in &s.vips {
        vip_table(&mut o, v, h, now_unix_ms);
    }
    names(&mut o, s);
    reasons(&mut o, s, h);
    o
}

fn summary(o: &mut String, s: &Status, now_unix_ms: u64) {
    let backends: Vec<&BackendStatus> = s.vips.iter().flat_map(|v| &v.backends).collect();
    let active = backends.iter().filter(|b| b.state == "active").count();
    let age = now_unix_ms.saturating_sub(s.updated_unix_ms);
    // The controller publishes every second; older means its loop is stuck.
    let updated = if s.updated_unix_ms == 0 {
        "<span class=\"stale\">no status published yet</span>".to_string()
    } else if age > 5_000 {
        format!("<span class=\"stale\">updated {} ago</span>", duration(age))
    } else {
        format!("updated {:.1} s ago", age as f64 / 1000.0)
    };
    let _ = write!(
        o,
        "<div class=\"facts\"><span>XDP mode <b>{}</b></span><span>pid <b>{}</b></span>\
         <span>config <b>{}</b></span><span>generation <b>{}</b></span>\
         <span>reloads <b>{}</b> ok, <b>{}</b> failed</span><span><b>{}</b> of {} backends active</span>\
         <span><b>{}</b> flows tracked</span>",
        esc(&s.xdp_mode),
        s.pid,
        esc(&s.config_file),
        s.config_generation,
        s.reloads_ok,
        s.reloads_failed,
        active,
        backends.len(),
        count(s.flows_tracked),
    );
    if s.nat_connections > 0 || s.nat_evicted_idle + s.nat_evicted_closed > 0 {
        let _ = write!(
            o,
            "<span><b>{}</b> NAT connections ({} forgotten idle, {} closed)</span>",
            count(s.nat_connections),
            count(s.nat_evicted_idle),
            count(s.nat_evicted_closed)
        );
    }
    let _ = writeln!(o, "<span>{updated}</span></div>");
}

fn reload_state(o: &mut String, s: &Status) {
    let list = |items: &[String]| -> String {
        let li: String = items.iter().map(|i| format!("<li>{}</li>", esc(i))).collect();
        format!("<ul>{li}</ul>")
    };
    if !s.last_reload_errors.is_empty() {
        let _ = writeln!(
            o,
            "<div class=\"reload rejected\"><b>Last reload rejected</b>: still running generation {}.{}</div>",
            s.config_generation,
            list(&s.last_reload_errors)
        );
    } else if !s.last_reload_changes.is_empty() {
        let _ = writeln!(
            o,
            "<div class=\"reload applied\"><b>Last reload applied</b>: generation {}.{}</div>",
            s.config_generation,
            list(&s.last_reload_changes)
        );
    } else {
        let _ =
            writeln!(o, "<div class=\"reload\">No reload since the start (generation {}).</div>", s.config_generation);
    }
}

const BACKEND_COLUMNS: [(&str, &str); 13] = [
    ("backend", ""),
    ("state", ""),
    ("weight", "n"),
    ("health", ""),
    ("pkt/s", "n"),
    ("bit/s", "n"),
    ("pkt/s, last 60 s", ""),
    ("flows", "n"),
    ("packets", "n"),
    ("bytes", "n"),
    ("since", "n"),
    ("changes", "n"),
    ("last check", ""),
];

fn vip_table(o: &mut String, v: &VipStatus, h: &History, now_unix_ms: u64) {
    let vip_rates: Vec<f64> = h.series(&Key::vip(&v.name)).map(|r| r.packets_per_second).collect();
    let _ = write!(
        o,
        "<table class=\"vip\" data-vip=\"{name}\"><thead>\
         <tr class=\"vip-head\"><th colspan=\"{cols}\"><div class=\"facts\" style=\"margin:0\">\
         <span class=\"vip-name\">{name}</span><span class=\"addr\">{addr}/{proto}</span><span>{fwd}, {sched}</span>\
         <span><b>{pps}</b> pkt/s</span><span><b>{bps}</b> bit/s</span>\
         <span>{packets} packets, {bytes} bytes</span>{spark}</div></th></tr><tr>",
        name = esc(&v.name),
        cols = BACKEND_COLUMNS.len(),
        addr = esc(&host_port(&v.address, v.port)),
        proto = esc(&v.protocol),
        fwd = esc(&v.forwarding),
        sched = esc(&v.scheduler),
        pps = si(v.packets_per_second),
        bps = si(v.bits_per_second),
        packets = count(v.packets),
        bytes = count(v.bytes),
        spark = sparkline(&vip_rates, "VIP"),
    );
    for (title, class) in BACKEND_COLUMNS {
        match class {
            "" => write!(o, "<th>{title}</th>"),
            c => write!(o, "<th class=\"{c}\">{title}</th>"),
        }
        .ok();
    }
    o.push_str("</tr></thead><tbody>\n");
    if v.backends.is_empty() {
        let _ = writeln!(o, "<tr><td colspan=\"{}\">no backend</td></tr>", BACKEND_COLUMNS.len());
    }
    for b in &v.backends {
        let rates: Vec<f64> =
            h.series(&Key::backend(&v.name, &b.address, b.port)).map(|r| r.packets_per_second).collect();
        let since = match b.state_since_unix_ms {
            0 => "–".to_string(),
            t => duration(now_unix_ms.saturating_sub(t)),
        };
        // A runtime override (`xdplb set weight|drain|maint`) shows under the state.
        let set = if b.r#override.is_empty() {
            String::new()
        } else {
            format!("<span class=\"override\">override: {}</span>", esc(&b.r#override))
        };
        let _ = writeln!(
            o,
            "<tr class=\"backend s-{state}\"><td class=\"addr\">{addr}</td><td class=\"state\">{state}{set}</td>\
             <td class=\"n weight\">{weight}</td><td class=\"health h-{health}\">{health}</td>\
             <td class=\"n\">{pps}</td><td class=\"n\">{bps}</td><td>{spark}</td><td class=\"n\">{flows}</td>\
             <td class=\"n\">{packets}</td><td class=\"n\">{bytes}</td><td class=\"n\">{since}</td>\
             <td class=\"n\">{transitions}</td><td class=\"check\">{check}</td></tr>",
            state = esc(&b.state),
            addr = esc(&status::backend_text(b)),
            weight = b.weight,
            health = esc(&b.health),
            pps = si(b.packets_per_second),
            bps = si(b.bits_per_second),
            spark = sparkline(&rates, &b.address),
            flows = count(b.flows),
            packets = count(b.packets),
            bytes = count(b.bytes),
            transitions = b.transitions,
            check = esc(&b.last_check),
        );
    }
    o.push_str("</tbody></table>\n");
}

fn names(o: &mut String, s: &Status) {
    if s.dns.is_empty() {
        return;
    }
    o.push_str(
        "<h2>Backend names</h2><table class=\"names\"><thead><tr><th>name</th><th>addresses</th>\
         <th>draining</th><th class=\"n\">failures</th><th>resolution</th></tr></thead><tbody>\n",
    );
    for d in &s.dns {
        let state = if d.last_error.is_empty() {
            "<td>resolves</td>".to_string()
        } else {
            format!("<td class=\"h-down\">failing, last known addresses kept: {}</td>", esc(&d.last_error))
        };
        let _ = writeln!(
            o,
            "<tr><td class=\"addr\">{}</td><td class=\"addr\">{}</td><td class=\"addr\">{}</td>\
             <td class=\"n\">{}</td>{state}</tr>",
            esc(&d.name),
            esc(&d.addresses.join(" ")),
            esc(&d.draining.join(" ")),
            d.failures
        );
    }
    o.push_str("</tbody></table>\n");
}

/// Packets by reason, grouped by what happened to them; drops that happen
/// now stand out.
fn reasons(o: &mut String, s: &Status, h: &History) {
    const GROUPS: [&str; 5] = ["Forwarded", "Passed to the kernel", "Dropped", "Connection tracking", "Other"];
    const DROPPED: usize = 2;
    let group_of = |reason: &str| -> usize {
        match reason {
            "tx" | "nat_reply" => 0,
            r if r.starts_with("pass_") => 1,
            r if r.starts_with("drop_") => DROPPED,
            r if r.starts_with("conntrack_") => 3,
            _ => 4,
        }
    };
    o.push_str("<h2>Packets by reason</h2><div class=\"reasons\">");
    for (g, title) in GROUPS.iter().enumerate() {
        let rows: Vec<(&String, &u64)> = s.reasons.iter().filter(|(r, _)| group_of(r) == g).collect();
        if rows.is_empty() {
            continue;
        }
        let _ = write!(
            o,
            "<table class=\"reason-group\"><thead><tr><th colspan=\"3\">{title}</th></tr>\
             <tr><th>reason</th><th class=\"n\">packets</th><th class=\"n\">pkt/s</th></tr></thead><tbody>"
        );
        for (reason, packets) in rows {
            let rate = h.reason_rate(reason);
            let hot = if g == DROPPED && rate > 0.0 { " class=\"hot\"" } else { "" };
            let _ = write!(
                o,
                "<tr{hot}><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                esc(reason),
                count(*packets),
                si(rate)
            );
        }
        o.push_str("</tbody></table>");
    }
    o.push_str("</div>\n");
}

/// An inline SVG line of packet rates, newest at the right, scaled to its
/// own peak; the peak and the last value in its tooltip.
fn sparkline(rates: &[f64], what: &str) -> String {
    const W: usize = 2 * history::SAMPLES;
    const H: f64 = 22.0;
    let peak = rates.iter().copied().fold(0.0, f64::max);
    let scale = if peak > 0.0 { (H - 2.0) / peak } else { 0.0 };
    let start = W - 2 * rates.len().min(history::SAMPLES);
    let points: Vec<String> =
        rates.iter().enumerate().map(|(i, r)| format!("{},{:.1}", start + 2 * i, H - 1.0 - r * scale)).collect();
    let line = points.join(" ");
    let area = if rates.len() >= 2 {
        format!("<polygon points=\"{start},{H} {line} {},{H}\"/>", start + 2 * (rates.len() - 1))
    } else {
        String::new()
    };
    format!(
        "<svg class=\"spark\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\">\
         <title>{}: {} pkt/s now, peak {} pkt/s over the last {} s</title>{area}<polyline points=\"{line}\"/></svg>",
        esc(what),
        si(rates.last().copied().unwrap_or(0.0)),
        si(peak),
        rates.len()
    )
}

fn host_port(address: &str, port: u16) -> String {
    if address.contains(':') { format!("[{address}]:{port}") } else { format!("{address}:{port}") }
}

/// A rate with an SI prefix: 950, 12.3 k, 4.1 M.
fn si(v: f64) -> String {
    match v {
        v if v >= 1e9 => format!("{:.1} G", v / 1e9),
        v if v >= 1e6 => format!("{:.1} M", v / 1e6),
        v if v >= 1e3 => format!("{:.1} k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

/// A counter with thin spaces between groups of three digits.
fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut o = String::with_capacity(digits.len() * 2);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            o.push('\u{202f}');
        }
        o.push(c);
    }
    o
}

/// 45s, 3m 05s, 2h 07m, 4d 03h.
fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {:02}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
        s => format!("{}d {:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> Status {
        Status {
            interface: "lb0".into(),
            updated_unix_ms: 100_000,
            config_generation: 2,
            reasons: [("tx".to_string(), 5), ("drop_no_backend".to_string(), 1)].into(),
            last_reload_errors: vec!["/etc/x.yaml:3:5: vips: <script>alert(1)</script>".into()],
            vips: vec![VipStatus {
                name: "web<&>\"'".into(),
                address: "2001:db8:100::1".into(),
                port: 80,
                backends: vec![BackendStatus {
                    address: "198.18.0.11".into(),
                    port: 8080,
                    weight: 3,
                    state: "draining".into(),
                    health: "up".into(),
                    last_check: "HTTP status 503 <b>".into(),
                    state_since_unix_ms: 15_000,
                    r#override: "drain".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn every_string_from_the_configuration_is_escaped() {
        let page = document(&status(), &History::default(), 100_500);
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(page.contains("data-vip=\"web&lt;&amp;&gt;&quot;&#39;\""));
        assert!(page.contains("HTTP status 503 &lt;b&gt;"));
        assert!(!page.contains("503 <b>"), "no raw markup from a check result");
        assert_eq!(page.matches("<script>").count(), 1, "only the page's own script");
    }

    #[test]
    fn a_backend_row_shows_address_state_weight_and_since() {
        let main = section(&status(), &History::default(), 100_000);
        let row = &main[main.find("<tr class=\"backend").unwrap()..];
        let row = &row[..row.find("</tr>").unwrap()];
        assert!(row.contains("class=\"backend s-draining\""), "{row}");
        let state = "<td class=\"state\">draining<span class=\"override\">override: drain</span></td>";
        assert!(row.contains(&format!("<td class=\"addr\">198.18.0.11:8080</td>{state}")), "{row}");
        assert!(row.contains("<td class=\"n weight\">3</td>"), "{row}");
        assert!(row.contains(">1m 25s<"), "{row}");
        assert!(main.contains("[2001:db8:100::1]:80"), "IPv6 VIP in brackets");
        assert!(main.contains("Last reload rejected"));
    }

    #[test]
    fn the_sparkline_scales_to_its_peak_with_the_newest_sample_at_the_right() {
        let svg = sparkline(&[0.0, 10.0, 5.0], "b1");
        assert!(svg.contains("<polyline points=\"114,21.0 116,1.0 118,11.0\"/>"), "{svg}");
        assert!(svg.contains("<title>b1: 5 pkt/s now, peak 10 pkt/s over the last 3 s</title>"), "{svg}");
        let flat = sparkline(&[], "b2");
        assert!(flat.contains("<polyline points=\"\"/>"), "{flat}");
    }

    #[test]
    fn numbers_read_at_a_glance() {
        assert_eq!(count(0), "0");
        assert_eq!(count(1234567), "1\u{202f}234\u{202f}567");
        assert_eq!(si(12_345.0), "12.3 k");
        assert_eq!(duration(59_999), "59s");
        assert_eq!(duration(3_600_000 * 26), "1d 02h");
    }
}
