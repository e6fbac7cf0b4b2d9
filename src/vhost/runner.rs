//! The boundary between the vhost-user control plane and whatever serves
//! virtqueues: the control thread hands over a queue ready to run and
//! later takes it back. [`super::cores::CoreRunner`] implements it on the
//! server's cores; the handler's tests implement it with a recorder.

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace};

use super::config::Limits;
use super::inflight::InflightRegion;
use super::memory::SharedRam;
use super::metrics::QueueMetrics;

/// What a queue's requests need to know about the device, shared by all
/// its queues and fixed while any runs (but `writeback` and the capacity).
#[derive(Debug)]
pub struct DeviceState {
    /// The negotiated limits the parser enforces.
    pub(crate) limits: Limits,
    /// The GET_ID answer: the export name, NUL-padded or cut to 20 bytes.
    pub(crate) serial: [u8; 20],
    /// Write cache on (the driver's CONFIG_WCE choice): off means every
    /// write is durable before it completes.
    pub(crate) writeback: Arc<AtomicBool>,
    /// The disk's size in sectors now, which a resize changes under the
    /// running queues (`limits.capacity_sectors` is the size at start).
    pub(crate) capacity_sectors: Arc<AtomicU64>,
}

/// Where a queue's inflight log lives.
#[derive(Clone, Debug)]
pub struct InflightQueue {
    /// The frontend's inflight memfd, mapped.
    pub(crate) region: Arc<InflightRegion>,
    /// Which of its per-queue areas is this queue's.
    pub(crate) index: u16,
    /// Ordering counter to continue from.
    pub(crate) next_counter: u64,
}

/// A queue ready to be served: everything the frontend configured for it,
/// translated into guest addresses, and what a reconnect left over.
#[derive(Debug)]
pub struct QueueStart {
    /// The queue's number within the device.
    pub(crate) index: u16,
    /// Descriptors in the ring (a power of two).
    pub(crate) size: u16,
    /// Guest address of the descriptor table.
    pub(crate) desc_table: GuestAddress,
    /// Guest address of the avail ring.
    pub(crate) avail_ring: GuestAddress,
    /// Guest address of the used ring.
    pub(crate) used_ring: GuestAddress,
    /// Where to continue in the avail ring.
    pub(crate) next_avail: u16,
    /// The used ring's index as the guest sees it now.
    pub(crate) next_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX was negotiated: notifications are
    /// suppressed through the rings' event indexes.
    pub(crate) event_idx: bool,
    /// Readable when the guest adds buffers.
    pub(crate) kick: Arc<File>,
    /// Written to interrupt the guest; `None` when the frontend polls.
    pub(crate) call: Option<Arc<File>>,
    /// The guest's memory, swapped when the frontend changes its table.
    pub(crate) memory: SharedRam,
    /// Where this queue logs requests in flight, if the frontend gave an
    /// inflight area (INFLIGHT_SHMFD).
    pub(crate) inflight: Option<InflightQueue>,
    /// Heads a previous backend took and never completed, oldest first:
    /// serve these before the avail ring.
    pub(crate) resubmit: Vec<u16>,
    /// Device-wide state shared by all queues.
    pub(crate) device: Arc<DeviceState>,
    /// This queue's counters, kept by the device across runs.
    pub(crate) metrics: Arc<QueueMetrics>,
}

/// Why a queue could not be started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The frontend described rings the queue cannot use.
    #[error("queue {0}: its rings are not in guest memory or its size is invalid")]
    InvalidQueue(u16),
    /// Stop was asked for a queue that is not served.
    #[error("queue {0} is not running")]
    NotRunning(u16),
    /// Start was asked for a queue that is already served.
    #[error("queue {0} is already running")]
    AlreadyRunning(u16),
    /// What serves the queue could not be set up.
    #[error("queue {0}: starting its worker")]
    Spawn(u16, #[source] std::io::Error),
    /// What served the queue died without handing it back.
    #[error("queue {0}: its worker failed")]
    Worker(u16),
    /// The queue could not be handed to a core.
    #[error("queue {0}: no core takes it")]
    Host(u16, #[source] crate::uring::HostError),
    /// The queue's requests did not finish in time: it is left to finish
    /// them without touching the rings again.
    #[error("queue {0}: requests still in flight after {1} s; giving up on them")]
    StopTimeout(u16, u64),
}

impl QueueStart {
    /// The `virtio_queue::Queue` this describes, checked against guest
    /// memory (rings inside it, aligned, size a power of two).
    pub(crate) fn queue(&self) -> Result<Queue, RunnerError> {
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
    /// load of the queue's memory map; this is for what caches it.
    fn memory_changed(&mut self) {}
}
