//! The control API: JSON over HTTP on a Unix socket (mode 0600).
//!
//! | method | path | body → reply |
//! |---|---|---|
//! | GET | /v1/volumes | → [VolumeListing] |
//! | POST | /v1/volumes | CreateVolume → VolumeInfo |
//! | DELETE | /v1/volumes/{name} | → {} |
//! | GET | /v1/volumes/{name}/data?offset=N&length=N | → raw bytes (≤ 1 MiB) |
//! | GET | /v1/vms | → [VmInfo] |
//! | POST | /v1/vms | VmConfig → VmInfo |
//! | DELETE | /v1/vms/{name}?grace=SECS | → {"outcome": StopOutcome} |
//! | POST | /v1/vms/{name}/disks | AttachRequest → DiskInfo |
//! | DELETE | /v1/vms/{name}/disks/{volume}?wait=SECS | → {} |
//! | GET | /v1/status (or /status) | → Status |
//! | GET | /metrics | → Prometheus text format 0.0.4 |

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

use super::http::{self, HttpError, Request, Response};
use super::metrics::Sources;
use super::volumes::{CreateVolume, VolumeCatalog, VolumeStoreError};
use crate::runtime::{StoppableTask, runtime};
use crate::server::Registry;
use crate::vm::ErrorChain;
use crate::vm::config::VmConfig;
use crate::vm::supervisor::{Supervisor, SupervisorError};
use crate::volume::sync::SyncDriver;

/// Largest volume read through the API.
pub const MAX_READ: u64 = 1 << 20;
/// Default wait for a guest to power off before SIGTERM.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);
/// Default wait for a guest to release a hot-detached disk.
pub const DEFAULT_UNPLUG_WAIT: Duration = Duration::from_secs(30);

/// Body of a hot-attach request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttachRequest {
    pub volume: String,
    #[serde(default)]
    pub read_only: bool,
}

/// A volume as `GET /v1/volumes` lists it: catalogued or a static export.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeListing {
    pub name: String,
    /// Backend name, or `export` for volumes given to `vbd serve --export`.
    pub backend: String,
    pub size: u64,
    pub read_only: bool,
    pub description: String,
    pub exported: bool,
    pub used_by: Option<String>,
}

/// What the API serves.
pub struct ControlApi {
    pub supervisor: Arc<Supervisor>,
    pub catalog: Arc<VolumeCatalog>,
    pub registry: Arc<Registry>,
    /// What `/metrics` and `/v1/status` read.
    pub sources: Arc<Sources>,
}

/// A running control socket.
pub struct ControlServer {
    path: PathBuf,
    task: StoppableTask,
}

impl ControlServer {
    /// Stops accepting, and removes the socket file.
    pub fn shutdown(self) {
        self.task.stop();
        if let Err(e) = std::fs::remove_file(&self.path) {
            warn!(path = %self.path.display(), "cannot remove control socket: {e}");
        }
    }
}

/// Binds `path` (mode 0600) and serves `api` on the control runtime.
pub fn serve(path: &Path, api: Arc<ControlApi>) -> std::io::Result<ControlServer> {
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
    info!(path = %path.display(), "control API listening");
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
    Ok(ControlServer {
        path: path.to_owned(),
        task,
    })
}

async fn connection(mut stream: UnixStream, api: Arc<ControlApi>) {
    let req = match tokio::time::timeout(Duration::from_secs(30), http::read_request(&mut stream))
        .await
    {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let status = match e {
                HttpError::BodyTooLarge(_) | HttpError::HeadTooLarge => 413,
                HttpError::Chunked => 411,
                _ => 400,
            };
            let _ = http::write_response(&mut stream, &error(status, e.to_string())).await;
            return;
        }
        Err(_) => return,
    };
    debug!(method = %req.method, path = ?req.segments, "control request");
    let resp = route(&api, &req).await;
    if let Err(e) = http::write_response(&mut stream, &resp).await {
        debug!("control reply not sent: {e}");
    }
}

fn ok_json<T: Serialize>(status: u16, v: &T) -> Response {
    match serde_json::to_vec(v) {
        Ok(body) => Response {
            status,
            content_type: "application/json",
            body,
        },
        Err(e) => error(500, format!("cannot encode reply: {e}")),
    }
}

fn error(status: u16, msg: String) -> Response {
    ok_json_raw(status, json!({ "error": msg }))
}

fn ok_json_raw(status: u16, v: serde_json::Value) -> Response {
    Response {
        status,
        content_type: "application/json",
        body: v.to_string().into_bytes(),
    }
}

fn sup_error(e: SupervisorError) -> Response {
    use SupervisorError as E;
    let status = match &e {
        E::NoVm(_) | E::NoVolume(_) | E::NotAttached { .. } => 404,
        E::Exists(_)
        | E::VolumeInUse { .. }
        | E::NotRunning(_)
        | E::NoFreePort { .. }
        | E::ColdAttached { .. }
        | E::Export(_) => 409,
        E::Config(_) | E::BadVolumeName(_) => 400,
        _ => 500,
    };
    error(status, ErrorChain(&e).to_string())
}

fn vol_error(e: VolumeStoreError) -> Response {
    use VolumeStoreError as E;
    let status = match &e {
        E::Missing(_) => 404,
        E::Exists(_) => 409,
        E::Open { .. } => 500,
        _ => 400,
    };
    error(status, e.to_string())
}

fn body<T: for<'de> Deserialize<'de>>(req: &Request) -> Result<T, Response> {
    serde_json::from_slice(&req.body).map_err(|e| error(400, format!("bad JSON body: {e}")))
}

fn seconds(req: &Request, key: &str, default: Duration) -> Result<Duration, Response> {
    match req.param(key) {
        None => Ok(default),
        Some(v) => v
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s >= 0.0 && *s < 86400.0)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| error(400, format!("{key}={v:?} must be seconds, e.g. {key}=30"))),
    }
}

async fn route(api: &Arc<ControlApi>, req: &Request) -> Response {
    let segs: Vec<&str> = req.segments.iter().map(String::as_str).collect();
    let r = match (req.method.as_str(), segs.as_slice()) {
        ("GET", ["metrics"]) => Ok(super::metrics::response(&api.sources)),
        ("GET", ["v1", "status"] | ["status"]) => {
            Ok(ok_json(200, &super::status::gather(&api.sources).await))
        }
        ("GET", ["v1", "volumes"]) => Ok(list_volumes(api)),
        ("POST", ["v1", "volumes"]) => create_volume(api, req),
        ("DELETE", ["v1", "volumes", name]) => delete_volume(api, name),
        ("GET", ["v1", "volumes", name, "data"]) => read_volume(api, req, name).await,
        ("GET", ["v1", "vms"]) => Ok(ok_json(200, &api.supervisor.list())),
        ("POST", ["v1", "vms"]) => match body::<VmConfig>(req) {
            Ok(cfg) => Ok(match api.supervisor.start(cfg).await {
                Ok(info) => ok_json(201, &info),
                Err(e) => sup_error(e),
            }),
            Err(r) => Err(r),
        },
        ("DELETE", ["v1", "vms", name]) => match seconds(req, "grace", DEFAULT_GRACE) {
            Ok(grace) => Ok(match api.supervisor.stop(name, grace).await {
                Ok(outcome) => ok_json_raw(200, json!({ "outcome": outcome })),
                Err(e) => sup_error(e),
            }),
            Err(r) => Err(r),
        },
        ("POST", ["v1", "vms", name, "disks"]) => match body::<AttachRequest>(req) {
            Ok(a) => Ok(
                match api.supervisor.attach(name, &a.volume, a.read_only).await {
                    Ok(d) => ok_json(201, &d),
                    Err(e) => sup_error(e),
                },
            ),
            Err(r) => Err(r),
        },
        ("DELETE", ["v1", "vms", name, "disks", volume]) => {
            match seconds(req, "wait", DEFAULT_UNPLUG_WAIT) {
                Ok(wait) => Ok(match api.supervisor.detach(name, volume, wait).await {
                    Ok(()) => ok_json_raw(200, json!({})),
                    Err(e) => sup_error(e),
                }),
                Err(r) => Err(r),
            }
        }
        (_, ["v1", "volumes", ..])
        | (_, ["v1", "vms", ..])
        | (_, ["v1", "status"] | ["status"] | ["metrics"]) => Err(error(
            405,
            format!("{} is not allowed on this path", req.method),
        )),
        _ => Err(error(404, format!("no such endpoint: /{}", segs.join("/")))),
    };
    r.unwrap_or_else(|e| e)
}

fn list_volumes(api: &ControlApi) -> Response {
    let mut out: Vec<VolumeListing> = api
        .catalog
        .list()
        .into_iter()
        .map(|v| VolumeListing {
            exported: api.registry.by_name(&v.name).is_some(),
            used_by: api.supervisor.user_of(&v.name),
            name: v.name,
            backend: v.backend,
            size: v.size,
            read_only: v.read_only,
            description: v.description,
        })
        .collect();
    for e in api.registry.all() {
        if api.catalog.get(&e.name).is_none() {
            out.push(VolumeListing {
                name: e.name.clone(),
                backend: "export".into(),
                size: e.info.size,
                read_only: e.read_only,
                description: e.description.clone(),
                exported: true,
                used_by: api.supervisor.user_of(&e.name),
            });
        }
    }
    ok_json(200, &out)
}

fn create_volume(api: &ControlApi, req: &Request) -> Result<Response, Response> {
    let spec: CreateVolume = body(req)?;
    if api.registry.by_name(&spec.name).is_some() {
        return Err(error(
            409,
            format!(
                "an export named {:?} already exists; pick another name",
                spec.name
            ),
        ));
    }
    api.catalog
        .create(&spec)
        .map(|info| ok_json(201, &info))
        .map_err(vol_error)
}

fn delete_volume(api: &ControlApi, name: &str) -> Result<Response, Response> {
    if let Some(vm) = api.supervisor.user_of(name) {
        return Err(error(
            409,
            format!("volume {name:?} is in use by VM {vm:?}; detach it or stop the VM first"),
        ));
    }
    let volume = api.catalog.remove(name).map_err(vol_error)?;
    crate::control::volumes::shutdown_detached(volume);
    Ok(ok_json_raw(200, json!({})))
}

async fn read_volume(api: &ControlApi, req: &Request, name: &str) -> Result<Response, Response> {
    let num = |k: &str| -> Result<u64, Response> {
        req.param(k)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| error(400, format!("{k}= must be a number of bytes")))
    };
    let offset = num("offset")?;
    let length = num("length")?;
    if length > MAX_READ {
        return Err(error(
            400,
            format!("length {length} is larger than {MAX_READ}; read in pieces"),
        ));
    }
    let volume = match api.registry.by_name(name) {
        Some(e) => e.volume.clone(),
        None => {
            api.catalog
                .get(name)
                .ok_or_else(|| error(404, format!("no volume or export named {name:?}")))?
                .0
        }
    };
    if offset
        .checked_add(length)
        .is_none_or(|end| end > volume.size())
    {
        return Err(error(
            400,
            format!(
                "range {offset}+{length} is outside the volume ({} bytes)",
                volume.size()
            ),
        ));
    }
    let data = tokio::task::spawn_blocking(move || {
        let mut d = SyncDriver::new().map_err(|e| e.to_string())?;
        d.read(&*volume, offset, length as usize)
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| error(500, e.to_string()))?
    .map_err(|e| error(500, format!("read failed: {e}")))?;
    Ok(Response {
        status: 200,
        content_type: "application/octet-stream",
        body: data,
    })
}
