//! The benchmarks' restore wrapper (lb-ebpf `bench_restore`,
//! `programs::BENCH_RESTORE`), driven from userspace: which program it runs,
//! the frame it puts back before every run, and its flood mode. Used by
//! `xdplb-bench` and by the wrapper's own test.

use aya::maps::{Array, Map, MapData, ProgramArray};
use lb_common::{
    bench::{VARY_OFF, VARY_SOURCE_V4},
    maps::programs,
};

use crate::harness::Engine;

/// The wrapper's maps (never pinned: the benchmark's own).
const BENCH_TARGET: &str = "BENCH_TARGET";
const BENCH_FRAME: &str = "BENCH_FRAME";
const BENCH_VARY: &str = "BENCH_VARY";

/// The restore wrapper of one engine: runs its target on the saved frame.
pub struct Restore {
    target: ProgramArray<MapData>,
    frame: Array<MapData, [u64; 9]>,
    vary: Array<MapData, [u32; 2]>,
}

impl Restore {
    /// Loads the wrapper into `e` and finds its maps.
    pub fn load(e: &mut Engine) -> Self {
        let p = e.dp.program(programs::BENCH_RESTORE).unwrap();
        p.load().expect("the restore wrapper loads and verifies");
        let ids = p.info().unwrap().map_ids().unwrap().unwrap_or_default();
        let (mut target, mut frame, mut vary) = (None, None, None);
        for id in ids {
            let m = MapData::from_id(id).unwrap();
            match m.info().unwrap().name_as_str() {
                Some(BENCH_TARGET) => target = Some(ProgramArray::try_from(Map::ProgramArray(m)).unwrap()),
                Some(BENCH_FRAME) => frame = Some(Array::try_from(Map::Array(m)).unwrap()),
                Some(BENCH_VARY) => vary = Some(Array::try_from(Map::Array(m)).unwrap()),
                _ => {}
            }
        }
        Self {
            target: target.expect("BENCH_TARGET map"),
            frame: frame.expect("BENCH_FRAME map"),
            vary: vary.expect("BENCH_VARY map"),
        }
    }

    /// From now on the wrapper restores `pkt` and tail-calls `prog`.
    pub fn set(&mut self, e: &mut Engine, prog: &str, pkt: &[u8]) {
        assert!(pkt.len() >= 64, "the wrapper restores 64 bytes");
        let mut saved = [0u64; 9];
        saved[0] = pkt.len() as u64;
        for (i, w) in pkt[..64].chunks(8).enumerate() {
            saved[i + 1] = u64::from_ne_bytes(w.try_into().unwrap());
        }
        self.frame.set(0, saved, 0).unwrap();
        let fd = e.dp.program(prog).unwrap().fd().unwrap();
        self.target.set(0, fd, 0).unwrap();
    }

    /// Flood mode: from now on every run gets a source of its own (an IPv4
    /// TCP or UDP frame; see `lb_common::bench`), the sequence chosen by
    /// `seed`. `None`: the saved frame as it is.
    pub fn vary_source(&mut self, seed: Option<u32>) {
        let value = match seed {
            Some(seed) => [VARY_SOURCE_V4, seed],
            None => [VARY_OFF, 0],
        };
        self.vary.set(0, value, 0).unwrap();
    }
}
