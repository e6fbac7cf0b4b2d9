//! An object volume's life: open (a writer generation taken, recovery,
//! then the WAL thread and the uploader start), draining to the store, and
//! close, which releases the volume only once nothing is left locally.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tracing::{error, info, warn};

use super::cache::BlockCache;
use super::dirty_filter::DirtyFilter;
use super::fence::{self, Fence};
use super::fill::Fill;
use super::generation::{self, TakeOptions, base_id};
use super::layout::{self, Keys};
use super::recovery::{load_map, replay_wal};
use super::state::{Dirty, Mapping};
use super::wal::{self, Wal};
use super::{
    Inner, ObjectError, ObjectOptions, ObjectStats, ObjectVolume, background, clone, refs,
    snapshot, upload,
};
use crate::error::Chain;
use crate::lock::{MutexExt, RwLockExt};
use crate::objstore::Store;
use crate::runtime::runtime;

impl ObjectVolume {
    /// Opens volume `name` in `store`, recovering from the latest
    /// checkpoint, newer chunks and the local WAL.
    pub fn open(
        store: Store,
        name: &str,
        opts: ObjectOptions,
    ) -> Result<ObjectVolume, ObjectError> {
        runtime().block_on(open(store, name, opts))
    }

    /// Seals the open segment and waits until everything written is in the
    /// store, or until `timeout`. Returns whether it drained.
    pub fn sync_to_store(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        {
            let mut d = self.inner.dirty.write_locked();
            if let Some(a) = d.active.take() {
                a.sealed.store(true, Ordering::Release);
            }
        }
        self.inner.wal.kick();
        while std::time::Instant::now() < deadline {
            if self.inner.all_uploaded() {
                return true;
            }
            if self.inner.fence.fenced_by().is_some() {
                return false;
            }
            self.inner.upload_wake.notify_one();
            std::thread::sleep(Duration::from_millis(20));
        }
        self.inner.all_uploaded()
    }

    /// Drains the WAL to the store and releases the volume so that another
    /// host can open it with nothing to recover (`vbd volume release`).
    /// Writes, FLUSH and FUA fail from the moment this starts.
    pub fn release(&self) -> CloseOutcome {
        self.close()
    }

    /// Refuses new writes, drains the WAL to the store (bounded),
    /// checkpoints, and releases the volume (`gens/<n>.released`) when
    /// nothing is left locally. A fenced writer releases nothing: the
    /// volume is not its own any more.
    pub(super) fn close(&self) -> CloseOutcome {
        let inner = &self.inner;
        if self.read_only {
            return CloseOutcome::ReadOnly;
        }
        if inner.closing.swap(true, Ordering::AcqRel) {
            return CloseOutcome::AlreadyClosed;
        }
        let drained =
            inner.fence.fenced_by().is_none() && self.sync_to_store(inner.opts.drain_timeout);
        inner.stopping.store(true, Ordering::Release);
        inner.upload_wake.notify_one();
        if let Some(h) = self.uploader.locked().take() {
            let _ = runtime()
                .block_on(async { tokio::time::timeout(Duration::from_secs(10), h).await });
        }
        stop_wal(inner, &self.wal_thread);
        fence::fail_store_waiters(inner);
        let generation = inner.fence.generation;
        let outcome = if let Some(by) = inner.fence.fenced_by() {
            error!(
                volume = %inner.name,
                generation,
                fenced_by = by,
                backlog = self.backlog(),
                "closed a fenced writer: the volume belongs to generation {by}; nothing released"
            );
            CloseOutcome::Fenced { generation, by }
        } else if drained {
            let max_seq = inner.map.read_locked().max_seq;
            let released = runtime().block_on(async {
                if !fence::verify(inner).await {
                    return Ok(false);
                }
                generation::write_release(&inner.store, &inner.keys, generation, max_seq)
                    .await
                    .map(|()| true)
            });
            match released {
                Ok(true) => {
                    info!(volume = %inner.name, generation, max_seq, "volume released: another host can open it with nothing to recover");
                    CloseOutcome::Released { generation }
                }
                Ok(false) => CloseOutcome::Fenced {
                    generation,
                    by: inner.fence.fenced_by().unwrap_or(generation + 1),
                },
                Err(e) => {
                    warn!(volume = %inner.name, "cannot record the release in the store: {}", Chain(&e));
                    CloseOutcome::Held {
                        generation,
                        backlog_bytes: 0,
                    }
                }
            }
        } else {
            warn!(
                volume = %inner.name,
                backlog = self.backlog(),
                "acknowledged writes remain only in the local WAL (the store is unreachable); \
                 the volume stays held and they upload when it is next opened on this host"
            );
            CloseOutcome::Held {
                generation,
                backlog_bytes: self.backlog(),
            }
        };
        inner.fence.unlock_local();
        let s = inner.cache.stats();
        info!(
            volume = %inner.name,
            cache_hits = s.hits,
            cache_misses = s.misses,
            cache_evictions = s.evictions,
            chunks_uploaded = inner.stats.chunks_uploaded.load(Ordering::Relaxed),
            "object volume closed"
        );
        outcome
    }

    /// The writer generation this volume holds (0 when read-only).
    pub fn generation(&self) -> u64 {
        self.inner.fence.generation
    }

    /// How the volume came to this writer: `fresh`, `released`,
    /// `stale-local` or `take-over` (`None` when read-only).
    pub fn handover(&self) -> Option<&'static str> {
        self.inner.fence.taken.as_ref().map(|t| t.handover.name())
    }

    /// What a take-over may have lost, as far as the store can tell.
    pub fn loss_report(&self) -> Option<&str> {
        self.inner.fence.loss_report.as_deref()
    }

    /// The generation that fenced this writer, if one did.
    pub fn fenced_by(&self) -> Option<u64> {
        self.inner.fence.fenced_by()
    }

    /// The store's URL and the volume's name in it.
    pub fn identity(&self) -> (&str, &str) {
        (self.inner.store.url(), &self.inner.name)
    }
}

/// How a close ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseOutcome {
    /// Everything is in the store and the release is recorded.
    Released {
        /// The generation that released.
        generation: u64,
    },
    /// Acknowledged writes are still only local: the volume stays held.
    Held {
        /// The generation still holding it.
        generation: u64,
        /// Bytes not yet uploaded.
        backlog_bytes: u64,
    },
    /// Another writer took the volume over; this one released nothing.
    Fenced {
        /// This writer's generation.
        generation: u64,
        /// The generation that took over.
        by: u64,
    },
    /// A read-only volume holds nothing to release.
    ReadOnly,
    /// Closed before.
    AlreadyClosed,
}

/// Tells the WAL thread to stop after one last write-and-sync round, and
/// waits for it.
fn stop_wal(inner: &Inner, thread: &Mutex<Option<std::thread::JoinHandle<()>>>) {
    {
        let mut c = inner.wal.ctl.locked();
        c.stop = true;
    }
    inner.wal.cv.notify_one();
    if let Some(h) = thread.locked().take() {
        let _ = h.join();
    }
}

impl Drop for ObjectVolume {
    fn drop(&mut self) {
        // Without a graceful shutdown: stop background work at once. The
        // WAL thread's last round still writes and syncs what it holds.
        self.inner.abort.store(true, Ordering::Release);
        self.inner.stopping.store(true, Ordering::Release);
        self.inner.upload_wake.notify_one();
        stop_wal(&self.inner, &self.wal_thread);
        if let Some(h) = self.uploader.locked().take() {
            h.abort();
        }
    }
}

/// Takes a writer generation (fencing the previous one if this is a
/// take-over), recovers the map and the WAL, and starts the WAL thread and
/// the uploader.
async fn open(
    store: Store,
    name: &str,
    mut opts: ObjectOptions,
) -> Result<ObjectVolume, ObjectError> {
    // `volume@snapshot` names a snapshot, which is only ever read.
    let (volume, snap) = snapshot::split(name);
    if snap.is_some() {
        opts.read_only = true;
    }
    let mut desc = layout::read_descriptor(&store, volume).await?;
    let keys = Keys::new(volume);
    let wal_dir = layout::wal_dir(&opts.wal_root, store.url(), name);
    let (taken, local_lock, fences, wal_is_previous) = if opts.read_only {
        (
            None,
            None,
            generation::read_fences(&store, &keys).await?,
            false,
        )
    } else {
        let local_lock = layout::lock_wal_dir(volume, &wal_dir)?;
        let take = TakeOptions {
            take_over: opts.take_over,
            durability: opts.durability,
            wal_dir: wal_dir.display().to_string(),
        };
        let taken = generation::take(&store, volume, &take).await?;
        let wal_is_previous = fence::adopt_wal(&wal_dir, volume, &taken)?;
        let fences = taken.fences.clone();
        (Some(taken), Some(local_lock), fences, wal_is_previous)
    };
    let mut snapshots = 0;
    let (mut mapped, layers) = match snap {
        Some(snap) => {
            let (m, meta) = snapshot::load(&store, volume, snap).await?;
            desc.size = meta.size;
            (m, meta.layers)
        }
        None => {
            let mut m = load_map(&store, &keys, &fences).await?;
            let layers = clone::apply_parent(&store, volume, &mut m).await?;
            if !opts.read_only {
                m.pinned = refs::pinned_chunks(&store, volume).await?;
                snapshots = snapshot::names(&store, volume).await?.len() as u64;
            }
            (m, layers)
        }
    };
    let store_seq = mapped.max_seq;
    // A damaged but checksummed index could claim the last sequence number.
    let next_seq = store_seq
        .checked_add(1)
        .ok_or_else(|| ObjectError::SequenceExhausted(name.to_owned()))?;
    // This generation's chunks sort after every earlier one's.
    let first_own = taken.as_ref().map_or(1, |t| base_id(t.generation) + 1);
    let next_chunk = mapped
        .chunks
        .keys()
        .next_back()
        .map_or(1, |k| k + 1)
        .max(first_own);
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
        replay_wal(&wal_dir, store_seq, &mut dirty)?;
    }
    let loss_report = taken.as_ref().and_then(|t| {
        if wal_is_previous {
            return None;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        generation::loss_report(t, store_seq, now)
    });
    if let Some(r) = &loss_report {
        warn!(volume = name, "{r}");
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
    // Replayed segments are not in the store yet; nothing else is pending.
    let uploaded_to = dirty
        .segments
        .values()
        .next()
        .map_or(dirty.appended, |s| s.base);
    let replayed = dirty.segments.len();
    let stats = ObjectStats::default();
    stats.snapshots.store(snapshots, Ordering::Relaxed);
    let inner = Arc::new(Inner {
        name: name.to_owned(),
        size: AtomicU64::new(desc.size),
        store,
        keys,
        cache: BlockCache::new(budget),
        wal: Wal::new(wal_dir, synced),
        dirty_filter: DirtyFilter::new(!opts.read_only),
        dirty: RwLock::new(dirty),
        map: RwLock::new(mapped),
        upload_wake: tokio::sync::Notify::new(),
        backlog_waiters: Mutex::new(Vec::new()),
        fill: Fill::new(budget),
        publishing: tokio::sync::Mutex::new(()),
        stopping: AtomicBool::new(false),
        abort: AtomicBool::new(false),
        stats,
        read_only: opts.read_only,
        closing: AtomicBool::new(false),
        fence: Fence::new(
            taken,
            fences,
            opts.durability,
            local_lock,
            uploaded_to,
            loss_report,
            next_chunk,
        ),
        opts,
        layers: RwLock::new(layers),
        upload_limit: AtomicU64::new(u64::MAX),
        admin: Mutex::new(()),
        gc: tokio::sync::Mutex::new(()),
        resize_hooks: Mutex::new(Vec::new()),
    });
    // Replayed records wait for upload like appended ones.
    for seg in inner.dirty.read_locked().segments.values() {
        seg.for_each_record(|h| inner.dirty_filter.add(h.lba, u64::from(h.blocks)));
    }
    let (wal_thread, uploader) = if inner.read_only {
        (None, None)
    } else {
        let w = inner.clone();
        let t = std::thread::Builder::new()
            .name(format!("vbd-wal-{name}"))
            .spawn(move || wal::run(w))
            .map_err(ObjectError::WalThread)?;
        (
            Some(t),
            Some(background::runtime().spawn(upload::run(inner.clone()))),
        )
    };
    let f = &inner.fence;
    info!(
        volume = name,
        size = desc.size,
        store_seq,
        replayed_segments = replayed,
        cache_budget = budget,
        read_only = inner.read_only,
        generation = f.generation,
        handover = f.taken.as_ref().map_or("read-only", |t| t.handover.name()),
        previous_generation = f.taken.as_ref().map_or(0, |t| t.previous),
        durability = %f.durability,
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
