//! What can go wrong in an object volume, by where it happens: setting a
//! volume up or changing it ([`ObjectError`]), its local write-ahead log
//! ([`WalError`]), and a request on an open volume ([`RequestError`], which
//! reaches the server boxed in `VolumeError::Backend`, so clients see EIO).
//! Messages say what failed; the cause is the source, printed once.

use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;

use super::format::FormatError;
use crate::objstore::StoreError;

/// Why an object volume could not be created, opened or changed.
#[derive(Debug, Error)]
pub enum ObjectError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("volume {0:?} does not exist in this store; create it with `vbd volume create`")]
    NoSuchVolume(String),
    #[error("volume {0:?} already exists")]
    Exists(String),
    #[error("volume name {0:?} is invalid: use 1-256 letters, digits, '-', '_' or '.'")]
    BadName(String),
    #[error("volume size {0} is invalid: it must be a positive multiple of 4096 bytes")]
    BadSize(u64),
    #[error("volume {name:?} is open for writing by {owner}; stop that server first")]
    Locked { name: String, owner: String },
    /// A chunk or checkpoint whose checksums hold but whose content does not.
    #[error("object {key} is corrupt")]
    Corrupt {
        key: String,
        #[source]
        source: FormatError,
    },
    #[error("object {key} returned {got} bytes where {want} were asked for")]
    ShortRead {
        key: String,
        got: usize,
        want: usize,
    },
    #[error("volume descriptor {key} cannot be parsed")]
    Descriptor {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "volume descriptor {key} has format {format} with {block_size}-byte blocks, which this vbd does not support"
    )]
    Unsupported {
        key: String,
        format: u32,
        block_size: u32,
    },
    /// The store claims the last sequence number: damage, not wear.
    #[error("volume {0:?} has no sequence numbers left")]
    SequenceExhausted(String),
    #[error("cannot encode the {what}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot prepare the local WAL state at {path}")]
    Local {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the WAL thread")]
    WalThread(#[source] std::io::Error),
    #[error(transparent)]
    Wal(#[from] WalError),
}

/// Why the local write-ahead log could not be written, synced or read back.
#[derive(Debug, Error)]
pub enum WalError {
    #[error("cannot create WAL segment {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write WAL segment {id:016x}")]
    Write {
        id: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot sync WAL segment {id:016x}")]
    Sync {
        id: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot sync WAL directory {path}")]
    SyncDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read WAL directory {path}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read WAL segment {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why a request on an open object volume failed.
#[derive(Debug, Error)]
pub enum RequestError {
    /// Every waiter of a failed WAL round gets the same error.
    #[error(transparent)]
    Wal(Arc<WalError>),
    #[error("reading chunk {chunk:016x} from the store failed")]
    Fetch {
        chunk: u64,
        #[source]
        source: StoreError,
    },
    #[error("chunk {chunk:016x} returned {got} bytes where {want} were asked for")]
    ShortFetch { chunk: u64, got: usize, want: usize },
    #[error("chunk {0:016x} is not in the volume's map")]
    UnknownChunk(u64),
    #[error("a {0}-byte record does not fit in a WAL segment")]
    RecordTooBig(usize),
}
