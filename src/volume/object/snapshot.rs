//! Snapshots: a volume's map frozen at one instant, stored whole as
//! `volumes/<name>/snapshots/<snap>` (see `format::snapshot`). No data is
//! copied; the chunks the frozen map points into are pinned, so garbage
//! collection keeps them (see `refs`).
//!
//! Taking one on an open volume is crash-consistent: under the write-ahead
//! layer's lock the open segment is sealed, so every write acknowledged
//! before is in a segment at or below the cut and every later one above
//! it; segments above the cut are held back from the uploader while the
//! ones below drain to the store, and the map is frozen then, holding
//! exactly the writes up to the cut.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::info;

use super::format::{self, BLOCK, Checkpoint, ChunkRecord, Kind, SNAPSHOT_HEADER};
use super::generation::{self, Fences};
use super::layout::Keys;
use super::lineage::{Layer, layer_of};
use super::state::{ChunkInfo, Mapped};
use super::{ObjectError, ObjectVolume, fence, refs};
use crate::lock::{MutexExt, RwLockExt};
use crate::objstore::{Store, StoreError};
use crate::runtime::runtime;
use crate::volume::valid_name;

/// What a snapshot is, kept as JSON at the head of its object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// The snapshot's name.
    pub name: String,
    /// The volume it was taken of.
    pub volume: String,
    /// When it was taken, in milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// The volume's size then, in bytes.
    pub size: u64,
    /// Layer `k` of the map's chunk ids is `layers[k - 1]` (see `lineage`).
    pub layers: Vec<Layer>,
    /// Its id in the sequence of the writer that took it (see
    /// `generation`): a snapshot a fenced writer took after the take-over
    /// does not count, like its chunks. 0: from before generations.
    #[serde(default)]
    pub id: u64,
}

impl SnapshotMeta {
    /// Whether the snapshot counts under `fences`.
    pub(super) fn counts(&self, fences: &Fences) -> bool {
        self.id == 0 || fences.counts(self.id)
    }
}

/// A snapshot as `vbd volume snapshots` lists it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Name, volume, time, size and layers.
    #[serde(flatten)]
    pub meta: SnapshotMeta,
    /// Bytes of the volume's own chunks that only this snapshot points at:
    /// what deleting it frees (once garbage collection runs).
    pub exclusive_bytes: u64,
}

/// Splits `volume@snapshot`.
pub fn split(name: &str) -> (&str, Option<&str>) {
    match name.split_once('@') {
        Some((v, s)) => (v, Some(s)),
        None => (name, None),
    }
}

/// The snapshot object's key.
pub fn key(volume: &str, snap: &str) -> String {
    format!("{}/snapshots/{snap}", Keys::new(volume).root())
}

fn prefix(volume: &str) -> String {
    format!("{}/snapshots", Keys::new(volume).root())
}

fn check_names(volume: &str, snap: &str) -> Result<(), ObjectError> {
    if !valid_name(volume) {
        return Err(ObjectError::BadName(volume.to_owned()));
    }
    if !valid_name(snap) {
        return Err(ObjectError::BadSnapshotName(snap.to_owned()));
    }
    Ok(())
}

fn missing(volume: &str, snap: &str) -> ObjectError {
    ObjectError::NoSuchSnapshot {
        volume: volume.to_owned(),
        snapshot: snap.to_owned(),
    }
}

fn parse_meta(key: &str, b: &[u8]) -> Result<SnapshotMeta, ObjectError> {
    serde_json::from_slice(b).map_err(|source| ObjectError::Descriptor {
        key: key.to_owned(),
        source,
    })
}

/// A snapshot's description and frozen map (one a fenced writer took
/// after the take-over is not there).
pub async fn read(
    store: &Store,
    volume: &str,
    snap: &str,
) -> Result<(SnapshotMeta, Checkpoint), ObjectError> {
    let (meta, map) = read_any(store, volume, snap).await?;
    if !meta.counts(&fences_of(store, volume).await?) {
        return Err(missing(volume, snap));
    }
    Ok((meta, map))
}

/// The fences the volume's snapshots are judged by.
async fn fences_of(store: &Store, volume: &str) -> Result<Fences, ObjectError> {
    Ok(generation::read_fences(store, &Keys::new(volume)).await?)
}

/// A snapshot's description and frozen map, whether it counts or not.
async fn read_any(
    store: &Store,
    volume: &str,
    snap: &str,
) -> Result<(SnapshotMeta, Checkpoint), ObjectError> {
    check_names(volume, snap)?;
    let key = key(volume, snap);
    let body = match store.get(&key).await {
        Ok(b) => b,
        Err(StoreError::NotFound(_)) => return Err(missing(volume, snap)),
        Err(e) => return Err(e.into()),
    };
    let (meta, map) = format::decode_snapshot(&body).map_err(|source| ObjectError::Corrupt {
        key: key.clone(),
        source,
    })?;
    Ok((parse_meta(&key, meta)?, map))
}

/// A snapshot's description alone (two small ranged reads), if it counts.
pub async fn read_meta(
    store: &Store,
    volume: &str,
    snap: &str,
) -> Result<SnapshotMeta, ObjectError> {
    let meta = read_meta_any(store, volume, snap).await?;
    if !meta.counts(&fences_of(store, volume).await?) {
        return Err(missing(volume, snap));
    }
    Ok(meta)
}

/// A snapshot's description, whether it counts or not.
pub(super) async fn read_meta_any(
    store: &Store,
    volume: &str,
    snap: &str,
) -> Result<SnapshotMeta, ObjectError> {
    check_names(volume, snap)?;
    let key = key(volume, snap);
    let corrupt = |source| ObjectError::Corrupt {
        key: key.clone(),
        source,
    };
    let head = match store.get_range(&key, 0..SNAPSHOT_HEADER as u64).await {
        Ok(b) => b,
        Err(StoreError::NotFound(_)) => return Err(missing(volume, snap)),
        Err(e) => return Err(e.into()),
    };
    let n = format::snapshot_meta_len(&head).map_err(corrupt)?;
    let from = SNAPSHOT_HEADER as u64;
    let meta = store.get_range(&key, from..from + n as u64).await?;
    if meta.len() != n {
        return Err(ObjectError::ShortRead {
            key,
            got: meta.len(),
            want: n,
        });
    }
    parse_meta(&key, &meta)
}

/// Names of a volume's snapshots, sorted (those a fenced writer took
/// after the take-over left out).
pub async fn names(store: &Store, volume: &str) -> Result<Vec<String>, ObjectError> {
    let fences = fences_of(store, volume).await?;
    let mut out = Vec::new();
    for (name, meta) in all(store, volume).await? {
        if meta.counts(&fences) {
            out.push(name);
        }
    }
    Ok(out)
}

/// Every snapshot object of a volume with its description, whether it
/// counts or not, sorted by name.
pub(super) async fn all(
    store: &Store,
    volume: &str,
) -> Result<Vec<(String, SnapshotMeta)>, ObjectError> {
    if !valid_name(volume) {
        return Err(ObjectError::BadName(volume.to_owned()));
    }
    let p = prefix(volume);
    let names: Vec<String> = store
        .list(&p)
        .await?
        .into_iter()
        .filter_map(|(k, _)| k.strip_prefix(&format!("{p}/")).map(str::to_owned))
        .filter(|n| valid_name(n))
        .collect();
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        match read_meta_any(store, volume, &n).await {
            Ok(meta) => out.push((n, meta)),
            // Deleted since the listing.
            Err(ObjectError::NoSuchSnapshot { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// A snapshot's map, ready to serve read-only: its own chunks, its
/// ancestors' (as inherited), its size and layers.
pub(super) async fn load(
    store: &Store,
    volume: &str,
    snap: &str,
) -> Result<(Mapped, SnapshotMeta), ObjectError> {
    let (meta, map) = read(store, volume, snap).await?;
    let mut m = Mapped::default();
    m.merge_entries(&map.entries, |id| id);
    for r in &map.chunks {
        let info = ChunkInfo {
            data_start: r.data_start,
            data_blocks: r.data_blocks,
            live: 0,
        };
        if layer_of(r.id) == 0 {
            m.chunks.insert(r.id, info);
        } else {
            m.inherited.insert(r.id, info);
        }
    }
    m.max_seq = m.max_seq.max(map.max_seq);
    Ok((m, meta))
}

/// Every snapshot of a volume with the bytes only it holds, measured
/// against the others and the volume's map in the store.
pub async fn list(store: &Store, volume: &str) -> Result<Vec<SnapshotInfo>, ObjectError> {
    let mut maps = Vec::new();
    let mut metas = Vec::new();
    for n in names(store, volume).await? {
        let (meta, map) = read(store, volume, &n).await?;
        maps.push(refs::own_runs(&map.entries));
        metas.push(meta);
    }
    let keys = Keys::new(volume);
    let fences = generation::read_fences(store, &keys).await?;
    let head = super::recovery::load_map(store, &keys, &fences).await?;
    maps.push(refs::own_runs(&head.entries()));
    let unique = refs::exclusive_blocks(&maps);
    Ok(metas
        .into_iter()
        .zip(unique)
        .map(|(meta, blocks)| SnapshotInfo {
            meta,
            exclusive_bytes: blocks * BLOCK as u64,
        })
        .collect())
}

/// Deletes a snapshot, unless a clone (or a clone's snapshot) still reads
/// through it. Safe whoever holds the volume, even a writer fenced in the
/// middle of it: it only makes the set of pinned chunks smaller, a writer
/// that still pins them is merely conservative until it reopens, and the
/// mark keeps clones and the delete apart. `generation` is the deleter's
/// (0: not a writer of the volume), recorded in the mark.
pub async fn delete(
    store: &Store,
    volume: &str,
    snap: &str,
    generation: u64,
) -> Result<(), ObjectError> {
    read_meta(store, volume, snap).await?;
    // Marked before the search for dependents: a clone committed after the
    // search finds the mark and undoes itself (see `is_being_deleted`).
    let mark = deleting_key(volume, snap);
    let body =
        serde_json::to_vec(&DeletingMark { generation }).map_err(|source| ObjectError::Encode {
            what: "snapshot deleting mark",
            source,
        })?;
    store.put(&mark, bytes::Bytes::from(body)).await?;
    let dependents = match refs::dependents(store, volume, Some(snap)).await {
        Ok(d) => d,
        Err(e) => {
            store.delete(&mark).await?;
            return Err(e);
        }
    };
    if !dependents.is_empty() {
        store.delete(&mark).await?;
        return Err(ObjectError::HasDependents {
            what: format!("snapshot {volume}@{snap}"),
            dependents,
        });
    }
    store.delete(&key(volume, snap)).await?;
    store.delete(&mark).await?;
    info!(volume, snapshot = snap, "snapshot deleted");
    Ok(())
}

/// `deleting/<snap>`: a delete of the snapshot is under way.
#[derive(Serialize)]
struct DeletingMark {
    /// The deleting writer's generation (0: not a writer of the volume).
    generation: u64,
}

fn deleting_key(volume: &str, snap: &str) -> String {
    format!("{}/{snap}", deleting_prefix(volume))
}

/// Prefix of a volume's deleting marks.
fn deleting_prefix(volume: &str) -> String {
    format!("{}/deleting", Keys::new(volume).root())
}

/// Deletes what fenced writers left of snapshots: snapshot objects whose
/// id does not count under `fences` (a fenced writer took them after the
/// take-over) unless something reads through them, and deleting marks of
/// snapshots that are gone (a deleter stopped between the two deletes).
/// Only ever called by the holder of the volume, which is not fenced.
/// Returns how many objects it deleted.
pub(super) async fn collect_fenced(
    store: &Store,
    volume: &str,
    fences: &Fences,
) -> Result<usize, ObjectError> {
    let mut deleted = 0;
    let snaps = all(store, volume).await?;
    for (name, meta) in &snaps {
        if meta.counts(fences) {
            continue;
        }
        let dependents = refs::dependents(store, volume, Some(name)).await?;
        if !dependents.is_empty() {
            tracing::warn!(volume, snapshot = %name, ?dependents,
                "a fenced writer's snapshot has dependents; kept");
            continue;
        }
        store.delete(&key(volume, name)).await?;
        deleted += 1;
    }
    let p = deleting_prefix(volume);
    for (k, _) in store.list(&p).await? {
        let Some(name) = k.strip_prefix(&format!("{p}/")) else {
            continue;
        };
        // Read again: the listing above may be older than the mark.
        let gone = matches!(
            read_meta_any(store, volume, name).await,
            Err(ObjectError::NoSuchSnapshot { .. })
        );
        if gone {
            store.delete(&k).await?;
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// Whether a delete of `volume@snap` is under way (or it is gone): a clone
/// made from it must not stand.
pub(super) async fn is_being_deleted(
    store: &Store,
    volume: &str,
    snap: &str,
) -> Result<bool, ObjectError> {
    match store.get_range(&deleting_key(volume, snap), 0..1).await {
        Ok(_) => return Ok(true),
        Err(StoreError::NotFound(_)) => {}
        Err(e) => return Err(e.into()),
    }
    match read_meta(store, volume, snap).await {
        Ok(_) => Ok(false),
        Err(ObjectError::NoSuchSnapshot { .. }) => Ok(true),
        Err(e) => Err(e),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl ObjectVolume {
    /// The name it was opened by: `volume`, or `volume@snapshot`.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Whether it was opened read-only (a snapshot always is).
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The store-side name of this volume (without a snapshot).
    pub fn volume_name(&self) -> &str {
        split(&self.inner.name).0
    }

    /// The store this volume lives in.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Seals the open segment: every write acknowledged so far is in a
    /// segment at or below the returned id, every later one above it.
    /// With `hold`, segments above it wait until [`Self::release_uploads`].
    pub(super) fn cut(&self, hold: bool) -> u64 {
        let mut d = self.inner.dirty.write_locked();
        if let Some(a) = d.active.take() {
            a.sealed.store(true, Ordering::Release);
        }
        let cut = d.next_seg - 1;
        if hold {
            // Under the lock the uploader picks its next segment under
            // (see upload::next_segment).
            self.inner.upload_limit.store(cut, Ordering::Release);
        }
        cut
    }

    /// Lets the uploader take every segment again.
    pub(super) fn release_uploads(&self) {
        let _d = self.inner.dirty.write_locked();
        self.inner.upload_limit.store(u64::MAX, Ordering::Release);
        self.inner.upload_wake.notify_one();
    }

    /// Waits until every segment up to `cut` is in the store (bounded by
    /// the drain timeout).
    pub(super) fn wait_uploaded(&self, cut: u64) -> Result<(), ObjectError> {
        let inner = &self.inner;
        let deadline = Instant::now() + inner.opts.drain_timeout;
        inner.wal.kick();
        loop {
            let done = inner
                .dirty
                .read_locked()
                .segments
                .keys()
                .next()
                .is_none_or(|&id| id > cut);
            if done {
                return Ok(());
            }
            // A fenced writer uploads nothing more.
            inner.fence.check_admin()?;
            if Instant::now() > deadline {
                return Err(ObjectError::DrainTimeout(inner.name.clone()));
            }
            inner.upload_wake.notify_one();
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Takes snapshot `snap`: crash-consistent, and instant but for
    /// draining what the write-ahead log holds. Blocks the calling thread.
    pub fn snapshot(&self, snap: &str) -> Result<SnapshotMeta, ObjectError> {
        let inner = &self.inner;
        let volume = self.volume_name().to_owned();
        check_names(&volume, snap)?;
        if self.read_only {
            return Err(ObjectError::ReadOnly(inner.name.clone()));
        }
        inner.fence.check_admin()?;
        let _one = inner.admin.locked();
        let key = key(&volume, snap);
        match runtime().block_on(read_meta_any(&inner.store, &volume, snap)) {
            Ok(m) if m.counts(&inner.fence.fences) => {
                return Err(ObjectError::SnapshotExists {
                    volume,
                    snapshot: snap.to_owned(),
                });
            }
            // Taken by a writer fenced since: not a snapshot of this volume.
            Ok(_) => runtime().block_on(inner.store.delete(&key))?,
            Err(ObjectError::NoSuchSnapshot { .. }) => {}
            Err(e) => return Err(e),
        }
        let cut = self.cut(true);
        let frozen = self.wait_uploaded(cut).map(|()| self.freeze());
        self.release_uploads();
        let (entries, chunks, max_seq) = frozen?;
        let depth = entries
            .iter()
            .filter(|e| e.kind == Kind::Data)
            .map(|e| layer_of(e.chunk) as usize)
            .max()
            .unwrap_or(0);
        let layers = {
            let l = inner.layers.read_locked();
            l[..depth.min(l.len())].to_vec()
        };
        let map = format::encode_checkpoint(0, &entries, &chunks, max_seq);
        let meta = runtime().block_on(async {
            // The id comes from this writer's sequence and the object lands
            // before the next id is handed out (see `generation`).
            let order = inner.fence.put_order().await;
            let meta = SnapshotMeta {
                name: snap.to_owned(),
                volume: volume.clone(),
                created_ms: now_ms(),
                size: inner.size.load(Ordering::Acquire),
                layers,
                id: inner.fence.next_id(&order)?,
            };
            let json = serde_json::to_vec(&meta).map_err(|source| ObjectError::Encode {
                what: "snapshot description",
                source,
            })?;
            let body = bytes::Bytes::from(format::encode_snapshot(&json, &map));
            match inner.store.put_new(&key, body.clone()).await {
                Ok(()) => {}
                Err(StoreError::NoConditionalPut) => inner.store.put(&key, body).await?,
                Err(StoreError::AlreadyExists(_)) => {
                    return Err(ObjectError::SnapshotExists {
                        volume: volume.clone(),
                        snapshot: snap.to_owned(),
                    });
                }
                Err(e) => return Err(e.into()),
            }
            drop(order);
            // Fenced meanwhile: the snapshot does not count, and the holder
            // deletes it.
            fence::verified(inner).await?;
            Ok(meta)
        })?;
        inner.stats.snapshots.fetch_add(1, Ordering::Relaxed);
        info!(volume = %volume, snapshot = snap, extents = entries.len(), "snapshot taken");
        Ok(meta)
    }

    /// The map as it stands, with every chunk it points into, its own
    /// chunks pinned against garbage collection from now on.
    fn freeze(&self) -> (Vec<format::CheckpointEntry>, Vec<ChunkRecord>, u64) {
        let mut m = self.inner.map.write_locked();
        let entries = m.entries();
        let mut chunks = BTreeMap::new();
        for e in entries.iter().filter(|e| e.kind == Kind::Data) {
            if let Some(c) = m.chunk_info(e.chunk) {
                chunks.insert(
                    e.chunk,
                    ChunkRecord {
                        id: e.chunk,
                        data_start: c.data_start,
                        data_blocks: c.data_blocks,
                    },
                );
            }
        }
        let own: BTreeSet<u64> = chunks
            .keys()
            .copied()
            .filter(|&id| layer_of(id) == 0)
            .collect();
        m.pinned.extend(own);
        (entries, chunks.into_values().collect(), m.max_seq)
    }

    /// Deletes one of this volume's snapshots (see [`delete`]) and unpins
    /// what only it held.
    pub fn delete_snapshot(&self, snap: &str) -> Result<(), ObjectError> {
        let inner = &self.inner;
        let volume = self.volume_name().to_owned();
        inner.fence.check_admin()?;
        let _one = inner.admin.locked();
        runtime().block_on(delete(&inner.store, &volume, snap, inner.fence.generation))?;
        let pinned = runtime().block_on(refs::pinned_chunks(&inner.store, &volume))?;
        inner.map.write_locked().pinned = pinned;
        let n = runtime().block_on(names(&inner.store, &volume))?.len() as u64;
        inner.stats.snapshots.store(n, Ordering::Relaxed);
        Ok(())
    }
}
