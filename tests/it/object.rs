//! Object-store volumes through the real `vbd` binary and real clients:
//! pattern I/O, copies, a sparse terabyte, the CLI, the writer lock, every
//! store kind (local directory, the embedded S3 endpoint, moto), and crash
//! consistency under SIGKILL.

use crate::common;
use crate::stores;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::crash_common::{Allowed, crash_seed, tag_of};
use common::*;
use serde_json::Value;

/// A scratch directory with a local store and WAL roots.
struct Env {
    dir: TempDir,
}

impl Env {
    fn new(tag: &str) -> Env {
        Env {
            dir: TempDir::new(tag),
        }
    }
    fn store(&self) -> String {
        format!("file://{}", self.dir.join("store").display())
    }
    fn wal(&self, n: u32) -> String {
        self.dir.join(&format!("wal{n}")).display().to_string()
    }
}

/// Starts `vbd serve` in its own temp directory on an object export.
fn serve(tag: &str, export: &str, wal: &str, env: &[(&str, &str)]) -> Vbd {
    Vbd::start_with(
        TempDir::new(tag),
        &["--wal-dir", wal, "--export", export],
        env,
    )
}

fn json(o: &Output) -> Value {
    serde_json::from_str(&o.stdout)
        .unwrap_or_else(|e| panic!("invalid JSON ({e}): {}{}", o.stdout, o.stderr))
}

#[test]
fn object_export_serves_qemu_io_patterns_and_nbdcopy() {
    require("qemu-io", "qemu-utils");
    require("nbdcopy", "libnbd-bin");
    let e = Env::new("obj-io");
    let spec = format!("name=os,store={},size=64M", e.store());
    let mut v = serve("obj-io-srv", &spec, &e.wal(1), &[]);
    let info = json(&run(Command::new("nbdinfo").arg("--json").arg(v.uri("os"))));
    assert_eq!(
        info["exports"][0]["block_size_minimum"], 4096,
        "object volumes work in 4 KiB blocks"
    );
    qemu_io_scattered(&v, "os", 64 * MIB);
    let src = e.dir.join("src");
    write_pattern_file(&src, 3, 48 << 20);
    run(Command::new("nbdcopy").arg(&src).arg(v.uri("os")));
    let back = e.dir.join("back");
    run(Command::new("nbdcopy").arg(v.uri("os")).arg(&back));
    assert_bytes_eq(
        &std::fs::read(&back).unwrap()[..48 << 20],
        &std::fs::read(&src).unwrap(),
        "copy",
    );
    v.stop();
    // A second server, with an empty WAL, reads the same data from the store.
    let mut v = serve(
        "obj-io-srv2",
        &format!("name=os,store={}", e.store()),
        &e.wal(2),
        &[],
    );
    let back2 = e.dir.join("back2");
    run(Command::new("nbdcopy").arg(v.uri("os")).arg(&back2));
    assert_bytes_eq(
        &std::fs::read(&back2).unwrap()[..48 << 20],
        &std::fs::read(&src).unwrap(),
        "from the store",
    );
    v.stop();
}

#[test]
fn terabyte_volume_is_instant_and_sparse() {
    require("nbdinfo", "libnbd-bin");
    let e = Env::new("obj-tb");
    let store = e.store();
    let t = Instant::now();
    let out = vbd_cmd(
        &["volume", "create", "--store", &store, "big", "--size", "1T"],
        &[],
    );
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "creating 1 TiB took {:?}",
        t.elapsed()
    );
    let info = |e: &Env| -> Value {
        json(&vbd_cmd(
            &["volume", "info", "--store", &e.store(), "big"],
            &[],
        ))
    };
    let i = info(&e);
    assert_eq!(i["size"], 1u64 << 40);
    assert!(
        i["stored_bytes"].as_u64().unwrap() < 4096,
        "an empty volume stores only its descriptor: {i}"
    );
    let mut v = serve(
        "obj-tb-srv",
        &format!("name=big,store={store}"),
        &e.wal(1),
        &[],
    );
    let uri = v.uri("big");
    let m = json(&run(Command::new("nbdinfo")
        .args(["--map", "--json"])
        .arg(&uri)));
    assert_eq!(m.as_array().unwrap().len(), 1, "one hole: {m}");
    assert_eq!(m[0]["length"], 1u64 << 40);
    qemu_io(
        &[],
        &[
            format!("write -P 0x5c {} 1M", (1u64 << 40) - MIB),
            "flush".into(),
        ],
        &uri,
    );
    qemu_io(
        &["-r"],
        &[
            format!("read -P 0x5c {} 1M", (1u64 << 40) - MIB),
            "read -P 0 0 1M".into(),
        ],
        &uri,
    );
    v.stop();
    let i = info(&e);
    let stored = i["stored_bytes"].as_u64().unwrap();
    assert!(
        stored > 1 << 20 && stored < 4 << 20,
        "1 MiB written costs about 1 MiB: {i}"
    );
}

#[test]
fn volume_cli_and_writer_lock() {
    let e = Env::new("obj-cli");
    let store = e.store();
    let ok = |args: &[&str]| {
        let o = vbd_cmd(args, &[]);
        assert!(o.status.success(), "vbd {args:?}: {}", o.stderr);
        o.stdout
    };
    let fails = vbd_fails;
    ok(&["volume", "create", "--store", &store, "a", "--size", "1G"]);
    ok(&[
        "volume", "create", "--store", &store, "b-efi", "--size", "64M",
    ]);
    assert!(
        fails(&["volume", "create", "--store", &store, "a", "--size", "1G"])
            .contains("already exists")
    );
    // No name reaches outside the store's volumes/ or the WAL directory.
    for name in ["../x", "a/b", "", "..", "a/../b", "/etc"] {
        for args in [
            &["volume", "create", "--store", &store, name, "--size", "1G"][..],
            &["volume", "info", "--store", &store, name],
            &["volume", "delete", "--store", &store, name],
        ] {
            let msg = fails(args);
            assert!(msg.contains("invalid"), "{args:?}: {msg}");
        }
        let spec = format!("name=ok,store={store},volume={name}");
        let sock = e.dir.join("bad.sock").display().to_string();
        let msg = fails(&["serve", "--unix", &sock, "--export", &spec]);
        assert!(msg.contains("invalid"), "--export {spec}: {msg}");
    }
    assert!(
        fails(&["volume", "create", "--store", &store, "c", "--size", "1000"])
            .contains("multiple of 4096")
    );
    assert!(fails(&["volume", "info", "--store", &store, "nope"]).contains("does not exist"));
    assert!(fails(&["volume", "list", "--store", "ftp://x"]).contains("not understood"));
    assert_eq!(
        ok(&["volume", "list", "--store", &store]),
        "a\t1073741824\nb-efi\t67108864\n"
    );
    // A serving vbd holds the writer lock: a second one and delete refuse.
    let mut v = serve(
        "obj-cli-srv",
        &format!("name=a,store={store}"),
        &e.wal(1),
        &[],
    );
    let second = vbd_cmd(
        &[
            "serve",
            "--unix",
            &e.dir.join("s2.sock").display().to_string(),
            "--wal-dir",
            &e.wal(2),
            "--export",
            &format!("name=a,store={store}"),
        ],
        &[],
    );
    assert!(!second.status.success());
    assert!(
        second.stderr.contains("open for writing"),
        "{}",
        second.stderr
    );
    let i: Value = serde_json::from_str(&ok(&["volume", "info", "--store", &store, "a"])).unwrap();
    assert!(
        i["locked_by"]
            .as_str()
            .unwrap()
            .contains(&format!("pid {}", v.pid()))
    );
    assert!(fails(&["volume", "delete", "--store", &store, "a"]).contains("open for writing"));
    v.stop();
    let i: Value = serde_json::from_str(&ok(&["volume", "info", "--store", &store, "a"])).unwrap();
    assert!(
        i["locked_by"].is_null(),
        "a clean stop releases the lock: {i}"
    );
    ok(&["volume", "delete", "--store", &store, "a"]);
    assert_eq!(
        ok(&["volume", "list", "--store", &store]),
        "b-efi\t67108864\n"
    );
}

/// Round-trips 32 MiB through a store: written via one server (which drains
/// to the store on SIGTERM), read back via another with an empty WAL.
fn store_round_trip(tag: &str, store: &str, env: &[(&str, &str)]) {
    require("nbdcopy", "libnbd-bin");
    let e = Env::new(tag);
    let o = vbd_cmd(
        &["volume", "create", "--store", store, "rt", "--size", "64M"],
        env,
    );
    assert!(o.status.success(), "{}", o.stderr);
    let mut v = serve(
        &format!("{tag}-a"),
        &format!("name=rt,store={store}"),
        &e.wal(1),
        env,
    );
    let src = e.dir.join("src");
    write_pattern_file(&src, 11, 32 << 20);
    run(Command::new("nbdcopy").arg(&src).arg(v.uri("rt")));
    v.stop();
    let i = json(&vbd_cmd(&["volume", "info", "--store", store, "rt"], env));
    assert!(
        i["chunks"].as_u64().unwrap_or(0) >= 8,
        "data reached the store as chunks: {i}"
    );
    let mut v = serve(
        &format!("{tag}-b"),
        &format!("name=rt,store={store}"),
        &e.wal(2),
        env,
    );
    let back = e.dir.join("back");
    run(Command::new("nbdcopy").arg(v.uri("rt")).arg(&back));
    assert_bytes_eq(
        &std::fs::read(&back).unwrap()[..32 << 20],
        &std::fs::read(&src).unwrap(),
        store,
    );
    v.stop();
}

#[test]
fn round_trip_through_a_local_directory() {
    let e = Env::new("rt-dir");
    store_round_trip("rt-dir", &e.store(), &[]);
}

#[test]
fn round_trip_through_the_embedded_s3_endpoint() {
    let e = Env::new("rt-s3s");
    let store = stores::embedded(&e.dir);
    let endpoint = store.endpoint().expect("an S3 endpoint").to_owned();
    // Wrong credentials are refused by SigV4.
    let bad = vbd_cmd(
        &["volume", "list", "--store", &store.url],
        &[
            ("AWS_ACCESS_KEY_ID", stores::KEY),
            ("AWS_SECRET_ACCESS_KEY", "wrong"),
            ("AWS_ENDPOINT_URL", &endpoint),
            ("AWS_REGION", "us-east-1"),
        ],
    );
    assert!(
        !bad.status.success(),
        "a wrong secret must not list: {}",
        bad.stdout
    );
    store_round_trip("rt-s3s", &store.url, &store.env());
}

#[test]
fn round_trip_through_moto() {
    let store = stores::moto();
    store_round_trip("rt-moto", &store.url, &store.env());
}

/// The writer for the crash test: a libnbd client doing random 4 KiB writes,
/// FUA writes, zeroing and flushes, printing each operation before it is
/// issued ("I ...") and after it is acknowledged ("A ...").
const WRITER: &str = r#"
import nbd, sys, random, struct
uri, seed, nblocks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rnd = random.Random(seed)
h = nbd.NBD()
h.connect_uri(uri)
def out(*a):
    sys.stdout.write(" ".join(str(x) for x in a) + "\n")
    sys.stdout.flush()
i = 0
try:
    while True:
        r = rnd.random()
        if r < 0.06:
            out("I", "F"); h.flush(); out("A", "F")
        else:
            blk = rnd.randrange(nblocks)
            fua = 1 if rnd.random() < 0.15 else 0
            flags = nbd.CMD_FLAG_FUA if fua else 0
            if r < 0.10:
                out("I", "W", blk, 0, fua); h.zero(4096, blk * 4096, flags); out("A", "W", blk, 0, fua)
            else:
                tag = seed * 1000000 + i + 1
                data = struct.pack("<QQ", tag, blk) * 256
                out("I", "W", blk, tag, fua); h.pwrite(data, blk * 4096, flags); out("A", "W", blk, tag, fua)
        i += 1
except Exception as e:
    out("E", e)
"#;

#[test]
fn acknowledged_writes_survive_sigkill_50_rounds() {
    require("nbdcopy", "libnbd-bin");
    let e = Env::new("crash");
    let store = e.store();
    let wal = e.wal(1);
    let nblocks = 2048u64;
    let spec = format!("name=c,store={store},size=16M");
    let (seed0, mut next) = crash_seed();
    let mut allowed: HashMap<u64, Allowed> = HashMap::new();
    let mut v = serve("crash-srv", &spec, &wal, &[]);
    let mut total_acked = 0;
    for round in 1..=50u64 {
        let writer = Command::new("/usr/bin/python3")
            .args([
                "-c",
                WRITER,
                &v.uri("c"),
                &(seed0 % 1000 + round).to_string(),
                &nblocks.to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start writer");
        // Let it run a random while, then pull the plug on the server.
        std::thread::sleep(Duration::from_millis(100 + next() % 400));
        v.kill();
        let out = writer.wait_with_output().expect("writer output");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut acked = 0;
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            match f.as_slice() {
                ["I", "W", blk, tag, _] => {
                    let a = allowed.entry(blk.parse().unwrap()).or_default();
                    a.maybe.push(tag.parse().unwrap());
                }
                ["A", "W", blk, tag, fua] => {
                    acked += 1;
                    if *fua == "1" {
                        let a = allowed.entry(blk.parse().unwrap()).or_default();
                        a.durable = tag.parse().unwrap();
                        a.maybe.clear();
                    }
                }
                ["A", "F"] => {
                    // Everything acknowledged before the flush is durable:
                    // each block's last acknowledged write.
                    for a in allowed.values_mut() {
                        if let Some(&last) = a.maybe.last() {
                            a.durable = last;
                            a.maybe.clear();
                        }
                    }
                }
                _ => {}
            }
        }
        total_acked += acked;
        // Restart: recovery from store and WAL, then check every block.
        v = serve("crash-srv", &format!("name=c,store={store}"), &wal, &[]);
        let dump = e.dir.join("dump");
        run(Command::new("nbdcopy").arg(v.uri("c")).arg(&dump));
        let data = std::fs::read(&dump).unwrap();
        for blk in 0..nblocks {
            let block = &data[blk as usize * 4096..(blk as usize + 1) * 4096];
            let a = allowed.entry(blk).or_default();
            let Some(tag) = tag_of(block, blk) else {
                panic!(
                    "round {round}: block {blk} is corrupt (neither zero nor a whole written block)"
                );
            };
            assert!(
                tag == a.durable || a.maybe.contains(&tag),
                "round {round}: block {blk} holds {tag}, but must hold {} (or one of {:?})",
                a.durable,
                a.maybe
            );
            // What recovery produced is now the durable baseline.
            a.durable = tag;
            a.maybe.clear();
        }
    }
    assert!(
        total_acked > 1000,
        "the writers made progress: {total_acked} acknowledged writes"
    );
    v.stop();
}

/// The control API creates object volumes too (`vbd vm volume create
/// --backend object`), and deleting one drains it and drops its lock.
#[test]
fn control_api_creates_and_releases_object_volumes() {
    let e = Env::new("obj-ctl");
    let store = e.store();
    let v = serve(
        "obj-ctl-srv",
        "name=m,backend=memory,size=1M",
        &e.wal(0),
        &[],
    );
    let control = v.path("control.sock");
    let control = control.to_str().unwrap();
    let ctl = |args: &[&str]| {
        let mut all = vec!["vm", "volume"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--control", control]);
        vbd_cmd(&all, &[])
    };
    let o = ctl(&[
        "create",
        "vol1",
        "--backend",
        "object",
        "--store",
        &store,
        "--size",
        "64M",
    ]);
    assert!(o.status.success(), "create: {}{}", o.stdout, o.stderr);
    let o = ctl(&["list"]);
    assert!(o.stdout.contains("vol1"), "list: {}", o.stdout);
    let info = json(&vbd_cmd(
        &["volume", "info", "--store", &store, "vol1"],
        &[],
    ));
    assert_eq!(info["size"], 64 << 20);
    assert!(
        !info["locked_by"].is_null(),
        "the serving vbd holds the writer lock: {info}"
    );
    let o = ctl(&["create", "nosize", "--backend", "object", "--store", &store]);
    assert!(
        !o.status.success(),
        "a missing volume without --size is refused"
    );
    assert!(o.stderr.contains("does not exist"), "{}", o.stderr);
    let o = ctl(&["delete", "vol1"]);
    assert!(o.status.success(), "delete: {}{}", o.stdout, o.stderr);
    let info = json(&vbd_cmd(
        &["volume", "info", "--store", &store, "vol1"],
        &[],
    ));
    assert!(
        info["locked_by"].is_null(),
        "deleting from the catalog released the lock: {info}"
    );
}
