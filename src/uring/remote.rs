//! Completions that finish on another thread (an object-store fetch, a
//! shared fsync) travel back to their core over a channel, and the core's
//! [`Waker`] rouses it to take them.

use std::sync::Arc;

use crossbeam_channel::Sender;

use super::Waker;

/// A finished off-core operation on its way back to its core: the token
/// of the request it finishes and its result.
#[derive(Debug)]
pub struct RemoteDone<R> {
    /// The request's token, as its [`super::Ctx`] carried it.
    pub token: u64,
    /// What the operation produced.
    pub result: R,
}

/// Where a core receives off-core completions.
#[derive(Debug)]
pub struct RemoteSink<R> {
    /// The core drains this after every wake-up.
    pub tx: Sender<RemoteDone<R>>,
    /// Wakes the core once a completion is queued.
    pub waker: Arc<Waker>,
}

impl<R> Clone for RemoteSink<R> {
    fn clone(&self) -> Self {
        RemoteSink {
            tx: self.tx.clone(),
            waker: self.waker.clone(),
        }
    }
}

/// Completes one pending request from any thread.
#[derive(Debug)]
pub struct Completer<R> {
    token: u64,
    sink: RemoteSink<R>,
}

impl<R> Completer<R> {
    /// A completer for the request identified by `token` on the core
    /// behind `sink`.
    pub(super) fn new(token: u64, sink: RemoteSink<R>) -> Self {
        Completer { token, sink }
    }

    /// Delivers the result and wakes the request's core.
    pub fn complete(self, result: R) {
        // A closed channel means the core has exited; nobody waits any more.
        let _ = self.sink.tx.send(RemoteDone {
            token: self.token,
            result,
        });
        self.sink.waker.wake();
    }
}
