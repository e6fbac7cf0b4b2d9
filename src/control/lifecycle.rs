//! The control API's volume lifecycle: snapshots, clones, resize, flatten
//! and garbage collection of the object volumes this server has open (as
//! exports or catalogued), so they are consistent with the writes in
//! flight. Each runs on a blocking thread: they wait for the store.

use std::sync::Arc;

use super::api::ControlApi;
use super::error::ApiError;
use super::model::{
    CloneReply, CloneRequest, CreateVolume, DiskSnapshot, ResizeReply, ResizeRequest, SnapshotInfo,
    SnapshotMeta, SnapshotRequest, StoreVolumeInfo, WorkReply,
};
use crate::volume::Volume;
use crate::volume::object::{ObjectError, ObjectVolume, admin, clone, snapshot};

/// The open object volume a server name (export or catalog) stands for.
fn object(api: &ControlApi, name: &str) -> Result<Arc<dyn Volume>, ApiError> {
    let v = match api.registry.by_name(name) {
        Some(e) => e.volume.clone(),
        None => {
            api.catalog
                .get(name)
                .ok_or_else(|| ApiError::NoVolume(name.to_owned()))?
                .0
        }
    };
    if v.as_object().is_none() {
        return Err(ApiError::NotObject(name.to_owned()));
    }
    Ok(v)
}

/// Runs `f` on the object volume `name`, on a blocking thread.
async fn with_object<T: Send + 'static>(
    api: &ControlApi,
    name: &str,
    f: impl FnOnce(&ObjectVolume) -> Result<T, ObjectError> + Send + 'static,
) -> Result<T, ApiError> {
    let v = object(api, name)?;
    tokio::task::spawn_blocking(move || match v.as_object() {
        Some(o) => f(o),
        None => unreachable!("checked by object()"),
    })
    .await
    .map_err(|e| ApiError::Task(Box::new(e)))?
    .map_err(ApiError::from)
}

/// `POST /v1/volumes/{name}/snapshots`.
pub(super) async fn snapshot(
    api: &ControlApi,
    name: &str,
    req: SnapshotRequest,
) -> Result<SnapshotMeta, ApiError> {
    with_object(api, name, move |o| o.snapshot(&req.name)).await
}

/// `GET /v1/volumes/{name}/snapshots`.
pub(super) async fn snapshots(api: &ControlApi, name: &str) -> Result<Vec<SnapshotInfo>, ApiError> {
    with_object(api, name, |o| {
        let (store, volume) = (o.store().clone(), o.volume_name().to_owned());
        crate::runtime::runtime().block_on(snapshot::list(&store, &volume))
    })
    .await
}

/// `DELETE /v1/volumes/{name}/snapshots/{snap}`.
pub(super) async fn delete_snapshot(
    api: &ControlApi,
    name: &str,
    snap: &str,
) -> Result<(), ApiError> {
    let snap = snap.to_owned();
    with_object(api, name, move |o| o.delete_snapshot(&snap)).await
}

/// `POST /v1/volumes/{name}/clones`: made in the store (no data copied),
/// then opened in the catalog if asked.
pub(super) async fn clone(
    api: &ControlApi,
    name: &str,
    req: CloneRequest,
) -> Result<CloneReply, ApiError> {
    let r = req.clone();
    let (store_url, d) = with_object(api, name, move |o| {
        let store = o.store().clone();
        let volume = o.volume_name().to_owned();
        let d = crate::runtime::runtime().block_on(clone::create(
            &store,
            &volume,
            &r.snapshot,
            &r.name,
        ))?;
        Ok((store.url().to_owned(), (volume, d)))
    })
    .await?;
    let (volume, d) = d;
    if req.open {
        let mut options = serde_json::Map::new();
        options.insert("store".into(), store_url.into());
        api.catalog.create(&CreateVolume {
            name: req.name.clone(),
            backend: "object".into(),
            size: None,
            read_only: false,
            options,
        })?;
    }
    Ok(CloneReply {
        name: d.name,
        size: d.size,
        parent: format!("{volume}@{}", req.snapshot),
        opened: req.open,
    })
}

/// `POST /v1/volumes/{name}/resize`.
pub(super) async fn resize(
    api: &ControlApi,
    name: &str,
    req: ResizeRequest,
) -> Result<ResizeReply, ApiError> {
    let old_size = with_object(api, name, move |o| o.resize(req.size, req.allow_shrink)).await?;
    // A guest attached over vhost-user hears of it at once (NBD clients
    // see the new size on their next connection).
    match api.sources.vhost.set_capacity(name, req.size) {
        Ok(true) => tracing::info!(
            volume = name,
            size = req.size,
            "vhost-user frontend told of the resize"
        ),
        Ok(false) => {}
        Err(e) => tracing::warn!(
            volume = name,
            "vhost-user device not resized: {}",
            crate::error::Chain(&e)
        ),
    }
    Ok(ResizeReply {
        old_size,
        size: req.size,
    })
}

/// `POST /v1/volumes/{name}/flatten`.
pub(super) async fn flatten(api: &ControlApi, name: &str) -> Result<WorkReply, ApiError> {
    let count = with_object(api, name, |o| o.flatten()).await?;
    Ok(WorkReply { count })
}

/// `POST /v1/volumes/{name}/gc`: readers may be mid-fetch, so collected
/// chunks go after the grace period.
pub(super) async fn gc(api: &ControlApi, name: &str) -> Result<WorkReply, ApiError> {
    let count = with_object(api, name, |o| o.collect_garbage(false)).await?;
    Ok(WorkReply { count })
}

/// `GET /v1/volumes/{name}/info`: the store's view of an open object volume.
pub(super) async fn info(api: &ControlApi, name: &str) -> Result<StoreVolumeInfo, ApiError> {
    with_object(api, name, |o| {
        let (store, volume) = (o.store().clone(), o.volume_name().to_owned());
        crate::runtime::runtime().block_on(admin::info(&store, &volume))
    })
    .await
}

/// `POST /v1/vms/{name}/snapshots`: snapshots every object disk of a VM.
pub(super) async fn vm_snapshot(
    api: &ControlApi,
    vm: &str,
    req: SnapshotRequest,
) -> Result<Vec<DiskSnapshot>, ApiError> {
    let info = api
        .supervisor
        .list()
        .into_iter()
        .find(|v| v.name == vm)
        .ok_or_else(|| ApiError::NoVm(vm.to_owned()))?;
    let mut out = Vec::new();
    for d in info.disks {
        if object(api, &d.volume).is_err() {
            continue;
        }
        let snap = snapshot(api, &d.volume, req.clone()).await?;
        out.push(DiskSnapshot {
            volume: d.volume,
            snapshot: snap,
        });
    }
    Ok(out)
}
