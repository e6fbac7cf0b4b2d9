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
    /// The object store refused or failed a call.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No descriptor for this volume name in the store.
    #[error("volume {0:?} does not exist in this store; create it with `vbd volume create`")]
    NoSuchVolume(String),
    /// A create found the volume's descriptor already there.
    #[error("volume {0:?} already exists")]
    Exists(String),
    /// The name cannot be part of object keys and a local directory.
    #[error("volume name {0:?} is invalid: use 1-256 letters, digits, '-', '_' or '.'")]
    BadName(String),
    /// The size (bytes) is zero or not a whole number of blocks.
    #[error("volume size {0} is invalid: it must be a positive multiple of 4096 bytes")]
    BadSize(u64),
    /// Another writer holds the volume's lock.
    #[error("volume {name:?} is open for writing by {owner}; stop that server first")]
    Locked {
        /// The volume's name.
        name: String,
        /// Who holds it: another local process, or `pid N on HOST`.
        owner: String,
    },
    /// A chunk or checkpoint whose checksums hold but whose content does not.
    #[error("object {key} is corrupt")]
    Corrupt {
        /// Store key of the damaged object.
        key: String,
        /// What the decoder found wrong.
        #[source]
        source: FormatError,
    },
    /// The store returned fewer bytes than a read of a whole object asked for.
    #[error("object {key} returned {got} bytes where {want} were asked for")]
    ShortRead {
        /// Store key of the object.
        key: String,
        /// Bytes returned.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// The volume's descriptor is not the JSON this vbd writes.
    #[error("volume descriptor {key} cannot be parsed")]
    Descriptor {
        /// Store key of the descriptor.
        key: String,
        /// Why it did not parse.
        #[source]
        source: serde_json::Error,
    },
    /// The descriptor is from a format or block size this vbd cannot read.
    #[error(
        "volume descriptor {key} has format {format} with {block_size}-byte blocks, which this vbd does not support"
    )]
    Unsupported {
        /// Store key of the descriptor.
        key: String,
        /// The descriptor's format version (this vbd reads 1).
        format: u32,
        /// The descriptor's block size in bytes (this vbd uses 4096).
        block_size: u32,
    },
    /// The store claims the last sequence number: damage, not wear.
    #[error("volume {0:?} has no sequence numbers left")]
    SequenceExhausted(String),
    /// Every generation number an id can carry has been used.
    #[error("volume {0:?} has no writer generations left")]
    GenerationsExhausted(String),
    /// A take-over of the volume has begun but not drawn its fence yet, so
    /// whether an older writer's snapshot counts is not settled.
    #[error(
        "volume {volume:?} is being taken over (generation {generation}); whether snapshot \
         {snapshot:?} survives it is not known yet: retry once the take-over is done"
    )]
    TakingOver {
        /// The volume.
        volume: String,
        /// Its snapshot asked for.
        snapshot: String,
        /// The generation taking it over.
        generation: u64,
    },
    /// This writer's generation has used every id it can carry.
    #[error("this writer's generation used every object id it can carry; open the volume again")]
    IdsExhausted,
    /// Another writer took the volume over: this one may not change it
    /// (a snapshot, clone flatten, resize or collection it was asked for).
    #[error(
        "this writer (generation {generation}) was fenced by generation {by}, which took the volume over"
    )]
    Fenced {
        /// This writer's generation.
        generation: u64,
        /// The generation that took over.
        by: u64,
    },
    /// A descriptor or lock object could not be serialised.
    #[error("cannot encode the {what}")]
    Encode {
        /// Which object ("volume descriptor", "lock owner").
        what: &'static str,
        /// What serde_json said.
        #[source]
        source: serde_json::Error,
    },
    /// The local WAL directory or its lock file could not be created.
    #[error("cannot prepare the local WAL state at {path}")]
    Local {
        /// The directory or file.
        path: PathBuf,
        /// What the filesystem said.
        #[source]
        source: std::io::Error,
    },
    /// The OS refused to spawn the WAL thread.
    #[error("cannot start the WAL thread")]
    WalThread(#[source] std::io::Error),
    /// Replaying the local WAL at open failed.
    #[error(transparent)]
    Wal(#[from] WalError),
    /// The snapshot name cannot be part of an object key.
    #[error("snapshot name {0:?} is invalid: use 1-256 letters, digits, '-', '_' or '.'")]
    BadSnapshotName(String),
    /// No snapshot of this name.
    #[error("volume {volume:?} has no snapshot {snapshot:?}; `vbd volume snapshots` lists them")]
    NoSuchSnapshot {
        /// The volume.
        volume: String,
        /// The snapshot asked for.
        snapshot: String,
    },
    /// A snapshot create found the name taken.
    #[error("volume {volume:?} already has a snapshot {snapshot:?}")]
    SnapshotExists {
        /// The volume.
        volume: String,
        /// The snapshot's name.
        snapshot: String,
    },
    /// The operation changes a volume that was opened read-only (or is a snapshot).
    #[error("{0} is read-only")]
    ReadOnly(String),
    /// Something still reads through this volume or snapshot.
    #[error("{what} is still needed by {}; delete or flatten them first", .dependents.join(", "))]
    HasDependents {
        /// The volume or snapshot (`name@snap`) asked for.
        what: String,
        /// Clones (`clone NAME`) and snapshots (`snapshot NAME@SNAP`) that read through it.
        dependents: Vec<String>,
    },
    /// Writes acknowledged before a snapshot or resize did not reach the store in time.
    #[error(
        "volume {0:?}: the write-ahead log did not drain to the store in time; is the store reachable?"
    )]
    DrainTimeout(String),
    /// A shrink without `--allow-shrink`.
    #[error(
        "volume {name:?} is {from} bytes; shrinking it to {to} discards the tail: pass --allow-shrink"
    )]
    Shrink {
        /// The volume.
        name: String,
        /// Its size now, in bytes.
        from: u64,
        /// The size asked for, in bytes.
        to: u64,
    },
    /// A clone chain deeper than layer-tagged ids can name.
    #[error("{0} is too deep a chain of clones to clone again; flatten it first")]
    TooDeep(String),
    /// An import that never finished (its process died): no one may use it.
    #[error("volume {0:?} is an unfinished import; run the import again or delete it")]
    Unfinished(String),
    /// A local file of an import or export failed.
    #[error("{op} {path}")]
    File {
        /// What was being done ("reading", "writing", ...).
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// What the filesystem said.
        #[source]
        source: std::io::Error,
    },
    /// A write through the volume's own write path failed.
    #[error("writing to the volume failed")]
    Write(#[source] crate::volume::VolumeError),
    /// The operation was interrupted (Ctrl-C, SIGTERM).
    #[error("interrupted")]
    Interrupted,
}

/// Why the local write-ahead log could not be written, synced or read back.
#[derive(Debug, Error)]
pub enum WalError {
    /// A new segment file could not be created.
    #[error("cannot create WAL segment {path}")]
    Create {
        /// The segment file's path.
        path: PathBuf,
        /// What the filesystem said.
        #[source]
        source: std::io::Error,
    },
    /// Appended records could not be written to their segment file.
    #[error("cannot write WAL segment {id:016x}")]
    Write {
        /// The segment's id (its file name in hex).
        id: u64,
        /// What the filesystem said.
        #[source]
        source: std::io::Error,
    },
    /// fdatasync of a segment failed: its records are not durable.
    #[error("cannot sync WAL segment {id:016x}")]
    Sync {
        /// The segment's id (its file name in hex).
        id: u64,
        /// What the filesystem said.
        #[source]
        source: std::io::Error,
    },
    /// fsync of the WAL directory failed, so new segment files may not survive a crash.
    #[error("cannot sync WAL directory {path}")]
    SyncDir {
        /// The WAL directory.
        path: PathBuf,
        /// What the filesystem said.
        #[source]
        source: std::io::Error,
    },
    /// The WAL directory could not be listed at open.
    #[error("cannot read WAL directory {path}")]
    ReadDir {
        /// The WAL directory.
        path: PathBuf,
        /// What the filesystem said.
        #[source]
        source: std::io::Error,
    },
    /// A segment file could not be read back at open.
    #[error("cannot read WAL segment {path}")]
    Read {
        /// The segment file's path.
        path: PathBuf,
        /// What the filesystem said.
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
    /// A ranged GET of a chunk failed.
    #[error("reading chunk {chunk:016x} from the store failed")]
    Fetch {
        /// The chunk's id.
        chunk: u64,
        /// What the store said.
        #[source]
        source: StoreError,
    },
    /// The store returned fewer bytes than a ranged GET of a chunk asked for.
    #[error("chunk {chunk:016x} returned {got} bytes where {want} were asked for")]
    ShortFetch {
        /// The chunk's id.
        chunk: u64,
        /// Bytes the store returned.
        got: usize,
        /// Bytes the ranged GET asked for.
        want: usize,
    },
    /// A read resolved to a chunk the map no longer knows: a bug, reported as EIO.
    #[error("chunk {0:016x} is not in the volume's map")]
    UnknownChunk(u64),
    /// Another writer took the volume over: this one may not change it.
    #[error(
        "this writer (generation {generation}) was fenced by generation {by}, which took the volume over"
    )]
    Fenced {
        /// This writer's generation.
        generation: u64,
        /// The generation that took over.
        by: u64,
    },
    /// A write's record (header and data, bytes) exceeds a whole segment.
    #[error("a {0}-byte record does not fit in a WAL segment")]
    RecordTooBig(usize),
}
