//! Object volumes on a real distributed store: a single-node Ceph cluster's
//! S3 gateway (RGW 16.2, see `tests/ceph_common` and `tools/ceph-rgw`),
//! through the real `vbd` binary and real clients.

use std::process::Command;

use crate::ceph_common;
use crate::common::*;
use serde_json::Value;

fn json(o: &Output) -> Value {
    serde_json::from_str(&o.stdout)
        .unwrap_or_else(|e| panic!("invalid JSON ({e}): {}{}", o.stdout, o.stderr))
}

/// Starts `vbd serve` in its own temp directory on an object export.
fn serve(tag: &str, export: &str, wal: &str, env: &[(&str, &str)]) -> Vbd {
    Vbd::start_with(
        TempDir::new(tag),
        &["--wal-dir", wal, "--export", export],
        env,
    )
}

/// 32 MiB written through one server (which drains its WAL to RGW on
/// SIGTERM) and read back through another with an empty WAL, so every byte
/// comes from the cluster.
#[test]
fn round_trip_through_ceph_rgw() {
    let Some(rgw) = ceph_common::rgw() else {
        return;
    };
    require("nbdcopy", "libnbd-bin");
    let env = rgw.s3_env();
    let store = rgw.store("round-trip");
    let dir = TempDir::new("rt-rgw");
    let wal = |n: u32| dir.join(&format!("wal{n}")).display().to_string();
    let o = vbd_cmd(
        &["volume", "create", "--store", &store, "rt", "--size", "64M"],
        &env,
    );
    assert!(o.status.success(), "{}", o.stderr);
    let mut v = serve("rt-rgw-a", &format!("name=rt,store={store}"), &wal(1), &env);
    let src = dir.join("src");
    write_pattern_file(&src, 17, 32 << 20);
    run(Command::new("nbdcopy").arg(&src).arg(v.uri("rt")));
    v.stop();
    let i = json(&vbd_cmd(&["volume", "info", "--store", &store, "rt"], &env));
    assert!(
        i["chunks"].as_u64().unwrap_or(0) >= 8,
        "data reached RGW as chunks: {i}"
    );
    let mut v = serve("rt-rgw-b", &format!("name=rt,store={store}"), &wal(2), &env);
    let back = dir.join("back");
    run(Command::new("nbdcopy").arg(v.uri("rt")).arg(&back));
    assert_bytes_eq(
        &std::fs::read(&back).unwrap()[..32 << 20],
        &std::fs::read(&src).unwrap(),
        &store,
    );
    v.stop();
}

/// The writer lock is a create-if-absent PUT (`If-None-Match: *`), which
/// RGW enforces: a second server is refused while the first holds the
/// volume, and a clean stop releases it.
#[test]
fn writer_lock_holds_on_ceph_rgw() {
    let Some(rgw) = ceph_common::rgw() else {
        return;
    };
    let env = rgw.s3_env();
    let store = rgw.store("lock");
    let dir = TempDir::new("lock-rgw");
    let wal = |n: u32| dir.join(&format!("wal{n}")).display().to_string();
    let o = vbd_cmd(
        &["volume", "create", "--store", &store, "l", "--size", "16M"],
        &env,
    );
    assert!(o.status.success(), "{}", o.stderr);
    let spec = format!("name=l,store={store}");
    let mut v = serve("lock-rgw-a", &spec, &wal(1), &env);
    let second = vbd_cmd(
        &[
            "serve",
            "--unix",
            &dir.join("s2.sock").display().to_string(),
            "--wal-dir",
            &wal(2),
            "--export",
            &spec,
        ],
        &env,
    );
    assert!(
        !second.status.success(),
        "a second writer was let in: {}",
        second.stdout
    );
    assert!(
        second.stderr.contains("open for writing"),
        "{}",
        second.stderr
    );
    let i = json(&vbd_cmd(&["volume", "info", "--store", &store, "l"], &env));
    assert!(
        i["locked_by"]
            .as_str()
            .is_some_and(|s| s.contains(&format!("pid {}", v.pid()))),
        "the first server holds the lock: {i}"
    );
    v.stop();
    let i = json(&vbd_cmd(&["volume", "info", "--store", &store, "l"], &env));
    assert!(i["locked_by"].is_null(), "a clean stop releases it: {i}");
    let mut v = serve("lock-rgw-b", &spec, &wal(2), &env);
    v.stop();
}
