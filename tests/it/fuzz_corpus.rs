//! Replays the fuzz corpora through the library's target bodies, so plain
//! `cargo test` on stable keeps every past finding and seed honest.
//! `cargo test --test it fuzz_corpus::write_seeds -- --ignored` regenerates the
//! hand-made seeds (named `seed-*`; fuzzer findings keep their hash names).

use std::path::{Path, PathBuf};

use vbd::nbd::client::{go_data, meta_data, option, put_request};
use vbd::nbd::wire::*;
use vbd::volume::object::format::{
    self as fmt, BLOCK, CHUNK_HEADER, IndexEntry, Kind, RecordHeader, SEGMENT_HEADER,
};

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn replay(target: &str, body: fn(&[u8])) {
    let dir = corpus(target);
    let entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {} missing: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    assert!(!entries.is_empty(), "corpus {} is empty", dir.display());
    for path in entries {
        let data = std::fs::read(&path).expect("read corpus file");
        // The body's own panic message is printed above; this names the input.
        if std::panic::catch_unwind(|| body(&data)).is_err() {
            panic!("{target}: corpus file {} fails", path.display());
        }
    }
}

/// Every fuzz target: its corpus directory, its body and its hand-made seeds.
type Target = (&'static str, fn(&[u8]), fn() -> Vec<Vec<u8>>);

const TARGETS: [Target; 7] = [
    ("handshake", vbd::nbd::fuzz::handshake, handshake_seeds),
    (
        "transmission",
        vbd::nbd::fuzz::transmission,
        transmission_seeds,
    ),
    (
        "wal_record",
        vbd::volume::object::fuzz::wal_record,
        wal_record_seeds,
    ),
    (
        "chunk_index",
        vbd::volume::object::fuzz::chunk_index,
        chunk_index_seeds,
    ),
    (
        "checkpoint",
        vbd::volume::object::fuzz::checkpoint,
        checkpoint_seeds,
    ),
    ("qmp_reply", vbd::vm::fuzz::qmp_reply, qmp_reply_seeds),
    (
        "virtio_blk",
        vbd::vhost::fuzz::virtio_blk,
        vbd::vhost::fuzz::seeds,
    ),
];

#[test]
fn replay_every_corpus() {
    for (target, body, _) in TARGETS {
        replay(target, body);
    }
}

fn opt(out: &mut Vec<u8>, o: u32, data: &[u8]) {
    out.extend(option(o, data));
}

fn handshake_seeds() -> Vec<Vec<u8>> {
    let flags = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes();
    let mut seeds = Vec::new();
    for (stride, build) in [
        (
            0u8,
            &(|o: &mut Vec<u8>| opt(o, OPT_GO, &go_data("a", &[INFO_BLOCK_SIZE])))
                as &dyn Fn(&mut Vec<u8>),
        ),
        (3, &|o| {
            opt(o, OPT_STRUCTURED_REPLY, &[]);
            opt(
                o,
                OPT_SET_META_CONTEXT,
                &meta_data("a", &["base:allocation"]),
            );
            opt(
                o,
                OPT_GO,
                &go_data("a", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]),
            );
        }),
        (7, &|o| opt(o, OPT_EXPORT_NAME, b"a")),
        (1, &|o| {
            opt(o, OPT_LIST, &[]);
            opt(
                o,
                OPT_INFO,
                &go_data("ro", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 99]),
            );
            opt(o, OPT_ABORT, &[]);
        }),
        (15, &|o| {
            opt(o, OPT_EXTENDED_HEADERS, &[]);
            opt(o, OPT_STRUCTURED_REPLY, &[]);
            opt(o, OPT_LIST_META_CONTEXT, &meta_data("", &["base:"]));
            opt(
                o,
                OPT_SET_META_CONTEXT,
                &meta_data("", &["base:allocation", "x-y:z"]),
            );
            opt(o, OPT_GO, &go_data("", &[]));
        }),
        (31, &|o| {
            opt(o, OPT_STARTTLS, &[]);
            opt(o, 0x1234, b"junk");
            opt(o, OPT_GO, &go_data("missing", &[]));
            opt(o, OPT_INFO, &[0, 0, 0, 9, b'a']);
            opt(o, OPT_EXPORT_NAME, b"ro");
        }),
    ] {
        let mut s = vec![stride];
        s.extend_from_slice(&flags);
        build(&mut s);
        seeds.push(s);
    }
    seeds
}

/// A request; a WRITE's payload is 0xa5 bytes.
fn req(
    out: &mut Vec<u8>,
    extended: bool,
    flags: u16,
    cmd: u16,
    cookie: u64,
    offset: u64,
    len: u64,
) {
    put_request(out, extended, flags, cmd, cookie, offset, len);
    if cmd == CMD_WRITE {
        out.extend(std::iter::repeat_n(0xa5, len as usize));
    }
}

fn transmission_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    // sel: mode (0 simple, 1 structured, 2 extended) | 8 = meta context | 4 = read-only.
    for sel in [0u8, 1 | 8, 2 | 8, 1 | 4, 2 | 4 | 8] {
        let ext = sel % 3 == 2;
        let mut s = vec![sel, 5];
        req(&mut s, ext, 0, CMD_WRITE, 1, 0, 4096);
        req(&mut s, ext, CMD_FLAG_FUA, CMD_WRITE, 2, 1000, 3);
        req(&mut s, ext, 0, CMD_READ, 3, 0, 4096);
        req(&mut s, ext, CMD_FLAG_DF, CMD_READ, 4, 512, 0);
        req(&mut s, ext, 0, CMD_FLUSH, 5, 0, 0);
        req(&mut s, ext, CMD_FLAG_FUA, CMD_TRIM, 6, 4096, 8192);
        req(
            &mut s,
            ext,
            CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_WRITE_ZEROES,
            7,
            0,
            65536,
        );
        req(&mut s, ext, 0, CMD_BLOCK_STATUS, 8, 0, 1 << 20);
        req(
            &mut s,
            ext,
            CMD_FLAG_REQ_ONE,
            CMD_BLOCK_STATUS,
            9,
            4096,
            100,
        );
        req(&mut s, ext, 0, CMD_CACHE, 10, 0, 1 << 20);
        req(&mut s, ext, 0, CMD_READ, 11, (1 << 20) - 1, 2);
        req(&mut s, ext, 0, 77, 12, 0, 0);
        req(&mut s, ext, 0, CMD_DISC, 13, 0, 0);
        seeds.push(s);
    }
    seeds
}

fn record(out: &mut Vec<u8>, seq: u64, lba: u64, blocks: u32, kind: Kind) {
    let h = RecordHeader {
        seq,
        lba,
        blocks,
        kind,
    };
    let data: Vec<u8> = if kind == Kind::Data {
        (0..blocks as usize * BLOCK)
            .map(|i| (i / 7) as u8)
            .collect()
    } else {
        Vec::new()
    };
    fmt::encode_record(out, &h, &data);
}

/// Byte 0 of a WAL seed: bit 0 repairs CRCs, bit 1 adds the segment header,
/// bits 4-7 are the sequence number the store already has.
fn wal_record_seeds() -> Vec<Vec<u8>> {
    let with_header = |opts: u8| {
        let mut s = vec![opts];
        s.extend_from_slice(&fmt::segment_header(1));
        s
    };
    let mut seeds = Vec::new();
    // A good segment: data, hole and zero records.
    let mut good = with_header(0);
    record(&mut good, 3, 10, 1, Kind::Data);
    record(&mut good, 4, 0, 100, Kind::Hole);
    record(&mut good, 7, 1 << 40, 8, Kind::Zero);
    record(&mut good, 8, 11, 2, Kind::Data);
    seeds.push(good.clone());
    // Records only, the target adds the header; some already in the store.
    let mut bare = vec![2 | (4 << 4)];
    record(&mut bare, 2, 5, 1, Kind::Zero);
    record(&mut bare, 5, 6, 1, Kind::Hole);
    record(&mut bare, 6, 7, 1, Kind::Data);
    seeds.push(bare);
    // Torn tail, flipped data byte (then repaired), flipped header byte.
    seeds.push(good[..good.len() - 100].to_vec());
    let mut bad = good.clone();
    bad[1 + SEGMENT_HEADER + 32 + 17] ^= 0x40;
    seeds.push(bad.clone());
    bad[0] = 1;
    seeds.push(bad);
    let mut bad = good.clone();
    bad[1 + SEGMENT_HEADER + 32 + BLOCK + 9] ^= 1;
    seeds.push(bad);
    // Stale sequence numbers: the same one twice.
    let mut stale = with_header(0);
    record(&mut stale, 9, 0, 1, Kind::Hole);
    record(&mut stale, 9, 1, 1, Kind::Hole);
    seeds.push(stale);
    // Good CRCs on records no writer makes: a wrapping extent, the last
    // sequence number, an empty extent, an unknown kind, a nonzero pad.
    let mut odd = with_header(0);
    record(&mut odd, 1, u64::MAX, 1, Kind::Zero);
    seeds.push(odd);
    let mut odd = with_header(0);
    record(&mut odd, u64::MAX, 0, 1, Kind::Hole);
    seeds.push(odd);
    let mut odd = with_header(1);
    record(&mut odd, 1, 0, 0, Kind::Hole);
    seeds.push(odd);
    let mut odd = with_header(1);
    record(&mut odd, 1, 0, 1, Kind::Hole);
    let kind_at = 1 + SEGMENT_HEADER + 28;
    odd[kind_at] = 9;
    seeds.push(odd.clone());
    odd[kind_at] = Kind::Zero as u8;
    odd[kind_at + 2] = 0x80;
    seeds.push(odd);
    // Another segment's file; a foreign file.
    let mut other = vec![0];
    other.extend_from_slice(&fmt::segment_header(2));
    record(&mut other, 1, 0, 1, Kind::Hole);
    seeds.push(other);
    seeds.push(b"\x00#!/bin/sh\necho not a WAL segment\n".to_vec());
    seeds
}

fn entry(lba: u64, seq: u64, blocks: u32, data_block: u32, kind: Kind) -> IndexEntry {
    IndexEntry {
        lba,
        seq,
        blocks,
        data_block,
        kind,
    }
}

fn chunk(opts: u8, id: u64, entries: &[IndexEntry], blocks: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..blocks * BLOCK).map(|i| (i % 251) as u8).collect();
    let mut s = vec![opts];
    s.extend_from_slice(&fmt::encode_chunk(id, entries, &data));
    s
}

/// Byte 0 of a chunk seed: bit 0 repairs the CRCs.
fn chunk_index_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    let good = chunk(
        0,
        7,
        &[
            entry(100, 5, 1, 0, Kind::Data),
            entry(0, 6, 1000, 0, Kind::Hole),
            entry(200, 9, 1, 1, Kind::Data),
            entry(1 << 30, 8, 3, 0, Kind::Zero),
        ],
        2,
    );
    seeds.push(good.clone());
    // Index only: zeroes and holes, no data.
    seeds.push(chunk(
        0,
        1,
        &[entry(0, 1, 1, 0, Kind::Zero), entry(9, 2, 4, 0, Kind::Hole)],
        0,
    ));
    // Data missing from the end; index cut short.
    seeds.push(good[..good.len() - BLOCK].to_vec());
    seeds.push(good[..1 + CHUNK_HEADER + 40].to_vec());
    // Damaged header, damaged index, and the latter repaired.
    let mut bad = good.clone();
    bad[1 + 20] ^= 4;
    seeds.push(bad);
    let mut bad = good.clone();
    bad[1 + CHUNK_HEADER + 3] ^= 4;
    seeds.push(bad.clone());
    bad[0] = 1;
    seeds.push(bad);
    // Good CRCs on indexes no writer makes: data past the chunk's blocks,
    // an empty extent, a wrapping one.
    seeds.push(chunk(0, 2, &[entry(0, 1, 2, 1, Kind::Data)], 2));
    seeds.push(chunk(0, 2, &[entry(0, 1, 0, 0, Kind::Hole)], 0));
    seeds.push(chunk(0, 2, &[entry(u64::MAX - 1, 1, 2, 0, Kind::Zero)], 0));
    // Unknown kind, wrong block size, wrong version: CRCs repaired.
    let mut odd = chunk(1, 3, &[entry(0, 1, 1, 0, Kind::Hole)], 0);
    odd[1 + CHUNK_HEADER + 24] = 0;
    seeds.push(odd);
    let mut odd = good.clone();
    odd[0] = 1;
    odd[1 + 53] = 0x20;
    seeds.push(odd);
    let mut odd = good.clone();
    odd[0] = 1;
    odd[1 + 8] = 2;
    seeds.push(odd);
    seeds
}

/// QMP seeds: what QEMU 7.2 to 9.1 say on the socket, and what they do not.
fn qmp_reply_seeds() -> Vec<Vec<u8>> {
    let greeting = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 1, "major": 9}, "package": "Debian 1:9.1"}, "capabilities": ["oob"]}}"#;
    let lines: &[&[&str]] = &[
        &[greeting, r#"{"return": {}, "id": 1}"#],
        &[
            r#"{"return": {"status": "running", "singlestep": false, "running": true}, "id": 2}"#,
            r#"{"return": {"status": "paused", "running": false}, "id": 3}"#,
        ],
        &[
            r#"{"error": {"class": "GenericError", "desc": "Duplicate ID 'vd1' for device"}, "id": 4}"#,
            r#"{"error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}, "id": 5}"#,
            r#"{"error": "nope", "id": 6}"#,
        ],
        &[
            r#"{"timestamp": {"seconds": 1700000000, "microseconds": 1}, "event": "DEVICE_DELETED", "data": {"device": "vd-data", "path": "/machine/peripheral/vd-data"}}"#,
            r#"{"timestamp": {"seconds": 1700000000, "microseconds": 2}, "event": "DEVICE_DELETED", "data": {"path": "/machine/peripheral-anon/device[0]/virtio-backend"}}"#,
            r#"{"timestamp": {"seconds": 1, "microseconds": 3}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}"#,
            r#"{"timestamp": {"seconds": 1, "microseconds": 4}, "event": "X_UNKNOWN_EVENT"}"#,
            r#"{"event": "STOP"}"#,
        ],
        &[
            "",
            "   \t",
            "{\"return\": ",
            "[1, 2, {\"id\": 18446744073709551615}]",
            r#"{"id": -1, "return": 1e400}"#,
            r#"{"id": 1.5, "event": null}"#,
            r#"{"QMP": {"version": 7}}"#,
            r#""\ud800 lone surrogate""#,
            "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
        ],
    ];
    let mut seeds: Vec<Vec<u8>> = lines
        .iter()
        .map(|ls| {
            ls.iter()
                .flat_map(|l| format!("{l}\r\n").into_bytes())
                .collect()
        })
        .collect();
    seeds.push(b"{\"return\": {}, \"id\": 9}\n\xff\xfe\n{\"event\": \"\xc3\x28\"}\n".to_vec());
    seeds
}

/// A checkpoint as vbd writes it, CRC zeroed: byte 0 of a seed (bit 0)
/// has the target repair it. Entries are (lba, seq, chunk, blocks, block,
/// kind); chunk records are (id, data start, data blocks).
fn checkpoint_bytes(
    id: u64,
    max_seq: u64,
    entries: &[(u64, u64, u64, u32, u32, Kind)],
    chunks: &[(u64, u64, u32)],
) -> Vec<u8> {
    let entries: Vec<_> = entries
        .iter()
        .map(
            |&(lba, seq, chunk, blocks, block, kind)| fmt::CheckpointEntry {
                lba,
                seq,
                blocks,
                kind,
                chunk,
                block,
            },
        )
        .collect();
    let chunks: Vec<_> = chunks
        .iter()
        .map(|&(id, data_start, data_blocks)| fmt::ChunkRecord {
            id,
            data_start,
            data_blocks,
        })
        .collect();
    let mut b = fmt::encode_checkpoint(id, &entries, &chunks, max_seq);
    b[12..16].fill(0);
    b
}

fn checkpoint_seeds() -> Vec<Vec<u8>> {
    let good = checkpoint_bytes(
        7,
        42,
        &[
            (0, 3, 1, 16, 0, Kind::Data),
            (16, 9, 0, 8, 0, Kind::Hole),
            (100, 40, 7, 2, 5, Kind::Data),
            (u64::MAX - 4, 41, 0, 4, 0, Kind::Zero),
        ],
        &[(1, 4096, 16), (7, 8192, 7)],
    );
    let empty = checkpoint_bytes(0, 0, &[], &[]);
    let wraps = checkpoint_bytes(1, 1, &[(u64::MAX, 1, 1, 2, 0, Kind::Data)], &[(1, 4096, 2)]);
    let mut counts_lie = good.clone();
    counts_lie[32] = 9;
    let mut bad_kind = good.clone();
    bad_kind[fmt::CHECKPOINT_HEADER + 32] = 0xee;
    let mut seeds = Vec::new();
    for (opts, body) in [
        (1u8, &good),
        (0, &good),
        (1, &empty),
        (1, &wraps),
        (1, &counts_lie),
        (1, &bad_kind),
    ] {
        for flip in [0u8, 77, 200] {
            let mut s = vec![opts];
            s.extend_from_slice(body);
            s.push(flip);
            seeds.push(s);
        }
    }
    seeds
}

#[test]
fn checkpoint_seeds_reach_the_checks() {
    // Seeds that never decode would leave the round trip and the bit-flip
    // check unexercised; the first three (the good one, repaired) decode.
    let decoded = checkpoint_seeds()
        .iter()
        .filter(|s| s[0] & 1 != 0)
        .filter(|s| {
            let mut b = s[1..s.len() - 1].to_vec();
            vbd::volume::object::fuzz::repair_checkpoint(&mut b);
            fmt::decode_checkpoint(&b).is_ok()
        })
        .count();
    assert_eq!(
        decoded, 6,
        "the good and the empty checkpoint, three flips each"
    );
}

#[test]
#[ignore = "regenerates the hand-made seeds in fuzz/corpus"]
fn write_seeds() {
    for (target, _, seeds) in TARGETS {
        let seeds = seeds();
        let dir = corpus(target);
        std::fs::create_dir_all(&dir).expect("mkdir corpus");
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), s).expect("write seed");
        }
    }
}

#[test]
fn seeds_run_clean() {
    // The generator's output, whether or not it was written to disk.
    for (_, body, seeds) in TARGETS {
        for s in seeds() {
            body(&s);
        }
    }
}
