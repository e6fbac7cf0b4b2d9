//! What the supervisor needs from the layer above it: a way to serve a
//! volume as an NBD export for a VM's disk (and as a vhost-user-blk device
//! on a socket), to stop serving it, and to serve it again from another
//! vbd process after a restart. The supervisor
//! names no catalog and no server; the control layer, which owns both,
//! implements [`VolumeHost`].

use std::path::Path;

use thiserror::Error;

use super::config::VhostSocket;

/// Why a volume could not be exported or unexported.
#[derive(Debug, Error)]
pub enum ExportError {
    /// Nothing by that name exists to export.
    #[error("no volume named {0:?}")]
    NoVolume(String),
    /// The volume exists but the server would not add its export.
    #[error("cannot export volume {volume:?}")]
    Add {
        /// The volume, which is also the export's name.
        volume: String,
        /// What the server said.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The volume an earlier vbd process described could not be opened.
    #[error("cannot reopen volume {volume:?}")]
    Reopen {
        /// The volume's name.
        volume: String,
        /// Why the host could not open it.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The export could not get its vhost-user-blk device.
    #[error("cannot serve volume {volume:?} over vhost-user")]
    Vhost {
        /// The volume, which is also the export's name.
        volume: String,
        /// Why the device did not start (or stop).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The server would not remove the export.
    #[error("cannot remove export {volume:?}")]
    Remove {
        /// The export's name.
        volume: String,
        /// What the server said.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Whether a volume can be served again by the next vbd process, which
/// adopts the VMs this one leaves running.
#[derive(Clone, Debug, PartialEq)]
pub enum Restart {
    /// vbd's own command line serves it (`vbd serve --export`): the next
    /// vbd has it if it is started with the same flags.
    CommandLine,
    /// The host can open it again from this description, which the
    /// supervisor keeps in the VM's run record without looking inside.
    Reopen(serde_json::Value),
    /// Its data lives in this process's memory and ends with it.
    Lost,
}

/// A volume's vhost-user-blk device, as [`VolumeHost::serve_vhost`] found
/// or started it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VhostServed {
    /// Where it listens and the queues it offers.
    pub socket: VhostSocket,
    /// Whether this call started it (and so the supervisor stops it when
    /// the disk goes); `false` for a device the export already had, such
    /// as `vbd serve --export ...,vhost-user=PATH`'s.
    pub started: bool,
}

/// Volumes and the NBD server that serves them, as the supervisor sees
/// them. An export and its volume share a name; QEMU reaches every export
/// on the one NBD socket of [`super::supervisor::SupervisorConfig`].
pub trait VolumeHost: Send + Sync {
    /// Whether an export named `volume` is being served now, whoever added it.
    fn is_exported(&self, volume: &str) -> bool;

    /// Serves the volume named `volume` as an export of the same name.
    fn export(&self, volume: &str, read_only: bool) -> Result<(), ExportError>;

    /// Stops serving the export `volume`; connections already open keep
    /// their volume until they close.
    fn unexport(&self, volume: &str) -> Result<(), ExportError>;

    /// How `volume` could be served after vbd restarts.
    fn restart(&self, volume: &str) -> Restart;

    /// Makes `volume` available again from what [`Restart::Reopen`] gave
    /// an earlier vbd process, so that [`VolumeHost::export`] finds it. A
    /// volume already known here is left as it is.
    fn reopen(&self, volume: &str, spec: &serde_json::Value) -> Result<(), ExportError>;

    /// Clients attached to the export `volume` now: NBD connections and a
    /// vhost-user frontend alike (0 if not exported).
    fn connections(&self, volume: &str) -> u64;

    /// Serves the export `volume` (exported already) as a vhost-user-blk
    /// device too: the device it has, or a new one listening on `socket`.
    /// `Ok(None)` when this host has no vhost-user transport; the disk
    /// then stays on NBD.
    fn serve_vhost(&self, volume: &str, socket: &Path) -> Result<Option<VhostServed>, ExportError>;

    /// Stops the vhost-user device of `volume` that
    /// [`VolumeHost::serve_vhost`] started, and removes its socket.
    fn stop_vhost(&self, volume: &str) -> Result<(), ExportError>;
}
