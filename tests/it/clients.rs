//! vbd against the real NBD clients VMs and operators use: qemu-io, qemu-img,
//! nbdinfo, nbdcopy, fio and libnbd (through its Python bindings). Every test
//! checks the data that comes back, not just exit codes.

use crate::common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn qemu_img(args: &[&str]) -> Output {
    require("qemu-img", "qemu-utils");
    run(Command::new("qemu-img").args(args))
}

fn python_nbd(script: &str, args: &[&str]) -> Output {
    require_python_nbd();
    run(Command::new(SYSTEM_PYTHON).arg("-c").arg(script).args(args))
}

fn nbdinfo_json(args: &[&str]) -> Value {
    require("nbdinfo", "libnbd-bin");
    let out = run(Command::new("nbdinfo").arg("--json").args(args));
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo printed invalid JSON ({e}):\n{}", out.stdout))
}

#[test]
fn qemu_io_patterns_on_memory_export() {
    let size = 16 * MIB;
    let vbd = Vbd::start("qio-mem", &["--export", "name=mem,backend=memory,size=16M"]);
    qemu_io_scattered(&vbd, "mem", size);
}

/// The scattered patterns on a 16 MiB file export, then the file itself
/// checked byte for byte after vbd stopped.
fn qemu_io_patterns_reach_the_file(tag: &str, options: &str) {
    let export = format!("name=disk,backend=file,path=disk.img,size=16M{options}");
    let mut vbd = Vbd::start(tag, &["--export", &export]);
    let model = qemu_io_scattered(&vbd, "disk", 16 * MIB);
    vbd.stop();
    let file = std::fs::read(vbd.path("disk.img")).unwrap();
    assert_bytes_eq(&file, &model, "disk.img after qemu-io writes");
}

#[test]
fn qemu_io_patterns_on_file_export_reach_the_file() {
    qemu_io_patterns_reach_the_file("qio-file", "");
}

#[test]
fn qemu_io_patterns_on_page_cache_file_export_reach_the_file() {
    qemu_io_patterns_reach_the_file("qio-buffered", ",direct=off");
}

#[test]
fn qemu_img_convert_in_and_out_is_identical() {
    let dir = TempDir::new("qemu-img");
    let size = 32 * MIB as usize;
    // Data, a zero gap and unaligned data; the export starts out full of
    // other data, so the zero gap only matches if qemu-img really zeroes it.
    let mut src = vec![0u8; size];
    src[..4 * MIB as usize].copy_from_slice(&pattern(1, 4 * MIB as usize));
    src[12 * MIB as usize..12 * MIB as usize + 12_345].copy_from_slice(&pattern(2, 12_345));
    src[size - 4096..].copy_from_slice(&pattern(3, 4096));
    std::fs::write(dir.join("src.img"), &src).unwrap();
    write_pattern_file(&dir.join("disk.img"), 99, size);
    let mut vbd = Vbd::start_in(dir, &["--export", "name=disk,backend=file,path=disk.img"]);
    let uri = vbd.uri("disk");
    let src_img = vbd.path("src.img");
    let src_img = src_img.to_str().unwrap();

    qemu_img(&["convert", "-n", "-f", "raw", "-O", "raw", src_img, &uri]);
    let out = qemu_img(&["compare", "-f", "raw", "-F", "raw", src_img, &uri]);
    assert!(
        out.stdout.contains("Images are identical"),
        "{}",
        out.stdout
    );

    let qcow2 = vbd.path("out.qcow2");
    let raw = vbd.path("out.raw");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &uri,
        qcow2.to_str().unwrap(),
    ]);
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &uri,
        raw.to_str().unwrap(),
    ]);
    let out = qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        qcow2.to_str().unwrap(),
        src_img,
    ]);
    assert!(
        out.stdout.contains("Images are identical"),
        "{}",
        out.stdout
    );
    assert_files_eq(&raw, &vbd.path("src.img"));

    vbd.stop();
    assert_files_eq(&vbd.path("disk.img"), &vbd.path("src.img"));
}

#[test]
fn nbdinfo_list_shows_every_export() {
    let vbd = Vbd::start(
        "nbdinfo-list",
        &[
            "--export",
            "name=mem,backend=memory,size=16M",
            "--export",
            "name=ro,backend=memory,size=1M,read-only",
            "--export",
            "name=disk,backend=file,path=disk.img,size=2M",
        ],
    );
    let names = ["mem", "ro", "disk"];
    let expected: Vec<String> = names.iter().map(|n| vbd.uri(n)).collect();
    assert_eq!(vbd.printed_uris(3), expected, "URIs printed by vbd serve");

    let list = format!("nbd+unix:///?socket={}", vbd.socket().display());
    let info = nbdinfo_json(&["--list", &list]);
    let exports = info["exports"].as_array().expect("exports array");
    let listed: Vec<&str> = exports
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(listed, names);
    let size = |i: usize| exports[i]["export-size"].as_u64();
    assert_eq!(size(0), Some(16 * MIB));
    assert_eq!(size(1), Some(MIB));
    assert_eq!(size(2), Some(2 * MIB));
    assert_eq!(exports[1]["is_read_only"], true);
    assert_eq!(exports[0]["is_read_only"], false);
    assert!(exports[2]["description"].as_str().unwrap().contains("file"));
}

#[test]
fn nbdinfo_json_reports_capabilities_and_block_sizes() {
    let vbd = Vbd::start(
        "nbdinfo-json",
        &[
            "--export",
            "name=mem,backend=memory,size=16M",
            "--export",
            "name=disk,backend=file,path=disk.img,size=4M",
            "--export",
            "name=ro,backend=memory,size=1M,read-only",
        ],
    );
    for name in ["mem", "disk"] {
        let info = nbdinfo_json(&[&vbd.uri(name)]);
        assert_eq!(info["protocol"], "newstyle-fixed");
        assert_eq!(info["structured"], true);
        let e = &info["exports"][0];
        assert_eq!(e["export-name"], name);
        for cap in [
            "can_multi_conn",
            "can_fua",
            "can_flush",
            "can_trim",
            "can_zero",
            "can_df",
            "can_cache",
        ] {
            assert_eq!(e[cap], true, "{name}: {cap} in {e:#}");
        }
        assert_eq!(e["is_read_only"], false, "{name}");
        assert_eq!(e["block_size_minimum"], 1, "{name}");
        assert_eq!(e["block_size_preferred"], 4096, "{name}");
        assert_eq!(e["block_size_maximum"], 67_108_864, "{name}");
        assert_eq!(
            e["contexts"],
            serde_json::json!(["base:allocation"]),
            "{name}"
        );
    }
    let info = nbdinfo_json(&[&vbd.uri("ro")]);
    let e = &info["exports"][0];
    assert_eq!(e["is_read_only"], true);
    assert_eq!(
        e["can_trim"], false,
        "trim advertised on a read-only export"
    );
    assert_eq!(
        e["can_zero"], false,
        "zero advertised on a read-only export"
    );
    assert_eq!(e["block_size_maximum"], 67_108_864);
}

/// `nbdinfo --map` as (offset, length, type) with adjacent equal types merged.
fn map(uri: &str) -> Vec<(u64, u64, u64)> {
    let v = nbdinfo_json(&["--map", uri]);
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    for e in v.as_array().expect("map is an array") {
        let (off, len, typ) = (
            e["offset"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["type"].as_u64().unwrap(),
        );
        match out.last_mut() {
            Some(last) if last.2 == typ && last.0 + last.1 == off => last.1 += len,
            _ => out.push((off, len, typ)),
        }
    }
    out
}

/// `h.trim(LENGTH, OFFSET)` through libnbd (nbdsh itself would run whatever
/// python3 is first on PATH, which may lack the libnbd module).
const TRIM: &str = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.trim(int(sys.argv[2]), int(sys.argv[3]))
h.shutdown()
"#;

/// Data appears where qemu-io wrote and a hole where nbdsh trimmed.
fn map_follows_write_and_trim(tag: &str, export: &str) {
    let vbd = Vbd::start(tag, &["--export", export]);
    let uri = vbd.uri("x");
    const DATA: u64 = 0;
    const HOLE: u64 = 3; // hole and reads as zero
    assert_eq!(map(&uri), [(0, 16 * MIB, HOLE)], "fresh export");

    qemu_io(&[], &[format!("write -P 0x5a {} {}", 4 * MIB, MIB)], &uri);
    assert_eq!(
        map(&uri),
        [
            (0, 4 * MIB, HOLE),
            (4 * MIB, MIB, DATA),
            (5 * MIB, 11 * MIB, HOLE)
        ],
        "after a 1 MiB write at 4 MiB"
    );

    let (toff, tlen) = (4 * MIB + 256 * 1024, 256 * 1024);
    python_nbd(TRIM, &[&uri, &tlen.to_string(), &toff.to_string()]);
    assert_eq!(
        map(&uri),
        [
            (0, 4 * MIB, HOLE),
            (4 * MIB, toff - 4 * MIB, DATA),
            (toff, tlen, HOLE),
            (toff + tlen, 5 * MIB - toff - tlen, DATA),
            (5 * MIB, 11 * MIB, HOLE)
        ],
        "after trimming 256 KiB inside the data"
    );
    // The trimmed range reads as zeroes, the rest of the write survived.
    qemu_io(
        &["-r"],
        &[
            format!("read -P 0x5a {} {}", 4 * MIB, toff - 4 * MIB),
            format!("read -P 0 {toff} {tlen}"),
            format!("read -P 0x5a {} {}", toff + tlen, 5 * MIB - toff - tlen),
        ],
        &uri,
    );
}

#[test]
fn nbdinfo_map_follows_write_and_trim_on_memory_export() {
    map_follows_write_and_trim("map-mem", "name=x,backend=memory,size=16M");
}

#[test]
fn nbdinfo_map_follows_write_and_trim_on_file_export() {
    map_follows_write_and_trim("map-file", "name=x,backend=file,path=x.img,size=16M");
}

/// A 256 MiB random file copied into the export and back out with nbdcopy.
fn nbdcopy_roundtrip(tag: &str, export: &str, connections: u32) {
    require("nbdcopy", "libnbd-bin");
    let dir = TempDir::new(tag);
    let src = dir.join("src.bin");
    {
        use std::io::Read;
        let mut random = std::fs::File::open("/dev/urandom").unwrap();
        let mut out = std::fs::File::create(&src).unwrap();
        let copied = std::io::copy(&mut (&mut random).take(256 * MIB), &mut out).unwrap();
        assert_eq!(copied, 256 * MIB);
    }
    let mut vbd = Vbd::start_in(dir, &["--export", export]);
    let uri = vbd.uri("x");
    let out = vbd.path("out.bin");
    let conns = format!("--connections={connections}");
    // nbdcopy never uses more connections than threads (default: cores).
    let threads = format!("--threads={connections}");
    run(Command::new("nbdcopy")
        .args([&conns, &threads])
        .arg(&src)
        .arg(&uri));
    run(Command::new("nbdcopy")
        .args([&conns, &threads])
        .arg(&uri)
        .arg(&out));
    assert_files_eq(&out, &src);
    // Each copy opened the connections it asked for, which it only does
    // when the server advertises multi-conn.
    let attached = vbd.log().matches("client attached").count();
    assert_eq!(
        attached,
        2 * connections as usize,
        "connections opened by two nbdcopy runs with {conns}\n{}",
        vbd.log()
    );
    vbd.stop();
    if export.contains("backend=file") {
        assert_files_eq(&vbd.path("x.img"), &src);
    }
}

#[test]
fn nbdcopy_roundtrips_256_mib_over_one_connection() {
    nbdcopy_roundtrip("nbdcopy-1", "name=x,backend=memory,size=256M", 1);
}

#[test]
fn nbdcopy_roundtrips_256_mib_over_four_connections() {
    nbdcopy_roundtrip("nbdcopy-4", "name=x,backend=file,path=x.img,size=256M", 4);
}

/// fio's nbd engine: 4 jobs at iodepth 64, each verifying (crc32c) its own
/// 16 MiB region of the export.
fn fio_verify(tag: &str, export: &str) {
    require("fio", "fio");
    let vbd = Vbd::start(tag, &["--export", export]);
    let out = run(Command::new("fio")
        .current_dir(vbd.dir())
        // --uri belongs to the nbd engine, so it must follow --ioengine.
        .args(["--name=verify", "--ioengine=nbd"])
        .arg(format!("--uri={}", vbd.uri("x")))
        .args([
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=64",
            "--numjobs=4",
            "--size=16M",
            "--offset_increment=16M",
            "--verify=crc32c",
            "--verify_fatal=1",
            // No state files: they would land in the working directory.
            "--verify_state_save=0",
            "--output-format=json",
        ]));
    // The nbd engine prints a line of its own before the JSON document.
    let json = &out.stdout[out.stdout.find("\n{").map_or(0, |i| i + 1)..];
    let report: Value = serde_json::from_str(json)
        .unwrap_or_else(|e| panic!("fio printed invalid JSON ({e}):\n{}", out.stdout));
    let jobs = report["jobs"].as_array().expect("jobs array");
    assert_eq!(jobs.len(), 4, "{json}");
    for job in jobs {
        assert_eq!(job["error"], 0, "fio job failed: {job:#}");
        assert_eq!(
            job["write"]["io_bytes"],
            16 * MIB,
            "bytes written by {job:#}"
        );
        // The verify phase reads every block written back.
        assert_eq!(
            job["read"]["io_bytes"],
            16 * MIB,
            "bytes verified by {job:#}"
        );
    }
}

#[test]
fn fio_verify_crc32c_on_memory_export() {
    fio_verify("fio-mem", "name=x,backend=memory,size=64M");
}

#[test]
fn fio_verify_crc32c_on_file_export() {
    fio_verify("fio-file", "name=x,backend=file,path=x.img,size=64M");
}

/// Two libnbd handles on one export: what one writes and flushes, the other
/// reads, in both directions, while both stay connected.
const TWO_CLIENTS: &str = r#"
import nbd, sys
uri = sys.argv[1]
a, b = nbd.NBD(), nbd.NBD()
a.connect_uri(uri)
b.connect_uri(uri)
assert a.can_multi_conn() and b.can_multi_conn()
checks = 0
for i, (off, n) in enumerate([(0, 4096), (4097, 3000), (65530, 131072), (1 << 20, 1 << 20)]):
    w, r = (a, b) if i % 2 == 0 else (b, a)
    data = bytes((i * 37 + j * 13 + (j >> 8)) & 0xff for j in range(n))
    w.pwrite(data, off)
    w.flush()
    got = r.pread(n, off)
    assert got == data, "round %d: reader saw different bytes at %d" % (i, off)
    checks += 1
# Zeroing and trimming on one are seen by the other too.
a.zero(4096, 0)
a.flush()
assert b.pread(4096, 0) == bytes(4096)
b.trim(1 << 20, 1 << 20)
b.flush()
assert a.pread(1 << 20, 1 << 20) == bytes(1 << 20)
checks += 2
assert a.aio_is_ready() and b.aio_is_ready(), "a handle dropped its connection"
a.shutdown()
b.shutdown()
print("checks passed:", checks)
"#;

#[test]
fn two_clients_see_each_others_flushed_writes() {
    for (tag, export) in [
        ("two-mem", "name=x,backend=memory,size=8M"),
        ("two-file", "name=x,backend=file,path=x.img,size=8M"),
    ] {
        let vbd = Vbd::start(tag, &["--export", export]);
        let out = python_nbd(TWO_CLIENTS, &[&vbd.uri("x")]);
        assert_eq!(out.stdout.trim(), "checks passed: 6", "{export}");
    }
}

/// Reads the read-only export's content, then sends writes, trims and
/// zeroes with libnbd's client-side checks off, so the server has to refuse.
const READ_ONLY: &str = r#"
import errno, nbd, sys
uri, path = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(uri)
assert h.is_read_only()
expected = open(path, "rb").read()
assert h.pread(len(expected), 0) == expected, "read-only export served other bytes"
refused = 0
for name, op in [
    ("write", lambda: h.pwrite(b"x" * 4096, 0)),
    ("unaligned write", lambda: h.pwrite(b"y" * 3, 4097)),
    ("trim", lambda: h.trim(4096, 0)),
    ("zero", lambda: h.zero(4096, 0)),
]:
    try:
        op()
        raise SystemExit(name + " succeeded on a read-only export")
    except nbd.Error as e:
        assert e.errnum == errno.EPERM, "%s failed with %s, expected EPERM" % (name, e)
        refused += 1
assert h.pread(len(expected), 0) == expected, "content changed or connection lost"
print("refused:", refused)
"#;

#[test]
fn read_only_export_serves_reads_and_refuses_writes() {
    let dir = TempDir::new("read-only");
    let mut content = vec![0x5au8; MIB as usize];
    content.extend(pattern(7, 3 * MIB as usize));
    std::fs::write(dir.join("ro.img"), &content).unwrap();
    let mut vbd = Vbd::start_in(
        dir,
        &["--export", "name=ro,backend=file,path=ro.img,read-only"],
    );
    let uri = vbd.uri("ro");
    qemu_io(&["-r"], &[format!("read -P 0x5a 0 {MIB}")], &uri);
    let img = vbd.path("ro.img");
    let out = python_nbd(READ_ONLY, &[&uri, img.to_str().unwrap()]);
    assert_eq!(out.stdout.trim(), "refused: 4");
    vbd.stop();
    assert_bytes_eq(
        &std::fs::read(&img).unwrap(),
        &content,
        "ro.img after refused writes",
    );
}

/// Writes 16 KiB blocks round after round with 16 requests in flight,
/// printing `acked ROUND INDEX` for each completion, until the server goes.
/// Every block names its round and index, so the file can be checked after.
const WRITER: &str = r#"
import nbd, sys
uri, blocks, bs, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def block(rnd, i):
    head = b"vbd-sigterm %08d %08d|" % (rnd, i)
    return (head * (bs // len(head) + 1))[:bs]
h = nbd.NBD()
h.connect_uri(uri)
inflight = {}
seq, limit = 0, rounds * blocks
try:
    while seq < limit or inflight:
        while seq < limit and len(inflight) < 16:
            rnd, i = divmod(seq, blocks)
            buf = nbd.Buffer.from_bytearray(bytearray(block(rnd, i)))
            inflight[h.aio_pwrite(buf, i * bs)] = (rnd, i, buf)
            seq += 1
        h.poll(-1)
        for c in list(inflight):
            if h.aio_command_completed(c):
                rnd, i, _ = inflight.pop(c)
                print("acked", rnd, i, flush=True)
    print("finished", flush=True)
except nbd.Error as e:
    print("stopped:", e, flush=True)
"#;

#[test]
fn sigterm_during_writes_keeps_every_acknowledged_write() {
    require_python_nbd();
    const BS: usize = 16 * 1024;
    const BLOCKS: usize = 256;
    let mut vbd = Vbd::start(
        "sigterm",
        &["--export", "name=x,backend=file,path=x.img,size=4M"],
    );
    let mut writer = Command::new(SYSTEM_PYTHON)
        .arg("-c")
        .arg(WRITER)
        .arg(vbd.uri("x"))
        .args([BLOCKS.to_string(), BS.to_string(), "1000".into()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting the python writer");
    let (tx, rx) = mpsc::channel();
    let stdout = writer.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    // Deadline only against a hung writer; the writer is active by then.
    while lines.len() < 200 {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => lines.push(line),
            Err(e) => panic!("writer went quiet ({e}) after {lines:?}"),
        }
    }
    vbd.stop(); // SIGTERM; asserts exit status 0.
    reader.join().unwrap();
    lines.extend(rx.try_iter());
    let status = writer.wait().unwrap();
    assert!(status.success(), "writer exited with {status}");
    let last = lines.last().unwrap();
    assert!(
        last.starts_with("stopped:"),
        "the writer should have been cut off mid-run, last line: {last}"
    );

    // Newest acknowledged round of every block.
    let mut acked: Vec<Option<usize>> = vec![None; BLOCKS];
    for l in lines.iter().filter_map(|l| l.strip_prefix("acked ")) {
        let mut it = l.split(' ').map(|n| n.parse::<usize>().unwrap());
        let (rnd, i) = (it.next().unwrap(), it.next().unwrap());
        acked[i] = acked[i].max(Some(rnd));
    }
    let file = std::fs::read(vbd.path("x.img")).unwrap();
    for (i, chunk) in file.chunks(BS).enumerate() {
        if chunk.iter().all(|&b| b == 0) {
            assert_eq!(acked[i], None, "block {i} was acknowledged but is zero");
            continue;
        }
        let head = String::from_utf8_lossy(&chunk[..30]);
        let fields: Vec<&str> = head.split(['|', ' ']).collect();
        let rnd: usize = fields[1]
            .parse()
            .unwrap_or_else(|_| panic!("block {i}: {head:?}"));
        let expected = format!("vbd-sigterm {rnd:08} {i:08}|").into_bytes();
        let whole: Vec<u8> = expected.iter().copied().cycle().take(BS).collect();
        assert_bytes_eq(
            chunk,
            &whole,
            &format!("block {i} (a torn or misplaced write)"),
        );
        if let Some(a) = acked[i] {
            assert!(
                rnd >= a,
                "block {i} holds round {rnd} but round {a} was acknowledged"
            );
        }
    }
}

#[test]
fn tcp_listener_serves_and_logs_granted_socket_buffers() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let vbd = Vbd::start(
        "tcp",
        &[
            "--tcp",
            &addr,
            "--export",
            "name=mem,backend=memory,size=16M",
            "--sndbuf",
            "1M",
            "--rcvbuf",
            "1M",
        ],
    );
    let uri = format!("nbd://{addr}/mem");
    qemu_io(&[], &["write -P 0x9 0 1M".into()], &uri);
    qemu_io(
        &["-r"],
        &["read -P 0x9 0 1M".into(), "read -P 0 1M 1M".into()],
        &uri,
    );
    let log = vbd.log();
    assert!(
        log.contains("sndbuf_granted"),
        "granted socket buffer sizes are logged:\n{log}"
    );
}
