//! The exports a server offers: named volumes with their policy. Shared by
//! every core; read at handshake time only, never per request.

use crate::lock::RwLockExt;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use thiserror::Error;

use super::metrics::ExportMetrics;
use crate::nbd::{self, BlockSizes, ExportInfo, Features};
use crate::volume::Volume;

/// A named volume as clients see it.
pub struct Export {
    /// What clients ask for.
    pub name: String,
    /// Shown by `NBD_INFO_DESCRIPTION`.
    pub description: String,
    /// Where the data lives.
    pub volume: Arc<dyn Volume>,
    /// Writes are refused.
    pub read_only: bool,
    /// What the handshake advertises.
    pub info: ExportInfo,
    /// Request counters, per core.
    pub metrics: ExportMetrics,
}

/// Why an export could not be added.
#[derive(Debug, Error)]
pub enum RegistryError {
    /// The name is taken.
    #[error("an export named {0:?} already exists; export names must be unique")]
    Duplicate(String),
    /// The name cannot be used.
    #[error("export name {0:?} is invalid: use 1-256 bytes of letters, digits, '-', '_' or '.'")]
    BadName(String),
    /// No export has that name.
    #[error("no export named {0:?}")]
    Missing(String),
}

#[derive(Default)]
struct Inner {
    /// Indexed by export id; ids are never reused, so a stale id finds nothing.
    by_id: Vec<Option<Arc<Export>>>,
    by_name: HashMap<String, usize>,
    default: Option<usize>,
}

/// All exports of one server.
#[derive(Default)]
pub struct Registry {
    inner: RwLock<Inner>,
}

pub use crate::volume::valid_name;

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an export; the first one added is also the default (empty name).
    pub fn add(
        &self,
        name: &str,
        volume: Arc<dyn Volume>,
        read_only: bool,
    ) -> Result<Arc<Export>, RegistryError> {
        if !valid_name(name) {
            return Err(RegistryError::BadName(name.to_owned()));
        }
        let mut inner = self.inner.write_locked();
        if inner.by_name.contains_key(name) {
            return Err(RegistryError::Duplicate(name.to_owned()));
        }
        let id = inner.by_id.len();
        let caps = volume.caps();
        let read_only = read_only || caps.read_only;
        let features = Features {
            read_only,
            flush: caps.flush,
            fua: caps.fua,
            trim: caps.trim,
            write_zeroes: caps.write_zeroes,
            fast_zero: caps.fast_zero,
            cache: caps.cache,
            multi_conn: caps.multi_conn,
            rotational: false,
        };
        let description = format!("vbd export: {}", volume.describe());
        let info = ExportInfo {
            id,
            name: name.to_owned(),
            description: description.clone(),
            size: volume.size(),
            flags: features.flags(),
            block: BlockSizes {
                minimum: volume.block_size().max(1),
                preferred: volume.block_size().max(4096),
                // Volumes take any length; the handshake advertises the
                // server's --max-request in its place.
                maximum: u32::MAX,
            },
        };
        let export = Arc::new(Export {
            name: name.to_owned(),
            description,
            volume,
            read_only,
            info,
            metrics: ExportMetrics::new(),
        });
        inner.by_id.push(Some(export.clone()));
        inner.by_name.insert(name.to_owned(), id);
        if inner.default.is_none() {
            inner.default = Some(id);
        }
        Ok(export)
    }

    /// Removes an export; open connections keep their volume until they close.
    pub fn remove(&self, name: &str) -> Result<Arc<Export>, RegistryError> {
        let mut inner = self.inner.write_locked();
        let id = inner
            .by_name
            .remove(name)
            .ok_or_else(|| RegistryError::Missing(name.to_owned()))?;
        if inner.default == Some(id) {
            inner.default = None;
        }
        inner.by_id[id]
            .take()
            .ok_or_else(|| RegistryError::Missing(name.to_owned()))
    }

    /// The export with this id, if it still exists.
    pub fn get(&self, id: usize) -> Option<Arc<Export>> {
        let inner = self.inner.read_locked();
        inner.by_id.get(id).cloned().flatten()
    }

    /// The export with this name, if any.
    pub fn by_name(&self, name: &str) -> Option<Arc<Export>> {
        let inner = self.inner.read_locked();
        let id = *inner.by_name.get(name)?;
        inner.by_id.get(id).cloned().flatten()
    }

    /// Every export, in the order they were added.
    pub fn all(&self) -> Vec<Arc<Export>> {
        let inner = self.inner.read_locked();
        inner.by_id.iter().flatten().cloned().collect()
    }
}

impl nbd::Exports for Registry {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        let inner = self.inner.read_locked();
        let id = if name.is_empty() {
            inner.default?
        } else {
            *inner.by_name.get(name)?
        };
        // The size as it is now: a volume resized while served shows new
        // connections its new size.
        inner.by_id.get(id)?.as_ref().map(|e| ExportInfo {
            size: e.volume.size(),
            ..e.info.clone()
        })
    }

    fn list(&self) -> Vec<(String, String)> {
        self.all()
            .iter()
            .map(|e| (e.name.clone(), e.description.clone()))
            .collect()
    }
}
