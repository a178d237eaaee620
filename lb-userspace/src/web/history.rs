//! Rates kept over time for the status page: the last [`SAMPLES`] packet
//! and bit rates of every VIP and backend, one per status the controller
//! publishes (every second), and the rate of every packet reason.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::status::Status;

/// Samples kept per series: a minute at one status a second.
pub const SAMPLES: usize = 60;

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rate {
    pub packets_per_second: f64,
    pub bits_per_second: f64,
}

/// A VIP (empty address, port 0) or one of its backends.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub vip: String,
    pub address: String,
    pub port: u16,
}

impl Key {
    pub fn vip(vip: &str) -> Self {
        Self { vip: vip.to_string(), address: String::new(), port: 0 }
    }

    pub fn backend(vip: &str, address: &str, port: u16) -> Self {
        Self { vip: vip.to_string(), address: address.to_string(), port }
    }
}

#[derive(Debug, Default)]
pub struct History {
    /// `updated_unix_ms` of the last status recorded: each status counts once.
    updated_unix_ms: u64,
    series: HashMap<Key, VecDeque<Rate>>,
    reasons: BTreeMap<String, u64>,
    reason_rates: BTreeMap<String, f64>,
}

impl History {
    /// Adds the rates of a status the controller published; false if it was
    /// recorded already. Series of VIPs and backends that are gone are dropped.
    pub fn record(&mut self, s: &Status) -> bool {
        if s.updated_unix_ms == self.updated_unix_ms {
            return false;
        }
        let seconds = match s.updated_unix_ms.checked_sub(self.updated_unix_ms) {
            Some(ms) if self.updated_unix_ms != 0 => ms as f64 / 1000.0,
            _ => 0.0,
        };
        self.updated_unix_ms = s.updated_unix_ms;
        // Counters restart with the dataplane: a counter that went back has no rate.
        self.reason_rates = s
            .reasons
            .iter()
            .map(|(k, &now)| {
                let before = self.reasons.get(k).copied().unwrap_or(now);
                let rate = if seconds > 0.0 { now.saturating_sub(before) as f64 / seconds } else { 0.0 };
                (k.clone(), rate)
            })
            .collect();
        self.reasons = s.reasons.clone();
        let mut seen = Vec::new();
        for v in &s.vips {
            seen.push((
                Key::vip(&v.name),
                Rate { packets_per_second: v.packets_per_second, bits_per_second: v.bits_per_second },
            ));
            for b in &v.backends {
                seen.push((
                    Key::backend(&v.name, &b.address, b.port),
                    Rate { packets_per_second: b.packets_per_second, bits_per_second: b.bits_per_second },
                ));
            }
        }
        let mut next = HashMap::with_capacity(seen.len());
        for (key, rate) in seen {
            let mut series = self.series.remove(&key).unwrap_or_default();
            if series.len() == SAMPLES {
                series.pop_front();
            }
            series.push_back(rate);
            next.insert(key, series);
        }
        self.series = next;
        true
    }

    /// The rates of a VIP or backend, oldest first.
    pub fn series(&self, key: &Key) -> impl Iterator<Item = Rate> + '_ {
        self.series.get(key).into_iter().flatten().copied()
    }

    /// Packets per second of a reason, between the last two statuses.
    pub fn reason_rate(&self, reason: &str) -> f64 {
        self.reason_rates.get(reason).copied().unwrap_or(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{BackendStatus, VipStatus};

    fn status(at: u64, pps: f64, dropped: u64, backends: &[&str]) -> Status {
        Status {
            updated_unix_ms: at,
            reasons: [("drop_no_backend".to_string(), dropped)].into(),
            vips: vec![VipStatus {
                name: "web".into(),
                packets_per_second: pps,
                backends: backends
                    .iter()
                    .map(|a| BackendStatus {
                        address: a.to_string(),
                        packets_per_second: pps,
                        bits_per_second: pps * 8000.0,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn keeps_the_last_samples_of_each_backend_once_per_status() {
        let mut h = History::default();
        let b1 = Key::backend("web", "198.18.0.11", 0);
        for i in 1..=(SAMPLES as u64 + 5) {
            assert!(h.record(&status(i * 1000, i as f64, 0, &["198.18.0.11"])));
            assert!(!h.record(&status(i * 1000, 0.0, 0, &["198.18.0.11"])), "the same status counts once");
        }
        let pps: Vec<f64> = h.series(&b1).map(|r| r.packets_per_second).collect();
        assert_eq!(pps.len(), SAMPLES);
        assert_eq!(pps[0], 6.0, "the oldest samples went");
        assert_eq!(pps[SAMPLES - 1], SAMPLES as f64 + 5.0);
        assert_eq!(h.series(&b1).last().unwrap().bits_per_second, (SAMPLES as f64 + 5.0) * 8000.0);
        assert_eq!(h.series(&Key::vip("web")).count(), SAMPLES);
    }

    #[test]
    fn forgets_backends_that_left_and_rates_reasons() {
        let mut h = History::default();
        h.record(&status(1000, 1.0, 10, &["198.18.0.11", "198.18.0.12"]));
        assert_eq!(h.reason_rate("drop_no_backend"), 0.0, "no rate from a single status");
        h.record(&status(3000, 1.0, 30, &["198.18.0.11"]));
        assert_eq!(h.series(&Key::backend("web", "198.18.0.11", 0)).count(), 2);
        assert_eq!(h.series(&Key::backend("web", "198.18.0.12", 0)).count(), 0);
        assert_eq!(h.reason_rate("drop_no_backend"), 10.0, "20 packets in 2 s");
        // A restarted dataplane starts its counters at zero.
        h.record(&status(4000, 1.0, 5, &["198.18.0.11"]));
        assert_eq!(h.reason_rate("drop_no_backend"), 0.0);
    }
}
