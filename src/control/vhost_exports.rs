//! vhost-user devices for exports: `vbd serve --export ...,vhost-user=PATH`
//! serves the export's volume on a vhost-user-blk socket as well as over
//! NBD, its queues on the NBD server's cores. This is where the two
//! transports meet, so it lives above both: vhost names no server, the
//! server names no vhost; the server's handle is what hosts the queues.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use thiserror::Error;
use tracing::info;

use crate::lock::MutexExt;
use crate::server::ServerHandle;
use crate::uring::Host;
use crate::vhost::config::{ConfigError, DeviceConfig, ExportCaps, MAX_QUEUES};
use crate::vhost::cores::CoreRunner;
use crate::vhost::device::{DeviceError, SocketAccess, VhostUserDevice};
use crate::vhost::metrics::DeviceStatus;

/// Queues every device offers at least. QEMU's vhost-user-blk asks for
/// one per vCPU by default and refuses to start when the backend offers
/// fewer, and VMs often have more vCPUs than the host has cores; a
/// frontend uses only as many as it asks for, so offering more is free.
pub const MIN_QUEUES: u16 = 16;

/// Queues to offer on a server with `cores` cores: at least one per core
/// (so every core can serve one) and at least [`MIN_QUEUES`].
pub fn queues_for(cores: usize) -> u16 {
    let cores = u16::try_from(cores).unwrap_or(MAX_QUEUES);
    cores.clamp(MIN_QUEUES, MAX_QUEUES)
}

/// Why an export could not get its vhost-user device.
#[derive(Debug, Error)]
pub enum VhostExportError {
    /// No export of that name is served.
    #[error("no export named {0:?}")]
    NoExport(String),
    /// The volume cannot be described as a virtio-blk device.
    #[error("export {export:?} cannot be a vhost-user-blk device")]
    Config {
        /// The export.
        export: String,
        /// What does not fit.
        #[source]
        source: ConfigError,
    },
    /// The export has a device already.
    #[error("export {0:?} is served over vhost-user already")]
    Exists(String),
    /// The export has no device to stop.
    #[error("export {0:?} has no vhost-user device")]
    NoDevice(String),
    /// The device's socket or thread could not be set up.
    #[error("export {export:?}")]
    Device {
        /// The export.
        export: String,
        /// What failed.
        #[source]
        source: DeviceError,
    },
}

/// The running devices, by export name.
#[derive(Default)]
pub struct VhostExports {
    devices: Mutex<Vec<(String, VhostUserDevice)>>,
}

impl VhostExports {
    /// No devices yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves export `name` of `server` on a vhost-user-blk socket at
    /// `path`, with `access` as its mode and group; returns the queues it
    /// offers.
    pub fn start(
        &self,
        server: &ServerHandle,
        name: &str,
        path: &Path,
        access: SocketAccess,
    ) -> Result<u16, VhostExportError> {
        // Held across the start, so two starts for one export cannot race.
        let mut devices = self.devices.locked();
        if devices.iter().any(|(n, _)| n == name) {
            return Err(VhostExportError::Exists(name.to_owned()));
        }
        let export = server
            .registry
            .by_name(name)
            .ok_or_else(|| VhostExportError::NoExport(name.to_owned()))?;
        let mut caps = ExportCaps::of(&*export.volume, queues_for(server.cores()));
        // A read-only export of a writable volume is read-only here too.
        caps.read_only |= export.read_only;
        let config = DeviceConfig::new(&caps).map_err(|source| VhostExportError::Config {
            export: name.to_owned(),
            source,
        })?;
        let runner = CoreRunner::new(export.volume.clone(), Arc::new(server.clone()));
        let device =
            VhostUserDevice::start(path, access, name, config, runner).map_err(|source| {
                VhostExportError::Device {
                    export: name.to_owned(),
                    source,
                }
            })?;
        info!(export = name, socket = %path.display(), queues = caps.num_queues, read_only = caps.read_only, "serving over vhost-user-blk");
        devices.push((name.to_owned(), device));
        Ok(caps.num_queues)
    }

    /// Stops export `name`'s device (its queues finish what is in flight)
    /// and removes its socket.
    pub fn stop(&self, name: &str) -> Result<(), VhostExportError> {
        let device = {
            let mut devices = self.devices.locked();
            let i = devices
                .iter()
                .position(|(n, _)| n == name)
                .ok_or_else(|| VhostExportError::NoDevice(name.to_owned()))?;
            devices.remove(i).1
        };
        // Dropped outside the lock: stopping waits for the queues.
        drop(device);
        info!(export = name, "vhost-user device stopped");
        Ok(())
    }

    /// Export `name`'s volume is `size_bytes` now (a resize): its device
    /// reports the new size and tells the attached frontend. Returns
    /// whether a frontend was told; `Ok(false)` too when the export has no
    /// device.
    pub fn set_capacity(&self, name: &str, size_bytes: u64) -> Result<bool, VhostExportError> {
        let devices = self.devices.locked();
        let Some((_, device)) = devices.iter().find(|(n, _)| n == name) else {
            return Ok(false);
        };
        device
            .set_capacity(size_bytes)
            .map_err(|source| VhostExportError::Device {
                export: name.to_owned(),
                source,
            })
    }

    /// Export `name`'s device: its socket and the queues it offers.
    pub fn device(&self, name: &str) -> Option<(PathBuf, u16)> {
        self.devices
            .locked()
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| (d.path().to_path_buf(), d.num_queues()))
    }

    /// Whether a frontend is attached to export `name`'s device.
    pub fn attached(&self, name: &str) -> bool {
        self.devices
            .locked()
            .iter()
            .any(|(n, d)| n == name && d.frontend_attached())
    }

    /// Every device's status, by export name.
    pub fn list(&self) -> Vec<(String, DeviceStatus)> {
        self.devices
            .locked()
            .iter()
            .map(|(n, d)| (n.clone(), d.status()))
            .collect()
    }

    /// Stops every device (their queues finish what is in flight) and
    /// removes their sockets: before the server's cores stop.
    pub fn stop_all(&self) {
        let devices = std::mem::take(&mut *self.devices.locked());
        drop(devices);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_core_gets_a_queue_and_vms_get_plenty() {
        assert_eq!(queues_for(1), MIN_QUEUES);
        assert_eq!(queues_for(2), MIN_QUEUES);
        assert_eq!(queues_for(48), 48);
        assert_eq!(queues_for(1000), MAX_QUEUES);
    }
}
