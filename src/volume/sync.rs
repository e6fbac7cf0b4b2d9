//! Drives volume operations to completion on a private ring, blocking the
//! calling thread: for tests, tools and shutdown, never for the data path.

use std::sync::Arc;
use std::task::Poll;

use crossbeam_channel::{Receiver, unbounded};

use super::{Ctx, Io, IoFlags, Op, RemoteResult, Volume, VolumeError, Wake};
use crate::uring::{RemoteDone, RemoteSink, Ring, Waker};

/// A private ring for running one operation at a time.
pub struct SyncDriver {
    ring: Ring,
    sink: RemoteSink<RemoteResult>,
    rx: Receiver<RemoteDone<RemoteResult>>,
}

const TOKEN: u64 = 1;

impl SyncDriver {
    /// A driver with a small ring of its own.
    pub fn new() -> std::io::Result<Self> {
        let (tx, rx) = unbounded();
        Ok(SyncDriver {
            ring: Ring::new(8)?,
            sink: RemoteSink {
                tx,
                waker: Arc::new(Waker::new()?),
            },
            rx,
        })
    }

    /// Runs `io` to completion.
    pub fn run(&mut self, vol: &dyn Volume, io: &mut Io) -> Result<(), VolumeError> {
        let mut poll = vol.start(io, &mut Ctx::new(&mut self.ring, TOKEN, &self.sink));
        loop {
            if let Poll::Ready(r) = poll {
                return r;
            }
            let wake = self.wait()?;
            poll = vol.resume(io, wake, &mut Ctx::new(&mut self.ring, TOKEN, &self.sink));
        }
    }

    fn wait(&mut self) -> Result<Wake, VolumeError> {
        loop {
            if let Ok(done) = self.rx.try_recv() {
                return Ok(Wake::Remote(done.result));
            }
            if let Some(cqe) = self.ring.next_completion() {
                return Ok(Wake::Cqe(cqe.result));
            }
            // Remote completions do not post CQEs here, so poll briefly.
            self.ring.submit().map_err(|e| VolumeError::Os {
                op: "io_uring submit",
                source: e,
            })?;
            if !self.ring.has_completions() {
                match self.rx.recv_timeout(std::time::Duration::from_millis(1)) {
                    Ok(done) => return Ok(Wake::Remote(done.result)),
                    Err(_) => continue,
                }
            }
        }
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(
        &mut self,
        vol: &dyn Volume,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, VolumeError> {
        let mut io = Io::new();
        io.prepare(Op::Read, offset, len as u64, IoFlags::default());
        self.run(vol, &mut io)?;
        Ok(io.buf().as_slice().to_vec())
    }

    /// Writes `data` at `offset`.
    pub fn write(
        &mut self,
        vol: &dyn Volume,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<(), VolumeError> {
        let mut io = Io::new();
        let flags = IoFlags {
            fua,
            ..IoFlags::default()
        };
        io.prepare(Op::Write, offset, data.len() as u64, flags);
        io.buf_mut().as_mut_slice().copy_from_slice(data);
        self.run(vol, &mut io)
    }

    /// Runs an operation without data (flush, trim, zeroes, cache, block status).
    pub fn op(
        &mut self,
        vol: &dyn Volume,
        op: Op,
        offset: u64,
        len: u64,
        flags: IoFlags,
    ) -> Result<Io, VolumeError> {
        let mut io = Io::new();
        io.prepare(op, offset, len, flags);
        self.run(vol, &mut io)?;
        Ok(io)
    }
}

#[cfg(test)]
impl SyncDriver {
    /// Runs `op` at `offset` with its data in `pieces` (start, length) of
    /// `mem`, in order, the way a guest's request names its buffers.
    pub(crate) fn run_guest(
        &mut self,
        vol: &dyn Volume,
        op: Op,
        offset: u64,
        flags: IoFlags,
        mem: &mut [u8],
        pieces: &[(usize, usize)],
    ) -> Result<(), VolumeError> {
        let base = mem.as_mut_ptr();
        for &(at, n) in pieces {
            assert!(at + n <= mem.len(), "piece {at}+{n} outside the memory");
        }
        let mut io = Io::new();
        // SAFETY: every piece lies in `mem`, which the exclusive borrow
        // keeps alive and untouched until `io` is dropped below.
        unsafe {
            io.prepare_guest(
                op,
                offset,
                flags,
                pieces.iter().map(|&(at, n)| (base.wrapping_add(at), n)),
                Arc::new(()),
            )
        };
        self.run(vol, &mut io)
    }
}
