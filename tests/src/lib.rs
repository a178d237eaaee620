//! Shared pieces of xdplb's integration tests: packet building and checking,
//! and a harness that drives the real eBPF object with BPF_PROG_TEST_RUN.

pub mod harness;
pub mod packets;
pub mod topology;
