//! Chunks made without the write-ahead log: garbage collection's rewrites,
//! flatten's copies of a parent's blocks (both keep the blocks' sequence
//! numbers) and an import's data. The chunk is put whole, then, once this
//! writer is known not to be fenced, its index is merged into the map like
//! any uploaded chunk's.

use bytes::Bytes;

use super::format::{self, BLOCK, IndexEntry};
use super::state::ChunkInfo;
use super::{Inner, ObjectError, fence};
use crate::lock::RwLockExt;

/// Puts a chunk of `entries` over `data` and merges it into the map once
/// this writer is known not to be fenced; returns its id. Under the
/// put-order lock, like every object of this writer (see `generation`).
pub(super) async fn put_chunk(
    inner: &Inner,
    entries: &[IndexEntry],
    data: &[u8],
) -> Result<u64, ObjectError> {
    // From the id until the chunk is in the map, as the uploader does: a
    // checkpoint written meanwhile (the uploader's, beside a flatten; or
    // flatten's, beside garbage collection) would be named after a newer
    // chunk without this one, and recovery, which reads only the chunks
    // above a checkpoint, would never see it.
    let _publishing = inner.publishing.lock().await;
    let order = inner.fence.put_order().await;
    let id = inner.fence.next_id(&order)?;
    put(inner, id, entries, data).await?;
    drop(order);
    publish(inner, id, entries, data).await
}

/// An import's chunk: like [`put_chunk`], but its put happens outside the
/// put-order lock, so that several are in flight. That is safe because
/// nobody may open a volume while it is being imported (it is marked
/// unfinished), so no take-over can draw a fence through its puts.
pub(super) async fn put_import_chunk(
    inner: &Inner,
    entries: &[IndexEntry],
    data: &[u8],
) -> Result<u64, ObjectError> {
    let id = {
        let order = inner.fence.put_order().await;
        inner.fence.next_id(&order)?
    };
    put(inner, id, entries, data).await?;
    publish(inner, id, entries, data).await
}

async fn put(
    inner: &Inner,
    id: u64,
    entries: &[IndexEntry],
    data: &[u8],
) -> Result<(), ObjectError> {
    let body = Bytes::from(format::encode_chunk(id, entries, data));
    inner.store.put(&inner.keys.chunk(id), body).await?;
    Ok(())
}

/// Merges a chunk that is in the store into the map, unless this writer
/// was fenced meanwhile (the chunk is then an orphan the holder deletes).
async fn publish(
    inner: &Inner,
    id: u64,
    entries: &[IndexEntry],
    data: &[u8],
) -> Result<u64, ObjectError> {
    fence::verified(inner).await?;
    let data_blocks = (data.len() / BLOCK) as u32;
    let data_start = format::chunk_data_start(entries.len(), data_blocks) as u64;
    let mut m = inner.map.write_locked();
    m.chunks.insert(
        id,
        ChunkInfo {
            data_start,
            data_blocks,
            live: 0,
        },
    );
    let mut superseded = Vec::new();
    m.apply_chunk(id, entries, &mut superseded);
    drop(m);
    inner.drop_superseded(&superseded);
    Ok(id)
}

/// Packs runs of blocks into chunk-sized batches: data runs with their
/// bytes, in the order they are added.
#[derive(Default)]
pub(super) struct Packer {
    pub(super) entries: Vec<IndexEntry>,
    pub(super) data: Vec<u8>,
}

impl Packer {
    /// Adds `bytes` (whole blocks) as data for blocks from `lba`, with `seq`.
    pub(super) fn data(&mut self, lba: u64, seq: u64, bytes: &[u8]) {
        let blocks = (bytes.len() / BLOCK) as u32;
        let data_block = (self.data.len() / BLOCK) as u32;
        match self.entries.last_mut() {
            Some(e)
                if e.kind == format::Kind::Data
                    && e.seq == seq
                    && e.lba + u64::from(e.blocks) == lba
                    && e.data_block + e.blocks == data_block =>
            {
                e.blocks += blocks;
            }
            _ => self.entries.push(IndexEntry {
                lba,
                seq,
                blocks,
                data_block,
                kind: format::Kind::Data,
            }),
        }
        self.data.extend_from_slice(bytes);
    }

    /// Bytes of data packed so far.
    pub(super) fn len(&self) -> usize {
        self.data.len()
    }

    /// Takes the batch, leaving the packer empty.
    pub(super) fn take(&mut self) -> (Vec<IndexEntry>, Vec<u8>) {
        (
            std::mem::take(&mut self.entries),
            std::mem::take(&mut self.data),
        )
    }
}
