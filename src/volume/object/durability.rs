//! What FLUSH and FUA promise, per volume. `local` (the default): the
//! records are in the local WAL and fdatasync'ed, so they survive a crash
//! of vbd or of the host's power, but not the loss of the host's disk.
//! `store`: the records are in the object store too, so they survive the
//! loss of the whole host; a FLUSH seals the open WAL segment and waits for
//! the uploader to put it (and to check that this writer was not fenced).
//! Flushes that arrive while a segment is on its way share its upload.

use std::sync::atomic::Ordering;
use std::task::Poll;

use serde::{Deserialize, Serialize};

use super::{ObjectVolume, RequestError, STAGE_DURABLE};
use crate::lock::{MutexExt, RwLockExt};
use crate::volume::{Ctx, Io, VolumeError};

/// Where a write must be before FLUSH and FUA complete.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// In the local WAL, fdatasync'ed.
    #[default]
    Local,
    /// In the object store.
    Store,
}

impl Durability {
    /// The name `durability=` takes.
    pub fn name(self) -> &'static str {
        match self {
            Durability::Local => "local",
            Durability::Store => "store",
        }
    }
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Durability {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "local" => Ok(Durability::Local),
            "store" => Ok(Durability::Store),
            _ => Err(format!("durability {s:?}: expected local or store")),
        }
    }
}

impl ObjectVolume {
    /// Completes once log position `pos` is in the store: seals the open
    /// segment if `pos` is in it, and waits for the uploader.
    pub(super) fn store_durable(
        &self,
        pos: u64,
        io: &mut Io,
        ctx: &mut Ctx<'_>,
    ) -> Poll<Result<(), VolumeError>> {
        let inner = &self.inner;
        if let Some(by) = inner.fence.fenced_by() {
            return Poll::Ready(Err(VolumeError::backend(RequestError::Fenced {
                generation: inner.fence.generation,
                by,
            })));
        }
        {
            let mut d = inner.dirty.write_locked();
            if let Some(a) = d.active.as_ref()
                && a.base < pos
            {
                a.sealed.store(true, Ordering::Release);
                d.active = None;
            }
        }
        {
            let mut w = inner.fence.store_waiters.locked();
            // Checked under the waiters' lock, which the uploader holds while
            // it moves the frontier and completes waiters: no wake is lost.
            if inner.fence.uploaded_to.load(Ordering::Acquire) >= pos {
                return Poll::Ready(Ok(()));
            }
            io.stage = STAGE_DURABLE;
            w.push((pos, ctx.completer()));
        }
        // The WAL thread syncs the sealed segment, then wakes the uploader.
        inner.wal.kick();
        inner.upload_wake.notify_one();
        Poll::Pending
    }
}
