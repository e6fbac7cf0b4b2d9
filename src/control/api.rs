//! The control API: JSON over HTTP on a Unix socket (mode 0600). The
//! bodies are [`super::model`]'s types; a refusal is an
//! [`ApiError`], answered as `{"error": "..."}`.
//!
//! | method | path | body → reply |
//! |---|---|---|
//! | GET | /v1/volumes | → [VolumeListing] |
//! | POST | /v1/volumes | CreateVolume → VolumeInfo |
//! | DELETE | /v1/volumes/{name} | → Done (`{}`) |
//! | POST | /v1/volumes/release | ReleaseRequest → ReleaseReply |
//! | GET | /v1/volumes/{name}/data?offset=N&length=N | → raw bytes (≤ 1 MiB) |
//! | GET | /v1/volumes/{name}/info | → StoreVolumeInfo (object volumes) |
//! | GET | /v1/volumes/{name}/snapshots | → [SnapshotInfo] |
//! | POST | /v1/volumes/{name}/snapshots | SnapshotRequest → SnapshotMeta |
//! | DELETE | /v1/volumes/{name}/snapshots/{snap} | → Done |
//! | POST | /v1/volumes/{name}/clones | CloneRequest → CloneReply |
//! | POST | /v1/volumes/{name}/resize | ResizeRequest → ResizeReply |
//! | POST | /v1/volumes/{name}/flatten | → WorkReply (bytes copied) |
//! | POST | /v1/volumes/{name}/gc | → WorkReply (chunks collected) |
//! | POST | /v1/vms/{name}/snapshots | SnapshotRequest → [DiskSnapshot] |
//! | GET | /v1/vms | → list of VmInfo |
//! | POST | /v1/vms | VmConfig → VmInfo |
//! | DELETE | /v1/vms/{name}?grace=SECS | → StopReply |
//! | POST | /v1/vms/{name}/disks | AttachRequest → DiskInfo |
//! | DELETE | /v1/vms/{name}/disks/{volume}?wait=SECS | → Done |
//! | GET | /v1/status (or /status) | → Status |
//! | GET | /metrics | → Prometheus text format 0.0.4 |

use std::error::Error;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

use super::error::ApiError;
use super::http::{self, Request, Response};
use super::lifecycle;
use super::metrics::Sources;
use super::model::{
    AttachRequest, CreateVolume, Done, MAX_READ, StopReply, VolumeInfo, VolumeListing,
};
use super::volumes::VolumeCatalog;
use crate::error::Chain;
use crate::runtime::{StoppableTask, runtime};
use crate::server::Registry;
use crate::vm::config::VmConfig;
use crate::vm::supervisor::Supervisor;
use crate::volume::sync::SyncDriver;

/// Default wait for a guest to power off before SIGTERM.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);
/// Default wait for a guest to release a hot-detached disk.
pub const DEFAULT_UNPLUG_WAIT: Duration = Duration::from_secs(30);

/// What the API serves.
pub struct ControlApi {
    /// Runs the VMs.
    pub supervisor: Arc<Supervisor>,
    /// Volumes created through the API.
    pub catalog: Arc<VolumeCatalog>,
    /// The NBD server's exports.
    pub registry: Arc<Registry>,
    /// What `/metrics` and `/v1/status` read.
    pub sources: Arc<Sources>,
}

/// Where the control API listens.
#[derive(Debug)]
pub enum ControlSocket {
    /// Bind this path (mode 0600) and remove it on shutdown.
    Bind(PathBuf),
    /// A listening socket a service manager opened (socket activation):
    /// served as it is, and left in place on shutdown.
    Passed(std::os::unix::net::UnixListener),
}

/// A running control socket.
pub struct ControlServer {
    /// The socket file vbd made, removed on shutdown.
    owned: Option<PathBuf>,
    task: StoppableTask,
}

impl ControlServer {
    /// Stops accepting, and removes the socket file vbd made.
    pub fn shutdown(self) {
        self.task.stop();
        if let Some(path) = &self.owned
            && let Err(e) = std::fs::remove_file(path)
        {
            warn!(path = %path.display(), "cannot remove control socket: {e}");
        }
    }
}

/// Binds `path` (mode 0600), refusing to take a live vbd's socket.
fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        // A live vbd still answers there: refuse rather than steal its socket.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "control socket {} is in use by another vbd; pick another --control path",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = {
        let _rt = runtime().enter();
        UnixListener::bind(path)?
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves `api` on `socket`, on the control runtime.
pub fn serve(socket: ControlSocket, api: Arc<ControlApi>) -> std::io::Result<ControlServer> {
    let (listener, owned) = match socket {
        ControlSocket::Bind(path) => (bind(&path)?, Some(path)),
        ControlSocket::Passed(std) => {
            std.set_nonblocking(true)?;
            let _rt = runtime().enter();
            (UnixListener::from_std(std)?, None)
        }
    };
    match listener.local_addr() {
        Ok(addr) => match addr.as_pathname() {
            Some(p) => {
                info!(path = %p.display(), passed = owned.is_none(), "control API listening")
            }
            None => info!(
                passed = owned.is_none(),
                "control API listening on an unnamed socket"
            ),
        },
        Err(e) => warn!("control API listening; its address is unknown: {e}"),
    }
    let task = StoppableTask::spawn(|mut stop| async move {
        loop {
            tokio::select! {
                _ = &mut stop => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        tokio::spawn(connection(stream, api.clone()));
                    }
                    Err(e) => {
                        warn!("control accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    });
    Ok(ControlServer { owned, task })
}

async fn connection(mut stream: UnixStream, api: Arc<ControlApi>) {
    let req = match tokio::time::timeout(Duration::from_secs(30), http::read_request(&mut stream))
        .await
    {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let _ = http::write_response(&mut stream, &ApiError::from(e).response()).await;
            return;
        }
        Err(_) => return,
    };
    debug!(method = %req.method, path = ?req.segments, "control request");
    let resp = route(&api, &req).await.unwrap_or_else(|e| {
        debug!(
            status = e.status(),
            "control request refused: {}",
            Chain(&e)
        );
        e.response()
    });
    if let Err(e) = http::write_response(&mut stream, &resp).await {
        debug!("control reply not sent: {e}");
    }
}

fn json<T: Serialize>(status: u16, v: &T) -> Result<Response, ApiError> {
    Ok(Response {
        status,
        content_type: "application/json",
        body: serde_json::to_vec(v).map_err(ApiError::Encode)?,
    })
}

fn body<T: DeserializeOwned>(req: &Request) -> Result<T, ApiError> {
    serde_json::from_slice(&req.body).map_err(ApiError::BadBody)
}

fn seconds(req: &Request, key: &'static str, default: Duration) -> Result<Duration, ApiError> {
    match req.param(key) {
        None => Ok(default),
        Some(v) => v
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s >= 0.0 && *s < 86400.0)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| ApiError::BadSeconds {
                key,
                value: v.to_owned(),
            }),
    }
}

/// Routes one request; handlers stay a line or two each.
async fn route(api: &Arc<ControlApi>, req: &Request) -> Result<Response, ApiError> {
    let segs: Vec<&str> = req.segments.iter().map(String::as_str).collect();
    let sup = &api.supervisor;
    match (req.method.as_str(), segs.as_slice()) {
        ("GET", ["metrics"]) => Ok(super::metrics::response(&api.sources)),
        ("GET", ["v1", "status"] | ["status"]) => {
            json(200, &super::status::gather(&api.sources).await)
        }
        ("GET", ["v1", "volumes"]) => json(200, &list_volumes(api)),
        ("POST", ["v1", "volumes"]) => json(201, &create_volume(api, &body(req)?)?),
        ("POST", ["v1", "volumes", "release"]) => {
            json(200, &super::release::release(api, &body(req)?)?)
        }
        ("DELETE", ["v1", "volumes", name]) => json(200, &delete_volume(api, name)?),
        ("GET", ["v1", "volumes", name, "data"]) => read_volume(api, req, name).await,
        ("GET", ["v1", "volumes", name, "info"]) => json(200, &lifecycle::info(api, name).await?),
        ("GET", ["v1", "volumes", name, "snapshots"]) => {
            json(200, &lifecycle::snapshots(api, name).await?)
        }
        ("POST", ["v1", "volumes", name, "snapshots"]) => {
            json(201, &lifecycle::snapshot(api, name, body(req)?).await?)
        }
        ("DELETE", ["v1", "volumes", name, "snapshots", snap]) => {
            lifecycle::delete_snapshot(api, name, snap).await?;
            json(200, &Done {})
        }
        ("POST", ["v1", "volumes", name, "clones"]) => {
            json(201, &lifecycle::clone(api, name, body(req)?).await?)
        }
        ("POST", ["v1", "volumes", name, "resize"]) => {
            json(200, &lifecycle::resize(api, name, body(req)?).await?)
        }
        ("POST", ["v1", "volumes", name, "flatten"]) => {
            json(200, &lifecycle::flatten(api, name).await?)
        }
        ("POST", ["v1", "volumes", name, "gc"]) => json(200, &lifecycle::gc(api, name).await?),
        ("POST", ["v1", "vms", name, "snapshots"]) => {
            json(201, &lifecycle::vm_snapshot(api, name, body(req)?).await?)
        }
        ("GET", ["v1", "vms"]) => json(200, &sup.list()),
        ("POST", ["v1", "vms"]) => json(201, &sup.start(body::<VmConfig>(req)?).await?),
        ("DELETE", ["v1", "vms", name]) => {
            let grace = seconds(req, "grace", DEFAULT_GRACE)?;
            let outcome = sup.stop(name, grace).await?;
            json(200, &StopReply { outcome })
        }
        ("POST", ["v1", "vms", name, "disks"]) => {
            let a: AttachRequest = body(req)?;
            json(201, &sup.attach(name, &a.volume, a.read_only).await?)
        }
        ("DELETE", ["v1", "vms", name, "disks", volume]) => {
            let wait = seconds(req, "wait", DEFAULT_UNPLUG_WAIT)?;
            sup.detach(name, volume, wait).await?;
            json(200, &Done {})
        }
        (_, ["v1", "volumes", ..])
        | (_, ["v1", "vms", ..])
        | (_, ["v1", "status"] | ["status"] | ["metrics"]) => {
            Err(ApiError::MethodNotAllowed(req.method.clone()))
        }
        _ => Err(ApiError::NoEndpoint(segs.join("/"))),
    }
}

fn list_volumes(api: &ControlApi) -> Vec<VolumeListing> {
    let mut out: Vec<VolumeListing> = api
        .catalog
        .list()
        .into_iter()
        .map(|v| VolumeListing {
            exported: api.registry.by_name(&v.name).is_some(),
            used_by: api.supervisor.user_of(&v.name),
            store: store_of(api, &v.name).map(|s| s.0),
            store_volume: store_of(api, &v.name).map(|s| s.1),
            // Live: the volume may have been resized since it was created.
            size: api
                .catalog
                .get(&v.name)
                .map_or(v.size, |(vol, _)| vol.size()),
            name: v.name,
            backend: v.backend,
            read_only: v.read_only,
            description: v.description,
        })
        .collect();
    for e in api.registry.all() {
        if api.catalog.get(&e.name).is_none() {
            out.push(VolumeListing {
                name: e.name.clone(),
                backend: "export".into(),
                size: e.volume.size(),
                read_only: e.read_only,
                description: e.description.clone(),
                exported: true,
                used_by: api.supervisor.user_of(&e.name),
                store: e.volume.as_object().map(|o| o.store().url().to_owned()),
                store_volume: e.volume.as_object().map(|o| o.name().to_owned()),
            });
        }
    }
    out
}

/// An object volume's store URL and name there, for a server name.
fn store_of(api: &ControlApi, name: &str) -> Option<(String, String)> {
    let v = match api.registry.by_name(name) {
        Some(e) => e.volume.clone(),
        None => api.catalog.get(name)?.0,
    };
    let o = v.as_object()?;
    Some((o.store().url().to_owned(), o.name().to_owned()))
}

fn create_volume(api: &ControlApi, spec: &CreateVolume) -> Result<VolumeInfo, ApiError> {
    if api.registry.by_name(&spec.name).is_some() {
        return Err(ApiError::ExportExists(spec.name.clone()));
    }
    Ok(api.catalog.create(spec)?)
}

fn delete_volume(api: &ControlApi, name: &str) -> Result<Done, ApiError> {
    if let Some(vm) = api.supervisor.user_of(name) {
        return Err(ApiError::VolumeInUse {
            volume: name.to_owned(),
            vm,
        });
    }
    let volume = api.catalog.remove(name)?;
    super::volumes::shutdown_detached(volume);
    Ok(Done {})
}

async fn read_volume(api: &ControlApi, req: &Request, name: &str) -> Result<Response, ApiError> {
    let num = |k: &'static str| -> Result<u64, ApiError> {
        req.param(k)
            .and_then(|v| v.parse().ok())
            .ok_or(ApiError::BadNumber(k))
    };
    let offset = num("offset")?;
    let length = num("length")?;
    if length > MAX_READ {
        return Err(ApiError::ReadTooLong(length));
    }
    let volume = match api.registry.by_name(name) {
        Some(e) => e.volume.clone(),
        None => {
            api.catalog
                .get(name)
                .ok_or_else(|| ApiError::NoVolume(name.to_owned()))?
                .0
        }
    };
    let size = volume.size();
    if offset.checked_add(length).is_none_or(|end| end > size) {
        return Err(ApiError::OutOfRange {
            offset,
            length,
            size,
        });
    }
    let data = tokio::task::spawn_blocking(move || -> Result<_, Box<dyn Error + Send + Sync>> {
        let mut d = SyncDriver::new()?;
        Ok(d.read(&*volume, offset, length as usize)?)
    })
    .await
    .map_err(|e| ApiError::Read(Box::new(e)))?
    .map_err(ApiError::Read)?;
    Ok(Response {
        status: 200,
        content_type: "application/octet-stream",
        body: data,
    })
}
