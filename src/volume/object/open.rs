//! Opening a volume: the writer lock, then the map from the latest readable
//! checkpoint plus every newer chunk index, then the local WAL replayed on
//! top (records the store already has are skipped). Replayed segments are
//! sealed and queued for upload at once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tracing::{info, warn};

use super::cache::BlockCache;
use super::format::{self, CHUNK_HEADER, Kind, SEGMENT_HEADER};
use super::layout::{self, Keys, WriterLock, id_of};
use super::segment::Segment;
use super::state::{ChunkInfo, Dirty, DirtyLoc, Mapped, Mapping};
use super::wal::{self, Wal};
use super::{Inner, ObjectError, ObjectOptions, ObjectStats, ObjectVolume, upload};
use crate::objstore::Store;
use crate::runtime::runtime;

pub async fn open(
    store: Store,
    name: &str,
    opts: ObjectOptions,
) -> Result<ObjectVolume, ObjectError> {
    let desc = layout::read_descriptor(&store, name).await?;
    let keys = Keys::new(name);
    let wal_dir = layout::wal_dir(&opts.wal_root, store.url(), name);
    let lock = if opts.read_only {
        None
    } else {
        Some(WriterLock::take(&store, name, &wal_dir).await?)
    };
    let mut mapped = load_map(&store, &keys).await?;
    let store_seq = mapped.max_seq;
    // A damaged but checksummed index could claim the last sequence number.
    let next_seq = store_seq
        .checked_add(1)
        .ok_or_else(|| ObjectError::Corrupt(format!("{name}: sequence numbers exhausted")))?;
    let next_chunk = mapped.chunks.keys().next_back().map_or(1, |k| k + 1);
    let mut dirty = Dirty {
        map: Default::default(),
        segments: BTreeMap::new(),
        active: None,
        next_seq,
        next_seg: 1,
        appended: 0,
        backlog: 0,
        last_append: std::time::Instant::now(),
    };
    if !opts.read_only {
        replay_wal(&wal_dir, store_seq, &mut dirty).map_err(ObjectError::Local)?;
    }
    // Live counts follow from the map.
    let live: Vec<(u64, u64)> = mapped
        .map
        .iter()
        .filter_map(|sp| match sp.value {
            Mapping::Chunk { id, .. } => Some((id, sp.end - sp.start)),
            _ => None,
        })
        .collect();
    for (id, n) in live {
        if let Some(c) = mapped.chunks.get_mut(&id) {
            c.live += n;
        }
    }
    let budget = opts.cache.budget(name);
    let synced = dirty.appended;
    let replayed = dirty.segments.len();
    let inner = Arc::new(Inner {
        name: name.to_owned(),
        size: desc.size,
        store,
        keys,
        cache: BlockCache::new(budget),
        wal: Wal::new(wal_dir, synced),
        dirty: RwLock::new(dirty),
        map: RwLock::new(mapped),
        upload_wake: tokio::sync::Notify::new(),
        backlog_waiters: Mutex::new(Vec::new()),
        next_chunk: AtomicU64::new(next_chunk),
        last_read_end: AtomicU64::new(u64::MAX),
        stopping: AtomicBool::new(false),
        abort: AtomicBool::new(false),
        stats: ObjectStats::default(),
        read_only: opts.read_only,
        opts,
        lock: Mutex::new(lock),
    });
    let (wal_thread, uploader) = if inner.read_only {
        (None, None)
    } else {
        let w = inner.clone();
        let t = std::thread::Builder::new()
            .name(format!("vbd-wal-{name}"))
            .spawn(move || wal::run(w))
            .map_err(|e| ObjectError::Local(format!("cannot start the WAL thread: {e}")))?;
        (Some(t), Some(runtime().spawn(upload::run(inner.clone()))))
    };
    info!(
        volume = name,
        size = desc.size,
        store_seq,
        replayed_segments = replayed,
        cache_budget = budget,
        read_only = inner.read_only,
        "object volume open"
    );
    let read_only = inner.read_only;
    Ok(ObjectVolume {
        inner,
        wal_thread: Mutex::new(wal_thread),
        uploader: Mutex::new(uploader),
        read_only,
    })
}

/// The map: newest readable checkpoint, then every newer chunk's index.
async fn load_map(store: &Store, keys: &Keys) -> Result<Mapped, ObjectError> {
    let mut m = Mapped::default();
    let mut ckpts: Vec<u64> = store
        .list(&keys.checkpoints())
        .await?
        .iter()
        .filter_map(|(k, _)| id_of(k))
        .collect();
    ckpts.sort_unstable();
    let mut base = 0;
    for id in ckpts.iter().rev() {
        let key = keys.checkpoint(*id);
        let body = store.get(&key).await?;
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
                for e in &c.entries {
                    let v = match e.kind {
                        Kind::Data => Mapping::Chunk {
                            id: e.chunk,
                            block: e.block,
                        },
                        Kind::Zero => Mapping::Zero,
                        Kind::Hole => Mapping::Hole,
                    };
                    m.map.merge(
                        e.lba,
                        e.lba + u64::from(e.blocks),
                        e.seq,
                        v,
                        super::state::newer,
                        |_| {},
                    );
                }
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
        .filter(|&(id, _)| id > base)
        .collect();
    chunks.sort_unstable();
    for (id, size) in chunks {
        let key = keys.chunk(id);
        let head = store.get_range(&key, 0..CHUNK_HEADER as u64).await?;
        let h = format::decode_chunk_header(&head)
            .and_then(|h| h.check_index_fits(size).map(|()| h))
            .map_err(|e| ObjectError::Corrupt(format!("{key}: {e}")))?;
        let index = store
            .get_range(
                &key,
                CHUNK_HEADER as u64..(CHUNK_HEADER + h.index_len()) as u64,
            )
            .await?;
        let (entries, _) = format::decode_chunk_index(&h, &index)
            .map_err(|e| ObjectError::Corrupt(format!("{key}: {e}")))?;
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

/// Loads WAL segments into the write-ahead layer, skipping records the
/// store already holds; segments go to the uploader sealed.
fn replay_wal(dir: &std::path::Path, store_seq: u64, d: &mut Dirty) -> Result<(), String> {
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
