//! The supervisor's [`VolumeHost`]: the catalog says which volumes exist,
//! the NBD server's registry serves them, and the vhost-user devices serve
//! them into guests' memory. This is the one place where the VM layer
//! meets the control layer's volumes. For VMs that outlive vbd, a
//! catalogued volume is described by its create request (without the
//! size, so nothing is created by a restart); a static export comes back
//! from `vbd serve --export`; memory volumes do not come back.

use std::path::Path;
use std::sync::Arc;

use super::model::CreateVolume;
use super::vhost_exports::VhostExports;
use super::volumes::VolumeCatalog;
use crate::server::{Registry, ServerHandle};
use crate::vhost::device::SocketAccess;
use crate::vm::config::VhostSocket;
use crate::vm::{ExportError, Restart, VhostServed, VolumeHost};

/// Catalogued volumes, exported through one NBD server and, on request,
/// its cores' vhost-user devices.
pub struct CatalogExports {
    registry: Arc<Registry>,
    catalog: Arc<VolumeCatalog>,
    server: ServerHandle,
    vhost: Arc<VhostExports>,
}

impl CatalogExports {
    /// VMs get `catalog`'s volumes as exports of `server`, and as devices
    /// of `vhost` whose queues run on `server`'s cores.
    pub fn new(
        server: ServerHandle,
        catalog: Arc<VolumeCatalog>,
        vhost: Arc<VhostExports>,
    ) -> Self {
        CatalogExports {
            registry: server.registry.clone(),
            catalog,
            server,
            vhost,
        }
    }
}

impl VolumeHost for CatalogExports {
    fn is_exported(&self, volume: &str) -> bool {
        self.registry.by_name(volume).is_some()
    }

    fn export(&self, volume: &str, read_only: bool) -> Result<(), ExportError> {
        let (vol, _) = self
            .catalog
            .get(volume)
            .ok_or_else(|| ExportError::NoVolume(volume.to_owned()))?;
        self.registry
            .add(volume, vol, read_only)
            .map_err(|e| ExportError::Add {
                volume: volume.to_owned(),
                source: e.into(),
            })?;
        Ok(())
    }

    fn restart(&self, volume: &str) -> Restart {
        if self.catalog.get(volume).is_some() {
            return match self.catalog.reopen_request(volume) {
                Some(req) => match serde_json::to_value(req) {
                    Ok(spec) => Restart::Reopen(spec),
                    Err(_) => Restart::Lost,
                },
                None => Restart::Lost,
            };
        }
        match self.registry.by_name(volume) {
            Some(e) if e.volume.backend() != "memory" => Restart::CommandLine,
            _ => Restart::Lost,
        }
    }

    fn reopen(&self, volume: &str, spec: &serde_json::Value) -> Result<(), ExportError> {
        if self.catalog.get(volume).is_some() {
            return Ok(());
        }
        let fail = |source: Box<dyn std::error::Error + Send + Sync>| ExportError::Reopen {
            volume: volume.to_owned(),
            source,
        };
        let req: CreateVolume =
            serde_json::from_value(spec.clone()).map_err(|e| fail(Box::new(e)))?;
        if req.name != volume {
            return Err(fail(
                format!("the recorded request names {:?}", req.name).into(),
            ));
        }
        self.catalog.create(&req).map_err(|e| fail(Box::new(e)))?;
        Ok(())
    }

    fn connections(&self, volume: &str) -> u64 {
        let nbd = self
            .registry
            .by_name(volume)
            .map_or(0, |e| e.metrics.totals().connections);
        nbd + u64::from(self.vhost.attached(volume))
    }

    fn serve_vhost(&self, volume: &str, socket: &Path) -> Result<Option<VhostServed>, ExportError> {
        if let Some((socket, queues)) = self.vhost.device(volume) {
            return Ok(Some(VhostServed {
                socket: VhostSocket { socket, queues },
                started: false,
            }));
        }
        // QEMU runs as vbd's user (vbd starts it), so 0600 lets it in.
        let queues = self
            .vhost
            .start(&self.server, volume, socket, SocketAccess::default())
            .map_err(|e| ExportError::Vhost {
                volume: volume.to_owned(),
                source: e.into(),
            })?;
        Ok(Some(VhostServed {
            socket: VhostSocket {
                socket: socket.to_path_buf(),
                queues,
            },
            started: true,
        }))
    }

    fn stop_vhost(&self, volume: &str) -> Result<(), ExportError> {
        self.vhost.stop(volume).map_err(|e| ExportError::Vhost {
            volume: volume.to_owned(),
            source: e.into(),
        })
    }

    fn unexport(&self, volume: &str) -> Result<(), ExportError> {
        self.registry
            .remove(volume)
            .map_err(|e| ExportError::Remove {
                volume: volume.to_owned(),
                source: e.into(),
            })?;
        Ok(())
    }
}
