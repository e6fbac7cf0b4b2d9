//! Soak: many connections at high queue depth, writing and verifying with
//! fio's nbd engine round after round, while the server's memory is
//! watched. CI runs a short form; the long form is by hand:
//!
//!   VBD_SOAK_SECS=600 cargo test --release --test it soak:: -- --nocapture

use crate::common;

use std::time::{Duration, Instant};

use common::*;

/// One round: 8 connections at depth 64 write random blocks of mixed sizes
/// into their own 8 MiB regions, then read everything back and check it.
fn round(uri: &str, seed: u64) {
    let out = run(std::process::Command::new("fio").args([
        "--name=soak",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bsrange=4k-128k",
        "--size=8m",
        "--offset_increment=8m",
        "--numjobs=8",
        "--iodepth=64",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        // No verify-state files left in the working directory.
        "--verify_state_save=0",
        &format!("--randseed={seed}"),
        "--group_reporting",
    ]));
    // fio exits non-zero on a verify failure (run() checks); be explicit.
    assert!(
        !out.stdout.contains("verify: bad") && !out.stderr.contains("verify: bad"),
        "fio reported bad data:\n{}{}",
        out.stdout,
        out.stderr
    );
}

#[test]
fn many_connections_for_a_while_lose_nothing_and_hold_memory_flat() {
    require("fio", "fio");
    let secs: u64 = std::env::var("VBD_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut vbd = Vbd::start("soak", &["--export", "name=soak,backend=memory,size=64M"]);
    let uri = vbd.uri("soak");
    // The first round allocates the volume's pages and the connections'
    // buffers; memory is measured from after it.
    round(&uri, 1);
    let start = rss_kib(vbd.pid());
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut rounds = 1;
    while Instant::now() < deadline {
        rounds += 1;
        round(&uri, rounds);
    }
    let end = rss_kib(vbd.pid());
    eprintln!(
        "soak: {rounds} rounds in {secs} s; RSS {start} KiB after the first, {end} KiB at the end"
    );
    assert!(
        end <= start + 16 * 1024,
        "memory grew from {start} KiB to {end} KiB over {rounds} rounds"
    );
    vbd.assert_running();
    vbd.stop();
}
