//! Protocol codec costs: request decoding and reply encoding, the per-request
//! work the sans-IO core adds on the hot path.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use vbd::nbd::client;
use vbd::nbd::reply::{self, Extent};
use vbd::nbd::request::{Decoder, Event};
use vbd::nbd::wire::*;
use vbd::nbd::{ErrorCode, ReplyMode};

fn requests(extended: bool, n: usize, write_len: u32) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n as u64 {
        let cmd = if write_len > 0 { CMD_WRITE } else { CMD_READ };
        client::put_request(&mut out, extended, 0, cmd, i, i * 4096, 4096);
        out.extend(std::iter::repeat_n(0u8, write_len as usize));
    }
    out
}

fn decode_all(mode: ReplyMode, buf: &[u8]) -> usize {
    let mut d = Decoder::new(mode, 32 << 20);
    let mut pos = 0;
    let mut n = 0;
    while let Ok((used, Some(ev))) = d.next(&buf[pos..]) {
        pos += used;
        if let Event::Request(r) = ev {
            n += r.length as usize;
        }
    }
    n
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    const N: usize = 64;
    g.throughput(Throughput::Elements(N as u64));
    for (name, mode, ext, write) in [
        ("compact_read", ReplyMode::Structured, false, 0),
        ("extended_read", ReplyMode::Extended, true, 0),
        ("compact_write_4k", ReplyMode::Structured, false, 4096),
        ("extended_write_4k", ReplyMode::Extended, true, 4096),
    ] {
        let buf = requests(ext, N, write);
        g.bench_function(name, |b| b.iter(|| decode_all(mode, black_box(&buf))));
    }
    g.finish();
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode");
    for (name, mode) in [
        ("simple", ReplyMode::Simple),
        ("structured", ReplyMode::Structured),
        ("extended", ReplyMode::Extended),
    ] {
        g.bench_function(format!("ok_{name}"), |b| {
            b.iter(|| reply::ok(mode, black_box(7), black_box(4096)))
        });
        g.bench_function(format!("read_{name}"), |b| {
            b.iter(|| reply::read_data(mode, black_box(7), black_box(4096), black_box(4096)))
        });
        g.bench_function(format!("error_{name}"), |b| {
            b.iter(|| {
                reply::error(
                    mode,
                    black_box(7),
                    0,
                    ErrorCode::Inval,
                    "request extends beyond the end",
                )
            })
        });
    }
    let extents: Vec<Extent> = (0..64)
        .map(|i| Extent {
            len: 65536,
            hole: i % 2 == 0,
            zero: i % 2 == 0,
        })
        .collect();
    let mut out = Vec::with_capacity(4096);
    for (name, mode) in [
        ("structured", ReplyMode::Structured),
        ("extended", ReplyMode::Extended),
    ] {
        g.bench_function(format!("block_status_64_{name}"), |b| {
            b.iter(|| {
                out.clear();
                reply::block_status(
                    mode,
                    7,
                    0,
                    64 * 65536,
                    false,
                    1,
                    black_box(&extents).iter().copied(),
                    &mut out,
                );
                out.len()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, decode, encode);
criterion_main!(benches);
