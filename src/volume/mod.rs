//! The block store: a `Volume` is a byte range with the operations NBD
//! needs. Backends complete work inline, on the calling core's io_uring, or
//! on another thread that wakes that core (see [`crate::uring`]).
//!
//! Backends: `memory` (sparse, in RAM), `file` (a file or block device)
//! and `object` (a log-structured volume in an object store). `buf` is the
//! aligned request buffer, `data` says whether a request's bytes are in it
//! or in a guest's memory, `sync` drives a volume from a blocking thread.

pub mod buf;
pub mod data;
mod error;
pub mod file;
pub mod memory;
pub mod object;
pub mod sync;

use std::task::Poll;

pub use buf::{AlignedBuf, use_pool_on_this_thread};
pub use data::IoData;
pub use error::{UnexpectedWake, VolumeError};

/// Result of off-core work: optional data for the request (a read's bytes).
pub type RemoteResult = Result<Option<bytes::Bytes>, VolumeError>;
/// The calling core's ring, lent to a backend for one request.
pub type Ctx<'a> = crate::uring::Ctx<'a, RemoteResult>;
/// What finished, as handed to [`Volume::resume`].
pub type Wake = crate::uring::Wake<RemoteResult>;
/// Completes a pending request from another thread.
pub type Completer = crate::uring::Completer<RemoteResult>;

/// Told a volume's new size in bytes after a live resize: NBD reads the
/// size at each handshake, so only transports that push a change to their
/// clients (vhost-user-blk's config-change notification) need one.
pub type ResizeHook = Box<dyn Fn(u64) + Send + Sync>;

/// Most extents one block-status call returns; clients ask again for the rest.
pub const MAX_EXTENTS: usize = 1024;

/// Whether `name` can name an export or volume: it ends up in object keys,
/// directory names and URIs, so letters, digits, '-', '_' and '.' only.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name != "."
        && name != ".."
}

#[cfg(test)]
mod tests {
    use super::valid_name;

    #[test]
    fn names_cannot_escape_the_store() {
        for ok in [
            "a",
            "vm-1_disk.raw",
            "A.b-c_d",
            "..a",
            "a..",
            &"x".repeat(256),
        ] {
            assert!(valid_name(ok), "{ok:?}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "x/..",
            "a/b",
            "/a",
            "a/",
            "a\\b",
            "a\0b",
            "\0",
            "a b",
            "a:b",
            "é",
            "a\n",
            &"x".repeat(257),
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}

/// An operation on a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read `len` bytes at `offset` into the buffer.
    Read,
    /// Write the buffer's `len` bytes at `offset`.
    Write,
    /// Make every completed write durable.
    Flush,
    /// Discard a range; it may read back as zeroes or old data.
    Trim,
    /// Make a range read as zeroes, by punching it or writing zeroes.
    WriteZeroes,
    /// Report the range's allocation state into `Io::extents`.
    BlockStatus,
    /// Prefetch a range into the backend's cache.
    Cache,
}

/// Modifiers of an operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoFlags {
    /// Persist before completing (NBD FUA).
    pub fua: bool,
    /// WRITE_ZEROES must leave the range allocated.
    pub no_hole: bool,
    /// WRITE_ZEROES must fail with `NotSupported` unless it is cheap.
    pub fast_zero: bool,
}

/// A run of bytes with one allocation state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length of the run in bytes.
    pub len: u64,
    /// Not allocated in the backing store.
    pub hole: bool,
    /// Reads as zeroes.
    pub zero: bool,
}

/// One request's state, owned by the server and lent to the backend until
/// it completes. Buffers are reused between requests.
#[derive(Debug)]
pub struct Io {
    /// What to do.
    pub op: Op,
    /// First byte of the range, from the start of the volume.
    pub offset: u64,
    /// Length of the range in bytes.
    pub len: u64,
    /// Modifiers from the request (FUA, NO_HOLE, FAST_ZERO).
    pub flags: IoFlags,
    /// Destination of a read, source of a write; `len` bytes long for both.
    pub data: IoData,
    /// Filled by block status.
    pub extents: Vec<Extent>,
    /// Backend-private progress (bytes done), reset by `prepare`.
    pub done: u64,
    /// Backend-private stage, reset by `prepare`.
    pub stage: u8,
    /// Backend-private scratch (e.g. which parts of a read are still
    /// missing), reused between requests so it allocates only when it grows.
    pub aux: Vec<u64>,
}

impl Io {
    /// An idle request with no buffer yet.
    pub fn new() -> Self {
        Io {
            op: Op::Flush,
            offset: 0,
            len: 0,
            flags: IoFlags::default(),
            data: IoData::default(),
            extents: Vec::new(),
            done: 0,
            stage: 0,
            aux: Vec::new(),
        }
    }

    /// Sets up the request with its data in vbd's own buffer, sized for
    /// reads and writes.
    pub fn prepare(&mut self, op: Op, offset: u64, len: u64, flags: IoFlags) {
        self.reset(op, offset, len, flags);
        let data = matches!(op, Op::Read | Op::Write);
        self.data
            .owned_mut()
            .set_len(if data { len as usize } else { 0 });
    }

    /// Sets up a request whose data is in foreign memory (a guest's): its
    /// length is the iovecs' total. Reads land in and writes come from
    /// those buffers directly.
    ///
    /// # Safety
    /// As for [`IoData::set_guest`]: each `(base, len)` stays valid for
    /// reads and writes while `keep` lives, and `keep` is held until the
    /// request is prepared again or [`IoData::release_guest`] is called.
    pub unsafe fn prepare_guest(
        &mut self,
        op: Op,
        offset: u64,
        flags: IoFlags,
        iov: impl IntoIterator<Item = (*mut u8, usize)>,
        keep: std::sync::Arc<dyn Send + Sync>,
    ) {
        // SAFETY: the caller's promise is the same one.
        unsafe { self.data.set_guest(iov, keep) };
        let len = self.data.len() as u64;
        self.reset(op, offset, len, flags);
    }

    fn reset(&mut self, op: Op, offset: u64, len: u64, flags: IoFlags) {
        self.op = op;
        self.offset = offset;
        self.len = len;
        self.flags = flags;
        self.done = 0;
        self.stage = 0;
        self.extents.clear();
        self.aux.clear();
    }

    /// The owned buffer (NBD's payloads and replies); empty for guest data.
    #[inline]
    pub fn buf(&self) -> &AlignedBuf {
        self.data.owned()
    }

    /// The owned buffer, to fill or resize.
    #[inline]
    pub fn buf_mut(&mut self) -> &mut AlignedBuf {
        self.data.owned_mut()
    }
}

impl Default for Io {
    fn default() -> Self {
        Self::new()
    }
}

/// What a volume supports; the server turns it into NBD transmission flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Caps {
    /// FLUSH does something (the volume has a volatile write cache).
    pub flush: bool,
    /// Writes honour FUA.
    pub fua: bool,
    /// TRIM is supported.
    pub trim: bool,
    /// WRITE_ZEROES is supported.
    pub write_zeroes: bool,
    /// WRITE_ZEROES can punch holes cheaply, so FAST_ZERO requests succeed.
    pub fast_zero: bool,
    /// CACHE (prefetch) is supported.
    pub cache: bool,
    /// Every connection sees the same data and one flush covers all.
    pub multi_conn: bool,
    /// Writes, trims and zeroing are refused with `ReadOnly`.
    pub read_only: bool,
}

impl Caps {
    /// Everything NBD can ask of a volume, which vbd's own backends
    /// (memory, file, object) all support; `read_only` as configured.
    pub const fn full(read_only: bool) -> Self {
        Caps {
            flush: true,
            fua: true,
            trim: true,
            write_zeroes: true,
            fast_zero: true,
            cache: true,
            multi_conn: true,
            read_only,
        }
    }
}

/// A block store the server can export.
///
/// `start` begins an operation; it either completes at once or returns
/// `Pending` after queueing exactly one piece of work through `ctx`, whose
/// result comes back through `resume`. The server never touches `io` while
/// it is pending.
pub trait Volume: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// What the volume supports.
    fn caps(&self) -> Caps;
    /// A short description for logs and `NBD_INFO_DESCRIPTION`.
    fn describe(&self) -> String;
    /// The backend's name (`memory`, `file`, `object`), for status and metrics.
    fn backend(&self) -> &'static str {
        "other"
    }
    /// Counters of the backend's cache, write-ahead log and store traffic,
    /// for metrics; `None` for backends that have none.
    fn counters(&self) -> Option<object::ObjectCounters> {
        None
    }
    /// The smallest unit of I/O: offsets and lengths must be multiples.
    fn block_size(&self) -> u32 {
        1
    }
    /// Called once when the server stops, after the final flush: a backend
    /// with background work finishes or hands it off here.
    fn shutdown(&self) {}
    /// The object volume behind this one, for lifecycle operations
    /// (snapshot, clone, resize) through the control API.
    fn as_object(&self) -> Option<&object::ObjectVolume> {
        None
    }
    /// Registers `hook` to hear of live size changes; false when this
    /// volume's size never changes (the hook is dropped).
    fn watch_size(&self, hook: ResizeHook) -> bool {
        let _ = hook;
        false
    }
    /// Begins `io`.
    fn start(&self, io: &mut Io, ctx: &mut Ctx<'_>) -> Poll<Result<(), VolumeError>>;
    /// Continues `io` after the work it queued finished.
    fn resume(&self, io: &mut Io, wake: Wake, ctx: &mut Ctx<'_>) -> Poll<Result<(), VolumeError>>;
}
