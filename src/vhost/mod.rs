//! vhost-user-blk: the second transport for vbd's volumes. QEMU (or Cloud
//! Hypervisor, Firecracker) shares the guest's RAM and hands over its
//! virtqueues on a per-export Unix socket; vbd reads requests from the
//! rings and moves data straight between guest memory and the volume.
//!
//! # Who does what
//! - `vhost` (feature `vhost-user-backend`) decodes, validates and answers
//!   the vhost-user messages, fds included ([`vhost::vhost_user::BackendReqHandler`]);
//!   `handler` is what each message does to the device.
//! - `vm-memory` maps the frontend's memory regions (`memory`) and gives
//!   checked, volatile access to them; a memory-table change swaps an
//!   `Arc` (`GuestMemoryAtomic`), so queues never take a lock to read it.
//! - `virtio-queue` owns the split-ring mechanics: avail/used rings,
//!   EVENT_IDX notification suppression, descriptor chain walks.
//! - `virtio-bindings` gives the constants and the `virtio_blk_config`
//!   layout; `vmm-sys-util` the eventfds.
//! - vbd's own: [`config`] (features and config space from the export's
//!   capabilities), `request` (the sans-IO request parser: a descriptor
//!   chain over any `GuestMemoryBackend` to a typed request or refusal,
//!   fuzzed by `fuzz`, built with the `fuzzing` feature), `inflight` (QEMU's inflight log, for reconnects
//!   without losing or repeating requests), `chain` (a walk from a head
//!   index, for re-submission), [`runner`] (the boundary to whatever
//!   serves queues), `queue` and [`cores`] (queues on the server's cores),
//!   [`device`] (socket and control thread), [`metrics`] (what status and
//!   `/metrics` show).
//!
//! # Threads
//! Each device has one control thread ([`device`]) that blocks on its
//! socket: messages are rare (set-up, reset, memory hot-plug) and never on
//! the data path. It serves one frontend at a time, refuses a second, and
//! answers a protocol violation by logging it, stopping the queues and
//! dropping that frontend; other devices never notice. When a queue is
//! fully described, started and enabled, the handler gives a
//! [`runner::QueueStart`] to a [`runner::QueueRunner`]; GET_VRING_BASE (or
//! a reset) takes it back and gets the next avail index.
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
//! `VhostUserBackendReqHandlerMut` (`handler`, modelled on
//! vhost-user-backend's handler.rs) and hands configured queues to cores.
//!
//! # Queues on the reactors
//! [`cores::CoreRunner`] is the runner: queue `i` becomes a `VirtQueue`
//! that core `i % cores` hosts ([`crate::uring::Hosted`]) beside its NBD
//! connections; vhost never names the server, control hands it the
//! server's [`crate::uring::Host`]. The core keeps the
//! `virtio_queue::Queue`, a parser scratch and `size` request slots
//! (each with iovec room for `seg_max` segments), all made when the queue
//! starts, so nothing is allocated or locked per request. It reads the
//! kick eventfd through its ring (an 8-byte READ re-armed on completion),
//! drains the avail ring into slots, records each head in the inflight
//! log, and starts the volume operation with the guest's buffers as its
//! data ([`crate::volume::Io::prepare_guest`]: reads land in guest memory,
//! writes come from it). On completion it writes the status, publishes
//! the used entry (inflight `before_used`/`finish` around it) and, once
//! per round of completions, writes the call eventfd if
//! `needs_notification` says so (EVENT_IDX). Each request holds the
//! memory map it was parsed against (an `Arc` of the `GuestMemoryAtomic`
//! snapshot), so a region removed meanwhile stays mapped until its I/O
//! completes. Stopping (GET_VRING_BASE, a reset, a disconnect) goes
//! through a second eventfd the queue also reads through the ring: it
//! takes no new chains, cancels its reads, lets its requests finish and
//! publish, and hands back `next_avail`. The queue never makes its core
//! spin beyond the core's usual busy-poll window after a busy round.
//! FLUSH, and writes, discards and zeroing while the driver has the write
//! cache off (CONFIG_WCE: writeback=0), complete only once durable.
//!
//! # Resize
//! [`device::VhostUserDevice::set_capacity`] changes the capacity the
//! queues enforce (an atomic in the shared device state, read per chain)
//! and GET_CONFIG reports, and announces it with CONFIG_CHANGE_MSG on the
//! backend request channel; see [`device`] for how vbd keeps that channel
//! (the `vhost` crate's `Backend` cannot send the message).

mod chain;
pub mod config;
pub mod cores;
pub mod device;
#[cfg(feature = "fuzzing")]
pub mod fuzz;
mod handler;
mod inflight;
mod memory;
pub mod metrics;
mod queue;
mod request;
pub mod runner;
