//! A blocking client for the control API, used by the CLI: one typed method
//! per endpoint, speaking [`super::model`]'s types.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use thiserror::Error;

use super::http::{self, HttpError};
use super::model::{
    AttachRequest, CloneReply, CloneRequest, CreateVolume, DiskInfo, DiskSnapshot, Done, ErrorBody,
    ReleaseReply, ReleaseRequest, ResizeReply, ResizeRequest, SnapshotInfo, SnapshotMeta,
    SnapshotRequest, Status, StopOutcome, StopReply, StoreVolumeInfo, VmConfig, VmInfo, VolumeInfo,
    VolumeListing, WorkReply,
};

/// Why a control call failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The exchange with the server failed.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// vbd refused the request and said why.
    #[error("{0}")]
    Api(String),
    /// The server's reply is neither what was asked for nor an error body.
    #[error("vbd answered {status} with an unreadable body: {body}")]
    BadReply {
        /// The HTTP status.
        status: u16,
        /// The body, as text.
        body: String,
    },
    /// The request body could not be serialised.
    #[error("cannot encode the request")]
    Encode(#[source] serde_json::Error),
}

/// The control socket of a running `vbd serve`.
pub struct ControlClient {
    /// The control socket's path.
    pub socket: PathBuf,
    /// Per call; stops wait for the guest, so this is generous.
    pub timeout: Duration,
}

impl ControlClient {
    /// A client for `socket`.
    pub fn new(socket: &Path) -> Self {
        ControlClient {
            socket: socket.to_owned(),
            timeout: Duration::from_secs(300),
        }
    }

    /// Raw call: status-checked body bytes.
    pub fn call_raw(
        &self,
        method: &str,
        target: &str,
        body: Option<&[u8]>,
    ) -> Result<Vec<u8>, ClientError> {
        let (status, reply) = http::call(&self.socket, method, target, body, self.timeout)?;
        if (200..300).contains(&status) {
            return Ok(reply);
        }
        Err(match serde_json::from_slice::<ErrorBody>(&reply) {
            Ok(e) => ClientError::Api(e.error),
            Err(_) => ClientError::BadReply {
                status,
                body: String::from_utf8_lossy(&reply).into_owned(),
            },
        })
    }

    /// JSON call.
    pub fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        method: &str,
        target: &str,
        body: Option<&B>,
    ) -> Result<R, ClientError> {
        let bytes = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(ClientError::Encode)?;
        let reply = self.call_raw(method, target, bytes.as_deref())?;
        serde_json::from_slice(&reply).map_err(|_| ClientError::BadReply {
            status: 200,
            body: String::from_utf8_lossy(&reply).into_owned(),
        })
    }

    fn get<R: DeserializeOwned>(&self, target: &str) -> Result<R, ClientError> {
        self.call::<(), R>("GET", target, None)
    }

    fn delete<R: DeserializeOwned>(&self, target: &str) -> Result<R, ClientError> {
        self.call::<(), R>("DELETE", target, None)
    }

    /// `GET /v1/status`.
    pub fn status(&self) -> Result<Status, ClientError> {
        self.get("/v1/status")
    }

    /// `GET /v1/status` as the server sent it, fields this client does not
    /// know included.
    pub fn status_json(&self) -> Result<Value, ClientError> {
        self.get("/v1/status")
    }

    /// `GET /v1/vms`.
    pub fn vms(&self) -> Result<Vec<VmInfo>, ClientError> {
        self.get("/v1/vms")
    }

    /// `POST /v1/vms`: starts a VM.
    pub fn start_vm(&self, cfg: &VmConfig) -> Result<VmInfo, ClientError> {
        self.call("POST", "/v1/vms", Some(cfg))
    }

    /// `DELETE /v1/vms/{name}`: stops a VM, giving it `grace_secs` to power off.
    pub fn stop_vm(&self, name: &str, grace_secs: f64) -> Result<StopOutcome, ClientError> {
        let r: StopReply = self.delete(&format!("/v1/vms/{name}?grace={grace_secs}"))?;
        Ok(r.outcome)
    }

    /// `POST /v1/vms/{vm}/disks`: hot-attaches a volume.
    pub fn attach(&self, vm: &str, req: &AttachRequest) -> Result<DiskInfo, ClientError> {
        self.call("POST", &format!("/v1/vms/{vm}/disks"), Some(req))
    }

    /// `DELETE /v1/vms/{vm}/disks/{volume}`: hot-detaches a volume, waiting
    /// up to `wait_secs` for the guest to release it.
    pub fn detach(&self, vm: &str, volume: &str, wait_secs: f64) -> Result<(), ClientError> {
        let _: Done = self.delete(&format!("/v1/vms/{vm}/disks/{volume}?wait={wait_secs}"))?;
        Ok(())
    }

    /// `GET /v1/volumes`.
    pub fn volumes(&self) -> Result<Vec<VolumeListing>, ClientError> {
        self.get("/v1/volumes")
    }

    /// `POST /v1/volumes`.
    pub fn create_volume(&self, req: &CreateVolume) -> Result<VolumeInfo, ClientError> {
        self.call("POST", "/v1/volumes", Some(req))
    }

    /// `DELETE /v1/volumes/{name}`.
    pub fn delete_volume(&self, name: &str) -> Result<(), ClientError> {
        let _: Done = self.delete(&format!("/v1/volumes/{name}"))?;
        Ok(())
    }

    /// `POST /v1/volumes/release`: drains and releases an object volume
    /// this server serves.
    pub fn release_volume(&self, req: &ReleaseRequest) -> Result<ReleaseReply, ClientError> {
        self.call("POST", "/v1/volumes/release", Some(req))
    }

    /// `GET /v1/volumes/{name}/data`: `length` bytes (at most
    /// [`MAX_READ`](super::model::MAX_READ)) at `offset`.
    pub fn read_volume(
        &self,
        name: &str,
        offset: u64,
        length: u64,
    ) -> Result<Vec<u8>, ClientError> {
        self.call_raw(
            "GET",
            &format!("/v1/volumes/{name}/data?offset={offset}&length={length}"),
            None,
        )
    }

    /// `POST /v1/volumes/{name}/snapshots`.
    pub fn snapshot(&self, volume: &str, snap: &str) -> Result<SnapshotMeta, ClientError> {
        let req = SnapshotRequest {
            name: snap.to_owned(),
        };
        self.call(
            "POST",
            &format!("/v1/volumes/{volume}/snapshots"),
            Some(&req),
        )
    }

    /// `GET /v1/volumes/{name}/snapshots`.
    pub fn snapshots(&self, volume: &str) -> Result<Vec<SnapshotInfo>, ClientError> {
        self.get(&format!("/v1/volumes/{volume}/snapshots"))
    }

    /// `DELETE /v1/volumes/{name}/snapshots/{snap}`.
    pub fn delete_snapshot(&self, volume: &str, snap: &str) -> Result<(), ClientError> {
        let _: Done = self.delete(&format!("/v1/volumes/{volume}/snapshots/{snap}"))?;
        Ok(())
    }

    /// `POST /v1/volumes/{name}/clones`.
    pub fn clone_volume(
        &self,
        volume: &str,
        req: &CloneRequest,
    ) -> Result<CloneReply, ClientError> {
        self.call("POST", &format!("/v1/volumes/{volume}/clones"), Some(req))
    }

    /// `POST /v1/volumes/{name}/resize`.
    pub fn resize(&self, volume: &str, req: &ResizeRequest) -> Result<ResizeReply, ClientError> {
        self.call("POST", &format!("/v1/volumes/{volume}/resize"), Some(req))
    }

    /// `POST /v1/volumes/{name}/flatten`: returns the bytes copied.
    pub fn flatten(&self, volume: &str) -> Result<u64, ClientError> {
        let r: WorkReply =
            self.call::<(), _>("POST", &format!("/v1/volumes/{volume}/flatten"), None)?;
        Ok(r.count)
    }

    /// `POST /v1/volumes/{name}/gc`: returns the chunks collected.
    pub fn gc(&self, volume: &str) -> Result<u64, ClientError> {
        let r: WorkReply = self.call::<(), _>("POST", &format!("/v1/volumes/{volume}/gc"), None)?;
        Ok(r.count)
    }

    /// `GET /v1/volumes/{name}/info`.
    pub fn volume_info(&self, volume: &str) -> Result<StoreVolumeInfo, ClientError> {
        self.get(&format!("/v1/volumes/{volume}/info"))
    }

    /// `POST /v1/vms/{name}/snapshots`: snapshots every object disk of a VM.
    pub fn snapshot_vm(&self, vm: &str, snap: &str) -> Result<Vec<DiskSnapshot>, ClientError> {
        let req = SnapshotRequest {
            name: snap.to_owned(),
        };
        self.call("POST", &format!("/v1/vms/{vm}/snapshots"), Some(&req))
    }
}
