//! Chunk objects: an index (the chunk's map delta) and the data blocks it
//! points into.

use super::{BLOCK, FormatError, Kind, VERSION, u32_at, u64_at};

/// First 8 bytes of every chunk object.
pub const CHUNK_MAGIC: &[u8; 8] = b"VBDCHNK1";
/// Bytes before the index.
pub const CHUNK_HEADER: usize = 64;
/// Bytes per index entry.
pub const INDEX_ENTRY: usize = 32;

/// One entry of a chunk index: a run of blocks and where its data is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    /// First block of the run, in 4096-byte blocks.
    pub lba: u64,
    /// Sequence number of the write that produced it.
    pub seq: u64,
    /// Length of the run in blocks.
    pub blocks: u32,
    /// First data block in the chunk (data entries only).
    pub data_block: u32,
    /// Data, zeroes or hole.
    pub kind: Kind,
}

/// A decoded chunk header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    /// The chunk's id, also in its key.
    pub id: u64,
    /// Lowest sequence number among the entries.
    pub min_seq: u64,
    /// Highest sequence number among the entries.
    pub max_seq: u64,
    /// Number of index entries.
    pub entries: u32,
    /// Data blocks after the index.
    pub data_blocks: u32,
    /// CRC32C of the index and its per-block checksums.
    pub index_crc: u32,
}

/// Where the data of a chunk with `entries` index entries and
/// `data_blocks` data blocks starts: after the header, the entries and one
/// CRC per data block.
pub fn chunk_data_start(entries: usize, data_blocks: u32) -> usize {
    CHUNK_HEADER + entries * INDEX_ENTRY + data_blocks as usize * 4
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
        chunk_data_start(self.entries as usize, self.data_blocks) as u64
            + u64::from(n) * BLOCK as u64
    }
}

/// Builds a chunk object from index entries and their data blocks.
pub fn encode_chunk(id: u64, entries: &[IndexEntry], data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_chunk_with(&mut out, id, entries, (data.len() / BLOCK) as u32, |d| {
        d.copy_from_slice(&data[..d.len()])
    });
    out
}

/// Lays a chunk object out in `out`, overwriting what it held: header,
/// index and block CRCs, then `data_blocks` blocks of data, which `fill`
/// writes into the space it is handed (all of it: the space may hold an
/// older chunk's bytes). Writing the data in place saves the uploader a
/// copy of every block, and a reused `out` saves faulting in fresh memory
/// for every chunk.
pub fn encode_chunk_with(
    out: &mut Vec<u8>,
    id: u64,
    entries: &[IndexEntry],
    data_blocks: u32,
    fill: impl FnOnce(&mut [u8]),
) {
    let crcs_at = CHUNK_HEADER + entries.len() * INDEX_ENTRY;
    let data_at = chunk_data_start(entries.len(), data_blocks);
    let total = data_at + data_blocks as usize * BLOCK;
    out.truncate(total);
    out.resize(total, 0);
    let (head, data) = out.split_at_mut(data_at);
    fill(data);
    for (e, b) in entries
        .iter()
        .zip(head[CHUNK_HEADER..crcs_at].chunks_exact_mut(INDEX_ENTRY))
    {
        b[..8].copy_from_slice(&e.lba.to_le_bytes());
        b[8..16].copy_from_slice(&e.seq.to_le_bytes());
        b[16..20].copy_from_slice(&e.blocks.to_le_bytes());
        b[20..24].copy_from_slice(&e.data_block.to_le_bytes());
        b[24..].copy_from_slice(&[e.kind as u8, 0, 0, 0, 0, 0, 0, 0]);
    }
    for (block, c) in data.chunks(BLOCK).zip(head[crcs_at..].chunks_exact_mut(4)) {
        c.copy_from_slice(&crc32c::crc32c(block).to_le_bytes());
    }
    let index_crc = crc32c::crc32c(&head[CHUNK_HEADER..]);
    let min_seq = entries.iter().map(|e| e.seq).min().unwrap_or(0);
    let max_seq = entries.iter().map(|e| e.seq).max().unwrap_or(0);
    let h = &mut head[..CHUNK_HEADER];
    h.fill(0);
    h[..8].copy_from_slice(CHUNK_MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&id.to_le_bytes());
    h[24..32].copy_from_slice(&min_seq.to_le_bytes());
    h[32..40].copy_from_slice(&max_seq.to_le_bytes());
    h[40..44].copy_from_slice(&(entries.len() as u32).to_le_bytes());
    h[44..48].copy_from_slice(&data_blocks.to_le_bytes());
    h[INDEX_CRC_AT..INDEX_CRC_AT + 4].copy_from_slice(&index_crc.to_le_bytes());
    h[52..56].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    seal_chunk_header(h);
}

/// Sets the id of a chunk object built with another (the uploader packs a
/// chunk before it takes the lock its id is allocated under).
pub fn set_chunk_id(b: &mut [u8], id: u64) {
    b[16..24].copy_from_slice(&id.to_le_bytes());
    seal_chunk_header(b);
}

/// Where a chunk header keeps the CRC of the index.
pub(in crate::volume::object) const INDEX_CRC_AT: usize = 48;

/// Sets a chunk header's own CRC (of its bytes 16..64); `b` must hold at
/// least the header.
pub(in crate::volume::object) fn seal_chunk_header(b: &mut [u8]) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
