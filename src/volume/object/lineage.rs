//! Where a clone comes from, and how one map points into several volumes'
//! chunks.
//!
//! A map entry names its chunk by a *layer-tagged* id: the low 56 bits are
//! the chunk's id in its own volume (its writer's generation and number,
//! see `generation`), the high 8 bits the layer, 0 for the volume itself, 1 for the snapshot it was cloned from, 2 for that
//! snapshot's parent, and so on. A snapshot's map is stored fully resolved
//! in its volume's numbering, so a clone's map at open is that map with
//! every layer shifted by one: however deep the chain, a read resolves in
//! one lookup, and blocks the clone owns never look at a parent.
//!
//! A clone's `lineage.json` (written before its descriptor, which commits
//! it) names the parent snapshot and the layers above it. It is never
//! rewritten: `flatten` records that the clone stands alone with a mark,
//! `flattened/<id>`, carrying an id of the writer's sequence (see
//! `generation`), so that a writer fenced in the middle of a flatten
//! cannot cut its successor off from the parent: its late mark does not
//! count.

use serde::{Deserialize, Serialize};

use super::layout::{Keys, id_of};
use super::{Inner, ObjectError, generation};
use crate::lock::RwLockExt;
use crate::objstore::{Store, StoreError};

/// Bits of a layer-tagged id that hold the chunk's own id.
pub(super) const LAYER_SHIFT: u32 = 56;
/// Deepest chain a map can name (layer numbers fit in 8 bits; flatten a
/// clone to start a new chain).
pub const MAX_DEPTH: usize = (1 << (64 - LAYER_SHIFT)) - 1;

/// The layer a tagged chunk id points into (0: the volume itself).
pub(super) fn layer_of(id: u64) -> u64 {
    id >> LAYER_SHIFT
}

/// The chunk's id within its own volume.
pub(super) fn local_id(id: u64) -> u64 {
    id & ((1 << LAYER_SHIFT) - 1)
}

/// The same chunk, seen one layer further down (from a clone of the
/// snapshot whose map names it).
pub(super) fn shifted(id: u64) -> u64 {
    id + (1 << LAYER_SHIFT)
}

/// One ancestor: a volume, and the snapshot of it the chain goes through.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// The ancestor volume.
    pub volume: String,
    /// Its snapshot the descendant was cloned from (or through).
    pub snapshot: String,
}

impl std::fmt::Display for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.volume, self.snapshot)
    }
}

/// `lineage.json`: a clone's ancestry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lineage {
    /// Record format version; this vbd reads and writes 1.
    pub format: u32,
    /// The snapshot the clone reads through; `None` once flattened.
    pub parent: Option<Layer>,
    /// Layer `k` of the clone's map is `layers[k - 1]` (the parent first).
    /// Empty once flattened.
    pub layers: Vec<Layer>,
    /// What the clone was made from, kept after a flatten for `info`.
    pub origin: Layer,
}

fn key(name: &str) -> String {
    format!("{}/lineage.json", Keys::new(name).root())
}

/// A volume's lineage, `None` for a volume that never was a clone; a
/// flattened clone's has no parent and no layers.
pub async fn read(store: &Store, name: &str) -> Result<Option<Lineage>, ObjectError> {
    let key = key(name);
    let mut l: Lineage = match store.get(&key).await {
        Ok(b) => {
            serde_json::from_slice(&b).map_err(|source| ObjectError::Descriptor { key, source })?
        }
        Err(StoreError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if l.parent.is_some() && flattened(store, name).await? {
        l.parent = None;
        l.layers.clear();
    }
    Ok(Some(l))
}

/// Whether a flatten mark of the volume counts.
async fn flattened(store: &Store, name: &str) -> Result<bool, ObjectError> {
    let keys = Keys::new(name);
    let marks: Vec<u64> = store
        .list(&keys.flattened())
        .await?
        .iter()
        .filter_map(|(k, _)| id_of(k))
        .collect();
    if marks.is_empty() {
        return Ok(false);
    }
    let fences = generation::read_fences(store, &keys).await?;
    Ok(marks.into_iter().any(|id| fences.counts(id)))
}

/// Writes a new clone's lineage.
pub(super) async fn write(store: &Store, name: &str, l: &Lineage) -> Result<(), ObjectError> {
    let body = serde_json::to_vec_pretty(l).map_err(|source| ObjectError::Encode {
        what: "lineage",
        source,
    })?;
    store.put(&key(name), body.into()).await?;
    Ok(())
}

/// Removes a lineage left by a clone that never got its descriptor, so a
/// new volume of that name does not inherit it.
pub(super) async fn remove(store: &Store, name: &str) -> Result<(), ObjectError> {
    store.delete(&key(name)).await?;
    Ok(())
}

impl Inner {
    /// The store key of a map's chunk, whichever layer it lives in.
    pub(super) fn chunk_key(&self, id: u64) -> String {
        match layer_of(id) {
            0 => self.keys.chunk(id),
            layer => {
                let layers = self.layers.read_locked();
                match layers.get(layer as usize - 1) {
                    Some(l) => Keys::new(&l.volume).chunk(local_id(id)),
                    // No map names a layer its lineage lacks; a key that
                    // cannot exist makes the read fail instead of guessing.
                    None => format!("{}/missing-layer-{layer}", self.keys.root()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::generation::{MAX_GENERATION, base_id, generation_of};
    use super::*;

    #[test]
    fn layers_tag_ids() {
        let id = 0x1234;
        assert_eq!(layer_of(id), 0);
        let p = shifted(shifted(id));
        assert_eq!((layer_of(p), local_id(p)), (2, 0x1234));
        const { assert!(MAX_DEPTH >= 16) };
        // A generation's ids never reach into the layer tag.
        let top = base_id(MAX_GENERATION) + u64::from(u32::MAX);
        assert_eq!(layer_of(top), 0);
        assert_eq!(local_id(shifted(top)), top);
        assert_eq!(generation_of(shifted(top)), MAX_GENERATION);
    }
}
