//! Resize: growing changes the size and nothing else (the new blocks read
//! as zeroes); shrinking first trims the tail, so a later grow reads
//! zeroes there too. On an open volume the size changes live: new requests
//! are checked against it, NBD clients see it at their next handshake, and
//! hooks ([`crate::volume::Volume::watch_size`]) hear of it.
//!
//! The size is not written into the descriptor: each resize creates a
//! record, `sizes/<id>`, with an id of the writer's sequence (see
//! `generation`), and the size is the one in the newest record that
//! counts. A writer fenced in the middle of a resize therefore cannot
//! change the volume under its successor: its late record does not count,
//! and no record is ever overwritten, so none of the successor's is lost.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tracing::info;

use super::format::{BLOCK, Kind};
use super::layout::{Keys, id_of};
use super::{ObjectError, ObjectVolume, fence, generation};
use crate::lock::MutexExt;
use crate::objstore::{Store, StoreError};
use crate::runtime::runtime;

/// `sizes/<id>`: the size a resize set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct SizeRecord {
    /// Bytes.
    size: u64,
}

/// The size the newest resize that counts set, if any did.
pub(super) async fn resized(store: &Store, keys: &Keys) -> Result<Option<u64>, ObjectError> {
    let mut ids: Vec<u64> = store
        .list(&keys.sizes())
        .await?
        .iter()
        .filter_map(|(k, _)| id_of(k))
        .collect();
    if ids.is_empty() {
        return Ok(None);
    }
    let fences = generation::read_fences(store, keys).await?;
    ids.sort_unstable();
    for id in ids.into_iter().rev().filter(|&id| fences.counts(id)) {
        let key = keys.size(id);
        let body = match store.get(&key).await {
            Ok(b) => b,
            // Pruned by a newer resize since the listing.
            Err(StoreError::NotFound(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        let r: SizeRecord = serde_json::from_slice(&body)
            .map_err(|source| ObjectError::Descriptor { key, source })?;
        return Ok(Some(r.size));
    }
    Ok(None)
}

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
        inner.fence.check_admin()?;
        let _one = inner.admin.locked();
        let name = self.volume_name().to_owned();
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
            // record says the volume is smaller.
            inner.size.store(size, Ordering::Release);
            let (lba, blocks) = (size / BLOCK as u64, (old - size) / BLOCK as u64);
            while self
                .append(Kind::Hole, lba, blocks, None)
                .map_err(ObjectError::Write)?
                .is_none()
            {
                inner.upload_wake.notify_one();
                std::thread::sleep(Duration::from_millis(5));
            }
            let cut = self.cut(false);
            self.wait_uploaded(cut)?;
        }
        let body =
            serde_json::to_vec(&SizeRecord { size }).map_err(|source| ObjectError::Encode {
                what: "resize record",
                source,
            })?;
        let id = runtime().block_on(async {
            let order = inner.fence.put_order().await;
            let id = inner.fence.next_id(&order)?;
            inner
                .store
                .put(&inner.keys.size(id), Bytes::from(body))
                .await?;
            drop(order);
            fence::verified(inner).await?;
            Ok::<u64, ObjectError>(id)
        })?;
        inner.size.store(size, Ordering::Release);
        for hook in inner.resize_hooks.locked().iter() {
            hook(size);
        }
        // Older records are superseded by this one, which counts.
        runtime().block_on(async {
            for (key, _) in inner.store.list(&inner.keys.sizes()).await? {
                if id_of(&key).is_some_and(|old| old < id) {
                    inner.store.delete(&key).await?;
                }
            }
            Ok::<(), StoreError>(())
        })?;
        info!(volume = %name, from = old, to = size, "volume resized");
        Ok(old)
    }
}
