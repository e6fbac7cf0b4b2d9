//! WAL records and segment files: what the write path appends and replay
//! reads back.

use super::{BLOCK, FormatError, Kind, u32_at, u64_at};

/// First 4 bytes of every WAL record (little-endian "WAL1").
pub const WAL_MAGIC: u32 = u32::from_le_bytes(*b"WAL1");
/// Bytes of a record's header; its data follows.
pub const WAL_RECORD_HEADER: usize = 32;
/// First 8 bytes of every segment file.
pub const SEGMENT_MAGIC: &[u8; 8] = b"VBDWAL01";
/// Bytes of a segment file's header: magic and segment id.
pub const SEGMENT_HEADER: usize = 16;

/// A WAL record's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// Sequence number: the order of writes, across segments.
    pub seq: u64,
    /// First block written, in 4096-byte blocks.
    pub lba: u64,
    /// Length in blocks.
    pub blocks: u32,
    /// Data (which follows the header), zeroes or hole.
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
/// length `data_len` (so callers can checksum data before taking a lock;
/// the combination costs tens of nanoseconds, see `crc`).
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
        super::crc::combine(head, data_crc, data_len)
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
}
