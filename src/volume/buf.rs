//! A heap buffer aligned for O_DIRECT. On a thread that asked for one
//! ([`use_pool_on_this_thread`]: the reactor cores), buffers up to
//! [`POOL_MAX`] come from, and go back to, the thread's pool, so a request
//! takes one when it needs it and returns it after: the hot path does not
//! allocate, and connections with nothing in flight hold none.
//!
//! A pooled buffer's old bytes are another request's, maybe another
//! client's: a volume must fill a read's buffer completely before it
//! reports success, and only then is it sent.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::cell::RefCell;
use std::ptr::NonNull;

/// Alignment of every request buffer: the largest logical block size in use.
pub const ALIGN: usize = 4096;

/// The largest capacity kept in the pools; bigger buffers are allocated
/// and freed each time (their cost is small beside their copy).
pub const POOL_MAX: usize = 1 << 20;
/// Size classes: ALIGN << i, up to POOL_MAX.
const CLASSES: usize = (POOL_MAX / ALIGN).trailing_zeros() as usize + 1;
/// Bytes of free buffers one thread keeps (more are freed): a core at
/// 512 requests of 64 KiB in flight.
const POOL_BYTES: usize = 32 << 20;

/// One thread's free buffers by size class.
struct Pool {
    /// This thread pools buffers (other threads allocate and free).
    on: bool,
    free: [Vec<NonNull<u8>>; CLASSES],
    bytes: usize,
}

/// Makes this thread keep freed buffers for its next requests (a reactor
/// core calls it once, at start).
pub fn use_pool_on_this_thread() {
    let _ = POOL.try_with(|p| p.borrow_mut().on = true);
}

impl Drop for Pool {
    fn drop(&mut self) {
        for (class, list) in self.free.iter_mut().enumerate() {
            for p in list.drain(..) {
                // SAFETY: pooled buffers were allocated with this class's
                // layout (`class_layout`) and are owned by the pool alone.
                unsafe { dealloc(p.as_ptr(), class_layout(class)) };
            }
        }
    }
}

thread_local! {
    static POOL: RefCell<Pool> = const {
        RefCell::new(Pool { on: false, free: [const { Vec::new() }; CLASSES], bytes: 0 })
    };
}

/// The capacity a buffer of `len` bytes gets: on a pooling thread a size
/// class up to [`POOL_MAX`], elsewhere (and above it) whole pages.
fn capacity_for(len: usize, pooled: bool) -> usize {
    if pooled && len <= POOL_MAX {
        len.max(ALIGN).next_power_of_two()
    } else {
        len.next_multiple_of(ALIGN)
    }
}

/// The pool class of a capacity, if it has one.
fn class_of(cap: usize) -> Option<usize> {
    (cap.is_power_of_two() && (ALIGN..=POOL_MAX).contains(&cap))
        .then(|| (cap / ALIGN).trailing_zeros() as usize)
}

fn class_layout(class: usize) -> Layout {
    // SAFETY: ALIGN is a power of two, and ALIGN << class (class < CLASSES)
    // is at most POOL_MAX, far below isize::MAX.
    unsafe { Layout::from_size_align_unchecked(ALIGN << class, ALIGN) }
}

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

    /// Sets the logical length, taking a bigger buffer only if it exceeds
    /// capacity. Contents are unspecified after growth (old bytes are not
    /// kept; a pooled buffer holds an earlier request's).
    pub fn set_len(&mut self, len: usize) {
        if len > self.cap {
            self.release();
            let on = POOL.try_with(|p| p.borrow().on).unwrap_or(false);
            let mut cap = capacity_for(len, on);
            // The smallest free buffer of this class or a larger one: the
            // pool then holds about the bytes of the most requests in
            // flight at once, not that peak for every size class apart.
            let pooled = class_of(cap).filter(|_| on).and_then(|class| {
                POOL.try_with(|p| {
                    let mut p = p.borrow_mut();
                    let c = (class..CLASSES).find(|&c| !p.free[c].is_empty())?;
                    let got = p.free[c].pop()?;
                    p.bytes -= ALIGN << c;
                    Some((got, ALIGN << c))
                })
                .ok()
                .flatten()
            });
            self.ptr = match pooled {
                Some((ptr, pooled_cap)) => {
                    cap = pooled_cap;
                    ptr
                }
                None => {
                    let Ok(layout) = Layout::from_size_align(cap, ALIGN) else {
                        panic!("request buffer of {len} bytes overflows the address space");
                    };
                    // SAFETY: layout has non-zero size (cap >= ALIGN).
                    let p = unsafe { alloc_zeroed(layout) };
                    let Some(ptr) = NonNull::new(p) else {
                        std::alloc::handle_alloc_error(layout);
                    };
                    ptr
                }
            };
            self.cap = cap;
        }
        self.len = len;
    }

    /// Gives the memory back (to this thread's pool if it has room): for
    /// a request that is over, so an idle owner holds nothing.
    pub fn recycle(&mut self) {
        self.release();
    }

    fn release(&mut self) {
        if self.cap > 0 {
            let (ptr, cap) = (self.ptr, self.cap);
            let kept = class_of(cap).is_some_and(|class| {
                POOL.try_with(|p| {
                    let mut p = p.borrow_mut();
                    if !p.on || p.bytes + cap > POOL_BYTES {
                        return false;
                    }
                    p.bytes += cap;
                    p.free[class].push(ptr);
                    true
                })
                .unwrap_or(false)
            });
            if !kept {
                // SAFETY: allocated in set_len (or taken from a pool that
                // allocated it) with this exact layout.
                unsafe { dealloc(ptr.as_ptr(), Layout::from_size_align_unchecked(cap, ALIGN)) };
            }
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
        // Off the pool, whole pages rather than a power of two.
        b.set_len(5 * ALIGN + 1);
        assert_eq!(b.capacity(), 6 * ALIGN);
        b.recycle();
        assert_eq!(b.capacity(), 0);
        assert!(b.is_empty());
        b.set_len(POOL_MAX + 1);
        assert_eq!(b.capacity(), POOL_MAX + ALIGN);
    }

    #[test]
    fn a_recycled_buffer_is_the_next_one_of_its_class_on_this_thread() {
        // Without the pool, a buffer is freed.
        let mut a = AlignedBuf::new();
        a.set_len(100);
        a.recycle();
        assert_eq!(POOL.with(|p| p.borrow().bytes), 0);
        use_pool_on_this_thread();
        a.set_len(5000);
        assert_eq!(a.capacity(), 2 * ALIGN);
        a.as_mut_slice()[0] = 7;
        let first = a.as_mut_ptr();
        a.recycle();
        assert_eq!(a.capacity(), 0);
        let mut b = AlignedBuf::new();
        b.set_len(6000);
        assert_eq!(b.as_mut_ptr(), first, "taken from the pool");
        assert_eq!(b.as_mut_ptr() as usize % ALIGN, 0);
        // A smaller request takes a larger free buffer rather than a new one.
        b.recycle();
        let mut c = AlignedBuf::new();
        c.set_len(ALIGN);
        assert_eq!(c.as_mut_ptr(), first);
        assert_eq!(c.capacity(), 2 * ALIGN);
        // A larger one does not fit in it.
        c.recycle();
        let mut d = AlignedBuf::new();
        d.set_len(3 * ALIGN);
        assert_ne!(d.as_mut_ptr(), first);
        // The pool keeps at most POOL_BYTES; the rest is freed.
        let mut many: Vec<AlignedBuf> = (0..POOL_BYTES / POOL_MAX + 4)
            .map(|_| {
                let mut m = AlignedBuf::new();
                m.set_len(POOL_MAX);
                m
            })
            .collect();
        for m in &mut many {
            m.recycle();
        }
        let pooled = POOL.with(|p| p.borrow().bytes);
        assert!(pooled <= POOL_BYTES, "{pooled}");
    }
}
