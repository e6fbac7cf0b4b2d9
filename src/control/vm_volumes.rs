//! The supervisor's [`VolumeHost`]: the catalog says which volumes exist,
//! the NBD server's registry serves them. This is the one place where the
//! VM layer meets the control layer's volumes.

use std::sync::Arc;

use super::volumes::VolumeCatalog;
use crate::server::Registry;
use crate::vm::{ExportError, VolumeHost};

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
