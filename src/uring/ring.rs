//! One io_uring and the only place that hands the kernel SQEs.

use std::io;

use io_uring::{IoUring, cqueue, squeue};

/// An io_uring owned by one thread.
pub struct Ring {
    ring: IoUring,
}

/// One completion, copied out of the completion queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The token of the SQE it completes.
    pub user_data: u64,
    /// The operation's result: a count, or `-errno`.
    pub result: i32,
    /// CQE flags (see [`Completion::more`]).
    pub flags: u32,
}

impl Completion {
    /// Whether a multishot operation stays armed after this completion.
    #[inline]
    pub fn more(&self) -> bool {
        cqueue::more(self.flags)
    }
}

impl Ring {
    /// A small plain ring, for threads that block on one operation at a time.
    pub fn new(entries: u32) -> io::Result<Ring> {
        Ok(Ring {
            ring: IoUring::new(entries)?,
        })
    }

    /// A reactor core's ring: one submitter, task work run only when the
    /// core enters the kernel, and a completion queue deep enough for
    /// `entries` operations with multishot completions on top.
    pub fn for_core(entries: u32) -> io::Result<Ring> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_defer_taskrun()
            // Lets a busy-polling core see pending task work without a syscall.
            .setup_taskrun_flag()
            .setup_cqsize(entries * 8)
            .build(entries)?;
        Ok(Ring { ring })
    }

    /// Queues an SQE, submitting what is queued first if the queue is full.
    ///
    /// # Safety
    ///
    /// Every buffer `entry` points to (data, iovecs, msghdr, timespec) must
    /// stay valid at the same address until the entry's completion is
    /// reaped (for a timeout's timespec: until the entry is submitted), and
    /// a buffer the kernel writes must not be read or moved meanwhile.
    /// Descriptors it names must stay open until then, or the operation
    /// fails with `EBADF`, which is safe.
    #[inline]
    pub unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: buffer lifetimes are the caller's contract (see above).
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    /// Submits what is queued without waiting.
    #[inline]
    pub fn submit(&mut self) -> io::Result<()> {
        self.ring.submit().map(drop)
    }

    /// Submits what is queued and waits for `want` completions. A signal
    /// (EINTR) or a full completion queue (EBUSY) just ends the wait early:
    /// the caller reaps and comes back.
    #[inline]
    pub fn enter(&mut self, want: usize) -> io::Result<()> {
        match self.ring.submit_and_wait(want) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Whether a completion is waiting or the kernel flagged task work that
    /// the next [`Ring::enter`] would turn into completions.
    #[inline]
    pub fn ready(&mut self) -> bool {
        self.ring.submission().taskrun() || !self.ring.completion().is_empty()
    }

    /// Whether a completion is waiting.
    #[inline]
    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Moves every waiting completion to the end of `out`.
    #[inline]
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        out.extend(self.ring.completion().map(|c| Completion {
            user_data: c.user_data(),
            result: c.result(),
            flags: c.flags(),
        }));
    }

    /// Takes the next waiting completion.
    #[inline]
    pub fn next_completion(&mut self) -> Option<Completion> {
        self.ring.completion().next().map(|c| Completion {
            user_data: c.user_data(),
            result: c.result(),
            flags: c.flags(),
        })
    }
}
