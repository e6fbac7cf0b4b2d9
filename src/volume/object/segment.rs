//! A WAL segment in memory: an append-only buffer of fixed capacity whose
//! bytes below `len` never change again. Writers append under the volume's
//! write lock; readers, the WAL thread and the uploader read published
//! bytes without it, which keeps slow disk and network I/O off that lock.
//! Buffers of uploaded segments go back to a small pool (`BufPool`).

use std::cell::UnsafeCell;
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::format::{RecordHeader, SEGMENT_HEADER, WAL_RECORD_HEADER, decode_record_header};
use crate::lock::MutexExt;

/// A segment's bytes.
type Buf = Box<[UnsafeCell<u8>]>;

/// Buffers of dropped segments, kept for the next ones. A fresh buffer
/// costs the reactor that appends to it a page fault and a zeroed page
/// for every 4 KiB it touches, under the write-ahead layer's lock; a
/// recycled one is mapped already. Its old bytes are never read: only
/// bytes below a segment's published length are.
pub(super) struct BufPool {
    free: Mutex<Vec<Buf>>,
}

/// Buffers a pool keeps: one for the segment after the active one, one
/// for the one after that while the uploader catches up.
const POOL_KEEP: usize = 2;

impl BufPool {
    pub(super) fn new() -> BufPool {
        BufPool {
            free: Mutex::new(Vec::new()),
        }
    }

    /// A buffer of `len` bytes, recycled if one fits.
    fn take(&self, len: usize) -> Buf {
        let mut free = self.free.locked();
        match free.iter().position(|b| b.len() == len) {
            Some(i) => free.swap_remove(i),
            None => {
                drop(free);
                zeroed(len)
            }
        }
    }

    fn give(&self, buf: Buf) {
        let mut free = self.free.locked();
        if free.len() < POOL_KEEP {
            free.push(buf);
        }
    }

    /// Lets the kept buffers go (the volume is idle).
    pub(super) fn clear(&self) {
        self.free.locked().clear();
    }

    #[cfg(test)]
    fn kept(&self) -> usize {
        self.free.locked().len()
    }
}

/// One segment: the exact image of its `<id>.wal` file.
pub(super) struct Segment {
    pub(super) id: u64,
    buf: Buf,
    /// Where the buffer goes when the segment is dropped.
    pool: Option<Arc<BufPool>>,
    len: AtomicUsize,
    /// Log position (across all segments) of byte 0 of this segment.
    pub(super) base: u64,
    /// Sequence range of the records appended so far.
    pub(super) first_seq: AtomicU64,
    pub(super) last_seq: AtomicU64,
    /// No more appends: full, idle, or replayed from disk.
    pub(super) sealed: AtomicBool,
    /// Bytes written to the file / made durable by the WAL thread.
    pub(super) written: AtomicUsize,
    pub(super) synced: AtomicUsize,
    /// The segment's file, opened by the WAL thread.
    pub(super) file: Mutex<Option<File>>,
    pub(super) created: std::time::Instant,
}

// SAFETY: bytes below `len` are immutable once published with Release;
// bytes at and above `len` are written only by the single appender, which
// the owner serialises (the volume's write lock), and read by nobody.
unsafe impl Sync for Segment {}

impl Segment {
    /// A segment able to hold `capacity` bytes, starting with `header`.
    pub(super) fn new(id: u64, base: u64, capacity: usize, header: &[u8]) -> Segment {
        Segment::with_buf(id, base, zeroed(capacity.max(header.len())), header, None)
    }

    /// Like [`Segment::new`], with a buffer from `pool`, returned to it
    /// when the segment is dropped.
    pub(super) fn from_pool(
        pool: &Arc<BufPool>,
        id: u64,
        base: u64,
        capacity: usize,
        header: &[u8],
    ) -> Segment {
        let buf = pool.take(capacity.max(header.len()));
        Segment::with_buf(id, base, buf, header, Some(pool.clone()))
    }

    fn with_buf(
        id: u64,
        base: u64,
        buf: Buf,
        header: &[u8],
        pool: Option<Arc<BufPool>>,
    ) -> Segment {
        let s = Segment {
            id,
            buf,
            pool,
            len: AtomicUsize::new(0),
            base,
            first_seq: AtomicU64::new(0),
            last_seq: AtomicU64::new(0),
            sealed: AtomicBool::new(false),
            written: AtomicUsize::new(0),
            synced: AtomicUsize::new(0),
            file: Mutex::new(None),
            created: std::time::Instant::now(),
        };
        // SAFETY: a fresh segment has no other user yet.
        unsafe { s.append(&[header]) };
        s
    }

    /// Bytes published so far.
    pub(super) fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// Free space left.
    pub(super) fn room(&self) -> usize {
        self.buf.len() - self.len()
    }

    /// Appends the concatenation of `parts`, returning its offset, or `None`
    /// if it does not fit.
    ///
    /// # Safety
    /// Only one thread may append at a time (callers hold the volume's write
    /// lock), and never to a sealed segment.
    pub(super) unsafe fn append(&self, parts: &[&[u8]]) -> Option<usize> {
        let at = self.len.load(Ordering::Relaxed);
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if total > self.buf.len() - at {
            return None;
        }
        let mut pos = at;
        for p in parts {
            // A trim's empty data part may come when the header took the
            // last free byte: there is no cell at `pos` to point at then.
            if p.is_empty() {
                continue;
            }
            // SAFETY: [pos, pos + len) is above the published length, so no
            // reader looks at it, and the single-appender contract means no
            // other writer does either; UnsafeCell<u8> has u8's layout.
            unsafe { std::ptr::copy_nonoverlapping(p.as_ptr(), self.buf[pos].get(), p.len()) };
            pos += p.len();
        }
        self.len.store(pos, Ordering::Release);
        Some(at)
    }

    /// Appends `total` bytes that `fill` writes in place (for data that
    /// must be copied exactly once and checksummed from the copy, such as
    /// guest memory a guest may still be changing), returning their
    /// offset, or `None` if they do not fit.
    ///
    /// # Safety
    /// As for [`Segment::append`].
    pub(super) unsafe fn append_with(
        &self,
        total: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> Option<usize> {
        let at = self.len.load(Ordering::Relaxed);
        if total > self.buf.len() - at {
            return None;
        }
        if total > 0 {
            // SAFETY: [at, at + total) is inside the buffer and above the
            // published length, so no reader looks at it, and the single-
            // appender contract means no other writer does either, so this
            // is the only reference to it; UnsafeCell<u8> has u8's layout.
            let dst = unsafe { std::slice::from_raw_parts_mut(self.buf[at].get(), total) };
            fill(dst);
        }
        self.len.store(at + total, Ordering::Release);
        Some(at)
    }

    /// Published bytes [off, off + len); `None` if not (yet) published.
    pub(super) fn bytes(&self, off: usize, len: usize) -> Option<&[u8]> {
        let end = off.checked_add(len)?;
        if end > self.len() {
            return None;
        }
        if len == 0 {
            return Some(&[]);
        }
        // SAFETY: published bytes never change again (see the Sync impl).
        Some(unsafe { std::slice::from_raw_parts(self.buf[off].get(), len) })
    }

    /// Log position just past the published bytes.
    pub(super) fn end_pos(&self) -> u64 {
        self.base + self.len() as u64
    }

    /// Calls `f` with the header of each record published so far, in
    /// order (their checksums were checked when they were appended or
    /// replayed).
    pub(super) fn for_each_record(&self, mut f: impl FnMut(&RecordHeader)) {
        let len = self.len();
        let mut pos = SEGMENT_HEADER;
        while pos < len {
            let Some(h) = self
                .bytes(pos, WAL_RECORD_HEADER)
                .and_then(|b| decode_record_header(b).ok())
            else {
                break;
            };
            f(&h);
            pos += WAL_RECORD_HEADER + h.data_len();
        }
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            pool.give(std::mem::take(&mut self.buf));
        }
    }
}

/// A zeroed buffer of cells, allocated in one call (calloc maps fresh pages
/// lazily, so a new segment costs almost nothing until it is written).
fn zeroed(len: usize) -> Buf {
    let b: Box<[u8]> = vec![0u8; len].into_boxed_slice();
    // SAFETY: UnsafeCell<u8> is repr(transparent) over u8, so the slice
    // layouts are identical and ownership transfers unchanged.
    unsafe { Box::from_raw(Box::into_raw(b) as *mut [UnsafeCell<u8>]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_publish_and_stay_put() {
        let s = Segment::new(1, 100, 64, b"HEAD");
        assert_eq!(s.len(), 4);
        // SAFETY: single-threaded test.
        let at = unsafe { s.append(&[b"abc", b"def"]) }.unwrap();
        assert_eq!(at, 4);
        assert_eq!(s.bytes(4, 6), Some(&b"abcdef"[..]));
        assert_eq!(s.bytes(8, 3), None, "not published");
        // SAFETY: single-threaded test, segment not sealed.
        assert_eq!(unsafe { s.append(&[&[0u8; 100]]) }, None, "too big");
        assert_eq!(s.room(), 64 - 10);
        assert_eq!(s.end_pos(), 110);
    }

    #[test]
    fn buffers_are_recycled_and_show_only_what_was_appended() {
        let pool = Arc::new(BufPool::new());
        let s = Segment::from_pool(&pool, 1, 0, 64, b"HEAD");
        // SAFETY: single-threaded test, segment not sealed.
        unsafe { s.append(&[&[7u8; 40]]) }.unwrap();
        drop(s);
        assert_eq!(pool.kept(), 1);
        let s = Segment::from_pool(&pool, 2, 44, 64, b"HD2!");
        assert_eq!(pool.kept(), 0, "the buffer was taken again");
        assert_eq!(s.len(), 4);
        assert_eq!(s.bytes(0, 4), Some(&b"HD2!"[..]));
        assert_eq!(s.bytes(4, 1), None, "old bytes are not published");
        // Another size is not served from the pool, and the pool keeps
        // only a few buffers.
        let others: Vec<Segment> = (0..4)
            .map(|i| Segment::from_pool(&pool, 3 + i, 0, 128, b"HEAD"))
            .collect();
        drop(others);
        drop(s);
        assert_eq!(pool.kept(), POOL_KEEP);
        pool.clear();
        assert_eq!(pool.kept(), 0);
    }

    #[test]
    fn filled_appends_publish_what_the_filler_wrote() {
        let s = Segment::new(1, 0, 16, b"HEAD");
        // SAFETY: single-threaded test, segment not sealed.
        let at = unsafe { s.append_with(5, |d| d.copy_from_slice(b"12345")) };
        assert_eq!(at, Some(4));
        assert_eq!(s.bytes(4, 5), Some(&b"12345"[..]));
        // SAFETY: as above.
        assert_eq!(unsafe { s.append_with(8, |_| unreachable!()) }, None);
        // SAFETY: as above.
        assert_eq!(unsafe { s.append_with(0, |_| unreachable!()) }, Some(9));
    }

    #[test]
    fn a_record_without_data_may_fill_the_segment_exactly() {
        // A trim's record is a header and an empty data part; when the
        // header takes the last free byte, the empty part has no cell.
        let s = Segment::new(1, 0, 64, b"HEAD");
        // SAFETY: single-threaded test.
        assert_eq!(unsafe { s.append(&[&[7u8; 60], &[]]) }, Some(4));
        assert_eq!((s.len(), s.room()), (64, 0));
        assert_eq!(
            // SAFETY: single-threaded test, segment not sealed.
            unsafe { s.append(&[&[]]) },
            Some(64),
            "nothing fits nothing"
        );
    }
}
