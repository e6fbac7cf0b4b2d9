//! Volumes that move between writers, driven through the real
//! `ObjectVolume` on a local-directory store: generations taken by racing
//! writers, a writer fenced by a take-over (its writes fail, its late
//! uploads never count and are collected), a clean release, FLUSH under
//! durability=store, and a WAL left by a generation that was taken over.
//! The two-process versions, over every kind of store, are in
//! tests/it/handoff.rs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::format::BLOCK;
use super::generation::{self, TakeOptions, generation_of};
use super::layout::{Keys, id_of};
use super::{CloseOutcome, Durability, ObjectError, ObjectOptions, ObjectVolume, admin};
use crate::error::Chain;
use crate::objstore::{Faults, Store};
use crate::runtime::runtime;
use crate::volume::sync::SyncDriver;
use crate::volume::{IoFlags, Op, VolumeError};

const NAME: &str = "h";
const B: u64 = BLOCK as u64;

/// A scratch directory holding one store and any number of WAL roots.
struct Site(PathBuf);

impl Site {
    fn new(tag: &str) -> Site {
        let dir =
            std::env::temp_dir().join(format!("vbd-handoff-unit-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        let site = Site(dir);
        runtime()
            .block_on(admin::create(&site.store(), NAME, 4 << 20))
            .expect("create the volume");
        site
    }

    fn url(&self) -> String {
        format!("file://{}", self.0.join("store").display())
    }

    fn store(&self) -> Store {
        Store::open(&self.url()).expect("open the store")
    }

    /// Options for a writer whose WAL root is `wal` ("host" `wal`).
    fn opts(&self, wal: &str) -> ObjectOptions {
        ObjectOptions {
            wal_root: self.0.join(wal),
            gc_threshold: 0.0,
            drain_timeout: Duration::from_secs(30),
            ..ObjectOptions::default()
        }
    }

    fn open(&self, opts: ObjectOptions) -> ObjectVolume {
        ObjectVolume::open(self.store(), NAME, opts)
            .unwrap_or_else(|e| panic!("open: {}", Chain(&e)))
    }

    /// Chunk and checkpoint ids in the store.
    fn object_ids(&self) -> Vec<u64> {
        let keys = Keys::new(NAME);
        let store = self.store();
        let mut ids = Vec::new();
        for prefix in [keys.chunks(), keys.checkpoints()] {
            for (k, _) in runtime().block_on(store.list(&prefix)).expect("list") {
                ids.extend(id_of(&k));
            }
        }
        ids
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for inspection", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn block(tag: u8) -> Vec<u8> {
    vec![tag; BLOCK]
}

fn flush(d: &mut SyncDriver, v: &ObjectVolume) -> Result<(), VolumeError> {
    d.op(v, Op::Flush, 0, 0, IoFlags::default()).map(|_| ())
}

fn read_tag(d: &mut SyncDriver, v: &ObjectVolume, blk: u64) -> u8 {
    let b = d
        .read(v, blk * B, BLOCK)
        .unwrap_or_else(|e| panic!("read {blk}: {}", Chain(&e)));
    assert!(b.iter().all(|&x| x == b[0]), "block {blk} is torn");
    b[0]
}

#[test]
fn racing_writers_take_one_generation_each() {
    let site = Site::new("race");
    for take_over in [false, true] {
        let results: Vec<Result<u64, ObjectError>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|i| {
                    let store = site.store();
                    s.spawn(move || {
                        let opts = TakeOptions {
                            take_over,
                            durability: Durability::Local,
                            wal_dir: format!("/nowhere/{i}"),
                        };
                        runtime()
                            .block_on(generation::take(&store, NAME, &opts))
                            .map(|t| t.generation)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("taker")).collect()
        });
        let mut won: Vec<u64> = results
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .copied()
            .collect();
        for r in &results {
            if let Err(e) = r {
                assert!(matches!(e, ObjectError::Locked { .. }), "{}", Chain(e));
            }
        }
        won.sort_unstable();
        let n = won.len();
        won.dedup();
        assert_eq!(won.len(), n, "two writers got one generation: {won:?}");
        if !take_over {
            // The first round: nobody held the volume, one may take it.
            assert_eq!(n, 1, "exactly one writer wins: {results:?}");
        }
    }
}

#[test]
fn a_fenced_writer_fails_and_its_late_uploads_never_count() {
    let site = Site::new("fence");
    let mut d = SyncDriver::new().expect("driver");
    let store_mode = |wal: &str| ObjectOptions {
        durability: Durability::Store,
        ..site.opts(wal)
    };
    let a = site.open(store_mode("a"));
    for blk in 0..4 {
        d.write(&a, blk * B, &block(1), false).expect("write");
    }
    flush(&mut d, &a).expect("A's flush before the take-over");
    // B takes the volume over while A still runs.
    let b = site.open(ObjectOptions {
        take_over: true,
        ..store_mode("b")
    });
    assert_eq!(b.handover(), Some("take-over"));
    assert!(b.generation() > a.generation());
    let loss = b
        .loss_report()
        .expect("a take-over reports what may be lost");
    assert!(loss.contains("durability=store"), "{loss}");
    // A does not know yet: its next FLUSH uploads, finds itself fenced and fails.
    d.write(&a, 10 * B, &block(2), false)
        .expect("an unflushed write is still taken");
    let e = flush(&mut d, &a).expect_err("a fenced writer's FLUSH must fail");
    assert_eq!(e.errno(), libc::EIO, "{}", Chain(&e));
    assert!(Chain(&e).to_string().contains("fenced"), "{}", Chain(&e));
    assert_eq!(a.fenced_by(), Some(b.generation()));
    let e = d
        .write(&a, 11 * B, &block(3), false)
        .expect_err("and every later write");
    assert!(Chain(&e).to_string().contains("fenced"), "{}", Chain(&e));
    // A's late chunk reached the store, above its fence.
    let late: Vec<u64> = site
        .object_ids()
        .into_iter()
        .filter(|&id| generation_of(id) == a.generation())
        .collect();
    assert!(!late.is_empty(), "A uploaded its chunks");
    // B sees what A flushed before the fence, never what came after.
    for blk in 0..4 {
        assert_eq!(read_tag(&mut d, &b, blk), 1, "block {blk}");
    }
    assert_eq!(read_tag(&mut d, &b, 10), 0, "A's post-fence write");
    d.write(&b, 0, &block(7), false).expect("B writes");
    flush(&mut d, &b).expect("B flushes");
    assert_eq!(
        a.release(),
        CloseOutcome::Fenced {
            generation: a.generation(),
            by: b.generation()
        }
    );
    // A fenced writer deletes nothing: its WAL keeps what it acknowledged.
    assert!(matches!(b.release(), CloseOutcome::Released { .. }));
    // B collected A's leftovers (its background scan may already have, or
    // its close did) and nothing that counts.
    let after = site.object_ids();
    let fences = runtime()
        .block_on(generation::read_fences(&site.store(), &Keys::new(NAME)))
        .expect("fences");
    assert!(
        after.iter().all(|&id| fences.counts(id)),
        "no fenced object is left: {after:x?}"
    );
    // Not vacuous: A did put a chunk above its fence.
    assert!(
        late.iter().any(|&id| !fences.counts(id)),
        "A's objects {late:x?} include one above its fence"
    );
    let c = site.open(ObjectOptions {
        read_only: true,
        ..site.opts("c")
    });
    assert_eq!(read_tag(&mut d, &c, 0), 7);
    for blk in 1..4 {
        assert_eq!(read_tag(&mut d, &c, blk), 1, "block {blk}");
    }
    assert_eq!(read_tag(&mut d, &c, 10), 0);
}

#[test]
fn a_clean_release_leaves_nothing_to_recover() {
    let site = Site::new("release");
    let mut d = SyncDriver::new().expect("driver");
    let a = site.open(site.opts("a"));
    d.write(&a, 5 * B, &block(9), false).expect("write");
    flush(&mut d, &a).expect("flush");
    assert!(matches!(a.release(), CloseOutcome::Released { .. }));
    let e = d
        .write(&a, 0, &block(1), false)
        .expect_err("a released volume takes no writes");
    assert_eq!(e.errno(), libc::ESHUTDOWN);
    let info = runtime()
        .block_on(admin::info(&site.store(), NAME))
        .expect("info");
    assert!(info.released && info.locked_by.is_none(), "{info:?}");
    let b = site.open(site.opts("b"));
    assert_eq!(b.handover(), Some("released"));
    assert!(b.loss_report().is_none());
    assert_eq!(read_tag(&mut d, &b, 5), 9);
}

#[test]
fn flush_under_store_durability_means_in_the_store() {
    let site = Site::new("store-flush");
    let mut d = SyncDriver::new().expect("driver");
    let a = site.open(ObjectOptions {
        durability: Durability::Store,
        ..site.opts("a")
    });
    for round in 1..=5u8 {
        d.write(&a, u64::from(round) * B, &block(round), round % 2 == 0)
            .expect("write");
        if round % 2 == 1 {
            flush(&mut d, &a).expect("flush");
        }
        // What the store alone holds, through a reader with no WAL.
        let r = site.open(ObjectOptions {
            read_only: true,
            ..site.opts("reader")
        });
        for blk in 1..=u64::from(round) {
            assert_eq!(read_tag(&mut d, &r, blk), blk as u8, "round {round}");
        }
    }
}

/// A store-durable FLUSH waits for a chunk the uploader publishes in
/// several batches (see `upload::publish`), and completes with all of it
/// in the store and out of the write-ahead layer; blocks a later segment
/// overwrote read as the later write, from the writer and from the store.
#[test]
fn a_store_durable_flush_covers_a_chunk_published_in_batches() {
    let site = Site::new("store-batches");
    let mut d = SyncDriver::new().expect("driver");
    let a = site.open(ObjectOptions {
        durability: Durability::Store,
        ..site.opts("a")
    });
    // One index entry per write: more than two publishing batches.
    let n = 2 * super::upload::PUBLISH_BATCH as u64 + 5;
    for i in 0..n {
        d.write(&a, 2 * i * B, &block(1), false).expect("write");
    }
    flush(&mut d, &a).expect("flush");
    assert!(
        a.inner.dirty_filter.clean(0, 2 * n),
        "flushed blocks still counted in the write-ahead layer"
    );
    for i in (0..n).step_by(3) {
        d.write(&a, 2 * i * B, &block(2), false).expect("overwrite");
    }
    flush(&mut d, &a).expect("flush");
    let r = site.open(ObjectOptions {
        read_only: true,
        ..site.opts("reader")
    });
    for i in 0..n {
        let want = if i % 3 == 0 { 2 } else { 1 };
        assert_eq!(read_tag(&mut d, &a, 2 * i), want, "writer, block {}", 2 * i);
        assert_eq!(read_tag(&mut d, &r, 2 * i), want, "store, block {}", 2 * i);
        assert_eq!(
            read_tag(&mut d, &r, 2 * i + 1),
            0,
            "store, block {}",
            2 * i + 1
        );
    }
}

#[test]
fn a_wal_from_a_generation_taken_over_is_set_aside() {
    let site = Site::new("old-wal");
    let mut d = SyncDriver::new().expect("driver");
    // Host X: three flushed writes that never reach the store.
    let faults = Arc::new(Faults::new(0.0, 1));
    let x = ObjectVolume::open(
        site.store().with_faults(faults.clone()),
        NAME,
        site.opts("x"),
    )
    .expect("open on X");
    faults.set_rate(1.0);
    for blk in 0..3 {
        d.write(&x, blk * B, &block(5), false).expect("write on X");
    }
    flush(&mut d, &x).expect("local flush on X");
    drop(x); // X is lost, as if its power went.
    // Host Y takes over and writes less than X did.
    let y = site.open(ObjectOptions {
        take_over: true,
        ..site.opts("y")
    });
    d.write(&y, 7 * B, &block(6), false).expect("write on Y");
    assert!(matches!(y.release(), CloseOutcome::Released { .. }));
    // X comes back: its WAL belongs to a generation the volume left behind.
    let deadline = Instant::now() + Duration::from_secs(10);
    let x = loop {
        match ObjectVolume::open(site.store(), NAME, site.opts("x")) {
            Ok(v) => break v,
            // The dropped volume's flock goes with its last thread.
            Err(ObjectError::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("reopen on X: {}", Chain(&e)),
        }
    };
    for blk in 0..3 {
        assert_eq!(
            read_tag(&mut d, &x, blk),
            0,
            "X's stale record {blk} came back"
        );
    }
    assert_eq!(read_tag(&mut d, &x, 7), 6);
    let wal = super::layout::wal_dir(&site.0.join("x"), &site.url(), NAME);
    let aside = std::fs::read_dir(&wal)
        .expect("WAL directory")
        .filter_map(|e| e.ok())
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("fenced-generation-")
        })
        .expect("the old records are kept aside");
    assert!(
        std::fs::read_dir(aside.path()).expect("aside").count() > 0,
        "with the segment in it"
    );
    let _ = x.release();
}

// Lifecycle operations (snapshots, clones, flatten, resize, garbage
// collection) across a take-over.

/// Opens `name` on `site` with `opts`.
fn open_named(site: &Site, name: &str, opts: ObjectOptions) -> ObjectVolume {
    ObjectVolume::open(site.store(), name, opts)
        .unwrap_or_else(|e| panic!("open {name}: {}", Chain(&e)))
}

fn take_over(opts: ObjectOptions) -> ObjectOptions {
    ObjectOptions {
        take_over: true,
        ..opts
    }
}

fn read_only(opts: ObjectOptions) -> ObjectOptions {
    ObjectOptions {
        read_only: true,
        ..opts
    }
}

/// A take-over of `name` that opens nothing (so no holder's garbage
/// collection races the checks): the new generation and its fence.
fn bare_take_over(site: &Site, name: &str) -> u64 {
    let opts = TakeOptions {
        take_over: true,
        durability: Durability::Local,
        wal_dir: "/nowhere".into(),
    };
    runtime()
        .block_on(generation::take(&site.store(), name, &opts))
        .unwrap_or_else(|e| panic!("take-over: {}", Chain(&e)))
        .generation
}

fn assert_fenced(r: Result<impl std::fmt::Debug, ObjectError>, what: &str) {
    match r {
        Err(ObjectError::Fenced { .. }) => {}
        other => panic!("{what} by a fenced writer: {other:?}"),
    }
}

/// Every snapshot object of `NAME` in the store, counted or not.
fn snapshot_objects(site: &Site) -> Vec<String> {
    let prefix = format!("{}/snapshots", Keys::new(NAME).root());
    runtime()
        .block_on(site.store().list(&prefix))
        .expect("list")
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

#[test]
fn a_snapshot_and_the_clone_reading_through_it_survive_a_take_over_and_its_gc() {
    let site = Site::new("snap-take");
    let mut d = SyncDriver::new().expect("driver");
    let a = site.open(site.opts("a"));
    for blk in 0..8 {
        d.write(&a, blk * B, &block(1), false).expect("write");
    }
    a.snapshot("s1").expect("snapshot on A");
    // A overwrites everything: s1's chunks are garbage to the volume's map.
    for blk in 0..8 {
        d.write(&a, blk * B, &block(2), false).expect("overwrite");
    }
    flush(&mut d, &a).expect("flush");
    assert!(a.sync_to_store(Duration::from_secs(30)));
    runtime()
        .block_on(super::clone::create(&site.store(), NAME, "s1", "c"))
        .expect("clone of h@s1");
    // B takes the volume over from A, which never released it.
    let b = site.open(take_over(site.opts("b")));
    assert_eq!(b.handover(), Some("take-over"));
    let names = runtime()
        .block_on(super::snapshot::names(&site.store(), NAME))
        .expect("names");
    assert_eq!(names, ["s1"], "the snapshot A took before the fence counts");
    // B collects all it may: s1 pins its chunks, and the clone reads them.
    b.collect_garbage(true).expect("gc on B");
    for blk in 0..8 {
        assert_eq!(read_tag(&mut d, &b, blk), 2, "B's view of block {blk}");
    }
    let snap = open_named(&site, &format!("{NAME}@s1"), read_only(site.opts("r")));
    let clone = open_named(&site, "c", site.opts("c"));
    for blk in 0..8 {
        assert_eq!(read_tag(&mut d, &snap, blk), 1, "h@s1 block {blk}");
        assert_eq!(read_tag(&mut d, &clone, blk), 1, "clone block {blk}");
    }
    assert!(matches!(b.release(), CloseOutcome::Released { .. }));
    drop(snap);
    assert!(matches!(clone.release(), CloseOutcome::Released { .. }));
    // After B's close (and its collection of fenced leftovers) too, with
    // an empty cache.
    let clone = open_named(&site, "c", read_only(site.opts("r2")));
    for blk in 0..8 {
        assert_eq!(read_tag(&mut d, &clone, blk), 1, "clone block {blk}");
    }
    assert!(matches!(a.release(), CloseOutcome::Fenced { .. }));
}

#[test]
fn a_fenced_writer_cannot_snapshot_resize_or_collect_and_its_late_objects_never_count() {
    let site = Site::new("fenced-admin");
    let mut d = SyncDriver::new().expect("driver");
    let a = site.open(site.opts("a"));
    d.write(&a, 0, &block(1), false).expect("write");
    a.snapshot("before").expect("snapshot before the fence");
    let g = bare_take_over(&site, NAME);
    // A does not know yet: its resize record lands, then it finds itself
    // fenced. The record does not count.
    assert_fenced(a.resize(8 << 20, false), "a resize");
    assert_eq!(a.fenced_by(), Some(g));
    let size = |site: &Site| {
        runtime()
            .block_on(super::layout::read_descriptor(&site.store(), NAME))
            .expect("descriptor")
            .size
    };
    let records = |site: &Site| {
        runtime()
            .block_on(site.store().list(&Keys::new(NAME).sizes()))
            .expect("list")
            .len()
    };
    assert_eq!(records(&site), 1, "A's record landed");
    assert_eq!(
        size(&site),
        4 << 20,
        "a fenced writer's resize does not count"
    );
    // Now that it knows, everything else fails at once.
    assert_fenced(a.snapshot("late"), "a snapshot");
    assert_fenced(a.collect_garbage(true), "a collection");
    assert_fenced(a.delete_snapshot("before"), "a snapshot delete");
    assert_fenced(a.flatten(), "a flatten");
    // B's resize counts.
    let b = site.open(take_over(site.opts("b")));
    b.resize(6 << 20, false).expect("resize on B");
    assert_eq!(size(&site), 6 << 20);
    assert!(matches!(b.release(), CloseOutcome::Released { .. }));
    let info = runtime()
        .block_on(admin::info(&site.store(), NAME))
        .expect("info");
    assert_eq!(info.descriptor.size, 6 << 20);
    assert_eq!(info.snapshots, ["before"]);
    assert_eq!(
        info.fenced_objects, 0,
        "B's close collected A's leftovers: {info:?}"
    );
    assert_eq!(records(&site), 1, "B's record alone is left");
    let _ = a.release();
}

#[test]
fn a_snapshot_a_fenced_writer_takes_is_refused_ignored_and_collected() {
    let site = Site::new("late-snap");
    let mut d = SyncDriver::new().expect("driver");
    let a = site.open(site.opts("a"));
    d.write(&a, 0, &block(1), false).expect("write");
    flush(&mut d, &a).expect("flush");
    // Nothing left to upload: A's snapshot goes straight to its object.
    assert!(a.sync_to_store(Duration::from_secs(30)));
    bare_take_over(&site, NAME);
    // A does not know it was fenced: its snapshot object lands, then it
    // checks and fails.
    assert_fenced(a.snapshot("late"), "a snapshot");
    assert_eq!(snapshot_objects(&site).len(), 1, "the late object is there");
    let store = site.store();
    let rt = runtime();
    assert!(
        rt.block_on(super::snapshot::names(&store, NAME))
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        rt.block_on(super::snapshot::read_meta(&store, NAME, "late")),
        Err(ObjectError::NoSuchSnapshot { .. })
    ));
    assert!(matches!(
        rt.block_on(super::clone::create(&store, NAME, "late", "c")),
        Err(ObjectError::NoSuchSnapshot { .. })
    ));
    let info = rt.block_on(admin::info(&store, NAME)).expect("info");
    assert!(info.fenced_objects >= 1, "{info:?}");
    // A holder may take a snapshot of that name; the fenced one goes.
    let b = site.open(take_over(site.opts("b")));
    b.snapshot("late").expect("B's snapshot");
    assert_eq!(read_tag(&mut d, &b, 0), 1);
    assert!(matches!(b.release(), CloseOutcome::Released { .. }));
    let snap = open_named(&site, &format!("{NAME}@late"), read_only(site.opts("r")));
    assert_eq!(read_tag(&mut d, &snap, 0), 1);
    let _ = a.release();
}

#[test]
fn a_clone_is_taken_over_flattened_and_released_and_a_fenced_flatten_never_counts() {
    let site = Site::new("clone-take");
    let mut d = SyncDriver::new().expect("driver");
    let rt = runtime();
    let base = site.open(site.opts("base"));
    for blk in 0..4 {
        d.write(&base, blk * B, &block(1), false)
            .expect("write base");
    }
    base.snapshot("gold").expect("snapshot");
    assert!(matches!(base.release(), CloseOutcome::Released { .. }));
    rt.block_on(super::clone::create(&site.store(), NAME, "gold", "c"))
        .expect("clone");
    // A serves the clone and overwrites all it inherited but block 3.
    let a = open_named(&site, "c", site.opts("a"));
    for blk in 0..3 {
        d.write(&a, blk * B, &block(2), false).expect("write clone");
    }
    flush(&mut d, &a).expect("flush");
    assert!(a.sync_to_store(Duration::from_secs(30)));
    // B takes the clone over: A's uploads and the parent's block are there.
    let b = open_named(&site, "c", take_over(site.opts("b")));
    assert_eq!(b.handover(), Some("take-over"));
    let tags: Vec<u8> = (0..5).map(|blk| read_tag(&mut d, &b, blk)).collect();
    assert_eq!(tags, [2, 2, 2, 1, 0]);
    // A's flatten copies block 3 in; the copy's put finds A fenced.
    assert_fenced(a.flatten(), "a flatten");
    let lineage = rt
        .block_on(super::lineage::read(&site.store(), "c"))
        .expect("lineage")
        .expect("c is a clone");
    assert!(lineage.parent.is_some(), "a fenced flatten cut nothing off");
    // The holder flattens; the parent may go.
    b.flatten().expect("flatten on B");
    assert!(matches!(b.release(), CloseOutcome::Released { .. }));
    let lineage = rt
        .block_on(super::lineage::read(&site.store(), "c"))
        .expect("lineage")
        .expect("c was a clone");
    assert!(lineage.parent.is_none(), "{lineage:?}");
    rt.block_on(super::snapshot::delete(&site.store(), NAME, "gold", 0))
        .expect("the parent snapshot is no longer needed");
    let c = open_named(&site, "c", site.opts("c"));
    assert_eq!(c.handover(), Some("released"));
    let tags: Vec<u8> = (0..5).map(|blk| read_tag(&mut d, &c, blk)).collect();
    assert_eq!(tags, [2, 2, 2, 1, 0]);
    assert!(matches!(c.release(), CloseOutcome::Released { .. }));
    assert!(matches!(a.release(), CloseOutcome::Fenced { .. }));
}

#[test]
fn a_flatten_mark_a_fenced_writer_leaves_does_not_count() {
    let site = Site::new("late-flatten");
    let mut d = SyncDriver::new().expect("driver");
    let rt = runtime();
    let base = site.open(site.opts("base"));
    d.write(&base, 0, &block(1), false).expect("write base");
    base.snapshot("gold").expect("snapshot");
    assert!(matches!(base.release(), CloseOutcome::Released { .. }));
    rt.block_on(super::clone::create(&site.store(), NAME, "gold", "c"))
        .expect("clone");
    let a = open_named(&site, "c", site.opts("a"));
    d.write(&a, 8 * B, &block(2), false).expect("write clone");
    flush(&mut d, &a).expect("flush");
    assert!(a.sync_to_store(Duration::from_secs(30)));
    bare_take_over(&site, "c");
    // A mark of A's generation lands after B drew its fence: what A would
    // leave if it were paused between its last check and the mark's put.
    let late = generation::base_id(a.generation()) + 1_000;
    let store = site.store();
    rt.block_on(store.put(&Keys::new("c").flattened_mark(late), "{}".into()))
        .expect("put the late mark");
    let lineage = rt
        .block_on(super::lineage::read(&store, "c"))
        .expect("lineage")
        .expect("c is a clone");
    assert!(lineage.parent.is_some(), "A's late mark does not count");
    let info = rt.block_on(admin::info(&store, "c")).expect("info");
    assert_eq!(info.parent.as_deref(), Some("h@gold"), "{info:?}");
    assert_eq!(info.fenced_objects, 1, "{info:?}");
    // A holder reads through the parent, and its close collects the mark.
    let b = open_named(&site, "c", take_over(site.opts("b")));
    assert_eq!(
        read_tag(&mut d, &b, 0),
        1,
        "B still reads through the parent"
    );
    assert_eq!(read_tag(&mut d, &b, 8), 2);
    assert!(matches!(b.release(), CloseOutcome::Released { .. }));
    let marks = rt
        .block_on(store.list(&Keys::new("c").flattened()))
        .expect("list");
    assert!(marks.is_empty(), "B's close collected it: {marks:?}");
    // A real flatten on the holder counts.
    let c = open_named(&site, "c", site.opts("c"));
    c.flatten().expect("flatten");
    let lineage = rt
        .block_on(super::lineage::read(&store, "c"))
        .expect("lineage")
        .expect("c was a clone");
    assert!(lineage.parent.is_none(), "{lineage:?}");
    assert!(matches!(c.release(), CloseOutcome::Released { .. }));
    let _ = a.release();
}
