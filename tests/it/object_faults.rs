//! Object volumes on a failing store: with half the store's requests
//! failing, writes, FUA and flushes keep their guarantees (they depend only
//! on the local WAL), reads stay correct, and uploads catch up once the
//! store recovers.

use std::sync::Arc;
use std::time::Duration;

use object_store::memory::InMemory;
use vbd::objstore::{Faults, Store};
use vbd::runtime::runtime;
use vbd::test_support::TempDir;
use vbd::volume::object::cache::CacheSize;
use vbd::volume::object::{ObjectOptions, ObjectVolume, admin};
use vbd::volume::sync::SyncDriver;
use vbd::volume::{IoFlags, Op, Volume};

fn block(tag: u32) -> Vec<u8> {
    (0..4096u32)
        .map(|i| (i.wrapping_mul(31) ^ tag.wrapping_mul(2_654_435_761)) as u8)
        .collect()
}

#[test]
fn writes_stay_safe_while_uploads_fail_then_catch_up() {
    let dir = TempDir::new("faults");
    let faults = Arc::new(Faults::new(0.0, 42));
    let store = Store::from_object_store(Arc::new(InMemory::new()), "memory://faults")
        .with_faults(faults.clone());
    runtime()
        .block_on(admin::create(&store, "f", 64 << 20))
        .unwrap();
    let opts = |wal: &str| ObjectOptions {
        wal_root: dir.join(wal),
        segment_size: 256 << 10,
        checkpoint_every: 4,
        drain_timeout: Duration::from_secs(60),
        ..ObjectOptions::default()
    };
    let vol = ObjectVolume::open(store.clone(), "f", opts("wal1")).unwrap();
    let mut d = SyncDriver::new().unwrap();
    faults.set_rate(0.5);
    let mut want = std::collections::HashMap::new();
    for i in 0..600u32 {
        let blk = u64::from((i * 7919) % 4096);
        let data = block(i);
        d.write(&vol, blk * 4096, &data, i % 5 == 0)
            .expect("writes succeed while the store fails");
        want.insert(blk, data);
        if i % 50 == 49 {
            d.op(&vol, Op::Flush, 0, 0, IoFlags::default())
                .expect("flushes succeed while the store fails");
        }
    }
    // Give the uploader time to hit the failures.
    std::thread::sleep(Duration::from_secs(2));
    assert!(faults.injected() > 0, "the store refused some uploads");
    assert!(
        vol.stats()
            .upload_failures
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    // Reads are served from memory and the cache meanwhile.
    faults.set_rate(0.0);
    for (blk, data) in &want {
        assert_eq!(
            &d.read(&vol, blk * 4096, 4096).unwrap(),
            data,
            "block {blk}"
        );
    }
    // The store recovers: everything reaches it.
    assert!(
        vol.sync_to_store(Duration::from_secs(60)),
        "uploads caught up"
    );
    assert_eq!(vol.backlog(), 0);
    vol.shutdown();
    drop(vol);
    // A fresh WAL: the data must come from the store alone.
    let vol = ObjectVolume::open(store.clone(), "f", opts("wal2")).unwrap();
    for (blk, data) in &want {
        assert_eq!(
            &d.read(&vol, blk * 4096, 4096).unwrap(),
            data,
            "block {blk} from the store"
        );
    }
    let s = vol.cache_stats();
    assert!(s.misses > 0, "cold reads went to the store");
    vol.shutdown();
}

/// Garbage collection takes live blocks from the cache when it holds them
/// (uploads fill it) ...
#[test]
fn garbage_collection_rewrites_sparse_chunks_and_keeps_data() {
    gc_rewrites_and_keeps_data(CacheSize::Default);
}

/// ... and from the store with ranged GETs when it does not.
#[test]
fn garbage_collection_without_a_cache_reads_the_store() {
    gc_rewrites_and_keeps_data(CacheSize::Bytes(0));
}

fn gc_rewrites_and_keeps_data(cache: CacheSize) {
    let dir = TempDir::new("gc");
    let store = Store::from_object_store(Arc::new(InMemory::new()), "memory://gc");
    runtime()
        .block_on(admin::create(&store, "g", 64 << 20))
        .unwrap();
    let opts = |wal: &str| ObjectOptions {
        wal_root: dir.join(wal),
        segment_size: 128 << 10,
        checkpoint_every: 1000,
        cache,
        ..ObjectOptions::default()
    };
    let vol = ObjectVolume::open(store.clone(), "g", opts("w1")).unwrap();
    let mut d = SyncDriver::new().unwrap();
    // Fill 256 blocks, then overwrite three quarters: early chunks go sparse.
    for b in 0..256u64 {
        d.write(&vol, b * 4096, &block(b as u32), false).unwrap();
    }
    assert!(vol.sync_to_store(Duration::from_secs(30)));
    for b in (0..256u64).filter(|b| b % 4 != 0) {
        d.write(&vol, b * 4096, &block(1000 + b as u32), false)
            .unwrap();
    }
    d.op(&vol, Op::Trim, 0, 4096, IoFlags::default()).unwrap();
    assert!(vol.sync_to_store(Duration::from_secs(30)));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while vol
        .stats()
        .chunks_collected
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "garbage collection ran"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let check = |d: &mut SyncDriver, vol: &ObjectVolume| {
        assert_eq!(
            d.read(vol, 0, 4096).unwrap(),
            vec![0; 4096],
            "trimmed block 0 stays zero"
        );
        for b in 1..256u64 {
            let tag = if b % 4 == 0 {
                b as u32
            } else {
                1000 + b as u32
            };
            assert_eq!(
                d.read(vol, b * 4096, 4096).unwrap(),
                block(tag),
                "block {b}"
            );
        }
    };
    check(&mut d, &vol);
    vol.shutdown();
    drop(vol);
    // Recovery sees the rewritten chunks (and no longer needs the old ones).
    let vol = ObjectVolume::open(store.clone(), "g", opts("w2")).unwrap();
    check(&mut d, &vol);
    vol.shutdown();
}
