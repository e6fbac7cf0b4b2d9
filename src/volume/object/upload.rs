//! The uploader: packs each sealed, durable WAL segment into a chunk object
//! (newest version of each block winning), puts it, moves its blocks from
//! the write-ahead layer into the map and only then deletes the segment.
//! It also writes checkpoints and garbage-collects sparse chunks. Runs on
//! the uploaders' lower-priority runtime (`background`), so it holds the
//! locks the reactors need only briefly: packing reads the segment alone,
//! and publishing goes in batches. Store failures are retried until they
//! succeed.

use crate::lock::RwLockExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::{debug, error, info, warn};

use super::extent_map::ExtentMap;
use super::fence;
use super::format::{self, BLOCK, ChunkRecord, IndexEntry, Kind, SEGMENT_HEADER};
use super::generation::base_id;
use super::layout::id_of;
use super::recovery::read_chunk_index;
use super::segment::Segment;
use super::span_fetch::{Missing, fetch_missing};
use super::state::{ChunkInfo, DirtyLoc, Mapping};
use super::{Inner, ObjectError};
use crate::error::Chain;
use crate::objstore::StoreError;

/// How long a rewritten or dead chunk stays readable for reads already in flight.
pub(super) const GRACE: Duration = Duration::from_secs(30);

/// Runs until the volume stops and nothing is left to upload (or, when the
/// store is down, until asked to stop).
pub(super) async fn run(inner: Arc<Inner>) {
    let mut since_checkpoint = 0u64;
    let mut doomed: Vec<(u64, Instant)> = Vec::new();
    // The last chunk's packing buffer, kept while segments keep coming.
    let mut scratch = Vec::new();
    let mut last_upload = Instant::now();
    loop {
        if inner.fence.fenced_by().is_some() {
            // Fenced: nothing more goes to the store, not even a delete.
            return;
        }
        let stopping = inner.stopping.load(Ordering::Acquire);
        match next_segment(&inner) {
            Some(seg) => {
                if upload_segment(&inner, &seg, &mut scratch).await {
                    since_checkpoint += 1;
                    last_upload = Instant::now();
                    inner.release_backlog_waiters();
                    continue;
                }
                // The store refused; the retry loop only gives up when stopping.
                if stopping {
                    break;
                }
            }
            None if stopping && inner.all_uploaded() => break,
            None => {
                // A volume that is not being written holds no buffer.
                if last_upload.elapsed() > KEEP_BODY_IDLE {
                    scratch = Vec::new();
                }
                if since_checkpoint >= inner.opts.checkpoint_every {
                    if write_checkpoint(&inner).await.is_ok() {
                        since_checkpoint = 0;
                    }
                } else if let Some(d) = collect_garbage(&inner).await {
                    doomed.extend(d);
                } else {
                    fence::collect_fenced_orphans(&inner, false).await;
                }
                delete_doomed(&inner, &mut doomed).await;
            }
        }
        if inner.abort.load(Ordering::Acquire) {
            return;
        }
        tokio::select! {
            () = inner.upload_wake.notified() => {}
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
    if inner.fence.fenced_by().is_some() {
        return;
    }
    if inner.all_uploaded() && since_checkpoint > 0 {
        let _ = write_checkpoint(&inner).await;
    }
    delete_doomed(&inner, &mut doomed).await;
    if inner.all_uploaded() && !inner.abort.load(Ordering::Acquire) {
        fence::collect_fenced_orphans(&inner, true).await;
    }
}

/// The oldest segment, if it is sealed and durable: segments go to the
/// store strictly in order, which is what makes WAL replay after a crash
/// able to skip everything at or below the store's highest sequence.
fn next_segment(inner: &Inner) -> Option<Arc<Segment>> {
    let d = inner.dirty.read_locked();
    let s = d.segments.values().next()?;
    let ready = s.sealed.load(Ordering::Acquire)
        && s.synced.load(Ordering::Acquire) >= s.len()
        && s.id <= inner.upload_limit.load(Ordering::Acquire);
    ready.then(|| s.clone())
}

/// Packs the chunk for one segment into `body` (with id 0: see
/// [`format::set_chunk_id`]) and returns its entries and data blocks:
/// every block its records wrote, the newest version within the segment
/// winning. Blocks that a later segment overwrote stay in: a FLUSH may
/// have been acknowledged between the two writes, and until the later
/// segment is in the store (durability=store) or synced (durability=local:
/// its WAL file may not be), this chunk is what keeps the flushed version.
/// Records at or below `after_seq` are in the store already (a replayed
/// segment's head). The data goes straight from the segment into its
/// place in the chunk. Records are not checked against their CRCs again:
/// a segment in memory holds what this process appended, or what replay
/// checked.
fn pack(seg: &Segment, after_seq: u64, body: &mut Vec<u8>) -> (Vec<IndexEntry>, u32) {
    let mut newest: ExtentMap<DirtyLoc> = ExtentMap::default();
    let mut pos = SEGMENT_HEADER;
    let len = seg.len();
    while pos < len {
        let Some(h) = seg
            .bytes(pos, (len - pos).min(format::WAL_RECORD_HEADER))
            .and_then(|b| format::decode_record_header(b).ok())
        else {
            break;
        };
        let rec_len = format::WAL_RECORD_HEADER + h.data_len();
        if pos + rec_len > len {
            break;
        }
        let loc = match h.kind {
            Kind::Data => DirtyLoc::Data {
                seg: seg.id,
                off: (pos + format::WAL_RECORD_HEADER) as u64,
            },
            Kind::Zero => DirtyLoc::Zero,
            Kind::Hole => DirtyLoc::Hole,
        };
        // Records are in sequence order: a later one replaces what it overlaps.
        if h.seq > after_seq {
            newest.insert(h.lba, h.lba + u64::from(h.blocks), h.seq, loc, |_| {});
        }
        pos += rec_len;
    }
    let mut entries = Vec::with_capacity(newest.len());
    // Where each data entry's blocks are in the segment, in chunk order.
    let mut runs = Vec::new();
    let mut data_blocks = 0u32;
    for sp in newest.iter() {
        let blocks = (sp.end - sp.start) as u32;
        let (kind, data_block) = match sp.value {
            DirtyLoc::Data { off, .. } => {
                runs.push((off as usize, blocks as usize * BLOCK));
                data_blocks += blocks;
                (Kind::Data, data_blocks - blocks)
            }
            DirtyLoc::Zero => (Kind::Zero, 0),
            DirtyLoc::Hole => (Kind::Hole, 0),
        };
        entries.push(IndexEntry {
            lba: sp.start,
            seq: sp.seq,
            blocks,
            data_block,
            kind,
        });
    }
    format::encode_chunk_with(body, 0, &entries, data_blocks, |data| {
        let mut at = 0;
        for (off, n) in runs {
            let dst = &mut data[at..at + n];
            match seg.bytes(off, n) {
                Some(src) => dst.copy_from_slice(src),
                // Unreachable: the record was whole above.
                None => dst.fill(0),
            }
            at += n;
        }
    });
    (entries, data_blocks)
}

/// A packing buffer bigger than this is not kept for the next chunk.
const KEEP_BODY: usize = 16 << 20;
/// Nor one that no segment has needed for this long.
const KEEP_BODY_IDLE: Duration = Duration::from_secs(2);

/// Puts one segment's chunk, checks this writer was not fenced meanwhile,
/// and only then publishes it: into the map, out of the write-ahead layer
/// and the WAL, and past the store frontier FLUSH waits on under
/// durability=store. Returns false if the volume aborted or was fenced.
/// `scratch` is the buffer the last chunk was packed in, handed back for
/// the next when the store let go of it.
async fn upload_segment(inner: &Arc<Inner>, seg: &Arc<Segment>, scratch: &mut Vec<u8>) -> bool {
    if inner.fence.fenced_by().is_some() {
        return false;
    }
    let stored_seq = inner.map.read_locked().max_seq;
    let mut body = std::mem::take(scratch);
    let (entries, data_blocks) = pack(seg, stored_seq, &mut body);
    let data_start = format::chunk_data_start(entries.len(), data_blocks) as u64;
    // From the chunk's id until it is wholly in the map (see `publishing`).
    let publishing = inner.publishing.lock().await;
    let chunk_id = if entries.is_empty() {
        *scratch = body;
        None
    } else {
        // Allocated and put under the put-order lock: this writer's
        // objects land in id order (see `generation`).
        let order = inner.fence.put_order().await;
        let id = match inner.fence.next_id(&order) {
            Ok(id) => id,
            Err(e) => {
                error!(volume = %inner.name, "cannot upload: {}", Chain(&e));
                return false;
            }
        };
        format::set_chunk_id(&mut body, id);
        let body = Bytes::from(body);
        let key = inner.keys.chunk(id);
        let mut delay = Duration::from_millis(50);
        loop {
            match inner.store.put(&key, body.clone()).await {
                Ok(()) => break,
                Err(e) => {
                    inner.stats.upload_failures.fetch_add(1, Ordering::Relaxed);
                    warn!(volume = %inner.name, chunk = id, "upload failed, will retry: {}", Chain(&e));
                    if inner.abort.load(Ordering::Acquire) {
                        return false;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        drop(order);
        if !fence::verify(inner).await {
            return false;
        }
        Some((id, body))
    };
    let uploaded_to = publish(
        inner,
        seg,
        chunk_id.as_ref().map(|(id, _)| (*id, data_start)),
        &entries,
        data_blocks,
    );
    drop(publishing);
    fence::advance_uploaded(inner, uploaded_to);
    if let Some((id, body)) = chunk_id {
        // The data entries' blocks are the chunk's data, in order: one
        // run fills each cache group in one go (a run per entry grew a
        // group a block at a time, reallocating it for every block).
        let data = &body[data_start as usize..];
        inner.cache.insert_run(id, 0, data);
        inner.stats.chunks_uploaded.fetch_add(1, Ordering::Relaxed);
        inner
            .stats
            .bytes_uploaded
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        debug!(volume = %inner.name, chunk = id, entries = entries.len(), blocks = data_blocks, "chunk uploaded");
        if let Ok(b) = body.try_into_mut()
            && b.capacity() <= KEEP_BODY
        {
            *scratch = Vec::from(b);
        }
    }
    // Only now, with its data safely in the store, may the segment go.
    let path = inner.wal.segment_path(seg.id);
    if let Err(e) = std::fs::remove_file(&path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!(path = %path.display(), "cannot remove uploaded WAL segment: {e}");
    }
    true
}

/// Index entries applied to the map, or taken out of the write-ahead
/// layer, under one hold of its lock: the reactors wait while it is held,
/// and the uploader runs at a lower priority than they do.
pub(super) const PUBLISH_BATCH: usize = 64;

/// Moves an uploaded segment's blocks from the write-ahead layer to the
/// map: into the map first, then out of the write-ahead layer, then the
/// segment itself, each in short holds of the locks. Reads stay right in
/// between: the write-ahead layer wins over the map, and holds the same
/// blocks until they are in the map; a block a later write changed keeps
/// that write's (newer) sequence number and is left alone. Returns the
/// log position below which every record is now in the store.
fn publish(
    inner: &Inner,
    seg: &Segment,
    chunk: Option<(u64, u64)>,
    entries: &[IndexEntry],
    data_blocks: u32,
) -> u64 {
    if let Some((id, data_start)) = chunk {
        inner.map.write_locked().chunks.insert(
            id,
            ChunkInfo {
                data_start,
                data_blocks,
                live: 0,
            },
        );
        let mut superseded = Vec::new();
        for batch in entries.chunks(PUBLISH_BATCH) {
            inner
                .map
                .write_locked()
                .apply_chunk(id, batch, &mut superseded);
        }
        inner.drop_superseded(&superseded);
    }
    let mut gone = Vec::new();
    for batch in entries.chunks(PUBLISH_BATCH) {
        let mut d = inner.dirty.write_locked();
        for e in batch {
            d.map.for_each_in(e.lba, e.lba + u64::from(e.blocks), |sp| {
                if sp.seq == e.seq {
                    gone.push((sp.start, sp.end));
                }
            });
        }
        for (s, e) in gone.drain(..) {
            d.map.remove(s, e, |_| {});
        }
    }
    let uploaded_to = {
        let mut d = inner.dirty.write_locked();
        let mut m = inner.map.write_locked();
        d.segments.remove(&seg.id);
        d.backlog = d.backlog.saturating_sub(seg.len() as u64);
        let seq = seg.last_seq.load(Ordering::Acquire);
        m.max_seq = m.max_seq.max(seq);
        // Everything before the oldest segment left is in the store now.
        d.segments.values().next().map_or(d.appended, |s| s.base)
    };
    // Last: reads that then skip the write-ahead layer find it all in the map.
    seg.for_each_record(|h| inner.dirty_filter.remove(h.lba, u64::from(h.blocks)));
    uploaded_to
}

/// Writes the whole map as a checkpoint and prunes all but the two newest.
pub(super) async fn write_checkpoint(inner: &Inner) -> Result<(), StoreError> {
    let (id, body) = {
        // No chunk half applied, none put but not yet in the map.
        let _publishing = inner.publishing.lock().await;
        let m = inner.map.read_locked();
        let Some((&last, _)) = m.chunks.iter().next_back() else {
            return Ok(());
        };
        let entries = m.entries();
        let table: Vec<ChunkRecord> = m
            .chunks
            .iter()
            .map(|(&id, c)| ChunkRecord {
                id,
                data_start: c.data_start,
                data_blocks: c.data_blocks,
            })
            .collect();
        // Keys carry the writer's generation even before its first chunk.
        let id = last.max(base_id(inner.fence.generation));
        (
            id,
            format::encode_checkpoint(id, &entries, &table, m.max_seq),
        )
    };
    inner
        .store
        .put(&inner.keys.checkpoint(id), Bytes::from(body))
        .await?;
    inner.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
    info!(volume = %inner.name, chunk = id, "checkpoint written");
    // Older checkpoints go only once this one is known to count, and never
    // a later generation's (whose ids are above this one's).
    if !fence::verify(inner).await {
        return Ok(());
    }
    let old = inner.store.list(&inner.keys.checkpoints()).await?;
    let mut ids: Vec<u64> = old
        .iter()
        .filter_map(|(k, _)| id_of(k))
        .filter(|&i| i < id)
        .collect();
    ids.sort_unstable();
    if ids.len() > 1 {
        for stale in &ids[..ids.len() - 1] {
            inner.store.delete(&inner.keys.checkpoint(*stale)).await?;
        }
    }
    Ok(())
}

/// Rewrites one chunk whose live share fell below the threshold, or marks a
/// dead one for deletion. Returns chunks to delete after the grace period.
pub(super) async fn collect_garbage(inner: &Arc<Inner>) -> Option<Vec<(u64, Instant)>> {
    let _one = inner.gc.lock().await;
    let (victim, info, newest) = {
        let m = inner.map.read_locked();
        let newest = *m.chunks.keys().next_back()?;
        let threshold = inner.opts.gc_threshold;
        let (&id, &info) = m.chunks.iter().find(|(id, c)| {
            **id < newest
                && c.data_blocks > 0
                && (c.live as f64) < threshold * f64::from(c.data_blocks)
                && super::refs::collectable(&m, **id)
        })?;
        (id, info, newest)
    };
    let _ = newest;
    inner.stats.gc_runs.fetch_add(1, Ordering::Relaxed);
    if info.live == 0 {
        let mut m = inner.map.write_locked();
        m.retire(victim);
        debug!(volume = %inner.name, chunk = victim, "chunk has no live blocks; deleting");
        return Some(vec![(victim, Instant::now())]);
    }
    match rewrite(inner, victim, info).await {
        Ok(()) => Some(vec![(victim, Instant::now())]),
        Err(e) => {
            inner.stats.gc_failures.fetch_add(1, Ordering::Relaxed);
            warn!(volume = %inner.name, chunk = victim, "garbage collection failed, will retry: {}", Chain(&e));
            None
        }
    }
}

/// Copies a chunk's live entries (data and zeroes alike, with their
/// original sequence numbers) into a new chunk that supersedes it. Live
/// data the cache lacks comes in a few ranged GETs (`span_fetch`), not
/// one per live run. `pub(super)` for the tests, which rewrite a chosen
/// chunk while background collection is off.
pub(super) async fn rewrite(
    inner: &Arc<Inner>,
    victim: u64,
    info: ChunkInfo,
) -> Result<(), ObjectError> {
    let key = inner.keys.chunk(victim);
    let (_, entries) = read_chunk_index(&inner.store, key.clone(), None).await?;
    // Live pieces: the map still points at exactly this entry.
    let mut live: Vec<IndexEntry> = Vec::new();
    {
        let m = inner.map.read_locked();
        for e in &entries {
            m.map.for_each_in(e.lba, e.lba + u64::from(e.blocks), |sp| {
                let here = match (e.kind, sp.value) {
                    (Kind::Data, Mapping::Chunk { id, block }) => {
                        id == victim
                            && u64::from(block) == u64::from(e.data_block) + (sp.start - e.lba)
                    }
                    (Kind::Zero, Mapping::Zero) | (Kind::Hole, Mapping::Hole) => true,
                    _ => false,
                };
                if here && sp.seq == e.seq {
                    live.push(IndexEntry {
                        lba: sp.start,
                        seq: e.seq,
                        blocks: (sp.end - sp.start) as u32,
                        data_block: e.data_block + (sp.start - e.lba) as u32,
                        kind: e.kind,
                    });
                }
            });
        }
    }
    // Live data comes from the cache when it holds the whole run (it is
    // the victim's, immutable), else from the store; runs that were cached
    // are cached again under the new chunk, so that reads of a hot block
    // do not miss because garbage collection moved it.
    let mut data = Vec::new();
    let mut cached: Vec<(u32, u32)> = Vec::new();
    let mut missing: Vec<Missing> = Vec::new();
    for e in live.iter_mut().filter(|e| e.kind == Kind::Data) {
        let want = e.blocks as usize * BLOCK;
        let at = data.len();
        data.resize(at + want, 0);
        let mut whole = true;
        inner
            .cache
            .read_run(victim, e.data_block, &mut data[at..], |_| whole = false);
        if whole {
            let block = (at / BLOCK) as u32;
            // Runs that follow each other go back in as one: a cache group
            // filled a run at a time is reallocated for every run.
            match cached.last_mut() {
                Some((b, n)) if *b + *n == block => *n += e.blocks,
                _ => cached.push((block, e.blocks)),
            }
        } else {
            missing.push(Missing {
                from: e.data_block,
                blocks: e.blocks,
                to: at,
            });
        }
        e.data_block = (at / BLOCK) as u32;
    }
    fetch_missing(inner, &key, info.data_start, &mut missing, &mut data).await?;
    let id = super::ingest::put_chunk(inner, &live, &data).await?;
    for (block, n) in cached {
        let (a, b) = (block as usize * BLOCK, (block + n) as usize * BLOCK);
        inner.cache.insert_run(id, block, &data[a..b]);
    }
    let mut m = inner.map.write_locked();
    m.retire(victim);
    inner.stats.chunks_collected.fetch_add(1, Ordering::Relaxed);
    info!(volume = %inner.name, from = victim, to = id, blocks = data.len() / BLOCK, "chunk rewritten by garbage collection");
    Ok(())
}

pub(super) async fn delete_doomed(inner: &Inner, doomed: &mut Vec<(u64, Instant)>) {
    if inner.fence.fenced_by().is_some() {
        return;
    }
    let mut keep = Vec::new();
    for (id, since) in doomed.drain(..) {
        if since.elapsed() < GRACE
            && !inner.abort.load(Ordering::Acquire)
            && !inner.stopping.load(Ordering::Acquire)
        {
            keep.push((id, since));
            continue;
        }
        match inner.store.delete(&inner.keys.chunk(id)).await {
            Ok(()) => {
                inner.stats.chunks_deleted.fetch_add(1, Ordering::Relaxed);
                let mut m = inner.map.write_locked();
                m.retired.remove(&id);
            }
            Err(e) => {
                warn!(volume = %inner.name, chunk = id, "cannot delete garbage chunk, will retry: {}", Chain(&e));
                keep.push((id, since));
            }
        }
    }
    *doomed = keep;
}
