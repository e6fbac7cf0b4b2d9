//! The volumes the control API manages. Each backend (memory, file,
//! object) registers a [`VolumeBackend`] under its name; the catalog
//! itself knows nothing about any of them.

use crate::lock::MutexExt;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;

use crate::server::registry::valid_name;
use crate::volume::Volume;
use crate::volume::file::{FileOptions, FileVolume};
use crate::volume::memory::MemoryVolume;
use crate::volume::object::ObjectOptions;
use crate::volume::object::admin;
use crate::volume::object::cache::CacheSize;

/// A request to create a volume; backend-specific keys stay in `options`.
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

/// A catalogued volume as the API lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    pub backend: String,
    pub size: u64,
    pub read_only: bool,
    pub description: String,
}

/// Why a volume operation failed.
#[derive(Debug, Error)]
pub enum VolumeStoreError {
    #[error("volume name {0:?} is invalid: use 1-256 letters, digits, '-', '_' or '.'")]
    BadName(String),
    #[error("a volume named {0:?} already exists; delete it first or pick another name")]
    Exists(String),
    #[error("no volume named {0:?}; create it first (vbd vm volume create)")]
    Missing(String),
    #[error("unknown volume backend {0:?}; available: {1}")]
    UnknownBackend(String, String),
    #[error("{backend} volume {name:?}: {reason}")]
    Invalid {
        backend: &'static str,
        name: String,
        reason: String,
    },
    #[error("{backend} volume {name:?} cannot be opened: {source}")]
    Open {
        backend: &'static str,
        name: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Creates volumes of one kind.
pub trait VolumeBackend: Send + Sync {
    /// The `backend` value that selects this backend.
    fn name(&self) -> &'static str;
    /// Opens or creates the volume `req` describes.
    fn create(&self, req: &CreateVolume) -> Result<Arc<dyn Volume>, VolumeStoreError>;
}

/// Sparse in-memory volumes; contents vanish with the process.
pub struct MemoryBackend;

impl VolumeBackend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }
    fn create(&self, req: &CreateVolume) -> Result<Arc<dyn Volume>, VolumeStoreError> {
        let size = req
            .size
            .filter(|s| *s > 0)
            .ok_or_else(|| VolumeStoreError::Invalid {
                backend: "memory",
                name: req.name.clone(),
                reason: "needs a size, e.g. size=1G".into(),
            })?;
        Ok(Arc::new(MemoryVolume::new(size, req.read_only)))
    }
}

/// Object-store volumes: `store` (a URL; default the server's local store),
/// `cache` (bytes or "auto"); `size` creates the volume when missing.
pub struct ObjectBackend {
    /// Store used when the request names none.
    pub default_store: String,
    /// Where the volumes' write-ahead logs go (None: the default place).
    pub wal_root: Option<PathBuf>,
}

impl VolumeBackend for ObjectBackend {
    fn name(&self) -> &'static str {
        "object"
    }
    fn create(&self, req: &CreateVolume) -> Result<Arc<dyn Volume>, VolumeStoreError> {
        let invalid = |reason: &str| VolumeStoreError::Invalid {
            backend: "object",
            name: req.name.clone(),
            reason: reason.into(),
        };
        let store = match req.options.get("store") {
            None => self.default_store.clone(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(invalid("store must be a URL string")),
        };
        let cache = match req.options.get("cache") {
            None => CacheSize::Default,
            Some(Value::String(s)) if s == "auto" => CacheSize::Auto,
            Some(Value::String(s)) => CacheSize::Bytes(
                crate::cli::parse_size(s).map_err(|e| invalid(&format!("cache: {e}")))?,
            ),
            Some(Value::Number(n)) => {
                CacheSize::Bytes(n.as_u64().ok_or_else(|| invalid("cache must be bytes"))?)
            }
            Some(_) => return Err(invalid("cache must be a size or \"auto\"")),
        };
        let mut opts = ObjectOptions {
            read_only: req.read_only,
            cache,
            ..ObjectOptions::default()
        };
        if let Some(d) = &self.wal_root {
            opts.wal_root = d.clone();
        }
        let name = req.name.clone();
        let size = req.size;
        let vol = off_runtime(move || admin::open_url(&store, &name, size, opts)).map_err(|e| {
            VolumeStoreError::Open {
                backend: "object",
                name: req.name.clone(),
                source: Box::new(e),
            }
        })?;
        Ok(Arc::new(vol))
    }
}

/// Raw files (created with `size` when missing), io_uring with O_DIRECT.
pub struct FileBackend;

impl VolumeBackend for FileBackend {
    fn name(&self) -> &'static str {
        "file"
    }
    fn create(&self, req: &CreateVolume) -> Result<Arc<dyn Volume>, VolumeStoreError> {
        let invalid = |reason: &str| VolumeStoreError::Invalid {
            backend: "file",
            name: req.name.clone(),
            reason: reason.into(),
        };
        let path = req
            .options
            .get("path")
            .and_then(Value::as_str)
            .map(PathBuf::from)
            .ok_or_else(|| invalid("needs path=FILE"))?;
        let direct = match req.options.get("direct") {
            None => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(invalid("direct must be true or false")),
        };
        let opts = FileOptions {
            read_only: req.read_only,
            size: req.size,
            no_direct: !direct,
        };
        let vol = FileVolume::open(&path, &opts).map_err(|e| VolumeStoreError::Open {
            backend: "file",
            name: req.name.clone(),
            source: Box::new(e),
        })?;
        Ok(Arc::new(vol))
    }
}

struct Entry {
    info: VolumeInfo,
    volume: Arc<dyn Volume>,
}

/// Named volumes created through the control API.
pub struct VolumeCatalog {
    backends: BTreeMap<&'static str, Box<dyn VolumeBackend>>,
    volumes: Mutex<BTreeMap<String, Entry>>,
}

impl Default for VolumeCatalog {
    fn default() -> Self {
        Self::new()
    }
}

impl VolumeCatalog {
    /// A catalog with the memory and file backends.
    pub fn new() -> Self {
        let mut c = VolumeCatalog {
            backends: BTreeMap::new(),
            volumes: Mutex::new(BTreeMap::new()),
        };
        c.register(Box::new(MemoryBackend));
        c.register(Box::new(FileBackend));
        c
    }

    /// Adds (or replaces) a backend.
    pub fn register(&mut self, backend: Box<dyn VolumeBackend>) {
        self.backends.insert(backend.name(), backend);
    }

    /// Creates a volume and records it.
    pub fn create(&self, req: &CreateVolume) -> Result<VolumeInfo, VolumeStoreError> {
        if !valid_name(&req.name) {
            return Err(VolumeStoreError::BadName(req.name.clone()));
        }
        let backend = self.backends.get(req.backend.as_str()).ok_or_else(|| {
            let names: Vec<&str> = self.backends.keys().copied().collect();
            VolumeStoreError::UnknownBackend(req.backend.clone(), names.join(", "))
        })?;
        if self.lock().contains_key(&req.name) {
            return Err(VolumeStoreError::Exists(req.name.clone()));
        }
        let volume = backend.create(req)?;
        let info = VolumeInfo {
            name: req.name.clone(),
            backend: backend.name().to_owned(),
            size: volume.size(),
            read_only: req.read_only || volume.caps().read_only,
            description: volume.describe(),
        };
        let mut vols = self.lock();
        if vols.contains_key(&req.name) {
            return Err(VolumeStoreError::Exists(req.name.clone()));
        }
        vols.insert(
            req.name.clone(),
            Entry {
                info: info.clone(),
                volume,
            },
        );
        Ok(info)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.volumes.locked()
    }

    /// The volume and its info, if catalogued.
    pub fn get(&self, name: &str) -> Option<(Arc<dyn Volume>, VolumeInfo)> {
        self.lock()
            .get(name)
            .map(|e| (e.volume.clone(), e.info.clone()))
    }

    /// Every catalogued volume, by name.
    pub fn list(&self) -> Vec<VolumeInfo> {
        self.lock().values().map(|e| e.info.clone()).collect()
    }

    /// Forgets a volume (files stay on disk); the caller checks it is unused.
    pub fn remove(&self, name: &str) -> Result<Arc<dyn Volume>, VolumeStoreError> {
        self.lock()
            .remove(name)
            .map(|e| e.volume)
            .ok_or_else(|| VolumeStoreError::Missing(name.to_owned()))
    }

    /// Removes every volume and lets each finish its background work
    /// (an object volume drains its WAL to the store and drops its lock).
    pub fn shutdown_all(&self) {
        let all = std::mem::take(&mut *self.lock());
        for (_, e) in all {
            e.volume.shutdown();
        }
    }
}

/// Shuts a removed volume down off the async threads: an object volume's
/// drain waits on the control runtime itself.
pub fn shutdown_detached(volume: Arc<dyn Volume>) {
    off_runtime(move || volume.shutdown());
}

/// Runs blocking work that may itself `block_on` the control runtime, on a
/// plain thread, without stalling the async worker that asked for it.
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    let run = || {
        std::thread::scope(|s| match s.spawn(f).join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        })
    };
    if tokio::runtime::Handle::try_current().is_ok() {
        tokio::task::block_in_place(run)
    } else {
        run()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: &str) -> CreateVolume {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn creates_lists_and_removes() {
        let c = VolumeCatalog::new();
        let info = c
            .create(&req(r#"{"name":"a","backend":"memory","size":1048576}"#))
            .unwrap();
        assert_eq!(info.size, 1 << 20);
        assert!(matches!(
            c.create(&req(r#"{"name":"a","backend":"memory","size":1}"#)),
            Err(VolumeStoreError::Exists(_))
        ));
        assert_eq!(c.list().len(), 1);
        assert!(c.get("a").is_some());
        c.remove("a").unwrap();
        assert!(matches!(c.remove("a"), Err(VolumeStoreError::Missing(_))));
    }

    #[test]
    fn explains_bad_requests() {
        let c = VolumeCatalog::new();
        let e = c
            .create(&req(r#"{"name":"a","backend":"tape"}"#))
            .unwrap_err();
        assert!(e.to_string().contains("file, memory"), "{e}");
        let e = c
            .create(&req(r#"{"name":"a","backend":"memory"}"#))
            .unwrap_err();
        assert!(e.to_string().contains("size"), "{e}");
        let e = c
            .create(&req(r#"{"name":"a","backend":"file","size":4096}"#))
            .unwrap_err();
        assert!(e.to_string().contains("path"), "{e}");
        for name in ["a b", "../x", "a/b", "", "..", "a\\u0000b"] {
            let body = format!(r#"{{"name":"{name}","backend":"memory","size":1}}"#);
            let e = c.create(&req(&body)).unwrap_err();
            assert!(matches!(e, VolumeStoreError::BadName(_)), "{name}: {e}");
        }
    }
}
