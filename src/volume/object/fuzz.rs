//! Fuzz target bodies for the object volume's on-disk formats, kept in the
//! library (as `crate::nbd::fuzz` is) so that `cargo test` replays their
//! corpora on stable. Byte 0 of an input holds options, the rest is a WAL
//! segment file or a chunk object. CRCs stop random bytes at the door, so
//! an option repairs them first and the fuzzer reaches the checks behind;
//! any panic is a bug.

use super::format::{
    self, BLOCK, CHECKPOINT_ENTRY, CHECKPOINT_HEADER, CHUNK_HEADER, CHUNK_RECORD, ChunkHeader,
    FormatError, INDEX_CRC_AT, INDEX_ENTRY, IndexEntry, Kind, RecordHeader, SEGMENT_HEADER,
    WAL_RECORD_HEADER,
};

/// The segment id the WAL target's files carry.
const SEGMENT_ID: u64 = 1;

/// Sets the CRC of every record that decodes up to its checksum, in order,
/// stopping where the framing breaks.
fn repair_records(seg: &mut [u8]) {
    let mut pos = SEGMENT_HEADER;
    while let Some(rest) = seg.get_mut(pos..) {
        let Ok(h) = format::decode_record_header(rest) else {
            return;
        };
        let len = WAL_RECORD_HEADER + h.data_len();
        if rest.len() < len {
            return;
        }
        let crc = format::record_crc(&rest[8..WAL_RECORD_HEADER], &rest[WAL_RECORD_HEADER..len]);
        rest[4..8].copy_from_slice(&crc.to_le_bytes());
        pos += len;
    }
}

/// Whether `a` and `b` agree outside the byte ranges in `skip`.
fn same_except(a: &[u8], b: &[u8], skip: &[std::ops::Range<usize>]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .enumerate()
            .all(|(i, (x, y))| x == y || skip.iter().any(|r| r.contains(&i)))
}

/// Checks one accepted record at the start of `rec` (`len` bytes long):
/// it re-encodes to the same bytes (its pad aside, which the CRC covers but
/// the header does not keep), and one flipped bit is always caught.
fn check_record(rec: &[u8], h: &RecordHeader, len: usize, flip: usize) {
    assert_eq!(len, WAL_RECORD_HEADER + h.data_len());
    let data = &rec[WAL_RECORD_HEADER..len];
    let mut again = Vec::with_capacity(len);
    format::encode_record(&mut again, h, data);
    assert_eq!(
        format::decode_record(&again),
        Ok((*h, len)),
        "re-encoded record"
    );
    assert_eq!(
        format::record_header_bytes(h, data),
        again[..WAL_RECORD_HEADER],
        "the write path's header builder disagrees with encode_record"
    );
    let pad = 29..32;
    if rec[pad.clone()].iter().all(|&b| b == 0) {
        assert_eq!(
            again,
            rec[..len],
            "canonical record re-encodes byte for byte"
        );
    } else {
        assert!(same_except(&again, &rec[..len], &[4..8, pad]));
    }
    // Any single-bit error is caught, except in the fields that say how
    // long the record is: those change what the CRC covers.
    let at = flip % len;
    if !(24..29).contains(&at) {
        let mut bad = rec[..len].to_vec();
        bad[at] ^= 1 << (flip % 8);
        assert!(
            format::decode_record(&bad).is_err(),
            "flipped bit {at} accepted"
        );
    }
}

/// WAL segment files: byte 0 bit 0 repairs record CRCs, bit 1 puts a
/// valid segment header in front, bits 4-7 are the sequence number the
/// store already has. The last byte picks a bit to flip in the first record.
pub fn wal_record(data: &[u8]) {
    let Some((&opts, rest)) = data.split_first() else {
        return;
    };
    let mut seg = Vec::with_capacity(SEGMENT_HEADER + rest.len());
    if opts & 2 != 0 {
        seg.extend_from_slice(&format::segment_header(SEGMENT_ID));
    }
    seg.extend_from_slice(rest);
    if opts & 1 != 0 {
        repair_records(&mut seg);
    }
    let after = u64::from(opts >> 4);
    let decoded = match format::decode_segment(&seg, SEGMENT_ID, after) {
        Ok(d) => d,
        Err(_) => {
            assert_ne!(format::decode_segment_header(&seg), Ok(SEGMENT_ID));
            return;
        }
    };
    assert!(decoded.valid >= SEGMENT_HEADER && decoded.valid <= seg.len());
    assert_eq!(decoded.torn.is_none(), decoded.valid == seg.len());
    let flip = usize::from(*data.last().unwrap_or(&0));
    let mut pos = SEGMENT_HEADER;
    let mut last = after;
    for (h, data_at) in &decoded.records {
        assert_eq!(*data_at, pos + WAL_RECORD_HEADER);
        assert!(h.seq > last, "sequence numbers rise");
        last = h.seq;
        let Ok((again, len)) = format::decode_record(&seg[pos..]) else {
            panic!("accepted record at {pos} does not decode alone");
        };
        assert_eq!(again, *h);
        assert!(h.blocks > 0 && h.lba.checked_add(u64::from(h.blocks)).is_some());
        check_record(&seg[pos..], h, len, flip);
        pos += len;
    }
    assert_eq!(pos, decoded.valid, "records tile the valid prefix");
    // Where reading stopped, the record there is bad on its own (or stale).
    match (&decoded.torn, format::decode_record(&seg[pos..])) {
        (None, _) => {}
        (Some(FormatError::Field { field: "seq", .. }), Ok((h, _))) => assert!(h.seq <= last),
        (Some(why), Err(e)) => assert_eq!(*why, e),
        (Some(why), Ok(_)) => panic!("stopped at a good record: {why}"),
    }
}

/// Sets the index CRC (when the index fits) and the header CRC.
fn repair_chunk(b: &mut [u8]) {
    if b.len() < CHUNK_HEADER {
        return;
    }
    format::seal_chunk_header(b);
    let Ok(h) = format::decode_chunk_header(b) else {
        return;
    };
    let Some(index) = b.get(CHUNK_HEADER..CHUNK_HEADER + h.index_len()) else {
        return;
    };
    let crc = crc32c::crc32c(index);
    b[INDEX_CRC_AT..INDEX_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    format::seal_chunk_header(b);
}

/// Checks what an accepted index promises the map and the readers.
fn check_index(h: &ChunkHeader, b: &[u8], entries: &[IndexEntry], crcs: &[u32]) {
    assert_eq!(entries.len(), h.entries as usize);
    assert_eq!(crcs.len(), h.data_blocks as usize);
    assert!(
        CHUNK_HEADER + h.index_len() <= b.len(),
        "index within the input"
    );
    let data_end = h.data_offset(h.data_blocks);
    for e in entries {
        assert!(e.blocks > 0, "empty extent");
        assert!(
            e.lba.checked_add(u64::from(e.blocks)).is_some(),
            "wrapping extent"
        );
        if e.kind == Kind::Data {
            let end = e.data_block.checked_add(e.blocks);
            assert!(
                end.is_some_and(|end| end <= h.data_blocks),
                "data outside the chunk"
            );
            assert!(h.data_offset(e.data_block + e.blocks) <= data_end);
        }
    }
}

/// Re-encodes an accepted chunk whose data is all there: the encoder's
/// output decodes to the same index, and matches the input except where
/// the encoder derives a field (sequence range, CRCs) or writes zeroes.
fn check_round_trip(h: &ChunkHeader, b: &[u8], entries: &[IndexEntry]) {
    let start = CHUNK_HEADER + h.index_len();
    let Ok(end) = usize::try_from(h.data_offset(h.data_blocks)) else {
        return;
    };
    let Some(data) = b.get(start..end) else {
        return;
    };
    let again = format::encode_chunk(h.id, entries, data);
    let Ok(h2) = format::decode_chunk_header(&again) else {
        panic!("re-encoded chunk header rejected");
    };
    assert_eq!(
        (h2.id, h2.entries, h2.data_blocks),
        (h.id, h.entries, h.data_blocks)
    );
    let Ok((e2, crcs2)) = format::decode_chunk_index(&h2, &again[CHUNK_HEADER..]) else {
        panic!("re-encoded chunk index rejected");
    };
    assert_eq!(e2, entries);
    for (c, block) in crcs2.iter().zip(data.chunks(BLOCK)) {
        assert_eq!(*c, crc32c::crc32c(block));
    }
    let mut derived = vec![12..16, 24..40, INDEX_CRC_AT..INDEX_CRC_AT + 4, 56..64];
    for i in 0..entries.len() {
        let at = CHUNK_HEADER + i * INDEX_ENTRY;
        derived.push(at + 25..at + INDEX_ENTRY);
    }
    derived.push(CHUNK_HEADER + entries.len() * INDEX_ENTRY..start);
    assert!(
        same_except(&again, &b[..end], &derived),
        "re-encoded chunk differs"
    );
}

/// Chunk objects: byte 0 bit 0 repairs the CRCs; the last byte picks a bit
/// to flip in an accepted header or index, which must then be refused.
pub fn chunk_index(data: &[u8]) {
    let Some((&opts, rest)) = data.split_first() else {
        return;
    };
    let mut b = rest.to_vec();
    if opts & 1 != 0 {
        repair_chunk(&mut b);
    }
    let Ok(h) = format::decode_chunk_header(&b) else {
        return;
    };
    let fits = h.check_index_fits(b.len() as u64);
    let decoded = format::decode_chunk_index(&h, &b[CHUNK_HEADER..]);
    assert_eq!(
        fits.is_err(),
        matches!(decoded, Err(FormatError::Truncated { .. })),
        "check_index_fits and the decoder disagree"
    );
    let Ok((entries, crcs)) = decoded else {
        return;
    };
    check_index(&h, &b, &entries, &crcs);
    check_round_trip(&h, &b, &entries);
    let flip = usize::from(*data.last().unwrap_or(&0));
    let at = (flip * 31) % (CHUNK_HEADER + h.index_len());
    b[at] ^= 1 << (flip % 8);
    let still = format::decode_chunk_header(&b)
        .and_then(|h| format::decode_chunk_index(&h, &b[CHUNK_HEADER..]));
    assert!(still.is_err(), "flipped bit {at} accepted");
}

/// Sets a checkpoint's CRC to match its bytes (what byte 0 bit 0 asks for).
pub fn repair_checkpoint(b: &mut [u8]) {
    if b.len() >= CHECKPOINT_HEADER {
        let crc = crc32c::crc32c(&b[16..]);
        b[12..16].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Checkpoints: byte 0 bit 0 repairs the CRC, the last byte picks a bit
/// to flip, the bytes between are the checkpoint. An accepted checkpoint must
/// hold only extents recovery can add up, re-encode to the same bytes
/// (padding and CRC aside) and decode again to itself; then the flipped
/// bit, wherever it lands, must be refused.
pub fn checkpoint(data: &[u8]) {
    let Some((&opts, rest)) = data.split_first() else {
        return;
    };
    let Some((&flip, body)) = rest.split_last() else {
        return;
    };
    let mut b = body.to_vec();
    if opts & 1 != 0 {
        repair_checkpoint(&mut b);
    }
    let Ok(c) = format::decode_checkpoint(&b) else {
        return;
    };
    for e in &c.entries {
        assert!(e.blocks > 0, "empty extent accepted");
        assert!(
            e.lba.checked_add(u64::from(e.blocks)).is_some(),
            "wrapping extent accepted"
        );
        assert!(
            e.kind != Kind::Data || e.block.checked_add(e.blocks).is_some(),
            "extent wrapping its chunk's blocks accepted"
        );
    }
    let again = format::encode_checkpoint(c.id, &c.entries, &c.chunks, c.max_seq);
    // The CRC field, then each entry's and each chunk record's padding.
    let mut padding = Vec::new();
    padding.push(12..16);
    for i in 0..c.entries.len() {
        let at = CHECKPOINT_HEADER + i * CHECKPOINT_ENTRY;
        padding.push(at + 33..at + CHECKPOINT_ENTRY);
    }
    let records = CHECKPOINT_HEADER + c.entries.len() * CHECKPOINT_ENTRY;
    for i in 0..c.chunks.len() {
        let at = records + i * CHUNK_RECORD;
        padding.push(at + 20..at + CHUNK_RECORD);
    }
    assert!(
        same_except(&again, &b, &padding),
        "re-encoded checkpoint differs"
    );
    assert_eq!(
        format::decode_checkpoint(&again).ok().as_ref(),
        Some(&c),
        "re-encoded checkpoint decodes differently"
    );
    let flip = usize::from(flip);
    let at = (flip * 31) % b.len();
    b[at] ^= 1 << (flip % 8);
    assert!(
        format::decode_checkpoint(&b).is_err(),
        "flipped bit {at} accepted"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_trivial_inputs() {
        for d in [&[][..], &[0], &[1, 2], &[3; 100], &[0xff; 200]] {
            wal_record(d);
            chunk_index(d);
            checkpoint(d);
        }
    }
}
