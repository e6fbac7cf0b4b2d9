//! The object volume's formats, all little-endian and versioned:
//!
//! WAL record (local segment files, `<seq>.wal`, after a 16-byte segment
//! header `VBDWAL01` + segment id):
//! ```text
//! magic u32 "WAL1" | crc32c u32 (of everything after it) | seq u64 |
//! lba u64 | blocks u32 | kind u8 | pad [u8; 3] | data (blocks × 4096, kind = data only)
//! ```
//! Chunk object (`chunks/<id>`), immutable, built whole in memory:
//! ```text
//! header 64 B: "VBDCHNK1" | version u32 | header crc u32 | id u64 |
//!              min_seq u64 | max_seq u64 | entries u32 | data blocks u32 |
//!              index crc u32 | block size u32 | reserved
//! index: entries × 32 B (lba u64 | seq u64 | blocks u32 | data block u32 | kind u8 | pad)
//!        then one crc32c per data block (the index crc covers both)
//! data:  data blocks × 4096
//! ```
//! Each chunk's index is its map delta; recovery merges them by sequence.
//! Checkpoint object (`checkpoints/<id>`): the whole map as of chunk `id`:
//! ```text
//! "VBDCKPT1" | version u32 | crc u32 (of the rest) | chunk id u64 | max seq u64 |
//! entries u64 | chunks u64 |
//! entries × 40 B (lba u64 | seq u64 | chunk u64 | blocks u32 | block u32 | kind u8 | pad)
//! chunks × 24 B (id u64 | data start u64 | data blocks u32 | pad)
//! ```
//!
//! Snapshot object (`snapshots/<name>`): `"VBDSNAP1" | version u32 |
//! description length u32 | description (JSON) | the map as a checkpoint`.
//!
//! Each kind has its own module: `wal` (records and segment files),
//! `chunk`, `checkpoint` and `snapshot`, with `crc` (combining checksums)
//! for the WAL; this one holds what they share.

mod checkpoint;
mod chunk;
mod crc;
mod snapshot;
mod wal;

use thiserror::Error;

pub use checkpoint::{
    CHECKPOINT_ENTRY, CHECKPOINT_HEADER, CHECKPOINT_MAGIC, CHUNK_RECORD, Checkpoint,
    CheckpointEntry, ChunkRecord, decode_checkpoint, encode_checkpoint,
};
pub use chunk::{
    CHUNK_HEADER, CHUNK_MAGIC, ChunkHeader, INDEX_ENTRY, IndexEntry, chunk_data_start,
    decode_chunk_header, decode_chunk_index, encode_chunk, encode_chunk_with, set_chunk_id,
};
#[cfg(feature = "fuzzing")]
pub(super) use chunk::{INDEX_CRC_AT, seal_chunk_header};
pub use snapshot::{
    SNAPSHOT_HEADER, SNAPSHOT_MAGIC, decode_snapshot, encode_snapshot, snapshot_meta_len,
};
pub use wal::{
    RecordHeader, SEGMENT_HEADER, SEGMENT_MAGIC, SegmentRecords, WAL_MAGIC, WAL_RECORD_HEADER,
    decode_record, decode_record_header, decode_segment, decode_segment_header, encode_record,
    record_crc, record_header, record_header_bytes, segment_header,
};

/// Bytes per volume block.
pub const BLOCK: usize = 4096;
/// The version every chunk and checkpoint carries.
pub const VERSION: u32 = 1;

/// What a record or index entry says about its blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Blocks of data follow.
    Data = 1,
    /// Zeroes, still allocated (WRITE_ZEROES with NO_HOLE).
    Zero = 2,
    /// Zeroes, deallocated (TRIM, WRITE_ZEROES).
    Hole = 3,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        match v {
            1 => Some(Kind::Data),
            2 => Some(Kind::Zero),
            3 => Some(Kind::Hole),
            _ => None,
        }
    }
}

/// A corrupt or foreign object or record.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FormatError {
    /// The first bytes are not this kind's magic: not one of our objects.
    #[error("{what}: bad magic")]
    Magic {
        /// The kind of object or record ("chunk", "checkpoint", ...).
        what: &'static str,
    },
    /// Written by a format version this vbd cannot read.
    #[error("{what}: unsupported format version {version}")]
    Version {
        /// The kind of object or record.
        what: &'static str,
        /// The version it carries.
        version: u32,
    },
    /// A CRC32C does not match: the bytes changed after they were written.
    #[error("{what}: checksum mismatch")]
    Checksum {
        /// The kind of object or record.
        what: &'static str,
    },
    /// Shorter than its header or its counts say.
    #[error("{what}: truncated")]
    Truncated {
        /// The kind of object or record.
        what: &'static str,
    },
    /// Checksums hold but a field contradicts the rest (a count, a kind, an
    /// extent that wraps).
    #[error("{what}: inconsistent field {field}")]
    Field {
        /// The kind of object or record.
        what: &'static str,
        /// Which field.
        field: &'static str,
    },
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
