//! What an operator can read about an object volume: live counters and
//! point-in-time snapshots of them with the backlog.

use std::sync::atomic::{AtomicU64, Ordering};

use super::ObjectVolume;
use super::cache::CacheStats;
use crate::lock::RwLockExt;

/// Counters an operator can read.
#[derive(Default)]
pub struct ObjectStats {
    /// Chunk objects put in the store.
    pub chunks_uploaded: AtomicU64,
    /// Bytes of chunk objects put in the store.
    pub bytes_uploaded: AtomicU64,
    /// Failed chunk puts; each one is retried.
    pub upload_failures: AtomicU64,
    /// Chunks rewritten by garbage collection.
    pub chunks_collected: AtomicU64,
    /// Ranged GETs of chunk data (cache misses), retries included.
    pub fetches: AtomicU64,
    /// Bytes of chunk data those GETs brought back (read-ahead included).
    pub fetch_bytes: AtomicU64,
    /// Ranged GETs that failed (each is retried).
    pub fetch_failures: AtomicU64,
    /// Garbage-collection passes that found a chunk to rewrite or delete.
    pub gc_runs: AtomicU64,
    /// Garbage-collection passes that failed (and will be retried).
    pub gc_failures: AtomicU64,
    /// Superseded chunks deleted from the store.
    pub chunks_deleted: AtomicU64,
    /// Checkpoints of the whole map written to the store.
    pub checkpoints: AtomicU64,
    /// The volume's snapshots: counted at open, then kept up to date by
    /// the snapshots taken and deleted through it.
    pub snapshots: AtomicU64,
}

/// A point-in-time copy of an object volume's counters and backlog.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ObjectCounters {
    /// Hits, misses and bytes held by the block cache.
    pub cache: CacheStats,
    /// Bytes of acknowledged writes in the local WAL, not yet in the store.
    pub backlog_bytes: u64,
    /// WAL records not yet in the store.
    pub backlog_records: u64,
    /// WAL segments not yet in the store (the upload queue).
    pub backlog_segments: u64,
    /// Backlog at which writes wait for the uploader.
    pub backlog_limit: u64,
    /// Chunk objects put in the store.
    pub chunks_uploaded: u64,
    /// Bytes of chunk objects put in the store.
    pub bytes_uploaded: u64,
    /// Failed chunk puts; each one is retried.
    pub upload_failures: u64,
    /// Ranged GETs of chunk data (cache misses), retries included.
    pub fetches: u64,
    /// Bytes of chunk data those GETs brought back (read-ahead included).
    pub fetch_bytes: u64,
    /// Ranged GETs that failed (each is retried).
    pub fetch_failures: u64,
    /// Garbage-collection passes that found a chunk to rewrite or delete.
    pub gc_runs: u64,
    /// Garbage-collection passes that failed (and will be retried).
    pub gc_failures: u64,
    /// Chunks rewritten by garbage collection.
    pub chunks_rewritten: u64,
    /// Superseded chunks deleted from the store.
    pub chunks_deleted: u64,
    /// Checkpoints of the whole map written to the store.
    pub checkpoints: u64,
    /// The volume's snapshots (as of open, and those taken or deleted since).
    pub snapshots: u64,
    /// Parent layers the map reads through: 0 for a volume that is no clone.
    pub layers: u64,
    /// Bytes of data read through from parents' chunks (shared with them).
    pub shared_bytes: u64,
    /// Bytes of data in the volume's own chunks that its map points at.
    pub own_bytes: u64,
}

impl ObjectVolume {
    /// Cache counters.
    pub fn cache_stats(&self) -> CacheStats {
        self.inner.cache.stats()
    }

    /// Upload and fetch counters.
    pub fn stats(&self) -> &ObjectStats {
        &self.inner.stats
    }

    /// Counters and backlog, read under the write-ahead layer's lock for
    /// a moment (at scrape time only).
    pub fn counters(&self) -> ObjectCounters {
        let inner = &self.inner;
        let (backlog_bytes, backlog_records, backlog_segments) = {
            let d = inner.dirty.read_locked();
            // Sequence numbers within a segment are consecutive.
            let records = d
                .segments
                .values()
                .map(|s| {
                    let first = s.first_seq.load(Ordering::Relaxed);
                    let last = s.last_seq.load(Ordering::Relaxed);
                    if first == 0 {
                        0
                    } else {
                        last.saturating_sub(first) + 1
                    }
                })
                .sum();
            (d.backlog, records, d.segments.len() as u64)
        };
        let (own_bytes, shared_bytes) = {
            let m = inner.map.read_locked();
            let mut own = 0;
            let mut shared = 0;
            for sp in m.map.iter() {
                if let super::state::Mapping::Chunk { id, .. } = sp.value {
                    let n = (sp.end - sp.start) * super::format::BLOCK as u64;
                    if super::lineage::layer_of(id) == 0 {
                        own += n;
                    } else {
                        shared += n;
                    }
                }
            }
            (own, shared)
        };
        let s = &inner.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ObjectCounters {
            cache: inner.cache.stats(),
            backlog_bytes,
            backlog_records,
            backlog_segments,
            backlog_limit: inner.opts.backlog,
            chunks_uploaded: get(&s.chunks_uploaded),
            bytes_uploaded: get(&s.bytes_uploaded),
            upload_failures: get(&s.upload_failures),
            fetches: get(&s.fetches),
            fetch_bytes: get(&s.fetch_bytes),
            fetch_failures: get(&s.fetch_failures),
            gc_runs: get(&s.gc_runs),
            gc_failures: get(&s.gc_failures),
            chunks_rewritten: get(&s.chunks_collected),
            chunks_deleted: get(&s.chunks_deleted),
            checkpoints: get(&s.checkpoints),
            snapshots: get(&s.snapshots),
            layers: inner.layers.read_locked().len() as u64,
            shared_bytes,
            own_bytes,
        }
    }

    /// Bytes of acknowledged writes not yet in the store.
    pub fn backlog(&self) -> u64 {
        self.inner.dirty.read_locked().backlog
    }
}
