//! Garbage collection on request (`vbd volume gc`): every pass the
//! uploader would make in the background, now. What may be collected is
//! decided in one place, [`super::refs::collectable`].

use std::time::Instant;

use tracing::info;

use super::upload::{self, GRACE};
use super::{ObjectError, ObjectVolume};
use crate::lock::{MutexExt, RwLockExt};
use crate::runtime::runtime;

impl ObjectVolume {
    /// Rewrites or retires every chunk garbage collection would, and
    /// deletes them: at once when `now` (nobody else reads this volume:
    /// it was opened for this), else after the grace period that reads in
    /// flight get. Returns the chunks collected. Blocks the calling thread.
    pub fn collect_garbage(&self, now: bool) -> Result<u64, ObjectError> {
        let inner = self.inner.clone();
        if self.read_only {
            return Err(ObjectError::ReadOnly(inner.name.clone()));
        }
        inner.fence.check_admin()?;
        let _one = self.inner.admin.locked();
        // Each pass collects one chunk; no more passes than chunks.
        let bound = inner.map.read_locked().chunks.len() + 1;
        let mut doomed = Vec::new();
        runtime().block_on(async {
            for _ in 0..bound {
                match upload::collect_garbage(&inner).await {
                    Some(d) => doomed.extend(d),
                    None => break,
                }
            }
        });
        let n = doomed.len() as u64;
        if now {
            let past = Instant::now()
                .checked_sub(GRACE)
                .unwrap_or_else(Instant::now);
            let mut due: Vec<_> = doomed.into_iter().map(|(id, _)| (id, past)).collect();
            runtime().block_on(upload::delete_doomed(&inner, &mut due));
        } else if !doomed.is_empty() {
            runtime().spawn(async move {
                tokio::time::sleep(GRACE).await;
                upload::delete_doomed(&inner, &mut doomed).await;
            });
        }
        info!(volume = %self.inner.name, chunks = n, "garbage collected on request");
        Ok(n)
    }
}
