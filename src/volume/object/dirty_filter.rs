//! Which parts of the volume the write-ahead layer may hold blocks of: a
//! counting filter over 64 KiB regions, so that a read of blocks no record
//! waiting for upload touches skips the write-ahead layer's lock. That lock
//! is what every write takes; a reactor that finds it held sleeps, and on a
//! busy host may not run again for milliseconds, so reads meeting writes
//! there made the volume slower with more connections, not faster.
//!
//! Every record counts once in each slot its regions hash to, from its
//! append (under the lock, before its blocks enter the write-ahead layer)
//! until its segment is published to the map (after its blocks left the
//! write-ahead layer). A slot at zero therefore means no record in the
//! write-ahead layer touches any region hashing there; collisions only
//! send a read to the lock for nothing. Records longer than `WIDE_REGIONS`
//! regions (big trims) count in one volume-wide counter instead, which
//! sends every read to the lock while they wait.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Blocks per region (64 KiB).
const REGION_BLOCKS_LOG2: u32 = 4;
/// Slots: 2^15 counters, 128 KiB per writable volume.
const SLOTS_LOG2: u32 = 15;
/// Records spanning more regions than this count as volume-wide.
const WIDE_REGIONS: u64 = 256;

/// The filter.
pub(super) struct DirtyFilter {
    slots: Box<[AtomicU32]>,
    wide: AtomicU64,
}

impl DirtyFilter {
    /// A filter for a writable volume; a read-only one (nothing is ever
    /// appended) needs no slots.
    pub(super) fn new(writable: bool) -> DirtyFilter {
        let n = if writable { 1usize << SLOTS_LOG2 } else { 0 };
        DirtyFilter {
            slots: (0..n).map(|_| AtomicU32::new(0)).collect(),
            wide: AtomicU64::new(0),
        }
    }

    fn slot(&self, region: u64) -> Option<&AtomicU32> {
        let h = region.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - SLOTS_LOG2);
        self.slots.get(h as usize)
    }

    /// Regions of blocks [lba, lba + blocks), or `None` if too many.
    fn regions(lba: u64, blocks: u64) -> Option<std::ops::Range<u64>> {
        let first = lba >> REGION_BLOCKS_LOG2;
        let last = (lba + blocks.max(1) - 1) >> REGION_BLOCKS_LOG2;
        (last - first < WIDE_REGIONS).then_some(first..last + 1)
    }

    /// Counts a record of `blocks` blocks at `lba` in.
    pub(super) fn add(&self, lba: u64, blocks: u64) {
        match Self::regions(lba, blocks) {
            Some(rs) => rs.for_each(|r| {
                if let Some(s) = self.slot(r) {
                    s.fetch_add(1, Ordering::Release);
                }
            }),
            None => {
                self.wide.fetch_add(1, Ordering::Release);
            }
        }
    }

    /// Counts a record out again (its blocks are in the map now).
    pub(super) fn remove(&self, lba: u64, blocks: u64) {
        match Self::regions(lba, blocks) {
            Some(rs) => rs.for_each(|r| {
                if let Some(s) = self.slot(r) {
                    s.fetch_sub(1, Ordering::Release);
                }
            }),
            None => {
                self.wide.fetch_sub(1, Ordering::Release);
            }
        }
    }

    /// Whether no record waiting for upload touches blocks [lba, end).
    pub(super) fn clean(&self, lba: u64, end: u64) -> bool {
        if self.wide.load(Ordering::Acquire) != 0 {
            return false;
        }
        match Self::regions(lba, end - lba) {
            Some(mut rs) => rs.all(|r| self.slot(r).is_none_or(|s| s.load(Ordering::Acquire) == 0)),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_is_clean_until_a_record_touches_it_and_again_after() {
        let f = DirtyFilter::new(true);
        assert!(f.clean(0, 4096));
        f.add(100, 1);
        assert!(!f.clean(96, 97), "same region");
        assert!(!f.clean(0, 200));
        assert!(f.clean(112, 128), "the next region");
        f.add(100, 40);
        f.remove(100, 1);
        assert!(!f.clean(130, 131), "the longer record reaches region 8");
        f.remove(100, 40);
        assert!(f.clean(0, 4096));
        // A huge trim dirties everything while it waits.
        f.add(0, 1 << 30);
        assert!(!f.clean(5, 6));
        f.remove(0, 1 << 30);
        assert!(f.clean(5, 6));
        // So does a read too long to check region by region.
        assert!(!f.clean(0, 1 << 30));
        // A read-only volume never has anything waiting.
        let ro = DirtyFilter::new(false);
        assert!(ro.clean(0, 64));
    }
}
