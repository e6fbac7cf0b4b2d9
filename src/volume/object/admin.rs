//! Volume administration against a store: create, list, inspect, delete.
//! Deleting respects clones: a volume (or one of its snapshots) that
//! something still reads through stays, and the error names what.

use serde::{Deserialize, Serialize};

use tracing::info;

use super::generation;
use super::layout::{self, Descriptor, Keys};
use super::lineage::{self, Layer, layer_of};
use super::state::Mapping;
use super::{
    CloseOutcome, Durability, ObjectError, ObjectOptions, ObjectVolume, recovery, refs, snapshot,
    transfer,
};
use crate::objstore::Store;
use crate::runtime::runtime;

/// What `vbd volume info` shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
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
    /// The process holding the volume for writing, if any.
    pub locked_by: Option<String>,
    /// The newest writer generation (0: never opened for writing since
    /// vbd had generations).
    pub generation: u64,
    /// Whether that generation released the volume cleanly (nothing left
    /// in its WAL: another host opens it with nothing to recover).
    pub released: bool,
    /// What that generation's FLUSH promised (`local` or `store`).
    pub durability: Option<Durability>,
    /// The generation it took the volume over from without a release, if any.
    pub took_over_from: Option<u64>,
    /// Objects (chunks, checkpoints, snapshots, flatten marks, resize
    /// records) that fenced generations put after their fence: ignored by
    /// every reader, deleted by the holder's garbage collection.
    pub fenced_objects: u64,
    /// The snapshot this clone reads through (`volume@snapshot`), if any.
    pub parent: Option<String>,
    /// What a clone was made from, kept after it is flattened.
    pub origin: Option<String>,
    /// Its parent chain, parent first (`volume@snapshot` each).
    pub ancestors: Vec<String>,
    /// The volume's snapshots, oldest name first.
    pub snapshots: Vec<String>,
    /// Clones and clones' snapshots that read through this volume's snapshots.
    pub clones: Vec<String>,
    /// Bytes of data the volume's map points at in its own chunks.
    pub own_bytes: u64,
    /// Bytes of data it reads through from its parents' chunks (shared
    /// with them and their other clones).
    pub shared_bytes: u64,
    /// An import that never finished.
    pub unfinished_import: bool,
}

/// Creates an empty volume: only a descriptor, so any size is instant and
/// costs nothing until written.
pub async fn create(store: &Store, name: &str, size: u64) -> Result<Descriptor, ObjectError> {
    if !layout::valid_name(name) {
        return Err(ObjectError::BadName(name.to_owned()));
    }
    // A clone that never got its descriptor may have left its lineage.
    if layout::read_descriptor(store, name).await.is_err() {
        lineage::remove(store, name).await?;
    }
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
    let volume = super::snapshot::split(name).0;
    runtime().block_on(transfer::check_finished(&store, volume))?;
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
    let fences = generation::read_fences(store, &keys).await?;
    let with_ids = keys.with_ids();
    let (snapshots, fenced_snapshots): (Vec<_>, Vec<_>) = snapshot::all(store, name)
        .await?
        .into_iter()
        .partition(|(_, meta)| meta.counts(&fences));
    let fenced_objects = objects
        .iter()
        .filter(|(k, _)| with_ids.iter().any(|p| k.starts_with(&format!("{p}/"))))
        .filter_map(|(k, _)| layout::id_of(k))
        .filter(|&id| !fences.counts(id))
        .count() as u64
        + fenced_snapshots.len() as u64;
    let h = generation::holding(store, &keys).await?;
    let legacy = layout::lock_owner(store, name)
        .await?
        .map(|o| format!("pid {} on {}", o.pid, o.host));
    let record = lineage::read(store, name).await?;
    let mut map = recovery::load_map(store, &keys, &fences).await?;
    super::clone::apply_parent(store, name, &mut map).await?;
    let (mut own_bytes, mut shared_bytes) = (0, 0);
    for sp in map.map.iter() {
        if let Mapping::Chunk { id, .. } = sp.value {
            let bytes = (sp.end - sp.start) * super::format::BLOCK as u64;
            if layer_of(id) == 0 {
                own_bytes += bytes;
            } else {
                shared_bytes += bytes;
            }
        }
    }
    Ok(VolumeInfo {
        descriptor,
        chunks,
        stored_bytes,
        checkpoints,
        locked_by: legacy.or_else(|| h.holder()),
        generation: h.generation,
        released: h.released,
        durability: h.record.as_ref().map(|r| r.durability),
        took_over_from: h.record.as_ref().and_then(|r| r.took_over),
        fenced_objects,
        parent: record
            .as_ref()
            .and_then(|l| l.parent.as_ref())
            .map(Layer::to_string),
        origin: record.as_ref().map(|l| l.origin.to_string()),
        ancestors: record
            .map(|l| l.layers.iter().map(Layer::to_string).collect())
            .unwrap_or_default(),
        snapshots: snapshots.into_iter().map(|(n, _)| n).collect(),
        clones: refs::dependents(store, name, None).await?,
        own_bytes,
        shared_bytes,
        unfinished_import: transfer::is_unfinished(store, name).await?,
    })
}

/// Who holds a volume for writing, as text; `None` when nobody does.
pub async fn holder(store: &Store, name: &str) -> Result<Option<String>, ObjectError> {
    if let Some(o) = layout::lock_owner(store, name).await? {
        return Ok(Some(format!("pid {} on {}", o.pid, o.host)));
    }
    Ok(generation::holding(store, &Keys::new(name)).await?.holder())
}

/// What `vbd volume take-over` (and `release` of a volume nobody serves)
/// did.
#[derive(Clone, Debug, Serialize)]
pub struct Handoff {
    /// The generation that opened the volume and then released it.
    pub generation: u64,
    /// How it came to that generation (`released`, `stale-local`, `take-over`, ...).
    pub handover: String,
    /// What the previous holder may have lost, if it did not release.
    pub loss: Option<String>,
    /// Whether the volume is now released (free for any host).
    pub released: bool,
}

/// Opens volume `name` for writing (fencing its holder if `opts.take_over`),
/// which settles it at what the store and this host's WAL hold, and closes
/// it again, releasing it for whichever host opens it next.
pub fn settle(url: &str, name: &str, opts: ObjectOptions) -> Result<Handoff, ObjectError> {
    let store = Store::open(url)?;
    runtime().block_on(transfer::check_finished(&store, name))?;
    let v = ObjectVolume::open(store, name, opts)?;
    let generation = v.generation();
    let handover = v.handover().unwrap_or("read-only").to_owned();
    let loss = v.loss_report().map(str::to_owned);
    let released = matches!(v.release(), CloseOutcome::Released { .. });
    Ok(Handoff {
        generation,
        handover,
        loss,
        released,
    })
}

/// Deletes a volume's objects; refuses while a writer holds it, unless
/// `force` (for a lock left by a machine that is gone).
pub async fn delete(store: &Store, name: &str, force: bool) -> Result<(), ObjectError> {
    layout::read_descriptor(store, name).await?;
    let dependents = refs::dependents(store, name, None).await?;
    if !dependents.is_empty() {
        return Err(ObjectError::HasDependents {
            what: format!("volume {name}"),
            dependents,
        });
    }
    if let Some(owner) = holder(store, name).await?
        && !force
    {
        return Err(ObjectError::Locked {
            name: name.to_owned(),
            owner,
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
