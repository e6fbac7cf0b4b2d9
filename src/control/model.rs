//! The control API's JSON: every body the server reads or writes and the
//! client decodes, in one place, so the two sides cannot drift apart.
//! VM descriptions and the connection summary are the supervisor's and the
//! server's own types, re-exported here so a client needs only this module.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use crate::server::ConnSummary;
pub use crate::vm::config::{Accel, Disk, DiskTuning, Role, Source, VmConfig};
pub use crate::vm::supervisor::{DiskInfo, StopOutcome, VmInfo, VmState};

/// Largest volume read one `GET /v1/volumes/{name}/data` returns.
pub const MAX_READ: u64 = 1 << 20;

/// `POST /v1/volumes`: a volume to create; backend-specific keys stay in
/// `options` (`path`, `direct` for files; `store`, `cache` for objects).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CreateVolume {
    pub name: String,
    pub backend: String,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub read_only: bool,
    /// Everything else, for the backend to read (e.g. `path`, `direct`).
    #[serde(flatten)]
    pub options: Map<String, Value>,
}

/// A catalogued volume, as `POST /v1/volumes` returns it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    pub backend: String,
    pub size: u64,
    pub read_only: bool,
    pub description: String,
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

/// `POST /v1/vms/{name}/disks`: a volume to hot-attach.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttachRequest {
    pub volume: String,
    #[serde(default)]
    pub read_only: bool,
}

/// `DELETE /v1/vms/{name}`: how the VM stopped.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct StopReply {
    pub outcome: StopOutcome,
}

/// The `{}` that a successful delete or detach returns.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Done {}

/// Every failure's body: what went wrong, each cause once.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// `GET /v1/status`: what a running vbd serves right now.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub uptime_seconds: u64,
    /// NBD listeners (socket paths and TCP addresses).
    pub listeners: Vec<String>,
    /// Connections open, including those still negotiating.
    pub connections_open: usize,
    pub exports: Vec<ExportStatus>,
    pub connections: Vec<ConnSummary>,
    /// Empty when vbd runs without a control plane.
    pub vms: Vec<VmInfo>,
}

/// One export as the status shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExportStatus {
    pub name: String,
    pub backend: String,
    pub description: String,
    pub size: u64,
    pub read_only: bool,
    /// Connections attached now.
    pub connections: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_keep_their_wire_shape() {
        assert_eq!(serde_json::to_string(&Done {}).unwrap(), "{}");
        let stop = StopReply {
            outcome: StopOutcome::AlreadyExited,
        };
        assert_eq!(
            serde_json::to_string(&stop).unwrap(),
            r#"{"outcome":"already-exited"}"#
        );
        let req: CreateVolume =
            serde_json::from_str(r#"{"name":"a","backend":"file","path":"/x","direct":false}"#)
                .unwrap();
        assert_eq!((req.size, req.read_only), (None, false));
        assert_eq!(req.options["path"], "/x");
        assert_eq!(req.options["direct"], false);
    }
}
