//! The volumes the control API manages: `POST /v1/volumes` requests become
//! [`VolumeSpec`]s, opened through the server's one [`VolumeFactory`] and
//! kept by name until deleted.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use thiserror::Error;

use super::factory::{BackendSpec, OpenError, VolumeFactory, VolumeSpec, off_runtime};
use crate::lock::MutexExt;
use crate::server::registry::valid_name;
use crate::size::{SizeError, parse_size};
use crate::volume::Volume;
use crate::volume::object::Durability;
use crate::volume::object::cache::CacheSize;

pub use super::model::{CreateVolume, VolumeInfo};

/// The backends a request may name.
const BACKENDS: [&str; 3] = ["file", "memory", "object"];

/// Why a volume operation failed.
#[derive(Debug, Error)]
pub enum VolumeStoreError {
    /// The name cannot name an export or a store's objects.
    #[error("volume name {0:?} is invalid: use 1-256 letters, digits, '-', '_' or '.'")]
    BadName(String),
    /// The catalog already has a volume of this name.
    #[error("a volume named {0:?} already exists; delete it first or pick another name")]
    Exists(String),
    /// The catalog has no volume of this name.
    #[error("no volume named {0:?}; create it first (vbd vm volume create)")]
    Missing(String),
    /// The request named a backend other than file, memory or object.
    #[error("unknown volume backend {0:?}; available: {available}", available = BACKENDS.join(", "))]
    UnknownBackend(String),
    /// The request's fields do not fit its backend (a missing size or path, say).
    #[error("{backend} volume {name:?}: {reason}")]
    Invalid {
        /// The backend asked for.
        backend: &'static str,
        /// The volume's name.
        name: String,
        /// What is wrong, as a sentence for the client.
        reason: String,
    },
    /// An object volume's `cache` string is neither `auto` nor a size.
    #[error("object volume {name:?}: cache")]
    BadCache {
        /// The volume's name.
        name: String,
        /// Why the size did not parse.
        #[source]
        source: SizeError,
    },
    /// The backend could not open or create the volume.
    #[error("{backend} volume {name:?} cannot be opened")]
    Open {
        /// The backend asked for.
        backend: &'static str,
        /// The volume's name.
        name: String,
        /// The backend's reason.
        #[source]
        source: Box<OpenError>,
    },
}

/// The spec a create request describes; the volume is named `req.name` in
/// its store too.
fn spec(req: &CreateVolume) -> Result<VolumeSpec, VolumeStoreError> {
    let invalid = |backend: &'static str, reason: String| VolumeStoreError::Invalid {
        backend,
        name: req.name.clone(),
        reason,
    };
    let backend = match req.backend.as_str() {
        "memory" => BackendSpec::Memory {
            size: req
                .size
                .filter(|s| *s > 0)
                .ok_or_else(|| invalid("memory", "needs a size, e.g. size=1G".into()))?,
        },
        "file" => {
            let invalid = |reason: &str| invalid("file", reason.into());
            BackendSpec::File {
                path: req
                    .options
                    .get("path")
                    .and_then(Value::as_str)
                    .map(PathBuf::from)
                    .ok_or_else(|| invalid("needs path=FILE"))?,
                size: req.size,
                direct: match req.options.get("direct") {
                    None => true,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => return Err(invalid("direct must be true or false")),
                },
            }
        }
        "object" => {
            let invalid = |reason: String| invalid("object", reason);
            BackendSpec::Object {
                store: match req.options.get("store") {
                    None => None,
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(_) => return Err(invalid("store must be a URL string".into())),
                },
                volume: req.name.clone(),
                cache: match req.options.get("cache") {
                    None => CacheSize::Default,
                    Some(Value::String(s)) if s == "auto" => CacheSize::Auto,
                    Some(Value::String(s)) => {
                        CacheSize::Bytes(parse_size(s).map_err(|source| {
                            VolumeStoreError::BadCache {
                                name: req.name.clone(),
                                source,
                            }
                        })?)
                    }
                    Some(Value::Number(n)) => CacheSize::Bytes(
                        n.as_u64()
                            .ok_or_else(|| invalid("cache must be bytes".into()))?,
                    ),
                    Some(_) => return Err(invalid("cache must be a size or \"auto\"".into())),
                },
                create: req.size,
                durability: match req.options.get("durability") {
                    None => Durability::Local,
                    Some(Value::String(s)) => s.parse().map_err(invalid)?,
                    Some(_) => {
                        return Err(invalid("durability must be \"local\" or \"store\"".into()));
                    }
                },
                take_over: match req.options.get("take_over") {
                    None => false,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => return Err(invalid("take_over must be true or false".into())),
                },
            }
        }
        other => return Err(VolumeStoreError::UnknownBackend(other.to_owned())),
    };
    Ok(VolumeSpec {
        backend,
        read_only: req.read_only,
    })
}

struct Entry {
    info: VolumeInfo,
    volume: Arc<dyn Volume>,
    /// What it was created from, to open it again after a restart.
    request: CreateVolume,
}

/// Named volumes created through the control API.
#[derive(Default)]
pub struct VolumeCatalog {
    factory: VolumeFactory,
    volumes: Mutex<BTreeMap<String, Entry>>,
}

impl VolumeCatalog {
    /// A catalog without a default store: object volumes must name theirs.
    pub fn new() -> Self {
        Self::default()
    }

    /// A catalog that opens volumes through `factory`.
    pub fn with_factory(factory: VolumeFactory) -> Self {
        VolumeCatalog {
            factory,
            volumes: Mutex::default(),
        }
    }

    /// Creates a volume and records it.
    pub fn create(&self, req: &CreateVolume) -> Result<VolumeInfo, VolumeStoreError> {
        if !valid_name(&req.name) {
            return Err(VolumeStoreError::BadName(req.name.clone()));
        }
        if !BACKENDS.contains(&req.backend.as_str()) {
            return Err(VolumeStoreError::UnknownBackend(req.backend.clone()));
        }
        if self.lock().contains_key(&req.name) {
            return Err(VolumeStoreError::Exists(req.name.clone()));
        }
        let spec = spec(req)?;
        let backend = spec.backend.name();
        let volume = self
            .factory
            .open(&spec)
            .map_err(|source| VolumeStoreError::Open {
                backend,
                name: req.name.clone(),
                source: Box::new(source),
            })?;
        let info = VolumeInfo {
            name: req.name.clone(),
            backend: backend.to_owned(),
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
                request: req.clone(),
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

    /// How to open `name` again in another vbd process: its create
    /// request without the size, so that a file or object volume that has
    /// gone missing meanwhile fails to open instead of coming back empty.
    /// `None` for volumes not catalogued or whose data lives in memory.
    pub fn reopen_request(&self, name: &str) -> Option<CreateVolume> {
        let vols = self.lock();
        let e = vols.get(name)?;
        if e.info.backend == "memory" {
            return None;
        }
        Some(CreateVolume {
            size: None,
            ..e.request.clone()
        })
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
    fn a_reopen_request_never_creates_and_memory_has_none() {
        let dir = crate::vm::testing::Scratch::new("catalog-reopen");
        let path = dir.0.join("f.img");
        let c = VolumeCatalog::new();
        let body = format!(
            r#"{{"name":"f","backend":"file","path":"{}","size":65536,"direct":false}}"#,
            path.display()
        );
        c.create(&req(&body)).unwrap();
        c.create(&req(r#"{"name":"m","backend":"memory","size":4096}"#))
            .unwrap();
        assert_eq!(c.reopen_request("m"), None);
        assert_eq!(c.reopen_request("nope"), None);
        let again = c.reopen_request("f").unwrap();
        assert_eq!(again.size, None);
        assert_eq!(again.options["path"], path.display().to_string());
        // The next vbd opens the same file from it, once this one let go...
        c.shutdown_all();
        let other = VolumeCatalog::new();
        assert_eq!(other.create(&again).unwrap().size, 65536);
        // ...and refuses, rather than creates, a file that went missing.
        other.shutdown_all();
        std::fs::remove_file(&path).unwrap();
        let third = VolumeCatalog::new();
        assert!(matches!(
            third.create(&again),
            Err(VolumeStoreError::Open { .. })
        ));
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

    #[test]
    fn object_requests_become_specs() {
        let s = spec(&req(
            r#"{"name":"v","backend":"object","store":"s3://b","cache":"64M","size":4096,"read_only":true}"#,
        ))
        .unwrap();
        assert_eq!(
            s,
            VolumeSpec {
                backend: BackendSpec::Object {
                    store: Some("s3://b".into()),
                    volume: "v".into(),
                    cache: CacheSize::Bytes(64 << 20),
                    create: Some(4096),
                    durability: Durability::Local,
                    take_over: false,
                },
                read_only: true,
            }
        );
        let e = spec(&req(r#"{"name":"v","backend":"object","cache":"lots"}"#)).unwrap_err();
        assert_eq!(
            crate::error::Chain(&e).to_string(),
            "object volume \"v\": cache: size \"lots\" must start with a number, like 512M or 1G"
        );
        let e = VolumeCatalog::new()
            .create(&req(r#"{"name":"v","backend":"object","size":4096}"#))
            .unwrap_err();
        assert!(matches!(e, VolumeStoreError::Open { .. }), "{e}");
    }
}
