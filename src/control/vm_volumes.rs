//! The supervisor's [`VolumeHost`]: the catalog says which volumes exist,
//! the NBD server's registry serves them. This is the one place where the
//! VM layer meets the control layer's volumes. For VMs that outlive vbd, a
//! catalogued volume is described by its create request (without the
//! size, so nothing is created by a restart); a static export comes back
//! from `vbd serve --export`; memory volumes do not come back.

use std::sync::Arc;

use super::model::CreateVolume;
use super::volumes::VolumeCatalog;
use crate::server::Registry;
use crate::vm::{ExportError, Restart, VolumeHost};

/// Catalogued volumes, exported through one NBD server.
pub struct CatalogExports {
    registry: Arc<Registry>,
    catalog: Arc<VolumeCatalog>,
}

impl CatalogExports {
    /// VMs get `catalog`'s volumes as exports of `registry`'s server.
    pub fn new(registry: Arc<Registry>, catalog: Arc<VolumeCatalog>) -> Self {
        CatalogExports { registry, catalog }
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
        self.registry
            .by_name(volume)
            .map_or(0, |e| e.metrics.totals().connections)
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
