//! Backing a sequential writer's next extents off the reactors.
//!
//! The first write to fresh anonymous memory costs the kernel a huge-page
//! fault: zeroing 2 MiB and, on a machine whose memory the page cache has
//! fragmented, compacting memory to find them. On a reactor that stalls
//! every connection on the core (a sequential first pass ran at a third of
//! a rewrite's speed), so this thread has the kernel back (with
//! MADV_POPULATE_WRITE) the extents a sequential writer is about to reach.
//! Nothing waits for it: a writer that outruns it faults its pages in on
//! its core, as before. It runs niced, so that on a small host its
//! zeroing takes the CPU between the reactors' turns, not in the middle.

use std::ops::Range;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use tracing::{debug, warn};

use super::Groups;

/// Extents populated ahead of a sequential writer (8 MiB).
pub(super) const AHEAD: u64 = 4;

/// How much lower than the reactors the thread runs.
const NICE: libc::c_int = 5;
/// Runs of extents queued for the thread; more are dropped (the writer
/// that gets there faults them in itself).
const QUEUED: usize = 64;

/// The channel to a volume's populator thread, which exits when the
/// volume (the only sender) is dropped.
pub(super) struct Populator {
    tx: Sender<Range<u64>>,
}

impl Populator {
    /// Starts the thread; None if the system has no thread to give.
    pub(super) fn start(groups: Arc<Groups>) -> Option<Self> {
        let (tx, rx) = bounded(QUEUED);
        match std::thread::Builder::new()
            .name("vbd-mem-fault".into())
            .spawn(move || {
                crate::runtime::lower_thread_priority(NICE, "memory populator");
                run(&groups, &rx)
            }) {
            Ok(_) => Some(Populator { tx }),
            Err(e) => {
                warn!(
                    "cannot start a memory volume's populator thread: {e}; first writes fault on their core"
                );
                None
            }
        }
    }

    /// Asks for volume-wide extents `extents` (HUGE bytes each) to be
    /// backed and marked as populated ahead; never blocks.
    pub(super) fn send(&self, extents: Range<u64>) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(extents) {
            debug!("memory populator busy; a sequential writer may fault on its core");
        }
    }
}

fn run(groups: &Groups, rx: &Receiver<Range<u64>>) {
    let per_group = groups.extents_per_group();
    while let Ok(extents) = rx.recv() {
        for e in extents {
            let group = match groups.get_or_create(e / per_group) {
                Ok(Some(g)) => g,
                Ok(None) => break, // past the end of the volume
                Err(err) => {
                    debug!(error = %err, "memory populator cannot map a group");
                    break;
                }
            };
            let local = (e % per_group) as usize;
            if local >= group.region.extents() {
                break;
            }
            if let Err(err) = group.region.populate(local) {
                // Out of memory now: the writer's own fault will say so.
                debug!(error = %err, extent = e, "memory populator could not back an extent");
                break;
            }
        }
    }
}
