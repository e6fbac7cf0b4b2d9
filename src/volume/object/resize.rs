//! Resize: growing changes the descriptor's size and nothing else (the new
//! blocks read as zeroes); shrinking first trims the tail, so a later grow
//! reads zeroes there too. On an open volume the size changes live: new
//! requests are checked against it, NBD clients see it at their next
//! handshake, and hooks ([`crate::volume::Volume::watch_size`]) hear of it.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tracing::info;

use super::format::{BLOCK, Kind};
use super::layout::{self, Keys};
use super::{ObjectError, ObjectVolume};
use crate::lock::MutexExt;
use crate::runtime::runtime;

impl ObjectVolume {
    /// Sets the volume's size to `size` bytes; a smaller size needs
    /// `allow_shrink`. Returns the old size. Blocks the calling thread.
    pub fn resize(&self, size: u64, allow_shrink: bool) -> Result<u64, ObjectError> {
        let inner = &self.inner;
        if self.read_only {
            return Err(ObjectError::ReadOnly(inner.name.clone()));
        }
        if size == 0 || !size.is_multiple_of(BLOCK as u64) {
            return Err(ObjectError::BadSize(size));
        }
        let _one = inner.admin.locked();
        let name = self.volume_name().to_owned();
        let mut desc = runtime().block_on(layout::read_descriptor(&inner.store, &name))?;
        let old = inner.size.load(Ordering::Acquire);
        if size < old && !allow_shrink {
            return Err(ObjectError::Shrink {
                name,
                from: old,
                to: size,
            });
        }
        if size < old {
            // New requests past the end are refused from here on; then the
            // tail is trimmed and that trim reaches the store before the
            // descriptor says the volume is smaller.
            inner.size.store(size, Ordering::Release);
            let (lba, blocks) = (size / BLOCK as u64, (old - size) / BLOCK as u64);
            while self
                .append(Kind::Hole, lba, blocks, &[])
                .map_err(ObjectError::Write)?
                .is_none()
            {
                inner.upload_wake.notify_one();
                std::thread::sleep(Duration::from_millis(5));
            }
            let cut = self.cut(false);
            self.wait_uploaded(cut)?;
        }
        desc.size = size;
        let body = serde_json::to_vec_pretty(&desc).map_err(|source| ObjectError::Encode {
            what: "volume descriptor",
            source,
        })?;
        runtime().block_on(
            inner
                .store
                .put(&Keys::new(&name).descriptor(), Bytes::from(body)),
        )?;
        inner.size.store(size, Ordering::Release);
        for hook in inner.resize_hooks.locked().iter() {
            hook(size);
        }
        info!(volume = %name, from = old, to = size, "volume resized");
        Ok(old)
    }
}
