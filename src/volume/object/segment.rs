//! A WAL segment in memory: an append-only buffer of fixed capacity whose
//! bytes below `len` never change again. Writers append under the volume's
//! write lock; readers, the WAL thread and the uploader read published
//! bytes without it, which keeps slow disk and network I/O off that lock.

use std::cell::UnsafeCell;
use std::fs::File;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// One segment: the exact image of its `<id>.wal` file.
pub(super) struct Segment {
    pub(super) id: u64,
    buf: Box<[UnsafeCell<u8>]>,
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
        let s = Segment {
            id,
            buf: zeroed(capacity.max(header.len())),
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
}

/// A zeroed buffer of cells, allocated in one call (calloc maps fresh pages
/// lazily, so a new segment costs almost nothing until it is written).
fn zeroed(len: usize) -> Box<[UnsafeCell<u8>]> {
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
