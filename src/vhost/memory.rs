//! The guest's memory as the frontend shares it: regions of its RAM fds,
//! mapped here, indexed by guest-physical address for the data path and
//! by the frontend's own virtual addresses for translating ring addresses.
//!
//! Queues hold a [`SharedRam`] and load the current map per batch (no
//! lock: `GuestMemoryAtomic` swaps an `Arc`); a replaced map stays mapped
//! until the last batch or request holding it lets go.

use std::fs::File;
use std::io;

use vm_memory::mmap::MmapRegionError;
use vm_memory::{
    FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
    GuestRegionCollectionError, GuestRegionMmap, MmapRegion,
};

/// The guest memory type of the data path.
pub(crate) type GuestRam = GuestMemoryMmap<()>;
/// The current map, swapped atomically when the frontend changes it.
pub(crate) type SharedRam = GuestMemoryAtomic<GuestRam>;

/// Regions one device maps at most (GET_MAX_MEM_SLOTS): QEMU needs a few
/// (RAM below and above 4 GiB, hot-plugged DIMMs).
pub(crate) const MAX_MEM_SLOTS: usize = 32;

/// One region as the frontend describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RegionSpec {
    /// Where the region starts in the guest's physical addresses.
    pub(crate) guest_phys_addr: u64,
    /// Bytes.
    pub(crate) size: u64,
    /// Where the region sits in the frontend's address space; ring
    /// addresses arrive in these terms.
    pub(crate) user_addr: u64,
    /// Where the region starts in its fd.
    pub(crate) mmap_offset: u64,
}

/// Why a memory table is refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MemoryError {
    #[error("{0} memory regions (at most {MAX_MEM_SLOTS})")]
    TooMany(usize),
    #[error("memory region {0:x?} is empty or wraps around")]
    Invalid(RegionSpec),
    #[error("memory region {0:x?} overlaps another in the frontend's address space")]
    UserOverlap(RegionSpec),
    #[error("memory region {spec:x?}: its fd holds only {file_len} bytes")]
    PastEof { spec: RegionSpec, file_len: u64 },
    #[error("memory region {0:x?}: reading its fd's size")]
    Stat(RegionSpec, #[source] io::Error),
    #[error("memory region {0:x?}: mapping it")]
    Map(RegionSpec, #[source] MmapRegionError),
    #[error("memory regions overlap or cannot be combined")]
    Layout(#[source] GuestRegionCollectionError),
    #[error("no memory region at {0:#x}+{1:#x} to remove")]
    NotFound(u64, u64),
    #[error("address {0:#x} is in no memory region the frontend shared")]
    Unmapped(u64),
    #[error("the guest memory lock is poisoned")]
    Poisoned,
}

/// The frontend's memory table and its mapping.
#[derive(Debug)]
pub(crate) struct MemoryTable {
    specs: Vec<RegionSpec>,
    ram: SharedRam,
}

impl Default for MemoryTable {
    fn default() -> Self {
        MemoryTable {
            specs: Vec::new(),
            ram: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        }
    }
}

fn user_end(s: &RegionSpec) -> u64 {
    s.user_addr.saturating_add(s.size)
}

fn map(spec: RegionSpec, file: File) -> Result<GuestRegionMmap<()>, MemoryError> {
    if spec.size == 0
        || spec.guest_phys_addr.checked_add(spec.size).is_none()
        || spec.user_addr.checked_add(spec.size).is_none()
        || usize::try_from(spec.size).is_err()
    {
        return Err(MemoryError::Invalid(spec));
    }
    // Touching a mapping past the end of its file is SIGBUS: check first.
    let file_len = file
        .metadata()
        .map_err(|e| MemoryError::Stat(spec, e))?
        .len();
    if spec
        .mmap_offset
        .checked_add(spec.size)
        .is_none_or(|end| end > file_len)
    {
        return Err(MemoryError::PastEof { spec, file_len });
    }
    let region = MmapRegion::from_file(FileOffset::new(file, spec.mmap_offset), spec.size as usize)
        .map_err(|e| MemoryError::Map(spec, e))?;
    GuestRegionMmap::new(region, GuestAddress(spec.guest_phys_addr))
        .ok_or(MemoryError::Invalid(spec))
}

/// Refuses a region that overlaps another in the frontend's addresses
/// (guest-physical overlaps are refused by the region collection).
fn check_user_overlap(specs: &[RegionSpec], new: &RegionSpec) -> Result<(), MemoryError> {
    if specs
        .iter()
        .any(|s| s.user_addr < user_end(new) && new.user_addr < user_end(s))
    {
        return Err(MemoryError::UserOverlap(*new));
    }
    Ok(())
}

impl MemoryTable {
    /// The map queues read guest memory through.
    pub(crate) fn shared(&self) -> SharedRam {
        self.ram.clone()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    fn publish(&mut self, map: GuestRam, specs: Vec<RegionSpec>) -> Result<(), MemoryError> {
        self.ram
            .lock()
            .map_err(|_| MemoryError::Poisoned)?
            .replace(map);
        self.specs = specs;
        Ok(())
    }

    /// Replaces the whole table (SET_MEM_TABLE). Nothing changes if any
    /// region is refused.
    pub(crate) fn set(
        &mut self,
        regions: &[RegionSpec],
        files: Vec<File>,
    ) -> Result<(), MemoryError> {
        if regions.len() > MAX_MEM_SLOTS {
            return Err(MemoryError::TooMany(regions.len()));
        }
        let mut specs = Vec::with_capacity(regions.len());
        let mut mapped = Vec::with_capacity(regions.len());
        for (spec, file) in regions.iter().zip(files) {
            check_user_overlap(&specs, spec)?;
            mapped.push(map(*spec, file)?);
            specs.push(*spec);
        }
        let ram = GuestMemoryMmap::from_regions(mapped).map_err(MemoryError::Layout)?;
        self.publish(ram, specs)
    }

    /// Adds one region (ADD_MEM_REG).
    pub(crate) fn add(&mut self, spec: RegionSpec, file: File) -> Result<(), MemoryError> {
        if self.specs.len() >= MAX_MEM_SLOTS {
            return Err(MemoryError::TooMany(self.specs.len() + 1));
        }
        check_user_overlap(&self.specs, &spec)?;
        let region = map(spec, file)?;
        let ram = self
            .ram
            .memory()
            .insert_region(region.into())
            .map_err(MemoryError::Layout)?;
        let mut specs = self.specs.clone();
        specs.push(spec);
        self.publish(ram, specs)
    }

    /// Removes the region at `guest_phys_addr` of `size` (REM_MEM_REG).
    pub(crate) fn remove(&mut self, guest_phys_addr: u64, size: u64) -> Result<(), MemoryError> {
        let (ram, _) = self
            .ram
            .memory()
            .remove_region(GuestAddress(guest_phys_addr), size)
            .map_err(|_| MemoryError::NotFound(guest_phys_addr, size))?;
        let specs = self
            .specs
            .iter()
            .copied()
            .filter(|s| !(s.guest_phys_addr == guest_phys_addr && s.size == size))
            .collect();
        self.publish(ram, specs)
    }

    /// Forgets every region (the frontend went away or reset).
    pub(crate) fn clear(&mut self) {
        let _ = self.publish(GuestMemoryMmap::new(), Vec::new());
    }

    /// The guest address behind the frontend's virtual address `user_addr`.
    pub(crate) fn to_guest(&self, user_addr: u64) -> Result<GuestAddress, MemoryError> {
        self.specs
            .iter()
            .find(|s| s.user_addr <= user_addr && user_addr < user_end(s))
            .map(|s| GuestAddress(user_addr - s.user_addr + s.guest_phys_addr))
            .ok_or(MemoryError::Unmapped(user_addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    fn memfd(len: u64) -> File {
        // SAFETY: literal name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"vbd-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor we own.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    fn spec(gpa: u64, size: u64, user: u64) -> RegionSpec {
        RegionSpec {
            guest_phys_addr: gpa,
            size,
            user_addr: user,
            mmap_offset: 0,
        }
    }

    #[test]
    fn table_maps_translates_and_shares_memory_with_the_fd() {
        let mut t = MemoryTable::default();
        let f = memfd(0x20000);
        let other = f.try_clone().unwrap();
        t.set(
            &[spec(0, 0x10000, 0x7000_0000), {
                let mut s = spec(0x100000, 0x10000, 0x7100_0000);
                s.mmap_offset = 0x10000;
                s
            }],
            vec![f, other.try_clone().unwrap()],
        )
        .unwrap();
        assert_eq!(t.to_guest(0x7100_0010).unwrap(), GuestAddress(0x100010));
        assert!(matches!(
            t.to_guest(0x6000_0000),
            Err(MemoryError::Unmapped(_))
        ));
        // A write through the fd shows in the guest map at the right place.
        std::os::unix::fs::FileExt::write_at(&other, b"hello", 0x10000 + 5).unwrap();
        let mut b = [0u8; 5];
        t.shared()
            .memory()
            .read_slice(&mut b, GuestAddress(0x100005))
            .unwrap();
        assert_eq!(&b, b"hello");
    }

    #[test]
    fn overlapping_short_and_excess_regions_are_refused_and_change_nothing() {
        let mut t = MemoryTable::default();
        t.set(&[spec(0, 0x1000, 0x1000)], vec![memfd(0x1000)])
            .unwrap();
        // Guest-physical overlap.
        let e = t.set(
            &[spec(0, 0x2000, 0x10000), spec(0x1000, 0x1000, 0x20000)],
            vec![memfd(0x2000), memfd(0x1000)],
        );
        assert!(matches!(e, Err(MemoryError::Layout(_))), "{e:?}");
        // Frontend-address overlap.
        let e = t.set(
            &[spec(0, 0x2000, 0x10000), spec(0x4000, 0x1000, 0x11000)],
            vec![memfd(0x2000), memfd(0x1000)],
        );
        assert!(matches!(e, Err(MemoryError::UserOverlap(_))), "{e:?}");
        // An fd shorter than the region.
        let e = t.set(&[spec(0, 0x2000, 0x10000)], vec![memfd(0x1000)]);
        assert!(matches!(e, Err(MemoryError::PastEof { .. })), "{e:?}");
        let e = t.set(&[spec(0, 0, 0x10000)], vec![memfd(0x1000)]);
        assert!(matches!(e, Err(MemoryError::Invalid(_))), "{e:?}");
        let many: Vec<_> = (0..33)
            .map(|i| spec(i * 0x1000, 0x1000, i * 0x1000))
            .collect();
        let files = (0..33).map(|_| memfd(0x1000)).collect();
        assert!(matches!(t.set(&many, files), Err(MemoryError::TooMany(33))));
        // The first table is still in force.
        assert_eq!(t.to_guest(0x1800).unwrap(), GuestAddress(0x800));
        assert_eq!(t.shared().memory().num_regions(), 1);
    }

    #[test]
    fn regions_come_and_go_one_at_a_time() {
        let mut t = MemoryTable::default();
        t.add(spec(0, 0x1000, 0x10000), memfd(0x1000)).unwrap();
        t.add(spec(0x2000, 0x1000, 0x20000), memfd(0x1000)).unwrap();
        assert!(matches!(
            t.add(spec(0x2800, 0x1000, 0x30000), memfd(0x1000)),
            Err(MemoryError::Layout(_))
        ));
        assert_eq!(t.shared().memory().num_regions(), 2);
        t.remove(0, 0x1000).unwrap();
        assert!(matches!(
            t.remove(0, 0x1000),
            Err(MemoryError::NotFound(0, 0x1000))
        ));
        assert!(t.to_guest(0x10000).is_err());
        assert_eq!(t.to_guest(0x20004).unwrap(), GuestAddress(0x2004));
        t.clear();
        assert!(t.is_empty());
        assert_eq!(t.shared().memory().num_regions(), 0);
    }
}
