//! Moves a dataplane pinned by an xdplb of map layout version 1 to this
//! build's layout (`lb_common::maps::MAPS_ABI`), in place, while it runs:
//! no flow is lost, and traffic never stops.
//!
//! Version 2 changed four maps (see `MAPS_ABI`): `VIPS` (now not
//! preallocated), `BACKENDS` (a `BackendSlot` per id), `CONFIG` (larger)
//! and `REASONS` (more reasons). Every other map, the flow table first, is
//! kept as it is. First this build's programs are loaded once, unattached,
//! so that nothing changes on a kernel whose verifier refuses them. Then
//! for each changed map this
//! 1. moves the version-1 pin aside, to DIR/v1_NAME (a BPF filesystem allows
//!    no dot in a name; the running program holds the map itself, and keeps
//!    using it);
//! 2. creates the map of this layout and pins it at DIR/NAME;
//! 3. copies the contents over: VIPs as they are, each backend into both
//!    copies of its slot, the reason counters per CPU. CONFIG stays empty:
//!    the controller writes it whole before it attaches anything, and its
//!    zero hash seed is version 1's unseeded hash: untracked flows stay where
//!    they were unless the configuration names a seed (`hash_seed`);
//! 4. then writes layout version 2 (by rename: never missing or half
//!    written), and removes the set-aside pins.
//!
//! The controller then adopts the dataplane as usual and swaps the new
//! program into the pinned link, one atomic step: packets go from the old
//! program on the old maps to the new program on the new ones.
//!
//! Cut short (a crash, a kill), it is done again at the next start: the
//! version stays 1 until the end, and the set-aside pins are the source.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use lb_common::maps::{Backend, BackendSlot, VipKey, VipMeta, names};
use tracing::info;

use crate::pins::{self, MapDef};

/// The maps whose definition changed from version 1.
pub const CHANGED: [&str; 4] = [names::VIPS, names::BACKENDS, names::CONFIG, names::REASONS];

/// Where a migration sets the version-1 map `name` aside.
pub fn aside(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("v1_{name}"))
}

/// Version 1's definition of map `name`, from this build's `def`.
pub fn v1_def(name: &str, def: MapDef) -> MapDef {
    match name {
        names::VIPS => MapDef { flags: 0, ..def },
        names::BACKENDS => MapDef { value_size: size_of::<Backend>() as u32, ..def },
        // `LbConfig` up to and including `ipip_src_v6_host_mask`.
        names::CONFIG => MapDef { value_size: 56, ..def },
        // `reasons::COUNT` was 19.
        names::REASONS => MapDef { max_entries: 19, ..def },
        _ => def,
    }
}

/// Migrates the version-1 dataplane pinned in `dir` (see the module text);
/// `pins::verify` said it is one.
pub fn from_v1(dir: &Path, iface: &str) -> Result<()> {
    let fail = || {
        format!(
            "migrating the dataplane pinned in {} from map layout version 1 failed; run it again by restarting \
             xdplb, or start afresh with `xdplb detach --iface {iface}` (traffic stops until xdplb is back)",
            dir.display()
        )
    };
    migrate(dir).with_context(fail)?;
    info!(interface = iface, "migrated the pinned dataplane from map layout version 1: VIPs, backends and flows kept");
    Ok(())
}

/// Removes the pins a migration set aside, once it is complete.
pub fn remove_aside(dir: &Path) {
    for name in CHANGED {
        std::fs::remove_file(aside(dir, name)).ok();
    }
}

fn migrate(dir: &Path) -> Result<()> {
    // The sizes the dataplane has: the new maps get the same.
    let sizes = {
        let max = |name: &str| -> Result<u32> {
            let path = if aside(dir, name).exists() { aside(dir, name) } else { dir.join(name) };
            Ok(pins::map_def(&path)?.max_entries)
        };
        crate::dataplane::MapSizes {
            max_vips: max(names::VIPS)?,
            max_backends: max(names::BACKENDS)?,
            conntrack: max(names::FLOWS)?,
            maglev_pool: max(names::MAGLEV_POOL)?,
            nat_table: max(names::NAT_FLOWS)?,
        }
    };
    // Nothing is changed before this build's programs are known to load here:
    // a verifier that refused them would leave a dataplane migrated for
    // nothing, which the previous build no longer adopts.
    drop(crate::dataplane::Dataplane::load(sizes).context("this build's programs do not load on this kernel")?);
    let defs = pins::expected_defs(sizes)?;
    for name in CHANGED {
        let old = aside(dir, name);
        if !old.exists() {
            std::fs::rename(dir.join(name), &old)
                .with_context(|| format!("moving the pin of map {name} to {} failed", old.display()))?;
        }
        let new = dir.join(name);
        // Made by a migration cut short: made again.
        std::fs::remove_file(&new).ok();
        let def = defs.iter().find(|(n, _)| *n == name).map(|(_, d)| *d).context("no such map")?;
        pins::create_pinned(&new, &def, name)?;
    }
    let open = |path: PathBuf| MapData::from_pin(&path).with_context(|| format!("opening {} failed", path.display()));

    let old: HashMap<MapData, VipKey, VipMeta> = HashMap::try_from(Map::HashMap(open(aside(dir, names::VIPS))?))?;
    let mut new: HashMap<MapData, VipKey, VipMeta> = HashMap::try_from(Map::HashMap(open(dir.join(names::VIPS))?))?;
    let vips: Vec<(VipKey, VipMeta)> = old.iter().collect::<Result<_, _>>().context("reading map VIPS failed")?;
    for (k, v) in &vips {
        new.insert(k, v, 0).context("writing map VIPS failed")?;
    }

    let old: Array<MapData, Backend> = Array::try_from(Map::Array(open(aside(dir, names::BACKENDS))?))?;
    let mut new: Array<MapData, BackendSlot> = Array::try_from(Map::Array(open(dir.join(names::BACKENDS))?))?;
    for id in 0..old.len() {
        let b = old.get(&id, 0).context("reading map BACKENDS failed")?;
        if b != Backend::default() {
            let slot = BackendSlot { copies: [b; 2], ..BackendSlot::default() };
            new.set(id, slot, 0).context("writing map BACKENDS failed")?;
        }
    }

    let old: PerCpuArray<MapData, u64> = PerCpuArray::try_from(Map::PerCpuArray(open(aside(dir, names::REASONS))?))?;
    let mut new: PerCpuArray<MapData, u64> = PerCpuArray::try_from(Map::PerCpuArray(open(dir.join(names::REASONS))?))?;
    for i in 0..old.len().min(new.len()) {
        let counts = old.get(&i, 0).context("reading map REASONS failed")?;
        new.set(i, counts, 0).context("writing map REASONS failed")?;
    }

    pins::write_abi(dir)?;
    remove_aside(dir);
    Ok(())
}
