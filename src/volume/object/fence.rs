//! Fencing at run time. A writer holds one generation (see `generation`);
//! after every put it checks that no later generation was taken before it
//! treats the object as published (applies it to the map, acknowledges a
//! store-durable FLUSH, deletes the WAL segment or anything the object
//! supersedes). On finding a later generation it is fenced for good: it
//! stops writing to the store, fails every write, FLUSH and FUA, and logs
//! it loudly. It never deletes or overwrites a later generation's objects:
//! its own keys carry its generation, and what it deletes is always older
//! than something it verified.
//!
//! The holder also deletes what fenced generations put after their fence
//! ([`collect_fenced_orphans`]), and decides at open whether the local WAL
//! belongs to the generation it took the volume from (replay) or to an
//! older one that was since taken over (set aside, never replayed).

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::durability::Durability;
use super::generation::{self, Fences, Handover, Taken, generation_of};
use super::layout::id_of;
use super::{Inner, ObjectError, RequestError};
use crate::error::Chain;
use crate::lock::MutexExt;
use crate::volume::{Completer, VolumeError};

/// How often the holder looks for fenced generations' leftovers while idle.
const ORPHAN_SCAN_EVERY: Duration = Duration::from_secs(60);

/// A writer's generation and what hangs on it.
pub(super) struct Fence {
    /// This writer's generation (0: read-only, no generation taken).
    pub(super) generation: u64,
    /// Which objects count.
    pub(super) fences: Fences,
    /// What FLUSH and FUA wait for.
    pub(super) durability: Durability,
    /// The later generation that fenced this writer, once seen.
    fenced_by: OnceLock<u64>,
    /// FLUSH and FUA waiting for the store (durability=store): the log
    /// position each needs uploaded, and who to tell.
    pub(super) store_waiters: Mutex<Vec<(u64, Completer)>>,
    /// Log position below which every record is in the store.
    pub(super) uploaded_to: AtomicU64,
    /// The flock on the WAL directory, held while writable.
    local_lock: Mutex<Option<File>>,
    /// When fenced generations' leftovers were last looked for.
    last_orphan_scan: Mutex<Option<Instant>>,
    /// What taking the generation found (None when read-only).
    pub(super) taken: Option<Taken>,
    /// What the take-over may have lost, if this was one.
    pub(super) loss_report: Option<String>,
    /// Held from the allocation of a new id until the object carrying it
    /// is in the store, so that this writer's objects land in id order:
    /// a successor that lists id `k` of this generation has every lower
    /// one that will ever land (see `generation`).
    order: tokio::sync::Mutex<()>,
    /// The next id of this writer's sequence.
    ids: AtomicU64,
}

impl Fence {
    /// The fence of a writer that took `taken`, holding `local_lock`.
    pub(super) fn new(
        taken: Option<Taken>,
        fences: Fences,
        durability: Durability,
        local_lock: Option<File>,
        uploaded_to: u64,
        loss_report: Option<String>,
        next_id: u64,
    ) -> Fence {
        Fence {
            generation: taken.as_ref().map_or(0, |t| t.generation),
            fences,
            durability,
            fenced_by: OnceLock::new(),
            store_waiters: Mutex::new(Vec::new()),
            uploaded_to: AtomicU64::new(uploaded_to),
            local_lock: Mutex::new(local_lock),
            last_orphan_scan: Mutex::new(None),
            taken,
            loss_report,
            order: tokio::sync::Mutex::new(()),
            ids: AtomicU64::new(next_id),
        }
    }

    /// The generation that fenced this writer, if one did.
    pub(super) fn fenced_by(&self) -> Option<u64> {
        self.fenced_by.get().copied()
    }

    /// The error a write, FLUSH or FUA gets once this writer is fenced.
    pub(super) fn check(&self) -> Result<(), VolumeError> {
        match self.fenced_by() {
            Some(by) => Err(self.error(by)),
            None => Ok(()),
        }
    }

    fn error(&self, by: u64) -> VolumeError {
        VolumeError::backend(RequestError::Fenced {
            generation: self.generation,
            by,
        })
    }

    /// The fenced error for a lifecycle operation, if this writer was fenced.
    pub(super) fn check_admin(&self) -> Result<(), ObjectError> {
        match self.fenced_by() {
            Some(by) => Err(ObjectError::Fenced {
                generation: self.generation,
                by,
            }),
            None => Ok(()),
        }
    }

    /// Waits for the right to allocate an id and put the object carrying
    /// it; hold the guard until the put is done (see `order`).
    pub(super) async fn put_order(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.order.lock().await
    }

    /// The next id of this writer's sequence. Call with the
    /// [`put_order`](Self::put_order) guard held, and put the object
    /// before letting it go.
    pub(super) fn next_id(
        &self,
        _order: &tokio::sync::MutexGuard<'_, ()>,
    ) -> Result<u64, ObjectError> {
        self.check_admin()?;
        let id = self.ids.fetch_add(1, Ordering::AcqRel);
        if self.generation != 0 && generation_of(id) != self.generation {
            return Err(ObjectError::IdsExhausted);
        }
        Ok(id)
    }

    /// Drops the WAL directory's flock (at close, or when fenced).
    pub(super) fn unlock_local(&self) {
        self.local_lock.locked().take();
    }
}

/// Checks, after a put, that no later generation exists: only then may the
/// object be treated as published. Store errors are retried (the put is
/// done; only the answer is missing) until the volume aborts. Returns
/// false when this writer is, or has just been found, fenced.
pub(super) async fn verify(inner: &Inner) -> bool {
    let f = &inner.fence;
    if f.generation == 0 || f.fenced_by().is_some() {
        return false;
    }
    let mut delay = Duration::from_millis(50);
    loop {
        match generation::superseded(&inner.store, &inner.keys, f.generation).await {
            Ok(false) => return true,
            Ok(true) => {
                fenced(inner, f.generation + 1);
                return false;
            }
            Err(e) => {
                warn!(volume = %inner.name, generation = f.generation,
                    "cannot check whether this writer was fenced, will retry: {}", Chain(&e));
                if inner.abort.load(Ordering::Acquire) {
                    return false;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// [`verify`] for lifecycle operations: `Ok` when the objects put so far
/// may be published, the fenced error when another writer took over, and
/// [`ObjectError::Interrupted`] when the volume is aborting.
pub(super) async fn verified(inner: &Inner) -> Result<(), ObjectError> {
    if verify(inner).await {
        return Ok(());
    }
    inner.fence.check_admin()?;
    Err(ObjectError::Interrupted)
}

/// This writer was fenced by generation `by`: from now on it writes
/// nothing to the store and fails writes, FLUSH and FUA.
pub(super) fn fenced(inner: &Inner, by: u64) {
    let f = &inner.fence;
    if f.fenced_by.set(by).is_err() {
        return;
    }
    error!(
        volume = %inner.name,
        generation = f.generation,
        fenced_by = by,
        wal = %inner.wal.dir.display(),
        "FENCED: another writer took this volume over (generation {by}); this vbd stops writing \
         to the store and fails every write, FLUSH and FUA to it from now on. Writes acknowledged \
         here that were not yet uploaded are not part of the volume any more (they stay in the \
         local WAL directory)"
    );
    let waiters = std::mem::take(&mut *f.store_waiters.locked());
    for (_, w) in waiters {
        w.complete(Err(f.error(by)));
    }
    // Writes waiting for room retry, and find the volume fenced.
    inner.release_backlog_waiters();
    inner.upload_wake.notify_one();
}

/// Moves the store frontier to `uploaded_to` and completes the FLUSH and
/// FUA requests it satisfies.
pub(super) fn advance_uploaded(inner: &Inner, uploaded_to: u64) {
    let f = &inner.fence;
    let done: Vec<Completer> = {
        let mut w = f.store_waiters.locked();
        f.uploaded_to.fetch_max(uploaded_to, Ordering::AcqRel);
        let to = f.uploaded_to.load(Ordering::Acquire);
        let (ready, wait): (Vec<_>, Vec<_>) = w.drain(..).partition(|(pos, _)| *pos <= to);
        *w = wait;
        ready.into_iter().map(|(_, c)| c).collect()
    };
    for c in done {
        c.complete(Ok(None));
    }
}

/// Fails the FLUSH and FUA requests still waiting for the store (the
/// volume is closing without having uploaded them).
pub(super) fn fail_store_waiters(inner: &Inner) {
    let waiters = std::mem::take(&mut *inner.fence.store_waiters.locked());
    for (_, w) in waiters {
        w.complete(Err(VolumeError::Shutdown));
    }
}

/// Deletes what fenced generations put after their fence: chunks,
/// checkpoints, flatten marks, resize records and snapshots of an earlier
/// generation that do not count (and deleting marks of snapshots that are
/// gone). This is the only place garbage collection looks at other
/// generations' objects; it never touches this generation's or a later
/// one's. Runs when the uploader is idle (at most every
/// [`ORPHAN_SCAN_EVERY`] unless `now`) and at close; snapshots, whose
/// descriptions must be read to be judged, only at close and when this
/// writer took the volume from one that did not release it. Returns how
/// many objects it deleted.
pub(super) async fn collect_fenced_orphans(inner: &Inner, now: bool) -> usize {
    let f = &inner.fence;
    if f.generation == 0 || f.fenced_by().is_some() {
        return 0;
    }
    {
        let mut last = f.last_orphan_scan.locked();
        if !now && last.is_some_and(|t| t.elapsed() < ORPHAN_SCAN_EVERY) {
            return 0;
        }
        *last = Some(Instant::now());
    }
    let mut orphans = Vec::new();
    for prefix in inner.keys.with_ids() {
        match inner.store.list(&prefix).await {
            Ok(objects) => orphans.extend(objects.into_iter().filter_map(|(key, _)| {
                let id = id_of(&key)?;
                (generation_of(id) < f.generation && !f.fences.counts(id)).then_some(key)
            })),
            Err(e) => {
                warn!(volume = %inner.name, "cannot list fenced generations' leftovers: {}", Chain(&e));
                return 0;
            }
        }
    }
    let took_over = f
        .taken
        .as_ref()
        .is_some_and(|t| matches!(t.handover, Handover::TakeOver | Handover::StaleLocal));
    let snapshots = now || took_over;
    if (orphans.is_empty() && !snapshots) || !verify(inner).await {
        return 0;
    }
    let mut deleted = 0;
    if snapshots {
        let volume = super::snapshot::split(&inner.name).0;
        match super::snapshot::collect_fenced(&inner.store, volume, &f.fences).await {
            Ok(n) => deleted += n,
            Err(e) => {
                warn!(volume = %inner.name, "cannot collect fenced generations' snapshots: {}", Chain(&e))
            }
        }
    }
    for key in &orphans {
        match inner.store.delete(key).await {
            Ok(()) => deleted += 1,
            Err(e) => {
                warn!(volume = %inner.name, key, "cannot delete a fenced generation's leftover: {}", Chain(&e))
            }
        }
    }
    if deleted > 0 {
        info!(
            volume = %inner.name,
            generation = f.generation,
            deleted,
            "deleted objects that fenced generations put after their fence"
        );
    }
    deleted
}

/// Decides at open what the local WAL's records are: the generation this
/// writer took the volume from (replay them: this host held it and went
/// away) or an older one that another writer took over since (set them
/// aside, never replay: the volume moved on without them). Then marks the
/// directory as this generation's. Returns whether the directory was the
/// previous generation's (so nothing it acknowledged is lost).
pub(super) fn adopt_wal(wal_dir: &Path, name: &str, taken: &Taken) -> Result<bool, ObjectError> {
    let local = |source| ObjectError::Local {
        path: wal_dir.to_owned(),
        source,
    };
    let segments: Vec<std::path::PathBuf> = match std::fs::read_dir(wal_dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "wal"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(local(e)),
    };
    let wal_gen = generation::wal_generation(wal_dir);
    let ours = match wal_gen {
        Some(g) => g == taken.previous,
        // From before generations: only a volume without them can own it.
        None => taken.previous == 0,
    };
    if !segments.is_empty() && !ours {
        let aside = wal_dir.join(format!(
            "fenced-generation-{}-{}",
            wal_gen.unwrap_or(0),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        ));
        std::fs::create_dir_all(&aside).map_err(local)?;
        let mut bytes = 0;
        for s in &segments {
            bytes += std::fs::metadata(s).map_or(0, |m| m.len());
            if let Some(file) = s.file_name() {
                std::fs::rename(s, aside.join(file)).map_err(local)?;
            }
        }
        error!(
            volume = name,
            wal_generation = wal_gen.unwrap_or(0),
            generation = taken.generation,
            segments = segments.len(),
            bytes,
            set_aside = %aside.display(),
            "this host's WAL holds records of generation {} that were never uploaded, but the \
             volume was taken over since: they are not part of it and are set aside, not replayed",
            wal_gen.unwrap_or(0)
        );
    }
    std::fs::create_dir_all(wal_dir).map_err(local)?;
    generation::set_wal_generation(wal_dir, taken.generation).map_err(local)?;
    Ok(ours)
}
