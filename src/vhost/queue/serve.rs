//! From the avail ring to the volume and back: chains are parsed
//! ([`request::parse`]) into slots, their data segments become the volume
//! request's iovecs (guest memory, kept mapped by the slot), and a
//! finished request gets its status byte and used entry; the round's
//! interrupt goes out once, from `end_round`.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Instant;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::QueueT;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryBackend};

use super::super::chain::Chain;
use super::super::config::SECTOR_SIZE;
use super::super::inflight;
use super::super::memory::GuestRam;
use super::super::metrics::OpKind;
use super::super::request::{self, ID_LEN, Kind, Refusal, Request};
use super::VirtQueue;
use crate::uring::HostCx;
use crate::volume::{IoFlags, Op, RemoteResult, VolumeError, Wake};

const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// Refusals logged per queue before going quiet, so a broken guest cannot
/// flood the log.
const LOGGED_REFUSALS: u64 = 16;

impl VirtQueue {
    /// Serves the heads a previous backend took and never completed
    /// (inflight tracking), oldest first, before anything new.
    pub(super) fn resubmit(&mut self, cx: &mut HostCx<'_, RemoteResult>) {
        let heads = std::mem::take(&mut self.resubmit);
        if heads.is_empty() {
            return;
        }
        tracing::info!(
            queue = self.index,
            count = heads.len(),
            "re-submitting requests in flight before the reconnect"
        );
        let mem = self.memory.memory().into_inner();
        for head in heads {
            // At most `size` heads, one slot each: there is always room.
            let chain = Chain::new(&*mem, self.desc_table, self.size, head);
            self.serve(head, chain, &mem, cx);
        }
    }

    /// Takes every chain the guest made available (as many as there are
    /// free slots), then re-arms notifications.
    pub(super) fn drain_avail(&mut self, cx: &mut HostCx<'_, RemoteResult>) {
        if self.stopping || self.broken {
            return;
        }
        let mem = self.memory.memory().into_inner();
        loop {
            if let Err(e) = self.queue.disable_notification(&*mem) {
                return self.ring_failed(e);
            }
            loop {
                if !self.slots.has_free() {
                    // Full: completions free slots, and `end_round` comes back.
                    self.backlog = true;
                    return;
                }
                let Some(chain) = self.queue.pop_descriptor_chain(&*mem) else {
                    break;
                };
                let head = chain.head_index();
                if let Some(i) = &self.inflight
                    && let Some(area) = i.region.area(i.index)
                {
                    inflight::begin(&area, head, self.counter);
                    self.counter += 1;
                }
                self.serve(head, chain, &mem, cx);
            }
            self.backlog = false;
            match self.queue.enable_notification(&*mem) {
                Ok(false) => return,
                // More arrived while notifications were off.
                Ok(true) => {}
                Err(e) => return self.ring_failed(e),
            }
        }
    }

    fn ring_failed(&mut self, e: virtio_queue::Error) {
        if !self.broken {
            tracing::error!(
                queue = self.index,
                "virtqueue unusable, taking no more requests: {e}"
            );
        }
        self.broken = true;
    }

    /// Parses one chain and starts it, or answers its refusal.
    fn serve(
        &mut self,
        head: u16,
        descs: impl IntoIterator<Item = Descriptor>,
        mem: &Arc<GuestRam>,
        cx: &mut HostCx<'_, RemoteResult>,
    ) {
        let started = Instant::now();
        // A copy of a few words, so that a resize is seen by the next chain.
        let mut limits = self.device.limits;
        limits.capacity_sectors = self.device.capacity_sectors.load(Ordering::Relaxed);
        match request::parse(&**mem, descs, self.size, &limits, &mut self.scratch) {
            Ok(req) => self.begin(head, req, mem, started, cx),
            Err(refusal) => {
                self.refusals += 1;
                if self.refusals <= LOGGED_REFUSALS {
                    tracing::warn!(queue = self.index, "guest request refused: {refusal}");
                }
                let used = match refusal {
                    Refusal::Status { at, status, .. } => {
                        // Checked inside guest memory by the parser.
                        let _ = mem.write_obj(status, at);
                        1
                    }
                    Refusal::BadChain(_) => 0,
                };
                self.metrics.done(OpKind::Refused, started, 0, false);
                self.publish(head, used);
            }
        }
    }

    /// Takes a slot for a parsed request and starts it.
    fn begin(
        &mut self,
        head: u16,
        req: Request,
        mem: &Arc<GuestRam>,
        started: Instant,
        cx: &mut HostCx<'_, RemoteResult>,
    ) {
        let Some(s) = self.slots.take() else {
            // Callers check for a free slot first; answer rather than lose it.
            let _ = mem.write_obj(STATUS_IOERR, req.status);
            self.publish(head, 1);
            return;
        };
        let fua = !self.device.writeback.load(Ordering::Relaxed);
        self.hosts.clear();
        if matches!(req.kind, Kind::Read | Kind::Write) {
            for seg in &self.scratch.segments {
                // The parser split segments at region boundaries, so each
                // lies in one mapping; a failure here would be a bug.
                match mem.get_slice(seg.addr, seg.len as usize) {
                    Ok(vs) => self
                        .hosts
                        .push((vs.ptr_guard_mut().as_ptr() as usize, seg.len as usize)),
                    Err(_) => {
                        tracing::error!(queue = self.index, "segment {seg:?} left guest memory");
                        self.slots.release(s);
                        let _ = mem.write_obj(STATUS_IOERR, req.status);
                        self.metrics.done(OpKind::of(req.kind), started, 0, false);
                        self.publish(head, 1);
                        return;
                    }
                }
            }
        }
        let Some(slot) = self.slots.get_mut(s) else {
            return;
        };
        slot.head = head;
        slot.kind = req.kind;
        slot.status = req.status;
        slot.started = started;
        slot.mem = Some(mem.clone());
        slot.fua = fua;
        match req.kind {
            Kind::Read | Kind::Write => {
                let (op, fua) = if req.kind == Kind::Read {
                    (Op::Read, false)
                } else {
                    (Op::Write, fua)
                };
                let flags = IoFlags {
                    fua,
                    ..IoFlags::default()
                };
                let keep: Arc<dyn Send + Sync> = mem.clone();
                let iov = self.hosts.iter().map(|&(p, n)| (p as *mut u8, n));
                // SAFETY: each (address, length) is a VolatileSlice of one of
                // `mem`'s regions, mappings of the frontend's memory fds
                // that stay mapped while `mem` (an Arc of this map, the
                // guard handed over as `keep`) lives; the request holds
                // `keep` until `Slots::release` after its completion. Guest
                // RAM is never memory vbd owns.
                unsafe {
                    slot.io
                        .prepare_guest(op, req.sector * SECTOR_SIZE, flags, iov, keep)
                };
                self.run(s, cx);
            }
            Kind::Flush => {
                slot.io.prepare(Op::Flush, 0, 0, IoFlags::default());
                self.run(s, cx);
            }
            Kind::GetId => {
                let n = req.len.min(ID_LEN) as usize;
                let serial = self.device.serial;
                let mut left = &serial[..n];
                let mut ok = true;
                for seg in &self.scratch.segments {
                    let k = (seg.len as usize).min(left.len());
                    ok &= mem.write_slice(&left[..k], seg.addr).is_ok();
                    left = &left[k..];
                }
                let status = if ok { STATUS_OK } else { STATUS_IOERR };
                self.complete(s, status, if ok { n as u32 } else { 0 });
            }
            Kind::Discard | Kind::WriteZeroes => {
                slot.ranges.clear();
                slot.ranges.extend_from_slice(&self.scratch.ranges);
                slot.next_range = 0;
                self.next_range(s, cx);
            }
        }
    }

    /// Starts the next non-empty range of a DISCARD or WRITE_ZEROES, or
    /// completes it when none is left.
    fn next_range(&mut self, s: u16, cx: &mut HostCx<'_, RemoteResult>) {
        let Some(slot) = self.slots.get_mut(s) else {
            return;
        };
        while let Some(r) = slot.ranges.get(slot.next_range).copied() {
            slot.next_range += 1;
            if r.sectors == 0 {
                continue;
            }
            let (op, no_hole) = if slot.kind == Kind::Discard {
                (Op::Trim, false)
            } else {
                (Op::WriteZeroes, !r.unmap)
            };
            let flags = IoFlags {
                fua: slot.fua,
                no_hole,
                fast_zero: false,
            };
            let len = u64::from(r.sectors) * SECTOR_SIZE;
            slot.io.prepare(op, r.sector * SECTOR_SIZE, len, flags);
            return self.run(s, cx);
        }
        self.complete(s, STATUS_OK, 0);
    }

    /// Starts slot `s`'s volume operation.
    fn run(&mut self, s: u16, cx: &mut HostCx<'_, RemoteResult>) {
        let Some(slot) = self.slots.get_mut(s) else {
            return;
        };
        match self.volume.start(&mut slot.io, &mut cx.ctx(s)) {
            Poll::Ready(r) => self.op_done(s, r, cx),
            Poll::Pending => {
                slot.running = true;
                self.slots.running += 1;
            }
        }
    }

    /// The volume finished (or advanced) the work queued for slot `s`.
    pub(super) fn resume(&mut self, s: u16, wake: Wake, cx: &mut HostCx<'_, RemoteResult>) {
        let Some(slot) = self.slots.get_mut(s).filter(|sl| sl.running) else {
            tracing::warn!(
                queue = self.index,
                slot = s,
                "completion for an idle request slot ignored"
            );
            return;
        };
        if let Poll::Ready(r) = self.volume.resume(&mut slot.io, wake, &mut cx.ctx(s)) {
            slot.running = false;
            self.slots.running -= 1;
            self.op_done(s, r, cx);
        }
    }

    fn op_done(&mut self, s: u16, r: Result<(), VolumeError>, cx: &mut HostCx<'_, RemoteResult>) {
        let Some(slot) = self.slots.get_mut(s) else {
            return;
        };
        let kind = slot.kind;
        match r {
            Ok(()) if matches!(kind, Kind::Discard | Kind::WriteZeroes) => self.next_range(s, cx),
            Ok(()) => {
                let read = if kind == Kind::Read {
                    slot.io.len as u32
                } else {
                    0
                };
                self.complete(s, STATUS_OK, read);
            }
            Err(VolumeError::NotSupported) => self.complete(s, STATUS_UNSUPP, 0),
            Err(e) => {
                tracing::warn!(
                    queue = self.index,
                    "{kind:?} failed: {}",
                    crate::error::Chain(&e)
                );
                self.complete(s, STATUS_IOERR, 0);
            }
        }
    }

    /// Writes slot `s`'s status, frees it and publishes its used entry
    /// (`written` data bytes plus the status byte).
    fn complete(&mut self, s: u16, status: u8, written: u32) {
        let Some(slot) = self.slots.get_mut(s) else {
            return;
        };
        let (head, kind, started) = (slot.head, slot.kind, slot.started);
        let bytes = slot.io.len;
        if !self.abandoned.load(Ordering::Acquire)
            && let Some(mem) = &slot.mem
        {
            // Checked inside guest memory by the parser, in this same map.
            let _ = mem.write_obj(status, slot.status);
        }
        self.slots.release(s);
        let op = OpKind::of(kind);
        let bytes = if matches!(kind, Kind::Read | Kind::Write) {
            bytes
        } else {
            0
        };
        self.metrics.done(op, started, bytes, status == STATUS_OK);
        self.publish(head, written + 1);
    }

    /// Adds `head` to the used ring, with the inflight log around it.
    fn publish(&mut self, head: u16, used: u32) {
        if self.broken || self.abandoned.load(Ordering::Acquire) {
            return;
        }
        let area = self.inflight.as_ref().and_then(|i| i.region.area(i.index));
        if let Some(a) = &area {
            inflight::before_used(a, head);
        }
        let mem = self.memory.memory();
        if let Err(e) = self.queue.add_used(&*mem, head, used) {
            return self.ring_failed(e);
        }
        if let Some(a) = &area {
            inflight::finish(a, head, self.queue.next_used());
        }
        self.completed = true;
    }

    /// Interrupts the guest once for this round's completions, if it
    /// asked to be (EVENT_IDX) and the frontend gave a call eventfd.
    pub(super) fn notify(&mut self) {
        if !std::mem::take(&mut self.completed) {
            return;
        }
        let mem = self.memory.memory();
        // Errors (the used ring gone) mean nobody to tell.
        if self.queue.needs_notification(&*mem).unwrap_or(false)
            && let Some(call) = &self.call
        {
            // A full counter (EAGAIN) already means "interrupt pending".
            let _ = (&**call).write(&1u64.to_ne_bytes());
            self.metrics.called();
        }
    }
}
