//! NAT garbage collection and the flow count: the dataplane creates NAT
//! entries and flows, the controller forgets the closed and idle NAT
//! connections (both directions) and counts flows per backend. Both walk
//! whole tables, so both run off the loop (`walks`) and come back as a
//! message.

use std::time::Duration;

use super::Daemon;
use crate::walks::Walked;

/// How long one walk may take: a partial count or collection is better than
/// none, and the next tick starts another.
const WALK_BUDGET: Duration = Duration::from_secs(5);

impl Daemon {
    /// Starts a collection of closed and idle NAT connections, unless one runs.
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
                self.nat_evicted.0 += s.evicted_idle;
                self.nat_evicted.1 += s.evicted_closed;
            }
        }
    }
}
