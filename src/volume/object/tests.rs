//! The object volume's read and write paths, driven through the real
//! `ObjectVolume` with a local-directory store in a scratch directory and
//! [`SyncDriver`]: every check compares what the volume returns with a
//! model of what was written, block by block.
//!
//! Crash consistency is tested with images: a copy of the WAL directory and
//! the store taken while the volume runs, which is what a power cut at that
//! moment would leave (a process crash leaves at least that much).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::cache::CacheSize;
use super::format::{BLOCK, Kind, RecordHeader, encode_record, segment_header};
use super::layout::{Keys, wal_dir};
use super::{ObjectError, ObjectOptions, ObjectVolume, admin};
use crate::error::Chain;
use crate::lock::RwLockExt;
use crate::objstore::Store;
use crate::runtime::runtime;
use crate::volume::sync::SyncDriver;
use crate::volume::{Extent, IoFlags, Op, Volume};

const NAME: &str = "v";
const B: u64 = BLOCK as u64;
/// How long a test waits for the uploader before calling it stuck.
const DRAIN: Duration = Duration::from_secs(30);
/// A segment that holds exactly three one-block records, so a run of
/// one-block writes lands in chunks of three blocks each.
const THREE_RECORDS: usize = 16 + 3 * (32 + BLOCK);

/// A scratch directory, removed when the test passes and kept (and named
/// on stderr) when it fails.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("vbd-object-unit-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for inspection", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// One block's contents for `tag`: never all zeroes, different for every
/// (tag, block), and its first 16 bytes say which it is.
fn pattern(tag: u64, block: u64) -> Vec<u8> {
    let mut x = (tag << 32 ^ block).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(BLOCK);
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&block.to_le_bytes());
    while out.len() < BLOCK {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push(x as u8);
    }
    out
}

/// What a block should hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Block {
    Data(u64),
    /// Zeroes, still allocated (WRITE_ZEROES with NO_HOLE).
    Zero,
    /// Never written, trimmed, or zeroed by punching a hole.
    Hole,
}

/// The volume as the tests expect it.
#[derive(Clone)]
struct Model(Vec<Block>);

impl Model {
    fn new(blocks: u64) -> Model {
        Model(vec![Block::Hole; blocks as usize])
    }

    fn set(&mut self, block: u64, blocks: u64, b: Block) {
        for i in block..block + blocks {
            self.0[i as usize] = b;
        }
    }

    fn bytes(&self, block: u64) -> Vec<u8> {
        match self.0[block as usize] {
            Block::Data(tag) => pattern(tag, block),
            Block::Zero | Block::Hole => vec![0; BLOCK],
        }
    }

    /// Block status as the volume should report it.
    fn extents(&self, block: u64, blocks: u64) -> Vec<Extent> {
        let mut out: Vec<Extent> = Vec::new();
        for i in block..block + blocks {
            let (hole, zero) = match self.0[i as usize] {
                Block::Data(_) => (false, false),
                Block::Zero => (false, true),
                Block::Hole => (true, true),
            };
            match out.last_mut() {
                Some(l) if l.hole == hole && l.zero == zero => l.len += B,
                _ => out.push(Extent { len: B, hole, zero }),
            }
        }
        out
    }
}

/// A volume's store and WAL directories in one scratch directory, the
/// driver that runs requests to completion, and the model they follow.
struct Rig {
    dir: Scratch,
    d: SyncDriver,
    images: u32,
    /// What every request so far should have left in the first blocks.
    m: Model,
}

impl Rig {
    /// A fresh volume of `size` bytes in the store named "store", whose
    /// first `modelled` blocks the model follows.
    fn new(tag: &str, size: u64, modelled: u64) -> Rig {
        let rig = Rig {
            dir: Scratch::new(tag),
            d: SyncDriver::new().expect("driver ring"),
            images: 0,
            m: Model::new(modelled),
        };
        runtime()
            .block_on(admin::create(&rig.store("store"), NAME, size))
            .expect("create the volume");
        rig
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    fn url(&self, store: &str) -> String {
        format!("file://{}", self.path(store).display())
    }

    fn store(&self, store: &str) -> Store {
        Store::open(&self.url(store)).expect("open the store")
    }

    /// Options for a writer whose WAL lives under `wal`; garbage collection
    /// stays off so that what is in which chunk only changes when a test
    /// says so.
    fn opts(&self, wal: &str) -> ObjectOptions {
        ObjectOptions {
            wal_root: self.path(wal),
            cache: CacheSize::Default,
            segment_size: 64 << 10,
            checkpoint_every: 4,
            gc_threshold: 0.0,
            drain_timeout: DRAIN,
            ..ObjectOptions::default()
        }
    }

    fn open(&self, store: &str, opts: ObjectOptions) -> ObjectVolume {
        ObjectVolume::open(self.store(store), NAME, opts).expect("open the volume")
    }

    /// Shuts `v` down, which drains it to its store, and opens a reader of
    /// what `store` alone holds: no WAL, nothing cached yet.
    fn store_only_after(&self, v: ObjectVolume, store: &str, cache: CacheSize) -> ObjectVolume {
        v.shutdown();
        drop(v);
        let opts = ObjectOptions {
            read_only: true,
            cache,
            ..self.opts("unused-wal")
        };
        self.open(store, opts)
    }

    /// Copies the WAL under root `wal` and then the store `store` to a new
    /// store and WAL root, returning their names. The WAL goes first: a
    /// segment deleted before the copy was already in a chunk, which the
    /// store copy then finds. Its writer is gone: the image's generation
    /// record names a process that no longer runs.
    fn crash_image(&mut self, store: &str, wal: &str) -> (String, String) {
        self.images += 1;
        let (img_store, img_wal) = (
            format!("image{}-store", self.images),
            format!("image{}-wal", self.images),
        );
        let from = wal_dir(&self.path(wal), &self.url(store), NAME);
        let to = wal_dir(&self.path(&img_wal), &self.url(&img_store), NAME);
        copy_tree(&from, &to, &|p| p.file_name().is_some_and(|n| n == "lock"));
        copy_tree(&self.path(store), &self.path(&img_store), &|_| false);
        let gens = self.path(&img_store).join(Keys::new(NAME).generations());
        let newest = std::fs::read_dir(&gens)
            .expect("the image holds generation records")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_none())
            .max()
            .expect("the writer's generation record");
        let mut record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&newest).expect("read the record")).unwrap();
        record["holder"]["started"] = u64::MAX.into();
        std::fs::write(&newest, serde_json::to_vec(&record).unwrap()).expect("rewrite the record");
        (img_store, img_wal)
    }

    /// Writes blocks of `tag`'s pattern, and notes them in the model.
    fn write(&mut self, v: &ObjectVolume, block: u64, blocks: u64, tag: u64, fua: bool) {
        let data: Vec<u8> = (block..block + blocks)
            .flat_map(|b| pattern(tag, b))
            .collect();
        self.d
            .write(v, block * B, &data, fua)
            .unwrap_or_else(|e| panic!("write {block}+{blocks}: {}", Chain(&e)));
        self.note(block, blocks, Block::Data(tag));
    }

    /// Trims (`Hole`: TRIM, or WRITE_ZEROES when `punch`) or zeroes in
    /// place (`Zero`: WRITE_ZEROES with NO_HOLE), and notes it in the model.
    fn zero(&mut self, v: &ObjectVolume, block: u64, blocks: u64, how: Block, punch: bool) {
        let (op, no_hole) = match how {
            Block::Hole if punch => (Op::WriteZeroes, false),
            Block::Hole => (Op::Trim, false),
            Block::Zero => (Op::WriteZeroes, true),
            Block::Data(_) => panic!("zero() makes holes or zeroes"),
        };
        self.op(v, op, block, blocks, no_hole);
        self.note(block, blocks, how);
    }

    fn note(&mut self, block: u64, blocks: u64, b: Block) {
        let modelled = self.m.0.len() as u64;
        if block < modelled {
            self.m.set(block, blocks.min(modelled - block), b);
        }
    }

    fn op(
        &mut self,
        v: &ObjectVolume,
        op: Op,
        block: u64,
        blocks: u64,
        no_hole: bool,
    ) -> Vec<Extent> {
        let flags = IoFlags {
            no_hole,
            ..IoFlags::default()
        };
        let io = self
            .d
            .op(v, op, block * B, blocks * B, flags)
            .unwrap_or_else(|e| panic!("{op:?} {block}+{blocks}: {}", Chain(&e)));
        io.extents
    }

    fn flush(&mut self, v: &ObjectVolume) {
        self.op(v, Op::Flush, 0, 0, false);
    }

    /// Reads `blocks` blocks at `block` in one request and compares each
    /// with the model, naming the first block that differs.
    fn expect(&mut self, v: &ObjectVolume, block: u64, blocks: u64) {
        let m = self.m.clone();
        self.expect_of(v, &m, block, blocks);
    }

    /// [`Rig::expect`] against another model, such as an earlier state.
    fn expect_of(&mut self, v: &ObjectVolume, m: &Model, block: u64, blocks: u64) {
        let got = self
            .d
            .read(v, block * B, (blocks * B) as usize)
            .unwrap_or_else(|e| panic!("read {block}+{blocks}: {}", Chain(&e)));
        for (i, got) in got.chunks(BLOCK).enumerate() {
            let b = block + i as u64;
            if got != m.bytes(b) {
                let tag = u64::from_le_bytes(got[..8].try_into().unwrap_or_default());
                let at = u64::from_le_bytes(got[8..16].try_into().unwrap_or_default());
                let zeroes = if got.iter().all(|&x| x == 0) {
                    " (zeroes)"
                } else {
                    ""
                };
                panic!(
                    "read {block}+{blocks}: block {b} should be {:?} but holds tag {tag} of block {at}{zeroes}",
                    m.0[b as usize],
                );
            }
        }
    }

    /// Every read of 1 to `max` blocks starting in [0, blocks): the runs of
    /// a read start and stop at every possible place.
    fn expect_windows(&mut self, v: &ObjectVolume, blocks: u64, max: u64) {
        for start in 0..blocks {
            for len in 1..=max.min(blocks - start) {
                self.expect(v, start, len);
            }
        }
    }

    /// Block status of the modelled blocks, and of a window inside them.
    fn expect_status(&mut self, v: &ObjectVolume) {
        let n = self.m.0.len() as u64;
        for (block, blocks) in [(0, n), (n / 3, n / 2)] {
            let got = self.op(v, Op::BlockStatus, block, blocks, false);
            let want = self.m.extents(block, blocks);
            assert_eq!(got, want, "block status {block}+{blocks}");
        }
    }
}

/// Copies the files under `from` to `to`, in name order, leaving out those
/// `skip` names and files that vanish while it runs. Name order puts a
/// volume's `checkpoints` before its `chunks`, so every chunk a copied
/// checkpoint names is copied too.
fn copy_tree(from: &Path, to: &Path, skip: &dyn Fn(&Path) -> bool) {
    std::fs::create_dir_all(to).expect("image directory");
    let Ok(rd) = std::fs::read_dir(from) else {
        return;
    };
    let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        let Some(name) = p.file_name() else { continue };
        if skip(&p) {
            continue;
        }
        if p.is_dir() {
            copy_tree(&p, &to.join(name), skip);
        } else if let Ok(bytes) = std::fs::read(&p) {
            std::fs::write(to.join(name), bytes).expect("image file");
        }
    }
}

fn fetches(v: &ObjectVolume) -> u64 {
    v.stats().fetches.load(Ordering::Relaxed)
}

#[test]
fn reads_come_from_the_wal_the_cache_and_the_store() {
    let mut rig = Rig::new("layers", 4 << 20, 40);
    let v = rig.open("store", rig.opts("wal"));
    for b in 0..32 {
        rig.write(&v, b, 1, 1, false);
    }
    // Acknowledged from the write-ahead layer; unwritten blocks read as zeroes.
    rig.expect(&v, 0, 40);
    assert!(v.sync_to_store(DRAIN), "uploads finished");
    assert_eq!(v.backlog(), 0);
    // Now from the map, through the cache the uploader filled.
    rig.expect(&v, 0, 40);
    let r = rig.store_only_after(v, "store", CacheSize::Default);
    let chunks = runtime()
        .block_on(admin::info(&rig.store("store"), NAME))
        .expect("volume info")
        .chunks;
    assert!(
        chunks >= 2,
        "32 blocks in 64 KiB segments make several chunks"
    );
    rig.expect(&r, 0, 40);
    let cold = r.cache_stats();
    assert_eq!(
        (cold.hits, cold.misses),
        (0, 32),
        "a cold read misses every block"
    );
    assert_eq!(
        fetches(&r),
        chunks,
        "one ranged GET per chunk: consecutive missing blocks form one run"
    );
    rig.expect(&r, 0, 40);
    let warm = r.cache_stats();
    assert_eq!((warm.hits, warm.misses), (32, 32), "the second read hits");
    assert_eq!(fetches(&r), chunks);
}

#[test]
fn overwritten_blocks_leave_the_cache() {
    let mut rig = Rig::new("supersede", 4 << 20, 40);
    let v = rig.open("store", rig.opts("wal"));
    // Twenty versions of blocks 0..8, each in its own chunk (64 KiB
    // segments), and one version of 8..16 that stays.
    rig.write(&v, 8, 8, 99, false);
    for tag in 0..20 {
        rig.write(&v, 0, 8, tag, false);
    }
    assert!(v.sync_to_store(DRAIN), "uploads finished");
    assert!(v.counters().chunks_uploaded >= 20);
    // Only the versions the map points at are cached: sixteen blocks, not
    // the 168 the uploads put there (the cache has room for all of them).
    assert_eq!(v.cache_stats().bytes, 16 * BLOCK as u64);
    let fetched = fetches(&v);
    rig.expect(&v, 0, 40);
    assert_eq!(
        fetches(&v),
        fetched,
        "every block read comes from the cache"
    );
}

#[test]
fn partial_overwrites_split_extents_across_chunks() {
    let mut rig = Rig::new("split", 1 << 20, 40);
    let opts = ObjectOptions {
        segment_size: THREE_RECORDS,
        ..rig.opts("wal")
    };
    let v = rig.open("store", opts);
    // One three-block record per segment, so chunks of one three-block
    // extent each: [0,3) [3,6) [6,9) ...
    for b in (0..24).step_by(3) {
        rig.write(&v, b, 3, 1, false);
    }
    assert!(v.sync_to_store(DRAIN));
    // One record over the tail of the first extent, all of the second and
    // the head of the third, and one inside the fourth: each extent is cut
    // where it overlaps, and what is left of it must still point at the
    // right blocks of its chunk.
    rig.write(&v, 2, 5, 2, false);
    rig.write(&v, 10, 1, 2, false);
    // Three blocks written backwards share a chunk in reverse order: next
    // to each other in a read, not in the chunk, so they are three runs.
    for b in [35, 34, 33] {
        rig.write(&v, b, 1, 2, false);
    }
    assert!(v.sync_to_store(DRAIN));
    // The same cuts in the write-ahead layer, over chunks and holes alike.
    rig.write(&v, 7, 1, 3, false);
    rig.write(&v, 14, 3, 3, false);
    rig.write(&v, 13, 2, 4, false);
    rig.write(&v, 30, 3, 3, false);
    rig.write(&v, 31, 1, 4, false);
    rig.zero(&v, 11, 1, Block::Hole, false);
    rig.zero(&v, 17, 2, Block::Zero, false);
    rig.zero(&v, 20, 2, Block::Hole, true);
    rig.expect(&v, 0, 40);
    rig.expect_windows(&v, 36, 6);
    rig.expect_status(&v);
    // The same from the store alone, with no cache: every block is fetched,
    // so the runs a read asks for must line up with the chunks exactly.
    let r = rig.store_only_after(v, "store", CacheSize::Bytes(0));
    rig.expect(&r, 0, 40);
    rig.expect_windows(&r, 36, 6);
    rig.expect_status(&r);
}

#[test]
fn trim_and_write_zeroes_read_as_zeroes() {
    let mut rig = Rig::new("zeroes", 1 << 20, 24);
    let v = rig.open("store", rig.opts("wal"));
    rig.write(&v, 0, 16, 1, false);
    assert!(v.sync_to_store(DRAIN));
    rig.zero(&v, 4, 4, Block::Hole, false);
    rig.zero(&v, 8, 2, Block::Zero, false);
    rig.zero(&v, 10, 2, Block::Hole, true);
    // From the write-ahead layer, over data that is in a chunk.
    rig.expect(&v, 0, 24);
    rig.expect_status(&v);
    // From the map, once the records are in a chunk of their own.
    assert!(v.sync_to_store(DRAIN));
    rig.expect(&v, 0, 24);
    rig.expect_status(&v);
    // Data written over zeroes reads as data again.
    rig.write(&v, 9, 2, 2, false);
    rig.expect(&v, 0, 24);
    rig.expect_status(&v);
    let r = rig.store_only_after(v, "store", CacheSize::Default);
    rig.expect(&r, 0, 24);
    rig.expect_status(&r);
}

#[test]
fn a_trim_longer_than_a_record_becomes_several() {
    // 2^33 blocks: a record's u32 block count covers under half of it.
    let size = 1u64 << 45;
    let (whole, last) = (size / B, size / B - 1);
    let mut rig = Rig::new("huge-trim", size, 0);
    let v = rig.open("store", rig.opts("wal"));
    for b in [0, 1 << 32, last] {
        rig.write(&v, b, 1, 1, false);
    }
    rig.zero(&v, 0, whole, Block::Hole, false);
    for b in [0, 1 << 32, last] {
        assert_eq!(rig.d.read(&v, b * B, BLOCK).ok(), Some(vec![0; BLOCK]));
    }
    let all = |hole| {
        vec![Extent {
            len: size,
            hole,
            zero: true,
        }]
    };
    assert_eq!(rig.op(&v, Op::BlockStatus, 0, whole, false), all(true));
    rig.zero(&v, 0, whole, Block::Zero, false);
    assert_eq!(rig.op(&v, Op::BlockStatus, 0, whole, false), all(false));
    let r = rig.store_only_after(v, "store", CacheSize::Default);
    assert_eq!(rig.d.read(&r, last * B, BLOCK).ok(), Some(vec![0; BLOCK]));
    assert_eq!(rig.op(&r, Op::BlockStatus, 0, whole, false), all(false));
}

/// Reads `blocks` blocks at `block` into `pieces` of a guest-like buffer
/// and compares them with the model.
fn expect_guest(
    rig: &mut Rig,
    v: &ObjectVolume,
    block: u64,
    blocks: u64,
    pieces: &[(usize, usize)],
) {
    let mut mem = vec![0x55u8; 64 << 10];
    rig.d
        .run_guest(v, Op::Read, block * B, IoFlags::default(), &mut mem, pieces)
        .unwrap_or_else(|e| panic!("guest read {block}+{blocks}: {}", Chain(&e)));
    let got: Vec<u8> = pieces
        .iter()
        .flat_map(|&(at, n)| mem[at..at + n].to_vec())
        .collect();
    let want: Vec<u8> = (block..block + blocks)
        .flat_map(|b| rig.m.bytes(b))
        .collect();
    assert!(
        got == want,
        "guest read {block}+{blocks} differs from the model"
    );
}

#[test]
fn guest_buffers_go_into_the_wal_and_come_back_from_every_layer() {
    let mut rig = Rig::new("guest", 1 << 20, 16);
    let v = rig.open("store", rig.opts("wal"));
    // Three blocks in pieces that cut through blocks at odd places.
    let data: Vec<u8> = (3..6).flat_map(|b| pattern(7, b)).collect();
    let pieces = [(10, 512), (1000, 3584), (5000, 8192)];
    let mut mem = vec![0u8; 64 << 10];
    let mut from = 0;
    for &(at, n) in &pieces {
        mem[at..at + n].copy_from_slice(&data[from..from + n]);
        from += n;
    }
    let fua = IoFlags {
        fua: true,
        ..IoFlags::default()
    };
    rig.d
        .run_guest(&v, Op::Write, 3 * B, fua, &mut mem, &pieces)
        .unwrap_or_else(|e| panic!("guest write: {}", Chain(&e)));
    rig.note(3, 3, Block::Data(7));
    // Durable once acknowledged (FUA), and the record's checksum matches
    // its bytes: the WAL replays it.
    let (s1, w1) = rig.crash_image("store", "wal");
    let replayed = rig.open(&s1, rig.opts(&w1));
    rig.expect(&replayed, 0, 16);
    drop(replayed);
    rig.write(&v, 7, 1, 8, false);
    // From the write-ahead layer, into pieces that split blocks too.
    rig.expect(&v, 0, 16);
    expect_guest(&mut rig, &v, 2, 6, &[(1, 4095), (5000, 20_481)]);
    assert!(v.sync_to_store(DRAIN), "uploads finished");
    // From the store (a fetch scattered into the pieces), then the cache.
    let r = rig.store_only_after(v, "store", CacheSize::Default);
    expect_guest(&mut rig, &r, 0, 8, &[(0, 100), (200, 32_668)]);
    assert_eq!(r.cache_stats().hits, 0);
    expect_guest(&mut rig, &r, 3, 5, &[(4096, 20_480)]);
    assert!(r.cache_stats().hits >= 4, "the second read hits the cache");
}

#[test]
fn fua_and_flush_are_on_disk_when_they_complete() {
    let mut rig = Rig::new("fua", 1 << 20, 16);
    let v = rig.open("store", rig.opts("wal"));
    // Nothing reaches the store here (segments seal after a second idle),
    // so the images hold these writes only in their WAL.
    rig.write(&v, 5, 1, 1, true);
    let after_fua = rig.m.clone();
    let (s1, w1) = rig.crash_image("store", "wal");
    rig.write(&v, 6, 2, 2, false);
    rig.write(&v, 9, 1, 2, false);
    rig.zero(&v, 5, 1, Block::Hole, false);
    rig.flush(&v);
    let (s2, w2) = rig.crash_image("store", "wal");
    drop(v);

    // Replaying the WAL gives back everything acknowledged as durable:
    // the FUA write (what followed it may or may not have made it)...
    let v1 = rig.open(&s1, rig.opts(&w1));
    rig.expect_of(&v1, &after_fua, 0, 6);
    drop(v1);
    // ... and everything before the flush.
    let v2 = rig.open(&s2, rig.opts(&w2));
    rig.expect(&v2, 0, 16);
    rig.expect_status(&v2);
    // The replayed records reach the store.
    assert!(v2.sync_to_store(DRAIN));
    let r = rig.store_only_after(v2, &s2, CacheSize::Default);
    rig.expect(&r, 0, 16);
}

#[test]
fn writes_wait_for_the_uploader_when_the_backlog_is_full() {
    let mut rig = Rig::new("backlog", 1 << 20, 64);
    let opts = ObjectOptions {
        segment_size: THREE_RECORDS,
        backlog: 4 * THREE_RECORDS as u64,
        ..rig.opts("wal")
    };
    let v = rig.open("store", opts);
    // Four times the backlog: most of these writes must wait for uploads.
    for b in 0..64 {
        rig.write(&v, b, 1, 1, b % 7 == 0);
    }
    assert!(
        v.counters().chunks_uploaded >= 8,
        "writes past the backlog went on only as chunks were uploaded"
    );
    rig.expect(&v, 0, 64);
}

#[test]
fn reads_after_eviction_fetch_again() {
    let mut rig = Rig::new("evict", 8 << 20, 1024);
    let v = rig.open("store", rig.opts("wal"));
    for b in (0..1024).step_by(16) {
        rig.write(&v, b, 16, 1, false);
    }
    let budget = 1 << 20;
    let r = rig.store_only_after(v, "store", CacheSize::Bytes(budget));
    for b in (0..1024).step_by(64) {
        rig.expect(&r, b, 64);
    }
    let first = fetches(&r);
    assert!(first > 0);
    // Four times the cache: the first blocks were evicted and come back
    // from the store, correct.
    for b in (0..1024).step_by(64) {
        rig.expect(&r, b, 64);
    }
    assert!(fetches(&r) > first, "evicted blocks are fetched again");
    let s = r.cache_stats();
    assert!(s.bytes <= budget, "{s:?}");
    assert!(s.bytes == 0 || s.evictions > 0, "{s:?}");
}

#[test]
fn random_requests_match_a_model_across_uploads_and_crashes() {
    let blocks = 256;
    let mut rig = Rig::new("random", blocks * B, blocks);
    let opts = |rig: &Rig, wal: &str| ObjectOptions {
        segment_size: 48 << 10,
        gc_threshold: 0.5,
        ..rig.opts(wal)
    };
    let (mut store, mut wal) = ("store".to_owned(), "wal".to_owned());
    let mut v = rig.open(&store, opts(&rig, &wal));
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for step in 0..400u64 {
        let block = next(blocks);
        let n = (1 + next(12)).min(blocks - block);
        match next(20) {
            0..=9 => rig.write(&v, block, n, step, next(5) == 0),
            10 | 11 => rig.zero(&v, block, n, Block::Hole, false),
            12 => rig.zero(&v, block, n, Block::Hole, true),
            13 => rig.zero(&v, block, n, Block::Zero, false),
            14..=16 => rig.expect(&v, block, n),
            17 => rig.expect_status(&v),
            18 => assert!(v.sync_to_store(DRAIN), "step {step}: uploads finished"),
            _ => {
                rig.op(&v, Op::Cache, block, n, false);
            }
        }
        if step % 100 == 99 {
            // A crash right after a flush: the image becomes the volume.
            rig.flush(&v);
            let (s, w) = rig.crash_image(&store, &wal);
            drop(v);
            (store, wal) = (s, w);
            v = rig.open(&store, opts(&rig, &wal));
            rig.expect(&v, 0, blocks);
        }
    }
    rig.expect(&v, 0, blocks);
    rig.expect_status(&v);
    let r = rig.store_only_after(v, &store, CacheSize::Bytes(0));
    rig.expect(&r, 0, blocks);
    rig.expect_status(&r);
}

#[test]
fn replay_stops_at_a_torn_record() {
    let mut rig = Rig::new("torn", 1 << 20, 8);
    let dir = wal_dir(&rig.path("wal"), &rig.url("store"), NAME);
    std::fs::create_dir_all(&dir).expect("WAL directory");
    let record = |seg: &mut Vec<u8>, seq: u64, lba: u64, kind: Kind| {
        let data = if kind == Kind::Data {
            pattern(seq, lba)
        } else {
            Vec::new()
        };
        let h = RecordHeader {
            seq,
            lba,
            blocks: 1,
            kind,
        };
        encode_record(seg, &h, &data);
    };
    // Segment 1: two good records, then one torn mid-data by the crash.
    let mut one = segment_header(1).to_vec();
    record(&mut one, 1, 0, Kind::Data);
    record(&mut one, 2, 1, Kind::Zero);
    let good = one.len();
    record(&mut one, 3, 2, Kind::Data);
    one.truncate(good + 100);
    std::fs::write(dir.join(format!("{:016x}.wal", 1)), &one).expect("segment 1");
    // Segment 2 comes after the tear, so it was never acknowledged durable.
    let mut two = segment_header(2).to_vec();
    record(&mut two, 4, 3, Kind::Data);
    std::fs::write(dir.join(format!("{:016x}.wal", 2)), &two).expect("segment 2");

    let v = rig.open("store", rig.opts("wal"));
    rig.note(0, 1, Block::Data(1));
    rig.note(1, 1, Block::Zero);
    rig.expect(&v, 0, 8);
    rig.expect_status(&v);
    // What replay kept reaches the store, and the volume goes on from there.
    rig.write(&v, 4, 1, 9, true);
    assert!(v.sync_to_store(DRAIN));
    let r = rig.store_only_after(v, "store", CacheSize::Default);
    rig.expect(&r, 0, 8);
}

#[test]
fn a_corrupt_chunk_is_named_with_its_cause_once() {
    let mut rig = Rig::new("corrupt", 1 << 20, 0);
    let v = rig.open("store", rig.opts("wal"));
    rig.write(&v, 0, 4, 1, false);
    v.shutdown();
    drop(v);
    // Without checkpoints, opening reads every chunk's header.
    let keys = Keys::new(NAME);
    std::fs::remove_dir_all(rig.path("store").join(keys.checkpoints())).expect("checkpoints");
    // The first chunk of the first writer generation.
    let key = keys.chunk(super::generation::base_id(1) + 1);
    let path = rig.path("store").join(&key);
    let mut chunk = std::fs::read(&path).expect("the first chunk");
    chunk[20] ^= 1;
    std::fs::write(&path, chunk).expect("damage the chunk");
    let e = ObjectVolume::open(rig.store("store"), NAME, rig.opts("wal2"))
        .err()
        .expect("a damaged chunk header stops the open");
    assert!(matches!(e, ObjectError::Corrupt { .. }), "{e:?}");
    assert_eq!(
        Chain(&e).to_string(),
        format!("object {key} is corrupt: chunk header: checksum mismatch")
    );
}

/// GETs and bytes the volume's store has served so far.
fn store_reads(v: &ObjectVolume) -> (u64, u64) {
    v.inner.store.reads()
}

#[test]
fn a_random_cold_read_is_one_ranged_get_of_its_block() {
    let mut rig = Rig::new("cold-random", 8 << 20, 1024);
    let v = rig.open("store", rig.opts("wal"));
    for b in (0..1024).step_by(64) {
        rig.write(&v, b, 64, 7, false);
    }
    let r = rig.store_only_after(v, "store", CacheSize::Default);
    // Blocks in the middle of chunks and at their edges, in no order.
    for block in [517, 33, 1000, 64, 255] {
        let before = store_reads(&r);
        let stats = (fetches(&r), r.stats().fetch_bytes.load(Ordering::Relaxed));
        rig.expect(&r, block, 1);
        let after = store_reads(&r);
        assert_eq!(
            (after.0 - before.0, after.1 - before.1),
            (1, B),
            "block {block}: one GET of one block"
        );
        assert_eq!(
            (
                fetches(&r) - stats.0,
                r.stats().fetch_bytes.load(Ordering::Relaxed) - stats.1
            ),
            (1, B),
            "block {block}: the volume's counters agree"
        );
    }
    // Read again: from the cache, no GET.
    let before = store_reads(&r);
    rig.expect(&r, 517, 1);
    assert_eq!(store_reads(&r), before);
    // Its neighbours were not fetched with it (516: 518 would continue
    // the last read, which starts read-ahead).
    rig.expect(&r, 516, 1);
    assert_eq!(store_reads(&r).0, before.0 + 1);
}

#[test]
fn sequential_cold_reads_cross_chunk_boundaries_with_read_ahead() {
    const BLOCKS: u64 = 2048;
    let mut rig = Rig::new("cold-seq", BLOCKS * B, BLOCKS);
    // Segments of 256 KiB: chunks of 56 blocks, so reads and read-ahead
    // windows cross chunk boundaries all the time.
    let opts = ObjectOptions {
        segment_size: 256 << 10,
        ..rig.opts("wal")
    };
    let v = rig.open("store", opts);
    for b in (0..BLOCKS).step_by(8) {
        rig.write(&v, b, 8, 3, false);
    }
    let r = rig.store_only_after(v, "store", CacheSize::Default);
    let chunks = r.inner.map.read_locked().chunks.len() as u64;
    assert!(chunks > 30, "{chunks} chunks");
    let requests = BLOCKS / 32;
    for b in (0..BLOCKS).step_by(32) {
        rig.expect(&r, b, 32);
    }
    // Read-ahead ran (fewer GETs than requests), and every block came from
    // the store exactly once: reads that found their blocks on the way
    // waited for them instead of fetching them again.
    let gets = fetches(&r);
    assert!(gets < requests, "{gets} GETs for {requests} requests");
    assert_eq!(r.stats().fetch_bytes.load(Ordering::Relaxed), BLOCKS * B);
    // A read may find its blocks cached a moment before their fetch lets
    // go of its claim.
    let deadline = std::time::Instant::now() + DRAIN;
    while r.inner.fill.in_flight() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "claims outlive their fetches"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // All of it is cached now.
    rig.expect(&r, 0, BLOCKS);
    assert_eq!(fetches(&r), gets);
}

#[test]
fn reads_wait_for_blocks_in_flight_and_fetch_what_was_abandoned() {
    use super::fill::{self, How, Run};
    let mut rig = Rig::new("in-flight", 1 << 20, 64);
    let v = rig.open("store", rig.opts("wal"));
    rig.write(&v, 0, 16, 5, false);
    let r = rig.store_only_after(v, "store", CacheSize::Default);
    let chunk = *r
        .inner
        .map
        .read_locked()
        .chunks
        .keys()
        .next()
        .expect("a chunk");
    let run = |block, blocks| Run {
        buf_block: 0,
        blocks,
        chunk,
        block,
    };
    let shape = |pieces: &[fill::Piece]| -> Vec<(u32, u32, bool)> {
        pieces
            .iter()
            .map(|p| (p.block, p.blocks, matches!(p.how, How::Wait(_))))
            .collect()
    };
    // A fetch of blocks 0..10 in pieces of 4 is in flight...
    let first = fill::claim(&r.inner, &[run(0, 10)], 4, true);
    assert_eq!(shape(&first), [(0, 4, false), (4, 4, false), (8, 2, false)]);
    assert_eq!(r.inner.fill.in_flight(), 3);
    // ...so a read of 6..12 waits for 6..8 and 8..10 and fetches 10..12.
    let second = fill::claim(&r.inner, &[run(6, 6)], u32::MAX, true);
    assert_eq!(shape(&second), [(6, 2, true), (8, 2, true), (10, 2, false)]);
    // Read-ahead skips what is on its way.
    let ahead = fill::claim(&r.inner, &[run(0, 12)], u32::MAX, false);
    assert!(ahead.is_empty(), "everything is in flight");
    // The first fetch is abandoned: its waiters fetch for themselves.
    drop(first);
    assert_eq!(r.inner.fill.in_flight(), 1);
    let got = runtime()
        .block_on(fill::fetch(r.inner.clone(), second, false))
        .expect("waiters fetch what was abandoned")
        .expect("the data, as asked");
    let want: Vec<u8> = (6..12).flat_map(|b| pattern(5, b)).collect();
    assert!(got == want, "blocks 6..12");
    assert_eq!(r.inner.fill.in_flight(), 0);
    // A read that only waits is told when its blocks are in the cache,
    // and reads them there: the fetch's bytes are not copied for it.
    let owner = fill::claim(&r.inner, &[run(12, 4)], u32::MAX, true);
    let waiter = fill::claim(&r.inner, &[run(12, 4)], u32::MAX, true);
    assert_eq!(shape(&waiter), [(12, 4, true)]);
    let waiting = runtime().spawn(fill::fetch(r.inner.clone(), waiter, true));
    let fetched = runtime()
        .block_on(fill::fetch(r.inner.clone(), owner, true))
        .expect("the owner fetches");
    let want: Vec<u8> = (12..16).flat_map(|b| pattern(5, b)).collect();
    assert!(
        fetched.is_some_and(|b| b == want),
        "the owner gets the data"
    );
    let told = runtime().block_on(waiting).expect("the waiter's task");
    assert!(
        matches!(told, Ok(None)),
        "the waiter is told to read the cache"
    );
    let gets = store_reads(&r).0;
    rig.expect(&r, 12, 4);
    assert_eq!(store_reads(&r).0, gets, "blocks 12..16 come from the cache");
}

/// Recovery reads the newest checkpoint and then only the chunks above
/// the one it is named after, so a checkpoint must hold every chunk up to
/// that one. One written while the uploader has a chunk on its way (its
/// id taken, its entries going into the map a batch at a time) waits for
/// it, and then holds all of it.
#[test]
fn a_checkpoint_waits_for_the_chunk_on_its_way_and_holds_all_of_it() {
    use super::format::decode_checkpoint;
    use super::layout::id_of;
    use super::upload::{PUBLISH_BATCH, write_checkpoint};
    let extents = 2 * PUBLISH_BATCH as u64 + 5;
    let mut rig = Rig::new("ckpt-in-flight", 4 << 20, 2 * extents + 2);
    let opts = ObjectOptions {
        segment_size: 4 << 20,
        checkpoint_every: u64::MAX,
        ..rig.opts("wal")
    };
    let v = rig.open("store", opts);
    // A first chunk, for a checkpoint to be named after.
    rig.write(&v, 0, 1, 1, false);
    v.wait_uploaded(v.cut(false)).expect("first upload");
    // The uploader will stop with the next chunk's id taken: this test
    // holds the lock its puts take.
    let order = runtime().block_on(v.inner.fence.put_order());
    // One index entry per write: more than two publishing batches.
    for i in 0..extents {
        rig.write(&v, 2 + 2 * i, 1, 2, false);
    }
    v.cut(false);
    let deadline = std::time::Instant::now() + DRAIN;
    while v.inner.publishing.try_lock().is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the uploader never started"
        );
        v.inner.wal.kick();
        v.inner.upload_wake.notify_one();
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::scope(|s| {
        let ckpt = s.spawn(|| runtime().block_on(write_checkpoint(&v.inner)));
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !ckpt.is_finished(),
            "a checkpoint was written while a chunk was on its way"
        );
        drop(order);
        ckpt.join()
            .expect("checkpoint thread")
            .unwrap_or_else(|e| panic!("checkpoint: {}", Chain(&e)));
    });
    let store = rig.store("store");
    let keys = Keys::new(NAME);
    let newest = |prefix: String| {
        runtime()
            .block_on(store.list(&prefix))
            .expect("list")
            .iter()
            .filter_map(|(k, _)| id_of(k))
            .max()
            .expect("an object")
    };
    let chunk = newest(keys.chunks());
    let id = newest(keys.checkpoints());
    assert_eq!(id, chunk, "the checkpoint is named after the newest chunk");
    let body = runtime()
        .block_on(store.get(&keys.checkpoint(id)))
        .expect("read the checkpoint");
    let c = decode_checkpoint(&body).expect("decode the checkpoint");
    for i in 0..extents {
        let lba = 2 + 2 * i;
        assert!(
            c.entries
                .iter()
                .any(|e| e.chunk == chunk && e.lba <= lba && lba < e.lba + u64::from(e.blocks)),
            "block {lba} is not in the checkpoint"
        );
    }
    let r = rig.store_only_after(v, "store", CacheSize::Default);
    rig.expect(&r, 0, 2 * extents + 2);
}

/// Garbage collection's and flatten's chunks (`ingest::put_chunk`) wait
/// for a checkpoint copying the map, and a checkpoint waits for them, as
/// the uploader's do: a checkpoint named after a newer chunk without an
/// older one would hide it from recovery.
#[test]
fn chunks_put_beside_the_uploader_are_never_missing_from_a_checkpoint() {
    use super::ingest::{Packer, put_chunk};
    let mut rig = Rig::new("ingest-publishing", 4 << 20, 16);
    let v = rig.open("store", rig.opts("wal"));
    rig.write(&v, 0, 1, 1, false);
    v.wait_uploaded(v.cut(false)).expect("first upload");
    let chunks = || v.inner.map.read_locked().chunks.len();
    let before = chunks();
    let mut pack = Packer::default();
    pack.data(8, u64::MAX / 2, &pattern(7, 8));
    let (entries, data) = pack.take();
    let held = runtime().block_on(v.inner.publishing.lock());
    std::thread::scope(|s| {
        let put = s.spawn(|| runtime().block_on(put_chunk(&v.inner, &entries, &data)));
        std::thread::sleep(Duration::from_millis(300));
        assert!(!put.is_finished(), "put_chunk went ahead of a checkpoint");
        assert_eq!(chunks(), before, "the chunk reached the map meanwhile");
        drop(held);
        put.join()
            .expect("put thread")
            .unwrap_or_else(|e| panic!("put_chunk: {}", Chain(&e)));
    });
    assert_eq!(chunks(), before + 1);
    rig.note(8, 1, Block::Data(7));
    rig.expect(&v, 0, 16);
}

#[test]
fn garbage_collection_fetches_a_fragmented_chunk_in_one_get() {
    use super::upload::{GRACE, delete_doomed, rewrite};
    const N: u64 = 48;
    let mut rig = Rig::new("gc-spans", 1 << 20, N);
    let opts = ObjectOptions {
        segment_size: 256 << 10,
        ..rig.opts("wal")
    };
    let v = rig.open("store", opts.clone());
    // One record per block, all in one segment: a chunk of N entries.
    for b in 0..N {
        rig.write(&v, b, 1, 1, false);
    }
    assert!(v.sync_to_store(DRAIN));
    // Every other block written again: the chunk keeps N/2 live one-block
    // entries, each between two dead blocks.
    for b in (1..N).step_by(2) {
        rig.write(&v, b, 1, 2, false);
    }
    assert!(v.sync_to_store(DRAIN));
    v.shutdown();
    drop(v);
    // A writer with a cold cache, but for two live blocks read since.
    let v = rig.open("store", opts);
    rig.expect(&v, 10, 1);
    rig.expect(&v, 30, 1);
    let (victim, info) = {
        let m = v.inner.map.read_locked();
        let (&id, &c) = m.chunks.iter().next().expect("the first chunk");
        (id, c)
    };
    assert_eq!(
        (info.data_blocks, info.live),
        (N as u32, N / 2),
        "chunk {victim} is half garbage"
    );
    let before = store_reads(&v);
    runtime()
        .block_on(rewrite(&v.inner, victim, info))
        .unwrap_or_else(|e| panic!("rewrite: {}", Chain(&e)));
    let after = store_reads(&v);
    // The header, the index, and one span over the 22 uncached live
    // blocks (0 to 46, the two cached ones among them), not a GET each.
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (3, info.data_start + (N - 1) * B),
        "GETs and bytes of the rewrite"
    );
    assert!(!v.inner.map.read_locked().chunks.contains_key(&victim));
    rig.expect(&v, 0, N);
    // Without the victim, the store alone holds every block.
    let past = std::time::Instant::now()
        .checked_sub(GRACE)
        .expect("a past instant");
    runtime().block_on(delete_doomed(&v.inner, &mut vec![(victim, past)]));
    let r = rig.store_only_after(v, "store", CacheSize::Bytes(0));
    rig.expect(&r, 0, N);
    let live = r
        .inner
        .map
        .read_locked()
        .chunks
        .get(&victim)
        .map(|c| c.live);
    assert!(matches!(live, None | Some(0)), "chunk {victim}: {live:?}");
}
