//! A sparse volume in RAM. Pages are allocated on first write and freed by
//! trim, so block status can report holes. Each page has its own lock:
//! connections on different cores only meet when they touch the same page.
//!
//! A group's pages live in one anonymous mapping (`region`), reserved when
//! the group is first written and backed by the kernel only where touched,
//! in huge pages where it can: random 4 KiB requests over a big volume
//! otherwise spend more time on TLB misses (two-level walks in a VM) than
//! on copying. The first touch of a huge page costs the kernel a fault
//! that zeroes 2 MiB (and may compact memory to find them): a sequential
//! writer has that done ahead of it by the populator thread (`populate`),
//! so its first pass copies into backed memory like a rewrite.

mod populate;
mod region;

use crate::lock::RwLockExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::task::Poll;

use thiserror::Error;

use super::{Caps, Ctx, Extent, Io, Op, UnexpectedWake, Volume, VolumeError, Wake};
use populate::{AHEAD, Populator};
use region::{HUGE, Region};

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
/// A write that faults in an extent within this many bytes of its start,
/// with the extent before it backed, looks sequential.
const RUN_START: u64 = 256 << 10;

/// Whether a page holds data. An unallocated page's bytes are always zero
/// (never touched, or released with MADV_DONTNEED), so allocating it needs
/// no clearing.
type Page = RwLock<bool>;

/// A group's page flags and the memory behind them.
struct Group {
    pages: Box<[Page]>,
    region: Region,
}

/// The volume's groups, shared with its populator thread.
struct Groups {
    size: u64,
    groups: Box<[OnceLock<Group>]>,
}

impl Groups {
    /// Pages in group `g`: the last group covers only the volume's tail.
    fn group_pages(&self, g: usize) -> usize {
        let pages = self.size.div_ceil(PAGE as u64);
        (pages - (g * GROUP) as u64).min(GROUP as u64) as usize
    }

    /// Extents (huge pages) in a full group.
    fn extents_per_group(&self) -> u64 {
        (GROUP * PAGE / HUGE) as u64
    }

    /// The group holding page `index`, if it has been written.
    fn group(&self, index: u64) -> Option<&Group> {
        self.groups.get((index / GROUP as u64) as usize)?.get()
    }

    /// Whether the kernel has backed volume-wide extent `e`.
    fn populated(&self, e: u64) -> bool {
        let per_group = self.extents_per_group();
        let group = self
            .groups
            .get((e / per_group) as usize)
            .and_then(|c| c.get());
        group.is_some_and(|g| g.region.is_populated((e % per_group) as usize))
    }

    /// Group `g`, made if it is new; None past the end of the volume.
    fn get_or_create(&self, g: u64) -> Result<Option<&Group>, VolumeError> {
        let Some(cell) = self.groups.get(g as usize) else {
            return Ok(None);
        };
        if let Some(group) = cell.get() {
            return Ok(Some(group));
        }
        let n = self.group_pages(g as usize);
        let made = Group {
            pages: (0..n).map(|_| RwLock::new(false)).collect(),
            region: Region::new(n * PAGE)?,
        };
        // Losing a race drops our mapping; the winner's is used.
        let _ = cell.set(made);
        cell.get()
            .map(Some)
            .ok_or_else(|| VolumeError::backend(MemoryError::GroupVanished))
    }

    /// The group holding page `index`, made if it is new.
    fn group_or_create(&self, index: u64) -> Result<&Group, VolumeError> {
        self.get_or_create(index / GROUP as u64)?
            .ok_or(VolumeError::OutOfRange {
                offset: index * PAGE as u64,
                len: PAGE as u64,
            })
    }
}

/// A sparse in-memory volume.
pub struct MemoryVolume {
    size: u64,
    read_only: bool,
    groups: Arc<Groups>,
    allocated: AtomicU64,
    /// Started on the first write that needs memory backed.
    populator: OnceLock<Option<Populator>>,
}

impl MemoryVolume {
    /// An all-zero volume of `size` bytes; costs memory only where written.
    pub fn new(size: u64, read_only: bool) -> Self {
        let pages = size.div_ceil(PAGE as u64);
        let groups = pages.div_ceil(GROUP as u64) as usize;
        MemoryVolume {
            size,
            read_only,
            groups: Arc::new(Groups {
                size,
                groups: (0..groups).map(|_| OnceLock::new()).collect(),
            }),
            allocated: AtomicU64::new(0),
            populator: OnceLock::new(),
        }
    }

    /// Bytes of RAM currently holding data.
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }

    /// Before a write to `io`: keeps a sequential writer's next extents
    /// backed ahead of it. A write that enters an extent populated ahead
    /// asks for one more; a write that faults a new extent in (this core
    /// takes that fault, as it always did) right at its start, after a
    /// backed extent, starts a run. Random first writes start nothing, so
    /// a sparse volume stays sparse. Never waits.
    fn look_ahead(&self, io: &Io) -> Result<(), VolumeError> {
        if io.len == 0 {
            return Ok(());
        }
        let huge = HUGE as u64;
        let per_group = self.groups.extents_per_group();
        let (first, last) = (io.offset / huge, (io.offset + io.len - 1) / huge);
        let mut run = false;
        for e in first..=last {
            let Some(group) = self.groups.get_or_create(e / per_group)? else {
                break;
            };
            let local = (e % per_group) as usize;
            if group.region.take_ahead(local) {
                run = true;
            } else if !group.region.is_populated(local) {
                // Faulted in by this write; sequential if it starts the extent.
                group.region.touched(local);
                let at = if e == first { io.offset % huge } else { 0 };
                run |= at < RUN_START && e > 0 && self.groups.populated(e - 1);
            }
        }
        if run {
            let populator = self
                .populator
                .get_or_init(|| Populator::start(self.groups.clone()));
            if let Some(p) = populator {
                p.send(last + 1..last + 1 + AHEAD);
            }
        }
        Ok(())
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
            let Some(group) = self.groups.group(index) else {
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
            let group = match self.groups.group_or_create(index) {
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
                match self.groups.group_or_create(index) {
                    Ok(g) => g,
                    Err(e) => return result = Err(e),
                }
            } else {
                match self.groups.group(index) {
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
            let group = self.groups.group(index);
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
        Caps::full(self.read_only)
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
        if io.op == Op::Write
            && let Err(e) = self.look_ahead(io)
        {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(self.run(io))
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

impl MemoryVolume {
    /// Runs a request whose range is checked.
    fn run(&self, io: &mut Io) -> Result<(), VolumeError> {
        match io.op {
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::IoFlags;
    use crate::volume::sync::SyncDriver;
    use std::time::{Duration, Instant};

    fn wait_populated(v: &MemoryVolume, extents: std::ops::Range<u64>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !extents.clone().all(|e| v.groups.populated(e)) {
            assert!(
                Instant::now() < deadline,
                "extents {extents:?} never populated"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn sequential_writers_find_memory_backed_ahead_and_random_ones_do_not() {
        let huge = HUGE as u64;
        let per_group = (GROUP * PAGE / HUGE) as u64;
        // Two groups, so the writer crosses into a group the populator made.
        let v = MemoryVolume::new(2 * per_group * huge, false);
        let mut d = SyncDriver::new().unwrap();
        // A random first write faults its extent in and starts nothing.
        d.write(&v, 50 * huge + 12_345, &[3; 4096], false).unwrap();
        assert!(v.groups.populated(50));
        // Sequential: extent 1 entered at its start after extent 0 starts
        // a run: the next AHEAD extents get backed off this thread...
        d.write(&v, 0, &[1; 4096], false).unwrap();
        d.write(&v, 4096, &[2; 4096], false).unwrap();
        assert!(v.groups.populated(0) && !v.groups.populated(2));
        d.write(&v, huge, &[4; 4096], false).unwrap();
        wait_populated(&v, 2..2 + AHEAD);
        // ...and each extent entered asks for one more, across the group end.
        for e in 2..per_group + 2 {
            assert!(v.groups.populated(e), "extent {e} was not ready");
            d.write(&v, e * huge, &vec![e as u8; 4096], false).unwrap();
            wait_populated(&v, e + 1..(e + 1 + AHEAD).min(2 * per_group));
        }
        // The random write's neighbours were never asked for (the thread
        // works in order, so a request for them would be done by now).
        assert!(!v.groups.populated(51) && !v.groups.populated(49));
        // The data all landed where it was written, and nothing else did.
        assert_eq!(d.read(&v, 0, 4096).unwrap(), vec![1; 4096]);
        assert_eq!(d.read(&v, 4096, 4096).unwrap(), vec![2; 4096]);
        assert_eq!(d.read(&v, 8192, 4096).unwrap(), vec![0; 4096]);
        assert_eq!(d.read(&v, 50 * huge + 12_345, 4096).unwrap(), vec![3; 4096]);
        assert_eq!(d.read(&v, huge, 4096).unwrap(), vec![4; 4096]);
        for e in 2..per_group + 2 {
            assert_eq!(d.read(&v, e * huge, 4096).unwrap(), vec![e as u8; 4096]);
        }
        // Backed ahead but never written: still a hole, reading as zeroes.
        let beyond = (per_group + 3) * huge;
        assert_eq!(d.read(&v, beyond, 4096).unwrap(), vec![0; 4096]);
        assert_eq!(
            status(&mut d, &v, beyond, PAGE as u64),
            [(PAGE as u64, true)]
        );
        // A trimmed page goes back to the kernel: its extent is no longer
        // counted as backed, and the page reads as new data over zeroes.
        d.op(&v, Op::Trim, 0, PAGE as u64, IoFlags::default())
            .unwrap();
        assert!(!v.groups.populated(0));
        d.write(&v, 8192, &[5; 4096], false).unwrap();
        let mut want = vec![0u8; PAGE];
        want[8192..12288].fill(5);
        assert_eq!(d.read(&v, 0, PAGE).unwrap(), want);
    }

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
