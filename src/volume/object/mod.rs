//! Log-structured volumes in an object store.
//!
//! Writes append to a local write-ahead log (`wal`) and are acknowledged
//! from memory; FLUSH and FUA wait for a group-committed fdatasync. The
//! uploader (`upload`, on a niced runtime of its own: `background`) packs
//! sealed segments into immutable chunk objects whose indexes are the map's
//! deltas, with periodic checkpoints. Reads go cache → write-ahead layer
//! (skipped where `dirty_filter` says it holds nothing) → map → ranged GET. Formats are in `format`,
//! object names in `layout`.
//!
//! The volume's rooms: `write` and `read` (the request paths, `read`
//! filling the cache through `fill`), `lifecycle`
//! (open, drain, close) over `recovery` (map and WAL replay at open),
//! `generation` (who may write: generations taken with conditional writes,
//! and the fences that decide which objects count) and `fence` (a writer's
//! generation at run time: checks after each put, fenced leftovers),
//! `durability` (what FLUSH waits for), the lifecycle of snapshots
//! (`snapshot`), clones (`clone`, `lineage`), what garbage collection may
//! take (`refs`, `gc`), chunks made without the WAL (`ingest`), `resize`,
//! import and export (`transfer`), `options`, `stats` and `error`. This
//! module holds the shared state and turns requests into calls on those
//! paths.

pub mod admin;
mod background;
pub mod cache;
pub mod clone;
mod dirty_filter;
mod durability;
mod error;
mod extent_map;
mod fence;
mod fill;
pub mod format;
#[cfg(feature = "fuzzing")]
pub mod fuzz;
mod gc;
pub mod generation;
#[cfg(test)]
mod handoff_tests;
mod ingest;
pub mod layout;
mod lifecycle;
#[cfg(test)]
mod lifecycle_tests;
pub mod lineage;
mod options;
mod read;
mod recovery;
pub mod refs;
mod resize;
mod segment;
pub mod snapshot;
mod span_fetch;
mod state;
mod stats;
#[cfg(test)]
mod tests;
pub mod transfer;
mod upload;
mod wal;
mod write;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::Poll;

use self::cache::BlockCache;
use self::format::BLOCK;
use self::layout::Keys;
use self::state::{Dirty, Mapped};
use self::wal::Wal;
use crate::lock::{MutexExt, RwLockExt};
use crate::objstore::Store;
use crate::volume::{Caps, Completer, Ctx, Io, Op, UnexpectedWake, Volume, VolumeError, Wake};

pub use self::durability::Durability;
pub use self::error::{ObjectError, RequestError, WalError};
pub use self::lifecycle::CloseOutcome;
pub use self::options::ObjectOptions;
pub use self::stats::{ObjectCounters, ObjectStats};

/// State shared by the volume handle, the WAL thread and the uploader.
pub(crate) struct Inner {
    /// The volume's name, `volume@snapshot` for a snapshot opened read-only.
    name: String,
    /// Bytes, from the descriptor; changed live by resize.
    size: AtomicU64,
    store: Store,
    keys: Keys,
    opts: ObjectOptions,
    /// Records not yet in a chunk: what the write path appends to.
    dirty: RwLock<Dirty>,
    /// Where `dirty` may hold blocks: reads elsewhere skip its lock.
    dirty_filter: dirty_filter::DirtyFilter,
    /// What the chunks say: where the read path looks after `dirty`.
    map: RwLock<Mapped>,
    cache: BlockCache,
    wal: Wal,
    /// Wakes the uploader (a sealed segment, a full backlog, shutdown).
    upload_wake: tokio::sync::Notify,
    /// Writes waiting for the uploader to shrink the backlog.
    backlog_waiters: Mutex<Vec<Completer>>,
    /// Fetches in flight and read-ahead (see `fill`).
    fill: fill::Fill,
    /// Held by the uploader from a chunk's id until the chunk is wholly in
    /// the map (it is applied in batches), and by a checkpoint while it
    /// copies the map: a checkpoint named after chunk `k` must hold every
    /// chunk up to `k`, as recovery reads only the chunks above it.
    publishing: tokio::sync::Mutex<()>,
    /// Shutdown asked for: drain and stop.
    stopping: AtomicBool,
    /// Stop at once (the handle was dropped without shutdown).
    abort: AtomicBool,
    stats: ObjectStats,
    read_only: bool,
    /// Closing: writes, FLUSH and FUA are refused while the WAL drains.
    closing: AtomicBool,
    /// The writer's generation, whether it was fenced, and what FLUSH
    /// waits for.
    fence: fence::Fence,
    /// The volumes layers 1, 2, ... of the map's chunk ids live in (see `lineage`).
    layers: RwLock<Vec<lineage::Layer>>,
    /// Segments above this id wait: a snapshot is freezing the map as of
    /// the segments below it.
    upload_limit: AtomicU64,
    /// One snapshot, resize, flatten or collection at a time.
    admin: Mutex<()>,
    /// Garbage collection by the uploader or on request, one at a time.
    gc: tokio::sync::Mutex<()>,
    /// Told the new size after a live resize.
    resize_hooks: Mutex<Vec<crate::volume::ResizeHook>>,
}

impl Inner {
    /// Whether every acknowledged write is in the store.
    fn all_uploaded(&self) -> bool {
        self.dirty.read_locked().segments.is_empty()
    }

    /// Drops blocks the map no longer points at from the cache.
    fn drop_superseded(&self, superseded: &[state::Superseded]) {
        for s in superseded {
            self.cache.remove_run(s.chunk, s.block, s.blocks);
        }
    }

    /// Lets writes that waited for the backlog try again.
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
    /// Joined at close and drop.
    wal_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Awaited (bounded) at close, aborted at drop.
    uploader: Mutex<Option<tokio::task::JoinHandle<()>>>,
    read_only: bool,
}

// Stages of requests that wait on other threads.
const STAGE_DURABLE: u8 = 1;
const STAGE_BACKLOG: u8 = 2;
const STAGE_FETCH: u8 = 3;

impl ObjectVolume {
    /// Refuses requests outside the volume, not block-aligned, or
    /// changing a read-only volume.
    fn check(&self, io: &Io) -> Result<(), VolumeError> {
        let b = BLOCK as u64;
        if io.op == Op::Flush {
            return if self.read_only {
                Ok(())
            } else {
                self.refuse_if_closed()
            };
        }
        let size = self.inner.size.load(Ordering::Acquire);
        if io.offset > size || io.len > size - io.offset {
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
        let changes = matches!(io.op, Op::Write | Op::Trim | Op::WriteZeroes);
        if self.read_only && changes {
            return Err(VolumeError::ReadOnly);
        }
        if changes {
            self.refuse_if_closed()?;
        }
        Ok(())
    }
}

impl ObjectVolume {
    /// Writes, FLUSH and FUA fail once the volume is closing (its WAL is
    /// draining for a release) or its writer was fenced.
    fn refuse_if_closed(&self) -> Result<(), VolumeError> {
        if self
            .inner
            .closing
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Err(VolumeError::Shutdown);
        }
        self.inner.fence.check()
    }
}

impl Volume for ObjectVolume {
    fn size(&self) -> u64 {
        self.inner.size.load(Ordering::Acquire)
    }

    fn caps(&self) -> Caps {
        Caps::full(self.read_only)
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

    fn as_object(&self) -> Option<&ObjectVolume> {
        Some(self)
    }

    fn watch_size(&self, hook: crate::volume::ResizeHook) -> bool {
        self.inner.resize_hooks.locked().push(hook);
        true
    }

    fn start(&self, io: &mut Io, ctx: &mut Ctx<'_>) -> Poll<Result<(), VolumeError>> {
        if let Err(e) = self.check(io) {
            return Poll::Ready(Err(e));
        }
        match io.op {
            Op::Read => self.read(io, ctx),
            Op::Write | Op::Trim | Op::WriteZeroes => self.write_like(io, ctx),
            Op::Flush => self.flush(io, ctx),
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
            return Poll::Ready(Err(VolumeError::backend(UnexpectedWake {
                backend: "object",
                got: "a ring completion",
            })));
        };
        match (io.stage, result) {
            (_, Err(e)) => Poll::Ready(Err(e)),
            (STAGE_DURABLE, Ok(_)) => Poll::Ready(Ok(())),
            (STAGE_BACKLOG, Ok(_)) => {
                io.stage = 0;
                self.write_like(io, ctx)
            }
            (STAGE_FETCH, Ok(Some(data))) => Poll::Ready(self.scatter(io, &data)),
            // The blocks arrived in the cache (read-ahead fetched them):
            // read them from there, once more.
            (STAGE_FETCH, Ok(None)) => self.read_again(io, ctx),
            _ => Poll::Ready(Err(VolumeError::backend(UnexpectedWake {
                backend: "object",
                got: "a completion that does not fit its stage",
            }))),
        }
    }
}
