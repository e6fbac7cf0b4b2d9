//! Log-structured volumes in an object store.
//!
//! Writes append to a local write-ahead log (`wal`) and are acknowledged
//! from memory; FLUSH and FUA wait for a group-committed fdatasync. The
//! uploader (`upload`) packs sealed segments into immutable chunk objects
//! whose indexes are the map's deltas, with periodic checkpoints. Reads go
//! cache → write-ahead layer → map → ranged GET. Formats are in `format`,
//! object names and the writer lock in `layout`.

pub mod admin;
pub mod cache;
pub mod extent_map;
pub mod format;
#[cfg(feature = "fuzzing")]
pub mod fuzz;
pub mod layout;
mod open;
pub mod segment;
mod state;
mod upload;
mod wal;

use crate::lock::{MutexExt, RwLockExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use thiserror::Error;
use tracing::{info, warn};

use self::cache::{BlockCache, CacheSize, CacheStats, GROUP_BLOCKS};
use self::format::{BLOCK, Kind, RecordHeader, SEGMENT_HEADER, WAL_RECORD_HEADER};
use self::layout::{Keys, WriterLock};
use self::segment::Segment;
use self::state::{Dirty, DirtyLoc, Mapped, Mapping};
use self::wal::Wal;
use crate::objstore::{Store, StoreError};
use crate::runtime::runtime;
use crate::volume::{Caps, Completer, Ctx, Extent, Io, MAX_EXTENTS, Op, Volume, VolumeError, Wake};

/// Why an object volume could not be created, opened or changed.
#[derive(Debug, Error)]
pub enum ObjectError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("volume {0:?} does not exist in this store; create it with `vbd volume create`")]
    NoSuchVolume(String),
    #[error("volume {0:?} already exists")]
    Exists(String),
    #[error("volume name {0:?} is invalid: use 1-256 letters, digits, '-', '_' or '.'")]
    BadName(String),
    #[error("volume size {0} is invalid: it must be a positive multiple of 4096 bytes")]
    BadSize(u64),
    #[error("volume {name:?} is open for writing by {owner}; stop that server first")]
    Locked { name: String, owner: String },
    #[error("corrupt volume data: {0}")]
    Corrupt(String),
    #[error("local WAL: {0}")]
    Local(String),
}

/// How to open an object volume.
#[derive(Clone, Debug)]
pub struct ObjectOptions {
    /// Root of the local WAL directories.
    pub wal_root: PathBuf,
    pub cache: CacheSize,
    /// Open without the writer lock; writes are refused.
    pub read_only: bool,
    /// Bytes of not-yet-uploaded data before writes wait for the uploader.
    pub backlog: u64,
    /// Size of a WAL segment, and so of most chunks.
    pub segment_size: usize,
    /// Uploaded chunks between checkpoints.
    pub checkpoint_every: u64,
    /// Chunks whose live share falls below this are rewritten.
    pub gc_threshold: f64,
    /// How long shutdown waits for the uploader to drain the WAL.
    pub drain_timeout: Duration,
}

impl Default for ObjectOptions {
    fn default() -> Self {
        ObjectOptions {
            wal_root: layout::default_wal_root(),
            cache: CacheSize::Default,
            read_only: false,
            backlog: 512 << 20,
            segment_size: 4 << 20,
            checkpoint_every: 64,
            gc_threshold: 0.5,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// Counters an operator can read.
#[derive(Default)]
pub struct ObjectStats {
    pub chunks_uploaded: AtomicU64,
    pub bytes_uploaded: AtomicU64,
    /// Failed chunk puts; each one is retried.
    pub upload_failures: AtomicU64,
    /// Chunks rewritten by garbage collection.
    pub chunks_collected: AtomicU64,
    pub fetches: AtomicU64,
    pub fetch_failures: AtomicU64,
    /// Garbage-collection passes that found a chunk to rewrite or delete.
    pub gc_runs: AtomicU64,
    /// Garbage-collection passes that failed (and will be retried).
    pub gc_failures: AtomicU64,
    /// Superseded chunks deleted from the store.
    pub chunks_deleted: AtomicU64,
    pub checkpoints: AtomicU64,
}

/// A point-in-time copy of an object volume's counters and backlog.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ObjectCounters {
    pub cache: CacheStats,
    /// Bytes of acknowledged writes in the local WAL, not yet in the store.
    pub backlog_bytes: u64,
    /// WAL records not yet in the store.
    pub backlog_records: u64,
    /// WAL segments not yet in the store (the upload queue).
    pub backlog_segments: u64,
    /// Backlog at which writes wait for the uploader.
    pub backlog_limit: u64,
    pub chunks_uploaded: u64,
    pub bytes_uploaded: u64,
    pub upload_failures: u64,
    pub fetches: u64,
    pub fetch_failures: u64,
    pub gc_runs: u64,
    pub gc_failures: u64,
    pub chunks_rewritten: u64,
    pub chunks_deleted: u64,
    pub checkpoints: u64,
}

/// State shared by the volume handle, the WAL thread and the uploader.
pub(crate) struct Inner {
    name: String,
    size: u64,
    store: Store,
    keys: Keys,
    opts: ObjectOptions,
    dirty: RwLock<Dirty>,
    map: RwLock<Mapped>,
    cache: BlockCache,
    wal: Wal,
    upload_wake: tokio::sync::Notify,
    backlog_waiters: Mutex<Vec<Completer>>,
    next_chunk: AtomicU64,
    /// Block after the last read, for detecting sequential reads.
    last_read_end: AtomicU64,
    /// Shutdown asked for: drain and stop.
    stopping: AtomicBool,
    /// Stop at once (the handle was dropped without shutdown).
    abort: AtomicBool,
    stats: ObjectStats,
    read_only: bool,
    lock: Mutex<Option<WriterLock>>,
}

impl Inner {
    fn all_uploaded(&self) -> bool {
        self.dirty.read_locked().segments.is_empty()
    }

    fn release_backlog_waiters(&self) {
        let waiters = std::mem::take(&mut *self.backlog_waiters.locked());
        for w in waiters {
            w.complete(Ok(None));
        }
    }
}

/// A volume stored as chunks in an object store.
pub struct ObjectVolume {
    inner: Arc<Inner>,
    wal_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    uploader: Mutex<Option<tokio::task::JoinHandle<()>>>,
    read_only: bool,
}

// Stages of requests that wait on other threads.
const STAGE_DURABLE: u8 = 1;
const STAGE_BACKLOG: u8 = 2;
const STAGE_FETCH: u8 = 3;

/// Blocks read ahead of a sequential miss.
const READ_AHEAD: u32 = 256;

impl ObjectVolume {
    /// Opens volume `name` in `store`, recovering from the latest
    /// checkpoint, newer chunks and the local WAL.
    pub fn open(
        store: Store,
        name: &str,
        opts: ObjectOptions,
    ) -> Result<ObjectVolume, ObjectError> {
        runtime().block_on(open::open(store, name, opts))
    }

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
            fetch_failures: get(&s.fetch_failures),
            gc_runs: get(&s.gc_runs),
            gc_failures: get(&s.gc_failures),
            chunks_rewritten: get(&s.chunks_collected),
            chunks_deleted: get(&s.chunks_deleted),
            checkpoints: get(&s.checkpoints),
        }
    }

    /// Bytes of acknowledged writes not yet in the store.
    pub fn backlog(&self) -> u64 {
        self.inner.dirty.read_locked().backlog
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

    fn check(&self, io: &Io) -> Result<(), VolumeError> {
        let b = BLOCK as u64;
        if io.op == Op::Flush {
            return Ok(());
        }
        if io.offset > self.inner.size || io.len > self.inner.size - io.offset {
            return Err(VolumeError::OutOfRange {
                offset: io.offset,
                len: io.len,
            });
        }
        if !io.offset.is_multiple_of(b) || !io.len.is_multiple_of(b) {
            return Err(VolumeError::Unaligned {
                offset: io.offset,
                len: io.len,
                block: BLOCK as u32,
            });
        }
        if self.read_only && matches!(io.op, Op::Write | Op::Trim | Op::WriteZeroes) {
            return Err(VolumeError::ReadOnly);
        }
        Ok(())
    }

    /// Appends a record; returns the log position that makes it durable, or
    /// `None` when the backlog is full (the caller then waits).
    fn append(
        &self,
        kind: Kind,
        lba: u64,
        blocks: u64,
        data: &[u8],
    ) -> Result<Option<u64>, VolumeError> {
        // The data's checksum is computed before taking the lock; the
        // header's (which holds the sequence number) is combined in after.
        let data_crc = crc32c::crc32c(data);
        let inner = &self.inner;
        let mut d = inner.dirty.write_locked();
        if d.backlog >= inner.opts.backlog {
            return Ok(None);
        }
        let mut lba = lba;
        let mut left = blocks;
        let mut data = data;
        // Records carry a u32 block count: huge trims become several.
        while left > 0 {
            let n = left.min(u64::from(u32::MAX)) as u32;
            let take = if kind == Kind::Data {
                n as usize * BLOCK
            } else {
                0
            };
            let h = RecordHeader {
                seq: d.next_seq,
                lba,
                blocks: n,
                kind,
            };
            let piece = &data[..take];
            // Only trims and zeroing (no data) are ever split.
            let crc = if take == data.len() {
                data_crc
            } else {
                crc32c::crc32c(piece)
            };
            let header = format::record_header(&h, crc, piece.len());
            let total = WAL_RECORD_HEADER + take;
            let seg = active_segment(&mut d, inner, total);
            // SAFETY: appends happen only here, under the dirty write lock,
            // and `active_segment` never returns a sealed segment.
            let Some(at) = (unsafe { seg.append(&[&header, piece]) }) else {
                return Err(VolumeError::Backend(
                    "WAL segment too small for a record".into(),
                ));
            };
            if seg.first_seq.load(Ordering::Relaxed) == 0 {
                seg.first_seq.store(h.seq, Ordering::Relaxed);
            }
            seg.last_seq.store(h.seq, Ordering::Release);
            let loc = match kind {
                Kind::Data => DirtyLoc::Data {
                    seg: seg.id,
                    off: (at + WAL_RECORD_HEADER) as u64,
                },
                Kind::Zero => DirtyLoc::Zero,
                Kind::Hole => DirtyLoc::Hole,
            };
            d.map.insert(lba, lba + u64::from(n), h.seq, loc, |_| {});
            d.next_seq += 1;
            d.appended = seg.end_pos();
            d.backlog += total as u64;
            lba += u64::from(n);
            left -= u64::from(n);
            data = &data[take..];
        }
        d.last_append = std::time::Instant::now();
        Ok(Some(d.appended))
    }

    fn write_like(&self, io: &mut Io, ctx: &mut Ctx<'_>) -> Poll<Result<(), VolumeError>> {
        let lba = io.offset / BLOCK as u64;
        let blocks = io.len / BLOCK as u64;
        let kind = match io.op {
            Op::Write => Kind::Data,
            Op::WriteZeroes if io.flags.no_hole => Kind::Zero,
            _ => Kind::Hole,
        };
        if blocks == 0 {
            return Poll::Ready(Ok(()));
        }
        let data: &[u8] = if kind == Kind::Data {
            io.buf.as_slice()
        } else {
            &[]
        };
        match self.append(kind, lba, blocks, data) {
            Err(e) => Poll::Ready(Err(e)),
            Ok(None) => {
                // Too much not yet uploaded: wait for the uploader.
                io.stage = STAGE_BACKLOG;
                self.inner.backlog_waiters.locked().push(ctx.completer());
                self.inner.upload_wake.notify_one();
                Poll::Pending
            }
            Ok(Some(pos)) if io.flags.fua => self.durable(pos, io, ctx),
            Ok(Some(_)) => Poll::Ready(Ok(())),
        }
    }

    /// Completes once log position `pos` is durable.
    fn durable(&self, pos: u64, io: &mut Io, ctx: &mut Ctx<'_>) -> Poll<Result<(), VolumeError>> {
        if self.inner.wal.synced.load(Ordering::Acquire) >= pos {
            return Poll::Ready(Ok(()));
        }
        io.stage = STAGE_DURABLE;
        self.inner.wal.wait(pos, ctx.completer());
        Poll::Pending
    }

    /// Fills what it can of a read from memory; leaves the rest in `io.aux`
    /// as (buffer block << 32 | blocks, chunk, chunk block) triples.
    fn read_local(&self, io: &mut Io) {
        let inner = &self.inner;
        let lba0 = io.offset / BLOCK as u64;
        let end = lba0 + io.len / BLOCK as u64;
        let buf = io.buf.as_mut_slice();
        let missing = &mut io.aux;
        let d = inner.dirty.read_locked();
        let m = inner.map.read_locked();
        let mut b = lba0;
        while b < end {
            if let Some(sp) = d.map.get(b) {
                let stop = sp.end.min(end);
                let out = &mut buf[(b - lba0) as usize * BLOCK..(stop - lba0) as usize * BLOCK];
                match sp.value {
                    DirtyLoc::Data { seg, off } => {
                        match d
                            .segments
                            .get(&seg)
                            .and_then(|s| s.bytes(off as usize, out.len()))
                        {
                            Some(src) => out.copy_from_slice(src),
                            // Unreachable by construction; zeroes beat garbage.
                            None => out.fill(0),
                        }
                    }
                    DirtyLoc::Zero | DirtyLoc::Hole => out.fill(0),
                }
                b = stop;
                continue;
            }
            let limit = d.map.next_start(b).map_or(end, |n| n.min(end));
            let mut cur = b;
            m.map.for_each_in(b, limit, |sp| {
                if sp.start > cur {
                    buf[(cur - lba0) as usize * BLOCK..(sp.start - lba0) as usize * BLOCK].fill(0);
                }
                match sp.value {
                    Mapping::Zero | Mapping::Hole => buf
                        [(sp.start - lba0) as usize * BLOCK..(sp.end - lba0) as usize * BLOCK]
                        .fill(0),
                    Mapping::Chunk { id, block } => {
                        let at = (sp.start - lba0) as usize;
                        let end = (sp.end - lba0) as usize;
                        inner
                            .cache
                            .read_run(id, block, &mut buf[at * BLOCK..end * BLOCK], |i| {
                                push_missing(missing, at as u32 + i, id, block + i)
                            });
                    }
                }
                cur = sp.end;
            });
            if cur < limit {
                buf[(cur - lba0) as usize * BLOCK..(limit - lba0) as usize * BLOCK].fill(0);
            }
            b = limit;
        }
    }

    fn read(&self, io: &mut Io, ctx: &mut Ctx<'_>) -> Poll<Result<(), VolumeError>> {
        io.aux.clear();
        self.read_local(io);
        let lba0 = io.offset / BLOCK as u64;
        let end = lba0 + io.len / BLOCK as u64;
        let sequential = self.inner.last_read_end.swap(end, Ordering::Relaxed) == lba0;
        if io.aux.is_empty() {
            return Poll::Ready(Ok(()));
        }
        io.stage = STAGE_FETCH;
        let runs: Vec<Run> = io.aux.chunks(3).map(Run::decode).collect();
        let ahead = if sequential { READ_AHEAD } else { 0 };
        let inner = self.inner.clone();
        let done = ctx.completer();
        runtime().spawn(async move {
            let r = fetch(&inner, &runs, ahead).await;
            done.complete(r.map(Some));
        });
        Poll::Pending
    }

    fn scatter(&self, io: &mut Io, data: &Bytes) -> Result<(), VolumeError> {
        let mut from = 0usize;
        let buf = io.buf.as_mut_slice();
        for r in io.aux.chunks(3).map(Run::decode) {
            let n = r.blocks as usize * BLOCK;
            let at = r.buf_block as usize * BLOCK;
            let src = data
                .get(from..from + n)
                .ok_or_else(|| VolumeError::Backend("short read from the store".into()))?;
            buf[at..at + n].copy_from_slice(src);
            from += n;
        }
        Ok(())
    }

    fn block_status(&self, io: &mut Io) {
        let lba0 = io.offset / BLOCK as u64;
        let end = lba0 + io.len / BLOCK as u64;
        let d = self.inner.dirty.read_locked();
        let m = self.inner.map.read_locked();
        let ext = &mut io.extents;
        fn push(ext: &mut Vec<Extent>, blocks: u64, hole: bool, zero: bool) {
            let len = blocks * BLOCK as u64;
            match ext.last_mut() {
                Some(l) if l.hole == hole && l.zero == zero => l.len += len,
                _ => ext.push(Extent { len, hole, zero }),
            }
        }
        let mut b = lba0;
        while b < end {
            if let Some(sp) = d.map.get(b) {
                let stop = sp.end.min(end);
                match sp.value {
                    DirtyLoc::Data { .. } => push(ext, stop - b, false, false),
                    DirtyLoc::Zero => push(ext, stop - b, false, true),
                    DirtyLoc::Hole => push(ext, stop - b, true, true),
                }
                b = stop;
            } else {
                let limit = d.map.next_start(b).map_or(end, |n| n.min(end));
                let mut cur = b;
                m.map.for_each_in(b, limit, |sp| {
                    if sp.start > cur {
                        push(ext, sp.start - cur, true, true);
                    }
                    match sp.value {
                        Mapping::Chunk { .. } => push(ext, sp.end - sp.start, false, false),
                        Mapping::Zero => push(ext, sp.end - sp.start, false, true),
                        Mapping::Hole => push(ext, sp.end - sp.start, true, true),
                    }
                    cur = sp.end;
                });
                if cur < limit {
                    push(ext, limit - cur, true, true);
                }
                b = limit;
            }
            if ext.len() >= MAX_EXTENTS {
                break;
            }
        }
    }

    /// Starts fetching blocks into the cache (NBD_CMD_CACHE); does not wait.
    fn prefetch(&self, io: &mut Io) {
        let mut scratch = Io::new();
        scratch.prepare(Op::Read, io.offset, io.len.min(32 << 20), io.flags);
        self.read_local(&mut scratch);
        if scratch.aux.is_empty() {
            return;
        }
        let runs: Vec<Run> = scratch.aux.chunks(3).map(Run::decode).collect();
        let inner = self.inner.clone();
        runtime().spawn(async move {
            let _ = fetch(&inner, &runs, 0).await;
        });
    }

    /// Flushes, drains the WAL to the store (bounded), checkpoints and
    /// releases the writer lock when nothing is left locally.
    fn close(&self) {
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
                    warn!(volume = %inner.name, "cannot release the store lock: {e}");
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

/// The segment to append `need` bytes to, rolling to a new one if needed.
fn active_segment(d: &mut Dirty, inner: &Inner, need: usize) -> Arc<Segment> {
    if let Some(a) = &d.active
        && a.room() >= need
    {
        return a.clone();
    }
    if let Some(a) = d.active.take() {
        a.sealed.store(true, Ordering::Release);
        inner.wal.kick();
    }
    let id = d.next_seg;
    d.next_seg += 1;
    let cap = inner.opts.segment_size.max(need + SEGMENT_HEADER);
    let seg = Arc::new(Segment::new(
        id,
        d.appended,
        cap,
        &format::segment_header(id),
    ));
    d.appended = seg.end_pos();
    d.backlog += SEGMENT_HEADER as u64;
    d.segments.insert(id, seg.clone());
    d.active = Some(seg.clone());
    seg
}

/// A run of blocks missing from memory: where in the buffer, and where in
/// which chunk.
#[derive(Clone, Copy, Debug)]
struct Run {
    buf_block: u32,
    blocks: u32,
    chunk: u64,
    block: u32,
}

impl Run {
    fn decode(v: &[u64]) -> Run {
        Run {
            buf_block: (v[0] >> 32) as u32,
            blocks: v[0] as u32,
            chunk: v[1],
            block: v[2] as u32,
        }
    }
}

/// Adds one missing block, extending the last run when it continues it (so
/// consecutive blocks become one ranged GET).
fn push_missing(aux: &mut Vec<u64>, buf_block: u32, chunk: u64, block: u32) {
    let n = aux.len();
    if n >= 3 {
        let last = Run::decode(&aux[n - 3..]);
        if last.chunk == chunk
            && last.buf_block + last.blocks == buf_block
            && last.block + last.blocks == block
        {
            aux[n - 3] = (u64::from(last.buf_block) << 32) | u64::from(last.blocks + 1);
            return;
        }
    }
    aux.extend_from_slice(&[(u64::from(buf_block) << 32) | 1, chunk, u64::from(block)]);
}

/// Fetches runs from their chunks (one ranged GET each, the last extended by
/// `ahead` blocks of read-ahead), caches every block, and returns the runs'
/// bytes concatenated.
async fn fetch(inner: &Inner, runs: &[Run], ahead: u32) -> Result<Bytes, VolumeError> {
    let mut out = BytesMut::with_capacity(runs.iter().map(|r| r.blocks as usize * BLOCK).sum());
    for (i, r) in runs.iter().enumerate() {
        let info = inner.map.read_locked().chunk_info(r.chunk);
        let Some(info) = info else {
            return Err(VolumeError::Backend(format!(
                "chunk {:016x} is not known",
                r.chunk
            )));
        };
        let extra = if i + 1 == runs.len() {
            ahead.min(info.data_blocks.saturating_sub(r.block + r.blocks))
        } else {
            0
        };
        // Whole cache groups, so entries stay full and neighbours hit.
        let lead = r.block % GROUP_BLOCKS;
        let start = r.block - lead;
        let end = (r.block + r.blocks + extra)
            .next_multiple_of(GROUP_BLOCKS)
            .min(info.data_blocks)
            .max(r.block + r.blocks);
        let n = end - start;
        let from = info.data_start + u64::from(start) * BLOCK as u64;
        let key = inner.keys.chunk(r.chunk);
        let mut attempt = 0;
        let bytes = loop {
            inner.stats.fetches.fetch_add(1, Ordering::Relaxed);
            match inner
                .store
                .get_range(&key, from..from + u64::from(n) * BLOCK as u64)
                .await
            {
                Ok(b) if b.len() == n as usize * BLOCK => break b,
                Ok(b) => {
                    return Err(VolumeError::Backend(format!(
                        "chunk {:016x} returned {} bytes, expected {}",
                        r.chunk,
                        b.len(),
                        n as usize * BLOCK
                    )));
                }
                Err(e) => {
                    inner.stats.fetch_failures.fetch_add(1, Ordering::Relaxed);
                    attempt += 1;
                    if attempt >= 4 {
                        warn!(volume = %inner.name, chunk = r.chunk, "read failed: {e}");
                        return Err(VolumeError::Backend(format!(
                            "reading chunk {:016x}: {e}",
                            r.chunk
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                }
            }
        };
        inner.cache.insert_run(r.chunk, start, &bytes);
        let lead = lead as usize * BLOCK;
        out.extend_from_slice(&bytes[lead..lead + r.blocks as usize * BLOCK]);
    }
    Ok(out.freeze())
}

impl Volume for ObjectVolume {
    fn size(&self) -> u64 {
        self.inner.size
    }

    fn caps(&self) -> Caps {
        Caps {
            flush: true,
            fua: true,
            trim: true,
            write_zeroes: true,
            fast_zero: true,
            cache: true,
            multi_conn: true,
            read_only: self.read_only,
        }
    }

    fn describe(&self) -> String {
        format!(
            "object volume {} in {}",
            self.inner.name,
            self.inner.store.url()
        )
    }

    fn backend(&self) -> &'static str {
        "object"
    }

    fn counters(&self) -> Option<ObjectCounters> {
        Some(ObjectVolume::counters(self))
    }

    fn block_size(&self) -> u32 {
        BLOCK as u32
    }

    fn shutdown(&self) {
        self.close();
    }

    fn start(&self, io: &mut Io, ctx: &mut Ctx<'_>) -> Poll<Result<(), VolumeError>> {
        if let Err(e) = self.check(io) {
            return Poll::Ready(Err(e));
        }
        match io.op {
            Op::Read => self.read(io, ctx),
            Op::Write | Op::Trim | Op::WriteZeroes => self.write_like(io, ctx),
            Op::Flush => {
                if self.read_only {
                    return Poll::Ready(Ok(()));
                }
                let pos = self.inner.dirty.read_locked().appended;
                self.durable(pos, io, ctx)
            }
            Op::BlockStatus => {
                self.block_status(io);
                Poll::Ready(Ok(()))
            }
            Op::Cache => {
                self.prefetch(io);
                Poll::Ready(Ok(()))
            }
        }
    }

    fn resume(&self, io: &mut Io, wake: Wake, ctx: &mut Ctx<'_>) -> Poll<Result<(), VolumeError>> {
        let Wake::Remote(result) = wake else {
            return Poll::Ready(Err(VolumeError::Backend(
                "object volume got a ring completion".into(),
            )));
        };
        match (io.stage, result) {
            (_, Err(e)) => Poll::Ready(Err(e)),
            (STAGE_DURABLE, Ok(_)) => Poll::Ready(Ok(())),
            (STAGE_BACKLOG, Ok(_)) => {
                io.stage = 0;
                self.write_like(io, ctx)
            }
            (STAGE_FETCH, Ok(Some(data))) => Poll::Ready(self.scatter(io, &data)),
            _ => Poll::Ready(Err(VolumeError::Backend("unexpected completion".into()))),
        }
    }
}
