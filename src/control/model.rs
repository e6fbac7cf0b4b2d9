//! The control API's JSON: every body the server reads or writes and the
//! client decodes, in one place, so the two sides cannot drift apart.
//! VM descriptions and the connection summary are the supervisor's and the
//! server's own types, re-exported here so a client needs only this module.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use crate::server::ConnSummary;
pub use crate::vm::config::{Accel, Disk, DiskTransport, DiskTuning, Role, Source, VmConfig};
pub use crate::vm::supervisor::{DiskInfo, DiskReconnect, StopOutcome, VmInfo, VmState, VmsOnExit};
pub use crate::volume::object::admin::VolumeInfo as StoreVolumeInfo;
pub use crate::volume::object::snapshot::{SnapshotInfo, SnapshotMeta};

/// Largest volume read one `GET /v1/volumes/{name}/data` returns.
pub const MAX_READ: u64 = 1 << 20;

/// `POST /v1/volumes`: a volume to create; backend-specific keys stay in
/// `options` (`path`, `direct` for files; `store`, `cache` for objects).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CreateVolume {
    /// The catalog and export name (and an object volume's name in its store).
    pub name: String,
    /// `memory`, `file` or `object`.
    pub backend: String,
    /// Bytes: required for memory; creates a missing file or object volume.
    #[serde(default)]
    pub size: Option<u64>,
    /// Refuse writes.
    #[serde(default)]
    pub read_only: bool,
    /// Everything else, for the backend to read (e.g. `path`, `direct`).
    #[serde(flatten)]
    pub options: Map<String, Value>,
}

/// A catalogued volume, as `POST /v1/volumes` returns it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VolumeInfo {
    /// The name it was created under.
    pub name: String,
    /// `memory`, `file` or `object`.
    pub backend: String,
    /// Bytes.
    pub size: u64,
    /// Asked for read-only, or only readable.
    pub read_only: bool,
    /// The volume's own one-line description.
    pub description: String,
}

/// A volume as `GET /v1/volumes` lists it: catalogued or a static export.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeListing {
    /// Catalog or export name.
    pub name: String,
    /// Backend name, or `export` for volumes given to `vbd serve --export`.
    pub backend: String,
    /// Bytes.
    pub size: u64,
    /// Served read-only.
    pub read_only: bool,
    /// The volume's own one-line description.
    pub description: String,
    /// Served over NBD right now.
    pub exported: bool,
    /// The VM whose disk it is, if any.
    pub used_by: Option<String>,
    /// An object volume's store URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// An object volume's name in its store (`volume@snapshot` for a
    /// snapshot served read-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_volume: Option<String>,
}

/// `POST /v1/volumes/{name}/snapshots` (and `/v1/vms/{name}/snapshots`):
/// the snapshot to take.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotRequest {
    /// The snapshot's name (volume-name rules).
    pub name: String,
}

/// `POST /v1/volumes/{name}/clones`: a clone of one of its snapshots.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CloneRequest {
    /// The snapshot to clone.
    pub snapshot: String,
    /// The new volume's name, in the same store.
    pub name: String,
    /// Also open the clone in this server's catalog, ready to attach.
    #[serde(default)]
    pub open: bool,
}

/// What a clone request made.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CloneReply {
    /// The new volume.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// `volume@snapshot` it reads through.
    pub parent: String,
    /// Whether it is now in the catalog.
    pub opened: bool,
}

/// `POST /v1/volumes/{name}/resize`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct ResizeRequest {
    /// The new size in bytes.
    pub size: u64,
    /// Allow a smaller size (the tail is discarded).
    #[serde(default)]
    pub allow_shrink: bool,
}

/// What a resize did.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct ResizeReply {
    /// Bytes before.
    pub old_size: u64,
    /// Bytes now.
    pub size: u64,
}

/// What a flatten or a collection did.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct WorkReply {
    /// Bytes copied (flatten) or chunks collected (gc).
    pub count: u64,
}

/// One disk of a VM snapshot.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiskSnapshot {
    /// The disk's volume (catalog or export name).
    pub volume: String,
    /// The snapshot taken.
    pub snapshot: SnapshotMeta,
}

/// `POST /v1/vms/{name}/disks`: a volume to hot-attach.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttachRequest {
    /// A catalogued volume or an export.
    pub volume: String,
    /// Attach it read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// `DELETE /v1/vms/{name}`: how the VM stopped.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct StopReply {
    /// Which step ended the VM.
    pub outcome: StopOutcome,
}

/// `POST /v1/volumes/release`: the object volume to drain and release, so
/// that another host can open it with nothing to recover.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRequest {
    /// The store's URL, as the volume was opened with.
    pub store: String,
    /// The volume's name in the store.
    pub volume: String,
}

/// What `POST /v1/volumes/release` did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseReply {
    /// The export or catalog name it was served under (now removed).
    pub export: String,
    /// The writer generation that held it.
    pub generation: u64,
    /// `released` (another host may open it), `held` (acknowledged writes
    /// could not be uploaded: it stays this host's), or `fenced` (another
    /// host had already taken it over).
    pub outcome: String,
}

/// The `{}` that a successful delete or detach returns.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Done {}

/// Every failure's body: what went wrong, each cause once.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// `what failed: why: root cause`.
    pub error: String,
}

/// `GET /v1/status`: what a running vbd serves right now.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    /// vbd's version.
    pub version: String,
    /// Seconds since the NBD server started.
    pub uptime_seconds: u64,
    /// NBD listeners (socket paths and TCP addresses).
    pub listeners: Vec<String>,
    /// Connections open, including those still negotiating.
    pub connections_open: usize,
    /// Every export, by name.
    pub exports: Vec<ExportStatus>,
    /// Every connection, by core and peer.
    pub connections: Vec<ConnSummary>,
    /// Empty when vbd runs without a control plane.
    pub vms: Vec<VmInfo>,
}

/// One export as the status shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExportStatus {
    /// Export name.
    pub name: String,
    /// The volume's backend.
    pub backend: String,
    /// The volume's own one-line description.
    pub description: String,
    /// Bytes.
    pub size: u64,
    /// Served read-only.
    pub read_only: bool,
    /// Connections attached now.
    pub connections: u64,
    /// Its vhost-user-blk device, when it has one (`vhost-user=PATH`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_user: Option<VhostUserStatus>,
}

/// An export's vhost-user-blk device, as the status shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostUserStatus {
    /// The socket QEMU connects to.
    pub socket: String,
    /// A frontend (a VM's QEMU) is connected now.
    pub attached: bool,
    /// Queues the device offers.
    pub queues_offered: u16,
    /// Queues the attached frontend runs now.
    pub queues_running: u16,
    /// Every queue that runs now or has served requests since vbd started.
    pub queues: Vec<VhostQueueStatus>,
}

/// One virtqueue's counters since vbd started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostQueueStatus {
    /// The queue's number.
    pub index: u16,
    /// The core serving it, while it runs.
    pub core: Option<usize>,
    /// Requests answered.
    pub requests: u64,
    /// Requests answered with an error (refusals included).
    pub errors: u64,
    /// Bytes read by the guest.
    pub bytes_read: u64,
    /// Bytes written by the guest.
    pub bytes_written: u64,
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
