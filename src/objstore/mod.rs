//! Where objects live: one interface over the `object_store` crate for a
//! local directory (`file:///var/lib/vbd/objects`) or S3 (`s3://bucket/prefix`,
//! configured from the environment or an AWS credentials file, never argv),
//! plus the embedded S3 endpoint (`server`, behind the `s3-server` feature).

#[cfg(feature = "s3-server")]
mod atomic_create;
pub mod credentials;
pub mod faults;
#[cfg(feature = "s3-server")]
mod fs_backend;
#[cfg(feature = "s3-server")]
mod ranged_reads;
#[cfg(feature = "s3-server")]
pub mod server;

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use thiserror::Error;

pub use credentials::CredentialsError;
pub use faults::Faults;

/// Why a store operation failed. Causes are reached through `source()`,
/// never repeated in the message.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The URL names no backend this vbd knows.
    #[error("store URL {0:?} is not understood: use file:///DIR or s3://BUCKET[/PREFIX]")]
    BadUrl(String),
    /// A `file://` store's root directory could not be created.
    #[error("cannot create store directory {path}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// What the filesystem said.
        #[source]
        source: std::io::Error,
    },
    /// object_store refused the store's configuration.
    #[error("cannot open store {url}")]
    Open {
        /// The store URL as given.
        url: String,
        /// What object_store said.
        #[source]
        source: ClientError,
    },
    /// An S3 store found no usable credentials.
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    /// A read or delete named a key the store does not have.
    #[error("object {0} does not exist")]
    NotFound(String),
    /// A conditional put found the key taken.
    #[error("object {0} already exists")]
    AlreadyExists(String),
    /// A conditional put reached a store that cannot do one; callers fall back to check-then-put.
    #[error("the store does not support conditional writes")]
    NoConditionalPut,
    /// Any other failure of a store call.
    #[error("store operation on {key} failed")]
    Backend {
        /// The key the call was about.
        key: String,
        /// What object_store said.
        #[source]
        source: ClientError,
    },
    /// A local directory store wrote an object but could not fsync it or its directory.
    #[error("cannot make object {key} durable")]
    Durable {
        /// The object's key.
        key: String,
        /// What the filesystem said.
        #[source]
        source: std::io::Error,
    },
    /// A failure injected by [`Faults`] on this key, for tests.
    #[error("injected fault on {0}")]
    Injected(String),
}

impl StoreError {
    fn from_os(key: &str, e: object_store::Error) -> Self {
        match e {
            object_store::Error::NotFound { .. } => StoreError::NotFound(key.to_owned()),
            object_store::Error::AlreadyExists { .. }
            | object_store::Error::Precondition { .. } => StoreError::AlreadyExists(key.to_owned()),
            object_store::Error::NotImplemented { .. }
            | object_store::Error::NotSupported { .. } => StoreError::NoConditionalPut,
            source => StoreError::Backend {
                key: key.to_owned(),
                source: ClientError(source),
            },
        }
    }
}

/// An error from the `object_store` client. Its messages already include
/// their cause (`"Generic S3 error: <cause>"`), so this wrapper ends the
/// chain there instead of letting a chain walk print the cause again.
#[derive(Debug)]
pub struct ClientError(pub object_store::Error);

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for ClientError {}

/// An object store, with keys relative to the URL's prefix.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    url: String,
    faults: Option<Arc<Faults>>,
    /// For file:// stores: the directory, so writes can be made durable.
    local: Option<PathBuf>,
    /// Shared by every clone of this store.
    reads: Arc<ReadCounters>,
}

/// What a [`Store`] (and every clone of it) has read.
#[derive(Debug, Default)]
struct ReadCounters {
    gets: AtomicU64,
    bytes: AtomicU64,
}

impl ReadCounters {
    fn count(&self, got: &Result<Bytes, StoreError>) {
        self.gets.fetch_add(1, Ordering::Relaxed);
        if let Ok(b) = got {
            self.bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
        }
    }
}

impl Store {
    /// Opens the store a URL names.
    pub fn open(url: &str) -> Result<Store, StoreError> {
        let inner: Arc<dyn ObjectStore> = if let Some(dir) = url.strip_prefix("file://") {
            if !dir.starts_with('/') {
                return Err(StoreError::BadUrl(url.to_owned()));
            }
            std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                path: dir.into(),
                source,
            })?;
            Arc::new(
                LocalFileSystem::new_with_prefix(dir).map_err(|e| StoreError::Open {
                    url: url.to_owned(),
                    source: ClientError(e),
                })?,
            )
        } else if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(StoreError::BadUrl(url.to_owned()));
            }
            let s3 = s3_builder(bucket)?.build().map_err(|e| StoreError::Open {
                url: url.to_owned(),
                source: ClientError(e),
            })?;
            if prefix.trim_matches('/').is_empty() {
                Arc::new(s3)
            } else {
                Arc::new(object_store::prefix::PrefixStore::new(
                    s3,
                    prefix.trim_matches('/'),
                ))
            }
        } else {
            return Err(StoreError::BadUrl(url.to_owned()));
        };
        let local = url.strip_prefix("file://").map(PathBuf::from);
        Ok(Store {
            inner,
            url: url.to_owned(),
            faults: None,
            local,
            reads: Arc::default(),
        })
    }

    /// Wraps any `object_store` implementation (tests use the in-memory one).
    pub fn from_object_store(inner: Arc<dyn ObjectStore>, url: &str) -> Store {
        Store {
            inner,
            url: url.to_owned(),
            faults: None,
            local: None,
            reads: Arc::default(),
        }
    }

    /// The same store with injected failures (see [`Faults`]).
    pub fn with_faults(mut self, faults: Arc<Faults>) -> Store {
        self.faults = Some(faults);
        self
    }

    /// The URL the store was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn check(&self, key: &str) -> Result<(), StoreError> {
        match &self.faults {
            Some(f) if f.should_fail() => Err(StoreError::Injected(key.to_owned())),
            _ => Ok(()),
        }
    }

    /// GETs made through this store and its clones, and the bytes they
    /// returned (whole objects and ranges alike, failures counted too).
    pub fn reads(&self) -> (u64, u64) {
        (
            self.reads.gets.load(Ordering::Relaxed),
            self.reads.bytes.load(Ordering::Relaxed),
        )
    }

    /// Reads a whole object.
    pub async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.check(key)?;
        let got = async {
            let r = self
                .inner
                .get(&Path::from(key))
                .await
                .map_err(|e| StoreError::from_os(key, e))?;
            r.bytes().await.map_err(|e| StoreError::from_os(key, e))
        }
        .await;
        self.reads.count(&got);
        got
    }

    /// Reads a byte range of an object.
    pub async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        self.check(key)?;
        let got = self
            .inner
            .get_range(&Path::from(key), range)
            .await
            .map_err(|e| StoreError::from_os(key, e));
        self.reads.count(&got);
        got
    }

    /// Writes an object, replacing any previous one. Returns once the
    /// object is durable (the WAL is deleted on the strength of it).
    pub async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        self.check(key)?;
        self.inner
            .put(&Path::from(key), PutPayload::from(data))
            .await
            .map_err(|e| StoreError::from_os(key, e))?;
        self.make_durable(key).await
    }

    /// A local directory store writes through the page cache and renames
    /// into place without syncing; sync the file and its directory so a
    /// power failure cannot lose an object we were told is stored. (S3
    /// acknowledges a PUT only once it is durable.)
    async fn make_durable(&self, key: &str) -> Result<(), StoreError> {
        let Some(root) = &self.local else {
            return Ok(());
        };
        let path = root.join(key);
        let sync = move || -> std::io::Result<()> {
            std::fs::File::open(&path)?.sync_all()?;
            if let Some(dir) = path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        let durable = |source| StoreError::Durable {
            key: key.to_owned(),
            source,
        };
        tokio::task::spawn_blocking(sync)
            .await
            .map_err(|e| durable(std::io::Error::other(e)))?
            .map_err(durable)
    }

    /// Writes an object only if none exists (`AlreadyExists` otherwise).
    pub async fn put_new(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        self.check(key)?;
        let opts = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        self.inner
            .put_opts(&Path::from(key), PutPayload::from(data), opts)
            .await
            .map_err(|e| StoreError::from_os(key, e))?;
        self.make_durable(key).await
    }

    /// Deletes an object; deleting a missing object is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.check(key)?;
        match self.inner.delete(&Path::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(StoreError::from_os(key, e)),
        }
    }

    /// Keys (relative to the store) and sizes under `prefix`, sorted.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let listed = self.list_modified(prefix).await?;
        Ok(listed.into_iter().map(|l| (l.key, l.size)).collect())
    }

    /// Whether an object exists (a HEAD request).
    pub async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        self.check(key)?;
        match self.inner.head(&Path::from(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(StoreError::from_os(key, e)),
        }
    }

    /// Like [`Store::list`], with each object's last-modified time in seconds
    /// since the Unix epoch (what a take-over reports about its predecessor).
    pub async fn list_modified(&self, prefix: &str) -> Result<Vec<Listed>, StoreError> {
        self.check(prefix)?;
        let p = Path::from(prefix);
        let mut stream = self.inner.list(Some(&p));
        let mut out = Vec::new();
        while let Some(item) = stream.next().await {
            let meta = item.map_err(|e| StoreError::from_os(prefix, e))?;
            out.push(Listed {
                key: meta.location.to_string(),
                size: meta.size,
                modified_unix: meta.last_modified.timestamp(),
            });
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Names directly under `prefix` (one level, like `ls`).
    pub async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.check(prefix)?;
        let p = Path::from(prefix);
        let r = self
            .inner
            .list_with_delimiter(Some(&p))
            .await
            .map_err(|e| StoreError::from_os(prefix, e))?;
        let mut out: Vec<String> = r
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_owned))
            .collect();
        out.sort();
        Ok(out)
    }
}

/// One object of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// The key, relative to the store.
    pub key: String,
    /// Bytes.
    pub size: u64,
    /// Last modified, in seconds since the Unix epoch.
    pub modified_unix: i64,
}

/// An S3 client configured from the environment, then from an AWS
/// credentials file for whatever the environment left out.
fn s3_builder(bucket: &str) -> Result<AmazonS3Builder, StoreError> {
    let mut b = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_conditional_put(S3ConditionalPut::ETagMatch);
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let endpoint = env("AWS_ENDPOINT_URL").or_else(|| env("AWS_ENDPOINT"));
    if let Some(ep) = &endpoint {
        b = b.with_endpoint(ep);
        if ep.starts_with("http://") {
            b = b.with_allow_http(true);
        }
    }
    if env("AWS_REGION")
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .is_none()
    {
        b = b.with_region("us-east-1");
    }
    if env("AWS_ACCESS_KEY_ID").is_none() {
        match credentials::from_file()? {
            Some(c) => {
                b = b
                    .with_access_key_id(c.access_key_id)
                    .with_secret_access_key(c.secret_access_key);
                if let Some(t) = c.session_token {
                    b = b.with_token(t);
                }
            }
            None => return Err(CredentialsError::Missing.into()),
        }
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Chain;

    #[test]
    fn store_errors_name_each_cause_once() {
        let e = StoreError::from_os(
            "volumes/a/lock",
            object_store::Error::Generic {
                store: "S3",
                source: "connection refused".into(),
            },
        );
        assert_eq!(
            Chain(&e).to_string(),
            "store operation on volumes/a/lock failed: Generic S3 error: connection refused"
        );
        // A directory that cannot be made: the OS's reason comes once, last.
        let e = Store::open("file:///proc/vbd-cannot-be-here").unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot create store directory /proc/vbd-cannot-be-here"
        );
        let chain = Chain(&e).to_string();
        let reason = chain
            .strip_prefix("cannot create store directory /proc/vbd-cannot-be-here: ")
            .unwrap_or_else(|| panic!("{chain}"));
        assert!(reason.contains("os error"), "{chain}");
        assert!(!reason.contains("store directory"), "{chain}");
    }
}
