//! Sharded cache of chunk blocks, budgeted in bytes, evicting the least
//! recently used with a second chance for blocks read since. Chunks are
//! immutable, so a (chunk, block) key never goes stale; each shard has its
//! own lock so cores rarely meet.

use crate::lock::MutexExt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use hashlink::LruCache;

use super::format::BLOCK;

/// Where a cached block came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockKey {
    /// The chunk holding the block.
    pub chunk: u64,
    /// The block's index within that chunk's data.
    pub block: u32,
}

/// How big a volume's cache is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheSize {
    /// The default for the volume's name (see [`CacheSize::budget`]).
    Default,
    /// A fixed number of bytes.
    Bytes(u64),
    /// A share of the machine's available memory.
    Auto,
}

/// Bytes a volume's cache may hold by default.
pub const DEFAULT_BUDGET: u64 = 128 << 20;

impl CacheSize {
    /// The byte budget for a volume named `name`. Cloud-init seeds and EFI
    /// variable stores are read once at boot: caching them only wastes RAM.
    pub fn budget(self, name: &str) -> u64 {
        match self {
            CacheSize::Bytes(b) => b,
            CacheSize::Default if name.ends_with("-cloudinit") || name.ends_with("-efi") => 0,
            CacheSize::Default => DEFAULT_BUDGET,
            // An eighth of what is available, so that several volumes and
            // the guests themselves still fit.
            CacheSize::Auto => available_memory().map_or(DEFAULT_BUDGET, |m| m / 8),
        }
    }
}

/// MemAvailable from /proc/meminfo, in bytes.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Blocks per cache entry. A 64 KiB group costs one hash probe where
/// 4 KiB blocks cost sixteen, which is what bounds a warm sequential read.
/// A group holds only the blocks that were fetched (a random 4 KiB miss
/// fetches one block), and the budget counts blocks held, not groups.
pub const GROUP_BLOCKS: u32 = 16;
#[cfg(test)]
const GROUP_BYTES: u64 = GROUP_BLOCKS as u64 * BLOCK as u64;
/// A group's slot index for a block it does not hold.
const EMPTY: u8 = u8::MAX;

/// Which group of which chunk an entry holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct GroupKey {
    chunk: u64,
    group: u32,
}

impl GroupKey {
    fn of(chunk: u64, block: u32) -> Self {
        GroupKey {
            chunk,
            group: block / GROUP_BLOCKS,
        }
    }
}

/// The part of a run that falls in one group: blocks `first..first+count`
/// of group `key`, which are blocks `i..i+count` of the run.
struct Piece {
    key: GroupKey,
    first: u32,
    i: u32,
    count: u32,
}

/// Splits `n` blocks of `chunk` from `block` on at group boundaries.
fn pieces(chunk: u64, block: u32, n: u32) -> impl Iterator<Item = Piece> {
    let mut i = 0;
    std::iter::from_fn(move || {
        if i >= n {
            return None;
        }
        let b = block + i;
        let first = b % GROUP_BLOCKS;
        let count = (GROUP_BLOCKS - first).min(n - i);
        let p = Piece {
            key: GroupKey::of(chunk, b),
            first,
            i,
            count,
        };
        i += count;
        Some(p)
    })
}

/// Up to sixteen blocks of one group, stored in the order they arrived.
struct Group {
    /// The blocks held, `BLOCK` bytes each.
    data: Vec<u8>,
    /// Where in `data` each of the group's blocks is (in blocks), or EMPTY.
    slot: [u8; GROUP_BLOCKS as usize],
    /// Read since eviction last passed it: spared once (second chance).
    referenced: bool,
}

impl Group {
    fn new() -> Group {
        Group {
            data: Vec::new(),
            slot: [EMPTY; GROUP_BLOCKS as usize],
            referenced: false,
        }
    }

    /// Bytes of block `at` of the group, if held.
    fn block(&self, at: u32) -> Option<&[u8]> {
        let s = self.slot[at as usize];
        (s != EMPTY).then(|| &self.data[s as usize * BLOCK..(s as usize + 1) * BLOCK])
    }

    /// Blocks held.
    fn blocks(&self) -> u64 {
        (self.data.len() / BLOCK) as u64
    }

    /// Drops blocks `first..first + n` it holds: the group's last block
    /// moves into each freed place, so `data` holds no dead bytes (and
    /// gives back memory once half of it is spare). Returns how many
    /// blocks it dropped.
    fn remove(&mut self, first: u32, n: u32) -> u64 {
        let mut removed = 0;
        for b in first..first + n {
            let at = self.slot[b as usize];
            if at == EMPTY {
                continue;
            }
            let last = (self.blocks() - 1) as u8;
            if at != last {
                let (from, to) = (last as usize * BLOCK, at as usize * BLOCK);
                self.data.copy_within(from..from + BLOCK, to);
                if let Some(s) = self.slot.iter_mut().find(|s| **s == last) {
                    *s = at;
                }
            }
            self.data.truncate(last as usize * BLOCK);
            self.slot[b as usize] = EMPTY;
            removed += 1;
        }
        if self.data.len() <= self.data.capacity() / 2 {
            self.data.shrink_to_fit();
        }
        removed
    }

    /// Stores blocks `first..first + n` from `src` (n blocks), keeping any
    /// already held (chunks never change, so they are the same bytes).
    /// Returns how many blocks were added.
    fn fill(&mut self, first: u32, src: &[u8]) -> u64 {
        let n = (src.len() / BLOCK) as u32;
        let new = (first..first + n)
            .filter(|&b| self.slot[b as usize] == EMPTY)
            .count();
        self.data.reserve_exact(new * BLOCK);
        for (j, b) in (first..first + n).enumerate() {
            if self.slot[b as usize] == EMPTY {
                self.slot[b as usize] = (self.data.len() / BLOCK) as u8;
                self.data
                    .extend_from_slice(&src[j * BLOCK..(j + 1) * BLOCK]);
            }
        }
        new as u64
    }
}

/// Counters live beside the LRU they describe, updated under the lock the
/// lookup holds anyway: a shared atomic per block would bounce its cache
/// line between cores on every hit.
struct Shard {
    lru: LruCache<GroupKey, Group>,
    bytes: u64,
    hits: u64,
    misses: u64,
    evictions: u64,
}

/// Counters, readable while the cache runs (hits, misses and evictions
/// count 4 KiB blocks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Blocks found in the cache.
    pub hits: u64,
    /// Blocks that had to be fetched from the store.
    pub misses: u64,
    /// Blocks dropped to stay within the budget.
    pub evictions: u64,
    /// Bytes held now.
    pub bytes: u64,
    /// Bytes the cache may hold.
    pub budget: u64,
}

/// A sharded, byte-budgeted LRU cache of chunk blocks.
pub struct BlockCache {
    shards: Box<[Mutex<Shard>]>,
    shard_budget: u64,
    budget: u64,
    /// Lookups in a cache with no budget, which takes no lock.
    uncached: AtomicU64,
}

impl BlockCache {
    /// A cache of `budget` bytes with sixteen shards per core, and at
    /// least 64: a reactor that finds its shard taken
    /// sleeps, and on a busy host may not run again for milliseconds, so
    /// meetings (with the other reactors, and with the uploader filling
    /// the cache a chunk at a time) must be rare.
    /// A small budget gets fewer shards, each still holding at least 64
    /// blocks (a shard evicts on its own share of the budget).
    pub fn new(budget: u64) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let wanted = (16 * cores).next_power_of_two().max(64) as u64;
        let fit = (budget / (64 * BLOCK as u64)).max(1);
        // The largest power of two within both.
        let shards = 1u64 << (63 - wanted.min(fit).leading_zeros());
        Self::with_shards(budget, shards as usize)
    }

    /// A cache with an explicit shard count (a power of two).
    pub fn with_shards(budget: u64, shards: usize) -> Self {
        let shards = shards.next_power_of_two();
        BlockCache {
            shards: (0..shards)
                .map(|_| {
                    Mutex::new(Shard {
                        lru: LruCache::new_unbounded(),
                        bytes: 0,
                        hits: 0,
                        misses: 0,
                        evictions: 0,
                    })
                })
                .collect(),
            shard_budget: budget / shards as u64,
            budget,
            uncached: AtomicU64::new(0),
        }
    }

    fn shard(&self, k: &GroupKey) -> &Mutex<Shard> {
        // Fibonacci hashing spreads consecutive groups over all shards.
        let h = (k.chunk ^ (u64::from(k.group) << 32) ^ u64::from(k.group))
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let i = (h >> 32) as usize & (self.shards.len() - 1);
        &self.shards[i]
    }

    /// Calls `f` with each part of the `n` blocks of `chunk` from `block`
    /// that falls in one group, and that group's shard, locked.
    fn each_group(&self, chunk: u64, block: u32, n: u32, mut f: impl FnMut(&mut Shard, Piece)) {
        for p in pieces(chunk, block, n) {
            f(&mut self.shard(&p.key).locked(), p);
        }
    }

    /// Copies a cached block into `out` (which must be one block long).
    pub fn get_into(&self, k: &BlockKey, out: &mut [u8]) -> bool {
        let mut hit = true;
        self.read_run(k.chunk, k.block, out, |_| hit = false);
        hit
    }

    /// Fills `out` with consecutive blocks of `chunk` from `block` on,
    /// calling `missing(i)` for each block `i` of the run it does not hold
    /// (that part of `out` is left alone). One lock and one probe per group.
    pub fn read_run(&self, chunk: u64, block: u32, out: &mut [u8], missing: impl FnMut(u32)) {
        let n = (out.len() / BLOCK) as u32;
        self.read_run_with(
            chunk,
            block,
            n,
            |i, src| {
                let dst = i as usize * BLOCK;
                out[dst..dst + BLOCK].copy_from_slice(src);
            },
            missing,
        );
    }

    /// Like [`BlockCache::read_run`] for `n` blocks, but hands each cached
    /// block to `hit(i, bytes)` instead of copying it into a slice, so the
    /// caller can put it wherever the request's data lives.
    pub fn read_run_with(
        &self,
        chunk: u64,
        block: u32,
        n: u32,
        mut hit: impl FnMut(u32, &[u8]),
        mut missing: impl FnMut(u32),
    ) {
        if self.budget == 0 {
            self.uncached.fetch_add(u64::from(n), Ordering::Relaxed);
            (0..n).for_each(missing);
            return;
        }
        self.each_group(
            chunk,
            block,
            n,
            |s,
             Piece {
                 key: k,
                 first,
                 i,
                 count,
             }| {
                let (mut hits, mut misses) = (0, 0);
                // A hit marks the group instead of moving it to the back of
                // the LRU list: relinking touches the neighbours' memory on
                // every read, marking only the group's own.
                match s.lru.peek_mut(&k) {
                    Some(g) => {
                        g.referenced = true;
                        for j in 0..count {
                            if let Some(src) = g.block(first + j) {
                                hit(i + j, src);
                                hits += 1;
                            } else {
                                missing(i + j);
                                misses += 1;
                            }
                        }
                    }
                    None => {
                        (i..i + count).for_each(&mut missing);
                        misses = u64::from(count);
                    }
                }
                s.hits += hits;
                s.misses += misses;
            },
        );
    }

    /// Inserts one block.
    pub fn insert(&self, k: BlockKey, data: &[u8]) {
        self.insert_run(k.chunk, k.block, data);
    }

    /// Whether the cache holds anything at all (a zero budget holds nothing).
    pub fn enabled(&self) -> bool {
        self.shard_budget >= BLOCK as u64
    }

    /// Calls `missing(i)` for each block `i` of the `n` blocks of `chunk`
    /// from `block` on that the cache does not hold; copies nothing and
    /// counts neither hits nor misses (read-ahead planning).
    pub fn probe_run(&self, chunk: u64, block: u32, n: u32, mut missing: impl FnMut(u32)) {
        if !self.enabled() {
            (0..n).for_each(missing);
            return;
        }
        self.each_group(
            chunk,
            block,
            n,
            |s,
             Piece {
                 key: k,
                 first,
                 i,
                 count,
             }| {
                match s.lru.peek(&k) {
                    Some(g) => (0..count)
                        .filter(|&j| g.block(first + j).is_none())
                        .for_each(|j| missing(i + j)),
                    None => (i..i + count).for_each(&mut missing),
                }
            },
        );
    }

    /// Inserts consecutive blocks of `chunk` from `block` on, evicting
    /// least-recently-used groups of the shard to stay within budget.
    pub fn insert_run(&self, chunk: u64, block: u32, data: &[u8]) {
        if !self.enabled() || !data.len().is_multiple_of(BLOCK) {
            return;
        }
        let n = (data.len() / BLOCK) as u32;
        self.each_group(
            chunk,
            block,
            n,
            |s,
             Piece {
                 key: k,
                 first,
                 i,
                 count,
             }| {
                let src = &data[i as usize * BLOCK..(i + count) as usize * BLOCK];
                // Most recently used now, so the evictions below spare it.
                let added = match s.lru.get_mut(&k) {
                    Some(g) => g.fill(first, src),
                    None => {
                        let mut g = Group::new();
                        let added = g.fill(first, src);
                        s.lru.insert(k, g);
                        added
                    }
                };
                s.bytes += added * BLOCK as u64;
                while s.bytes > self.shard_budget && s.lru.len() > 1 {
                    let Some((old_key, mut old)) = s.lru.remove_lru() else {
                        break;
                    };
                    // Read since it last came up, or the group just filled:
                    // back of the list, unmarked. A group is spared at most
                    // once before every other has come up, so this ends.
                    if old.referenced || old_key == k {
                        old.referenced = false;
                        s.lru.insert(old_key, old);
                        continue;
                    }
                    s.bytes -= old.blocks() * BLOCK as u64;
                    s.evictions += old.blocks();
                }
            },
        );
    }

    /// Drops the `n` blocks of `chunk` from `block` on (blocks nothing
    /// will read again), so they do not take the place of blocks that
    /// will be.
    pub fn remove_run(&self, chunk: u64, block: u32, n: u32) {
        if !self.enabled() {
            return;
        }
        self.each_group(
            chunk,
            block,
            n,
            |s,
             Piece {
                 key: k,
                 first,
                 count,
                 ..
             }| {
                let Some(g) = s.lru.peek_mut(&k) else {
                    return;
                };
                let removed = g.remove(first, count);
                let empty = g.blocks() == 0;
                s.bytes -= removed * BLOCK as u64;
                if empty {
                    s.lru.remove(&k);
                }
            },
        );
    }

    /// Current counters.
    pub fn stats(&self) -> CacheStats {
        let mut t = CacheStats {
            misses: self.uncached.load(Ordering::Relaxed),
            budget: self.budget,
            ..CacheStats::default()
        };
        for s in self.shards.iter() {
            let s = s.locked();
            t.hits += s.hits;
            t.misses += s.misses;
            t.evictions += s.evictions;
            t.bytes += s.bytes;
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(block: u32) -> BlockKey {
        BlockKey { chunk: 1, block }
    }

    #[test]
    fn budget_rules() {
        assert_eq!(CacheSize::Default.budget("os"), 128 << 20);
        assert_eq!(CacheSize::Default.budget("vm1-cloudinit"), 0);
        assert_eq!(CacheSize::Default.budget("vm1-efi"), 0);
        assert_eq!(
            CacheSize::Bytes(1 << 20).budget("vm1-efi"),
            1 << 20,
            "explicit sizes win"
        );
        let auto = CacheSize::Auto.budget("os");
        assert!(auto > 0 && auto <= available_memory().unwrap());
    }

    #[test]
    fn stays_within_budget_and_evicts_least_recent() {
        // One shard, room for three blocks (the budget counts blocks held).
        let c = BlockCache::with_shards(3 * BLOCK as u64, 1);
        let g = |n: u32| key(n * GROUP_BLOCKS);
        for n in 0..3 {
            c.insert(g(n), &[n as u8; BLOCK]);
        }
        let mut out = [0u8; BLOCK];
        // Touch group 0 so group 1 is now the least recently used.
        assert!(c.get_into(&g(0), &mut out));
        assert_eq!(out[0], 0);
        c.insert(g(3), &[3; BLOCK]);
        assert!(!c.get_into(&g(1), &mut out), "LRU group evicted");
        for n in [0, 2, 3] {
            assert!(c.get_into(&g(n), &mut out));
            assert_eq!(out, [n as u8; BLOCK]);
        }
        let s = c.stats();
        assert_eq!(
            (s.hits, s.misses, s.evictions, s.bytes),
            (4, 1, 1, 3 * BLOCK as u64)
        );
    }

    #[test]
    fn runs_span_groups_and_report_exactly_the_missing_blocks() {
        let c = BlockCache::with_shards(64 * GROUP_BYTES, 4);
        // Blocks 10..40 of chunk 7: parts of three groups.
        let data: Vec<u8> = (10..40u32).flat_map(|b| [b as u8; BLOCK]).collect();
        c.insert_run(7, 10, &data);
        let mut out = vec![0xeeu8; 40 * BLOCK];
        let mut missing = Vec::new();
        c.read_run(7, 0, &mut out, |i| missing.push(i));
        assert_eq!(missing, (0..10).collect::<Vec<_>>(), "only 0..10 absent");
        for b in 10..40 {
            assert_eq!(out[b * BLOCK], b as u8, "block {b}");
        }
        assert_eq!(out[0], 0xee, "missing blocks are left alone");
        // Another chunk's blocks never answer for this one.
        let mut missing = 0;
        c.read_run(8, 10, &mut out[..BLOCK], |_| missing += 1);
        assert_eq!(missing, 1);
        let s = c.stats();
        assert_eq!((s.hits, s.misses), (30, 11));
    }

    #[test]
    fn a_group_holds_only_the_blocks_fetched() {
        // Room for four blocks in one shard: four single blocks from four
        // groups fit (a group is not charged for the blocks it lacks).
        let c = BlockCache::with_shards(4 * BLOCK as u64, 1);
        for g in 0..4u32 {
            c.insert(key(g * GROUP_BLOCKS + 5), &[g as u8 + 1; BLOCK]);
        }
        assert_eq!(
            (c.stats().bytes, c.stats().evictions),
            (4 * BLOCK as u64, 0)
        );
        // Blocks arriving out of order land where they belong.
        let c = BlockCache::with_shards(64 * GROUP_BYTES, 1);
        c.insert_run(3, 9, &[[9u8; BLOCK], [10; BLOCK]].concat());
        c.insert_run(3, 2, &[2u8; BLOCK]);
        c.insert_run(3, 8, &[[8u8; BLOCK], [9; BLOCK]].concat());
        let mut out = vec![0u8; GROUP_BLOCKS as usize * BLOCK];
        let mut missing = Vec::new();
        c.read_run(3, 0, &mut out, |i| missing.push(i));
        let held = [2u32, 8, 9, 10];
        assert_eq!(
            missing,
            (0..GROUP_BLOCKS)
                .filter(|b| !held.contains(b))
                .collect::<Vec<_>>()
        );
        for b in held {
            assert_eq!(out[b as usize * BLOCK], b as u8, "block {b}");
            assert_eq!(out[(b as usize + 1) * BLOCK - 1], b as u8, "block {b}");
        }
        assert_eq!(c.stats().bytes, 4 * BLOCK as u64, "block 9 is held once");
        let mut probed = Vec::new();
        c.probe_run(3, 6, 6, |i| probed.push(i));
        assert_eq!(probed, [0, 1, 5], "blocks 6, 7 and 11 are absent");
    }

    #[test]
    fn removed_blocks_free_their_place_and_the_rest_stay_readable() {
        let c = BlockCache::with_shards(64 * GROUP_BYTES, 1);
        let data: Vec<u8> = (0..GROUP_BLOCKS).flat_map(|b| [b as u8; BLOCK]).collect();
        c.insert_run(5, 0, &data);
        // Blocks 3..6 and 15 go; the others stay.
        c.remove_run(5, 3, 3);
        c.remove_run(5, 15, 1);
        c.remove_run(5, 15, 1); // gone already: nothing happens
        c.remove_run(6, 0, 16); // another chunk: nothing happens
        assert_eq!(c.stats().bytes, 12 * BLOCK as u64);
        let mut out = vec![0xeeu8; GROUP_BLOCKS as usize * BLOCK];
        let mut missing = Vec::new();
        c.read_run(5, 0, &mut out, |i| missing.push(i));
        assert_eq!(missing, [3, 4, 5, 15]);
        for b in (0..GROUP_BLOCKS).filter(|b| !missing.contains(b)) {
            let at = b as usize * BLOCK;
            assert!(
                out[at..at + BLOCK].iter().all(|&x| x == b as u8),
                "block {b}"
            );
        }
        // A block put back after its removal lands where it belongs.
        c.insert_run(5, 4, &[44u8; BLOCK]);
        c.read_run(5, 4, &mut out[..BLOCK], |_| panic!("block 4 is back"));
        assert_eq!(out[0], 44);
        // Removing every block removes the group.
        c.remove_run(5, 0, GROUP_BLOCKS);
        assert_eq!(c.stats().bytes, 0);
        assert_eq!(c.shards[0].lock().unwrap().lru.len(), 0);
    }

    #[test]
    fn small_budgets_get_fewer_shards_not_an_empty_cache() {
        for blocks in [16u32, 64, 1000] {
            let c = BlockCache::new(u64::from(blocks) * BLOCK as u64);
            assert!(c.shards.len().is_power_of_two());
            assert!(
                c.shard_budget >= 16 * BLOCK as u64,
                "{blocks}: {}",
                c.shard_budget
            );
            c.insert(key(3), &[3; BLOCK]);
            let mut out = [0u8; BLOCK];
            assert!(c.get_into(&key(3), &mut out), "{blocks}");
        }
        let big = BlockCache::new(DEFAULT_BUDGET);
        assert!(big.shards.len() >= 64);
    }

    #[test]
    fn zero_budget_caches_nothing() {
        let c = BlockCache::new(0);
        c.insert(key(1), &[1; BLOCK]);
        let mut out = [0u8; BLOCK];
        assert!(!c.get_into(&key(1), &mut out));
        assert_eq!(c.stats().bytes, 0);
    }

    #[test]
    fn sharded_budget_holds_under_two_threads() {
        let c = std::sync::Arc::new(BlockCache::new(64 * GROUP_BYTES));
        let hs: Vec<_> = (0..2)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for b in 0..10_000u32 {
                        c.insert(BlockKey { chunk: t, block: b }, &[t as u8; BLOCK]);
                        let mut out = [0u8; BLOCK];
                        if c.get_into(&BlockKey { chunk: t, block: b }, &mut out) {
                            assert_eq!(out[0], t as u8);
                        }
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        let s = c.stats();
        assert!(s.bytes <= 64 * GROUP_BYTES);
        // A group evicted while its thread was still filling it comes back
        // partly filled, so count resident blocks, not resident bytes.
        let resident: u64 = c
            .shards
            .iter()
            .map(|sh| {
                let sh = sh.lock().unwrap();
                sh.lru.iter().map(|(_, g)| g.blocks()).sum::<u64>()
            })
            .sum();
        assert_eq!(s.evictions, 20_000 - resident);
    }
}
