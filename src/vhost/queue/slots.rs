//! A queue's request slots: one per request in flight, all made when the
//! queue starts (as many as it has descriptors, since every chain takes at
//! least one), each with its reusable volume request and iovec arrays, so
//! serving a request allocates nothing.

use std::sync::Arc;
use std::time::Instant;

use vm_memory::GuestAddress;

use super::super::config::{MAX_DISCARD_SEG, SEG_MAX};
use super::super::memory::GuestRam;
use super::super::request::{Kind, Range};
use crate::volume::Io;

/// Iovecs a slot holds without growing: a request's data descriptors
/// plus a few splits at memory-region boundaries.
const IOVECS: usize = SEG_MAX as usize + 8;

/// One request in flight.
pub(super) struct Slot {
    /// The volume operation (for DISCARD and WRITE_ZEROES, the current range's).
    pub(super) io: Io,
    /// The chain's head, which the used ring gets back.
    pub(super) head: u16,
    /// What the guest asked for.
    pub(super) kind: Kind,
    /// Where the status byte goes.
    pub(super) status: GuestAddress,
    /// The memory map the request was parsed against: keeps its buffers
    /// mapped until the request completes, whatever the frontend changes.
    pub(super) mem: Option<Arc<GuestRam>>,
    /// When the request was taken, for its latency.
    pub(super) started: Instant,
    /// A DISCARD's or WRITE_ZEROES's ranges, and the next to run.
    pub(super) ranges: Vec<Range>,
    pub(super) next_range: usize,
    /// Ranges complete only once durable (the write cache is off).
    pub(super) fua: bool,
    /// The volume holds `io` (an SQE or off-core work is pending).
    pub(super) running: bool,
}

impl Slot {
    fn new() -> Self {
        let mut io = Io::new();
        io.data.reserve_guest(IOVECS);
        Slot {
            io,
            head: 0,
            kind: Kind::Flush,
            status: GuestAddress(0),
            mem: None,
            started: Instant::now(),
            ranges: Vec::with_capacity(MAX_DISCARD_SEG as usize),
            next_range: 0,
            fua: false,
            running: false,
        }
    }
}

/// The slots and which are free.
pub(super) struct Slots {
    slots: Vec<Slot>,
    free: Vec<u16>,
    /// Slots whose `io` the volume holds.
    pub(super) running: usize,
}

impl Slots {
    /// `n` free slots.
    pub(super) fn new(n: u16) -> Self {
        Slots {
            slots: (0..n).map(|_| Slot::new()).collect(),
            free: (0..n).rev().collect(),
            running: 0,
        }
    }

    /// Whether a request can be taken now.
    pub(super) fn has_free(&self) -> bool {
        !self.free.is_empty()
    }

    /// Takes a free slot.
    pub(super) fn take(&mut self) -> Option<u16> {
        self.free.pop()
    }

    /// Gives slot `s` back, letting go of its memory map.
    pub(super) fn release(&mut self, s: u16) {
        if let Some(slot) = self.slots.get_mut(usize::from(s)) {
            slot.io.data.release_guest();
            slot.mem = None;
            slot.running = false;
            self.free.push(s);
        }
    }

    /// Slot `s` (completions name slots by number: `None` if out of range).
    pub(super) fn get_mut(&mut self, s: u16) -> Option<&mut Slot> {
        self.slots.get_mut(usize::from(s))
    }
}
