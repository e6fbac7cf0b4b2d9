//! The sharded block cache under two threads, the shape of the object
//! volume's warm-read path: each lookup copies a 4 KiB block out.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use vbd::volume::object::cache::{BlockCache, BlockKey};

const BLOCKS: u32 = 16_384;

fn filled() -> Arc<BlockCache> {
    let c = Arc::new(BlockCache::new(u64::from(BLOCKS) * 4096 * 2));
    for b in 0..BLOCKS {
        c.insert(
            BlockKey {
                chunk: u64::from(b / 1024),
                block: b % 1024,
            },
            &[b as u8; 4096],
        );
    }
    c
}

fn lookups(c: &BlockCache, start: u32, n: u32) -> u32 {
    let mut out = [0u8; 4096];
    let mut hits = 0;
    for i in 0..n {
        let b = (start.wrapping_add(i.wrapping_mul(2_654_435_761))) % BLOCKS;
        if c.get_into(
            &BlockKey {
                chunk: u64::from(b / 1024),
                block: b % 1024,
            },
            &mut out,
        ) {
            hits += 1;
        }
    }
    hits
}

fn cache(c: &mut Criterion) {
    let mut g = c.benchmark_group("cache");
    const N: u32 = 10_000;
    g.throughput(Throughput::Elements(u64::from(N)));
    let one = filled();
    g.bench_function("hit_1_thread", |b| {
        b.iter(|| lookups(&one, black_box(7), N))
    });
    let two = filled();
    g.bench_function("hit_2_threads", |b| {
        b.iter(|| {
            let other = two.clone();
            let t = std::thread::spawn(move || lookups(&other, 99, N / 2));
            let a = lookups(&two, black_box(7), N / 2);
            a + t.join().unwrap_or(0)
        })
    });
    let churn = Arc::new(BlockCache::new(4096 * 1024));
    g.bench_function("insert_evict_2_threads", |b| {
        b.iter(|| {
            let other = churn.clone();
            let t = std::thread::spawn(move || {
                for i in 0..N / 2 {
                    other.insert(BlockKey { chunk: 1, block: i }, &[1; 4096]);
                }
            });
            for i in 0..N / 2 {
                churn.insert(BlockKey { chunk: 2, block: i }, &[2; 4096]);
            }
            let _ = t.join();
        })
    });
    g.finish();
}

criterion_group!(benches, cache);
criterion_main!(benches);
