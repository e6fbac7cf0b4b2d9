//! Checkpoint objects: the whole map as of one chunk, so recovery need not
//! read every chunk index since the volume was created.

use super::{FormatError, Kind, VERSION, u32_at, u64_at};

/// First 8 bytes of every checkpoint object.
pub const CHECKPOINT_MAGIC: &[u8; 8] = b"VBDCKPT1";
/// Bytes before the first entry.
pub const CHECKPOINT_HEADER: usize = 48;
/// Bytes per extent entry.
pub const CHECKPOINT_ENTRY: usize = 40;
/// Bytes per chunk record, after the entries.
pub const CHUNK_RECORD: usize = 24;

/// One extent of a checkpointed map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointEntry {
    /// First block of the extent, in 4096-byte blocks.
    pub lba: u64,
    /// Sequence number of the write that produced it.
    pub seq: u64,
    /// Length of the extent in blocks (never 0).
    pub blocks: u32,
    /// Data, zeroes or hole.
    pub kind: Kind,
    /// Chunk holding the data (0 unless `kind` is data).
    pub chunk: u64,
    /// Block within that chunk's data where the extent starts.
    pub block: u32,
}

/// Where a chunk's data starts and how much it has, as a checkpoint records
/// it (so that opening a volume need not read old chunks' headers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRecord {
    /// The chunk's id.
    pub id: u64,
    /// Byte offset of the first data block in the chunk object.
    pub data_start: u64,
    /// Data blocks the chunk holds.
    pub data_blocks: u32,
}

/// A decoded checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// Every chunk up to this id is reflected.
    pub id: u64,
    /// Highest sequence number in the map, so recovery resumes numbering after it.
    pub max_seq: u64,
    /// The map's extents, in LBA order.
    pub entries: Vec<CheckpointEntry>,
    /// Every chunk the map points into.
    pub chunks: Vec<ChunkRecord>,
}

/// Encodes a checkpoint of the map as of chunk `id`.
pub fn encode_checkpoint(
    id: u64,
    entries: &[CheckpointEntry],
    chunks: &[ChunkRecord],
    max_seq: u64,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        CHECKPOINT_HEADER + entries.len() * CHECKPOINT_ENTRY + chunks.len() * CHUNK_RECORD,
    );
    out.extend_from_slice(CHECKPOINT_MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&max_seq.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    out.extend_from_slice(&(chunks.len() as u64).to_le_bytes());
    for e in entries {
        out.extend_from_slice(&e.lba.to_le_bytes());
        out.extend_from_slice(&e.seq.to_le_bytes());
        out.extend_from_slice(&e.chunk.to_le_bytes());
        out.extend_from_slice(&e.blocks.to_le_bytes());
        out.extend_from_slice(&e.block.to_le_bytes());
        out.extend_from_slice(&[e.kind as u8, 0, 0, 0, 0, 0, 0, 0]);
    }
    for c in chunks {
        out.extend_from_slice(&c.id.to_le_bytes());
        out.extend_from_slice(&c.data_start.to_le_bytes());
        out.extend_from_slice(&c.data_blocks.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
    }
    let crc = crc32c::crc32c(&out[16..]);
    out[12..16].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes and checks a checkpoint.
pub fn decode_checkpoint(b: &[u8]) -> Result<Checkpoint, FormatError> {
    let what = "checkpoint";
    if b.len() < CHECKPOINT_HEADER {
        return Err(FormatError::Truncated { what });
    }
    if &b[..8] != CHECKPOINT_MAGIC {
        return Err(FormatError::Magic { what });
    }
    let version = u32_at(b, 8);
    if version != VERSION {
        return Err(FormatError::Version { what, version });
    }
    if crc32c::crc32c(&b[16..]) != u32_at(b, 12) {
        return Err(FormatError::Checksum { what });
    }
    let id = u64_at(b, 16);
    let max_seq = u64_at(b, 24);
    let n = u64_at(b, 32);
    let nc = u64_at(b, 40);
    let body = &b[CHECKPOINT_HEADER..];
    let want = n
        .checked_mul(CHECKPOINT_ENTRY as u64)
        .and_then(|x| x.checked_add(nc.checked_mul(CHUNK_RECORD as u64)?));
    if want != Some(body.len() as u64) {
        return Err(FormatError::Field {
            what,
            field: "entries",
        });
    }
    let split = n as usize * CHECKPOINT_ENTRY;
    let mut entries = Vec::with_capacity(n as usize);
    for e in body[..split].chunks(CHECKPOINT_ENTRY) {
        let kind = Kind::from_u8(e[32]).ok_or(FormatError::Field {
            what,
            field: "kind",
        })?;
        let (lba, blocks, block) = (u64_at(e, 0), u32_at(e, 24), u32_at(e, 28));
        // Recovery adds these up, and splitting an extent advances its
        // chunk block: an extent that wraps either is corrupt.
        let wraps = lba.checked_add(u64::from(blocks)).is_none()
            || (kind == Kind::Data && block.checked_add(blocks).is_none());
        if blocks == 0 || wraps {
            return Err(FormatError::Field {
                what,
                field: "extent",
            });
        }
        entries.push(CheckpointEntry {
            lba,
            seq: u64_at(e, 8),
            chunk: u64_at(e, 16),
            blocks,
            block,
            kind,
        });
    }
    let chunks = body[split..]
        .chunks(CHUNK_RECORD)
        .map(|c| ChunkRecord {
            id: u64_at(c, 0),
            data_start: u64_at(c, 8),
            data_blocks: u32_at(c, 16),
        })
        .collect();
    Ok(Checkpoint {
        id,
        max_seq,
        entries,
        chunks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_round_trip() {
        let e = [CheckpointEntry {
            lba: 1,
            seq: 2,
            blocks: 3,
            kind: Kind::Data,
            chunk: 4,
            block: 5,
        }];
        let record = ChunkRecord {
            id: 4,
            data_start: 4096,
            data_blocks: 9,
        };
        let b = encode_checkpoint(9, &e, &[record], 77);
        let c = decode_checkpoint(&b).unwrap();
        assert_eq!((c.id, c.max_seq, c.entries.as_slice()), (9, 77, &e[..]));
        assert_eq!(
            c.chunks,
            [ChunkRecord {
                id: 4,
                data_start: 4096,
                data_blocks: 9
            }]
        );
        let mut bad = b.clone();
        bad[50] ^= 1;
        assert!(decode_checkpoint(&bad).is_err());
        assert!(decode_checkpoint(&b[..b.len() - 1]).is_err());
        // Checksummed but wrapping past the last block: corrupt, not a panic.
        let wrap = [CheckpointEntry {
            lba: u64::MAX - 1,
            ..e[0]
        }];
        let b = encode_checkpoint(9, &wrap, &[], 77);
        assert!(decode_checkpoint(&b).is_err());
        let wrap = [CheckpointEntry {
            block: u32::MAX - 1,
            ..e[0]
        }];
        let b = encode_checkpoint(9, &wrap, &[], 77);
        assert!(decode_checkpoint(&b).is_err(), "chunk blocks wrap");
        // Zeroes and holes keep no chunk block, so theirs is not checked.
        let zero = [CheckpointEntry {
            block: u32::MAX,
            kind: Kind::Zero,
            ..e[0]
        }];
        assert!(decode_checkpoint(&encode_checkpoint(9, &zero, &[], 77)).is_ok());
    }
}
