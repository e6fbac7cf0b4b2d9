//! The boundary between the vhost-user control plane and whatever serves
//! virtqueues: the control thread hands over a queue ready to run and
//! later takes it back. Phase 1 implements it with a thread per queue
//! ([`super::worker`]); the reactors implement it next, one queue per core.

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace};

use super::config::Limits;
use super::inflight::InflightRegion;
use super::memory::SharedRam;

/// What a queue's requests need to know about the device, shared by all
/// its queues and fixed while any runs (but `writeback`).
#[derive(Debug)]
pub struct DeviceState {
    /// The negotiated limits the parser enforces.
    pub limits: Limits,
    /// The GET_ID answer: the export name, NUL-padded or cut to 20 bytes.
    pub serial: [u8; 20],
    /// Write cache on (the driver's CONFIG_WCE choice): off means every
    /// write is durable before it completes.
    pub writeback: Arc<AtomicBool>,
}

/// Where a queue's inflight log lives.
#[derive(Clone, Debug)]
pub struct InflightQueue {
    pub region: Arc<InflightRegion>,
    pub index: u16,
    /// Ordering counter to continue from.
    pub next_counter: u64,
}

/// A queue ready to be served.
#[derive(Debug)]
pub struct QueueStart {
    pub index: u16,
    pub size: u16,
    pub desc_table: GuestAddress,
    pub avail_ring: GuestAddress,
    pub used_ring: GuestAddress,
    /// Where to continue in the avail ring.
    pub next_avail: u16,
    /// The used ring's index as the guest sees it now.
    pub next_used: u16,
    pub event_idx: bool,
    /// Readable when the guest adds buffers.
    pub kick: Arc<File>,
    /// Written to interrupt the guest; `None` when the frontend polls.
    pub call: Option<Arc<File>>,
    pub memory: SharedRam,
    pub inflight: Option<InflightQueue>,
    /// Heads a previous backend took and never completed, oldest first:
    /// serve these before the avail ring.
    pub resubmit: Vec<u16>,
    pub device: Arc<DeviceState>,
}

/// Why a queue could not be started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("queue {0}: its rings are not in guest memory or its size is invalid")]
    InvalidQueue(u16),
    #[error("queue {0} is not running")]
    NotRunning(u16),
    #[error("queue {0} is already running")]
    AlreadyRunning(u16),
    #[error("queue {0}: starting its worker")]
    Spawn(u16, #[source] std::io::Error),
    #[error("queue {0}: its worker failed")]
    Worker(u16),
}

impl QueueStart {
    /// The `virtio_queue::Queue` this describes, checked against guest
    /// memory (rings inside it, aligned, size a power of two).
    pub fn queue(&self) -> Result<Queue, RunnerError> {
        let bad = || RunnerError::InvalidQueue(self.index);
        let mut q = Queue::new(self.size).map_err(|_| bad())?;
        q.try_set_desc_table_address(self.desc_table)
            .map_err(|_| bad())?;
        q.try_set_avail_ring_address(self.avail_ring)
            .map_err(|_| bad())?;
        q.try_set_used_ring_address(self.used_ring)
            .map_err(|_| bad())?;
        q.set_next_avail(self.next_avail);
        q.set_next_used(self.next_used);
        q.set_event_idx(self.event_idx);
        q.set_ready(true);
        if !q.is_valid(&*self.memory.memory()) {
            return Err(bad());
        }
        Ok(q)
    }
}

/// Serves virtqueues. Called from the device's control thread only.
pub trait QueueRunner: Send {
    /// Begins serving a queue.
    fn start(&mut self, queue: QueueStart) -> Result<(), RunnerError>;
    /// Stops serving queue `index` after its in-flight requests completed;
    /// returns the next avail index (GET_VRING_BASE's answer).
    fn stop(&mut self, index: u16) -> Result<u16, RunnerError>;
    /// The memory table changed. Queues see the new map on their next
    /// load of [`QueueStart::memory`]; this is for what caches it.
    fn memory_changed(&mut self) {}
}
