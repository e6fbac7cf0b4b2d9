//! The read path: cache, then the write-ahead layer, then the map; blocks
//! that are in none of them are fetched from their chunks off the reactor
//! (`fill`: exact ranged GETs, read-ahead, fetches in flight shared) and
//! cached. Also block status and NBD_CMD_CACHE, which walk the same layers.

use std::sync::RwLockReadGuard;
use std::sync::atomic::Ordering;
use std::task::Poll;

use bytes::Bytes;

use super::fill::{self, Run};
use super::format::BLOCK;
use super::state::{Dirty, DirtyLoc, Mapped, Mapping};
use super::{Inner, ObjectVolume, RequestError, STAGE_FETCH};
use crate::lock::RwLockExt;
use crate::runtime::runtime;
use crate::volume::{Ctx, Extent, Io, MAX_EXTENTS, VolumeError};

impl Inner {
    /// The layers a read of blocks [lba0, end) looks in, locked for
    /// reading in the order every reader takes them: the write-ahead layer
    /// only if records waiting for upload may touch the range.
    pub(super) fn layers(
        &self,
        lba0: u64,
        end: u64,
    ) -> (
        Option<RwLockReadGuard<'_, Dirty>>,
        RwLockReadGuard<'_, Mapped>,
    ) {
        let d = (!self.dirty_filter.clean(lba0, end)).then(|| self.dirty.read_locked());
        (d, self.map.read_locked())
    }
}

/// Which layer answers for a range of blocks.
pub(super) enum Source {
    /// The write-ahead layer (records not yet in a chunk).
    Dirty(DirtyLoc),
    /// The map the chunks define.
    Mapped(Mapping),
    /// Neither: never written.
    Nowhere,
}

/// Calls `f(start, end, source)` for consecutive ranges covering blocks
/// [lba0, end), in order: the write-ahead layer (if given) wins over the
/// map.
pub(super) fn resolve(
    d: Option<&Dirty>,
    m: &Mapped,
    lba0: u64,
    end: u64,
    mut f: impl FnMut(u64, u64, Source),
) {
    let mut b = lba0;
    while b < end {
        if let Some(sp) = d.and_then(|d| d.map.get(b)) {
            let stop = sp.end.min(end);
            f(b, stop, Source::Dirty(sp.value));
            b = stop;
            continue;
        }
        let limit = d
            .and_then(|d| d.map.next_piece_from(b))
            .map_or(end, |n| n.min(end));
        let mut cur = b;
        m.map.for_each_in(b, limit, |sp| {
            if sp.start > cur {
                f(cur, sp.start, Source::Nowhere);
            }
            f(sp.start, sp.end, Source::Mapped(sp.value));
            cur = sp.end;
        });
        if cur < limit {
            f(cur, limit, Source::Nowhere);
        }
        b = limit;
    }
}

impl ObjectVolume {
    /// Fills what it can of a read from memory; leaves the rest in `io.aux`
    /// as (buffer block << 32 | blocks, chunk, chunk block) triples.
    pub(super) fn read_local(&self, io: &mut Io) {
        let inner = &self.inner;
        let lba0 = io.offset / BLOCK as u64;
        let end = lba0 + io.len / BLOCK as u64;
        // Byte offset of block `b` in the request's data.
        let at = |b: u64| (b - lba0) as usize * BLOCK;
        let out = &mut io.data;
        let missing = &mut io.aux;
        let (d, m) = inner.layers(lba0, end);
        let d = d.as_deref();
        resolve(d, &m, lba0, end, |s, e, src| {
            let len = at(e) - at(s);
            match src {
                Source::Dirty(DirtyLoc::Data { seg, off }) => {
                    match d
                        .and_then(|d| d.segments.get(&seg))
                        .and_then(|sg| sg.bytes(off as usize, len))
                    {
                        Some(src) => out.write_at(at(s), src),
                        // Unreachable by construction; zeroes beat garbage.
                        None => out.fill_at(at(s), len, 0),
                    }
                }
                Source::Mapped(Mapping::Chunk { id, block }) => {
                    let first = at(s);
                    let first_block = (s - lba0) as u32;
                    inner.cache.read_run_with(
                        id,
                        block,
                        (e - s) as u32,
                        |i, src| out.write_at(first + i as usize * BLOCK, src),
                        |i| push_missing(missing, first_block + i, id, block + i),
                    );
                }
                Source::Dirty(DirtyLoc::Zero | DirtyLoc::Hole)
                | Source::Mapped(Mapping::Zero | Mapping::Hole)
                | Source::Nowhere => out.fill_at(at(s), len, 0),
            }
        });
    }

    pub(super) fn read(&self, io: &mut Io, ctx: &mut Ctx<'_>) -> Poll<Result<(), VolumeError>> {
        self.read_with(io, ctx, true)
    }

    /// A read whose blocks were all on their way when it started: they
    /// are in the cache now, or, if it lost some, fetched with the data
    /// handed back this time (so this happens at most once per request).
    pub(super) fn read_again(
        &self,
        io: &mut Io,
        ctx: &mut Ctx<'_>,
    ) -> Poll<Result<(), VolumeError>> {
        self.read_with(io, ctx, false)
    }

    /// Reads from memory, then fetches what is missing. With `from_cache`,
    /// a read that only waits for fetches already in flight is told when
    /// they land and reads the cache itself (no copy of the data off the
    /// reactor); otherwise the fetched bytes come back for `scatter`.
    fn read_with(
        &self,
        io: &mut Io,
        ctx: &mut Ctx<'_>,
        from_cache: bool,
    ) -> Poll<Result<(), VolumeError>> {
        io.aux.clear();
        self.read_local(io);
        let inner = &self.inner;
        let lba0 = io.offset / BLOCK as u64;
        let end = lba0 + io.len / BLOCK as u64;
        // Claimed before read-ahead plans, so read-ahead leaves them be.
        let pieces = (!io.aux.is_empty()).then(|| {
            let runs: Vec<Run> = io.aux.chunks(3).map(Run::decode).collect();
            fill::claim(inner, &runs, u32::MAX, true)
        });
        if let Some(pieces) = pieces {
            io.stage = STAGE_FETCH;
            let done = ctx.completer();
            let task = fill::fetch(inner.clone(), pieces, from_cache);
            runtime().spawn(async move { done.complete(task.await) });
        }
        if from_cache {
            let size = inner.size.load(Ordering::Acquire) / BLOCK as u64;
            if let Some((from, to)) = inner.fill.on_read(lba0, end, size) {
                fill::read_ahead(inner, from, to);
            }
        }
        if io.aux.is_empty() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    pub(super) fn scatter(&self, io: &mut Io, data: &Bytes) -> Result<(), VolumeError> {
        let mut from = 0usize;
        for r in io.aux.chunks(3).map(Run::decode) {
            let n = r.blocks as usize * BLOCK;
            let at = r.buf_block as usize * BLOCK;
            let src = data.get(from..from + n).ok_or_else(|| {
                VolumeError::backend(RequestError::ShortFetch {
                    chunk: r.chunk,
                    got: data.len(),
                    want: from + n,
                })
            })?;
            io.data.write_at(at, src);
            from += n;
        }
        Ok(())
    }

    pub(super) fn block_status(&self, io: &mut Io) {
        let lba0 = io.offset / BLOCK as u64;
        let end = lba0 + io.len / BLOCK as u64;
        let (d, m) = self.inner.layers(lba0, end);
        let ext = &mut io.extents;
        resolve(d.as_deref(), &m, lba0, end, |s, e, src| {
            // Past the limit, what was found is a prefix; clients ask again.
            if ext.len() >= MAX_EXTENTS {
                return;
            }
            let (hole, zero) = match src {
                Source::Dirty(DirtyLoc::Data { .. }) | Source::Mapped(Mapping::Chunk { .. }) => {
                    (false, false)
                }
                Source::Dirty(DirtyLoc::Zero) | Source::Mapped(Mapping::Zero) => (false, true),
                Source::Dirty(DirtyLoc::Hole) | Source::Mapped(Mapping::Hole) | Source::Nowhere => {
                    (true, true)
                }
            };
            let len = (e - s) * BLOCK as u64;
            match ext.last_mut() {
                Some(l) if l.hole == hole && l.zero == zero => l.len += len,
                _ => ext.push(Extent { len, hole, zero }),
            }
        });
    }

    /// Starts fetching blocks into the cache (NBD_CMD_CACHE); does not wait.
    pub(super) fn prefetch(&self, io: &mut Io) {
        let lba0 = io.offset / BLOCK as u64;
        let end = lba0 + io.len.min(32 << 20) / BLOCK as u64;
        fill::read_ahead(&self.inner, lba0, end);
    }
}

/// Adds one missing block, extending the last run when it continues it (so
/// consecutive blocks become one ranged GET).
pub(super) fn push_missing(aux: &mut Vec<u64>, buf_block: u32, chunk: u64, block: u32) {
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
