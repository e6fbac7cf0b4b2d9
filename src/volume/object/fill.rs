//! Filling the cache from the store. A read's missing blocks are fetched
//! exactly (a random 4 KiB miss is one 4 KiB ranged GET); a sequential
//! reader gets read-ahead, a window that doubles up to `AHEAD_MAX_BYTES`
//! ahead of it, planned in volume blocks (so it crosses chunk boundaries)
//! and fetched as parallel GETs of up to `AHEAD_PIECE_BLOCKS`. A table of
//! fetches in flight lets a read whose blocks are already on their way
//! wait for them instead of fetching them twice; claims are taken on the
//! reactor, before anything is spawned, so the next request already sees
//! them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::{join_all, try_join_all};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::format::BLOCK;
use super::read::{Source, push_missing, resolve};
use super::state::Mapping;
use super::{Inner, RequestError};
use crate::error::Chain;
use crate::lock::{MutexExt, RwLockExt};
use crate::runtime::runtime;
use crate::volume::VolumeError;

/// The largest read-ahead window; also at most a quarter of the cache,
/// so read-ahead does not evict what it fetched before it is read.
const AHEAD_MAX_BYTES: u64 = 32 << 20;
/// The first window of a new sequential stream.
const AHEAD_START_BYTES: u64 = 2 << 20;
/// Read-ahead GETs are at most this many blocks (4 MiB, about a chunk's
/// data), so a window is fetched by several connections at once, while
/// each GET's fixed cost (HTTP, signing, the endpoint's file opens) is
/// spread over enough bytes.
const AHEAD_PIECE_BLOCKS: u32 = 1024;
/// Attempts per ranged GET before the read fails.
const ATTEMPTS: u32 = 4;

/// A run of blocks missing from memory: where in the request's buffer, and
/// where in which chunk.
#[derive(Clone, Copy, Debug)]
pub(super) struct Run {
    pub(super) buf_block: u32,
    pub(super) blocks: u32,
    pub(super) chunk: u64,
    pub(super) block: u32,
}

impl Run {
    /// A run from the (buffer block << 32 | blocks, chunk, chunk block)
    /// triple `push_missing` keeps in a request's `aux`.
    pub(super) fn decode(v: &[u64]) -> Run {
        Run {
            buf_block: (v[0] >> 32) as u32,
            blocks: v[0] as u32,
            chunk: v[1],
            block: v[2] as u32,
        }
    }
}

/// A fetch in flight: blocks up to `end` of its chunk, from the block in
/// its key; `done` closes when they are in the cache (or failed).
struct InFlight {
    end: u32,
    done: watch::Receiver<()>,
}

/// Where a sequential reader is, and how far ahead of it blocks are
/// fetched or cached.
struct Stream {
    ahead_to: u64,
    window: u64,
}

/// A volume's fetches in flight and its read-ahead state.
pub(super) struct Fill {
    inflight: Mutex<BTreeMap<(u64, u32), InFlight>>,
    stream: Mutex<Stream>,
    /// Block after the last read, for telling sequential reads apart.
    last_read_end: AtomicU64,
    /// Read-ahead window bounds, in blocks (0: no read-ahead).
    start_blocks: u64,
    max_blocks: u64,
}

impl Fill {
    /// Read-ahead sized for a cache of `budget` bytes.
    pub(super) fn new(budget: u64) -> Fill {
        let max = AHEAD_MAX_BYTES.min(budget / 4) / BLOCK as u64;
        // A cache too small for a 1 MiB window gets no read-ahead.
        let max = if max < (1 << 20) / BLOCK as u64 {
            0
        } else {
            max
        };
        let start = (AHEAD_START_BYTES / BLOCK as u64).min(max);
        Fill {
            inflight: Mutex::new(BTreeMap::new()),
            stream: Mutex::new(Stream {
                ahead_to: 0,
                window: start,
            }),
            last_read_end: AtomicU64::new(u64::MAX),
            start_blocks: start,
            max_blocks: max,
        }
    }

    /// Notes a read of blocks [lba, end) of a volume of `size` blocks;
    /// returns the blocks to read ahead, if it continues a sequential
    /// stream (or starts one at block 0) whose window is half used up.
    pub(super) fn on_read(&self, lba: u64, end: u64, size: u64) -> Option<(u64, u64)> {
        let prev = self.last_read_end.swap(end, Ordering::Relaxed);
        if self.max_blocks == 0 || (prev != lba && lba != 0) {
            return None;
        }
        let mut s = self.stream.locked();
        // A reader that left what was read ahead for it starts over.
        if s.ahead_to < lba || s.ahead_to > end + self.max_blocks {
            s.ahead_to = end;
            s.window = self.start_blocks;
        }
        if s.ahead_to >= end + s.window / 2 {
            return None;
        }
        s.window = (s.window * 2).clamp(self.start_blocks, self.max_blocks);
        let from = s.ahead_to.max(end);
        let to = (end + s.window).min(size);
        if from >= to {
            return None;
        }
        s.ahead_to = to;
        Some((from, to))
    }
}

/// The right to fetch blocks others may wait for: dropping it (once they
/// are in the cache, or the fetch failed) removes the table entry and wakes
/// the waiters, who then read the cache or fetch for themselves.
pub(super) struct Claim {
    inner: Arc<Inner>,
    key: (u64, u32),
    _done: watch::Sender<()>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.inner.fill.inflight.locked().remove(&self.key);
    }
}

impl Fill {
    /// Fetches in flight now.
    #[cfg(test)]
    pub(super) fn in_flight(&self) -> usize {
        self.inflight.locked().len()
    }
}

/// How a piece's blocks arrive.
pub(super) enum How {
    /// Fetched here (claimed, when the cache can share them).
    Own(Option<Claim>),
    /// Already on their way (or just arrived: a closed channel): wait,
    /// then read the cache.
    Wait(watch::Receiver<()>),
}

/// Blocks [block, block + blocks) of a chunk, and how they arrive.
pub(super) struct Piece {
    pub(super) chunk: u64,
    pub(super) block: u32,
    pub(super) blocks: u32,
    pub(super) how: How,
}

/// Splits `runs` into pieces: parts already in flight (waited for when
/// `wait`, left out otherwise) and parts claimed here, at most
/// `piece_blocks` each. Pieces come in the runs' order.
pub(super) fn claim(inner: &Arc<Inner>, runs: &[Run], piece_blocks: u32, wait: bool) -> Vec<Piece> {
    let mut table = inner.fill.inflight.locked();
    let mut out = Vec::new();
    for r in runs {
        let (chunk, end) = (r.chunk, r.block + r.blocks);
        let mut b = r.block;
        // Fetches in flight never overlap each other, so in key order
        // they are in block order.
        let busy: Vec<(u32, u32, watch::Receiver<()>)> = table
            .range((chunk, 0)..(chunk, end))
            .filter(|(_, f)| f.end > b)
            .map(|(&(_, s), f)| (s, f.end, f.done.clone()))
            .collect();
        for (s, e, done) in busy {
            if s > b {
                claim_own(
                    inner,
                    &mut table,
                    &mut out,
                    chunk,
                    b..s,
                    (piece_blocks, wait),
                );
            }
            let (ws, we) = (s.max(b), e.min(end));
            if wait {
                out.push(Piece {
                    chunk,
                    block: ws,
                    blocks: we - ws,
                    how: How::Wait(done),
                });
            }
            b = we;
        }
        if b < end {
            claim_own(
                inner,
                &mut table,
                &mut out,
                chunk,
                b..end,
                (piece_blocks, wait),
            );
        }
    }
    out
}

/// Pieces for blocks `range` of `chunk`, which no fetch in flight holds:
/// blocks the cache got meanwhile (a fetch that ended between the caller's
/// look at the cache and now) are read from it when `wait`, left out
/// otherwise; the rest are fetched here, in pieces of at most
/// `piece_blocks`, registered in `table` when the cache can hand them on.
fn claim_own(
    inner: &Arc<Inner>,
    table: &mut BTreeMap<(u64, u32), InFlight>,
    out: &mut Vec<Piece>,
    chunk: u64,
    range: std::ops::Range<u32>,
    (piece_blocks, wait): (u32, bool),
) {
    let mut missing = Vec::new();
    inner
        .cache
        .probe_run(chunk, range.start, range.end - range.start, |i| {
            push_missing(&mut missing, i, chunk, range.start + i)
        });
    let mut b = range.start;
    for r in missing.chunks(3).map(Run::decode) {
        if wait && r.block > b {
            out.push(Piece {
                chunk,
                block: b,
                blocks: r.block - b,
                how: How::Wait(watch::channel(()).1),
            });
        }
        let end = r.block + r.blocks;
        b = r.block;
        while b < end {
            let n = (end - b).min(piece_blocks);
            let claim = inner.cache.enabled().then(|| {
                let (tx, rx) = watch::channel(());
                table.insert(
                    (chunk, b),
                    InFlight {
                        end: b + n,
                        done: rx,
                    },
                );
                Claim {
                    inner: inner.clone(),
                    key: (chunk, b),
                    _done: tx,
                }
            });
            out.push(Piece {
                chunk,
                block: b,
                blocks: n,
                how: How::Own(claim),
            });
            b += n;
        }
    }
    if wait && b < range.end {
        out.push(Piece {
            chunk,
            block: b,
            blocks: range.end - b,
            how: How::Wait(watch::channel(()).1),
        });
    }
}

/// Fetches a request's pieces (in parallel) and returns their bytes
/// concatenated in order; or, with `from_cache` and only pieces already on
/// their way, waits for those and returns `None`: the blocks are in the
/// cache, for the reactor to copy straight into the request.
pub(super) async fn fetch(
    inner: Arc<Inner>,
    pieces: Vec<Piece>,
    from_cache: bool,
) -> Result<Option<Bytes>, VolumeError> {
    if from_cache && pieces.iter().all(|p| matches!(p.how, How::Wait(_))) {
        for p in pieces {
            if let How::Wait(mut done) = p.how {
                // Closed when the fetch ends; no value is ever sent.
                let _ = done.changed().await;
            }
        }
        return Ok(None);
    }
    if pieces.len() == 1 {
        let Some(p) = pieces.into_iter().next() else {
            return Ok(Some(Bytes::new()));
        };
        return one(&inner, p).await.map(Some);
    }
    let parts = try_join_all(pieces.into_iter().map(|p| one(&inner, p))).await?;
    let mut out = BytesMut::with_capacity(parts.iter().map(Bytes::len).sum());
    for p in parts {
        out.extend_from_slice(&p);
    }
    Ok(Some(out.freeze()))
}

/// Reads blocks [from, to) of the volume ahead into the cache: plans the
/// chunk runs the write-ahead layer and the cache lack, claims those not
/// in flight, and fetches them in the background. Returns at once.
pub(super) fn read_ahead(inner: &Arc<Inner>, from: u64, to: u64) {
    let runs = plan(inner, from, to);
    if runs.is_empty() {
        return;
    }
    let pieces = claim(inner, &runs, AHEAD_PIECE_BLOCKS, false);
    if pieces.is_empty() {
        return;
    }
    let inner = inner.clone();
    runtime().spawn(async move {
        for r in join_all(pieces.into_iter().map(|p| one(&inner, p))).await {
            if let Err(e) = r {
                debug!(volume = %inner.name, "read-ahead failed: {}", Chain(&e));
            }
        }
    });
}

/// The chunk runs behind volume blocks [from, to) that neither the
/// write-ahead layer nor the cache holds.
fn plan(inner: &Inner, from: u64, to: u64) -> Vec<Run> {
    let mut aux = Vec::new();
    {
        let (d, m) = inner.layers(from, to);
        resolve(d.as_deref(), &m, from, to, |s, e, src| {
            if let Source::Mapped(Mapping::Chunk { id, block }) = src {
                inner.cache.probe_run(id, block, (e - s) as u32, |i| {
                    push_missing(&mut aux, (s - from) as u32 + i, id, block + i)
                });
            }
        });
    }
    aux.chunks(3).map(Run::decode).collect()
}

/// One piece's bytes: fetched and cached, or waited for and read from the
/// cache (fetching whatever the cache lost meanwhile).
async fn one(inner: &Inner, p: Piece) -> Result<Bytes, VolumeError> {
    match p.how {
        How::Own(claim) => {
            let bytes = get(inner, p.chunk, p.block, p.blocks).await?;
            inner.cache.insert_run(p.chunk, p.block, &bytes);
            drop(claim);
            Ok(bytes)
        }
        How::Wait(mut done) => {
            // Closed when the fetch ends; no value is ever sent.
            let _ = done.changed().await;
            let mut out = BytesMut::zeroed(p.blocks as usize * BLOCK);
            let mut missing = Vec::new();
            inner.cache.read_run(p.chunk, p.block, &mut out, |i| {
                push_missing(&mut missing, i, p.chunk, p.block + i)
            });
            for r in missing.chunks(3).map(Run::decode) {
                let bytes = get(inner, r.chunk, r.block, r.blocks).await?;
                inner.cache.insert_run(r.chunk, r.block, &bytes);
                let at = r.buf_block as usize * BLOCK;
                out[at..at + bytes.len()].copy_from_slice(&bytes);
            }
            Ok(out.freeze())
        }
    }
}

/// One ranged GET of blocks [block, block + blocks) of chunk `chunk`,
/// retried a few times; exactly those bytes or an error.
async fn get(inner: &Inner, chunk: u64, block: u32, blocks: u32) -> Result<Bytes, VolumeError> {
    let info = inner.map.read_locked().chunk_info(chunk);
    let Some(info) = info else {
        return Err(VolumeError::backend(RequestError::UnknownChunk(chunk)));
    };
    let want = blocks as usize * BLOCK;
    let from = info.data_start + u64::from(block) * BLOCK as u64;
    let key = inner.chunk_key(chunk);
    let mut attempt = 0;
    loop {
        inner.stats.fetches.fetch_add(1, Ordering::Relaxed);
        match inner.store.get_range(&key, from..from + want as u64).await {
            Ok(b) if b.len() == want => {
                inner
                    .stats
                    .fetch_bytes
                    .fetch_add(want as u64, Ordering::Relaxed);
                return Ok(b);
            }
            Ok(b) => {
                return Err(VolumeError::backend(RequestError::ShortFetch {
                    chunk,
                    got: b.len(),
                    want,
                }));
            }
            Err(source) => {
                inner.stats.fetch_failures.fetch_add(1, Ordering::Relaxed);
                attempt += 1;
                if attempt >= ATTEMPTS {
                    let e = RequestError::Fetch { chunk, source };
                    warn!(volume = %inner.name, chunk, "read failed: {}", Chain(&e));
                    return Err(VolumeError::backend(e));
                }
                tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Fill with room for read-ahead: windows of 512 to 8192 blocks.
    fn fill() -> Fill {
        Fill::new(1 << 30)
    }

    #[test]
    fn sequential_reads_read_ahead_with_a_growing_window() {
        let f = fill();
        let size = 1 << 20;
        // A stream starts at block 0: read ahead right away.
        assert_eq!(f.on_read(0, 256, size), Some((256, 256 + 1024)));
        // Still more than half a window ahead: nothing new.
        assert_eq!(f.on_read(256, 512, size), None);
        assert_eq!(f.on_read(512, 768, size), None);
        // Half used up: the window doubles and continues where it ended.
        assert_eq!(f.on_read(768, 1024, size), Some((1280, 1024 + 2048)));
        // It never grows past the maximum.
        let mut end = 1024;
        let mut last = None;
        for _ in 0..200 {
            if let Some(r) = f.on_read(end, end + 256, size) {
                assert_eq!(
                    r.0,
                    last.map_or(r.0, |l: (u64, u64)| l.1),
                    "windows are contiguous"
                );
                assert!(r.1 - (end + 256) <= 8192);
                last = Some(r);
            }
            end += 256;
        }
        assert!(last.is_some());
        // Never past the volume's end.
        assert_eq!(f.on_read(end, size, size), None);
    }

    #[test]
    fn random_reads_do_not_read_ahead() {
        let f = fill();
        assert_eq!(f.on_read(5000, 5001, 1 << 20), None);
        assert_eq!(f.on_read(9, 10, 1 << 20), None);
        assert_eq!(f.on_read(70_000, 70_001, 1 << 20), None);
        // A stream that starts elsewhere starts with the smallest window.
        assert_eq!(
            f.on_read(70_001, 70_002, 1 << 20),
            Some((70_002, 70_002 + 1024))
        );
        // A small cache gets no read-ahead at all.
        let small = Fill::new(2 << 20);
        assert_eq!(small.on_read(0, 256, 1 << 20), None);
    }
}
