//! Sharded LRU cache of chunk blocks, budgeted in bytes. Chunks are
//! immutable, so a (chunk, block) key never goes stale; each shard has its
//! own lock so cores rarely meet.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use hashlink::LruCache;

use super::format::BLOCK;

/// Where a cached block came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockKey {
    pub chunk: u64,
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

/// Counters live beside the LRU they describe, updated under the lock the
/// lookup holds anyway: a shared atomic per block would bounce its cache
/// line between cores on every hit.
struct Shard {
    lru: LruCache<BlockKey, Box<[u8]>>,
    bytes: u64,
    hits: u64,
    misses: u64,
    evictions: u64,
}

/// Counters, readable while the cache runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub bytes: u64,
    pub budget: u64,
}

/// A sharded, byte-budgeted LRU cache of blocks.
pub struct BlockCache {
    shards: Box<[Mutex<Shard>]>,
    shard_budget: u64,
    budget: u64,
    /// Lookups in a cache with no budget, which takes no lock.
    uncached: AtomicU64,
}

impl BlockCache {
    /// A cache of `budget` bytes with at least four shards per core.
    pub fn new(budget: u64) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let shards = (4 * cores).next_power_of_two().max(8);
        Self::with_shards(budget, shards)
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

    fn shard(&self, k: &BlockKey) -> &Mutex<Shard> {
        // Fibonacci hashing spreads sequential blocks over all shards.
        let h = (k.chunk ^ (u64::from(k.block) << 32) ^ u64::from(k.block))
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let i = (h >> 32) as usize & (self.shards.len() - 1);
        &self.shards[i]
    }

    /// Copies a cached block into `out` (which must be one block long).
    pub fn get_into(&self, k: &BlockKey, out: &mut [u8]) -> bool {
        if self.budget == 0 {
            self.uncached.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let mut s = self.shard(k).lock().unwrap_or_else(|e| e.into_inner());
        match s.lru.get(k) {
            Some(b) => {
                out.copy_from_slice(b);
                s.hits += 1;
                true
            }
            None => {
                s.misses += 1;
                false
            }
        }
    }

    /// Inserts a block, evicting least-recently-used blocks of its shard to
    /// stay within budget.
    pub fn insert(&self, k: BlockKey, data: &[u8]) {
        if self.shard_budget < BLOCK as u64 || data.len() != BLOCK {
            return;
        }
        let mut s = self.shard(&k).lock().unwrap_or_else(|e| e.into_inner());
        if s.lru.contains_key(&k) {
            s.lru.get(&k);
            return;
        }
        let mut evicted = 0;
        while s.bytes + BLOCK as u64 > self.shard_budget {
            if s.lru.remove_lru().is_none() {
                break;
            }
            s.bytes -= BLOCK as u64;
            evicted += 1;
        }
        s.lru.insert(k, data.into());
        s.bytes += BLOCK as u64;
        s.evictions += evicted;
    }

    /// Current counters.
    pub fn stats(&self) -> CacheStats {
        let mut t = CacheStats {
            misses: self.uncached.load(Ordering::Relaxed),
            budget: self.budget,
            ..CacheStats::default()
        };
        for s in self.shards.iter() {
            let s = s.lock().unwrap_or_else(|e| e.into_inner());
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
        // One shard, room for three blocks.
        let c = BlockCache::with_shards(3 * BLOCK as u64, 1);
        for b in 0..3 {
            c.insert(key(b), &[b as u8; BLOCK]);
        }
        let mut out = [0u8; BLOCK];
        // Touch block 0 so block 1 is now the least recently used.
        assert!(c.get_into(&key(0), &mut out));
        assert_eq!(out[0], 0);
        c.insert(key(3), &[3; BLOCK]);
        assert!(!c.get_into(&key(1), &mut out), "LRU block evicted");
        for b in [0, 2, 3] {
            assert!(c.get_into(&key(b), &mut out));
            assert_eq!(out, [b as u8; BLOCK]);
        }
        let s = c.stats();
        assert_eq!(
            (s.hits, s.misses, s.evictions, s.bytes),
            (4, 1, 1, 3 * BLOCK as u64)
        );
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
        let c = std::sync::Arc::new(BlockCache::new(64 * BLOCK as u64));
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
        assert!(s.bytes <= 64 * BLOCK as u64);
        assert_eq!(s.evictions, 20_000 - s.bytes / BLOCK as u64);
    }
}
