//! Recovery at open: the map from the latest readable checkpoint plus
//! every newer chunk index, then the local WAL replayed on top (records the
//! store already has are skipped). Replayed segments are sealed and queued
//! for upload at once.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tracing::warn;

use super::format::{self, CHUNK_HEADER, ChunkHeader, IndexEntry, Kind, SEGMENT_HEADER};
use super::generation::Fences;
use super::layout::{Keys, id_of};
use super::segment::Segment;
use super::state::{ChunkInfo, Dirty, DirtyLoc, Mapped, Mapping};
use super::wal;
use super::{ObjectError, WalError};
use crate::objstore::{Store, StoreError};

/// The map: newest readable checkpoint, then every newer chunk's index;
/// objects the fences rule out (a fenced writer's late uploads) are not
/// read. An object that vanishes between the listing and its read was
/// deleted by a writer's garbage collection after something that counts
/// superseded it, so it is skipped.
pub(super) async fn load_map(
    store: &Store,
    keys: &Keys,
    fences: &Fences,
) -> Result<Mapped, ObjectError> {
    let mut m = Mapped::default();
    let mut ckpts: Vec<u64> = store
        .list(&keys.checkpoints())
        .await?
        .iter()
        .filter_map(|(k, _)| id_of(k))
        .filter(|&id| fences.counts(id))
        .collect();
    ckpts.sort_unstable();
    let mut base = 0;
    for id in ckpts.iter().rev() {
        let key = keys.checkpoint(*id);
        let body = match store.get(&key).await {
            Ok(b) => b,
            Err(StoreError::NotFound(_)) => {
                warn!(checkpoint = %key, "checkpoint deleted while the volume was opening; skipped");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        match format::decode_checkpoint(&body) {
            Ok(c) => {
                for r in &c.chunks {
                    m.chunks.insert(
                        r.id,
                        ChunkInfo {
                            data_start: r.data_start,
                            data_blocks: r.data_blocks,
                            live: 0,
                        },
                    );
                }
                m.merge_entries(&c.entries, |id| id);
                m.max_seq = c.max_seq;
                base = c.id;
                break;
            }
            Err(e) => warn!(checkpoint = %key, "unreadable checkpoint skipped: {e}"),
        }
    }
    let mut chunks: Vec<(u64, u64)> = store
        .list(&keys.chunks())
        .await?
        .iter()
        .filter_map(|(k, size)| Some((id_of(k)?, *size)))
        .filter(|&(id, _)| id > base && fences.counts(id))
        .collect();
    chunks.sort_unstable();
    for (id, size) in chunks {
        let (h, entries) = match read_chunk_index(store, keys.chunk(id), Some(size)).await {
            Ok(r) => r,
            Err(ObjectError::Store(StoreError::NotFound(key))) => {
                warn!(chunk = %key, "chunk deleted while the volume was opening; skipped");
                continue;
            }
            Err(e) => return Err(e),
        };
        m.chunks.insert(
            id,
            ChunkInfo {
                data_start: (CHUNK_HEADER + h.index_len()) as u64,
                data_blocks: h.data_blocks,
                live: 0,
            },
        );
        for e in &entries {
            m.map.merge(
                e.lba,
                e.lba + u64::from(e.blocks),
                e.seq,
                Mapping::of(id, e),
                super::state::newer,
                |_| {},
            );
            m.max_seq = m.max_seq.max(e.seq);
        }
        m.max_seq = m.max_seq.max(h.max_seq);
    }
    Ok(m)
}

/// Reads and checks the header and index of chunk object `key`. Given the
/// object's `size` (from a listing), a header that claims a bigger index is
/// refused before anything is fetched on its word.
pub(super) async fn read_chunk_index(
    store: &Store,
    key: String,
    size: Option<u64>,
) -> Result<(ChunkHeader, Vec<IndexEntry>), ObjectError> {
    let head = store.get_range(&key, 0..CHUNK_HEADER as u64).await?;
    let fits = |h: ChunkHeader| match size {
        Some(size) => h.check_index_fits(size).map(|()| h),
        None => Ok(h),
    };
    let h = match format::decode_chunk_header(&head).and_then(fits) {
        Ok(h) => h,
        Err(source) => return Err(ObjectError::Corrupt { key, source }),
    };
    let index_end = (CHUNK_HEADER + h.index_len()) as u64;
    let index = store
        .get_range(&key, CHUNK_HEADER as u64..index_end)
        .await?;
    match format::decode_chunk_index(&h, &index) {
        Ok((entries, _)) => Ok((h, entries)),
        Err(source) => Err(ObjectError::Corrupt { key, source }),
    }
}

/// Loads WAL segments into the write-ahead layer, skipping records the
/// store already holds; segments go to the uploader sealed.
pub(super) fn replay_wal(
    dir: &std::path::Path,
    store_seq: u64,
    d: &mut Dirty,
) -> Result<(), WalError> {
    let segs = wal::replay(dir)?;
    for r in segs {
        let seg = Arc::new(Segment::new(
            r.id,
            d.appended,
            r.bytes.len(),
            &r.bytes[..SEGMENT_HEADER.min(r.bytes.len())],
        ));
        // SAFETY: the segment is not shared yet.
        unsafe { seg.append(&[&r.bytes[SEGMENT_HEADER.min(r.bytes.len())..]]) };
        for (h, data_at) in &r.records {
            if h.seq <= store_seq {
                continue;
            }
            let loc = match h.kind {
                Kind::Data => DirtyLoc::Data {
                    seg: r.id,
                    off: *data_at as u64,
                },
                Kind::Zero => DirtyLoc::Zero,
                Kind::Hole => DirtyLoc::Hole,
            };
            d.map
                .insert(h.lba, h.lba + u64::from(h.blocks), h.seq, loc, |_| {});
            d.next_seq = d.next_seq.max(h.seq + 1);
            if seg.first_seq.load(Ordering::Relaxed) == 0 {
                seg.first_seq.store(h.seq, Ordering::Relaxed);
            }
            seg.last_seq.store(h.seq, Ordering::Relaxed);
        }
        let len = seg.len();
        seg.written.store(len, Ordering::Release);
        seg.synced.store(len, Ordering::Release);
        seg.sealed.store(true, Ordering::Release);
        d.appended = seg.end_pos();
        d.backlog += len as u64;
        d.next_seg = d.next_seg.max(r.id + 1);
        d.segments.insert(r.id, seg);
    }
    Ok(())
}
