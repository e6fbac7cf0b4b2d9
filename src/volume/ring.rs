//! How a backend queues work for the core that owns a request: an SQE on
//! that core's io_uring, or a [`Completer`] that another thread uses to hand
//! the result back and wake the core.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use bytes::Bytes;
use crossbeam_channel::Sender;
use io_uring::{IoUring, squeue};

use super::VolumeError;

/// Wakes a reactor sleeping in `io_uring_enter`: an eventfd it reads
/// through its own ring.
#[derive(Debug)]
pub struct Waker {
    fd: OwnedFd,
}

impl Waker {
    /// A new non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        Ok(Waker {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Makes the eventfd readable.
    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64. A full counter (EAGAIN)
        // already means "awake", so the result is irrelevant.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// The descriptor the reactor reads.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Result of off-core work: optional data for the request (a read's bytes).
pub type RemoteResult = Result<Option<Bytes>, VolumeError>;

/// A finished off-core operation on its way back to its core.
#[derive(Debug)]
pub struct RemoteDone {
    pub token: u64,
    pub result: RemoteResult,
}

/// Where a core receives off-core completions.
#[derive(Clone, Debug)]
pub struct RemoteSink {
    pub tx: Sender<RemoteDone>,
    pub waker: Arc<Waker>,
}

/// Completes one pending request from any thread.
#[derive(Debug)]
pub struct Completer {
    token: u64,
    sink: RemoteSink,
}

impl Completer {
    /// Delivers the result and wakes the request's core.
    pub fn complete(self, result: RemoteResult) {
        // A closed channel means the core has exited; nobody waits any more.
        let _ = self.sink.tx.send(RemoteDone {
            token: self.token,
            result,
        });
        self.sink.waker.wake();
    }
}

/// What finished, as handed to `Volume::resume`.
#[derive(Debug)]
pub enum Wake {
    /// The CQE result of the SQE the backend queued.
    Cqe(i32),
    /// The result a [`Completer`] delivered.
    Remote(RemoteResult),
}

/// Queues an SQE, submitting what is queued first if the queue is full.
///
/// The caller guarantees that every buffer the entry points to stays valid
/// until its completion arrives.
pub fn push_sqe(ring: &mut IoUring, entry: squeue::Entry) -> io::Result<()> {
    loop {
        // SAFETY: buffer lifetimes are the caller's contract (see above).
        if unsafe { ring.submission().push(&entry) }.is_ok() {
            return Ok(());
        }
        ring.submit()?;
    }
}

/// The calling core's ring and identity, lent to a backend for one request.
pub struct Ctx<'a> {
    ring: &'a mut IoUring,
    token: u64,
    sink: &'a RemoteSink,
}

impl<'a> Ctx<'a> {
    /// Lends `ring` for the request identified by `token`.
    pub fn new(ring: &'a mut IoUring, token: u64, sink: &'a RemoteSink) -> Self {
        Ctx { ring, token, sink }
    }

    /// Queues an SQE whose completion resumes this request. The entry's
    /// user data is overwritten with the request's token.
    pub fn push(&mut self, entry: squeue::Entry) -> Result<(), VolumeError> {
        push_sqe(self.ring, entry.user_data(self.token)).map_err(|e| VolumeError::Os {
            op: "io_uring submit",
            source: e,
        })
    }

    /// A handle for completing this request from another thread.
    pub fn completer(&self) -> Completer {
        Completer {
            token: self.token,
            sink: self.sink.clone(),
        }
    }
}
