//! Shared pieces of xdplb's integration tests: packet building and checking,
//! a harness that drives the real eBPF object with BPF_PROG_TEST_RUN, the
//! benchmarks' restore wrapper, test clusters in network namespaces and the
//! MariaDB servers some of them run.

pub mod ha;
pub mod harness;
pub mod mariadb;
pub mod packets;
pub mod restore;
pub mod topology;
pub mod vrrp;
