//! Faulting a memory volume's pages in off the reactors.
//!
//! The first write to fresh anonymous memory costs the kernel a huge-page
//! fault: zeroing 2 MiB, and on a machine whose memory is fragmented by
//! the page cache, compacting memory to find those 2 MiB. Done on a
//! reactor, that stalls every connection on the core (a sequential first
//! pass ran at a third of a rewrite's speed). So a write into an extent
//! the kernel has not backed yet waits while this thread populates it,
//! and a sequential writer finds the next extents populated before it
//! gets there.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TryRecvError, unbounded};
use tracing::warn;

use super::Groups;
use crate::volume::{Completer, VolumeError};

/// Extents populated ahead of a sequential writer (8 MiB).
pub(super) const AHEAD: u64 = 4;

/// Work for the populator thread.
pub(super) struct Job {
    /// Extents (volume-wide, HUGE bytes each) the waiter needs backed.
    pub(super) now: Range<u64>,
    /// Extents to back after that, in the background, marked as ahead.
    pub(super) then: Range<u64>,
    /// The write waiting for `now`, if one is.
    pub(super) waiter: Option<Completer>,
}

/// The channel to a volume's populator thread, which exits when the
/// volume (the only sender) is dropped.
pub(super) struct Populator {
    tx: Sender<Job>,
}

impl Populator {
    /// Starts the thread; None if the system has no thread to give.
    pub(super) fn start(groups: Arc<Groups>) -> Option<Self> {
        let (tx, rx) = unbounded();
        match std::thread::Builder::new()
            .name("vbd-mem-fault".into())
            .spawn(move || run(&groups, &rx))
        {
            Ok(_) => Some(Populator { tx }),
            Err(e) => {
                warn!(
                    "cannot start a memory volume's populator thread: {e}; first writes fault on their core"
                );
                None
            }
        }
    }

    /// Queues `job`; gives it back if the thread is gone.
    pub(super) fn send(&self, job: Job) -> Result<(), Job> {
        self.tx.send(job).map_err(|e| e.0)
    }
}

/// Most extents queued to populate in the background; more are dropped
/// (a writer that gets there finds them unbacked and waits for them).
const BACKGROUND: usize = 64;

/// Serves jobs until the volume is dropped. Writes that wait come first:
/// background extents are populated only while no job is queued.
fn run(groups: &Groups, rx: &Receiver<Job>) {
    let mut background = VecDeque::with_capacity(BACKGROUND);
    loop {
        let job = match rx.try_recv() {
            Ok(job) => job,
            Err(TryRecvError::Disconnected) => return,
            Err(TryRecvError::Empty) => match background.pop_front() {
                Some(e) => {
                    // Failures here are retried by the write that needs it.
                    let _ = populate(groups, e, true);
                    continue;
                }
                None => match rx.recv() {
                    Ok(job) => job,
                    Err(_) => return,
                },
            },
        };
        let r = job.now.clone().try_for_each(|e| populate(groups, e, false));
        if let Some(w) = job.waiter {
            w.complete(r.map(|()| None));
        }
        for e in job.then {
            if background.len() < BACKGROUND && !background.contains(&e) {
                background.push_back(e);
            }
        }
    }
}

/// Populates volume-wide extent `e`, creating its group if need be.
fn populate(groups: &Groups, e: u64, ahead: bool) -> Result<(), VolumeError> {
    let per_group = groups.extents_per_group();
    let Some(group) = groups.get_or_create(e / per_group)? else {
        return Ok(()); // past the end of the volume
    };
    let local = (e % per_group) as usize;
    if local >= group.region.extents() {
        return Ok(());
    }
    group
        .region
        .populate(local, ahead)
        .map_err(|source| VolumeError::Os {
            op: "faulting in a memory volume's pages (MADV_POPULATE_WRITE)",
            source,
        })
}
