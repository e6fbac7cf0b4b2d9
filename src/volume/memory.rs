//! A sparse volume in RAM. Pages are allocated on first write and freed by
//! trim, so block status can report holes. Each page has its own lock:
//! connections on different cores only meet when they touch the same page.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{OnceLock, RwLock};
use std::task::Poll;

use super::{Caps, Ctx, Extent, Io, Op, Volume, VolumeError, Wake};

/// Allocation unit.
pub const PAGE: usize = 64 * 1024;
/// Pages per lazily allocated directory group (64 MiB of address space).
const GROUP: usize = 1024;

type Page = RwLock<Option<Box<[u8]>>>;

/// A sparse in-memory volume.
pub struct MemoryVolume {
    size: u64,
    read_only: bool,
    groups: Box<[OnceLock<Box<[Page]>>]>,
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

    fn page(&self, index: u64) -> Option<&Page> {
        let g = self.groups.get((index / GROUP as u64) as usize)?.get()?;
        g.get((index % GROUP as u64) as usize)
    }

    fn page_or_create(&self, index: u64) -> Option<&Page> {
        let g = self
            .groups
            .get((index / GROUP as u64) as usize)?
            .get_or_init(|| (0..GROUP).map(|_| RwLock::new(None)).collect());
        g.get((index % GROUP as u64) as usize)
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
        let out = io.buf.as_mut_slice();
        Self::spans(io.offset, io.len, |index, at, pos, n| {
            let dst = &mut out[pos..pos + n];
            match self.page(index) {
                Some(page) => match &*page.read().unwrap_or_else(|e| e.into_inner()) {
                    Some(data) => dst.copy_from_slice(&data[at..at + n]),
                    None => dst.fill(0),
                },
                None => dst.fill(0),
            }
        });
    }

    fn write(&self, io: &Io) -> Result<(), VolumeError> {
        let src = io.buf.as_slice();
        let mut result = Ok(());
        Self::spans(io.offset, io.len, |index, at, pos, n| {
            let Some(page) = self.page_or_create(index) else {
                result = Err(VolumeError::OutOfRange {
                    offset: io.offset,
                    len: io.len,
                });
                return;
            };
            let mut guard = page.write().unwrap_or_else(|e| e.into_inner());
            let data = guard.get_or_insert_with(|| {
                self.allocated.fetch_add(PAGE as u64, Ordering::Relaxed);
                vec![0u8; PAGE].into_boxed_slice()
            });
            data[at..at + n].copy_from_slice(&src[pos..pos + n]);
        });
        result
    }

    /// Zeroes a range: whole pages are freed unless `allocate` is set.
    fn zero(&self, offset: u64, len: u64, allocate: bool) {
        Self::spans(offset, len, |index, at, _, n| {
            let page = if allocate {
                self.page_or_create(index)
            } else {
                self.page(index)
            };
            let Some(page) = page else { return };
            let mut guard = page.write().unwrap_or_else(|e| e.into_inner());
            if n == PAGE && !allocate {
                if guard.take().is_some() {
                    self.allocated.fetch_sub(PAGE as u64, Ordering::Relaxed);
                }
            } else if let Some(data) = guard.as_mut() {
                data[at..at + n].fill(0);
            } else if allocate {
                self.allocated.fetch_add(PAGE as u64, Ordering::Relaxed);
                *guard = Some(vec![0u8; PAGE].into_boxed_slice());
            }
        });
    }

    fn block_status(&self, io: &mut Io) {
        let end = io.offset + io.len;
        let mut pos = io.offset;
        while pos < end && io.extents.len() < super::MAX_EXTENTS {
            let index = pos / PAGE as u64;
            let group_missing = self
                .groups
                .get((index / GROUP as u64) as usize)
                .is_none_or(|g| g.get().is_none());
            // An unallocated group is one hole of up to 64 MiB.
            let span_end = if group_missing {
                ((index / GROUP as u64) + 1) * (GROUP * PAGE) as u64
            } else {
                (index + 1) * PAGE as u64
            };
            let hole = group_missing
                || self
                    .page(index)
                    .is_none_or(|p| p.read().unwrap_or_else(|e| e.into_inner()).is_none());
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
            Op::Trim => {
                self.zero(io.offset, io.len, false);
                Ok(())
            }
            Op::WriteZeroes => {
                self.zero(io.offset, io.len, io.flags.no_hole);
                Ok(())
            }
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
        Poll::Ready(Err(VolumeError::Backend(
            "memory volume resumed without pending work".into(),
        )))
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
}
