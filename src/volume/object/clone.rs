//! Clones: writable volumes whose map starts as a snapshot's, so they read
//! through to the parent's chunks until they write their own. Making one
//! writes two small objects and copies nothing; `flatten` copies in the
//! blocks a clone still reads from its parents, after which it stands
//! alone and they may be deleted.

use std::collections::BTreeMap;

use tracing::info;

use super::format::BLOCK;
use super::format::{IndexEntry, Kind};
use super::generation;
use super::ingest::put_chunk;
use super::layout::{self, Descriptor, Keys};
use super::lineage::{self, Layer, Lineage, MAX_DEPTH, layer_of, shifted};
use super::span_fetch::{Missing, fetch_missing};
use super::state::{ChunkInfo, Mapped, Mapping};
use super::{ObjectError, ObjectVolume, fence, snapshot};
use crate::lock::{MutexExt, RwLockExt};
use crate::objstore::Store;
use crate::runtime::runtime;

/// Bytes of copied blocks per chunk flatten writes.
const FLATTEN_CHUNK: usize = 4 << 20;

/// Makes `new`, a clone of `parent@snap` of the snapshot's size. Instant:
/// the clone's lineage, then its descriptor, which commits it.
pub async fn create(
    store: &Store,
    parent: &str,
    snap: &str,
    new: &str,
) -> Result<Descriptor, ObjectError> {
    let meta = snapshot::read_meta(store, parent, snap).await?;
    // A snapshot an older writer took just as it was being fenced may not
    // count once the take-over has drawn its fence: wait for that.
    if let Some(g) = generation::unsettled(store, &Keys::new(parent)).await?
        && meta.id != 0
        && generation::generation_of(meta.id) < g
    {
        return Err(ObjectError::TakingOver {
            volume: parent.to_owned(),
            snapshot: snap.to_owned(),
            generation: g,
        });
    }
    if !layout::valid_name(new) {
        return Err(ObjectError::BadName(new.to_owned()));
    }
    if meta.layers.len() + 1 > MAX_DEPTH {
        return Err(ObjectError::TooDeep(format!("{parent}@{snap}")));
    }
    match layout::read_descriptor(store, new).await {
        Ok(_) => return Err(ObjectError::Exists(new.to_owned())),
        Err(ObjectError::NoSuchVolume(_)) => {}
        Err(e) => return Err(e),
    }
    let origin = Layer {
        volume: parent.to_owned(),
        snapshot: snap.to_owned(),
    };
    let mut layers = vec![origin.clone()];
    layers.extend(meta.layers.iter().cloned());
    let record = Lineage {
        format: 1,
        parent: Some(origin.clone()),
        layers,
        origin,
    };
    lineage::write(store, new, &record).await?;
    let d = match layout::create_descriptor(store, new, meta.size).await {
        Ok(d) => d,
        Err(e) => {
            // Ours only if the name was free: a racing create keeps its own.
            if matches!(e, ObjectError::Exists(_)) {
                return Err(e);
            }
            lineage::remove(store, new).await?;
            return Err(e);
        }
    };
    // A delete of the snapshot that raced this clone may have missed it;
    // it marks the snapshot before it looks for clones, so one of the two
    // sees the other.
    if snapshot::is_being_deleted(store, parent, snap).await? {
        super::admin::delete(store, new, true).await?;
        return Err(ObjectError::NoSuchSnapshot {
            volume: parent.to_owned(),
            snapshot: snap.to_owned(),
        });
    }
    info!(clone = new, parent, snapshot = snap, "clone created");
    Ok(d)
}

/// Merges a clone's parent snapshot's map (every chunk id one layer down)
/// under the clone's own, and returns the clone's layers; a volume that is
/// no clone (or no longer one) gets no layers.
pub(super) async fn apply_parent(
    store: &Store,
    name: &str,
    m: &mut Mapped,
) -> Result<Vec<Layer>, ObjectError> {
    let Some(l) = lineage::read(store, name).await? else {
        return Ok(Vec::new());
    };
    let Some(parent) = &l.parent else {
        return Ok(Vec::new());
    };
    let (_, map) = snapshot::read(store, &parent.volume, &parent.snapshot).await?;
    m.merge_entries(&map.entries, shifted);
    for r in &map.chunks {
        m.inherited.insert(
            shifted(r.id),
            ChunkInfo {
                data_start: r.data_start,
                data_blocks: r.data_blocks,
                live: 0,
            },
        );
    }
    m.max_seq = m.max_seq.max(map.max_seq);
    Ok(l.layers)
}

/// The blocks one chunk of a flatten copies: their index entries, room
/// for their data, and per parent chunk the runs to fetch into it, so
/// that runs of one chunk close together share a GET (a clone whose
/// writes cut its parent's extents into pieces made a GET per piece).
#[derive(Default)]
struct Batch {
    entries: Vec<IndexEntry>,
    data: Vec<u8>,
    /// Per parent chunk: where its data starts, and the runs to fetch.
    runs: BTreeMap<u64, (u64, Vec<Missing>)>,
}

impl Batch {
    /// Adds `blocks` blocks from `lba` (sequence `seq`), which read
    /// chunk `chunk`'s data (from byte `data_start`) from block `from`.
    fn add(&mut self, lba: u64, blocks: u32, seq: u64, chunk: u64, data_start: u64, from: u32) {
        let to = self.data.len();
        self.data.resize(to + blocks as usize * BLOCK, 0);
        self.entries.push(IndexEntry {
            lba,
            seq,
            blocks,
            data_block: (to / BLOCK) as u32,
            kind: Kind::Data,
        });
        self.runs
            .entry(chunk)
            .or_insert_with(|| (data_start, Vec::new()))
            .1
            .push(Missing { from, blocks, to });
    }

    /// Fetches the batch's data and puts it as one chunk; empties it.
    async fn put(&mut self, inner: &super::Inner) -> Result<(), ObjectError> {
        for (chunk, (data_start, missing)) in &mut self.runs {
            let key = inner.chunk_key(*chunk);
            fetch_missing(inner, &key, *data_start, missing, &mut self.data).await?;
        }
        put_chunk(inner, &self.entries, &self.data).await?;
        *self = Batch::default();
        Ok(())
    }
}

impl ObjectVolume {
    /// Copies into this clone every block it still reads from a parent
    /// (keeping each block's sequence number, so a write that lands
    /// meanwhile still wins), then records it as standing alone. Returns
    /// the bytes copied. Blocks the calling thread.
    pub fn flatten(&self) -> Result<u64, ObjectError> {
        let inner = &self.inner;
        if self.read_only {
            return Err(ObjectError::ReadOnly(inner.name.clone()));
        }
        inner.fence.check_admin()?;
        let _one = inner.admin.locked();
        let store = inner.store.clone();
        let name = self.volume_name().to_owned();
        let Some(record) = runtime().block_on(lineage::read(&store, &name))? else {
            return Ok(0);
        };
        if record.parent.is_none() {
            return Ok(0);
        }
        // What the map reads from parents, in address order.
        let spans: Vec<(u64, u64, u64, u64, u32)> = {
            let m = inner.map.read_locked();
            m.map
                .iter()
                .filter_map(|sp| match sp.value {
                    Mapping::Chunk { id, block } if layer_of(id) != 0 => {
                        Some((sp.start, sp.end, sp.seq, id, block))
                    }
                    _ => None,
                })
                .collect()
        };
        let mut copied = 0u64;
        let mut batch = Batch::default();
        for (start, end, seq, id, block) in spans {
            let info = inner.map.read_locked().chunk_info(id);
            let Some(info) = info else {
                return Err(ObjectError::Corrupt {
                    key: inner.chunk_key(id),
                    source: super::format::FormatError::Field {
                        what: "parent map",
                        field: "chunk",
                    },
                });
            };
            let mut lba = start;
            while lba < end {
                let room = (FLATTEN_CHUNK - batch.data.len()) / BLOCK;
                let n = (end - lba).min(room as u64);
                batch.add(
                    lba,
                    n as u32,
                    seq,
                    id,
                    info.data_start,
                    block + (lba - start) as u32,
                );
                copied += n * BLOCK as u64;
                lba += n;
                if batch.data.len() >= FLATTEN_CHUNK {
                    runtime().block_on(batch.put(inner))?;
                }
            }
        }
        if !batch.data.is_empty() {
            runtime().block_on(batch.put(inner))?;
        }
        let left = {
            let m = inner.map.read_locked();
            m.map
                .iter()
                .any(|sp| matches!(sp.value, Mapping::Chunk { id, .. } if layer_of(id) != 0))
        };
        if left {
            // Only reachable if the map changed under us in a way no write
            // can: refuse to cut the parent off.
            return Err(ObjectError::Corrupt {
                key: inner.keys.root().to_owned(),
                source: super::format::FormatError::Field {
                    what: "flattened map",
                    field: "parent chunk",
                },
            });
        }
        // The copies must be found by a reopen without the parent's map.
        runtime().block_on(super::upload::write_checkpoint(inner))?;
        // Only then does the mark say the clone stands alone; it counts
        // unless this writer was fenced meanwhile.
        runtime().block_on(async {
            let order = inner.fence.put_order().await;
            let id = inner.fence.next_id(&order)?;
            let body = serde_json::to_vec(&record).map_err(|source| ObjectError::Encode {
                what: "flatten mark",
                source,
            })?;
            store
                .put(&inner.keys.flattened_mark(id), body.into())
                .await?;
            drop(order);
            fence::verified(inner).await
        })?;
        info!(volume = %name, bytes = copied, "clone flattened");
        Ok(copied)
    }
}
