//! Volume administration against a store: create, list, inspect, delete.

use serde::Serialize;

use tracing::info;

use super::layout::{self, Descriptor, Keys};
use super::{ObjectError, ObjectOptions, ObjectVolume};
use crate::objstore::Store;
use crate::runtime::runtime;

/// What `vbd volume info` shows.
#[derive(Clone, Debug, Serialize)]
pub struct VolumeInfo {
    /// Name, size, block size and creation time, flattened into this JSON.
    #[serde(flatten)]
    pub descriptor: Descriptor,
    /// Chunk objects in the store.
    pub chunks: u64,
    /// Bytes the volume's objects take in the store.
    pub stored_bytes: u64,
    /// Checkpoint objects in the store.
    pub checkpoints: u64,
    /// The process holding the writer lock, if any.
    pub locked_by: Option<String>,
}

/// Creates an empty volume: only a descriptor, so any size is instant and
/// costs nothing until written.
pub async fn create(store: &Store, name: &str, size: u64) -> Result<Descriptor, ObjectError> {
    layout::create_descriptor(store, name, size).await
}

/// Opens volume `name` in the store at `url`, first creating it with
/// `create` bytes if it does not exist yet. One path for `--export` and the
/// control API, so both treat a store the same way.
pub fn open_url(
    url: &str,
    name: &str,
    create_size: Option<u64>,
    opts: ObjectOptions,
) -> Result<ObjectVolume, ObjectError> {
    let store = Store::open(url)?;
    if let Some(size) = create_size {
        match runtime().block_on(create(&store, name, size)) {
            Ok(_) => info!(volume = name, size, store = url, "created object volume"),
            Err(ObjectError::Exists(_)) => {}
            Err(e) => return Err(e),
        }
    }
    ObjectVolume::open(store, name, opts)
}

/// Every volume in the store.
pub async fn list(store: &Store) -> Result<Vec<Descriptor>, ObjectError> {
    let mut out = Vec::new();
    for name in store.list_dirs("volumes").await? {
        match layout::read_descriptor(store, &name).await {
            Ok(d) => out.push(d),
            // A directory no volume could be named after is not one.
            Err(ObjectError::NoSuchVolume(_) | ObjectError::BadName(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// A volume's descriptor and storage use.
pub async fn info(store: &Store, name: &str) -> Result<VolumeInfo, ObjectError> {
    let descriptor = layout::read_descriptor(store, name).await?;
    let keys = Keys::new(name);
    let objects = store.list(keys.root()).await?;
    let chunks = objects
        .iter()
        .filter(|(k, _)| k.contains("/chunks/"))
        .count() as u64;
    let checkpoints = objects
        .iter()
        .filter(|(k, _)| k.contains("/checkpoints/"))
        .count() as u64;
    let stored_bytes = objects.iter().map(|(_, s)| s).sum();
    let locked_by = layout::lock_owner(store, name)
        .await?
        .map(|o| format!("pid {} on {}", o.pid, o.host));
    Ok(VolumeInfo {
        descriptor,
        chunks,
        stored_bytes,
        checkpoints,
        locked_by,
    })
}

/// Deletes a volume's objects; refuses while a writer holds it, unless
/// `force` (for a lock left by a machine that is gone).
pub async fn delete(store: &Store, name: &str, force: bool) -> Result<(), ObjectError> {
    layout::read_descriptor(store, name).await?;
    if let Some(o) = layout::lock_owner(store, name).await?
        && !force
    {
        return Err(ObjectError::Locked {
            name: name.to_owned(),
            owner: format!("pid {} on {}", o.pid, o.host),
        });
    }
    let keys = Keys::new(name);
    // The descriptor goes last, so an interrupted delete can be repeated.
    let descriptor = keys.descriptor();
    for (key, _) in store.list(keys.root()).await? {
        if key != descriptor {
            store.delete(&key).await?;
        }
    }
    store.delete(&descriptor).await?;
    Ok(())
}
