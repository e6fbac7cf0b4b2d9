//! One page group's anonymous memory, aligned to a huge page, and the
//! record of which of its huge-page extents the kernel has backed.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use super::{MemoryError, PAGE};
use crate::volume::VolumeError;

/// Transparent huge page size on x86-64 and the usual aarch64 setup: the
/// unit in which memory is faulted in ahead of writes.
pub(super) const HUGE: usize = 2 << 20;

/// Anonymous memory for one group's pages.
pub(super) struct Region {
    map: NonNull<u8>,
    map_len: usize,
    data: NonNull<u8>,
    len: usize,
    /// Extents (HUGE bytes each) the kernel has backed with memory (or a
    /// write has faulted in): a write there copies without a huge fault.
    populated: AtomicU32,
    /// Extents backed ahead of a sequential writer and not written yet: the
    /// first write into one asks for the next.
    ahead: AtomicU32,
}

// SAFETY: the region is plain memory owned by its group, not tied to the
// thread that mapped it.
unsafe impl Send for Region {}
// SAFETY: every access to a page's bytes holds that page's lock, so shared
// references never race; populating writes no bytes (MADV_POPULATE_WRITE
// faults pages in without touching their contents).
unsafe impl Sync for Region {}

impl Region {
    pub(super) fn new(len: usize) -> Result<Self, VolumeError> {
        const {
            assert!(
                super::GROUP * PAGE / HUGE <= 32,
                "one bit per extent in a u32"
            )
        };
        let map_len = len + HUGE;
        // SAFETY: a fresh private anonymous mapping; the result is checked.
        // NORESERVE: the volume's size is a ceiling, not a commitment.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            let source = std::io::Error::last_os_error();
            return Err(VolumeError::backend(MemoryError::Map { len, source }));
        }
        let map = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| VolumeError::backend(MemoryError::NullMap))?;
        let skew = (HUGE - map.as_ptr() as usize % HUGE) % HUGE;
        // SAFETY: skew < HUGE, so data..data+len lies inside the mapping.
        let data = unsafe { map.add(skew) };
        // SAFETY: advice on our own mapping; failure (THP off) only costs speed.
        unsafe { libc::madvise(data.as_ptr().cast(), len, libc::MADV_HUGEPAGE) };
        Ok(Region {
            map,
            map_len,
            data,
            len,
            populated: AtomicU32::new(0),
            ahead: AtomicU32::new(0),
        })
    }

    /// Extents in this region.
    pub(super) fn extents(&self) -> usize {
        self.len.div_ceil(HUGE)
    }

    /// The bytes of page `index`.
    ///
    /// # Safety
    /// The caller holds that page's lock (write lock for `&mut`), and
    /// `index` is below the group's page count.
    #[allow(clippy::mut_from_ref)]
    pub(super) unsafe fn page(&self, index: usize) -> &mut [u8] {
        // SAFETY: in bounds by the caller's promise; exclusive or shared as
        // the caller's lock makes it.
        unsafe { std::slice::from_raw_parts_mut(self.data.as_ptr().add(index * PAGE), PAGE) }
    }

    /// Gives page `index` back to the kernel; it reads as zeroes afterwards.
    ///
    /// # Safety
    /// As for [`Region::page`], with the write lock held.
    pub(super) unsafe fn release(&self, index: usize) {
        // Given back: the extent is no longer all backed.
        let bit = 1 << (index * PAGE / HUGE);
        self.populated.fetch_and(!bit, Ordering::Relaxed);
        self.ahead.fetch_and(!bit, Ordering::Relaxed);
        // SAFETY: in bounds; MADV_DONTNEED on private anonymous memory
        // drops the pages, and later reads see zeroes.
        let r = unsafe {
            libc::madvise(
                self.data.as_ptr().add(index * PAGE).cast(),
                PAGE,
                libc::MADV_DONTNEED,
            )
        };
        if r != 0 {
            // Could not drop them: clear by hand so the zero invariant holds.
            // SAFETY: as above.
            unsafe { self.page(index) }.fill(0);
        }
    }

    /// Whether extent `e` is backed, so writing there will not fault.
    pub(super) fn is_populated(&self, e: usize) -> bool {
        self.populated.load(Ordering::Acquire) & (1 << e) != 0
    }

    /// Takes extent `e`'s "populated ahead" mark; true if it was set.
    pub(super) fn take_ahead(&self, e: usize) -> bool {
        let bit = 1 << e;
        self.ahead.load(Ordering::Relaxed) & bit != 0
            && self.ahead.fetch_and(!bit, Ordering::Relaxed) & bit != 0
    }

    /// Notes that a write on a core has faulted extent `e` in.
    pub(super) fn touched(&self, e: usize) {
        self.populated.fetch_or(1 << e, Ordering::Release);
    }

    /// Has the kernel back extent `e` with (zeroed) memory, unless it
    /// already is, and marks it as backed ahead of a sequential writer.
    /// Slow (it zeroes up to a huge page, and may compact memory to find
    /// one): only the populator thread calls it. A kernel that cannot
    /// populate (before Linux 5.14) is no error: writes fault as before.
    pub(super) fn populate(&self, e: usize) -> std::io::Result<()> {
        if self.is_populated(e) {
            return Ok(());
        }
        let start = e * HUGE;
        let len = HUGE.min(self.len - start);
        // SAFETY: in bounds of our mapping; POPULATE_WRITE faults pages in
        // as a write would but leaves their contents alone, so it cannot
        // disturb a concurrent copy into them or a page being dropped.
        let r = unsafe {
            libc::madvise(
                self.data.as_ptr().add(start).cast(),
                len,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if r != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINVAL) {
                return Err(err);
            }
        } else {
            self.ahead.fetch_or(1 << e, Ordering::Relaxed);
        }
        self.populated.fetch_or(1 << e, Ordering::Release);
        Ok(())
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe { libc::munmap(self.map.as_ptr().cast(), self.map_len) };
    }
}
