//! Replays the fuzz corpora through the library's target bodies, so plain
//! `cargo test` on stable keeps every past finding and seed honest.
//! `cargo test --test fuzz_corpus -- --ignored write_seeds` regenerates the
//! hand-made seeds (named `seed-*`; fuzzer findings keep their hash names).

use std::path::{Path, PathBuf};

use vbd::nbd::wire::*;

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
        body(&data);
    }
}

#[test]
fn replay_handshake_corpus() {
    replay("handshake", vbd::nbd::fuzz::handshake);
}

#[test]
fn replay_transmission_corpus() {
    replay("transmission", vbd::nbd::fuzz::transmission);
}

fn opt(out: &mut Vec<u8>, o: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&o.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn named(name: &str, tail: &[u8]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(tail);
    d
}

fn meta(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut q = (queries.len() as u32).to_be_bytes().to_vec();
    for s in queries {
        q.extend_from_slice(&(s.len() as u32).to_be_bytes());
        q.extend_from_slice(s.as_bytes());
    }
    named(name, &q)
}

fn go(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut t = (infos.len() as u16).to_be_bytes().to_vec();
    for i in infos {
        t.extend_from_slice(&i.to_be_bytes());
    }
    named(name, &t)
}

fn handshake_seeds() -> Vec<Vec<u8>> {
    let flags = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes();
    let mut seeds = Vec::new();
    for (stride, build) in [
        (
            0u8,
            &(|o: &mut Vec<u8>| opt(o, OPT_GO, &go("a", &[INFO_BLOCK_SIZE])))
                as &dyn Fn(&mut Vec<u8>),
        ),
        (3, &|o| {
            opt(o, OPT_STRUCTURED_REPLY, &[]);
            opt(o, OPT_SET_META_CONTEXT, &meta("a", &["base:allocation"]));
            opt(
                o,
                OPT_GO,
                &go("a", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]),
            );
        }),
        (7, &|o| opt(o, OPT_EXPORT_NAME, b"a")),
        (1, &|o| {
            opt(o, OPT_LIST, &[]);
            opt(
                o,
                OPT_INFO,
                &go("ro", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 99]),
            );
            opt(o, OPT_ABORT, &[]);
        }),
        (15, &|o| {
            opt(o, OPT_EXTENDED_HEADERS, &[]);
            opt(o, OPT_STRUCTURED_REPLY, &[]);
            opt(o, OPT_LIST_META_CONTEXT, &meta("", &["base:"]));
            opt(
                o,
                OPT_SET_META_CONTEXT,
                &meta("", &["base:allocation", "x-y:z"]),
            );
            opt(o, OPT_GO, &go("", &[]));
        }),
        (31, &|o| {
            opt(o, OPT_STARTTLS, &[]);
            opt(o, 0x1234, b"junk");
            opt(o, OPT_GO, &go("missing", &[]));
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

fn req(
    out: &mut Vec<u8>,
    extended: bool,
    flags: u16,
    cmd: u16,
    cookie: u64,
    offset: u64,
    len: u64,
) {
    let magic = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    out.extend_from_slice(&magic.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&cmd.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    if extended {
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
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

#[test]
#[ignore = "regenerates the hand-made seeds in fuzz/corpus"]
fn write_seeds() {
    for (target, seeds) in [
        ("handshake", handshake_seeds()),
        ("transmission", transmission_seeds()),
    ] {
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
    for s in handshake_seeds() {
        vbd::nbd::fuzz::handshake(&s);
    }
    for s in transmission_seeds() {
        vbd::nbd::fuzz::transmission(&s);
    }
}
