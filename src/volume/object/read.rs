//! The read path: cache, then the write-ahead layer, then the map; blocks
//! that are in none of them are fetched from their chunks with one ranged
//! GET per run, off the reactor, and cached. Also block status and
//! NBD_CMD_CACHE, which walk the same layers.

use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tracing::warn;

use super::cache::GROUP_BLOCKS;
use super::format::BLOCK;
use super::state::{DirtyLoc, Mapping};
use super::{Inner, ObjectVolume, RequestError, STAGE_FETCH};
use crate::error::Chain;
use crate::lock::RwLockExt;
use crate::runtime::runtime;
use crate::volume::{Ctx, Extent, Io, MAX_EXTENTS, Op, VolumeError};

/// Blocks read ahead of a sequential miss.
const READ_AHEAD: u32 = 256;

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
        let d = inner.dirty.read_locked();
        let m = inner.map.read_locked();
        let mut b = lba0;
        while b < end {
            if let Some(sp) = d.map.get(b) {
                let stop = sp.end.min(end);
                let len = at(stop) - at(b);
                match sp.value {
                    DirtyLoc::Data { seg, off } => {
                        match d
                            .segments
                            .get(&seg)
                            .and_then(|s| s.bytes(off as usize, len))
                        {
                            Some(src) => out.write_at(at(b), src),
                            // Unreachable by construction; zeroes beat garbage.
                            None => out.fill_at(at(b), len, 0),
                        }
                    }
                    DirtyLoc::Zero | DirtyLoc::Hole => out.fill_at(at(b), len, 0),
                }
                b = stop;
                continue;
            }
            let limit = d.map.next_start(b).map_or(end, |n| n.min(end));
            let mut cur = b;
            m.map.for_each_in(b, limit, |sp| {
                if sp.start > cur {
                    out.fill_at(at(cur), at(sp.start) - at(cur), 0);
                }
                match sp.value {
                    Mapping::Zero | Mapping::Hole => {
                        out.fill_at(at(sp.start), at(sp.end) - at(sp.start), 0)
                    }
                    Mapping::Chunk { id, block } => {
                        let first = at(sp.start);
                        let first_block = (sp.start - lba0) as u32;
                        inner.cache.read_run_with(
                            id,
                            block,
                            (sp.end - sp.start) as u32,
                            |i, src| out.write_at(first + i as usize * BLOCK, src),
                            |i| push_missing(missing, first_block + i, id, block + i),
                        );
                    }
                }
                cur = sp.end;
            });
            if cur < limit {
                out.fill_at(at(cur), at(limit) - at(cur), 0);
            }
            b = limit;
        }
    }

    pub(super) fn read(&self, io: &mut Io, ctx: &mut Ctx<'_>) -> Poll<Result<(), VolumeError>> {
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
    pub(super) fn prefetch(&self, io: &mut Io) {
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
            return Err(VolumeError::backend(RequestError::UnknownChunk(r.chunk)));
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
        let key = inner.chunk_key(r.chunk);
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
                    return Err(VolumeError::backend(RequestError::ShortFetch {
                        chunk: r.chunk,
                        got: b.len(),
                        want: n as usize * BLOCK,
                    }));
                }
                Err(source) => {
                    inner.stats.fetch_failures.fetch_add(1, Ordering::Relaxed);
                    attempt += 1;
                    if attempt >= 4 {
                        let e = RequestError::Fetch {
                            chunk: r.chunk,
                            source,
                        };
                        warn!(volume = %inner.name, chunk = r.chunk, "read failed: {}", Chain(&e));
                        return Err(VolumeError::backend(e));
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
