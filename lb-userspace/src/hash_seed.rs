//! The flow hash's secret seed (`LbConfig::hash_seed`, see
//! `lb_common::flow_hash`).
//!
//! Every node of a site must hash alike, or a flow that moves between nodes
//! (ECMP rehashing, a keepalived failover) is sent to another backend; an
//! attacker must not know the seed, or it can pick tuples that all land on
//! one server. So the seed comes from a secret the nodes share:
//! 1. `hash_seed_file`, when given;
//! 2. else the `flow_sync` key (the nodes share it already);
//! 3. else the seed of the running dataplane (adopted across restarts; it
//!    lives in the pinned CONFIG map), or a random one for a new dataplane.
//!
//! A seed is the first 8 bytes of HMAC-SHA256(secret, a label), so the seed
//! reveals nothing of the flow sync key.

use ring::{
    hmac,
    rand::{SecureRandom as _, SystemRandom},
};

use crate::config::Config;

/// The label a seed is derived under.
const LABEL: &[u8] = b"xdplb flow hash seed v1";

/// Where a seed came from, for the log and `xdplb status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    HashSeedFile,
    FlowSyncKey,
    /// The running dataplane's (or a random one, for a new dataplane).
    Dataplane,
}

/// Derives a seed from a shared secret.
pub fn derive(secret: &[u8]) -> [u32; 2] {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), LABEL);
    let b = tag.as_ref();
    [u32::from_le_bytes([b[0], b[1], b[2], b[3]]), u32::from_le_bytes([b[4], b[5], b[6], b[7]])]
}

/// The seed the configuration names, if it names one.
pub fn configured(config: &Config) -> Option<([u32; 2], Source)> {
    if let Some(file) = &config.hash_seed_file {
        return Some((derive(&file.bytes), Source::HashSeedFile));
    }
    config.flow_sync.as_ref().map(|s| (derive(&s.key.bytes), Source::FlowSyncKey))
}

/// Whether `config` announces over BGP (nodes behind ECMP) without a seed
/// the nodes share: each would hash with its own.
pub fn unshared_with_bgp(config: &Config) -> bool {
    config.bgp.is_some() && configured(config).is_none()
}

/// A random seed for a new dataplane.
pub fn random() -> anyhow::Result<[u32; 2]> {
    let mut b = [0u8; 8];
    SystemRandom::new().fill(&mut b).map_err(|_| anyhow::anyhow!("the system's random source failed"))?;
    Ok([u32::from_le_bytes([b[0], b[1], b[2], b[3]]), u32::from_le_bytes([b[4], b[5], b[6], b[7]])])
}

/// The seed to run with: the configured one, else `running` (the adopted
/// dataplane's, or a random one for a new dataplane).
pub fn choose(config: &Config, running: [u32; 2]) -> ([u32; 2], Source) {
    configured(config).unwrap_or((running, Source::Dataplane))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_gives_one_seed_and_other_secrets_others() {
        let a = derive(b"0123456789abcdef");
        assert_eq!(a, derive(b"0123456789abcdef"), "every node derives the same seed");
        assert_ne!(a, derive(b"0123456789abcdeg"));
        assert_ne!(a, [0, 0]);
    }

    #[test]
    fn random_seeds_differ() {
        assert_ne!(random().unwrap(), random().unwrap());
    }
}
