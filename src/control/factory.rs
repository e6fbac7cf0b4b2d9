//! The one way to open a volume: `vbd serve --export` and the control API's
//! `POST /v1/volumes` both describe what they want as a [`VolumeSpec`] and
//! open it through a [`VolumeFactory`], so a store, a WAL directory or a
//! cache size means the same thing on either path.

use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;

use crate::volume::Volume;
use crate::volume::file::{FileError, FileOptions, FileVolume};
use crate::volume::memory::MemoryVolume;
use crate::volume::object::cache::CacheSize;
use crate::volume::object::{Durability, ObjectError, ObjectOptions, admin};

/// Which backend holds a volume's data, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendSpec {
    /// Sparse memory; contents vanish with the process.
    Memory {
        /// Bytes.
        size: u64,
    },
    /// A raw file (created with `size` when missing), io_uring with
    /// O_DIRECT unless `direct` is off.
    File {
        /// The file (or block device).
        path: PathBuf,
        /// Bytes to create a missing file with.
        size: Option<u64>,
        /// O_DIRECT where aligned (off: through the page cache).
        direct: bool,
    },
    /// Volume `volume` in an object store (`None`: the factory's default
    /// store), created with `create` bytes if it does not exist yet.
    Object {
        /// Store URL (`file:///DIR`, `s3://BUCKET[/PREFIX]`).
        store: Option<String>,
        /// The volume's name in the store.
        volume: String,
        /// Block cache budget.
        cache: CacheSize,
        /// Bytes to create a missing volume with.
        create: Option<u64>,
        /// What FLUSH and FUA wait for: the local WAL or the store.
        durability: Durability,
        /// Open even though another writer holds the volume, fencing it.
        take_over: bool,
    },
}

impl BackendSpec {
    /// The backend's name, as `backend=` and the API spell it.
    pub fn name(&self) -> &'static str {
        match self {
            BackendSpec::Memory { .. } => "memory",
            BackendSpec::File { .. } => "file",
            BackendSpec::Object { .. } => "object",
        }
    }
}

/// A volume to open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeSpec {
    /// Where the data lives.
    pub backend: BackendSpec,
    /// Open without write access (an object volume takes no writer lock).
    pub read_only: bool,
}

/// Why a volume could not be opened.
#[derive(Debug, Error)]
pub enum OpenError {
    /// The file backend could not open or create the file.
    #[error(transparent)]
    File(#[from] FileError),
    /// The object backend could not open or create the volume.
    #[error(transparent)]
    Object(#[from] ObjectError),
    /// An object volume without `store=` on a server started without a default store.
    #[error("an object volume needs store=URL: this server has no default store")]
    NoStore,
}

/// Opens volumes with the server's defaults for what a spec leaves out.
#[derive(Clone, Debug, Default)]
pub struct VolumeFactory {
    /// Store for object volumes that name none.
    pub default_store: Option<String>,
    /// Where object volumes keep their write-ahead logs (None: the default place).
    pub wal_root: Option<PathBuf>,
}

impl VolumeFactory {
    /// Opens (or creates) the volume `spec` describes. May block on the
    /// control runtime (an object store), so it runs that part on a plain
    /// thread when called from an async worker.
    pub fn open(&self, spec: &VolumeSpec) -> Result<Arc<dyn Volume>, OpenError> {
        Ok(match &spec.backend {
            BackendSpec::Memory { size } => Arc::new(MemoryVolume::new(*size, spec.read_only)),
            BackendSpec::File { path, size, direct } => {
                let opts = FileOptions {
                    read_only: spec.read_only,
                    size: *size,
                    no_direct: !direct,
                };
                Arc::new(FileVolume::open(path, &opts)?)
            }
            BackendSpec::Object {
                store,
                volume,
                cache,
                create,
                durability,
                take_over,
            } => {
                let store = store
                    .as_ref()
                    .or(self.default_store.as_ref())
                    .ok_or(OpenError::NoStore)?;
                let mut opts = ObjectOptions {
                    read_only: spec.read_only,
                    cache: *cache,
                    durability: *durability,
                    take_over: *take_over,
                    ..ObjectOptions::default()
                };
                if let Some(d) = &self.wal_root {
                    opts.wal_root = d.clone();
                }
                Arc::new(off_runtime(|| {
                    admin::open_url(store, volume, *create, opts)
                })?)
            }
        })
    }
}

/// Runs blocking work that may itself `block_on` the control runtime, on a
/// plain thread, without stalling the async worker that asked for it.
pub(super) fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
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

    #[test]
    fn opens_memory_and_refuses_a_storeless_object() {
        let f = VolumeFactory::default();
        let v = f
            .open(&VolumeSpec {
                backend: BackendSpec::Memory { size: 1 << 20 },
                read_only: true,
            })
            .unwrap();
        assert_eq!(v.size(), 1 << 20);
        assert!(v.caps().read_only);
        let e = f
            .open(&VolumeSpec {
                backend: BackendSpec::Object {
                    store: None,
                    volume: "v".into(),
                    cache: CacheSize::Default,
                    create: Some(1 << 20),
                    durability: Durability::Local,
                    take_over: false,
                },
                read_only: false,
            })
            .err()
            .unwrap();
        assert!(matches!(e, OpenError::NoStore), "{e}");
    }

    #[test]
    fn file_errors_keep_their_kind() {
        let e = VolumeFactory::default()
            .open(&VolumeSpec {
                backend: BackendSpec::File {
                    path: "/nonexistent/vbd-factory-test".into(),
                    size: None,
                    direct: true,
                },
                read_only: false,
            })
            .err()
            .unwrap();
        assert!(matches!(e, OpenError::File(_)), "{e}");
        assert!(e.to_string().contains("does not exist"), "{e}");
    }
}
