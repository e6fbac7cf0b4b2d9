//! io_uring plumbing shared by every transport: the [`Ring`] each core owns,
//! the [`Token`]s that say which per-core object a completion belongs to,
//! the [`Waker`] through which other threads rouse a sleeping core, and the
//! [`Ctx`]/[`Completer`] pair through which a backend queues work on the
//! calling core's ring or finishes it from another thread, and the
//! [`Hosted`]/[`Host`] pair through which a transport other than the
//! server's own (vhost-user) runs objects on the server's cores.
//!
//! Every detail that the kernel can turn into a use-after-free lives here:
//! handing the kernel a pointer is [`Ring::push`] (and [`Ctx::push`]), both
//! `unsafe fn`s whose callers state why the memory outlives the operation.
//! This module knows nothing of NBD, volumes or virtqueues: the result a
//! [`Completer`] carries is its user's type.

mod ctx;
mod hosted;
mod remote;
mod ring;
mod token;
mod waker;

pub use ctx::{Ctx, Wake};
pub use hosted::{Host, HostCx, HostError, Hosted};
pub use remote::{Completer, RemoteDone, RemoteSink};
pub use ring::{Completion, Ring};
pub use token::{Kind, MAX_INDEX, Token};
pub use waker::Waker;
