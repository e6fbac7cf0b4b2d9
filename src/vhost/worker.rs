//! Phase 1's [`QueueRunner`]: one plain thread per queue that blocks on
//! the kick eventfd and serves requests one at a time through a
//! [`SyncDriver`], copying between guest memory and a bounce buffer. It
//! proves the control plane and the parser against real frontends; the
//! reactors replace it (queues on vbd's cores, I/O straight into guest
//! memory, many requests in flight).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddressSpace};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::chain::Chain;
use super::config::SECTOR_SIZE;
use super::inflight;
use super::memory::GuestRam;
use super::request::{self, ID_LEN, Kind, Refusal, Request, Scratch};
use super::runner::{DeviceState, InflightQueue, QueueRunner, QueueStart, RunnerError};
use crate::volume::sync::SyncDriver;
use crate::volume::{IoFlags, Op, Volume, VolumeError};

const STATUS_OK: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK as u8;
const STATUS_IOERR: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8;
const STATUS_UNSUPP: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;

/// Refusals logged per queue before going quiet, so a broken guest cannot
/// flood the log.
const LOGGED_REFUSALS: u64 = 16;

struct Running {
    stop: EventFd,
    thread: JoinHandle<u16>,
}

/// A thread per queue over one volume.
pub struct ThreadRunner {
    volume: Arc<dyn Volume>,
    queues: HashMap<u16, Running>,
}

impl ThreadRunner {
    /// A runner serving `volume`'s requests.
    pub fn new(volume: Arc<dyn Volume>) -> Self {
        ThreadRunner {
            volume,
            queues: HashMap::new(),
        }
    }
}

impl QueueRunner for ThreadRunner {
    fn start(&mut self, start: QueueStart) -> Result<(), RunnerError> {
        let index = start.index;
        if self.queues.contains_key(&index) {
            return Err(RunnerError::AlreadyRunning(index));
        }
        let queue = start.queue()?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(|e| RunnerError::Spawn(index, e))?;
        let stop2 = stop.try_clone().map_err(|e| RunnerError::Spawn(index, e))?;
        let driver = SyncDriver::new().map_err(|e| RunnerError::Spawn(index, e))?;
        let volume = self.volume.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vhost-q{index}"))
            .spawn(move || {
                let mut w = Worker::new(start, queue, volume, driver);
                w.run(&stop2);
                w.queue.next_avail()
            })
            .map_err(|e| RunnerError::Spawn(index, e))?;
        self.queues.insert(index, Running { stop, thread });
        Ok(())
    }

    fn stop(&mut self, index: u16) -> Result<u16, RunnerError> {
        let r = self
            .queues
            .remove(&index)
            .ok_or(RunnerError::NotRunning(index))?;
        // A full counter already means "stop".
        let _ = r.stop.write(1);
        r.thread.join().map_err(|_| RunnerError::Worker(index))
    }
}

impl Drop for ThreadRunner {
    fn drop(&mut self) {
        let queues: Vec<u16> = self.queues.keys().copied().collect();
        for q in queues {
            let _ = self.stop(q);
        }
    }
}

/// Waits until `a` or `b` is readable; true for `a`.
fn wait_either(a: RawFd, b: RawFd) -> io::Result<bool> {
    let mut fds = [
        libc::pollfd {
            fd: a,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: fds is a live array of two pollfds for the call; a stale
        // descriptor number only yields POLLNVAL.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n >= 0 {
            return Ok(fds[0].revents != 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn signal(call: &File) {
    // A full counter (EAGAIN) already means "interrupt pending".
    let _ = (&*call).write(&1u64.to_ne_bytes());
}

struct Worker {
    start: QueueStart,
    queue: Queue,
    volume: Arc<dyn Volume>,
    driver: SyncDriver,
    scratch: Scratch,
    /// Bounce buffer, grown to the largest request seen (at most
    /// seg_max * size_max bytes).
    buf: Vec<u8>,
    counter: u64,
    refusals: u64,
}

impl Worker {
    fn new(start: QueueStart, queue: Queue, volume: Arc<dyn Volume>, driver: SyncDriver) -> Self {
        let counter = start.inflight.as_ref().map_or(0, |i| i.next_counter);
        Worker {
            scratch: Scratch::with_capacity(start.size),
            start,
            queue,
            volume,
            driver,
            buf: Vec::new(),
            counter,
            refusals: 0,
        }
    }

    fn run(&mut self, stop: &EventFd) {
        let memory = self.start.memory.clone();
        let resubmit = std::mem::take(&mut self.start.resubmit);
        if !resubmit.is_empty() {
            tracing::info!(
                queue = self.start.index,
                count = resubmit.len(),
                "re-submitting requests in flight before the reconnect"
            );
            let mem = memory.memory();
            for head in resubmit {
                let chain = Chain::new(&*mem, self.start.desc_table, self.start.size, head);
                self.serve(&mem, head, chain);
            }
            self.notify(&mem);
        }
        let kick = self.start.kick.clone();
        loop {
            match wait_either(stop.as_raw_fd(), kick.as_raw_fd()) {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(queue = self.start.index, "waiting for a kick: {e}");
                    return;
                }
            }
            let _ = (&*kick).read(&mut [0u8; 8]);
            let mem = memory.memory();
            if let Err(e) = self.drain(&mem) {
                tracing::error!(queue = self.start.index, "virtqueue unusable: {e}");
                return;
            }
            self.notify(&mem);
        }
    }

    /// Serves everything in the avail ring, then re-arms notifications.
    fn drain(&mut self, mem: &GuestRam) -> Result<(), virtio_queue::Error> {
        loop {
            self.queue.disable_notification(mem)?;
            while let Some(chain) = self.queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                if let Some(i) = &self.start.inflight
                    && let Some(area) = i.region.area(i.index)
                {
                    inflight::begin(&area, head, self.counter);
                    self.counter += 1;
                }
                self.serve(mem, head, chain);
            }
            if !self.queue.enable_notification(mem)? {
                return Ok(());
            }
        }
    }

    fn notify(&mut self, mem: &GuestRam) {
        // EVENT_IDX decides; errors (used ring gone) mean nobody to tell.
        if self.queue.needs_notification(mem).unwrap_or(false)
            && let Some(call) = &self.start.call
        {
            signal(call);
        }
    }

    fn serve(
        &mut self,
        mem: &GuestRam,
        head: u16,
        descs: impl IntoIterator<Item = virtio_queue::desc::split::Descriptor>,
    ) {
        let device = self.start.device.clone();
        let parsed = request::parse(
            mem,
            descs,
            self.start.size,
            &device.limits,
            &mut self.scratch,
        );
        let used = match parsed {
            Ok(req) => {
                let (status, written) = self.execute(mem, &req, &device);
                let _ = mem.write_obj(status, req.status);
                written + 1
            }
            Err(refusal) => {
                self.refused(&refusal);
                match refusal {
                    Refusal::Status { at, status, .. } => {
                        let _ = mem.write_obj(status, at);
                        1
                    }
                    Refusal::BadChain(_) => 0,
                }
            }
        };
        self.complete(mem, head, used);
    }

    fn refused(&mut self, r: &Refusal) {
        self.refusals += 1;
        if self.refusals <= LOGGED_REFUSALS {
            tracing::warn!(queue = self.start.index, "guest request refused: {r}");
        }
    }

    fn complete(&mut self, mem: &GuestRam, head: u16, used: u32) {
        let area = self
            .start
            .inflight
            .as_ref()
            .and_then(|i: &InflightQueue| i.region.area(i.index));
        if let Some(a) = &area {
            inflight::before_used(a, head);
        }
        if let Err(e) = self.queue.add_used(mem, head, used) {
            tracing::warn!(queue = self.start.index, "completing head {head}: {e}");
            return;
        }
        if let Some(a) = &area {
            inflight::finish(a, head, self.queue.next_used());
        }
    }

    /// Runs a parsed request: its status and the data bytes written into
    /// the guest.
    fn execute(&mut self, mem: &GuestRam, req: &Request, device: &DeviceState) -> (u8, u32) {
        let offset = req.sector * SECTOR_SIZE;
        let vol = &*self.volume;
        let result = match req.kind {
            Kind::Read => match self.driver.read(vol, offset, req.len as usize) {
                Ok(data) => to_guest(mem, &self.scratch.segments, &data).map(|()| req.len),
                Err(e) => Err(e),
            },
            Kind::Write => {
                self.buf.resize(req.len as usize, 0);
                from_guest(mem, &self.scratch.segments, &mut self.buf)
                    .and_then(|()| {
                        let fua = !device.writeback.load(Ordering::Relaxed);
                        self.driver.write(vol, offset, &self.buf, fua)
                    })
                    .map(|()| 0)
            }
            Kind::Flush => self
                .driver
                .op(vol, Op::Flush, 0, 0, IoFlags::default())
                .map(|_| 0),
            Kind::GetId => {
                let n = req.len.min(ID_LEN) as usize;
                to_guest(mem, &self.scratch.segments, &device.serial[..n]).map(|()| n as u32)
            }
            Kind::Discard | Kind::WriteZeroes => {
                let op = if req.kind == Kind::Discard {
                    Op::Trim
                } else {
                    Op::WriteZeroes
                };
                let fua = !device.writeback.load(Ordering::Relaxed);
                let mut r = Ok(0);
                for range in &self.scratch.ranges {
                    let flags = IoFlags {
                        fua,
                        no_hole: op == Op::WriteZeroes && !range.unmap,
                        fast_zero: false,
                    };
                    let len = u64::from(range.sectors) * SECTOR_SIZE;
                    if len == 0 {
                        continue;
                    }
                    if let Err(e) = self
                        .driver
                        .op(vol, op, range.sector * SECTOR_SIZE, len, flags)
                    {
                        r = Err(e);
                        break;
                    }
                }
                r
            }
        };
        match result {
            Ok(written) => (STATUS_OK, written),
            Err(VolumeError::NotSupported) => (STATUS_UNSUPP, 0),
            Err(e) => {
                tracing::warn!(queue = self.start.index, "{:?} failed: {e}", req.kind);
                (STATUS_IOERR, 0)
            }
        }
    }
}

fn guest_error(e: vm_memory::GuestMemoryError) -> VolumeError {
    VolumeError::Os {
        op: "guest memory access",
        source: io::Error::other(e),
    }
}

/// Copies `data` into the segments, in order.
fn to_guest(mem: &GuestRam, segs: &[request::Segment], mut data: &[u8]) -> Result<(), VolumeError> {
    for s in segs {
        if data.is_empty() {
            break;
        }
        let n = (s.len as usize).min(data.len());
        mem.write_slice(&data[..n], s.addr).map_err(guest_error)?;
        data = &data[n..];
    }
    Ok(())
}

/// Fills `buf` from the segments, in order.
fn from_guest(
    mem: &GuestRam,
    segs: &[request::Segment],
    buf: &mut [u8],
) -> Result<(), VolumeError> {
    let mut at = 0;
    for s in segs {
        let n = s.len as usize;
        mem.read_slice(&mut buf[at..at + n], s.addr)
            .map_err(guest_error)?;
        at += n;
    }
    Ok(())
}
