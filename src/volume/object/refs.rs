//! Who points into whose chunks: the one place garbage collection and
//! deletes ask.
//!
//! A volume's chunks are pointed into by its own map and by its snapshots'
//! frozen maps. Clones never point into a parent directly: a clone's map
//! starts as its parent snapshot's (see `lineage`), so every chunk of the
//! parent a clone (or a clone's snapshot, or a clone of that) can name is
//! one that snapshot names, and the snapshot cannot be deleted while
//! anything reads through it ([`dependents`]). So a chunk is garbage only
//! when its own volume's map no longer points into it and it is not
//! [pinned](pinned_chunks) by one of the volume's snapshots.

use std::collections::BTreeSet;

use super::format::{CheckpointEntry, Kind};
use super::lineage::{self, layer_of};
use super::state::Mapped;
use super::{ObjectError, snapshot};
use crate::objstore::Store;

/// Whether garbage collection may rewrite or delete chunk `id` (one of
/// the volume's own) once its own map stops needing it: not while a
/// snapshot points into it.
pub(super) fn collectable(m: &Mapped, id: u64) -> bool {
    !m.pinned.contains(&id)
}

/// The volume's own chunks its snapshots point into.
pub async fn pinned_chunks(store: &Store, volume: &str) -> Result<BTreeSet<u64>, ObjectError> {
    let mut out = BTreeSet::new();
    for name in snapshot::names(store, volume).await? {
        let (_, map) = snapshot::read(store, volume, &name).await?;
        out.extend(own_runs(&map.entries).into_iter().map(|(id, _, _)| id));
    }
    Ok(out)
}

/// The runs of the volume's own chunks (chunk, first block, end block) a
/// map points at.
pub(super) fn own_runs(entries: &[CheckpointEntry]) -> Vec<(u64, u32, u32)> {
    entries
        .iter()
        .filter(|e| e.kind == Kind::Data && layer_of(e.chunk) == 0)
        .map(|e| (e.chunk, e.block, e.block.saturating_add(e.blocks)))
        .collect()
}

/// For each map (as [`own_runs`]), the chunk blocks no other map points at.
pub(super) fn exclusive_blocks(maps: &[Vec<(u64, u32, u32)>]) -> Vec<u64> {
    // Sweep every run's start and end in chunk order; where exactly one
    // map covers a stretch, it is that map's alone. Within one map no two
    // runs share a chunk block (each block was written for one address).
    let mut events: Vec<(u64, u32, i64, usize)> = Vec::new();
    for (i, runs) in maps.iter().enumerate() {
        for &(id, s, e) in runs {
            events.push((id, s, 1, i));
            events.push((id, e, -1, i));
        }
    }
    events.sort_unstable_by_key(|&(id, at, d, _)| (id, at, d));
    let mut out = vec![0u64; maps.len()];
    let (mut count, mut sum) = (0i64, 0usize);
    let mut last: Option<(u64, u32)> = None;
    for (id, at, d, i) in events {
        if let Some((lid, lat)) = last
            && lid == id
            && count == 1
        {
            out[sum] += u64::from(at - lat);
        }
        count += d;
        if d > 0 {
            sum += i;
        } else {
            sum -= i;
        }
        last = Some((id, at));
    }
    out
}

/// Everything that reads through `volume@snapshot` (any snapshot of
/// `volume` when `snapshot` is `None`): clones whose map still starts from
/// it, and snapshots of other volumes whose maps name it as a layer, each
/// as `clone NAME` or `snapshot NAME@SNAP`.
pub async fn dependents(
    store: &Store,
    volume: &str,
    snapshot: Option<&str>,
) -> Result<Vec<String>, ObjectError> {
    let hit = |layers: &[lineage::Layer]| {
        layers
            .iter()
            .any(|l| l.volume == volume && snapshot.is_none_or(|s| l.snapshot == s))
    };
    let mut out = Vec::new();
    for other in store.list_dirs("volumes").await? {
        if other == volume || !crate::volume::valid_name(&other) {
            continue;
        }
        if let Some(l) = lineage::read(store, &other).await?
            && hit(&l.layers)
        {
            out.push(format!("clone {other}"));
        }
        for snap in snapshot::names(store, &other).await? {
            let meta = match snapshot::read_meta(store, &other, &snap).await {
                Ok(m) => m,
                Err(ObjectError::NoSuchSnapshot { .. }) => continue,
                Err(e) => return Err(e),
            };
            if hit(&meta.layers) {
                out.push(format!("snapshot {other}@{snap}"));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_blocks_count_what_one_map_alone_holds() {
        let a = vec![(1, 0, 10), (2, 0, 4)];
        let b = vec![(1, 5, 10)];
        let c = vec![(1, 8, 12), (3, 0, 1)];
        // a alone: chunk 1 blocks 0-5, chunk 2 all four; b alone: nothing;
        // c alone: chunk 1 blocks 10-12 and chunk 3's one.
        assert_eq!(exclusive_blocks(&[a, b, c]), [9, 0, 3]);
        assert_eq!(exclusive_blocks(&[vec![(1, 0, 3)]]), [3]);
    }
}
