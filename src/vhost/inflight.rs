//! Inflight I/O tracking (vhost-user VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD):
//! a shared-memory log, kept by the frontend across backend restarts, of
//! which descriptor heads the backend took and has not completed, so that
//! after a reconnect each is re-submitted once and none is lost.
//!
//! The layout is QEMU's for split queues (libvhost-user's
//! `VuVirtqInflight`/`VuDescStateSplit`), one area per queue:
//!
//! ```text
//! u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
//! desc_num x { u8 inflight; u8 pad[5]; u16 next; u64 counter; }
//! ```
//!
//! padded to 64 bytes. The tracking functions are pure over a
//! [`VolatileSlice`]; [`InflightRegion`] maps the memfd that holds them.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;

use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory, VolatileSlice};

const FEATURES: usize = 0;
const VERSION: usize = 8;
const DESC_NUM: usize = 10;
const LAST_BATCH_HEAD: usize = 12;
const USED_IDX: usize = 14;
const HEADER: usize = 16;
const DESC: usize = 16;
const DESC_INFLIGHT: usize = 0;
const DESC_COUNTER: usize = 8;
/// The only version there is; 0 means "never used".
const CURRENT_VERSION: u16 = 1;
const ALIGN: usize = 64;

/// Bytes of one queue's area (libvhost-user's `vu_inflight_queue_size`).
pub(crate) fn queue_area_size(queue_size: u16) -> usize {
    (DESC * usize::from(queue_size) + size_of::<u16>()).next_multiple_of(ALIGN)
}

/// What a queue resumes from after a reconnect.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Recovery {
    /// Where to continue in the avail ring: the used index plus the
    /// requests still in flight.
    pub(crate) next_avail: u16,
    /// Heads taken but never completed, oldest first: process these before
    /// anything new from the avail ring.
    pub(crate) resubmit: Vec<u16>,
    /// The next value of the ordering counter.
    pub(crate) next_counter: u64,
}

/// Why the frontend's inflight area cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InflightError {
    #[error("inflight area of {have} bytes is smaller than {need} for {queues} queues of {size}")]
    TooSmall {
        have: u64,
        need: u64,
        queues: u16,
        size: u16,
    },
    #[error("inflight fd holds {file} bytes, not {offset}+{len}")]
    PastEof { file: u64, offset: u64, len: u64 },
    #[error("inflight memfd")]
    Memfd(#[source] io::Error),
    #[error("mapping the inflight area")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
}

fn load_u16(s: &VolatileSlice, at: usize) -> u16 {
    s.load(at, Ordering::Acquire).unwrap_or(0)
}

fn load_u64(s: &VolatileSlice, at: usize) -> u64 {
    s.load(at, Ordering::Acquire).unwrap_or(0)
}

// Stores land inside the area (its size was checked when it was made), so
// they cannot fail; a failure would only lose tracking, never memory safety.
fn store<T: vm_memory::AtomicAccess>(s: &VolatileSlice, at: usize, v: T) {
    let _ = s.store(v, at, Ordering::Release);
}

fn desc(head: u16) -> usize {
    HEADER + DESC * usize::from(head)
}

/// Reads the area of a queue of `queue_size` that a (re)connected frontend
/// handed over, with `used_idx` the guest's used-ring index now: a fresh
/// area is initialised; a used one yields the requests to re-submit.
/// Fixes the area up first if the backend died between publishing a used
/// entry and clearing its inflight flag.
pub(crate) fn recover(area: &VolatileSlice, queue_size: u16, used_idx: u16) -> Recovery {
    if area.len() < queue_area_size(queue_size) {
        return Recovery {
            next_avail: used_idx,
            ..Recovery::default()
        };
    }
    if load_u16(area, VERSION) == 0 {
        // Never used: whatever the descriptor states hold is not ours.
        for h in 0..queue_size {
            store(area, desc(h) + DESC_COUNTER, 0u64);
            store(area, desc(h) + DESC_INFLIGHT, 0u8);
        }
        store(area, LAST_BATCH_HEAD, 0u16);
        store(area, FEATURES, 0u64);
        store(area, DESC_NUM, queue_size);
        store(area, USED_IDX, used_idx);
        store(area, VERSION, CURRENT_VERSION);
        return Recovery {
            next_avail: used_idx,
            ..Recovery::default()
        };
    }
    if load_u16(area, USED_IDX) != used_idx {
        // The last completion reached the used ring but not this log.
        let last = load_u16(area, LAST_BATCH_HEAD);
        if last < queue_size {
            store(area, desc(last) + DESC_INFLIGHT, 0u8);
        }
        store(area, USED_IDX, used_idx);
    }
    store(area, DESC_NUM, queue_size);
    let mut pending: Vec<(u64, u16)> = (0..queue_size)
        .filter(|&h| {
            matches!(
                area.load::<u8>(desc(h) + DESC_INFLIGHT, Ordering::Acquire),
                Ok(1)
            )
        })
        .map(|h| (load_u64(area, desc(h) + DESC_COUNTER), h))
        .collect();
    pending.sort_unstable();
    let next_counter = pending.last().map_or(0, |&(c, _)| c.wrapping_add(1));
    Recovery {
        // At most queue_size heads, so this fits the ring's u16 arithmetic.
        next_avail: used_idx.wrapping_add(pending.len() as u16),
        resubmit: pending.into_iter().map(|(_, h)| h).collect(),
        next_counter,
    }
}

/// Records that `head` was taken from the avail ring, as the `counter`-th.
pub(crate) fn begin(area: &VolatileSlice, head: u16, counter: u64) {
    store(area, desc(head) + DESC_COUNTER, counter);
    store(area, desc(head) + DESC_INFLIGHT, 1u8);
}

/// Before publishing `head` on the used ring: names it as the one whose
/// flag may be stale if the backend dies before [`finish`].
pub(crate) fn before_used(area: &VolatileSlice, head: u16) {
    store(area, LAST_BATCH_HEAD, head);
}

/// After publishing `head` (the used index is now `used_idx`).
pub(crate) fn finish(area: &VolatileSlice, head: u16, used_idx: u16) {
    store(area, desc(head) + DESC_INFLIGHT, 0u8);
    store(area, USED_IDX, used_idx);
}

/// A mapped inflight memfd: one area per queue, back to back.
#[derive(Debug)]
pub(crate) struct InflightRegion {
    map: MmapRegion,
    queue_size: u16,
    num_queues: u16,
}

impl InflightRegion {
    /// A fresh zeroed memfd for GET_INFLIGHT_FD, and the region mapping it.
    pub(crate) fn create(num_queues: u16, queue_size: u16) -> Result<(Self, File), InflightError> {
        let len = queue_area_size(queue_size) * usize::from(num_queues);
        // SAFETY: the name is a NUL-terminated literal; the result is checked.
        let fd = unsafe {
            libc::memfd_create(
                c"vbd-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(InflightError::Memfd(io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor nothing else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(len as u64).map_err(InflightError::Memfd)?;
        // The frontend may not resize it under our mapping.
        let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on a descriptor we own; the result is checked.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(InflightError::Memfd(io::Error::last_os_error()));
        }
        let dup = file.try_clone().map_err(InflightError::Memfd)?;
        let region = Self::map(file, 0, len as u64, num_queues, queue_size)?;
        Ok((region, dup))
    }

    /// Maps what SET_INFLIGHT_FD hands over, after checking that the file
    /// really holds that much (touching past its end would be SIGBUS).
    pub(crate) fn map(
        file: File,
        offset: u64,
        len: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        let need = (queue_area_size(queue_size) * usize::from(num_queues)) as u64;
        if len < need {
            return Err(InflightError::TooSmall {
                have: len,
                need,
                queues: num_queues,
                size: queue_size,
            });
        }
        let file_len = file.metadata().map_err(InflightError::Memfd)?.len();
        if offset.checked_add(need).is_none_or(|end| end > file_len) {
            return Err(InflightError::PastEof {
                file: file_len,
                offset,
                len: need,
            });
        }
        let map = MmapRegion::from_file(FileOffset::new(file, offset), need as usize)
            .map_err(InflightError::Map)?;
        Ok(InflightRegion {
            map,
            queue_size,
            num_queues,
        })
    }

    pub(crate) fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Queue `index`'s area, if the region has one.
    pub(crate) fn area(&self, index: u16) -> Option<VolatileSlice<'_>> {
        if index >= self.num_queues {
            return None;
        }
        let size = queue_area_size(self.queue_size);
        self.map.get_slice(usize::from(index) * size, size).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An aligned buffer for one queue of `size`.
    fn area_buf(size: u16) -> Vec<u64> {
        vec![0u64; queue_area_size(size) / 8]
    }

    fn slice(buf: &mut [u64]) -> VolatileSlice<'_> {
        // SAFETY: the u64 buffer is viewed as bytes for its whole length.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), buf.len() * 8) };
        VolatileSlice::from(bytes)
    }

    #[test]
    fn sizes_match_libvhost_user() {
        assert_eq!(queue_area_size(128), 2112);
        assert_eq!(queue_area_size(256), 4160);
        assert_eq!(queue_area_size(1), 64);
        for q in 1..=1024u16 {
            assert!(queue_area_size(q) >= HEADER + DESC * usize::from(q));
        }
    }

    #[test]
    fn fresh_area_is_initialised() {
        let mut b = area_buf(8);
        let a = slice(&mut b);
        assert_eq!(
            recover(&a, 8, 5),
            Recovery {
                next_avail: 5,
                resubmit: vec![],
                next_counter: 0
            }
        );
        assert_eq!(load_u16(&a, VERSION), 1);
        assert_eq!(load_u16(&a, DESC_NUM), 8);
        assert_eq!(load_u16(&a, USED_IDX), 5);
    }

    #[test]
    fn unfinished_requests_come_back_oldest_first() {
        let mut b = area_buf(8);
        let a = slice(&mut b);
        recover(&a, 8, 0);
        // Taken in the order 4, 1, 6, 2; 1 completes (used index 1).
        for (c, h) in [4u16, 1, 6, 2].into_iter().enumerate() {
            begin(&a, h, c as u64);
        }
        before_used(&a, 1);
        finish(&a, 1, 1);
        let r = recover(&a, 8, 1);
        assert_eq!(r.resubmit, [4, 6, 2]);
        assert_eq!(r.next_avail, 4);
        assert_eq!(r.next_counter, 4);
        // Recovering again (another crash before any progress) is stable.
        assert_eq!(recover(&a, 8, 1), r);
    }

    #[test]
    fn a_completion_lost_between_used_ring_and_log_is_not_redone() {
        let mut b = area_buf(8);
        let a = slice(&mut b);
        recover(&a, 8, 10);
        begin(&a, 3, 0);
        begin(&a, 7, 1);
        // 7's used entry was published (guest used index 11), then the
        // backend died before `finish`.
        before_used(&a, 7);
        let r = recover(&a, 8, 11);
        assert_eq!(r.resubmit, [3]);
        assert_eq!(r.next_avail, 12);
    }

    #[test]
    fn a_fresh_area_forgets_stale_descriptor_states() {
        // Version 0 with flags set (found by the virtio_blk fuzz target):
        // the first recovery must not leave them for the second.
        let mut b = area_buf(4);
        b[2] = 1; // descriptor 0's inflight byte
        let a = slice(&mut b);
        assert!(recover(&a, 4, 0).resubmit.is_empty());
        assert!(recover(&a, 4, 0).resubmit.is_empty());
    }

    #[test]
    fn hostile_areas_stay_in_bounds() {
        // Every byte 0xff: version set, every flag 0xff (not 1), head 0xffff.
        let mut b = vec![u64::MAX; queue_area_size(4) / 8];
        let r = recover(&slice(&mut b), 4, 0);
        assert!(r.resubmit.is_empty());
        // Too small an area is treated as empty.
        let mut small = vec![0u64; 2];
        assert_eq!(recover(&slice(&mut small), 4, 3).next_avail, 3);
    }

    #[test]
    fn memfd_round_trip_through_map() {
        let (r, file) = InflightRegion::create(2, 128).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 2 * 2112);
        let a = r.area(1).unwrap();
        recover(&a, 128, 0);
        begin(&a, 9, 0);
        // The frontend hands the same fd to the next backend.
        let again = InflightRegion::map(file, 0, 2 * 2112, 2, 128).unwrap();
        assert_eq!(recover(&again.area(1).unwrap(), 128, 0).resubmit, [9]);
        assert!(again.area(2).is_none());
        // Sealed: cannot shrink under a mapping.
        let (_, f) = InflightRegion::create(1, 8).unwrap();
        assert!(f.set_len(0).is_err());
    }

    #[test]
    fn short_or_truncated_areas_are_refused() {
        let (_, file) = InflightRegion::create(1, 128).unwrap();
        assert!(matches!(
            InflightRegion::map(file.try_clone().unwrap(), 0, 100, 1, 128),
            Err(InflightError::TooSmall { .. })
        ));
        assert!(matches!(
            InflightRegion::map(file.try_clone().unwrap(), 0, 2112, 2, 128),
            Err(InflightError::TooSmall { .. })
        ));
        assert!(matches!(
            InflightRegion::map(file, 4096, 2112, 1, 128),
            Err(InflightError::PastEof { .. })
        ));
    }
}
