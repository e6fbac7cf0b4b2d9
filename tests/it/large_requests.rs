//! Requests over the spec's 32 MiB, driven by libnbd (python3-libnbd): up
//! to `--max-request` (64 MiB by default) they are served and their data
//! round-trips; beyond it they get an error reply and the connection goes
//! on serving. The advertised maximum block size is the limit.

use std::process::Command;

use crate::common::*;

/// Runs a python3-libnbd script with `args` and returns its stdout.
fn libnbd(script: &str, args: &[&str]) -> String {
    require_python_nbd();
    run(Command::new(SYSTEM_PYTHON).args(["-c", script]).args(args)).stdout
}

/// Writes 40 MiB of a pattern at an unaligned offset past 32 MiB in one
/// request and reads it back in one request; prints the advertised block
/// sizes and whether the data matched, and saves what it wrote.
const ROUND_TRIP: &str = r#"
import os, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("maximum", h.get_block_size(nbd.SIZE_MAXIMUM))
print("preferred", h.get_block_size(nbd.SIZE_PREFERRED))
data = os.urandom(40 << 20)
h.pwrite(data, (33 << 20) + 512)
back = h.pread(40 << 20, (33 << 20) + 512)
print("equal", back == data)
open(sys.argv[2], "wb").write(data)
h.shutdown()
"#;

#[test]
fn forty_mib_reads_and_writes_round_trip_through_libnbd() {
    let vbd = Vbd::start(
        "large-40m",
        &["--export", "name=disk,backend=file,path=disk.img,size=80M"],
    );
    let sent = vbd.path("sent");
    let out = libnbd(ROUND_TRIP, &[&vbd.uri("disk"), &sent.display().to_string()]);
    assert!(out.contains("maximum 67108864\n"), "{out}");
    assert!(out.contains("preferred 4096\n"), "{out}");
    assert!(out.contains("equal True\n"), "{out}");
    // The bytes are in the file, where the request put them.
    let written = read_at(&vbd.path("disk.img"), (33 << 20) + 512, 40 << 20);
    let sent = std::fs::read(&sent).unwrap();
    assert_eq!(sent.len(), 40 << 20);
    assert_bytes_eq(&written, &sent, "disk.img after a 40 MiB write");
}

/// With strict mode off (so libnbd sends what the server advertised it
/// would refuse), a 40 MiB read and write each get an error, and the same
/// connection then reads and writes normally.
const OVER_LIMIT: &str = r#"
import sys, nbd
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
print("maximum", h.get_block_size(nbd.SIZE_MAXIMUM))
for what, op in [("read", lambda: h.pread(40 << 20, 0)),
                 ("write", lambda: h.pwrite(b"\xee" * (40 << 20), 0))]:
    try:
        op()
        print(what, "served")
    except nbd.Error as e:
        print(what, "refused", e.errno)
h.pwrite(b"\x5a" * (1 << 20), 4096)
print("after", h.pread(1 << 20, 4096) == b"\x5a" * (1 << 20))
print("untouched", h.pread(4096, 0) == bytes(4096))
print("connected", h.aio_is_ready())
h.shutdown()
"#;

#[test]
fn requests_over_the_configured_limit_get_an_error_and_the_connection_goes_on() {
    let mut vbd = Vbd::start(
        "large-over",
        &[
            "--max-request",
            "32M",
            "--export",
            "name=disk,backend=memory,size=64M",
        ],
    );
    let out = libnbd(OVER_LIMIT, &[&vbd.uri("disk")]);
    assert!(out.contains("maximum 33554432\n"), "{out}");
    assert!(out.contains("read refused EINVAL\n"), "{out}");
    assert!(out.contains("write refused EINVAL\n"), "{out}");
    assert!(out.contains("after True\n"), "{out}");
    assert!(out.contains("untouched True\n"), "{out}");
    assert!(out.contains("connected True\n"), "{out}");
    vbd.assert_running();
    let log = vbd.log();
    assert!(!log.contains("protocol violation"), "{log}");
}

#[test]
fn a_limit_over_max_buffered_is_refused() {
    let err = vbd_fails(&[
        "serve",
        "--unix",
        "/nonexistent/vbd.sock",
        "--max-request",
        "128M",
        "--max-buffered",
        "64M",
        "--export",
        "name=disk,backend=memory,size=1M",
    ]);
    assert!(err.contains("--max-request must be"), "{err}");
    assert!(err.contains("no more than --max-buffered"), "{err}");
}
