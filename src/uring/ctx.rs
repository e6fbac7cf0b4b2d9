//! What a backend may use of the calling core while it serves one request.

use std::io;

use io_uring::squeue;

use super::{Completer, RemoteSink, Ring};

/// What finished, as handed back to the backend that queued it.
#[derive(Debug)]
pub enum Wake<R> {
    /// The CQE result of the SQE the backend queued.
    Cqe(i32),
    /// The result a [`Completer`] delivered.
    Remote(R),
}

/// The calling core's ring and identity, lent to a backend for one request.
pub struct Ctx<'a, R> {
    ring: &'a mut Ring,
    token: u64,
    sink: &'a RemoteSink<R>,
}

impl<'a, R> Ctx<'a, R> {
    /// Lends `ring` for the request identified by `token`.
    #[inline]
    pub fn new(ring: &'a mut Ring, token: u64, sink: &'a RemoteSink<R>) -> Self {
        Ctx { ring, token, sink }
    }

    /// Queues an SQE whose completion resumes this request. The entry's
    /// user data is overwritten with the request's token.
    ///
    /// # Safety
    ///
    /// As for [`Ring::push`]: every buffer `entry` points to must stay valid
    /// (and, for a read, otherwise untouched) until this request is resumed
    /// with the entry's completion.
    #[inline]
    pub unsafe fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        let entry = entry.user_data(self.token);
        // SAFETY: the caller upholds the buffer contract for this entry.
        unsafe { self.ring.push(&entry) }
    }

    /// A handle for completing this request from another thread.
    #[inline]
    pub fn completer(&self) -> Completer<R> {
        Completer::new(self.token, self.sink.clone())
    }
}
