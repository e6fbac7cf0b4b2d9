//! vbd against real NBD clients: qemu-io, qemu-img, nbdinfo, nbdcopy, fio
//! and libnbd's Python bindings. Every test checks data, not exit codes.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

const MEM: &str = "name=mem,backend=memory,size=64M";

fn file_export(v: &Scratch) -> String {
    format!(
        "name=disk,backend=file,path={},size=64M",
        v.join("disk.img").display()
    )
}

/// Writes patterns at scattered, partly unaligned offsets, then reads each
/// back with qemu-io's pattern check (-P fails on any mismatch).
fn scattered_patterns(uri: &str) {
    let spots: [(u64, u64, u8); 6] = [
        (0, 16384, 0x11),
        (4096 * 7 + 1, 3000, 0x22),
        (1 << 20, 1 << 20, 0x33),
        ((5 << 20) + 511, 4097, 0x44),
        ((32 << 20) - 4096, 8192, 0x55),
        ((64 << 20) - 512, 512, 0x66),
    ];
    let mut cmds = Vec::new();
    for (off, len, p) in spots {
        cmds.push(format!("write -P {p} {off} {len}"));
    }
    cmds.push("flush".into());
    qemu_io_ok(uri, &cmds);
    let mut checks: Vec<String> = spots
        .iter()
        .map(|(off, len, p)| format!("read -P {p} {off} {len}"))
        .collect();
    // Between the patterns the volume still reads as zeroes.
    checks.push("read -P 0 65536 4096".into());
    checks.push(format!("read -P 0 {} 4096", 40 << 20));
    qemu_io_ok(uri, &checks);
    // A wrong expectation must fail: the check above is not vacuous.
    let out = qemu_io(uri, &["read -P 0x77 0 512".into()]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("Pattern verification failed"),
        "qemu-io did not notice a wrong pattern: {text}"
    );
}

#[test]
fn qemu_io_patterns_memory_and_file() {
    require("qemu-io", "qemu-utils");
    let dir = Scratch::new("qio");
    let spec = file_export(&dir);
    let v = Vbd::start_in(
        dir,
        std::env::temp_dir().join(format!("vbd-qio-{}.sock", std::process::id())),
        &["--export", MEM, "--export", &spec],
    );
    scattered_patterns(&v.uri("mem"));
    scattered_patterns(&v.uri("disk"));
    v.stop();
}

#[test]
fn qemu_img_convert_in_and_out() {
    require("qemu-img", "qemu-utils");
    let v = Vbd::start("img", &["--export", MEM]);
    let src = v.dir.join("src.raw");
    random_file(&src, 7, 24 << 20);
    // Pad with a hole so the image has sparse regions too.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&src)
        .and_then(|f| f.set_len(64 << 20))
        .expect("extend source");
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(v.uri("mem")));
    let back = v.dir.join("back.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(v.uri("mem"))
        .arg(&back));
    let cmp = stdout(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "qcow2"])
            .arg(&src)
            .arg(&back),
    );
    assert!(cmp.contains("Images are identical"), "{cmp}");
    // And the comparison can fail: change one byte in the export.
    qemu_io_ok(&v.uri("mem"), &["write -P 0x5a 100 1".into()]);
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(v.uri("mem"))
        .output()
        .expect("qemu-img compare");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    v.stop();
}

fn nbdinfo_json(uri: &str) -> Value {
    serde_json::from_str(&stdout(Command::new("nbdinfo").arg("--json").arg(uri)))
        .expect("nbdinfo json")
}

#[test]
fn nbdinfo_lists_exports_and_reports_features() {
    require("nbdinfo", "libnbd-bin");
    let dir = Scratch::new("info");
    let spec = file_export(&dir);
    let socket = dir.join("vbd.sock");
    let v = Vbd::start_in(
        dir,
        socket,
        &[
            "--export",
            MEM,
            "--export",
            &spec,
            "--export",
            "name=ro,backend=memory,size=1M,read-only",
        ],
    );
    let list = stdout(
        Command::new("nbdinfo")
            .arg("--list")
            .arg(format!("nbd+unix://?socket={}", v.socket.display())),
    );
    for name in ["export=\"mem\"", "export=\"disk\"", "export=\"ro\""] {
        assert!(list.contains(name), "{name} missing from:\n{list}");
    }
    for export in ["mem", "disk"] {
        let j = nbdinfo_json(&v.uri(export));
        let e = &j["exports"][0];
        assert_eq!(j["structured"], true);
        for flag in [
            "can_multi_conn",
            "can_fua",
            "can_trim",
            "can_zero",
            "can_df",
            "can_cache",
            "can_flush",
            "can_fast_zero",
        ] {
            assert_eq!(e[flag], true, "{flag} on {export}: {e}");
        }
        assert_eq!(e["is_read_only"], false);
        assert_eq!(e["export-size"], 64 << 20);
        assert_eq!(e["block_size_minimum"], 1);
        assert_eq!(e["block_size_preferred"], 4096);
        assert_eq!(e["block_size_maximum"], 32 << 20);
        assert_eq!(e["contexts"][0], "base:allocation");
    }
    let ro = nbdinfo_json(&v.uri("ro"));
    assert_eq!(ro["exports"][0]["is_read_only"], true);
    assert_eq!(ro["exports"][0]["can_trim"], false);
    assert_eq!(ro["exports"][0]["can_zero"], false);
    v.stop();
}

/// `nbdinfo --map` as (offset, length, type) triples.
fn map(uri: &str) -> Vec<(u64, u64, u64)> {
    let j: Value = serde_json::from_str(&stdout(
        Command::new("nbdinfo").args(["--map", "--json"]).arg(uri),
    ))
    .expect("map json");
    j.as_array()
        .expect("map array")
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn nbdinfo_map_shows_data_and_holes_after_trim() {
    require("nbdinfo", "libnbd-bin");
    require("qemu-io", "qemu-utils");
    let dir = Scratch::new("map");
    let spec = file_export(&dir);
    let socket = dir.join("vbd.sock");
    let v = Vbd::start_in(dir, socket, &["--export", MEM, "--export", &spec]);
    for export in ["mem", "disk"] {
        let uri = v.uri(export);
        assert_eq!(
            map(&uri),
            vec![(0, 64 << 20, 3)],
            "fresh {export} is one hole"
        );
        qemu_io_ok(
            &uri,
            &[
                "write -P 1 1M 2M".into(),
                "write -P 2 8M 1M".into(),
                "flush".into(),
            ],
        );
        let m = map(&uri);
        assert!(
            m.contains(&(1 << 20, 2 << 20, 0)),
            "{export} data at 1M..3M: {m:?}"
        );
        assert!(
            m.contains(&(8 << 20, 1 << 20, 0)),
            "{export} data at 8M..9M: {m:?}"
        );
        assert_eq!(
            m.iter().map(|e| e.1).sum::<u64>(),
            64 << 20,
            "{export} map covers the volume"
        );
        qemu_io_ok(&uri, &["discard 1M 2M".into(), "flush".into()]);
        let m = map(&uri);
        assert!(
            !m.iter()
                .any(|&(o, l, t)| t == 0 && o < 3 << 20 && o + l > 1 << 20),
            "{export} 1M..3M trimmed: {m:?}"
        );
        assert!(
            m.contains(&(8 << 20, 1 << 20, 0)),
            "{export} 8M..9M kept: {m:?}"
        );
        // Trimmed blocks read back as zeroes; the rest is intact.
        qemu_io_ok(&uri, &["read -P 0 1M 2M".into(), "read -P 2 8M 1M".into()]);
    }
    v.stop();
}

fn sha(path: &std::path::Path) -> String {
    stdout(Command::new("sha256sum").arg(path))
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn nbdcopy_round_trips_256m_over_one_and_four_connections() {
    require("nbdcopy", "libnbd-bin");
    let v = Vbd::start("copy", &["--export", "name=big,backend=memory,size=256M"]);
    let src = v.dir.join("src");
    random_file(&src, 42, 256 << 20);
    let want = sha(&src);
    for conns in ["1", "4"] {
        let back = v.dir.join(&format!("back{conns}"));
        run(Command::new("nbdcopy")
            .arg(format!("--connections={conns}"))
            .arg(&src)
            .arg(v.uri("big")));
        run(Command::new("nbdcopy")
            .arg(format!("--connections={conns}"))
            .arg(v.uri("big"))
            .arg(&back));
        assert_eq!(sha(&back), want, "round trip over {conns} connection(s)");
        // Overwrite the export so the next round proves its own copy.
        run(Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0 0 256M"])
            .arg(v.uri("big")));
    }
    v.stop();
}

fn fio_verify(uri: &str) {
    let out = stdout(Command::new("fio").args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=64",
        "--numjobs=4",
        "--size=8M",
        "--offset_increment=8M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--output-format=json",
    ]));
    // fio's nbd engine prints one line before the JSON.
    let json = &out[out.find('{').expect("fio json")..];
    let j: Value = serde_json::from_str(json).expect("parse fio json");
    let jobs = j["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 4);
    for job in jobs {
        assert_eq!(job["error"], 0, "fio job failed: {job}");
        assert_eq!(
            job["write"]["io_bytes"],
            8 << 20,
            "each job wrote its region"
        );
        assert_eq!(
            job["read"]["io_bytes"],
            8 << 20,
            "each job verified its region"
        );
    }
}

#[test]
fn fio_verify_at_depth_64_with_4_jobs() {
    require("fio", "fio");
    let dir = Scratch::new("fio");
    let spec = file_export(&dir);
    let socket = dir.join("vbd.sock");
    let v = Vbd::start_in(dir, socket, &["--export", MEM, "--export", &spec]);
    fio_verify(&v.uri("mem"));
    fio_verify(&v.uri("disk"));
    v.stop();
}

/// Runs a libnbd Python script with Debian's interpreter (which has the
/// bindings, unlike a pyenv python3 that may come first in PATH).
fn nbd_python(script: &str, args: &[&str]) -> String {
    assert!(
        std::path::Path::new("/usr/bin/python3").exists(),
        "/usr/bin/python3 missing: apt-get install -y python3-libnbd"
    );
    stdout(
        Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(script)
            .args(args),
    )
}

#[test]
fn two_clients_see_each_others_flushed_writes() {
    let v = Vbd::start("multi", &["--export", MEM]);
    let script = r#"
import nbd, sys
uri = sys.argv[1]
a = nbd.NBD(); a.connect_uri(uri)
b = nbd.NBD(); b.connect_uri(uri)
assert a.can_multi_conn()
for i in range(50):
    data = bytes([(i * 7 + j) % 251 for j in range(4096)])
    off = (i * 1234567) % (60 << 20)
    a.pwrite(data, off)
    a.flush()
    got = b.pread(4096, off)
    assert got == data, f"round {i}: b read stale data at {off}"
    b.pwrite(bytes(4096), off)
    b.flush()
    assert a.pread(4096, off) == bytes(4096), f"round {i}: a read stale data"
print("ok", flush=True)
"#;
    assert_eq!(nbd_python(script, &[&v.uri("mem")]).trim(), "ok");
    v.stop();
}

#[test]
fn read_only_export_refuses_writes_and_serves_reads() {
    require("qemu-io", "qemu-utils");
    let dir = Scratch::new("ro");
    let img = dir.join("golden.img");
    std::fs::write(&img, vec![0xabu8; 1 << 20]).expect("write golden");
    let spec = format!("name=golden,backend=file,path={},read-only", img.display());
    let socket = dir.join("vbd.sock");
    let v = Vbd::start_in(dir, socket, &["--export", &spec]);
    // qemu-io opens read-write unless told otherwise, and vbd says no.
    let rw = qemu_io(&v.uri("golden"), &["read -P 0xab 0 1M".into()]);
    assert!(
        String::from_utf8_lossy(&rw.stderr).contains("Permission denied"),
        "{rw:?}"
    );
    qemu_io_ok_with(&["-r"], &v.uri("golden"), &["read -P 0xab 0 1M".into()]);
    let script = r#"
import nbd, sys
h = nbd.NBD()
h.set_strict_mode(0)  # let the write reach the server instead of libnbd refusing it
h.connect_uri(sys.argv[1])
assert h.is_read_only()
try:
    h.pwrite(b"x" * 512, 0)
    print("write accepted")
except nbd.Error as e:
    print("errno", e.errno)
"#;
    assert_eq!(
        nbd_python(script, &[&v.uri("golden")]).trim(),
        "errno EPERM"
    );
    assert!(
        v.log_text().contains("export is read-only"),
        "the server, not libnbd, refused it"
    );
    assert_eq!(
        read_all(&v.dir.join("golden.img")),
        vec![0xabu8; 1 << 20],
        "file unchanged"
    );
    v.stop();
}

#[test]
fn sigterm_during_writes_exits_cleanly_and_keeps_acknowledged_data() {
    let dir = Scratch::new("term");
    let img = dir.join("disk.img");
    let spec = format!("name=disk,backend=file,path={},size=16M", img.display());
    let socket = dir.join("vbd.sock");
    let mut v = Vbd::start_in(dir, socket, &["--export", &spec]);
    // The writer records each block only after its write was acknowledged.
    let script = r#"
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
i = 0
try:
    while True:
        blk = i % 4096
        h.pwrite(bytes([i % 256]) * 4096, blk * 4096)
        print(blk, i % 256, flush=True)
        i += 1
except Exception:
    pass
"#;
    let writer = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .arg(v.uri("disk"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start writer");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let status = v.terminate();
    assert!(
        status.success(),
        "vbd exit status {status}:\n{}",
        v.log_text()
    );
    let out = writer.wait_with_output().expect("writer output");
    let acked: Vec<(usize, u8)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
        })
        .collect();
    assert!(acked.len() > 100, "writer made progress: {}", acked.len());
    let data = read_all(&v.dir.join("disk.img"));
    let mut last = std::collections::HashMap::new();
    for (blk, val) in acked {
        last.insert(blk, val);
    }
    for (blk, val) in last {
        let b = &data[blk * 4096..(blk + 1) * 4096];
        assert!(
            b.iter().all(|&x| x == val),
            "block {blk} lost its acknowledged value {val}"
        );
    }
    assert!(v.log_text().contains("stopped"), "shutdown was logged");
}

#[test]
fn tcp_listener_serves_when_asked() {
    require("qemu-io", "qemu-utils");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("probe port");
        l.local_addr().expect("addr").port()
    };
    let addr = format!("127.0.0.1:{port}");
    let v = Vbd::start(
        "tcp",
        &[
            "--tcp", &addr, "--export", MEM, "--sndbuf", "1M", "--rcvbuf", "1M",
        ],
    );
    let uri = format!("nbd://{addr}/mem");
    qemu_io_ok(&uri, &["write -P 9 0 1M".into(), "read -P 9 0 1M".into()]);
    let log = v.log_text();
    assert!(
        log.contains("sndbuf_granted"),
        "granted socket buffer sizes are logged:\n{log}"
    );
    v.stop();
}
