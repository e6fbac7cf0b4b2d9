//! Where a request's bytes live. NBD receives a write's payload off its
//! socket into vbd's own aligned buffer and sends a read's reply from it
//! ([`IoData::Owned`]); a vhost-user request names buffers in the guest's
//! memory ([`IoData::Guest`]), which the backends read and write in place,
//! so the data crosses no bounce buffer.
//!
//! Guest memory is shared with a running guest (and with QEMU), so no
//! Rust reference is ever made to it: bytes move with raw copies, or the
//! kernel moves them (READV/WRITEV). A guest that changes a buffer while
//! its request runs gets garbled data, as with any DMA device; nothing
//! here can fault, because the iovecs stay inside mappings that the
//! request's keep-alive guard holds.

use std::sync::Arc;

use super::buf::{ALIGN, AlignedBuf};

/// Most iovecs one READV/WRITEV takes (the kernel's `UIO_MAXIOV`).
pub const MAX_IOV: usize = 1024;

/// An empty buffer, what [`super::Io::buf`] shows of a guest request.
static EMPTY: AlignedBuf = AlignedBuf::new();

/// The data of one request.
#[derive(Debug)]
pub enum IoData {
    /// vbd's own buffer, `len` bytes: what NBD uses.
    Owned(AlignedBuf),
    /// Buffers in memory vbd does not own (a guest's), kept mapped by a guard.
    Guest(GuestIov),
}

impl Default for IoData {
    fn default() -> Self {
        IoData::Owned(AlignedBuf::new())
    }
}

/// A request's buffers in foreign memory: host iovecs in stream order,
/// the guard that keeps their mapping alive, and reusable scratch, so a
/// request allocates only while these arrays grow to the queue's bound.
pub struct GuestIov {
    iov: Vec<libc::iovec>,
    /// `ends[i]` is the stream offset just past `iov[i]`.
    ends: Vec<usize>,
    /// The iovecs of what is still to transfer, rebuilt by
    /// [`GuestIov::rest`]; what a READV/WRITEV SQE points at.
    rest: Vec<libc::iovec>,
    /// Keeps the mapping behind `iov` alive while the request holds it.
    keep: Option<Arc<dyn Send + Sync>>,
    /// Every base and length is a multiple of [`ALIGN`].
    aligned: bool,
}

// SAFETY: the iovecs are addresses in memory that `keep` (Send + Sync)
// keeps mapped; moving them to another thread with their owner touches
// no memory, and every access goes through `&mut self` or the read-only
// `read_at`.
unsafe impl Send for GuestIov {}

impl std::fmt::Debug for GuestIov {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GuestIov({} iovecs, {} bytes, aligned: {})",
            self.iov.len(),
            self.len(),
            self.aligned
        )
    }
}

impl GuestIov {
    fn new() -> Self {
        GuestIov {
            iov: Vec::new(),
            ends: Vec::new(),
            rest: Vec::new(),
            keep: None,
            aligned: true,
        }
    }

    /// Bytes across the iovecs.
    pub fn len(&self) -> usize {
        self.ends.last().copied().unwrap_or(0)
    }

    /// Whether there is no data at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether every buffer's address and length are multiples of
    /// [`ALIGN`], as O_DIRECT needs.
    pub fn aligned(&self) -> bool {
        self.aligned
    }

    /// The iovecs for bytes `from..` of the stream, at most `max_bytes` of
    /// them and at most [`MAX_IOV`] iovecs, with their byte count. The
    /// array lives in `self` until the next call, so an SQE may point at
    /// it while the request is pending.
    pub(super) fn rest(&mut self, from: usize, max_bytes: usize) -> (&[libc::iovec], usize) {
        self.rest.clear();
        let mut i = self.ends.partition_point(|&e| e <= from);
        let mut at = from;
        let mut total = 0;
        while i < self.iov.len() && total < max_bytes && self.rest.len() < MAX_IOV {
            let start = self.ends[i] - self.iov[i].iov_len;
            let skip = at - start;
            let n = (self.iov[i].iov_len - skip).min(max_bytes - total);
            self.rest.push(libc::iovec {
                // skip < iov_len: still inside this iovec's buffer.
                iov_base: self.iov[i].iov_base.cast::<u8>().wrapping_add(skip).cast(),
                iov_len: n,
            });
            total += n;
            at += n;
            i += 1;
        }
        (&self.rest, total)
    }

    /// Calls `f(host pointer, stream offset, length)` for each piece of
    /// bytes `at..at + len`.
    fn pieces(&self, at: usize, len: usize, mut f: impl FnMut(*mut u8, usize, usize)) {
        assert!(
            at.checked_add(len).is_some_and(|end| end <= self.len()),
            "bytes {at}+{len} outside a {}-byte request",
            self.len()
        );
        let mut i = self.ends.partition_point(|&e| e <= at);
        let mut pos = at;
        let end = at + len;
        while pos < end {
            let start = self.ends[i] - self.iov[i].iov_len;
            let n = (self.ends[i] - pos).min(end - pos);
            // Pointer arithmetic only: pos - start < iov_len.
            let p = self.iov[i].iov_base.cast::<u8>().wrapping_add(pos - start);
            f(p, pos - at, n);
            pos += n;
            i += 1;
        }
    }
}

impl IoData {
    /// Bytes of data.
    pub fn len(&self) -> usize {
        match self {
            IoData::Owned(b) => b.len(),
            IoData::Guest(g) => g.len(),
        }
    }

    /// Whether there is no data.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies `src` into the data at byte `at` (a read's result).
    ///
    /// # Panics
    /// If `at + src.len()` is past the end: a backend bug, as for a slice.
    #[inline]
    pub fn write_at(&mut self, at: usize, src: &[u8]) {
        match self {
            IoData::Owned(b) => b.as_mut_slice()[at..at + src.len()].copy_from_slice(src),
            IoData::Guest(g) => g.pieces(at, src.len(), |p, off, n| {
                // SAFETY: `pieces` keeps within the iovecs, which
                // `prepare_guest`'s caller promised are writable and which
                // `keep` keeps mapped; `src` is our memory, so they do not
                // overlap.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(off), p, n) }
            }),
        }
    }

    /// Sets `len` bytes from `at` to `byte`.
    ///
    /// # Panics
    /// If the range is past the end.
    #[inline]
    pub fn fill_at(&mut self, at: usize, len: usize, byte: u8) {
        match self {
            IoData::Owned(b) => b.as_mut_slice()[at..at + len].fill(byte),
            IoData::Guest(g) => g.pieces(at, len, |p, _, n| {
                // SAFETY: as in `write_at`.
                unsafe { std::ptr::write_bytes(p, byte, n) }
            }),
        }
    }

    /// Copies the data's bytes from `at` into `dst` (a write's source).
    ///
    /// # Panics
    /// If `at + dst.len()` is past the end.
    #[inline]
    pub fn read_at(&self, at: usize, dst: &mut [u8]) {
        match self {
            IoData::Owned(b) => dst.copy_from_slice(&b.as_slice()[at..at + dst.len()]),
            IoData::Guest(g) => g.pieces(at, dst.len(), |p, off, n| {
                // SAFETY: as in `write_at`, reading this time; `dst` is
                // ours, so they do not overlap.
                unsafe { std::ptr::copy_nonoverlapping(p, dst.as_mut_ptr().add(off), n) }
            }),
        }
    }

    /// The owned buffer, empty for guest data.
    pub fn owned(&self) -> &AlignedBuf {
        match self {
            IoData::Owned(b) => b,
            IoData::Guest(_) => &EMPTY,
        }
    }

    /// The owned buffer; guest data is dropped (guard included) for a new,
    /// empty one.
    pub fn owned_mut(&mut self) -> &mut AlignedBuf {
        if let IoData::Guest(_) = self {
            *self = IoData::Owned(AlignedBuf::new());
        }
        match self {
            IoData::Owned(b) => b,
            // Made Owned just above.
            IoData::Guest(_) => unreachable!("guest data was just replaced"),
        }
    }

    /// The guest buffers, reset to none; owned data is dropped for them.
    fn guest_mut(&mut self) -> &mut GuestIov {
        if let IoData::Owned(_) = self {
            *self = IoData::Guest(GuestIov::new());
        }
        match self {
            IoData::Guest(g) => g,
            IoData::Owned(_) => unreachable!("owned data was just replaced"),
        }
    }

    /// Sets up guest buffers: `iov` in stream order, kept mapped by `keep`.
    ///
    /// # Safety
    /// Each `(base, len)` must be valid for reads and writes of `len` bytes
    /// for as long as `keep` is alive, and must not overlap memory vbd
    /// owns. The data keeps `keep` until [`IoData::release_guest`], the
    /// next call of this, or a switch to owned data.
    pub unsafe fn set_guest(
        &mut self,
        iov: impl IntoIterator<Item = (*mut u8, usize)>,
        keep: Arc<dyn Send + Sync>,
    ) {
        let g = self.guest_mut();
        g.iov.clear();
        g.ends.clear();
        g.aligned = true;
        let mut end = 0usize;
        for (base, len) in iov {
            if len == 0 {
                continue;
            }
            g.aligned &= (base as usize).is_multiple_of(ALIGN) && len.is_multiple_of(ALIGN);
            g.iov.push(libc::iovec {
                iov_base: base.cast(),
                iov_len: len,
            });
            end += len;
            g.ends.push(end);
        }
        g.keep = Some(keep);
    }

    /// Forgets guest buffers and drops their guard, keeping the arrays'
    /// capacity for the next request.
    pub fn release_guest(&mut self) {
        if let IoData::Guest(g) = self {
            g.iov.clear();
            g.ends.clear();
            g.rest.clear();
            g.keep = None;
        }
    }

    /// Reserves room for `n` guest iovecs, so requests up to that many
    /// do not allocate.
    pub fn reserve_guest(&mut self, n: usize) {
        let g = self.guest_mut();
        g.iov.reserve(n);
        g.ends.reserve(n);
        g.rest.reserve(n.min(MAX_IOV));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guest-style buffers over `mem`: pieces of the given lengths, each
    /// starting `gap` bytes after the previous one ended.
    fn guest(mem: &mut [u8], lens: &[usize], gap: usize) -> IoData {
        let mut d = IoData::default();
        let mut at = 0;
        let mut iov = Vec::new();
        for &n in lens {
            iov.push((mem[at..].as_mut_ptr(), n));
            at += n + gap;
        }
        // SAFETY: every piece lies in `mem`, which outlives `d` in the
        // tests below, and the guard is a dummy.
        unsafe { d.set_guest(iov, Arc::new(())) };
        d
    }

    #[test]
    fn guest_pieces_read_write_and_fill_across_boundaries() {
        let mut mem = vec![0u8; 64];
        let mut d = guest(&mut mem, &[3, 1, 7, 5], 2);
        assert_eq!(d.len(), 16);
        let src: Vec<u8> = (1..=16).collect();
        d.write_at(0, &src);
        let mut back = vec![0u8; 16];
        d.read_at(0, &mut back);
        assert_eq!(back, src);
        d.fill_at(2, 3, 0xee);
        let mut mid = [0u8; 6];
        d.read_at(1, &mut mid);
        assert_eq!(mid, [2, 0xee, 0xee, 0xee, 6, 7]);
        drop(d);
        // The gaps between pieces were never touched.
        assert_eq!(&mem[..5], &[1, 2, 0xee, 0, 0]);
        assert_eq!(&mem[5..6], &[0xee]);
        assert_eq!(&mem[8..15], &[0xee, 6, 7, 8, 9, 10, 11]);
        assert_eq!(&mem[15..17], &[0, 0]);
        assert_eq!(&mem[17..22], &[12, 13, 14, 15, 16]);
        assert!(mem[22..].iter().all(|&b| b == 0));
    }

    #[test]
    fn rest_starts_mid_buffer_and_stops_at_the_limit() {
        let mut mem = vec![0u8; 64];
        let base = mem.as_ptr() as usize;
        let mut d = guest(&mut mem, &[4, 4, 4], 0);
        let IoData::Guest(g) = &mut d else {
            unreachable!()
        };
        let (iov, n) = g.rest(5, 6);
        assert_eq!(n, 6);
        let got: Vec<(usize, usize)> = iov
            .iter()
            .map(|v| (v.iov_base as usize - base, v.iov_len))
            .collect();
        assert_eq!(got, [(5, 3), (8, 3)]);
        let (iov, n) = g.rest(12, 100);
        assert_eq!((iov.len(), n), (0, 0));
        assert!(!g.aligned());
    }

    #[test]
    fn switching_kinds_drops_the_other() {
        let mut mem = vec![0u8; 8];
        let keep: Arc<dyn Send + Sync> = Arc::new(());
        let mut d = IoData::default();
        d.owned_mut().set_len(8);
        // SAFETY: the piece lies in `mem`, which outlives `d`.
        unsafe { d.set_guest([(mem.as_mut_ptr(), 8)], keep.clone()) };
        assert_eq!(Arc::strong_count(&keep), 2);
        assert!(d.owned().is_empty());
        d.release_guest();
        assert_eq!(Arc::strong_count(&keep), 1, "the guard is let go");
        assert_eq!(d.len(), 0);
        assert_eq!(d.owned_mut().len(), 0);
    }
}
