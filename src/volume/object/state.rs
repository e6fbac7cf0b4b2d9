//! The in-memory state of an object volume: the write-ahead layer (records
//! not yet in a chunk) and the persistent map (what the chunks say).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::extent_map::{ExtentMap, Piece, Span};
use super::format::{CheckpointEntry, IndexEntry, Kind};
use super::lineage::layer_of;
use super::segment::Segment;

/// Where the newest version of unflushed blocks is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DirtyLoc {
    /// In a WAL segment, at this byte offset.
    Data {
        seg: u64,
        off: u64,
    },
    Zero,
    Hole,
}

impl Piece for DirtyLoc {
    fn advance(&self, by: u64) -> Self {
        match *self {
            DirtyLoc::Data { seg, off } => DirtyLoc::Data {
                seg,
                off: off + by * super::format::BLOCK as u64,
            },
            other => other,
        }
    }
}

/// Where the chunks put a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mapping {
    Chunk { id: u64, block: u32 },
    Zero,
    Hole,
}

impl Piece for Mapping {
    fn advance(&self, by: u64) -> Self {
        match *self {
            Mapping::Chunk { id, block } => Mapping::Chunk {
                id,
                block: block + by as u32,
            },
            other => other,
        }
    }
}

impl Mapping {
    /// The mapping an index entry describes, for chunk `id`.
    pub(super) fn of(id: u64, e: &IndexEntry) -> Mapping {
        match e.kind {
            Kind::Data => Mapping::Chunk {
                id,
                block: e.data_block,
            },
            Kind::Zero => Mapping::Zero,
            Kind::Hole => Mapping::Hole,
        }
    }

    /// Rank on a sequence tie: the volume's own chunks (layer 0) beat a
    /// parent's, then the later chunk wins.
    fn rank(&self) -> (bool, u64) {
        match self {
            Mapping::Chunk { id, .. } => (layer_of(*id) == 0, *id),
            _ => (true, 0),
        }
    }
}

/// Newest sequence wins; on a tie (a chunk rewritten by garbage collection,
/// or a clone's copy of a parent's block made by flatten, keeps its blocks'
/// sequence numbers) the volume's own chunk wins, then the later chunk.
pub(super) fn newer(ns: u64, nv: &Mapping, os: u64, ov: &Mapping) -> bool {
    ns > os || (ns == os && nv.rank() > ov.rank())
}

/// Records not yet in a chunk, and the segments holding their data.
pub(super) struct Dirty {
    pub(super) map: ExtentMap<DirtyLoc>,
    pub(super) segments: BTreeMap<u64, Arc<Segment>>,
    /// The segment taking appends; `None` until the next write.
    pub(super) active: Option<Arc<Segment>>,
    pub(super) next_seq: u64,
    pub(super) next_seg: u64,
    /// Log position just past the last appended byte.
    pub(super) appended: u64,
    /// Bytes held in segments not yet uploaded.
    pub(super) backlog: u64,
    /// When the last record was appended.
    pub(super) last_append: std::time::Instant,
}

/// What a chunk holds, as far as reads and garbage collection care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ChunkInfo {
    /// Byte offset of the first data block in the object.
    pub(super) data_start: u64,
    pub(super) data_blocks: u32,
    /// Data blocks the map still points at.
    pub(super) live: u64,
}

/// The map the chunks define.
#[derive(Default)]
pub(super) struct Mapped {
    pub(super) map: ExtentMap<Mapping>,
    pub(super) chunks: BTreeMap<u64, ChunkInfo>,
    /// Chunks garbage collection superseded but has not deleted yet: a read
    /// that resolved its blocks before the rewrite may still fetch from them.
    pub(super) retired: BTreeMap<u64, ChunkInfo>,
    /// A clone's parents' chunks its map points into, by layer-tagged id
    /// (see `lineage`): readable, never collected by this volume.
    pub(super) inherited: BTreeMap<u64, ChunkInfo>,
    /// This volume's chunks that its snapshots point into (and through them
    /// every clone): garbage collection neither rewrites nor deletes them.
    pub(super) pinned: BTreeSet<u64>,
    /// Highest sequence number in any chunk.
    pub(super) max_seq: u64,
}

impl Mapped {
    /// Where a chunk's data lives, whether current or retired.
    pub(super) fn chunk_info(&self, id: u64) -> Option<ChunkInfo> {
        self.chunks
            .get(&id)
            .or_else(|| self.retired.get(&id))
            .or_else(|| self.inherited.get(&id))
            .copied()
    }

    /// The whole map as checkpoint entries (extents longer than a u32
    /// block count split), for checkpoints and snapshots.
    pub(super) fn entries(&self) -> Vec<CheckpointEntry> {
        let mut entries = Vec::with_capacity(self.map.len());
        for sp in self.map.iter() {
            let (kind, chunk, block) = match sp.value {
                Mapping::Chunk { id, block } => (Kind::Data, id, block),
                Mapping::Zero => (Kind::Zero, 0, 0),
                Mapping::Hole => (Kind::Hole, 0, 0),
            };
            let mut lba = sp.start;
            while lba < sp.end {
                let n = (sp.end - lba).min(u64::from(u32::MAX)) as u32;
                entries.push(CheckpointEntry {
                    lba,
                    seq: sp.seq,
                    blocks: n,
                    kind,
                    chunk,
                    block: if kind == Kind::Data {
                        block + (lba - sp.start) as u32
                    } else {
                        0
                    },
                });
                lba += u64::from(n);
            }
        }
        entries
    }

    /// Merges checkpoint (or snapshot) entries into the map, by sequence.
    pub(super) fn merge_entries(
        &mut self,
        entries: &[CheckpointEntry],
        shift: impl Fn(u64) -> u64,
    ) {
        for e in entries {
            let v = match e.kind {
                Kind::Data => Mapping::Chunk {
                    id: shift(e.chunk),
                    block: e.block,
                },
                Kind::Zero => Mapping::Zero,
                Kind::Hole => Mapping::Hole,
            };
            self.map
                .merge(e.lba, e.lba + u64::from(e.blocks), e.seq, v, newer, |_| {});
            self.max_seq = self.max_seq.max(e.seq);
        }
    }

    /// Moves a chunk out of the live table; it stays readable until deleted.
    pub(super) fn retire(&mut self, id: u64) {
        if let Some(info) = self.chunks.remove(&id) {
            self.retired.insert(id, info);
        }
    }

    /// Merges one range into the map, keeping per-chunk live counts; adds
    /// the chunk blocks it supersedes to `superseded`.
    fn merge(
        &mut self,
        lba: u64,
        blocks: u64,
        seq: u64,
        m: Mapping,
        superseded: &mut Vec<Superseded>,
    ) {
        let chunks = &mut self.chunks;
        let landed = self
            .map
            .merge(lba, lba + blocks, seq, m, newer, |lost: &Span<Mapping>| {
                if let Mapping::Chunk { id, block } = lost.value {
                    superseded.push(Superseded {
                        chunk: id,
                        block,
                        blocks: (lost.end - lost.start) as u32,
                    });
                    if let Some(c) = chunks.get_mut(&id) {
                        c.live = c.live.saturating_sub(lost.end - lost.start);
                    }
                }
            });
        if let Mapping::Chunk { id, .. } = m
            && let Some(c) = self.chunks.get_mut(&id)
        {
            c.live += landed;
        }
        self.max_seq = self.max_seq.max(seq);
    }

    /// Applies a chunk's index (its info must be registered first); adds
    /// the chunk blocks it supersedes to `superseded`, for the cache to
    /// drop (see [`Superseded`]).
    pub(super) fn apply_chunk(
        &mut self,
        id: u64,
        entries: &[IndexEntry],
        superseded: &mut Vec<Superseded>,
    ) {
        for e in entries {
            self.merge(
                e.lba,
                u64::from(e.blocks),
                e.seq,
                Mapping::of(id, e),
                superseded,
            );
        }
    }
}

/// Blocks of a chunk the map no longer points at. Nothing reads them
/// again (a read that resolved to them before fetches them from the
/// chunk, which stays in the store for a grace period), so the cache drops
/// them: under overwrites, old versions would otherwise fill the cache and
/// evict the blocks that are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Superseded {
    pub(super) chunk: u64,
    pub(super) block: u32,
    pub(super) blocks: u32,
}
