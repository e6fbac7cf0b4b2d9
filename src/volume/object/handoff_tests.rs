//! Volumes that move between writers, driven through the real
//! `ObjectVolume` on a local-directory store: generations taken by racing
//! writers, a writer fenced by a take-over (its writes fail, its late
//! uploads never count and are collected), a clean release, FLUSH under
//! durability=store, and a WAL left by a generation that was taken over.
//! The two-process versions, over every kind of store, are in
//! tests/handoff.rs.

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
    let before = site.object_ids();
    assert!(matches!(b.release(), CloseOutcome::Released { .. }));
    // B's close collected A's leftovers and nothing that counts.
    let after = site.object_ids();
    let fences = runtime()
        .block_on(generation::read_fences(&site.store(), &Keys::new(NAME)))
        .expect("fences");
    assert!(
        after.iter().all(|&id| fences.counts(id)),
        "no fenced object is left: {after:x?}"
    );
    assert!(
        before.iter().any(|&id| !fences.counts(id)),
        "there was something to collect: {before:x?}"
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
