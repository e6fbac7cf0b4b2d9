//! How to open an object volume.

use std::path::PathBuf;
use std::time::Duration;

use super::cache::CacheSize;
use super::durability::Durability;
use super::layout;

/// How to open an object volume.
#[derive(Clone, Debug)]
pub struct ObjectOptions {
    /// Root of the local WAL directories.
    pub wal_root: PathBuf,
    /// Block cache budget: default for the name, fixed bytes, or auto.
    pub cache: CacheSize,
    /// Open without the writer lock; writes are refused.
    pub read_only: bool,
    /// Bytes of not-yet-uploaded data before writes wait for the uploader.
    pub backlog: u64,
    /// Size of a WAL segment, and so of most chunks.
    pub segment_size: usize,
    /// Uploaded chunks between checkpoints.
    pub checkpoint_every: u64,
    /// Chunks whose live share falls below this are rewritten.
    pub gc_threshold: f64,
    /// How long shutdown waits for the uploader to drain the WAL.
    pub drain_timeout: Duration,
    /// What FLUSH and FUA wait for: the local WAL or the store.
    pub durability: Durability,
    /// Open even though another writer holds the volume, fencing it
    /// (forced take-over: its unuploaded writes are lost).
    pub take_over: bool,
}

impl Default for ObjectOptions {
    fn default() -> Self {
        ObjectOptions {
            wal_root: layout::default_wal_root(),
            cache: CacheSize::Default,
            read_only: false,
            backlog: 512 << 20,
            segment_size: 4 << 20,
            checkpoint_every: 64,
            gc_threshold: 0.5,
            drain_timeout: Duration::from_secs(30),
            durability: Durability::Local,
            take_over: false,
        }
    }
}
