//! Import from and export to raw image files.
//!
//! Import packs the file's non-zero blocks straight into chunks (no
//! write-ahead log: the volume is new and nobody else writes it), several
//! puts in flight, skipping the file's holes without reading them and
//! storing no zero block. Export writes a sparse file: only the blocks the
//! map has data for, so it has holes wherever the volume has none.
//!
//! An import marks its volume unfinished (`volumes/<name>/importing`)
//! until it completes; an unfinished volume cannot be served, and the CLI
//! deletes it when the import is interrupted or fails, or when a new
//! import of the same name finds one left by a process that died.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::format::BLOCK;
use super::ingest::{Packer, put_import_chunk};
use super::layout::{self, Descriptor, Keys};
use super::state::Mapping;
use super::{ObjectError, ObjectVolume};
use crate::lock::RwLockExt;
use crate::objstore::{Store, StoreError};
use crate::runtime::runtime;

/// Bytes of data per imported chunk.
const CHUNK_BYTES: usize = 4 << 20;
/// Bytes read from the source file at a time.
const READ_BYTES: usize = 4 << 20;
/// Chunk puts (or ranged GETs of an export) in flight at once.
const IN_FLIGHT: usize = 4;

/// Where a long transfer reports how far it got.
pub trait Progress: Send + Sync {
    /// The bytes the whole transfer covers.
    fn total(&self, bytes: u64);
    /// `bytes` more are done (stored, skipped as zeroes, or written).
    fn advance(&self, bytes: u64);
}

/// Progress nobody watches.
pub struct Quiet;

impl Progress for Quiet {
    fn total(&self, _: u64) {}
    fn advance(&self, _: u64) {}
}

/// What a transfer moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferStats {
    /// Bytes of the image (the file's size, or the volume's).
    pub bytes: u64,
    /// Bytes of data stored in the volume, or written to the file.
    pub data_bytes: u64,
}

/// The unfinished-import marker.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImportMarker {
    /// What is being imported.
    pub source: String,
    /// Who imports it (`pid N on HOST`).
    pub by: String,
}

fn marker_key(name: &str) -> String {
    format!("{}/importing", Keys::new(name).root())
}

/// Whether volume `name` is an import that never finished.
pub async fn is_unfinished(store: &Store, name: &str) -> Result<bool, ObjectError> {
    match store.get_range(&marker_key(name), 0..1).await {
        Ok(_) => Ok(true),
        Err(StoreError::NotFound(_)) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Refuses to serve or change an import that never finished.
pub async fn check_finished(store: &Store, name: &str) -> Result<(), ObjectError> {
    if is_unfinished(store, name).await? {
        return Err(ObjectError::Unfinished(name.to_owned()));
    }
    Ok(())
}

/// Creates volume `name` of `size` bytes, marked unfinished.
pub async fn begin_import(
    store: &Store,
    name: &str,
    size: u64,
    source: &str,
) -> Result<Descriptor, ObjectError> {
    if !layout::valid_name(name) {
        return Err(ObjectError::BadName(name.to_owned()));
    }
    let me = layout::Owner::me();
    let marker = ImportMarker {
        source: source.to_owned(),
        by: format!("pid {} on {}", me.pid, me.host),
    };
    let body = serde_json::to_vec(&marker).map_err(|source| ObjectError::Encode {
        what: "import marker",
        source,
    })?;
    // The marker first: a descriptor without one would look finished.
    match layout::read_descriptor(store, name).await {
        Ok(_) => return Err(ObjectError::Exists(name.to_owned())),
        Err(ObjectError::NoSuchVolume(_)) => {}
        Err(e) => return Err(e),
    }
    store.put(&marker_key(name), Bytes::from(body)).await?;
    super::admin::create(store, name, size).await
}

/// Marks an import finished: from now on the volume can be opened.
pub async fn finish_import(store: &Store, name: &str) -> Result<(), ObjectError> {
    store.delete(&marker_key(name)).await?;
    Ok(())
}

fn file_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> ObjectError + 'a {
    move |source| ObjectError::File {
        op,
        path: path.to_owned(),
        source,
    }
}

/// The next data region at or after `from`: (start, end), or `None` past
/// the last. Files without SEEK_DATA support are one region.
fn next_data(f: &File, from: u64, len: u64) -> Option<(u64, u64)> {
    if from >= len {
        return None;
    }
    let fd = f.as_raw_fd();
    // SAFETY: lseek on a descriptor we own; no memory is involved.
    let start = unsafe { libc::lseek(fd, from as libc::off_t, libc::SEEK_DATA) };
    if start < 0 {
        let e = std::io::Error::last_os_error();
        return (e.raw_os_error() != Some(libc::ENXIO)).then_some((from, len));
    }
    // SAFETY: as above.
    let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
    let end = if end < 0 { len } else { (end as u64).min(len) };
    Some((start as u64, end))
}

impl ObjectVolume {
    /// Fills this (new, empty) volume from the raw image at `path`: every
    /// non-zero block is stored, zero blocks and the file's holes are not.
    /// Stops with [`ObjectError::Interrupted`] once `stop` is set. Blocks
    /// the calling thread.
    pub fn import_raw(
        &self,
        path: &Path,
        progress: &dyn Progress,
        stop: &AtomicBool,
    ) -> Result<TransferStats, ObjectError> {
        let inner = &self.inner;
        if self.read_only {
            return Err(ObjectError::ReadOnly(inner.name.clone()));
        }
        let f = File::open(path).map_err(file_err("opening", path))?;
        let len = f.metadata().map_err(file_err("reading", path))?.len();
        let size = inner.size.load(Ordering::Acquire);
        if len > size {
            return Err(ObjectError::BadSize(len));
        }
        progress.total(len);
        // One sequence number for the whole import: the volume is new.
        let seq = {
            let mut d = inner.dirty.write_locked();
            let s = d.next_seq;
            d.next_seq += 1;
            s
        };
        let permits = Arc::new(Semaphore::new(IN_FLIGHT));
        let mut puts = Vec::new();
        let mut pack = Packer::default();
        let mut stats = TransferStats {
            bytes: len,
            data_bytes: 0,
        };
        let mut buf = vec![0u8; READ_BYTES];
        let mut pos = 0u64;
        let flush = |pack: &mut Packer, puts: &mut Vec<_>| -> Result<(), ObjectError> {
            let (entries, data) = pack.take();
            let permit = runtime()
                .block_on(permits.clone().acquire_owned())
                .map_err(|_| ObjectError::Interrupted)?;
            let inner = self.inner.clone();
            puts.push(runtime().spawn(async move {
                let r = put_import_chunk(&inner, &entries, &data).await;
                drop(permit);
                r
            }));
            Ok(())
        };
        while let Some((start, end)) = next_data(&f, pos, len) {
            // Holes in the file hold no data to read, let alone store.
            let start = start / BLOCK as u64 * BLOCK as u64;
            progress.advance(start.saturating_sub(pos));
            let mut at = start.max(pos);
            while at < end {
                if stop.load(Ordering::Relaxed) {
                    return Err(ObjectError::Interrupted);
                }
                let want = ((end - at) as usize)
                    .min(READ_BYTES)
                    .next_multiple_of(BLOCK);
                let got = read_full(&f, &mut buf[..want], at).map_err(file_err("reading", path))?;
                if got == 0 {
                    break;
                }
                let got_blocks = got.next_multiple_of(BLOCK);
                buf[got..got_blocks].fill(0);
                for (i, block) in buf[..got_blocks].chunks(BLOCK).enumerate() {
                    if is_zero(block) {
                        continue;
                    }
                    pack.data(at / BLOCK as u64 + i as u64, seq, block);
                    stats.data_bytes += BLOCK as u64;
                    if pack.len() >= CHUNK_BYTES {
                        flush(&mut pack, &mut puts)?;
                    }
                }
                progress.advance(got as u64);
                at += got_blocks as u64;
            }
            pos = at.max(end);
        }
        progress.advance(len.saturating_sub(pos));
        if pack.len() > 0 {
            flush(&mut pack, &mut puts)?;
        }
        for p in puts {
            runtime()
                .block_on(p)
                .map_err(|e| ObjectError::Write(crate::volume::VolumeError::backend(e)))??;
        }
        runtime().block_on(super::upload::write_checkpoint(inner))?;
        Ok(stats)
    }

    /// Writes the volume (as the store has it) to `path` as a sparse raw
    /// file: data blocks are written, the rest left as holes. Blocks the
    /// calling thread.
    pub fn export_raw(
        &self,
        path: &Path,
        progress: &dyn Progress,
        stop: &AtomicBool,
    ) -> Result<TransferStats, ObjectError> {
        let inner = &self.inner;
        let size = inner.size.load(Ordering::Acquire);
        let f = File::create(path).map_err(file_err("creating", path))?;
        f.set_len(size).map_err(file_err("sizing", path))?;
        progress.total(size);
        let spans: Vec<(u64, u64, u64, u32)> = {
            let m = inner.map.read_locked();
            m.map
                .iter()
                .filter_map(|sp| match sp.value {
                    Mapping::Chunk { id, block } => Some((sp.start, sp.end, id, block)),
                    _ => None,
                })
                .collect()
        };
        let mut stats = TransferStats {
            bytes: size,
            data_bytes: 0,
        };
        let mut done = 0u64;
        // (file offset, chunk, byte range) pieces of at most READ_BYTES.
        let mut pieces = Vec::new();
        for (start, end, id, block) in spans {
            let Some(info) = inner.map.read_locked().chunk_info(id) else {
                return Err(ObjectError::Write(crate::volume::VolumeError::backend(
                    super::RequestError::UnknownChunk(id),
                )));
            };
            let mut lba = start;
            while lba < end {
                let n = (end - lba).min((READ_BYTES / BLOCK) as u64);
                let from = info.data_start + (u64::from(block) + lba - start) * BLOCK as u64;
                pieces.push((lba * BLOCK as u64, id, from..from + n * BLOCK as u64));
                lba += n;
            }
        }
        for batch in pieces.chunks(IN_FLIGHT) {
            if stop.load(Ordering::Relaxed) {
                return Err(ObjectError::Interrupted);
            }
            let fetches: Vec<_> = batch
                .iter()
                .map(|(_, id, range)| {
                    let store = inner.store.clone();
                    let key = inner.chunk_key(*id);
                    let range = range.clone();
                    runtime().spawn(async move {
                        let want = (range.end - range.start) as usize;
                        let b = store.get_range(&key, range).await?;
                        if b.len() != want {
                            return Err(ObjectError::ShortRead {
                                key,
                                got: b.len(),
                                want,
                            });
                        }
                        Ok(b)
                    })
                })
                .collect();
            for ((offset, _, _), fetch) in batch.iter().zip(fetches) {
                let bytes = runtime()
                    .block_on(fetch)
                    .map_err(|e| ObjectError::Write(crate::volume::VolumeError::backend(e)))??;
                f.write_all_at(&bytes, *offset)
                    .map_err(file_err("writing", path))?;
                stats.data_bytes += bytes.len() as u64;
                let end = *offset + bytes.len() as u64;
                progress.advance(end.saturating_sub(done));
                done = done.max(end);
            }
        }
        progress.advance(size.saturating_sub(done));
        f.sync_all().map_err(file_err("syncing", path))?;
        Ok(stats)
    }
}

/// Whether a block is all zeroes: word-wise, so it vectorises.
fn is_zero(block: &[u8]) -> bool {
    block.chunks_exact(8).fold(0u64, |acc, w| {
        acc | u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]])
    }) == 0
        && block.chunks_exact(8).remainder().iter().all(|&b| b == 0)
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full(f: &File, buf: &mut [u8], at: u64) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], at + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}
