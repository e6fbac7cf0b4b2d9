//! The write path: WRITE, TRIM and WRITE_ZEROES append a record to the
//! open WAL segment under the write-ahead layer's lock and complete from
//! memory; FUA and FLUSH wait for the WAL thread's group-committed sync,
//! and a full backlog waits for the uploader.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;

use super::format::{self, BLOCK, Kind, RecordHeader, SEGMENT_HEADER, WAL_RECORD_HEADER};
use super::segment::Segment;
use super::state::{Dirty, DirtyLoc};
use super::{Durability, Inner, ObjectVolume, RequestError, STAGE_BACKLOG, STAGE_DURABLE};
use crate::lock::{MutexExt, RwLockExt};
use crate::volume::{Ctx, Io, IoData, Op, VolumeError};

impl ObjectVolume {
    /// Appends a record (`payload` is a Data record's bytes); returns the
    /// log position that makes it durable, or `None` when the backlog is
    /// full (the caller then waits).
    pub(super) fn append(
        &self,
        kind: Kind,
        lba: u64,
        blocks: u64,
        payload: Option<&IoData>,
    ) -> Result<Option<u64>, VolumeError> {
        // Guest memory is copied into the record under the lock and
        // checksummed from that copy: the guest may change its buffer
        // meanwhile, and a checksum of other bytes would make recovery
        // drop the record. Our own buffer cannot change, so its checksum
        // is computed before taking the lock; the header's (which holds
        // the sequence number) is combined in after.
        let guest = match payload {
            Some(IoData::Guest(_)) => payload,
            _ => None,
        };
        let data: &[u8] = match payload {
            Some(IoData::Owned(b)) => b.as_slice(),
            _ => &[],
        };
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
            let total = WAL_RECORD_HEADER + take;
            let seg = active_segment(&mut d, inner, total);
            let appended = match guest {
                // SAFETY: appends happen only here, under the dirty write
                // lock, and `active_segment` never returns a sealed segment.
                Some(g) if take > 0 => unsafe {
                    seg.append_with(total, |rec| {
                        let (head, body) = rec.split_at_mut(WAL_RECORD_HEADER);
                        g.read_at(0, body);
                        let crc = crc32c::crc32c(body);
                        head.copy_from_slice(&format::record_header(&h, crc, take));
                    })
                },
                _ => {
                    let piece = data.get(..take).unwrap_or_default();
                    // Only trims and zeroing (no data) are ever split.
                    let crc = if take == data.len() {
                        data_crc
                    } else {
                        crc32c::crc32c(piece)
                    };
                    let header = format::record_header(&h, crc, piece.len());
                    // SAFETY: as above.
                    unsafe { seg.append(&[&header, piece]) }
                }
            };
            let Some(at) = appended else {
                return Err(VolumeError::backend(RequestError::RecordTooBig(total)));
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
            inner.dirty_filter.add(lba, u64::from(n));
            d.map.insert(lba, lba + u64::from(n), h.seq, loc, |_| {});
            d.next_seq += 1;
            d.appended = seg.end_pos();
            d.backlog += total as u64;
            lba += u64::from(n);
            left -= u64::from(n);
            data = data.get(take..).unwrap_or_default();
        }
        d.last_append = std::time::Instant::now();
        Ok(Some(d.appended))
    }

    pub(super) fn write_like(
        &self,
        io: &mut Io,
        ctx: &mut Ctx<'_>,
    ) -> Poll<Result<(), VolumeError>> {
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
        // Also here, not only in `check`: a write that waited for room
        // comes back through this path.
        if let Err(e) = self.refuse_if_closed() {
            return Poll::Ready(Err(e));
        }
        let payload = (kind == Kind::Data).then_some(&io.data);
        match self.append(kind, lba, blocks, payload) {
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

    /// FLUSH: completes once everything appended so far is durable.
    pub(super) fn flush(&self, io: &mut Io, ctx: &mut Ctx<'_>) -> Poll<Result<(), VolumeError>> {
        if self.read_only {
            return Poll::Ready(Ok(()));
        }
        let pos = self.inner.dirty.read_locked().appended;
        self.durable(pos, io, ctx)
    }

    /// Completes once log position `pos` is durable: synced to the local
    /// WAL, or in the store under durability=store.
    pub(super) fn durable(
        &self,
        pos: u64,
        io: &mut Io,
        ctx: &mut Ctx<'_>,
    ) -> Poll<Result<(), VolumeError>> {
        if self.inner.fence.durability == Durability::Store {
            return self.store_durable(pos, io, ctx);
        }
        if self.inner.wal.synced.load(Ordering::Acquire) >= pos {
            return Poll::Ready(Ok(()));
        }
        io.stage = STAGE_DURABLE;
        self.inner.wal.wait(pos, ctx.completer());
        Poll::Pending
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
    let seg = Arc::new(Segment::from_pool(
        &inner.wal.bufs,
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
