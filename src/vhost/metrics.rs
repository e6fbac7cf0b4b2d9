//! What a device tells `vbd status` and `/metrics`: whether a frontend is
//! attached, how many queues it runs, and per-queue request counters and
//! latency histograms. Each queue's counters are written by the one core
//! serving it (no lock, no read-modify-write: [`crate::latency`]) and
//! summed when someone asks.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use crate::latency::{OpCounters, OpTotals, bump};

use super::request::Kind;

/// Kinds of request, as metrics label them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// VIRTIO_BLK_T_IN.
    Read,
    /// VIRTIO_BLK_T_OUT.
    Write,
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_DISCARD.
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES.
    WriteZeroes,
    /// VIRTIO_BLK_T_GET_ID.
    GetId,
    /// A request refused before it reached the volume (malformed, unknown
    /// type, out of range).
    Refused,
}

/// How many [`OpKind`]s there are.
pub const OPS: usize = 7;

impl OpKind {
    /// Every kind, in label order.
    pub const ALL: [OpKind; OPS] = [
        OpKind::Read,
        OpKind::Write,
        OpKind::Flush,
        OpKind::Discard,
        OpKind::WriteZeroes,
        OpKind::GetId,
        OpKind::Refused,
    ];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Flush => "flush",
            OpKind::Discard => "discard",
            OpKind::WriteZeroes => "write_zeroes",
            OpKind::GetId => "get_id",
            OpKind::Refused => "refused",
        }
    }

    pub(crate) fn of(kind: Kind) -> OpKind {
        match kind {
            Kind::Read => OpKind::Read,
            Kind::Write => OpKind::Write,
            Kind::Flush => OpKind::Flush,
            Kind::Discard => OpKind::Discard,
            Kind::WriteZeroes => OpKind::WriteZeroes,
            Kind::GetId => OpKind::GetId,
        }
    }
}

/// One queue's counters, written only by the core serving it.
#[derive(Default)]
pub(crate) struct QueueMetrics {
    ops: [OpCounters; OPS],
    /// Kicks (ring reads of the kick eventfd) and interrupts sent.
    kicks: AtomicU64,
    calls: AtomicU64,
    /// The core serving the queue now, plus one; 0 while stopped.
    core: AtomicU64,
}

impl std::fmt::Debug for QueueMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QueueMetrics")
    }
}

impl QueueMetrics {
    /// Records an answered request that started at `start`.
    #[inline]
    pub(crate) fn done(&self, op: OpKind, start: Instant, bytes: u64, ok: bool) {
        let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.ops[op as usize].record(ns, bytes, ok);
    }

    #[inline]
    pub(crate) fn kicked(&self) {
        bump(&self.kicks, 1);
    }

    #[inline]
    pub(crate) fn called(&self) {
        bump(&self.calls, 1);
    }

    /// The queue runs on `core` now (`None`: it stopped).
    pub(crate) fn set_core(&self, core: Option<usize>) {
        self.core
            .store(core.map_or(0, |c| c as u64 + 1), Ordering::Relaxed);
    }

    fn totals(&self, index: u16) -> QueueTotals {
        let mut t = QueueTotals {
            index,
            core: self
                .core
                .load(Ordering::Relaxed)
                .checked_sub(1)
                .map(|c| c as usize),
            kicks: self.kicks.load(Ordering::Relaxed),
            calls: self.calls.load(Ordering::Relaxed),
            ops: [OpTotals::default(); OPS],
        };
        for (o, c) in t.ops.iter_mut().zip(&self.ops) {
            c.add_to(o);
        }
        t
    }
}

/// One queue's totals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueTotals {
    /// The queue's number.
    pub index: u16,
    /// The core serving it, while it runs.
    pub core: Option<usize>,
    /// Kicks taken from the guest.
    pub kicks: u64,
    /// Interrupts sent to the guest.
    pub calls: u64,
    /// Per op kind, indexed by `OpKind as usize`.
    pub ops: [OpTotals; OPS],
}

impl QueueTotals {
    /// Requests answered, of every kind.
    pub fn requests(&self) -> u64 {
        self.ops.iter().map(|o| o.requests).sum()
    }
}

/// A device's shared view: updated by its control thread and its queues.
pub(crate) struct DeviceMetrics {
    pub(crate) attached: AtomicBool,
    queues: Box<[Arc<QueueMetrics>]>,
}

impl DeviceMetrics {
    pub(crate) fn new(num_queues: u16) -> Self {
        DeviceMetrics {
            attached: AtomicBool::new(false),
            queues: (0..num_queues)
                .map(|_| Arc::new(QueueMetrics::default()))
                .collect(),
        }
    }

    /// Queue `index`'s counters (they outlive the queue's runs, so a
    /// reconnect keeps counting where the last frontend stopped).
    pub(crate) fn queue(&self, index: u16) -> Option<Arc<QueueMetrics>> {
        self.queues.get(usize::from(index)).cloned()
    }

    /// Every queue's totals.
    pub(crate) fn totals(&self) -> Vec<QueueTotals> {
        self.queues
            .iter()
            .enumerate()
            .map(|(i, q)| q.totals(i as u16))
            .collect()
    }
}

/// What `vbd status` and `/metrics` show of a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceStatus {
    /// The socket frontends connect to.
    pub socket: std::path::PathBuf,
    /// A frontend is connected now.
    pub attached: bool,
    /// Queues the device offers.
    pub num_queues: u16,
    /// Queues the attached frontend has running.
    pub running_queues: u16,
    /// Every offered queue's counters since the device started.
    pub queues: Vec<QueueTotals>,
}
