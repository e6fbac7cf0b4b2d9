//! vhost-user-blk: the second transport for vbd's volumes. QEMU (or Cloud
//! Hypervisor, Firecracker) shares the guest's RAM and hands over its
//! virtqueues on a per-export Unix socket; vbd reads requests from the
//! rings and moves data straight between guest memory and the volume.
//!
//! # Who does what
//! - `vhost` (feature `vhost-user-backend`) decodes, validates and answers
//!   the vhost-user messages, fds included ([`vhost::vhost_user::BackendReqHandler`]);
//!   [`handler`] is what each message does to the device.
//! - `vm-memory` maps the frontend's memory regions ([`memory`]) and gives
//!   checked, volatile access to them; a memory-table change swaps an
//!   `Arc` (`GuestMemoryAtomic`), so queues never take a lock to read it.
//! - `virtio-queue` owns the split-ring mechanics: avail/used rings,
//!   EVENT_IDX notification suppression, descriptor chain walks.
//! - `virtio-bindings` gives the constants and the `virtio_blk_config`
//!   layout; `vmm-sys-util` the eventfds.
//! - vbd's own: [`config`] (features and config space from the export's
//!   capabilities), [`request`] (the sans-IO request parser: a descriptor
//!   chain over any `GuestMemoryBackend` to a typed request or refusal,
//!   fuzzed by [`fuzz`]), [`inflight`] (QEMU's inflight log, for
//!   reconnects without losing or repeating requests), [`chain`] (a walk
//!   from a head index, for re-submission), [`runner`] (the boundary to
//!   whatever serves queues), [`device`] (socket and control thread).
//!
//! # Threads
//! Each device has one control thread ([`device`]) that blocks on its
//! socket: messages are rare (set-up, reset, memory hot-plug) and never on
//! the data path. It serves one frontend at a time, refuses a second, and
//! answers a protocol violation by logging it, stopping the queues and
//! dropping that frontend; other devices never notice. When a queue is
//! fully described, started and enabled, the handler gives a
//! [`runner::QueueStart`] to a [`runner::QueueRunner`]; GET_VRING_BASE (or
//! a reset) takes it back and gets the next avail index. In phase 1 the
//! runner is [`worker::ThreadRunner`], a thread per queue with blocking
//! I/O and a bounce buffer: enough to prove the control plane against
//! QEMU 7.2 (tests/vhost_guest.rs) and the `vhost` crate's frontend with
//! hostile input (tests/vhost_frontend.rs).
//!
//! # Why not `vhost-user-backend`
//! Its threading puts a hop between a queue and vbd's cores (sources of
//! vhost-user-backend 0.24): `VhostUserHandler::new` (handler.rs) spawns
//! a `vring_worker` thread for every entry of `queues_per_thread()`, each
//! running `VringEpollHandler::run` (event_loop.rs), an `epoll_wait` loop
//! that reads the kick eventfd itself (`vring.read_kick()`) and calls the
//! backend's `handle_event` on that thread. Serving the queue on a vbd
//! core would mean forwarding every kick to the core and waking it: a
//! thread hop per batch, and the rings behind `VringRwLock`/`VringMutex`
//! (vring.rs), a lock per access. Its handler also refuses
//! GET/SET_INFLIGHT_FD ("not supported"), which reconnects need. So vbd
//! uses `vhost`'s `BackendReqHandler` with its own
//! `VhostUserBackendReqHandlerMut` ([`handler`], modelled on
//! vhost-user-backend's handler.rs) and hands configured queues to cores.
//!
//! # Phase 2: queues on the reactors
//! The server implements [`runner::QueueRunner`]: `start` picks a core
//! (queue index modulo cores, so a VM's queues spread like its vCPUs) and
//! sends the `QueueStart` over the core's crossbeam channel, as an NBD
//! connection is handed over. The core keeps the `virtio_queue::Queue`,
//! a [`request::Scratch`] and `size` request slots (iovec arrays of
//! `seg_max` x regions entries) allocated there, so nothing is allocated
//! or locked per request. It reads the kick eventfd through its ring (an
//! 8-byte READ re-armed on completion), drains the avail ring into
//! requests, records each head in the inflight log, submits the volume
//! operations, and on completion writes the status, publishes the used
//! entry (inflight `before_used`/`finish` around it) and, once per batch,
//! writes the call eventfd if `needs_notification` says so (EVENT_IDX).
//! Each request holds the memory map it was parsed against (the
//! `GuestMemoryAtomic` guard's `Arc`), so a region removed meanwhile stays
//! mapped until its I/O completes. `stop` asks the core to take no new
//! chains, waits (bounded) for the queue's in-flight requests, and returns
//! `next_avail`. No busy-polling by default: a kick costs one CQE.
//!
//! # The Volume API change this needs (proposed, not made here)
//! Today [`crate::volume::Io`] owns its data in an `AlignedBuf`. Guest
//! requests need the volume to read into and write from guest memory:
//!
//! ```ignore
//! pub enum IoData {
//!     /// What NBD uses: vbd's own aligned buffer.
//!     Owned(AlignedBuf),
//!     /// Host iovecs into guest mappings (one per request::Segment),
//!     /// valid while `keep` (the memory map's Arc) lives.
//!     Guest { iov: Vec<libc::iovec>, keep: Arc<dyn Send + Sync>, aligned: bool },
//! }
//! // Io { data: IoData, .. } instead of Io { buf: AlignedBuf, .. }, and
//! // `unsafe fn Io::set_guest(&mut self, iov, keep)`: the caller promises
//! // the iovecs point into memory that `keep` keeps mapped.
//! ```
//!
//! - file: READV/WRITEV SQEs over the iovecs (the slot owns the array and
//!   the guard until the CQE, which is the `# Safety` of `uring::push`);
//!   O_DIRECT only when every iovec's base and length are multiples of the
//!   logical block size (`aligned`, computed once per request), otherwise
//!   a second, buffered fd of the same file (or a bounce through an
//!   `AlignedBuf` when there is none).
//! - memory: copies between its pages and the iovecs (one helper each way).
//! - object: cache hits copy into the iovecs, misses fetch into an owned
//!   buffer then copy; writes copy from the iovecs into the WAL record it
//!   frames anyway. Same number of copies as NBD's socket-to-buffer path.
//! - `done`/`aux` keep tracking progress across short transfers by byte
//!   offset into the iovec list.
//!
//! # Left for phase 2 and later
//! Serving queues on the reactors (above); the export key
//! `vhost-user=PATH` and the control API/`vbd status`/metrics (frontend
//! attached, queue count, per-queue counters); the supervisor's
//! vhost-user argv and hot attach/detach; the guest tests for file and
//! object volumes and the restart-under-fio test.

mod chain;
pub mod config;
pub mod device;
pub mod fuzz;
mod handler;
mod inflight;
mod memory;
mod request;
pub mod runner;
pub mod worker;
