//! Snapshots, clones, flatten, resize, garbage collection and raw
//! import/export, driven through real `ObjectVolume`s on a local-directory
//! store in a scratch directory; every check reads data back.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use super::format::BLOCK;
use super::transfer::Quiet;
use super::{ObjectError, ObjectOptions, ObjectVolume, admin, clone, snapshot};
use crate::objstore::Store;
use crate::runtime::runtime;
use crate::volume::sync::SyncDriver;
use crate::volume::{IoFlags, Op, Volume};

const B: u64 = BLOCK as u64;

struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("vbd-lifecycle-unit-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        Scratch(dir)
    }

    fn store(&self) -> Store {
        Store::open(&format!("file://{}", self.0.join("store").display())).expect("store")
    }

    fn opts(&self) -> ObjectOptions {
        ObjectOptions {
            wal_root: self.0.join("wal"),
            ..ObjectOptions::default()
        }
    }

    fn open(&self, name: &str) -> ObjectVolume {
        ObjectVolume::open(self.store(), name, self.opts()).expect("open")
    }

    fn open_ro(&self, name: &str) -> ObjectVolume {
        let opts = ObjectOptions {
            read_only: true,
            ..self.opts()
        };
        ObjectVolume::open(self.store(), name, opts).expect("open read-only")
    }

    fn create(&self, name: &str, size: u64) {
        runtime()
            .block_on(admin::create(&self.store(), name, size))
            .expect("create");
    }

    fn stored_bytes(&self) -> u64 {
        runtime()
            .block_on(self.store().list("volumes"))
            .unwrap()
            .iter()
            .filter(|(k, _)| k.contains("/chunks/"))
            .map(|(_, s)| s)
            .sum()
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

/// A block that says who wrote it: never zero, different per (tag, block).
fn block(tag: u8, lba: u64) -> Vec<u8> {
    let mut b = vec![tag; BLOCK];
    b[..8].copy_from_slice(&lba.to_le_bytes());
    b
}

fn write(v: &ObjectVolume, lba: u64, tag: u8) {
    let mut d = SyncDriver::new().unwrap();
    d.write(v, lba * B, &block(tag, lba), false).unwrap();
}

fn flush(v: &ObjectVolume) {
    let mut d = SyncDriver::new().unwrap();
    d.op(v, Op::Flush, 0, 0, IoFlags::default()).unwrap();
}

/// Which tag each of the first `n` blocks holds (0 for zeroes).
fn tags(v: &ObjectVolume, n: u64) -> Vec<u8> {
    let mut d = SyncDriver::new().unwrap();
    let data = d.read(v, 0, (n * B) as usize).unwrap();
    data.chunks(BLOCK)
        .enumerate()
        .map(|(i, b)| {
            if b.iter().all(|&x| x == 0) {
                0
            } else {
                assert_eq!(b, block(b[8], i as u64).as_slice(), "block {i} is torn");
                b[8]
            }
        })
        .collect()
}

#[test]
fn snapshots_freeze_the_map_and_pin_their_chunks() {
    let s = Scratch::new("snap");
    s.create("v", 64 * B);
    let v = s.open("v");
    for lba in 0..16 {
        write(&v, lba, 1);
    }
    // Unflushed and not uploaded: the snapshot drains the WAL into it.
    let meta = v.snapshot("one").unwrap();
    assert_eq!(meta.size, 64 * B);
    for lba in 0..16 {
        write(&v, lba, 2);
    }
    flush(&v);
    assert!(v.sync_to_store(std::time::Duration::from_secs(30)));
    // Everything "one" held is now garbage to the volume's own map.
    assert_eq!(v.collect_garbage(true).unwrap(), 0, "pinned chunks stay");
    let e = v.snapshot("one").unwrap_err();
    assert!(matches!(e, ObjectError::SnapshotExists { .. }), "{e}");
    assert!(matches!(
        v.snapshot("a/b").unwrap_err(),
        ObjectError::BadSnapshotName(_)
    ));
    let snap = s.open_ro("v@one");
    assert_eq!(snap.size(), 64 * B);
    assert!(snap.caps().read_only);
    assert_eq!(tags(&snap, 17), [[1u8; 16].as_slice(), &[0]].concat());
    assert_eq!(tags(&v, 16), vec![2; 16]);
    let list = runtime().block_on(snapshot::list(&s.store(), "v")).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(
        list[0].exclusive_bytes,
        16 * B,
        "all of one's blocks are its own"
    );
    drop(snap);
    v.delete_snapshot("one").unwrap();
    let before = s.stored_bytes();
    assert!(v.collect_garbage(true).unwrap() > 0);
    assert!(s.stored_bytes() < before, "unpinned garbage went");
    assert_eq!(tags(&v, 16), vec![2; 16]);
    v.close();
}

#[test]
fn clones_read_through_write_apart_and_refuse_to_orphan() {
    let s = Scratch::new("clone");
    let store = s.store();
    s.create("base", 32 * B);
    let base = s.open("base");
    for lba in 0..8 {
        write(&base, lba, 1);
    }
    base.snapshot("gold").unwrap();
    write(&base, 0, 9);
    flush(&base);
    let rt = runtime();
    rt.block_on(clone::create(&store, "base", "gold", "a"))
        .unwrap();
    rt.block_on(clone::create(&store, "base", "gold", "b"))
        .unwrap();
    let e = rt
        .block_on(clone::create(&store, "base", "gold", "a"))
        .unwrap_err();
    assert!(matches!(e, ObjectError::Exists(_)), "{e}");
    let e = rt
        .block_on(clone::create(&store, "base", "nope", "c"))
        .unwrap_err();
    assert!(matches!(e, ObjectError::NoSuchSnapshot { .. }), "{e}");
    let a = s.open("a");
    let b = s.open("b");
    write(&a, 1, 2);
    write(&b, 2, 3);
    write(&a, 20, 2);
    let gold: Vec<u8> = [[1u8; 8].as_slice(), &[0; 24]].concat();
    let mut want_a = gold.clone();
    want_a[1] = 2;
    want_a[20] = 2;
    let mut want_b = gold.clone();
    want_b[2] = 3;
    assert_eq!(tags(&a, 32), want_a);
    assert_eq!(tags(&b, 32), want_b);
    let mut want_base = gold.clone();
    want_base[0] = 9;
    assert_eq!(tags(&base, 32), want_base);
    let snap = s.open_ro("base@gold");
    assert_eq!(tags(&snap, 32), gold);
    drop(snap);
    // Reopened, a clone finds its parent's map again.
    a.close();
    drop(a);
    let a = s.open("a");
    assert_eq!(tags(&a, 32), want_a);
    // Neither the snapshot nor the volume can go while clones need them.
    let e = rt
        .block_on(snapshot::delete(&store, "base", "gold", 0))
        .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("clone a") && msg.contains("clone b"), "{msg}");
    base.close();
    drop(base);
    let e = rt
        .block_on(admin::delete(&store, "base", false))
        .unwrap_err();
    assert!(matches!(e, ObjectError::HasDependents { .. }), "{e}");
    // Flatten a, delete b: then base and its snapshot may go.
    assert_eq!(
        a.flatten().unwrap(),
        7 * B,
        "blocks 0 and 2..8 came from gold"
    );
    assert_eq!(tags(&a, 32), want_a);
    b.close();
    drop(b);
    rt.block_on(admin::delete(&store, "b", false)).unwrap();
    rt.block_on(admin::delete(&store, "base", false)).unwrap();
    assert_eq!(tags(&a, 32), want_a, "flattened: needs nothing of base");
    a.close();
    drop(a);
    let a = s.open("a");
    assert_eq!(tags(&a, 32), want_a);
    let info = rt.block_on(admin::info(&store, "a")).unwrap();
    assert_eq!((info.parent, info.shared_bytes), (None, 0));
    assert_eq!(info.origin.as_deref(), Some("base@gold"));
    a.close();
}

#[test]
fn flatten_fetches_a_fragmented_parent_chunk_in_few_gets() {
    let s = Scratch::new("flatten-gets");
    let store = s.store();
    s.create("base", 64 * B);
    let base = s.open("base");
    for lba in 0..64 {
        write(&base, lba, 1);
    }
    base.snapshot("gold").unwrap();
    let rt = runtime();
    rt.block_on(clone::create(&store, "base", "gold", "c"))
        .unwrap();
    let c = s.open("c");
    // Every other block rewritten: the clone reads 32 one-block pieces of
    // the parent's chunk.
    for lba in (1..64).step_by(2) {
        write(&c, lba, 2);
    }
    // In the clone's own chunks, so that its map no longer reads them
    // from the parent.
    assert!(c.sync_to_store(std::time::Duration::from_secs(30)));
    let want: Vec<u8> = (0..64)
        .map(|lba| if lba % 2 == 1 { 2 } else { 1 })
        .collect();
    let (gets, _) = c.inner.store.reads();
    assert_eq!(c.flatten().unwrap(), 32 * B);
    let (after, _) = c.inner.store.reads();
    // The lineage record and the pieces, which lie a block apart in one
    // or two chunks: a handful of GETs, where a GET per piece made 33.
    assert!(after - gets <= 4, "{} GETs", after - gets);
    assert_eq!(tags(&c, 64), want);
    // It stands alone: the parent can go, and a reopen reads the copies.
    base.close();
    drop(base);
    rt.block_on(snapshot::delete(&store, "base", "gold", 0))
        .unwrap();
    rt.block_on(admin::delete(&store, "base", false)).unwrap();
    c.close();
    drop(c);
    let c = s.open("c");
    assert_eq!(tags(&c, 64), want);
    c.close();
}

#[test]
fn sixteen_deep_chains_read_every_level() {
    let s = Scratch::new("chain");
    let store = s.store();
    let depth = 17u8;
    s.create("l0", 32 * B);
    let mut want = vec![0u8; 32];
    for level in 0..depth {
        let name = format!("l{level}");
        let v = s.open(&name);
        // Each level overwrites one block of its own and keeps the rest.
        write(&v, u64::from(level), level + 1);
        want[level as usize] = level + 1;
        assert_eq!(tags(&v, 32), want, "level {level}");
        v.snapshot("s").unwrap();
        v.close();
        drop(v);
        runtime()
            .block_on(clone::create(
                &store,
                &name,
                "s",
                &format!("l{}", level + 1),
            ))
            .unwrap();
    }
    let last = s.open(&format!("l{depth}"));
    assert_eq!(tags(&last, 32), want);
    let info = runtime()
        .block_on(admin::info(&store, &format!("l{depth}")))
        .unwrap();
    assert_eq!(info.ancestors.len(), depth as usize);
    assert_eq!(info.own_bytes, 0);
    assert_eq!(info.shared_bytes, u64::from(depth) * B);
    last.close();
}

#[test]
fn resize_grows_and_shrinks_with_permission() {
    let s = Scratch::new("resize");
    s.create("v", 8 * B);
    let v = s.open("v");
    for lba in 0..8 {
        write(&v, lba, 4);
    }
    assert_eq!(v.resize(16 * B, false).unwrap(), 8 * B);
    assert_eq!(v.size(), 16 * B);
    write(&v, 15, 5);
    let e = v.resize(4 * B, false).unwrap_err();
    assert!(matches!(e, ObjectError::Shrink { .. }), "{e}");
    assert!(matches!(v.resize(1000, true), Err(ObjectError::BadSize(_))));
    v.resize(4 * B, true).unwrap();
    let mut d = SyncDriver::new().unwrap();
    assert!(d.read(&v, 4 * B, BLOCK).is_err(), "past the new end");
    v.resize(16 * B, false).unwrap();
    let mut want = vec![0u8; 16];
    want[..4].fill(4);
    assert_eq!(tags(&v, 16), want, "the shrunk tail reads as zeroes");
    v.close();
    drop(v);
    let v = s.open("v");
    assert_eq!((v.size(), tags(&v, 16)), (16 * B, want));
    v.close();
}

#[test]
fn raw_import_skips_zeroes_and_export_is_sparse() {
    let s = Scratch::new("transfer");
    let src = s.0.join("src.raw");
    // 6 MiB + a partial block: data, written zeroes, a hole, data.
    let mut img = vec![0u8; (6 << 20) + 100];
    for (i, b) in img[..(2 << 20)].iter_mut().enumerate() {
        *b = (i % 251) as u8 + 1;
    }
    let tail = img.len() - 5000;
    img[tail..].fill(7);
    std::fs::write(&src, &img).unwrap();
    let size = (img.len() as u64).next_multiple_of(B);
    let store = s.store();
    runtime()
        .block_on(super::transfer::begin_import(
            &store, "img", size, "src.raw",
        ))
        .unwrap();
    let url = format!("file://{}", s.0.join("store").display());
    let e = admin::open_url(&url, "img", None, s.opts()).err().unwrap();
    assert!(matches!(e, ObjectError::Unfinished(_)), "{e}");
    let v = s.open("img");
    let stats = v.import_raw(&src, &Quiet, &AtomicBool::new(false)).unwrap();
    assert_eq!(
        stats.data_bytes,
        (2 << 20) + 3 * B,
        "zero blocks are not stored"
    );
    v.close();
    drop(v);
    runtime()
        .block_on(super::transfer::finish_import(&store, "img"))
        .unwrap();
    assert!(admin::open_url(&url, "img", None, s.opts()).is_ok());
    let v = s.open_ro("img");
    let mut d = SyncDriver::new().unwrap();
    let back = d.read(&v, 0, size as usize).unwrap();
    assert_eq!(&back[..img.len()], img.as_slice());
    let out = s.0.join("out.raw");
    let stats = v.export_raw(&out, &Quiet, &AtomicBool::new(false)).unwrap();
    assert_eq!(stats.data_bytes, (2 << 20) + 3 * B);
    let got = std::fs::read(&out).unwrap();
    assert_eq!(&got[..img.len()], img.as_slice());
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&out).unwrap().blocks() * 512;
    assert!(
        allocated < 3 << 20,
        "export is sparse: {allocated} bytes allocated"
    );
}
