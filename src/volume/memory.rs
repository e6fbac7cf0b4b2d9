//! A sparse volume in RAM. Pages are allocated on first write and freed by
//! trim, so block status can report holes. Each page has its own lock:
//! connections on different cores only meet when they touch the same page.
//!
//! A group's pages live in one anonymous mapping, reserved when the group
//! is first written and backed by the kernel only where touched, in huge
//! pages where it can: random 4 KiB requests over a big volume otherwise
//! spend more time on TLB misses (two-level walks in a VM) than on copying.

use crate::lock::RwLockExt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{OnceLock, RwLock};
use std::task::Poll;

use thiserror::Error;

use super::{Caps, Ctx, Extent, Io, Op, UnexpectedWake, Volume, VolumeError, Wake};

/// Why a memory volume could not get memory for its pages.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// The anonymous mapping for a page group failed.
    #[error("cannot map {len} bytes for a memory volume")]
    Map {
        /// Bytes asked for.
        len: usize,
        /// What `mmap(2)` said.
        #[source]
        source: std::io::Error,
    },
    /// `mmap` succeeded but returned address 0, which the volume cannot use.
    #[error("mmap returned a null mapping")]
    NullMap,
    /// A page group's slot was empty right after it was filled: a bug,
    /// reported instead of a panic.
    #[error("a memory group vanished after it was set up")]
    GroupVanished,
}

/// Allocation unit.
pub const PAGE: usize = 64 * 1024;
/// Pages per lazily allocated directory group (64 MiB of address space).
const GROUP: usize = 1024;
/// Transparent huge page size on x86-64 and the usual aarch64 setup.
const HUGE: usize = 2 << 20;

/// Whether a page holds data. An unallocated page's bytes are always zero
/// (never touched, or released with MADV_DONTNEED), so allocating it needs
/// no clearing.
type Page = RwLock<bool>;

/// Anonymous memory for one group's pages, aligned to a huge page.
struct Region {
    map: NonNull<u8>,
    map_len: usize,
    data: NonNull<u8>,
}

// SAFETY: the region is plain memory owned by its group, not tied to the
// thread that mapped it.
unsafe impl Send for Region {}
// SAFETY: every access to a page's bytes holds that page's lock, so shared
// references never race.
unsafe impl Sync for Region {}

impl Region {
    fn new(len: usize) -> Result<Self, VolumeError> {
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
        Ok(Region { map, map_len, data })
    }

    /// The bytes of page `index`.
    ///
    /// # Safety
    /// The caller holds that page's lock (write lock for `&mut`), and
    /// `index` is below the group's page count.
    #[allow(clippy::mut_from_ref)]
    unsafe fn page(&self, index: usize) -> &mut [u8] {
        // SAFETY: in bounds by the caller's promise; exclusive or shared as
        // the caller's lock makes it.
        unsafe { std::slice::from_raw_parts_mut(self.data.as_ptr().add(index * PAGE), PAGE) }
    }

    /// Gives page `index` back to the kernel; it reads as zeroes afterwards.
    ///
    /// # Safety
    /// As for [`Region::page`], with the write lock held.
    unsafe fn release(&self, index: usize) {
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
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe { libc::munmap(self.map.as_ptr().cast(), self.map_len) };
    }
}

/// A group's page flags and the memory behind them.
struct Group {
    pages: Box<[Page]>,
    region: Region,
}

/// A sparse in-memory volume.
pub struct MemoryVolume {
    size: u64,
    read_only: bool,
    groups: Box<[OnceLock<Group>]>,
    allocated: AtomicU64,
}

impl MemoryVolume {
    /// An all-zero volume of `size` bytes; costs memory only where written.
    pub fn new(size: u64, read_only: bool) -> Self {
        let pages = size.div_ceil(PAGE as u64);
        let groups = pages.div_ceil(GROUP as u64) as usize;
        MemoryVolume {
            size,
            read_only,
            groups: (0..groups).map(|_| OnceLock::new()).collect(),
            allocated: AtomicU64::new(0),
        }
    }

    /// Bytes of RAM currently holding data.
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }

    /// Pages in group `g`: the last group covers only the volume's tail.
    fn group_pages(&self, g: usize) -> usize {
        let pages = self.size.div_ceil(PAGE as u64);
        (pages - (g * GROUP) as u64).min(GROUP as u64) as usize
    }

    fn group(&self, index: u64) -> Option<&Group> {
        self.groups.get((index / GROUP as u64) as usize)?.get()
    }

    fn group_or_create(&self, index: u64) -> Result<&Group, VolumeError> {
        let g = (index / GROUP as u64) as usize;
        let cell = self.groups.get(g).ok_or(VolumeError::OutOfRange {
            offset: index * PAGE as u64,
            len: PAGE as u64,
        })?;
        if let Some(group) = cell.get() {
            return Ok(group);
        }
        let n = self.group_pages(g);
        let made = Group {
            pages: (0..n).map(|_| RwLock::new(false)).collect(),
            region: Region::new(n * PAGE)?,
        };
        // Losing a race drops our mapping; the winner's is used.
        let _ = cell.set(made);
        cell.get()
            .ok_or_else(|| VolumeError::backend(MemoryError::GroupVanished))
    }

    /// Calls `f(page index, offset in page, offset in request, length)` for
    /// each page the range touches.
    fn spans(offset: u64, len: u64, mut f: impl FnMut(u64, usize, usize, usize)) {
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let in_page = (pos % PAGE as u64) as usize;
            let n = ((PAGE - in_page) as u64).min(len - done) as usize;
            f(pos / PAGE as u64, in_page, done as usize, n);
            done += n as u64;
        }
    }

    fn read(&self, io: &mut Io) {
        let out = &mut io.data;
        Self::spans(io.offset, io.len, |index, at, pos, n| {
            let i = (index % GROUP as u64) as usize;
            let Some(group) = self.group(index) else {
                return out.fill_at(pos, n, 0);
            };
            let Some(lock) = group.pages.get(i) else {
                return out.fill_at(pos, n, 0);
            };
            let allocated = lock.read_locked();
            if *allocated {
                // SAFETY: read lock held; i is within the group.
                out.write_at(pos, &unsafe { group.region.page(i) }[at..at + n]);
            } else {
                out.fill_at(pos, n, 0);
            }
        });
    }

    fn write(&self, io: &Io) -> Result<(), VolumeError> {
        let src = &io.data;
        let mut result = Ok(());
        Self::spans(io.offset, io.len, |index, at, pos, n| {
            if result.is_err() {
                return;
            }
            let i = (index % GROUP as u64) as usize;
            let group = match self.group_or_create(index) {
                Ok(g) => g,
                Err(e) => return result = Err(e),
            };
            let Some(lock) = group.pages.get(i) else {
                return result = Err(VolumeError::OutOfRange {
                    offset: io.offset,
                    len: io.len,
                });
            };
            let mut allocated = lock.write_locked();
            if !*allocated {
                *allocated = true;
                self.allocated.fetch_add(PAGE as u64, Ordering::Relaxed);
            }
            // SAFETY: write lock held; i is within the group.
            let page = unsafe { group.region.page(i) };
            src.read_at(pos, &mut page[at..at + n]);
        });
        result
    }

    /// Zeroes a range: whole pages are freed unless `allocate` is set.
    fn zero(&self, offset: u64, len: u64, allocate: bool) -> Result<(), VolumeError> {
        let mut result = Ok(());
        Self::spans(offset, len, |index, at, _, n| {
            if result.is_err() {
                return;
            }
            let i = (index % GROUP as u64) as usize;
            let group = if allocate {
                match self.group_or_create(index) {
                    Ok(g) => g,
                    Err(e) => return result = Err(e),
                }
            } else {
                match self.group(index) {
                    Some(g) => g,
                    None => return,
                }
            };
            let Some(lock) = group.pages.get(i) else {
                return;
            };
            let mut allocated = lock.write_locked();
            if !*allocated {
                // Already zero; NO_HOLE only has to count it as data.
                if allocate {
                    *allocated = true;
                    self.allocated.fetch_add(PAGE as u64, Ordering::Relaxed);
                }
            } else if n == PAGE && !allocate {
                *allocated = false;
                self.allocated.fetch_sub(PAGE as u64, Ordering::Relaxed);
                // SAFETY: write lock held; i is within the group.
                unsafe { group.region.release(i) };
            } else {
                // SAFETY: write lock held; i is within the group.
                let page = unsafe { group.region.page(i) };
                page[at..at + n].fill(0);
            }
        });
        result
    }

    fn block_status(&self, io: &mut Io) {
        let end = io.offset + io.len;
        let mut pos = io.offset;
        while pos < end && io.extents.len() < super::MAX_EXTENTS {
            let index = pos / PAGE as u64;
            let group = self.group(index);
            // An unallocated group is one hole of up to 64 MiB.
            let span_end = if group.is_none() {
                ((index / GROUP as u64) + 1) * (GROUP * PAGE) as u64
            } else {
                (index + 1) * PAGE as u64
            };
            let hole = group.is_none_or(|g| {
                g.pages
                    .get((index % GROUP as u64) as usize)
                    .is_none_or(|p| !*p.read_locked())
            });
            let len = span_end.min(end) - pos;
            match io.extents.last_mut() {
                Some(last) if last.hole == hole => last.len += len,
                _ => io.extents.push(Extent {
                    len,
                    hole,
                    zero: hole,
                }),
            }
            pos += len;
        }
    }
}

impl Volume for MemoryVolume {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        Caps {
            flush: true,
            fua: true,
            trim: true,
            write_zeroes: true,
            fast_zero: true,
            cache: true,
            multi_conn: true,
            read_only: self.read_only,
        }
    }

    fn describe(&self) -> String {
        format!("memory, {} bytes", self.size)
    }

    fn backend(&self) -> &'static str {
        "memory"
    }

    fn start(&self, io: &mut Io, _ctx: &mut Ctx<'_>) -> Poll<Result<(), VolumeError>> {
        if io.op != Op::Flush && (io.offset > self.size || io.len > self.size - io.offset) {
            return Poll::Ready(Err(VolumeError::OutOfRange {
                offset: io.offset,
                len: io.len,
            }));
        }
        if self.read_only && matches!(io.op, Op::Write | Op::Trim | Op::WriteZeroes) {
            return Poll::Ready(Err(VolumeError::ReadOnly));
        }
        Poll::Ready(match io.op {
            Op::Read => {
                self.read(io);
                Ok(())
            }
            Op::Write => self.write(io),
            Op::Trim => self.zero(io.offset, io.len, false),
            Op::WriteZeroes => self.zero(io.offset, io.len, io.flags.no_hole),
            Op::BlockStatus => {
                self.block_status(io);
                Ok(())
            }
            // RAM has no slower tier to flush to or prefetch from.
            Op::Flush | Op::Cache => Ok(()),
        })
    }

    fn resume(
        &self,
        _io: &mut Io,
        _wake: Wake,
        _ctx: &mut Ctx<'_>,
    ) -> Poll<Result<(), VolumeError>> {
        Poll::Ready(Err(VolumeError::backend(UnexpectedWake {
            backend: "memory",
            got: "a completion",
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::IoFlags;
    use crate::volume::sync::SyncDriver;

    fn status(d: &mut SyncDriver, v: &MemoryVolume, off: u64, len: u64) -> Vec<(u64, bool)> {
        let io = d
            .op(v, Op::BlockStatus, off, len, IoFlags::default())
            .unwrap();
        io.extents.iter().map(|e| (e.len, e.hole)).collect()
    }

    #[test]
    fn sparse_reads_writes_trims() {
        let v = MemoryVolume::new(1 << 30, false);
        let mut d = SyncDriver::new().unwrap();
        assert_eq!(d.read(&v, 12345, 100).unwrap(), vec![0; 100]);
        assert_eq!(v.allocated_bytes(), 0);
        // A write spanning a page boundary allocates two pages.
        let data: Vec<u8> = (0..10_000).map(|i| i as u8).collect();
        d.write(&v, PAGE as u64 - 5000, &data, false).unwrap();
        assert_eq!(v.allocated_bytes(), 2 * PAGE as u64);
        assert_eq!(d.read(&v, PAGE as u64 - 5000, 10_000).unwrap(), data);
        let page = PAGE as u64;
        assert_eq!(
            status(&mut d, &v, 0, 4 * page),
            [(2 * page, false), (2 * page, true)]
        );
        // Trim of a partial page zeroes; of a whole page frees.
        d.op(&v, Op::Trim, PAGE as u64 - 100, 100, IoFlags::default())
            .unwrap();
        assert_eq!(d.read(&v, PAGE as u64 - 100, 100).unwrap(), vec![0; 100]);
        assert_eq!(v.allocated_bytes(), 2 * PAGE as u64);
        d.op(&v, Op::Trim, PAGE as u64, PAGE as u64, IoFlags::default())
            .unwrap();
        assert_eq!(v.allocated_bytes(), PAGE as u64);
        assert_eq!(
            status(&mut d, &v, 0, 4 * PAGE as u64),
            [(PAGE as u64, false), (3 * PAGE as u64, true)]
        );
        // A freed page reads as zeroes and takes new data.
        assert_eq!(d.read(&v, page, 5000).unwrap(), vec![0; 5000]);
        d.write(&v, page + 7, b"again", false).unwrap();
        let mut want = vec![0u8; 16];
        want[7..12].copy_from_slice(b"again");
        assert_eq!(d.read(&v, page, 16).unwrap(), want);
        assert_eq!(v.allocated_bytes(), 2 * PAGE as u64);
        d.op(&v, Op::Trim, page, page, IoFlags::default()).unwrap();
        // Zeroing with NO_HOLE keeps the range allocated.
        d.op(
            &v,
            Op::WriteZeroes,
            3 * PAGE as u64,
            10,
            IoFlags {
                no_hole: true,
                ..IoFlags::default()
            },
        )
        .unwrap();
        assert_eq!(v.allocated_bytes(), 2 * PAGE as u64);
        assert_eq!(d.read(&v, 3 * PAGE as u64, 10).unwrap(), vec![0; 10]);
    }

    #[test]
    fn guest_buffers_split_anywhere_read_and_write_in_place() {
        let v = MemoryVolume::new(1 << 20, false);
        let mut d = SyncDriver::new().unwrap();
        // Pieces of odd lengths, with gaps, crossing a 64 KiB page.
        let mut guest: Vec<u8> = (0..20_000u32).map(|i| (i * 7 + 1) as u8).collect();
        let pieces = [(3, 1000), (1500, 1), (2000, 7777), (12_000, 5000)];
        let off = PAGE as u64 - 4321;
        d.run_guest(&v, Op::Write, off, IoFlags::default(), &mut guest, &pieces)
            .unwrap();
        let want: Vec<u8> = pieces
            .iter()
            .flat_map(|&(at, n)| guest[at..at + n].to_vec())
            .collect();
        assert_eq!(d.read(&v, off, want.len()).unwrap(), want);
        // Read back into other pieces; the gaps between them stay as they were.
        let mut back = vec![0xaau8; 20_000];
        let into = [(0, 13_778)];
        d.run_guest(&v, Op::Read, off, IoFlags::default(), &mut back, &into)
            .unwrap();
        assert_eq!(&back[..13_778], &want[..]);
        assert!(back[13_778..].iter().all(|&b| b == 0xaa));
        // A read of holes zeroes the guest's buffers.
        let mut holes = vec![0xffu8; 9000];
        d.run_guest(
            &v,
            Op::Read,
            1 << 19,
            IoFlags::default(),
            &mut holes,
            &[(10, 100), (500, 8000)],
        )
        .unwrap();
        assert!(holes[10..110].iter().all(|&b| b == 0));
        assert!(holes[500..8500].iter().all(|&b| b == 0));
        assert!(holes[110..500].iter().all(|&b| b == 0xff));
    }

    #[test]
    fn unwritten_groups_are_one_hole_and_bounds_are_checked() {
        let v = MemoryVolume::new(1 << 40, false);
        let mut d = SyncDriver::new().unwrap();
        assert_eq!(status(&mut d, &v, 0, 1 << 40), [(1 << 40, true)]);
        d.write(&v, (1 << 40) - 1, b"z", true).unwrap();
        assert_eq!(d.read(&v, (1 << 40) - 2, 2).unwrap(), b"\0z");
        assert!(matches!(
            d.read(&v, 1 << 40, 1),
            Err(VolumeError::OutOfRange { .. })
        ));
        let ro = MemoryVolume::new(4096, true);
        assert!(matches!(
            d.write(&ro, 0, b"x", false),
            Err(VolumeError::ReadOnly)
        ));
        assert!(ro.caps().read_only);
    }

    /// Threads share pages but each owns its own 4 KiB blocks, so every
    /// read has one right answer however the page locks interleave.
    #[test]
    fn threads_sharing_pages_keep_their_own_blocks() {
        const THREADS: u64 = 4;
        const BLOCK: u64 = 4096;
        let v = std::sync::Arc::new(MemoryVolume::new(3 * (GROUP * PAGE) as u64 / 2, false));
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let v = v.clone();
                std::thread::spawn(move || {
                    let mut d = SyncDriver::new().unwrap();
                    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                    let mut next = move || {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        seed
                    };
                    // 6 MiB either side of the first group's end, so the
                    // second group's creation races too.
                    let base = (GROUP * PAGE) as u64 / BLOCK - 1536;
                    let mut mine = std::collections::HashMap::new();
                    for _ in 0..4000 {
                        let b = base + (next() % (3072 / THREADS)) * THREADS + t;
                        let off = b * BLOCK;
                        match next() % 4 {
                            0 | 1 => {
                                let fill = (next() % 255 + 1) as u8;
                                d.write(&*v, off, &vec![fill; BLOCK as usize], false)
                                    .unwrap();
                                mine.insert(b, fill);
                            }
                            2 => {
                                d.op(&*v, Op::WriteZeroes, off, BLOCK, IoFlags::default())
                                    .unwrap();
                                mine.insert(b, 0);
                            }
                            _ => {
                                let want = mine.get(&b).copied().unwrap_or(0);
                                assert_eq!(
                                    d.read(&*v, off, BLOCK as usize).unwrap(),
                                    vec![want; BLOCK as usize]
                                );
                            }
                        }
                    }
                    mine
                })
            })
            .collect();
        let mut d = SyncDriver::new().unwrap();
        for w in workers {
            for (b, fill) in w.join().unwrap() {
                assert_eq!(
                    d.read(&*v, b * BLOCK, BLOCK as usize).unwrap(),
                    vec![fill; BLOCK as usize]
                );
            }
        }
        // Whole-page trims free pages: everything reads back as zeroes.
        d.op(&*v, Op::Trim, 0, v.size, IoFlags::default()).unwrap();
        assert_eq!(v.allocated_bytes(), 0);
        // ...and stay zero when written again (one byte per page).
        let written = (GROUP * PAGE) as u64 - 1536 * BLOCK;
        let len = 3072 * BLOCK;
        for page in (written..written + len).step_by(PAGE) {
            d.write(&*v, page, b"x", false).unwrap();
        }
        let back = d.read(&*v, written, len as usize).unwrap();
        for (i, &x) in back.iter().enumerate() {
            assert_eq!(x, if i % PAGE == 0 { b'x' } else { 0 }, "byte {i}");
        }
    }
}
