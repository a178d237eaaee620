//! The xdplb controller as a library: the `xdplb` binary and the integration
//! tests drive the dataplane through these modules.

pub mod addr;
pub mod announce;
pub mod attach;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod decap;
pub mod desired;
pub mod dns;
pub mod doctor;
pub mod flowsync;
pub mod hash_seed;
pub mod health;
pub mod migrate;
pub mod mounts;
pub mod neighbours;
pub mod notify;
pub mod pcap;
pub mod pins;
pub mod reconcile;
pub mod reload;
pub mod runtime;
pub mod show;
pub mod status;
pub mod trace;
pub mod walks;
pub mod web;

/// The dataplane's eBPF object, built by build.rs from lb-ebpf.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));
