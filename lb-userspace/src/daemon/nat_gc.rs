//! NAT garbage collection and the flow count: the dataplane creates NAT
//! entries and flows, the controller forgets the closed, idle and
//! unanswered (embryonic) NAT connections (both directions) and counts
//! flows per backend. Both walk whole tables, so both run off the loop
//! (`walks`) and come back as a message.
//!
//! A collection runs every other tick. One that finds the table above its
//! high-water mark reclaims embryonic connections, oldest first, and the
//! next follows `NAT_PRESSURE_PERIOD` later, for as long as the pressure
//! lasts (see `walks::NAT_HIGH_WATER`).

use std::time::Duration;

use tracing::{info, warn};

use super::Daemon;
use crate::walks::{NAT_HIGH_WATER, NAT_PRESSURE_PERIOD, NatSweep, Walked};

/// How long one walk may take: a partial count or collection is better than
/// none, and the next tick starts another.
const WALK_BUDGET: Duration = Duration::from_secs(5);

impl Daemon {
    /// Starts a collection of closed, idle and unanswered NAT connections, unless one runs.
    pub(super) fn collect_nat(&mut self) {
        self.walker.sweep_nat(self.config.nat.clone(), WALK_BUDGET);
    }

    /// Starts a count of the tracked flows per backend, unless one runs.
    pub(super) fn count_flows(&mut self) {
        self.walker.census(WALK_BUDGET);
    }

    /// A walk finished: keep what it found for the status.
    pub(super) fn on_walked(&mut self, walked: Walked) {
        match walked {
            Walked::Flows(c) => {
                self.flows_tracked = c.total;
                self.flows_by_backend = c.by_backend;
            }
            Walked::Nat(s) => {
                self.nat_connections = s.connections;
                // Unanswered connections count as idle ones (no reply for too long).
                self.nat_evicted.0 += s.evicted_idle + s.evicted_embryonic + s.reclaimed;
                self.nat_evicted.1 += s.evicted_closed;
                self.on_nat_pressure(&s);
            }
        }
    }

    /// Keeps collecting every `NAT_PRESSURE_PERIOD` while the table is above
    /// its high-water mark; says so once when that starts and once when it ends.
    fn on_nat_pressure(&mut self, s: &NatSweep) {
        if s.pressure {
            if !s.follow_up {
                warn!(
                    entries = s.occupancy_before,
                    capacity = s.capacity,
                    "NAT table above {}0%: reclaiming connections their backend never answered, oldest \
                     first ({} now), collecting every {} ms while it lasts",
                    NAT_HIGH_WATER,
                    s.reclaimed,
                    NAT_PRESSURE_PERIOD.as_millis()
                );
            }
            self.walker.sweep_nat_after(self.config.nat.clone(), WALK_BUDGET, NAT_PRESSURE_PERIOD);
        } else if s.follow_up {
            info!(entries = s.occupancy_before, capacity = s.capacity, "NAT table back below its high-water mark");
        }
    }
}
