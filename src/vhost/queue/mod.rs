//! One virtqueue served on one vbd core, through that core's io_uring, as
//! an NBD connection is: a [`Hosted`] object the server's reactor runs.
//!
//! The kick eventfd is read through the ring (an 8-byte READ, re-armed on
//! each completion); a kick drains the avail ring into request slots
//! ([`serve`]), whose volume I/O goes to the same ring with the guest's
//! buffers as its iovecs; a completion writes the status byte and the
//! used entry, and the core's round ends with at most one interrupt
//! (EVENT_IDX decides whether it is needed). A second eventfd, also read
//! through the ring, carries the control thread's order to stop: the queue
//! takes no new chains, cancels its reads, lets its requests finish, and
//! sends back the next avail index. Nothing is allocated or locked per
//! request; the core never spins on the queue's behalf beyond what it
//! does for NBD traffic.
//!
//! Rooms: `slots` (requests in flight), `serve` (avail ring to volume and
//! back). [`QueueLink`] is the control thread's end.

mod serve;
mod slots;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded};
use io_uring::{opcode, types};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::memory::SharedRam;
use super::metrics::QueueMetrics;
use super::request::Scratch;
use super::runner::{DeviceState, InflightQueue, QueueStart, RunnerError};
use crate::uring::{Completion, HostCx, Hosted, Waker};
use crate::volume::{RemoteResult, Volume, Wake};
use slots::Slots;

/// The queue's own operations, in slots above any request's (a queue has
/// at most [`super::config::MAX_QUEUE_SIZE`] requests).
const SLOT_KICK: u16 = u16::MAX;
const SLOT_STOP: u16 = u16::MAX - 1;
const SLOT_CANCEL: u16 = u16::MAX - 2;

/// How long a stop waits for the queue's requests to finish. A volume that
/// hangs longer (an unreachable object store) leaves the queue behind,
/// told never to touch the rings again; its requests are re-submitted by a
/// frontend that reconnects (inflight tracking).
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// The control thread's end of a running queue.
pub(crate) struct QueueLink {
    index: u16,
    stop: Arc<Waker>,
    done: Receiver<u16>,
    abandoned: Arc<AtomicBool>,
}

impl QueueLink {
    /// Asks the queue to stop and waits (bounded) until its requests have
    /// completed; returns the next avail index.
    pub(crate) fn stop(self) -> Result<u16, RunnerError> {
        self.stop.wake();
        match self.done.recv_timeout(STOP_TIMEOUT) {
            Ok(next_avail) => Ok(next_avail),
            Err(RecvTimeoutError::Timeout) => {
                self.abandoned.store(true, Ordering::Release);
                Err(RunnerError::StopTimeout(self.index, STOP_TIMEOUT.as_secs()))
            }
            // The core exited without ever running the queue.
            Err(RecvTimeoutError::Disconnected) => Err(RunnerError::Worker(self.index)),
        }
    }
}

/// A virtqueue on a core.
pub(crate) struct VirtQueue {
    index: u16,
    size: u16,
    desc_table: GuestAddress,
    queue: Queue,
    memory: SharedRam,
    /// Held open so the ring's reads and writes never hit a reused number.
    kick: Arc<File>,
    call: Option<Arc<File>>,
    inflight: Option<InflightQueue>,
    /// Ordering counter for the inflight log.
    counter: u64,
    resubmit: Vec<u16>,
    device: Arc<DeviceState>,
    volume: Arc<dyn Volume>,
    metrics: Arc<QueueMetrics>,
    stop: Arc<Waker>,
    done: Sender<u16>,
    /// The control thread stopped waiting: never touch the rings again.
    abandoned: Arc<AtomicBool>,
    /// Targets of the eventfd reads; boxed so their addresses are stable
    /// while the kernel holds them, and owned by the queue, which the core
    /// keeps until `finished`.
    kick_buf: Box<u64>,
    stop_buf: Box<u64>,
    slots: Slots,
    scratch: Scratch,
    /// Host addresses of the current request's segments.
    hosts: Vec<(usize, usize)>,
    kick_armed: bool,
    stop_armed: bool,
    cancels: u8,
    /// Taking no new chains; finishing what is in flight.
    stopping: bool,
    /// The next avail index went back to the control thread.
    reported: bool,
    /// The rings failed (a guest address went bad): take nothing more.
    broken: bool,
    /// Used entries were added since the last interrupt decision.
    completed: bool,
    /// The avail ring may hold chains that found no free slot.
    backlog: bool,
    refusals: u64,
}

impl VirtQueue {
    /// A queue for `start`, and the control thread's end of it.
    pub(crate) fn new(
        start: QueueStart,
        volume: Arc<dyn Volume>,
    ) -> Result<(VirtQueue, QueueLink), RunnerError> {
        let index = start.index;
        let queue = start.queue()?;
        let stop = Arc::new(Waker::new().map_err(|e| RunnerError::Spawn(index, e))?);
        let (tx, rx) = bounded(1);
        let abandoned = Arc::new(AtomicBool::new(false));
        let counter = start.inflight.as_ref().map_or(0, |i| i.next_counter);
        let q = VirtQueue {
            index,
            size: start.size,
            desc_table: start.desc_table,
            queue,
            memory: start.memory,
            kick: start.kick,
            call: start.call,
            inflight: start.inflight,
            counter,
            resubmit: start.resubmit,
            device: start.device,
            volume,
            metrics: start.metrics,
            stop: stop.clone(),
            done: tx,
            abandoned: abandoned.clone(),
            kick_buf: Box::new(0),
            stop_buf: Box::new(0),
            slots: Slots::new(start.size),
            scratch: Scratch::with_capacity(start.size),
            hosts: Vec::with_capacity(usize::from(start.size)),
            kick_armed: false,
            stop_armed: false,
            cancels: 0,
            stopping: false,
            reported: false,
            broken: false,
            completed: false,
            backlog: false,
            refusals: 0,
        };
        let link = QueueLink {
            index,
            stop,
            done: rx,
            abandoned,
        };
        Ok((q, link))
    }

    /// Queues the 8-byte read of the kick (`SLOT_KICK`) or stop
    /// (`SLOT_STOP`) eventfd; false if the ring refused it.
    fn arm_read(&mut self, slot: u16, cx: &mut HostCx<'_, RemoteResult>) -> bool {
        let (fd, buf) = if slot == SLOT_KICK {
            (self.kick.as_raw_fd(), &mut *self.kick_buf)
        } else {
            (self.stop.raw_fd(), &mut *self.stop_buf)
        };
        let entry = opcode::Read::new(types::Fd(fd), (buf as *mut u64).cast(), 8).build();
        // SAFETY: `buf` is one of the queue's boxed counters, which nothing
        // else touches while the read is pending, and the queue (so the box)
        // lives until `finished` says no read is pending; the eventfd is held
        // open by the queue (`kick`, `stop`) just as long.
        match unsafe { cx.push(slot, entry) } {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(
                    queue = self.index,
                    slot,
                    "cannot queue an eventfd read: {e}"
                );
                false
            }
        }
    }

    fn arm_kick(&mut self, cx: &mut HostCx<'_, RemoteResult>) {
        self.kick_armed = self.arm_read(SLOT_KICK, cx);
        if !self.kick_armed {
            // Without a kick the queue would hang silently: stop instead.
            self.begin_stop(cx);
        }
    }

    /// Takes no more chains and cancels the eventfd reads; requests in
    /// flight finish, then `end_round` reports.
    fn begin_stop(&mut self, cx: &mut HostCx<'_, RemoteResult>) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        for (armed, slot) in [(self.kick_armed, SLOT_KICK), (self.stop_armed, SLOT_STOP)] {
            if !armed {
                continue;
            }
            let entry = opcode::AsyncCancel::new(cx.token(slot)).build();
            // SAFETY: a cancel points at no memory.
            match unsafe { cx.push(SLOT_CANCEL, entry) } {
                Ok(()) => self.cancels += 1,
                Err(e) => tracing::error!(queue = self.index, "cannot cancel a read: {e}"),
            }
        }
    }

    fn on_kick(&mut self, res: i32, cx: &mut HostCx<'_, RemoteResult>) {
        self.kick_armed = false;
        if self.stopping {
            return;
        }
        if res < 0 && res != -libc::EAGAIN && res != -libc::EINTR {
            tracing::error!(
                queue = self.index,
                error = %std::io::Error::from_raw_os_error(-res),
                "reading the kick eventfd failed; stopping the queue"
            );
            self.begin_stop(cx);
            return;
        }
        self.metrics.kicked();
        self.arm_kick(cx);
        self.drain_avail(cx);
    }
}

impl Hosted<RemoteResult> for VirtQueue {
    fn attach(&mut self, cx: &mut HostCx<'_, RemoteResult>) {
        self.metrics.set_core(Some(cx.core()));
        tracing::debug!(
            queue = self.index,
            core = cx.core(),
            "virtqueue on its core"
        );
        self.stop_armed = self.arm_read(SLOT_STOP, cx);
        self.arm_kick(cx);
        self.resubmit(cx);
        self.drain_avail(cx);
    }

    fn on_cqe(&mut self, slot: u16, c: &Completion, cx: &mut HostCx<'_, RemoteResult>) {
        match slot {
            SLOT_KICK => self.on_kick(c.result, cx),
            SLOT_STOP => {
                self.stop_armed = false;
                self.begin_stop(cx);
            }
            SLOT_CANCEL => self.cancels = self.cancels.saturating_sub(1),
            s => self.resume(s, Wake::Cqe(c.result), cx),
        }
    }

    fn on_remote(&mut self, slot: u16, result: RemoteResult, cx: &mut HostCx<'_, RemoteResult>) {
        self.resume(slot, Wake::Remote(result), cx);
    }

    fn end_round(&mut self, cx: &mut HostCx<'_, RemoteResult>) {
        if self.backlog && self.slots.has_free() {
            self.drain_avail(cx);
        }
        self.notify();
        if self.stopping && !self.reported && self.slots.running == 0 {
            self.reported = true;
            self.metrics.set_core(None);
            // The link may be gone (the device is closing): nobody waits.
            let _ = self.done.try_send(self.queue.next_avail());
            tracing::debug!(
                queue = self.index,
                next_avail = self.queue.next_avail(),
                "virtqueue stopped"
            );
        }
    }

    fn stop(&mut self, cx: &mut HostCx<'_, RemoteResult>) {
        self.begin_stop(cx);
    }

    fn finished(&self) -> bool {
        self.reported && !self.kick_armed && !self.stop_armed && self.cancels == 0
    }
}
