//! Request metrics kept on the hot path without locks or allocation: every
//! export has one block of counters per core, written only by that core's
//! reactor (plain relaxed load and store, no read-modify-write), and summed
//! only when someone scrapes. Latencies go into [`crate::latency`]'s log2
//! buckets.

use crate::lock::MutexExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

pub use crate::latency::{BUCKETS, OpTotals, bucket_bound_us};
use crate::latency::{OpCounters, bump};
use crate::nbd::request::Command;

/// Kinds of request, as metrics label them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// NBD_CMD_READ.
    Read,
    /// NBD_CMD_WRITE.
    Write,
    /// NBD_CMD_FLUSH.
    Flush,
    /// NBD_CMD_TRIM.
    Trim,
    /// NBD_CMD_WRITE_ZEROES.
    WriteZeroes,
    /// NBD_CMD_BLOCK_STATUS.
    BlockStatus,
    /// NBD_CMD_CACHE.
    Cache,
    /// A command number this server does not know (always refused).
    Other,
}

/// How many [`OpKind`]s there are.
pub const OPS: usize = 8;

impl OpKind {
    /// Every kind, in label order.
    pub const ALL: [OpKind; OPS] = [
        OpKind::Read,
        OpKind::Write,
        OpKind::Flush,
        OpKind::Trim,
        OpKind::WriteZeroes,
        OpKind::BlockStatus,
        OpKind::Cache,
        OpKind::Other,
    ];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Flush => "flush",
            OpKind::Trim => "trim",
            OpKind::WriteZeroes => "write_zeroes",
            OpKind::BlockStatus => "block_status",
            OpKind::Cache => "cache",
            OpKind::Other => "other",
        }
    }

    /// The kind of a raw NBD command number.
    pub fn of_wire(command: u16) -> OpKind {
        match Command::from_wire(command) {
            Some(Command::Read) => OpKind::Read,
            Some(Command::Write) => OpKind::Write,
            Some(Command::Flush) => OpKind::Flush,
            Some(Command::Trim) => OpKind::Trim,
            Some(Command::WriteZeroes) => OpKind::WriteZeroes,
            Some(Command::BlockStatus) => OpKind::BlockStatus,
            Some(Command::Cache) => OpKind::Cache,
            Some(Command::Disc) | None => OpKind::Other,
        }
    }
}

/// When a request started and what it is; kept in its slot until it is answered.
#[derive(Clone, Copy, Debug)]
pub struct Timer {
    start: Instant,
    op: OpKind,
}

impl Timer {
    /// Starts timing a request with raw command number `command`.
    #[inline]
    pub fn start(command: u16) -> Timer {
        Timer {
            start: Instant::now(),
            op: OpKind::of_wire(command),
        }
    }
}

impl Default for Timer {
    fn default() -> Self {
        Timer {
            start: Instant::now(),
            op: OpKind::Other,
        }
    }
}

/// One core's counters for one export, on cache lines of their own.
#[repr(align(128))]
#[derive(Default)]
struct CoreMetrics {
    ops: [OpCounters; OPS],
    /// Connections of this core attached to the export.
    attached: AtomicU64,
}

/// A connection's handle on its core's counters for its export. It counts
/// as an attached connection for as long as it lives; create and drop it
/// on the core it belongs to (the single writer).
pub struct ExportHandle(Arc<CoreMetrics>);

impl ExportHandle {
    /// Records an answered request: `bytes` it covered if it succeeded, or
    /// an error.
    #[inline]
    pub fn done(&self, t: Timer, bytes: u64, ok: bool) {
        let ns = u64::try_from(t.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.0.ops[t.op as usize].record(ns, bytes, ok);
    }
}

impl Drop for ExportHandle {
    fn drop(&mut self) {
        let a = &self.0.attached;
        a.store(
            a.load(Ordering::Relaxed).saturating_sub(1),
            Ordering::Relaxed,
        );
    }
}

/// All cores' counters for one export.
#[derive(Default)]
pub struct ExportMetrics {
    /// Indexed by core; locked only when a connection attaches and when
    /// scraping, never per request.
    cores: Mutex<Vec<Arc<CoreMetrics>>>,
}

/// Totals of one export over all cores.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportTotals {
    /// Per op kind, indexed by `OpKind as usize`.
    pub ops: [OpTotals; OPS],
    /// Connections attached now.
    pub connections: u64,
}

impl ExportMetrics {
    /// Counters with no core yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The handle for a connection on `core` that just attached.
    pub fn attach(&self, core: usize) -> ExportHandle {
        let mut cores = self.cores.locked();
        while cores.len() <= core {
            cores.push(Arc::new(CoreMetrics::default()));
        }
        let m = cores[core].clone();
        bump(&m.attached, 1);
        ExportHandle(m)
    }

    /// Sums every core's counters.
    pub fn totals(&self) -> ExportTotals {
        let cores = self.cores.locked();
        let mut t = ExportTotals::default();
        for c in cores.iter() {
            t.connections += c.attached.load(Ordering::Relaxed);
            for (o, op) in t.ops.iter_mut().zip(&c.ops) {
                op.add_to(o);
            }
        }
        t
    }
}

/// One connection as `vbd status` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnSummary {
    /// The core serving it.
    pub core: usize,
    /// Who is on the other end.
    pub peer: String,
    /// None while still negotiating.
    pub export: Option<String>,
    /// Requests decoded.
    pub requests: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Bytes of read data answered.
    pub bytes_read: u64,
    /// Bytes of write payload received.
    pub bytes_written: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::wire::{CMD_READ, CMD_WRITE};
    use std::time::Duration;

    #[test]
    fn cores_sum_and_handles_count_connections() {
        let m = ExportMetrics::new();
        let a = m.attach(0);
        let b = m.attach(3);
        a.done(Timer::start(CMD_READ), 4096, true);
        a.done(Timer::start(CMD_READ), 4096, false);
        let mut t = Timer::start(CMD_WRITE);
        t.start -= Duration::from_millis(2);
        b.done(t, 512, true);
        b.done(Timer::start(0xffff), 0, false);
        let s = m.totals();
        assert_eq!(s.connections, 2);
        let read = s.ops[OpKind::Read as usize];
        assert_eq!((read.requests, read.errors, read.bytes), (2, 1, 4096));
        let write = s.ops[OpKind::Write as usize];
        assert_eq!((write.requests, write.bytes), (1, 512));
        assert!(write.sum_ns >= 2_000_000);
        assert_eq!(
            write.buckets[..11].iter().sum::<u64>(),
            0,
            "2 ms is over 1024 µs"
        );
        assert_eq!(s.ops[OpKind::Other as usize].errors, 1);
        drop(a);
        assert_eq!(m.totals().connections, 1);
        drop(b);
        assert_eq!(m.totals().connections, 0);
    }
}
