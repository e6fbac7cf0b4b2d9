//! A volume in a local file or block device, driven through the calling
//! core's io_uring: O_DIRECT for aligned requests, RWF_DSYNC for FUA,
//! fdatasync for FLUSH, fallocate for TRIM and WRITE_ZEROES, and
//! SEEK_HOLE/SEEK_DATA for block status.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::task::Poll;
use std::time::Instant;

use io_uring::{opcode, types};
use thiserror::Error;
use tracing::{debug, info};

use super::buf::ALIGN;
use super::{Caps, Ctx, Extent, Io, IoData, Op, UnexpectedWake, Volume, VolumeError, Wake};

/// Largest chunk of one read or write SQE (the kernel caps I/O near 2 GiB).
const MAX_CHUNK: u64 = 1 << 30;

/// Zeroes for the WRITE_ZEROES fallback where fallocate is unsupported.
static ZEROES: [u8; 1 << 20] = [0; 1 << 20];

/// An inline page-cache write slower than this (dirty-page throttling, a
/// journal commit) makes the next ones go through io_uring for a while, so
/// one throttled file cannot stall every connection on the core.
const SLOW_INLINE_NS: u64 = 250_000;
/// How long page-cache writes stay on io_uring after a slow inline one.
const INLINE_PAUSE_NS: u64 = 1_000_000_000;
/// Largest write done inline: a kernel worker's hand-off costs a few µs,
/// noise next to copying more than this, while a big copy inline would
/// hold up every other connection on the core.
const INLINE_MAX: u64 = 128 << 10;

/// statfs(2) f_type of ramfs (libc names tmpfs's but not this one).
const RAMFS_MAGIC: i64 = 0x8584_58f6;

// How page-cache writes run; see `FileVolume::write_inline`.
const BUFFERED_UNKNOWN: u8 = 0;
const BUFFERED_RING: u8 = 1;
const BUFFERED_INLINE: u8 = 2;

/// Whether `file` lives in memory (tmpfs or ramfs).
fn memory_backed(file: &File) -> bool {
    // SAFETY: an all-zero statfs is a valid buffer for fstatfs to fill.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes one statfs through the pointer.
    let r = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    // f_type's and the constants' types differ between targets.
    #[allow(clippy::unnecessary_cast)]
    let (kind, tmpfs) = (st.f_type as i64, libc::TMPFS_MAGIC as i64);
    r == 0 && (kind == tmpfs || kind == RAMFS_MAGIC)
}

/// The ring refused an SQE.
fn submit_failed(source: std::io::Error) -> VolumeError {
    VolumeError::Os {
        op: "io_uring submit",
        source,
    }
}

/// Why a file could not be opened as a volume.
#[derive(Debug, Error)]
pub enum FileError {
    /// The file could not be opened or created.
    #[error("cannot open {path}")]
    Open {
        /// The file's path as given.
        path: PathBuf,
        /// What `open(2)` said.
        #[source]
        source: std::io::Error,
    },
    /// The file is absent and no size was given to create it with.
    #[error("{path} does not exist; give size= to create it")]
    Missing {
        /// The file that was asked for.
        path: PathBuf,
    },
    /// The file's size disagrees with the `size=` option.
    #[error(
        "{path} is {actual} bytes but size={wanted} was given; omit size= to use the file as it is"
    )]
    SizeMismatch {
        /// The file's path as given.
        path: PathBuf,
        /// The file's size in bytes.
        actual: u64,
        /// The `size=` option in bytes.
        wanted: u64,
    },
    /// Another process holds the file's exclusive lock.
    #[error("{path} is locked by another process (is another vbd serving it?)")]
    Locked {
        /// The file another process holds the lock on.
        path: PathBuf,
    },
}

/// How to open a file volume.
#[derive(Clone, Debug, Default)]
pub struct FileOptions {
    /// Open the file read-only and refuse every write.
    pub read_only: bool,
    /// Create the file with this size if missing; must match if present.
    pub size: Option<u64>,
    /// Try O_DIRECT for aligned requests (default on).
    pub no_direct: bool,
}

/// A file-backed volume.
pub struct FileVolume {
    path: PathBuf,
    file: File,
    direct: Option<File>,
    direct_ok: AtomicBool,
    size: u64,
    read_only: bool,
    punch_ok: AtomicBool,
    zero_range_ok: AtomicBool,
    /// BUFFERED_*: whether page-cache writes are done inline.
    buffered: AtomicU8,
    /// The file lives in memory (tmpfs, ramfs): its reads and writes never
    /// wait for a device, and io_uring hands every one of them to a worker
    /// thread (these filesystems have no non-blocking I/O), so they are
    /// done inline.
    memory_backed: bool,
    /// Nanoseconds after `epoch` before which inline writes are paused.
    inline_paused_until: AtomicU64,
    epoch: Instant,
}

/// Where the next chunk of a read or write goes, in memory and in the file.
struct Piece {
    off: u64,
    len: u64,
    fd: types::Fd,
    direct: bool,
    mem: Mem,
}

/// A chunk's memory: one range of an owned buffer, or guest iovecs.
#[derive(Clone, Copy)]
enum Mem {
    Buf(*mut u8),
    Iov(*const libc::iovec, u32),
}

// Stages of multi-step operations.
const STAGE_MAIN: u8 = 0;
const STAGE_FSYNC: u8 = 1;
const STAGE_WRITE_ZEROES: u8 = 2;

impl FileVolume {
    /// Opens (or creates) the file at `path`.
    pub fn open(path: &Path, opts: &FileOptions) -> Result<Self, FileError> {
        let open_err = |source| FileError::Open {
            path: path.to_owned(),
            source,
        };
        let exists = path.exists();
        if !exists && opts.size.is_none() {
            return Err(FileError::Missing {
                path: path.to_owned(),
            });
        }
        let mut oo = OpenOptions::new();
        oo.read(true)
            .write(!opts.read_only)
            .create(!opts.read_only && opts.size.is_some());
        let mut file = oo.open(path).map_err(open_err)?;
        let lock = if opts.read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), lock | libc::LOCK_NB) } != 0 {
            return Err(FileError::Locked {
                path: path.to_owned(),
            });
        }
        let mut size = file.seek(SeekFrom::End(0)).map_err(open_err)?;
        if let Some(wanted) = opts.size {
            if !exists || size == 0 {
                file.set_len(wanted).map_err(open_err)?;
                size = wanted;
            } else if size != wanted {
                return Err(FileError::SizeMismatch {
                    path: path.to_owned(),
                    actual: size,
                    wanted,
                });
            }
        }
        let memory_backed = memory_backed(&file);
        let direct = if opts.no_direct {
            None
        } else if memory_backed {
            // O_DIRECT on tmpfs reads and writes the same pages as the page
            // cache, through io_uring's workers: pointless and slower.
            info!(path = %path.display(), "file is in memory (tmpfs); using the page cache");
            None
        } else {
            match oo.create(false).custom_flags(libc::O_DIRECT).open(path) {
                Ok(f) => Some(f),
                Err(e) => {
                    info!(path = %path.display(), error = %e, "O_DIRECT unavailable; using the page cache");
                    None
                }
            }
        };
        Ok(FileVolume {
            path: path.to_owned(),
            direct_ok: AtomicBool::new(direct.is_some()),
            file,
            direct,
            size,
            read_only: opts.read_only,
            punch_ok: AtomicBool::new(true),
            zero_range_ok: AtomicBool::new(true),
            buffered: AtomicU8::new(if memory_backed {
                BUFFERED_INLINE
            } else {
                BUFFERED_UNKNOWN
            }),
            memory_backed,
            inline_paused_until: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    /// The descriptor for the next chunk: O_DIRECT when the file range and
    /// the memory (`mem_aligned`: every buffer's address and length) are
    /// aligned to [`ALIGN`], which covers any logical block size up to
    /// 4 KiB; the page cache otherwise.
    fn fd_for(&self, offset: u64, len: u64, mem_aligned: bool) -> (types::Fd, bool) {
        let aligned =
            offset.is_multiple_of(ALIGN as u64) && len.is_multiple_of(ALIGN as u64) && mem_aligned;
        match &self.direct {
            Some(d) if aligned && self.direct_ok.load(Ordering::Relaxed) => {
                (types::Fd(d.as_raw_fd()), true)
            }
            _ => (types::Fd(self.file.as_raw_fd()), false),
        }
    }

    fn fd(&self) -> types::Fd {
        types::Fd(self.file.as_raw_fd())
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Writes `io` through the page cache on the calling core, when that is
    /// cheaper than io_uring; true if it is all written. On filesystems
    /// without non-blocking buffered writes (ext4), io_uring hands every
    /// page-cache write to a kernel worker thread, which measured 5-12 µs of
    /// CPU per 4 KiB write here against a few µs for the copy done inline.
    /// Where the kernel can do them without blocking (RWF_NOWAIT works),
    /// io_uring already does them inline and batched, so they stay there.
    /// Anything that fails inline is left to io_uring, which retries it and
    /// reports the error the usual way.
    fn write_inline(&self, io: &mut Io) -> bool {
        let mode = self.buffered.load(Ordering::Relaxed);
        if io.flags.fua || mode == BUFFERED_RING || io.len - io.done > INLINE_MAX {
            return false;
        }
        let p = self.next_piece(io, INLINE_MAX);
        if p.direct || p.len < io.len - io.done {
            return false;
        }
        let began = self.now_ns();
        if began < self.inline_paused_until.load(Ordering::Relaxed) {
            return false;
        }
        let write = |flags| self.rw_now(&p, false, flags);
        let mut n;
        if mode == BUFFERED_UNKNOWN {
            // The first write probes whether the kernel can do it without blocking.
            n = write(libc::RWF_NOWAIT);
            if n >= 0 {
                self.buffered.store(BUFFERED_RING, Ordering::Relaxed);
            } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP) {
                debug!(path = %self.path.display(), "no non-blocking page-cache writes here; doing them inline");
                self.buffered.store(BUFFERED_INLINE, Ordering::Relaxed);
                n = write(0);
            }
        } else {
            n = write(0);
        }
        if n < 0 {
            return false;
        }
        if self.buffered.load(Ordering::Relaxed) == BUFFERED_INLINE {
            let now = self.now_ns();
            if now - began > SLOW_INLINE_NS {
                debug!(path = %self.path.display(), took_us = (now - began) / 1000,
                    "slow inline page-cache write; using io_uring for a while");
                self.inline_paused_until
                    .store(now + INLINE_PAUSE_NS, Ordering::Relaxed);
            }
        }
        io.done += n as u64;
        io.done >= io.len
    }

    /// Reads `io` on the calling core when the file is in memory (see
    /// `memory_backed`: io_uring's worker hand-off cost more than the copy,
    /// about 30% of the server's CPU at randrw 1x32 on tmpfs); true if it
    /// is all read. Errors and a short file are left to io_uring, which
    /// retries and reports them the usual way.
    fn read_inline(&self, io: &mut Io) -> bool {
        if !self.memory_backed || io.len - io.done > INLINE_MAX {
            return false;
        }
        let p = self.next_piece(io, INLINE_MAX);
        if p.direct || p.len < io.len - io.done {
            return false;
        }
        let n = self.rw_now(&p, true, 0);
        if n <= 0 {
            return false;
        }
        io.done += n as u64;
        io.done >= io.len
    }

    /// Reads or writes piece `p` through the page cache with one system
    /// call on this core: the byte count, or -1 with errno set.
    fn rw_now(&self, p: &Piece, read: bool, flags: libc::c_int) -> isize {
        let one;
        let (iov, count) = match p.mem {
            Mem::Buf(ptr) => {
                one = libc::iovec {
                    iov_base: ptr.cast(),
                    iov_len: p.len as usize,
                };
                (&one as *const libc::iovec, 1)
            }
            Mem::Iov(iov, n) => (iov, n as libc::c_int),
        };
        let (fd, off) = (self.file.as_raw_fd(), p.off as i64);
        // SAFETY: the iovecs describe the rest of the request's data (its
        // buffer, or guest memory its guard keeps mapped), which outlives
        // this synchronous call and nothing else touches meanwhile (the
        // request is this call's alone).
        unsafe {
            if read {
                libc::preadv2(fd, iov, count, off, flags)
            } else {
                libc::pwritev2(fd, iov, count, off, flags)
            }
        }
    }

    /// The next piece of a read or write (from `io.done`, at most `max`
    /// bytes) and the descriptor it goes through.
    fn next_piece(&self, io: &mut Io, max: u64) -> Piece {
        let off = io.offset + io.done;
        let want = (io.len - io.done).min(max);
        match &mut io.data {
            IoData::Owned(b) => {
                // io.done < io.len, the buffer's length: inside the buffer.
                let ptr = b.as_mut_ptr().wrapping_add(io.done as usize);
                let (fd, direct) = self.fd_for(off, want, (ptr as usize).is_multiple_of(ALIGN));
                Piece {
                    off,
                    len: want,
                    fd,
                    direct,
                    mem: Mem::Buf(ptr),
                }
            }
            IoData::Guest(g) => {
                let aligned = g.aligned();
                let (iov, n) = g.rest(io.done as usize, want as usize);
                let (fd, direct) = self.fd_for(off, n as u64, aligned);
                Piece {
                    off,
                    len: n as u64,
                    fd,
                    direct,
                    mem: Mem::Iov(iov.as_ptr(), iov.len() as u32),
                }
            }
        }
    }

    /// Queues the next read or write chunk of `io` (from `io.done`).
    fn submit_rw(&self, io: &mut Io, ctx: &mut Ctx<'_>) -> Result<(), VolumeError> {
        let p = self.next_piece(io, MAX_CHUNK);
        // Remember which descriptor this chunk went to, for the EINVAL fallback.
        io.stage = u8::from(p.direct);
        let flags = if io.flags.fua { libc::RWF_DSYNC } else { 0 };
        let entry = match (io.op == Op::Read, p.mem) {
            (true, Mem::Buf(ptr)) => opcode::Read::new(p.fd, ptr, p.len as u32)
                .offset(p.off)
                .build(),
            (false, Mem::Buf(ptr)) => opcode::Write::new(p.fd, ptr, p.len as u32)
                .offset(p.off)
                .rw_flags(flags)
                .build(),
            (true, Mem::Iov(iov, n)) => opcode::Readv::new(p.fd, iov, n).offset(p.off).build(),
            (false, Mem::Iov(iov, n)) => opcode::Writev::new(p.fd, iov, n)
                .offset(p.off)
                .rw_flags(flags)
                .build(),
        };
        // SAFETY: the entry points at the rest of io's data: a range of its
        // owned buffer, or its iovec array (`GuestIov::rest`, rebuilt only
        // by the next submission) over guest memory that its guard keeps
        // mapped. The server neither touches, resizes, frees nor re-prepares
        // `io` while the request is pending (the `Volume` contract), i.e.
        // until this entry's completion resumes it.
        unsafe { ctx.push(entry) }.map_err(submit_failed)
    }

    fn rw_done(&self, io: &mut Io, res: i32, ctx: &mut Ctx<'_>) -> Poll<Result<(), VolumeError>> {
        let write = io.op == Op::Write;
        let op = if write { "write" } else { "read" };
        if res == -libc::EINVAL && io.stage & 1 == 1 {
            // The filesystem refused this O_DIRECT request: stop trying.
            self.direct_ok.store(false, Ordering::Relaxed);
            debug!(path = %self.path.display(), "O_DIRECT refused; using the page cache");
            return self.continue_rw(io, ctx);
        }
        if res == -libc::EINTR || res == -libc::EAGAIN {
            return self.continue_rw(io, ctx);
        }
        if res < 0 {
            return Poll::Ready(Err(VolumeError::from_errno(op, -res)));
        }
        if res == 0 {
            if write {
                return Poll::Ready(Err(VolumeError::from_errno(op, libc::EIO)));
            }
            // The file shrank under us: what is gone reads as zeroes.
            let done = io.done as usize;
            io.data.fill_at(done, io.data.len() - done, 0);
            return Poll::Ready(Ok(()));
        }
        io.done += res as u64;
        if io.done >= io.len {
            return Poll::Ready(Ok(()));
        }
        self.continue_rw(io, ctx)
    }

    fn continue_rw(&self, io: &mut Io, ctx: &mut Ctx<'_>) -> Poll<Result<(), VolumeError>> {
        match self.submit_rw(io, ctx) {
            Ok(()) => Poll::Pending,
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn submit_fsync(&self, io: &mut Io, ctx: &mut Ctx<'_>) -> Poll<Result<(), VolumeError>> {
        io.stage = STAGE_FSYNC;
        let entry = opcode::Fsync::new(self.fd())
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        // SAFETY: fsync points at no memory; the file outlives the request.
        match unsafe { ctx.push(entry) }.map_err(submit_failed) {
            Ok(()) => Poll::Pending,
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    /// Fallocate mode for trim or zeroing, if the filesystem still allows it.
    fn zero_mode(&self, io: &Io) -> Option<i32> {
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        if io.op == Op::WriteZeroes && io.flags.no_hole {
            self.zero_range_ok
                .load(Ordering::Relaxed)
                .then_some(libc::FALLOC_FL_ZERO_RANGE | keep)
        } else {
            self.punch_ok
                .load(Ordering::Relaxed)
                .then_some(libc::FALLOC_FL_PUNCH_HOLE | keep)
        }
    }

    fn start_zeroing(&self, io: &mut Io, ctx: &mut Ctx<'_>) -> Poll<Result<(), VolumeError>> {
        match self.zero_mode(io) {
            Some(mode) => {
                io.stage = STAGE_MAIN;
                let entry = opcode::Fallocate::new(self.fd(), io.len)
                    .offset(io.offset)
                    .mode(mode)
                    .build();
                // SAFETY: fallocate points at no memory.
                match unsafe { ctx.push(entry) }.map_err(submit_failed) {
                    Ok(()) => Poll::Pending,
                    Err(e) => Poll::Ready(Err(e)),
                }
            }
            None => self.zeroing_unsupported(io, ctx),
        }
    }

    /// fallocate cannot do it: trims are advisory and succeed; zeroing
    /// writes real zeroes, unless the client asked for fast zeroing only.
    fn zeroing_unsupported(&self, io: &mut Io, ctx: &mut Ctx<'_>) -> Poll<Result<(), VolumeError>> {
        if io.op == Op::Trim {
            return self.after_change(io, ctx);
        }
        if io.flags.fast_zero {
            return Poll::Ready(Err(VolumeError::NotSupported));
        }
        io.stage = STAGE_WRITE_ZEROES;
        self.write_zeroes_chunk(io, ctx)
    }

    fn write_zeroes_chunk(&self, io: &mut Io, ctx: &mut Ctx<'_>) -> Poll<Result<(), VolumeError>> {
        if io.done >= io.len {
            return self.after_change(io, ctx);
        }
        let n = (io.len - io.done).min(ZEROES.len() as u64) as u32;
        let flags = if io.flags.fua { libc::RWF_DSYNC } else { 0 };
        let entry = opcode::Write::new(self.fd(), ZEROES.as_ptr(), n)
            .offset(io.offset + io.done)
            .rw_flags(flags)
            .build();
        // SAFETY: the source is the static ZEROES, at most its length.
        match unsafe { ctx.push(entry) }.map_err(submit_failed) {
            Ok(()) => Poll::Pending,
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    /// After a trim or zeroing: FUA needs the metadata change on disk too.
    fn after_change(&self, io: &mut Io, ctx: &mut Ctx<'_>) -> Poll<Result<(), VolumeError>> {
        if io.flags.fua && io.stage != STAGE_WRITE_ZEROES {
            self.submit_fsync(io, ctx)
        } else {
            Poll::Ready(Ok(()))
        }
    }

    fn block_status(&self, io: &mut Io) {
        let fd = self.file.as_raw_fd();
        let end = io.offset + io.len;
        let mut pos = io.offset;
        while pos < end && io.extents.len() < super::MAX_EXTENTS {
            // SAFETY: lseek on our own descriptor has no memory effects.
            let data = unsafe { libc::lseek(fd, pos as i64, libc::SEEK_DATA) };
            let (len, hole) = if data < 0 {
                let errno = std::io::Error::last_os_error().raw_os_error();
                if errno == Some(libc::ENXIO) {
                    // No data after pos: the rest is one hole.
                    (end - pos, true)
                } else {
                    // SEEK_DATA unsupported: describe the rest as data.
                    (end - pos, false)
                }
            } else if data as u64 > pos {
                (data as u64 - pos, true)
            } else {
                // SAFETY: as above.
                let hole = unsafe { libc::lseek(fd, pos as i64, libc::SEEK_HOLE) };
                let next = if hole < 0 { self.size } else { hole as u64 };
                (next.max(pos + 1) - pos, false)
            };
            let len = len.min(end - pos);
            io.extents.push(Extent {
                len,
                hole,
                zero: hole,
            });
            pos += len;
        }
    }
}

impl Volume for FileVolume {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        Caps::full(self.read_only)
    }

    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }

    fn backend(&self) -> &'static str {
        "file"
    }

    fn start(&self, io: &mut Io, ctx: &mut Ctx<'_>) -> Poll<Result<(), VolumeError>> {
        if io.op != Op::Flush && (io.offset > self.size || io.len > self.size - io.offset) {
            return Poll::Ready(Err(VolumeError::OutOfRange {
                offset: io.offset,
                len: io.len,
            }));
        }
        if self.read_only && matches!(io.op, Op::Write | Op::Trim | Op::WriteZeroes) {
            return Poll::Ready(Err(VolumeError::ReadOnly));
        }
        match io.op {
            Op::Read | Op::Write => {
                if io.len == 0 {
                    return Poll::Ready(Ok(()));
                }
                io.stage = STAGE_MAIN;
                let done = if io.op == Op::Write {
                    self.write_inline(io)
                } else {
                    self.read_inline(io)
                };
                if done {
                    return Poll::Ready(Ok(()));
                }
                self.continue_rw(io, ctx)
            }
            Op::Flush => self.submit_fsync(io, ctx),
            Op::Trim | Op::WriteZeroes => {
                if io.len == 0 {
                    return Poll::Ready(Ok(()));
                }
                self.start_zeroing(io, ctx)
            }
            Op::BlockStatus => {
                self.block_status(io);
                Poll::Ready(Ok(()))
            }
            Op::Cache => {
                let entry = opcode::Fadvise::new(
                    self.fd(),
                    io.len as libc::off_t,
                    libc::POSIX_FADV_WILLNEED,
                )
                .offset(io.offset)
                .build();
                // SAFETY: fadvise points at no memory.
                match unsafe { ctx.push(entry) }.map_err(submit_failed) {
                    Ok(()) => Poll::Pending,
                    Err(e) => Poll::Ready(Err(e)),
                }
            }
        }
    }

    fn resume(&self, io: &mut Io, wake: Wake, ctx: &mut Ctx<'_>) -> Poll<Result<(), VolumeError>> {
        let Wake::Cqe(res) = wake else {
            return Poll::Ready(Err(VolumeError::backend(UnexpectedWake {
                backend: "file",
                got: "a remote completion",
            })));
        };
        match io.op {
            Op::Read | Op::Write => self.rw_done(io, res, ctx),
            Op::Flush => Poll::Ready(if res < 0 {
                Err(VolumeError::from_errno("fdatasync", -res))
            } else {
                Ok(())
            }),
            // Prefetch is a hint; its failure changes nothing.
            Op::Cache => Poll::Ready(Ok(())),
            Op::BlockStatus => Poll::Ready(Ok(())),
            Op::Trim | Op::WriteZeroes => match io.stage {
                STAGE_FSYNC => Poll::Ready(if res < 0 {
                    Err(VolumeError::from_errno("fdatasync", -res))
                } else {
                    Ok(())
                }),
                STAGE_WRITE_ZEROES => {
                    if res <= 0 {
                        return Poll::Ready(Err(VolumeError::from_errno(
                            "write",
                            if res == 0 { libc::EIO } else { -res },
                        )));
                    }
                    io.done += res as u64;
                    self.write_zeroes_chunk(io, ctx)
                }
                _ => {
                    if res == -libc::EOPNOTSUPP || res == -libc::EINVAL {
                        let flag = if io.op == Op::WriteZeroes && io.flags.no_hole {
                            &self.zero_range_ok
                        } else {
                            &self.punch_ok
                        };
                        flag.store(false, Ordering::Relaxed);
                        info!(path = %self.path.display(), "fallocate unsupported here; falling back");
                        return self.zeroing_unsupported(io, ctx);
                    }
                    if res < 0 {
                        return Poll::Ready(Err(VolumeError::from_errno("fallocate", -res)));
                    }
                    self.after_change(io, ctx)
                }
            },
        }
    }
}

#[cfg(test)]
mod tests;
