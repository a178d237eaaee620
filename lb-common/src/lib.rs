//! Types shared by the xdplb dataplane (eBPF) and the controller, and the
//! pure logic both sides must agree on: the flow hash and the Maglev table.
//!
//! Everything here is plain data and arithmetic: no I/O, no allocation
//! (except the `user`-feature conveniences), so it builds for
//! `bpfel-unknown-none` as well as for the host.
#![no_std]

#[cfg(any(test, feature = "user"))]
extern crate alloc;

pub mod bench;
pub mod decap;
pub mod flow_hash;
pub mod maglev;
pub mod maps;
pub mod reasons;
#[cfg(any(test, feature = "user"))]
pub mod seeded;
pub mod trace;
