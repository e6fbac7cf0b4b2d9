//! Objects a core hosts beside its own connections: a vhost-user
//! virtqueue, for one. The transport that made the object hands it to a
//! core through a [`Host`] (the server implements it, so a transport that
//! cannot name the server still runs on its cores); from then on the core
//! owns it, routes its completions to it by [`Token`] (kind
//! [`Kind::Hosted`], its index and generation, and a slot of its choosing)
//! and drops it once it says it is [`Hosted::finished`]. One dynamic call
//! per completion: the core's own connections are not behind this trait,
//! so their completions pay nothing for it.
//!
//! Everything the object owns while an SQE of it is in the kernel (buffers,
//! iovec arrays, descriptors) lives in the object, which the core keeps
//! until it reports no operation left, so its `push` calls can keep the
//! [`Ring::push`] contract.

use std::io;

use io_uring::squeue;

use super::{Completion, Ctx, Kind, RemoteSink, Ring, Token};

/// An object served on one core, driven by its completions.
///
/// Every method runs on the core's thread. The object queues operations
/// only through the [`HostCx`] it is lent, so each completion comes back
/// to it with the slot it chose.
pub trait Hosted<R>: Send {
    /// The core took the object: queue its first operations.
    fn attach(&mut self, cx: &mut HostCx<'_, R>);
    /// An SQE queued for `slot` completed.
    fn on_cqe(&mut self, slot: u16, c: &Completion, cx: &mut HostCx<'_, R>);
    /// Off-core work for `slot` finished (a [`super::Completer`] from
    /// [`HostCx::ctx`]).
    fn on_remote(&mut self, slot: u16, result: R, cx: &mut HostCx<'_, R>);
    /// The round of completions that touched the object is over: a chance
    /// to do once per batch what each completion would otherwise do (tell
    /// a guest its requests are done, say).
    fn end_round(&mut self, cx: &mut HostCx<'_, R>);
    /// The core is stopping: take no new work, finish what is in flight.
    fn stop(&mut self, cx: &mut HostCx<'_, R>);
    /// Whether the object has nothing left in the ring; the core then drops it.
    fn finished(&self) -> bool;
}

/// What a hosted object may use of its core while it handles an event.
pub struct HostCx<'a, R> {
    ring: &'a mut Ring,
    sink: &'a RemoteSink<R>,
    core: usize,
    index: usize,
    generation: u16,
}

impl<'a, R> HostCx<'a, R> {
    /// Lends `ring` to hosted object `index` (of `generation`) on `core`.
    #[inline]
    pub fn new(
        ring: &'a mut Ring,
        sink: &'a RemoteSink<R>,
        core: usize,
        index: usize,
        generation: u16,
    ) -> Self {
        HostCx {
            ring,
            sink,
            core,
            index,
            generation,
        }
    }

    /// The core's number.
    #[inline]
    pub fn core(&self) -> usize {
        self.core
    }

    /// The user data that routes a completion to this object's `slot`.
    #[inline]
    pub fn token(&self, slot: u16) -> u64 {
        Token::encode(Kind::Hosted, self.index, slot, self.generation)
    }

    /// Queues an SQE whose completion comes back as `on_cqe(slot, ..)`. The
    /// entry's user data is overwritten.
    ///
    /// # Safety
    /// As for [`Ring::push`]: every buffer the entry points to must stay
    /// valid (and, for a read, untouched) until that completion.
    #[inline]
    pub unsafe fn push(&mut self, slot: u16, entry: squeue::Entry) -> io::Result<()> {
        let entry = entry.user_data(self.token(slot));
        // SAFETY: the caller upholds the buffer contract for this entry.
        unsafe { self.ring.push(&entry) }
    }

    /// A backend's view of the core for request `slot`: its SQEs complete
    /// as `on_cqe(slot, ..)`, its off-core results as `on_remote(slot, ..)`.
    #[inline]
    pub fn ctx(&mut self, slot: u16) -> Ctx<'_, R> {
        let token = self.token(slot);
        Ctx::new(self.ring, token, self.sink)
    }
}

/// Why an object could not be handed to a core.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The cores are stopping or gone.
    #[error("the cores have stopped")]
    Stopped,
}

/// Runs hosted objects on its cores: what a transport needs of the server.
pub trait Host<R>: Send + Sync {
    /// How many cores there are (at least one).
    fn cores(&self) -> usize;
    /// Hands `object` to core `core % cores()`, which calls its `attach`.
    fn host(&self, core: usize, object: Box<dyn Hosted<R>>) -> Result<(), HostError>;
}
