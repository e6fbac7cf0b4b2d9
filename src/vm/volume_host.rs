//! What the supervisor needs from the layer above it: a way to serve a
//! volume as an NBD export for a VM's disk, and to stop serving it. The
//! supervisor names no catalog and no server; the control layer, which owns
//! both, implements [`VolumeHost`].

use thiserror::Error;

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
}
