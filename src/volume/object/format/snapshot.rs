//! Snapshot objects: a small JSON description of the snapshot followed by
//! its frozen map in the checkpoint encoding (chunk ids layer-tagged, the
//! chunk table naming every chunk the map points into, whatever volume it
//! lives in). One object, so a snapshot appears and vanishes atomically.

use super::checkpoint::{Checkpoint, decode_checkpoint};
use super::{FormatError, VERSION, u32_at};

/// First 8 bytes of every snapshot object.
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"VBDSNAP1";
/// Bytes before the description: magic, version, description length.
pub const SNAPSHOT_HEADER: usize = 16;

/// Encodes a snapshot from its description and its map as an encoded checkpoint.
pub fn encode_snapshot(meta: &[u8], map: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SNAPSHOT_HEADER + meta.len() + map.len());
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(meta);
    out.extend_from_slice(map);
    out
}

/// The length of the description, from the first [`SNAPSHOT_HEADER`] bytes.
pub fn snapshot_meta_len(b: &[u8]) -> Result<usize, FormatError> {
    let what = "snapshot";
    if b.len() < SNAPSHOT_HEADER {
        return Err(FormatError::Truncated { what });
    }
    if &b[..8] != SNAPSHOT_MAGIC {
        return Err(FormatError::Magic { what });
    }
    let version = u32_at(b, 8);
    if version != VERSION {
        return Err(FormatError::Version { what, version });
    }
    Ok(u32_at(b, 12) as usize)
}

/// Splits a whole snapshot object into its description and its checked map.
pub fn decode_snapshot(b: &[u8]) -> Result<(&[u8], Checkpoint), FormatError> {
    let n = snapshot_meta_len(b)?;
    let end = SNAPSHOT_HEADER
        .checked_add(n)
        .filter(|&e| e <= b.len())
        .ok_or(FormatError::Truncated { what: "snapshot" })?;
    Ok((&b[SNAPSHOT_HEADER..end], decode_checkpoint(&b[end..])?))
}

#[cfg(test)]
mod tests {
    use super::super::checkpoint::encode_checkpoint;
    use super::*;

    #[test]
    fn snapshots_round_trip_and_reject_damage() {
        let map = encode_checkpoint(3, &[], &[], 9);
        let b = encode_snapshot(b"{}", &map);
        let (meta, c) = decode_snapshot(&b).unwrap();
        assert_eq!((meta, c.id, c.max_seq), (&b"{}"[..], 3, 9));
        assert!(decode_snapshot(&b[..b.len() - 1]).is_err());
        let mut bad = b.clone();
        bad[12] = 200;
        assert!(decode_snapshot(&bad).is_err(), "description past the end");
        assert!(decode_snapshot(b"VBDCHNK1........").is_err());
    }
}
