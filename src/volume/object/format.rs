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

use thiserror::Error;

/// Bytes per volume block.
pub const BLOCK: usize = 4096;

pub const WAL_MAGIC: u32 = u32::from_le_bytes(*b"WAL1");
pub const WAL_RECORD_HEADER: usize = 32;
pub const SEGMENT_MAGIC: &[u8; 8] = b"VBDWAL01";
pub const SEGMENT_HEADER: usize = 16;
pub const CHUNK_MAGIC: &[u8; 8] = b"VBDCHNK1";
pub const CHUNK_HEADER: usize = 64;
pub const INDEX_ENTRY: usize = 32;
pub const CHECKPOINT_MAGIC: &[u8; 8] = b"VBDCKPT1";
pub const CHECKPOINT_HEADER: usize = 48;
pub const CHECKPOINT_ENTRY: usize = 40;
pub const CHUNK_RECORD: usize = 24;
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
    #[error("{what}: bad magic")]
    Magic { what: &'static str },
    #[error("{what}: unsupported format version {version}")]
    Version { what: &'static str, version: u32 },
    #[error("{what}: checksum mismatch")]
    Checksum { what: &'static str },
    #[error("{what}: truncated")]
    Truncated { what: &'static str },
    #[error("{what}: inconsistent field {field}")]
    Field {
        what: &'static str,
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

/// A WAL record's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub seq: u64,
    pub lba: u64,
    pub blocks: u32,
    pub kind: Kind,
}

impl RecordHeader {
    /// Bytes of data after the header.
    pub fn data_len(&self) -> usize {
        if self.kind == Kind::Data {
            self.blocks as usize * BLOCK
        } else {
            0
        }
    }
}

/// Appends a record (header, then `data` for data records) to `out`.
pub fn encode_record(out: &mut Vec<u8>, h: &RecordHeader, data: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&WAL_MAGIC.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&h.seq.to_le_bytes());
    out.extend_from_slice(&h.lba.to_le_bytes());
    out.extend_from_slice(&h.blocks.to_le_bytes());
    out.extend_from_slice(&[h.kind as u8, 0, 0, 0]);
    out.extend_from_slice(data);
    let crc = crc32c::crc32c(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// The CRC a record header must carry for `header_tail` (bytes 8..32) and `data`.
pub fn record_crc(header_tail: &[u8], data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(header_tail), data)
}

/// A record header whose CRC covers data with checksum `data_crc` and
/// length `data_len` (so callers can checksum data before taking a lock).
pub fn record_header(h: &RecordHeader, data_crc: u32, data_len: usize) -> [u8; WAL_RECORD_HEADER] {
    let mut b = [0u8; WAL_RECORD_HEADER];
    b[..4].copy_from_slice(&WAL_MAGIC.to_le_bytes());
    b[8..16].copy_from_slice(&h.seq.to_le_bytes());
    b[16..24].copy_from_slice(&h.lba.to_le_bytes());
    b[24..28].copy_from_slice(&h.blocks.to_le_bytes());
    b[28] = h.kind as u8;
    let head = crc32c::crc32c(&b[8..]);
    let crc = if data_len == 0 {
        head
    } else {
        crc32c::crc32c_combine(head, data_crc, data_len)
    };
    b[4..8].copy_from_slice(&crc.to_le_bytes());
    b
}

/// A record header for `data`.
pub fn record_header_bytes(h: &RecordHeader, data: &[u8]) -> [u8; WAL_RECORD_HEADER] {
    record_header(h, crc32c::crc32c(data), data.len())
}

/// Decodes and checks the 32-byte header at the start of `b`, without its
/// CRC (which also covers the data that follows).
pub fn decode_record_header(b: &[u8]) -> Result<RecordHeader, FormatError> {
    let what = "WAL record";
    if b.len() < WAL_RECORD_HEADER {
        return Err(FormatError::Truncated { what });
    }
    if u32_at(b, 0) != WAL_MAGIC {
        return Err(FormatError::Magic { what });
    }
    let kind = Kind::from_u8(b[28]).ok_or(FormatError::Field {
        what,
        field: "kind",
    })?;
    let h = RecordHeader {
        seq: u64_at(b, 8),
        lba: u64_at(b, 16),
        blocks: u32_at(b, 24),
        kind,
    };
    // No writer produces an empty or wrapping extent; replay and the
    // uploader compute `lba + blocks` on what is accepted here.
    if h.blocks == 0 || h.lba.checked_add(u64::from(h.blocks)).is_none() {
        return Err(FormatError::Field {
            what,
            field: "extent",
        });
    }
    // Nor the last sequence number: replay continues after it.
    if h.seq == u64::MAX {
        return Err(FormatError::Field { what, field: "seq" });
    }
    Ok(h)
}

/// Decodes the record at the start of `b`: its header and total length.
/// An error means a torn or corrupt record (replay stops there).
pub fn decode_record(b: &[u8]) -> Result<(RecordHeader, usize), FormatError> {
    let what = "WAL record";
    let h = decode_record_header(b)?;
    let total = WAL_RECORD_HEADER.saturating_add(h.data_len());
    if b.len() < total {
        return Err(FormatError::Truncated { what });
    }
    let crc = record_crc(&b[8..WAL_RECORD_HEADER], &b[WAL_RECORD_HEADER..total]);
    if crc != u32_at(b, 4) {
        return Err(FormatError::Checksum { what });
    }
    Ok((h, total))
}

/// A segment file's header.
pub fn segment_header(id: u64) -> [u8; SEGMENT_HEADER] {
    let mut b = [0u8; SEGMENT_HEADER];
    b[..8].copy_from_slice(SEGMENT_MAGIC);
    b[8..].copy_from_slice(&id.to_le_bytes());
    b
}

/// The segment id in a segment file's header.
pub fn decode_segment_header(b: &[u8]) -> Result<u64, FormatError> {
    let what = "WAL segment";
    if b.len() < SEGMENT_HEADER {
        return Err(FormatError::Truncated { what });
    }
    if &b[..8] != SEGMENT_MAGIC {
        return Err(FormatError::Magic { what });
    }
    Ok(u64_at(b, 8))
}

/// The valid part of a WAL segment file, as replay reads it.
#[derive(Debug, PartialEq, Eq)]
pub struct SegmentRecords {
    /// Valid records: header and offset of their data in the file.
    pub records: Vec<(RecordHeader, usize)>,
    /// Length of the valid prefix: the header and every valid record.
    pub valid: usize,
    /// Why reading stopped before the end of the file, if it did.
    pub torn: Option<FormatError>,
}

/// Decodes segment file `id`: its header, then records up to the first
/// torn, corrupt or stale one (a sequence number not above `after_seq` or
/// its predecessor's). Everything after that point was never acknowledged
/// as durable, so it is reported in `torn`, not as an error; only a damaged
/// header is an error.
pub fn decode_segment(b: &[u8], id: u64, after_seq: u64) -> Result<SegmentRecords, FormatError> {
    if decode_segment_header(b)? != id {
        return Err(FormatError::Field {
            what: "WAL segment",
            field: "id",
        });
    }
    let mut last = after_seq;
    let mut pos = SEGMENT_HEADER;
    let mut records = Vec::new();
    let mut torn = None;
    while pos < b.len() {
        match decode_record(&b[pos..]) {
            Ok((h, len)) if h.seq > last => {
                records.push((h, pos + WAL_RECORD_HEADER));
                last = h.seq;
                pos += len;
            }
            Ok(_) => {
                torn = Some(FormatError::Field {
                    what: "WAL record",
                    field: "seq",
                });
                break;
            }
            Err(e) => {
                torn = Some(e);
                break;
            }
        }
    }
    Ok(SegmentRecords {
        records,
        valid: pos,
        torn,
    })
}

/// One entry of a chunk index: a run of blocks and where its data is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub lba: u64,
    pub seq: u64,
    pub blocks: u32,
    /// First data block in the chunk (data entries only).
    pub data_block: u32,
    pub kind: Kind,
}

/// A decoded chunk header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    pub id: u64,
    pub min_seq: u64,
    pub max_seq: u64,
    pub entries: u32,
    pub data_blocks: u32,
    pub index_crc: u32,
}

impl ChunkHeader {
    /// Bytes of index (entries and block CRCs) after the header.
    pub fn index_len(&self) -> usize {
        self.entries as usize * INDEX_ENTRY + self.data_blocks as usize * 4
    }

    /// Checks that the index fits in an object of `len` bytes, so nobody
    /// fetches or buffers `index_len()` bytes on a damaged header's word.
    pub fn check_index_fits(&self, len: u64) -> Result<(), FormatError> {
        if (CHUNK_HEADER + self.index_len()) as u64 > len {
            return Err(FormatError::Truncated {
                what: "chunk index",
            });
        }
        Ok(())
    }

    /// Where data block `n` starts in the object.
    pub fn data_offset(&self, n: u32) -> u64 {
        (CHUNK_HEADER + self.index_len()) as u64 + u64::from(n) * BLOCK as u64
    }
}

/// Builds a chunk object from index entries and their data blocks.
pub fn encode_chunk(id: u64, entries: &[IndexEntry], data: &[u8]) -> Vec<u8> {
    let data_blocks = (data.len() / BLOCK) as u32;
    let mut index = Vec::with_capacity(entries.len() * INDEX_ENTRY + data_blocks as usize * 4);
    for e in entries {
        index.extend_from_slice(&e.lba.to_le_bytes());
        index.extend_from_slice(&e.seq.to_le_bytes());
        index.extend_from_slice(&e.blocks.to_le_bytes());
        index.extend_from_slice(&e.data_block.to_le_bytes());
        index.extend_from_slice(&[e.kind as u8, 0, 0, 0, 0, 0, 0, 0]);
    }
    for block in data.chunks(BLOCK) {
        index.extend_from_slice(&crc32c::crc32c(block).to_le_bytes());
    }
    let min_seq = entries.iter().map(|e| e.seq).min().unwrap_or(0);
    let max_seq = entries.iter().map(|e| e.seq).max().unwrap_or(0);
    let mut out = Vec::with_capacity(CHUNK_HEADER + index.len() + data.len());
    out.extend_from_slice(CHUNK_MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&min_seq.to_le_bytes());
    out.extend_from_slice(&max_seq.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    out.extend_from_slice(&data_blocks.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&index).to_le_bytes());
    out.extend_from_slice(&(BLOCK as u32).to_le_bytes());
    out.resize(CHUNK_HEADER, 0);
    seal_chunk_header(&mut out);
    out.extend_from_slice(&index);
    out.extend_from_slice(data);
    out
}

/// Where a chunk header keeps the CRC of the index.
pub(super) const INDEX_CRC_AT: usize = 48;

/// Sets a chunk header's own CRC (of its bytes 16..64); `b` must hold at
/// least the header.
pub(super) fn seal_chunk_header(b: &mut [u8]) {
    let crc = crc32c::crc32c(&b[16..CHUNK_HEADER]);
    b[12..16].copy_from_slice(&crc.to_le_bytes());
}

/// Decodes and checks a chunk header.
pub fn decode_chunk_header(b: &[u8]) -> Result<ChunkHeader, FormatError> {
    let what = "chunk header";
    if b.len() < CHUNK_HEADER {
        return Err(FormatError::Truncated { what });
    }
    if &b[..8] != CHUNK_MAGIC {
        return Err(FormatError::Magic { what });
    }
    let version = u32_at(b, 8);
    if version != VERSION {
        return Err(FormatError::Version { what, version });
    }
    if crc32c::crc32c(&b[16..CHUNK_HEADER]) != u32_at(b, 12) {
        return Err(FormatError::Checksum { what });
    }
    if u32_at(b, 52) as usize != BLOCK {
        return Err(FormatError::Field {
            what,
            field: "block size",
        });
    }
    Ok(ChunkHeader {
        id: u64_at(b, 16),
        min_seq: u64_at(b, 24),
        max_seq: u64_at(b, 32),
        entries: u32_at(b, 40),
        data_blocks: u32_at(b, 44),
        index_crc: u32_at(b, INDEX_CRC_AT),
    })
}

/// Decodes and checks a chunk index (the bytes right after the header);
/// returns the entries and the per-block CRCs.
pub fn decode_chunk_index(
    h: &ChunkHeader,
    b: &[u8],
) -> Result<(Vec<IndexEntry>, Vec<u32>), FormatError> {
    let what = "chunk index";
    if b.len() < h.index_len() {
        return Err(FormatError::Truncated { what });
    }
    let b = &b[..h.index_len()];
    if crc32c::crc32c(b) != h.index_crc {
        return Err(FormatError::Checksum { what });
    }
    let mut entries = Vec::with_capacity(h.entries as usize);
    for e in b[..h.entries as usize * INDEX_ENTRY].chunks(INDEX_ENTRY) {
        let kind = Kind::from_u8(e[24]).ok_or(FormatError::Field {
            what,
            field: "kind",
        })?;
        let entry = IndexEntry {
            lba: u64_at(e, 0),
            seq: u64_at(e, 8),
            blocks: u32_at(e, 16),
            data_block: u32_at(e, 20),
            kind,
        };
        let in_bounds = entry.blocks > 0
            && entry.lba.checked_add(u64::from(entry.blocks)).is_some()
            && (kind != Kind::Data
                || entry
                    .data_block
                    .checked_add(entry.blocks)
                    .is_some_and(|end| end <= h.data_blocks));
        if !in_bounds {
            return Err(FormatError::Field {
                what,
                field: "extent",
            });
        }
        entries.push(entry);
    }
    let crcs = b[h.entries as usize * INDEX_ENTRY..]
        .chunks(4)
        .map(|c| u32_at(c, 0))
        .collect();
    Ok((entries, crcs))
}

/// One extent of a checkpointed map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointEntry {
    pub lba: u64,
    pub seq: u64,
    pub blocks: u32,
    pub kind: Kind,
    pub chunk: u64,
    pub block: u32,
}

/// Where a chunk's data starts and how much it has, as a checkpoint records
/// it (so that opening a volume need not read old chunks' headers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRecord {
    pub id: u64,
    pub data_start: u64,
    pub data_blocks: u32,
}

/// A decoded checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// Every chunk up to this id is reflected.
    pub id: u64,
    pub max_seq: u64,
    pub entries: Vec<CheckpointEntry>,
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
        let (lba, blocks) = (u64_at(e, 0), u32_at(e, 24));
        // Recovery adds these up; an extent that wraps is corrupt.
        if blocks == 0 || lba.checked_add(u64::from(blocks)).is_none() {
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
            block: u32_at(e, 28),
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
    fn records_round_trip_and_reject_damage() {
        let h = RecordHeader {
            seq: 7,
            lba: 99,
            blocks: 2,
            kind: Kind::Data,
        };
        let data = vec![0x5au8; 2 * BLOCK];
        let mut out = Vec::new();
        encode_record(&mut out, &h, &data);
        assert_eq!(out.len(), WAL_RECORD_HEADER + 2 * BLOCK);
        assert_eq!(decode_record(&out), Ok((h, out.len())));
        assert_eq!(
            &record_header_bytes(&h, &data)[..],
            &out[..WAL_RECORD_HEADER]
        );
        // Torn: any prefix is rejected.
        assert_eq!(
            decode_record(&out[..out.len() - 1]),
            Err(FormatError::Truncated { what: "WAL record" })
        );
        // Corrupt: any flipped byte is rejected.
        for at in [0, 5, 9, 20, 28, 40, out.len() - 1] {
            let mut bad = out.clone();
            bad[at] ^= 1;
            assert!(decode_record(&bad).is_err(), "byte {at}");
        }
        let z = RecordHeader {
            seq: 8,
            lba: 0,
            blocks: 1 << 20,
            kind: Kind::Hole,
        };
        let mut out = Vec::new();
        encode_record(&mut out, &z, &[]);
        assert_eq!(decode_record(&out), Ok((z, WAL_RECORD_HEADER)));
        // Extents that are empty or wrap, and the last sequence number, are
        // refused even with a good CRC.
        for (lba, blocks, seq) in [(0, 0, 1), (u64::MAX, 1, 1), (0, 1, u64::MAX)] {
            let mut out = Vec::new();
            let h = RecordHeader {
                seq,
                lba,
                blocks,
                kind: Kind::Zero,
            };
            encode_record(&mut out, &h, &[]);
            assert!(
                matches!(decode_record(&out), Err(FormatError::Field { .. })),
                "{h:?}"
            );
        }
    }

    #[test]
    fn segments_stop_at_the_first_bad_record() {
        let mut seg = segment_header(5).to_vec();
        for (seq, kind) in [(3, Kind::Data), (4, Kind::Hole), (9, Kind::Zero)] {
            let h = RecordHeader {
                seq,
                lba: seq * 10,
                blocks: 1,
                kind,
            };
            let data = if kind == Kind::Data {
                vec![7u8; BLOCK]
            } else {
                Vec::new()
            };
            encode_record(&mut seg, &h, &data);
        }
        let whole = decode_segment(&seg, 5, 2).unwrap();
        assert_eq!(whole.valid, seg.len());
        assert_eq!(whole.torn, None);
        let seqs: Vec<u64> = whole.records.iter().map(|(h, _)| h.seq).collect();
        assert_eq!(seqs, [3, 4, 9]);
        assert_eq!(whole.records[0].1, SEGMENT_HEADER + WAL_RECORD_HEADER);
        // Records the store already has make the rest stale.
        let stale = decode_segment(&seg, 5, 3).unwrap();
        assert_eq!((stale.records.len(), stale.valid), (0, SEGMENT_HEADER));
        assert!(stale.torn.is_some());
        // A torn tail keeps the records before it.
        let torn = decode_segment(&seg[..seg.len() - 1], 5, 0).unwrap();
        assert_eq!(torn.records.len(), 2);
        assert_eq!(
            torn.torn,
            Some(FormatError::Truncated { what: "WAL record" })
        );
        // Another segment's file, or a damaged header, is an error.
        assert!(decode_segment(&seg, 6, 0).is_err());
        assert!(decode_segment(&seg[..10], 5, 0).is_err());
    }

    #[test]
    fn chunks_round_trip_and_reject_damage() {
        let entries = [
            IndexEntry {
                lba: 10,
                seq: 3,
                blocks: 2,
                data_block: 0,
                kind: Kind::Data,
            },
            IndexEntry {
                lba: 500,
                seq: 4,
                blocks: 100,
                data_block: 0,
                kind: Kind::Hole,
            },
        ];
        let data: Vec<u8> = (0..2 * BLOCK).map(|i| i as u8).collect();
        let c = encode_chunk(42, &entries, &data);
        let h = decode_chunk_header(&c).unwrap();
        assert_eq!(
            (h.id, h.min_seq, h.max_seq, h.entries, h.data_blocks),
            (42, 3, 4, 2, 2)
        );
        let (e, crcs) = decode_chunk_index(&h, &c[CHUNK_HEADER..]).unwrap();
        assert_eq!(e, entries);
        assert_eq!(crcs.len(), 2);
        let off = h.data_offset(1) as usize;
        assert_eq!(&c[off..off + BLOCK], &data[BLOCK..]);
        assert_eq!(crcs[1], crc32c::crc32c(&data[BLOCK..]));
        let mut bad = c.clone();
        bad[20] ^= 1;
        assert_eq!(
            decode_chunk_header(&bad),
            Err(FormatError::Checksum {
                what: "chunk header"
            })
        );
        let mut bad = c.clone();
        bad[CHUNK_HEADER + 3] ^= 1;
        assert!(decode_chunk_index(&h, &bad[CHUNK_HEADER..]).is_err());
    }

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
    }
}
