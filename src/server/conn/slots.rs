//! Request slots: one per request in flight, each with a buffer from the
//! core's pool while its request runs, and the accounting of the bytes they hold against the
//! per-connection and server-wide limits.

use std::sync::Arc;

use tracing::info;

use super::Env;
use crate::nbd::reply::{self, Header};
use crate::nbd::request::{Command, Refusal};
use crate::server::limits::CoreBytes;
use crate::server::metrics::Timer;
use crate::volume::{Io, IoFlags, Op};

/// Where a slot is in a request's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SlotState {
    Free,
    /// Receiving a WRITE payload (or discarding one we refused).
    Payload,
    /// The volume is working on it.
    Running,
    /// Reply queued or being sent.
    Replying,
}

/// What follows a reply's header on the wire.
#[derive(Clone, Copy, Debug)]
pub(super) enum Tail {
    None,
    Message(&'static str),
    /// The request buffer (read data).
    Data,
    /// The slot's encoded reply (block status).
    Aux,
}

/// One request in flight.
pub(super) struct Slot {
    pub(super) io: Io,
    pub(super) state: SlotState,
    pub(super) cookie: u64,
    pub(super) offset: u64,
    pub(super) command: Option<Command>,
    pub(super) req_one: bool,
    pub(super) refusal: Option<Refusal>,
    /// Payload bytes received so far.
    pub(super) filled: usize,
    pub(super) header: Header,
    pub(super) tail: Tail,
    pub(super) aux: Vec<u8>,
    pub(super) timer: Timer,
}

impl Slot {
    fn new() -> Self {
        Slot {
            io: Io::new(),
            state: SlotState::Free,
            cookie: 0,
            offset: 0,
            command: None,
            req_one: false,
            refusal: None,
            filled: 0,
            header: reply::ok(crate::nbd::ReplyMode::Simple, 0, 0),
            tail: Tail::None,
            aux: Vec::new(),
            timer: Timer::default(),
        }
    }

    /// The reply's bytes: header, then its tail.
    pub(super) fn parts(&self) -> [&[u8]; 2] {
        let tail: &[u8] = match self.tail {
            Tail::None => &[],
            Tail::Message(m) => m.as_bytes(),
            Tail::Data => self.io.buf().as_slice(),
            Tail::Aux => &self.aux,
        };
        [self.header.as_bytes(), tail]
    }

    /// The reply's length on the wire.
    pub(super) fn reply_len(&self) -> usize {
        self.parts().iter().map(|p| p.len()).sum()
    }
}

/// A connection's slots, made as its requests first need them: an idle
/// connection holds none, and one that never has more than a few requests
/// in flight holds only that many. Each is boxed because the kernel holds
/// pointers into a slot (its reply header, for a send in flight) while the
/// vector grows.
pub(super) struct Slots {
    // Boxed on purpose (see above): a Slot must not move while it grows.
    #[allow(clippy::vec_box)]
    slots: Vec<Box<Slot>>,
    /// Slots made so far that are free, by index.
    free: Vec<u16>,
    /// How many slots may exist (requests in flight at once); zero before
    /// transmission.
    cap: usize,
    /// The slot whose WRITE payload is arriving.
    pub(super) payload: Option<u16>,
    /// Requests the volume is working on.
    pub(super) inflight_io: usize,
    /// Bytes of request buffers held by unfinished requests.
    buffered: u64,
    /// This core's share of the global buffered-bytes gauge.
    gauge: Arc<CoreBytes>,
    /// Input is paused by a buffering limit (logged once per pause).
    throttled: bool,
}

impl Slots {
    /// No slots yet.
    pub(super) fn new(gauge: Arc<CoreBytes>) -> Self {
        Slots {
            slots: Vec::new(),
            free: Vec::new(),
            cap: 0,
            payload: None,
            inflight_io: 0,
            buffered: 0,
            gauge,
            throttled: false,
        }
    }

    /// Allows up to `n` requests in flight (at the start of transmission).
    pub(super) fn open(&mut self, n: usize) {
        self.cap = n.min(usize::from(u16::MAX));
    }

    /// Slot `s`.
    pub(super) fn get(&self, s: u16) -> &Slot {
        &self.slots[s as usize]
    }

    /// Slot `s`, to change.
    pub(super) fn get_mut(&mut self, s: u16) -> &mut Slot {
        &mut self.slots[s as usize]
    }

    /// Slot `s` if it exists (for completions, which name slots by number).
    pub(super) fn lookup(&mut self, s: u16) -> Option<&mut Slot> {
        self.slots.get_mut(s as usize).map(|b| &mut **b)
    }

    /// Whether a request could be taken now.
    pub(super) fn has_free(&self) -> bool {
        !self.free.is_empty() || self.slots.len() < self.cap
    }

    /// Takes a free slot, making one if all are busy and the limit allows.
    pub(super) fn take(&mut self) -> Option<u16> {
        if let Some(s) = self.free.pop() {
            return Some(s);
        }
        if self.slots.len() >= self.cap {
            return None;
        }
        // `cap` is at most u16::MAX, so the index fits.
        let s = self.slots.len() as u16;
        self.slots.push(Box::new(Slot::new()));
        Some(s)
    }

    /// Sets slot `s` up for `op` and counts the buffer it now holds.
    pub(super) fn prepare(&mut self, s: u16, op: Op, offset: u64, len: u64, flags: IoFlags) {
        let slot = &mut self.slots[s as usize];
        slot.io.prepare(op, offset, len, flags);
        self.buffered += slot.io.buf().len() as u64;
        self.gauge.add(slot.io.buf().len() as u64);
    }

    /// Frees slot `s` once its reply is sent.
    pub(super) fn release(&mut self, s: u16) {
        let slot = &mut self.slots[s as usize];
        let held = (slot.io.buf().len() as u64).min(self.buffered);
        self.buffered -= held;
        self.gauge.sub(held);
        // Back to the core's pool: a connection holds buffers only for
        // requests in flight.
        slot.io.buf_mut().recycle();
        slot.state = SlotState::Free;
        slot.tail = Tail::None;
        self.free.push(s);
    }

    /// Whether another request's data may be taken in. A connection holding
    /// nothing may always take one, so a well-behaved client keeps moving
    /// however much hostile ones hold.
    pub(super) fn may_buffer(&mut self, peer: &str, env: &Env<'_>) -> bool {
        let over = if self.buffered >= env.cfg.max_buffered {
            Some("per-connection (--max-buffered)")
        } else if self.buffered > 0 && !env.gauges.may_buffer(env.core) {
            Some("global (--max-buffered-total)")
        } else {
            None
        };
        match over {
            None => {
                self.throttled = false;
                true
            }
            Some(which) => {
                if !self.throttled {
                    self.throttled = true;
                    env.gauges.note_pause(self.buffered < env.cfg.max_buffered);
                    info!(peer = %peer, held = self.buffered, "{which} buffer limit reached; pausing this client's input until its replies drain");
                }
                false
            }
        }
    }
}

impl Drop for Slots {
    /// Gives back what a torn-down connection still held (unsent replies).
    fn drop(&mut self) {
        self.gauge.sub(self.buffered);
    }
}
