//! An object volume's life: open (recovery, then the WAL thread and the
//! uploader start), draining to the store, and close, which releases the
//! writer lock only once nothing is left locally.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tracing::{info, warn};

use super::cache::BlockCache;
use super::dirty_filter::DirtyFilter;
use super::fill::Fill;
use super::layout::{self, Keys, WriterLock};
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
            self.inner.upload_wake.notify_one();
            std::thread::sleep(Duration::from_millis(20));
        }
        self.inner.all_uploaded()
    }

    /// Flushes, drains the WAL to the store (bounded), checkpoints and
    /// releases the writer lock when nothing is left locally.
    pub(super) fn close(&self) {
        let inner = &self.inner;
        if self.read_only {
            return;
        }
        let drained = self.sync_to_store(inner.opts.drain_timeout);
        inner.stopping.store(true, Ordering::Release);
        inner.upload_wake.notify_one();
        if let Some(h) = self.uploader.locked().take() {
            let _ = runtime()
                .block_on(async { tokio::time::timeout(Duration::from_secs(10), h).await });
        }
        stop_wal(inner, &self.wal_thread);
        let lock = inner.lock.locked().take();
        if let Some(lock) = lock {
            if drained {
                if let Err(e) = runtime().block_on(lock.release(&inner.store)) {
                    warn!(volume = %inner.name, "cannot release the store lock: {}", Chain(&e));
                }
            } else {
                warn!(
                    volume = %inner.name,
                    backlog = self.backlog(),
                    "acknowledged writes remain only in the local WAL (the store is unreachable); \
                     the volume stays locked and they upload when it is next opened on this host"
                );
            }
        }
        let s = inner.cache.stats();
        info!(
            volume = %inner.name,
            cache_hits = s.hits,
            cache_misses = s.misses,
            cache_evictions = s.evictions,
            chunks_uploaded = inner.stats.chunks_uploaded.load(Ordering::Relaxed),
            "object volume closed"
        );
    }
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

/// Takes the writer lock, recovers the map and the WAL, and starts the
/// WAL thread and the uploader.
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
    let lock = if opts.read_only {
        None
    } else {
        Some(WriterLock::take(&store, volume, &wal_dir).await?)
    };
    let mut snapshots = 0;
    let (mut mapped, layers) = match snap {
        Some(snap) => {
            let (m, meta) = snapshot::load(&store, volume, snap).await?;
            desc.size = meta.size;
            (m, meta.layers)
        }
        None => {
            let mut m = load_map(&store, &keys).await?;
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
        replay_wal(&wal_dir, store_seq, &mut dirty)?;
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
        next_chunk: AtomicU64::new(next_chunk),
        fill: Fill::new(budget),
        stopping: AtomicBool::new(false),
        abort: AtomicBool::new(false),
        stats,
        read_only: opts.read_only,
        opts,
        lock: Mutex::new(lock),
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
