//! The write-ahead log on local disk: a thread that writes segment bytes to
//! their files, makes them durable for FLUSH and FUA (one fdatasync serves
//! every waiter that arrived before it: group commit), seals idle segments
//! and hands sealed, durable segments to the uploader. Also the replay of
//! segment files at open.

use crate::lock::{MutexExt, RwLockExt};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tracing::{debug, error, warn};

use super::format::{self, RecordHeader, SEGMENT_HEADER};
use super::segment::{BufPool, Segment};
use super::state::Dirty;
use super::{Inner, RequestError, WalError};
use crate::volume::{Completer, VolumeError};

/// How long a segment with data may stay open without new writes.
const IDLE_SEAL: Duration = Duration::from_secs(1);
/// How long a segment may take appends before it is sealed anyway.
const MAX_AGE: Duration = Duration::from_secs(5);

/// Requests to the WAL thread.
#[derive(Default)]
pub(super) struct WalCtl {
    /// (log position that must be durable, who to tell).
    pub(super) waiters: Vec<(u64, Completer)>,
    pub(super) wake: bool,
    pub(super) stop: bool,
}

/// Shared between writers and the WAL thread.
pub(super) struct Wal {
    pub(super) dir: PathBuf,
    pub(super) ctl: Mutex<WalCtl>,
    pub(super) cv: Condvar,
    /// Log position up to which everything is durable.
    pub(super) synced: std::sync::atomic::AtomicU64,
    /// Buffers for new segments (see `segment::BufPool`).
    pub(super) bufs: Arc<BufPool>,
}

impl Wal {
    pub(super) fn new(dir: PathBuf, synced: u64) -> Wal {
        Wal {
            dir,
            ctl: Mutex::new(WalCtl::default()),
            cv: Condvar::new(),
            synced: std::sync::atomic::AtomicU64::new(synced),
            bufs: Arc::new(BufPool::new()),
        }
    }

    /// Asks for `pos` to become durable; `done` is completed when it is.
    pub(super) fn wait(&self, pos: u64, done: Completer) {
        let mut c = self.ctl.locked();
        c.waiters.push((pos, done));
        c.wake = true;
        drop(c);
        self.cv.notify_one();
    }

    /// Wakes the thread for a round (a seal or a shutdown step).
    pub(super) fn kick(&self) {
        self.ctl.locked().wake = true;
        self.cv.notify_one();
    }

    pub(super) fn segment_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:016x}.wal"))
    }
}

/// Runs the WAL thread until stopped.
pub(super) fn run(inner: Arc<Inner>) {
    let wal = &inner.wal;
    loop {
        let (waiters, stop) = {
            let mut c = wal.ctl.locked();
            while !c.wake && !c.stop {
                let (g, t) = wal
                    .cv
                    .wait_timeout(c, Duration::from_millis(250))
                    .unwrap_or_else(|e| e.into_inner());
                c = g;
                if t.timed_out() {
                    break;
                }
            }
            c.wake = false;
            (std::mem::take(&mut c.waiters), c.stop)
        };
        seal_if_idle(&inner);
        // Sync for waiters, at shutdown, and whenever a sealed segment is
        // not yet durable: the uploader only takes durable segments.
        let sync = !waiters.is_empty() || stop || sealed_unsynced(&inner);
        // One error for every waiter of this round.
        let result = round(&inner, sync).map_err(Arc::new);
        let synced = wal.synced.load(Ordering::Acquire);
        let mut later = Vec::new();
        for (pos, done) in waiters {
            match &result {
                Err(e) => done.complete(Err(VolumeError::backend(RequestError::Wal(e.clone())))),
                Ok(()) if pos <= synced => done.complete(Ok(None)),
                Ok(()) => later.push((pos, done)),
            }
        }
        if !later.is_empty() {
            let mut c = wal.ctl.locked();
            c.waiters.extend(later);
            c.wake = true;
        }
        inner.upload_wake.notify_one();
        if stop {
            return;
        }
    }
}

fn sealed_unsynced(inner: &Inner) -> bool {
    let d = inner.dirty.read_locked();
    d.segments
        .values()
        .any(|s| s.sealed.load(Ordering::Acquire) && s.synced.load(Ordering::Acquire) < s.len())
}

/// Seals the active segment if it has sat idle or open too long, so its
/// data moves on to the store. Looks under the read lock first: this runs
/// on every wake of the WAL thread, and the write lock stalls the reactors.
fn seal_if_idle(inner: &Inner) {
    let due = |d: &Dirty| {
        let idle = d.last_append.elapsed() > IDLE_SEAL;
        let seal = d
            .active
            .as_ref()
            .is_some_and(|a| a.len() > SEGMENT_HEADER && (idle || a.created.elapsed() > MAX_AGE));
        (idle, seal)
    };
    let (idle, seal) = due(&inner.dirty.read_locked());
    if seal {
        let mut d = inner.dirty.write_locked();
        // Appends may have come since the look.
        if due(&d).1
            && let Some(active) = d.active.take()
        {
            active.sealed.store(true, Ordering::Release);
        }
    }
    if idle {
        // Nothing is being written: the spare buffers can go.
        inner.wal.bufs.clear();
    }
}

/// Writes every segment's new bytes to its file; with `sync`, makes them
/// durable and advances the synced position.
fn round(inner: &Inner, sync: bool) -> Result<(), WalError> {
    let (target, segs): (u64, Vec<Arc<Segment>>) = {
        let d = inner.dirty.read_locked();
        (d.appended, d.segments.values().cloned().collect())
    };
    let wal = &inner.wal;
    let mut created = false;
    for s in &segs {
        let len = s.len();
        let written = s.written.load(Ordering::Acquire);
        if written >= len && !(sync && s.synced.load(Ordering::Acquire) < written) {
            continue;
        }
        let mut f = s.file.locked();
        if f.is_none() {
            let path = wal.segment_path(s.id);
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|source| WalError::Create { path, source })?;
            *f = Some(file);
            created = true;
        }
        let Some(file) = f.as_ref() else { continue };
        if written < len {
            let bytes = s.bytes(written, len - written).unwrap_or_default();
            file.write_all_at(bytes, written as u64)
                .map_err(|source| WalError::Write { id: s.id, source })?;
            s.written.store(len, Ordering::Release);
        }
        if sync {
            file.sync_data()
                .map_err(|source| WalError::Sync { id: s.id, source })?;
            s.synced.store(len, Ordering::Release);
        }
    }
    if created && sync {
        // New files must survive a crash too: sync their directory entry.
        File::open(&wal.dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| WalError::SyncDir {
                path: wal.dir.clone(),
                source,
            })?;
    }
    if sync {
        wal.synced.fetch_max(target, Ordering::AcqRel);
    }
    Ok(())
}

/// A segment file read back at open.
pub(super) struct Replayed {
    pub(super) id: u64,
    /// The valid prefix of the file.
    pub(super) bytes: Vec<u8>,
    /// Valid records: header and data offset in `bytes`.
    pub(super) records: Vec<(RecordHeader, usize)>,
}

/// Reads the segment files in `dir`, in order, stopping at the first torn
/// or corrupt record: everything after it was never acknowledged as durable.
pub(super) fn replay(dir: &Path) -> Result<Vec<Replayed>, WalError> {
    let mut files: Vec<(u64, PathBuf)> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let p = e.path();
                let stem = p.file_name()?.to_str()?.strip_suffix(".wal")?.to_owned();
                Some((u64::from_str_radix(&stem, 16).ok()?, p))
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(WalError::ReadDir {
                path: dir.to_owned(),
                source,
            });
        }
    };
    files.sort();
    let mut out = Vec::new();
    let mut torn = false;
    let mut last_seq = 0u64;
    for (id, path) in files {
        if torn {
            warn!(segment = %path.display(), "WAL segment after a torn record ignored");
            out.push(Replayed {
                id,
                bytes: format::segment_header(id).to_vec(),
                records: Vec::new(),
            });
            continue;
        }
        let data = match std::fs::read(&path) {
            Ok(data) => data,
            Err(source) => return Err(WalError::Read { path, source }),
        };
        let seg = match format::decode_segment(&data, id, last_seq) {
            Ok(seg) => seg,
            Err(e) => {
                error!(segment = %path.display(), "WAL segment header is damaged ({e}); its records are ignored");
                torn = true;
                out.push(Replayed {
                    id,
                    bytes: format::segment_header(id).to_vec(),
                    records: Vec::new(),
                });
                continue;
            }
        };
        if let Some(e) = &seg.torn {
            debug!(segment = %path.display(), at = seg.valid, "WAL ends in a torn or stale record: {e}");
            torn = true;
        }
        if let Some((h, _)) = seg.records.last() {
            last_seq = h.seq;
        }
        let mut bytes = data;
        bytes.truncate(seg.valid);
        out.push(Replayed {
            id,
            bytes,
            records: seg.records,
        });
    }
    Ok(out)
}
