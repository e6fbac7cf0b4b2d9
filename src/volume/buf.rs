//! A heap buffer aligned for O_DIRECT, reused across requests so the hot
//! path does not allocate.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;

/// Alignment of every request buffer: the largest logical block size in use.
pub const ALIGN: usize = 4096;

/// A growable, page-aligned byte buffer with a logical length.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    cap: usize,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like Vec<u8>, so it
// may move to another thread with its owner.
unsafe impl Send for AlignedBuf {}
// SAFETY: as for Vec<u8>: a shared reference only reads the bytes, and every
// write goes through `&mut self`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// An empty buffer that owns no memory yet.
    pub const fn new() -> Self {
        AlignedBuf {
            ptr: NonNull::dangling(),
            cap: 0,
            len: 0,
        }
    }

    /// Bytes the buffer can hold without reallocating.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Sets the logical length, reallocating only if it exceeds capacity.
    /// Contents are unspecified after growth (old bytes are not kept).
    pub fn set_len(&mut self, len: usize) {
        if len > self.cap {
            self.release();
            let cap = len.next_multiple_of(ALIGN);
            let Ok(layout) = Layout::from_size_align(cap, ALIGN) else {
                panic!("request buffer of {len} bytes overflows the address space");
            };
            // SAFETY: layout has non-zero size (len > cap >= 0 means len >= 1).
            let p = unsafe { alloc_zeroed(layout) };
            let Some(ptr) = NonNull::new(p) else {
                std::alloc::handle_alloc_error(layout);
            };
            self.ptr = ptr;
            self.cap = cap;
        }
        self.len = len;
    }

    /// Frees the memory if capacity is above `keep`, so that one huge request
    /// does not pin its buffer for the connection's lifetime.
    pub fn shrink_above(&mut self, keep: usize) {
        if self.cap > keep {
            self.release();
        }
    }

    fn release(&mut self) {
        if self.cap > 0 {
            // SAFETY: allocated in set_len with this exact layout.
            unsafe {
                dealloc(
                    self.ptr.as_ptr(),
                    Layout::from_size_align_unchecked(self.cap, ALIGN),
                )
            };
        }
        self.ptr = NonNull::dangling();
        self.cap = 0;
        self.len = 0;
    }

    /// Logical length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the logical length is zero.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Raw pointer for handing to the kernel; valid while `self` is not resized.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The bytes, read-only.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len bytes, initialised by alloc_zeroed
        // or by writes; dangling only when len == 0.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Default for AlignedBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        self.release();
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf(len={}, cap={})", self.len, self.cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_aligned_and_keeps_capacity() {
        let mut b = AlignedBuf::new();
        assert!(b.is_empty());
        b.set_len(10);
        assert_eq!(b.as_mut_ptr() as usize % ALIGN, 0);
        assert_eq!(b.capacity(), ALIGN);
        b.as_mut_slice().copy_from_slice(b"0123456789");
        b.set_len(5);
        assert_eq!(b.as_slice(), b"01234");
        b.set_len(3 * ALIGN + 1);
        assert_eq!(b.capacity(), 4 * ALIGN);
        b.shrink_above(ALIGN);
        assert_eq!(b.capacity(), 0);
        assert!(b.is_empty());
    }
}
