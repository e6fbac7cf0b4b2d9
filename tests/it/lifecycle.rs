//! The volume lifecycle (issue 14) through the real `vbd` binary and real
//! peers: import of raw and qcow2 images compared with `qemu-img compare`
//! over NBD, sparse export, snapshots while a client writes and flushes,
//! clone isolation, 16-deep chains, flatten and refused deletes, live
//! resize, garbage collection back to the golden image's size, on a local
//! directory, the embedded S3 endpoint and moto.

use crate::common;
use crate::stores;

use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A scratch directory with a store (local unless given) and WAL roots.
struct Env {
    dir: TempDir,
    store: String,
    env: Vec<(String, String)>,
}

impl Env {
    fn local(tag: &str) -> Env {
        let dir = TempDir::new(tag);
        let store = format!("file://{}", dir.join("store").display());
        Env {
            dir,
            store,
            env: Vec::new(),
        }
    }

    fn wal(&self) -> String {
        self.dir.join("wal").display().to_string()
    }

    fn env(&self) -> Vec<(&str, &str)> {
        self.env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    /// `vbd volume ARGS --store STORE --wal-dir WAL`, which must succeed.
    fn vol(&self, args: &[&str]) -> String {
        let o = self.vol_out(args);
        assert!(
            o.status.success(),
            "vbd volume {args:?}: {}{}",
            o.stdout,
            o.stderr
        );
        o.stdout
    }

    fn vol_out(&self, args: &[&str]) -> Output {
        let mut all = vec!["volume"];
        all.extend_from_slice(args);
        let wal = self.wal();
        let routed = !matches!(args[0], "create" | "list" | "info" | "snapshots" | "clone");
        all.extend_from_slice(&["--store", &self.store]);
        if routed {
            all.extend_from_slice(&["--wal-dir", &wal]);
        }
        vbd_cmd(&all, &self.env())
    }

    fn info(&self, name: &str) -> Value {
        serde_json::from_str(&self.vol(&["info", name])).unwrap()
    }

    /// Starts `vbd serve` with these exports (store and WAL filled in).
    fn serve(&self, exports: &[&str]) -> Vbd {
        let mut args = vec!["--wal-dir".to_owned(), self.wal()];
        for e in exports {
            args.push("--export".into());
            args.push(format!("{e},store={}", self.store));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Vbd::start_with(TempDir::new("lc-srv"), &args, &self.env())
    }

    /// A volume's (or snapshot's) bytes, exported to a file.
    fn export(&self, name: &str) -> Vec<u8> {
        let out = self
            .dir
            .join(&format!("export-{}", name.replace('@', "-at-")));
        self.vol(&["export", name, out.to_str().unwrap()]);
        std::fs::read(&out).unwrap()
    }

    /// Bytes of chunk objects in the store (local stores only).
    fn chunk_bytes(&self) -> u64 {
        let root = self.dir.join("store");
        let mut total = 0;
        let mut dirs = vec![root];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.to_string_lossy().contains("/chunks/") {
                    total += e.metadata().unwrap().len();
                }
            }
        }
        total
    }
}

/// A raw image: pattern data, a run of written zeroes, a hole, more data.
fn make_image(path: &std::path::Path) -> Vec<u8> {
    let mut img = pattern(7, 3 << 20);
    img.extend(vec![0u8; 2 << 20]);
    img.extend(pattern(8, 1 << 20));
    std::fs::write(path, &img).unwrap();
    // A hole of 4 MiB, then a last MiB of data.
    let f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.set_len(img.len() as u64 + (4 << 20)).unwrap();
    drop(f);
    let tail = pattern(9, 1 << 20);
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(&tail, img.len() as u64 + (4 << 20))
        .unwrap();
    img.extend(vec![0u8; 4 << 20]);
    img.extend(tail);
    img
}

#[test]
fn import_raw_and_qcow2_compare_over_nbd_and_export_sparse() {
    require("qemu-img", "qemu-utils");
    let e = Env::local("lc-import");
    let raw = e.dir.join("img.raw");
    let img = make_image(&raw);
    let qcow = e.dir.join("img.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow));
    let out = e.vol(&["import", "r", raw.to_str().unwrap()]);
    assert!(out.contains("imported"), "{out}");
    e.vol(&["import", "q", qcow.to_str().unwrap()]);
    let i = e.info("r");
    assert_eq!(i["size"], img.len() as u64);
    let stored = i["stored_bytes"].as_u64().unwrap();
    assert!(
        stored < (5 << 20) + (256 << 10),
        "5 MiB of data, zeroes and holes not stored: {stored}"
    );
    // Both volumes equal the source, byte for byte, read over NBD.
    let v = e.serve(&["name=r,volume=r,read-only", "name=q,volume=q,read-only"]);
    for name in ["r", "q"] {
        let o = run(Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&raw)
            .arg(v.uri(name)));
        assert!(o.stdout.contains("identical"), "{name}: {}", o.stdout);
    }
    drop(v);
    // Export: the same bytes, with holes where the volume has none.
    let out = e.dir.join("out.raw");
    e.vol(&["export", "q", out.to_str().unwrap()]);
    assert_files_eq(&out, &raw);
    let allocated = std::fs::metadata(&out).unwrap().blocks() * 512;
    assert!(
        allocated <= 5 << 20,
        "the export is sparse: {allocated} bytes allocated for 5 MiB of data"
    );
    // Names and refusals.
    let o = e.vol_out(&["import", "r", raw.to_str().unwrap()]);
    assert!(o.stderr.contains("already exists"), "{}", o.stderr);
    let o = e.vol_out(&["import", "bad/name", raw.to_str().unwrap()]);
    assert!(o.stderr.contains("invalid"), "{}", o.stderr);
    let o = e.vol_out(&["export", "r@nope", out.to_str().unwrap()]);
    assert!(o.stderr.contains("no snapshot"), "{}", o.stderr);
    let o = e.vol_out(&["export", "nope", out.to_str().unwrap()]);
    assert!(o.stderr.contains("does not exist"), "{}", o.stderr);
}

#[test]
fn interrupted_import_deletes_what_it_made() {
    let e = Env::local("lc-intr");
    let raw = e.dir.join("big.raw");
    write_pattern_file(&raw, 3, 256 << 20);
    let mut child = Command::new(env!("CARGO_BIN_EXE_vbd"))
        .args([
            "volume",
            "import",
            "--store",
            &e.store,
            "--wal-dir",
            &e.wal(),
            "big",
        ])
        .arg(&raw)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the import has begun (its volume exists), then interrupt.
    let start = Instant::now();
    while !e.dir.join("store/volumes/big/volume.json").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "import never began"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    signal(&child, libc::SIGINT);
    let status = wait_deadline(&mut child, Duration::from_secs(60)).unwrap();
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success(), "an interrupted import fails: {err}");
    assert!(err.contains("interrupted"), "{err}");
    assert_eq!(e.vol(&["list"]), "", "nothing left behind: {err}");
    assert!(!e.dir.join("store/volumes/big").exists() || e.chunk_bytes() == 0);
}

/// The writer for the snapshot test: one thread writes and flushes, the
/// main thread takes snapshots through the CLI at random moments; each
/// event is printed in order under one lock.
const SNAP_WRITER: &str = r#"
import nbd, sys, random, struct, threading, subprocess, time
uri, vbd, store, ctl, nblocks, snaps = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
lock = threading.Lock()
def out(*a):
    with lock:
        sys.stdout.write(" ".join(str(x) for x in a) + "\n")
        sys.stdout.flush()
h = nbd.NBD()
h.connect_uri(uri)
done = threading.Event()
def writer():
    rnd = random.Random(5)
    i = 0
    while not done.is_set():
        if rnd.random() < 0.1:
            out("I", "F"); h.flush(); out("A", "F")
            continue
        blk = rnd.randrange(nblocks)
        i += 1
        tag = i
        out("I", "W", blk, tag)
        h.pwrite(struct.pack("<QQ", tag, blk) * 256, blk * 4096)
        out("A", "W", blk, tag)
t = threading.Thread(target=writer)
t.start()
for n in range(snaps):
    time.sleep(0.3)
    out("S", "begin", n)
    subprocess.run([vbd, "volume", "snapshot", "--store", store, "--control", ctl, "v@s%d" % n], check=True,
                   stdout=subprocess.DEVNULL)
    out("S", "end", n)
done.set()
t.join()
"#;

#[test]
fn snapshots_hold_exactly_what_was_acknowledged_before_them() {
    require_python_nbd();
    let e = Env::local("lc-snap");
    let nblocks = 512u64;
    e.vol(&["create", "v", "--size", "2M"]);
    let v = e.serve(&["name=v,volume=v"]);
    let out = run(Command::new(SYSTEM_PYTHON).args([
        "-c",
        SNAP_WRITER,
        &v.uri("v"),
        env!("CARGO_BIN_EXE_vbd"),
        &e.store,
        v.path("control.sock").to_str().unwrap(),
        &nblocks.to_string(),
        "4",
    ]));
    std::fs::write(e.dir.join("writer.log"), &out.stdout).unwrap();
    // Per snapshot: each block's last write acknowledged before it began
    // must be there, or a write in flight then or issued before it ended.
    let mut last_acked = vec![0u64; nblocks as usize];
    let mut issued: Vec<Vec<u64>> = vec![Vec::new(); nblocks as usize];
    let mut in_flight: Vec<Option<u64>> = vec![None; nblocks as usize];
    let mut floor: Vec<Vec<u64>> = Vec::new();
    let mut allowed: Vec<Vec<Vec<u64>>> = Vec::new();
    for line in out.stdout.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["I", "W", b, t] => {
                let b = b.parse::<usize>().unwrap();
                issued[b].push(t.parse().unwrap());
                in_flight[b] = Some(t.parse().unwrap());
            }
            ["A", "W", b, t] => {
                let b = b.parse::<usize>().unwrap();
                last_acked[b] = t.parse().unwrap();
                in_flight[b] = None;
            }
            ["S", "begin", _] => {
                floor.push(last_acked.clone());
                for (i, f) in issued.iter_mut().zip(&in_flight) {
                    i.clear();
                    i.extend(f);
                }
            }
            ["S", "end", _] => allowed.push(issued.clone()),
            _ => {}
        }
    }
    assert_eq!(floor.len(), 4, "{}", out.stdout);
    for n in 0..4 {
        let data = e.export(&format!("v@s{n}"));
        for blk in 0..nblocks as usize {
            let b = &data[blk * 4096..(blk + 1) * 4096];
            let tag = u64::from_le_bytes(b[..8].try_into().unwrap());
            let want = floor[n][blk];
            assert!(
                tag == want || allowed[n][blk].contains(&tag),
                "snapshot s{n} block {blk}: holds {tag}, must hold {want} (or one of {:?})",
                allowed[n][blk]
            );
            if tag != 0 {
                let mut whole = Vec::new();
                for _ in 0..256 {
                    whole.extend_from_slice(&tag.to_le_bytes());
                    whole.extend_from_slice(&(blk as u64).to_le_bytes());
                }
                assert_bytes_eq(b, &whole, &format!("snapshot s{n} block {blk}"));
            }
        }
    }
    let list = e.vol(&["snapshots", "v"]);
    assert_eq!(list.lines().count(), 5, "{list}");
}

#[test]
fn clones_are_isolated_chains_flatten_and_deletes_are_refused() {
    require("qemu-io", "qemu-utils");
    let e = Env::local("lc-clone");
    e.vol(&["create", "gold", "--size", "8M"]);
    let v = e.serve(&["name=gold,volume=gold"]);
    qemu_io(&[], &["write -P 0x11 0 8M".into()], &v.uri("gold"));
    drop(v);
    e.vol(&["snapshot", "gold@base"]);
    e.vol(&["clone", "gold@base", "a"]);
    e.vol(&["clone", "gold@base", "b"]);
    let o = e.vol_out(&["clone", "gold@base", "a"]);
    assert!(o.stderr.contains("already exists"), "{}", o.stderr);
    let o = e.vol_out(&["clone", "gold@nope", "c"]);
    assert!(o.stderr.contains("no snapshot"), "{}", o.stderr);
    let o = e.vol_out(&["snapshot", "gold@base"]);
    assert!(o.stderr.contains("already has a snapshot"), "{}", o.stderr);
    // Each clone writes its own MiB; the parent writes too, after.
    let v = e.serve(&[
        "name=gold,volume=gold",
        "name=a,volume=a",
        "name=b,volume=b",
        "name=base,volume=gold@base",
    ]);
    qemu_io(&[], &["write -P 0xaa 1M 1M".into()], &v.uri("a"));
    qemu_io(&[], &["write -P 0xbb 2M 1M".into()], &v.uri("b"));
    qemu_io(&[], &["write -P 0x99 3M 1M".into()], &v.uri("gold"));
    let check = |name: &str, cmds: &[String]| qemu_io(&["-r"], cmds, &v.uri(name));
    check(
        "a",
        &[
            "read -P 0x11 0 1M".into(),
            "read -P 0xaa 1M 1M".into(),
            "read -P 0x11 2M 6M".into(),
        ],
    );
    check(
        "b",
        &[
            "read -P 0x11 0 2M".into(),
            "read -P 0xbb 2M 1M".into(),
            "read -P 0x11 3M 5M".into(),
        ],
    );
    check(
        "gold",
        &[
            "read -P 0x11 0 3M".into(),
            "read -P 0x99 3M 1M".into(),
            "read -P 0x11 4M 4M".into(),
        ],
    );
    // The snapshot, served: what it was, and read-only.
    check("base", &["read -P 0x11 0 8M".into()]);
    let o = output(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write 0 4k"])
            .arg(v.uri("base")),
    );
    assert!(
        !o.status.success() || o.stdout.contains("failed") || o.stderr.contains("failed"),
        "a served snapshot refuses writes: {}{}",
        o.stdout,
        o.stderr
    );
    drop(v);
    let base = e.export("gold@base");
    assert!(
        base.iter().all(|&b| b == 0x11),
        "the snapshot never changes"
    );
    // Refused while needed, naming what needs it.
    let o = e.vol_out(&["delete", "gold@base"]);
    assert!(
        o.stderr.contains("clone a") && o.stderr.contains("clone b"),
        "{}",
        o.stderr
    );
    let o = e.vol_out(&["delete", "gold"]);
    assert!(o.stderr.contains("still needed"), "{}", o.stderr);
    // Flatten a, delete b: now gold and its snapshot may go.
    e.vol(&["flatten", "a"]);
    let i = e.info("a");
    assert_eq!(
        (i["parent"].clone(), i["shared_bytes"].clone()),
        (Value::Null, 0.into()),
        "{i}"
    );
    e.vol(&["delete", "b"]);
    e.vol(&["delete", "gold@base"]);
    e.vol(&["delete", "gold"]);
    let a = e.export("a");
    let mut want = vec![0x11u8; 8 << 20];
    want[1 << 20..2 << 20].fill(0xaa);
    assert_bytes_eq(&a, &want, "a after its parent is gone");
}

#[test]
fn sixteen_deep_chain_reads_every_level() {
    let e = Env::local("lc-chain");
    let img = e.dir.join("img");
    std::fs::write(&img, vec![0u8; 64 * 4096]).unwrap();
    e.vol(&["import", "l0", img.to_str().unwrap()]);
    let mut want = vec![0u8; 64 * 4096];
    for level in 0..17u8 {
        let name = format!("l{level}");
        // Each level writes one block of its own, through a server.
        let v = e.serve(&[&format!("name={name},volume={name}")]);
        let off = u64::from(level) * 4096;
        qemu_io(
            &[],
            &[format!("write -P {} {off} 4k", level + 1)],
            &v.uri(&name),
        );
        drop(v);
        want[off as usize..off as usize + 4096].fill(level + 1);
        e.vol(&["snapshot", &format!("{name}@s")]);
        e.vol(&["clone", &format!("{name}@s"), &format!("l{}", level + 1)]);
    }
    let i = e.info("l17");
    assert_eq!(i["ancestors"].as_array().unwrap().len(), 17, "{i}");
    assert_bytes_eq(&e.export("l17"), &want, "17 levels down");
    let mut mid = want.clone();
    mid[9 * 4096..].fill(0);
    assert_bytes_eq(&e.export("l8@s"), &mid, "a snapshot in the middle");
}

#[test]
fn resize_grows_a_served_volume_for_new_connections() {
    require("nbdinfo", "libnbd-bin");
    let e = Env::local("lc-resize");
    e.vol(&["create", "v", "--size", "16M"]);
    let v = e.serve(&["name=v,volume=v"]);
    let size = |v: &Vbd| -> u64 {
        let o = run(Command::new("nbdinfo").args(["--size", &v.uri("v")]));
        o.stdout.trim().parse().unwrap()
    };
    assert_eq!(size(&v), 16 << 20);
    qemu_io(&[], &["write -P 0x42 15M 1M".into()], &v.uri("v"));
    // Routed to the server that has it open (its lock says so).
    let out = e.vol(&["resize", "v", "64M"]);
    assert!(out.contains("to 67108864"), "{out}");
    assert_eq!(size(&v), 64 << 20, "a new connection sees the new size");
    qemu_io(
        &["-r"],
        &["read -P 0x42 15M 1M".into(), "read -P 0 16M 48M".into()],
        &v.uri("v"),
    );
    let o = e.vol_out(&["resize", "v", "8M"]);
    assert!(o.stderr.contains("--allow-shrink"), "{}", o.stderr);
    let o = e.vol_out(&["resize", "v", "1000"]);
    assert!(o.stderr.contains("multiple of 4096"), "{}", o.stderr);
    e.vol(&["resize", "v", "8M", "--allow-shrink"]);
    assert_eq!(size(&v), 8 << 20);
    drop(v);
    assert_eq!(e.info("v")["size"], 8 << 20);
}

#[test]
fn gc_after_deleting_clones_and_snapshots_returns_to_the_golden_size() {
    require("qemu-io", "qemu-utils");
    let e = Env::local("lc-gc");
    let img = e.dir.join("gold.raw");
    write_pattern_file(&img, 21, 16 << 20);
    e.vol(&["import", "gold", img.to_str().unwrap()]);
    let golden = e.chunk_bytes();
    e.vol(&["snapshot", "gold@v1"]);
    for c in ["c1", "c2", "c3"] {
        e.vol(&["clone", "gold@v1", c]);
    }
    let v = e.serve(&[
        "name=gold,volume=gold",
        "name=c1,volume=c1",
        "name=c2,volume=c2",
    ]);
    qemu_io(&[], &["write -P 1 0 4M".into()], &v.uri("c1"));
    qemu_io(&[], &["write -P 2 4M 4M".into()], &v.uri("c2"));
    // The parent rewrites everything the snapshot holds.
    qemu_io(&[], &["write -P 3 0 16M".into()], &v.uri("gold"));
    drop(v);
    e.vol(&["gc", "gold"]);
    assert_bytes_eq(
        &e.export("gold@v1"),
        &std::fs::read(&img).unwrap(),
        "pinned by v1",
    );
    assert!(
        e.chunk_bytes() > golden + (16 << 20),
        "both generations kept"
    );
    for c in ["c1", "c2", "c3"] {
        e.vol(&["delete", c]);
    }
    e.vol(&["delete", "gold@v1"]);
    e.vol(&["gc", "gold"]);
    let now = e.chunk_bytes();
    assert!(
        now <= golden + golden / 10,
        "back to the golden image's size: {now} bytes stored, golden {golden}"
    );
    let mut want = vec![3u8; 16 << 20];
    assert_bytes_eq(&e.export("gold"), &want, "gold's own data");
    want.clear();
}

/// Import, snapshot, clone, write, export and delete on one store.
fn lifecycle_on(e: &Env) {
    require("qemu-io", "qemu-utils");
    let raw = e.dir.join("img.raw");
    let img = make_image(&raw);
    e.vol(&["import", "gold", raw.to_str().unwrap()]);
    e.vol(&["snapshot", "gold@v1"]);
    e.vol(&["clone", "gold@v1", "c"]);
    let v = e.serve(&["name=c,volume=c"]);
    qemu_io(&[], &["write -P 0x5e 0 1M".into()], &v.uri("c"));
    drop(v);
    let mut want = img.clone();
    want[..1 << 20].fill(0x5e);
    assert_bytes_eq(&e.export("c"), &want, "the clone");
    assert_bytes_eq(&e.export("gold@v1"), &img, "the snapshot");
    let o = e.vol_out(&["delete", "gold@v1"]);
    assert!(o.stderr.contains("clone c"), "{}", o.stderr);
    e.vol(&["delete", "c"]);
    e.vol(&["delete", "gold@v1"]);
    e.vol(&["delete", "gold"]);
    assert_eq!(e.vol(&["list"]), "");
}

/// The environment of a store from `stores`, kept running by `_store`.
fn on_store(dir: TempDir, store: &stores::TestStore) -> Env {
    Env {
        dir,
        store: store.url.clone(),
        env: store
            .env()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    }
}

#[test]
fn lifecycle_on_the_embedded_s3_endpoint() {
    let dir = TempDir::new("lc-s3s");
    let store = stores::embedded(&dir);
    lifecycle_on(&on_store(dir, &store));
}

#[test]
fn lifecycle_on_moto() {
    let store = stores::moto();
    lifecycle_on(&on_store(TempDir::new("lc-moto"), &store));
}
