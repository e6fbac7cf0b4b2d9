//! Hostile and broken clients against the real server: too many
//! connections, clients that never finish negotiating, and clients that
//! never read their replies. Each limit must hold, be logged, and leave
//! well-behaved clients unaffected.

use crate::common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::*;
use vbd::nbd::client;
use vbd::nbd::wire::*;

/// Connects and reads the 18-byte greeting; `None` if the server closed
/// the connection instead.
fn greet(vbd: &Vbd) -> Option<UnixStream> {
    let mut s = UnixStream::connect(vbd.socket()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = [0u8; 18];
    match s.read_exact(&mut g) {
        Ok(()) => {
            assert_eq!(&g[..8], &NBDMAGIC.to_be_bytes(), "greeting magic");
            Some(s)
        }
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
            ) =>
        {
            None
        }
        Err(e) => panic!("reading the greeting: {e}"),
    }
}

/// Negotiates the default export with NBD_OPT_EXPORT_NAME (simple replies).
fn attach(vbd: &Vbd) -> UnixStream {
    let mut s = greet(vbd).expect("server refused a connection");
    let flags = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
    s.write_all(&flags.to_be_bytes()).unwrap();
    s.write_all(&client::option(OPT_EXPORT_NAME, b"")).unwrap();
    let mut info = [0u8; 10];
    s.read_exact(&mut info).expect("export size and flags");
    s
}

/// Reads one simple reply with `len` bytes of data; returns its cookie.
fn read_reply(s: &mut UnixStream, len: usize) -> u64 {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).expect("reply header");
    assert_eq!(&h[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes(), "reply magic");
    assert_eq!(&h[4..8], &[0; 4], "reply error");
    let mut data = vec![0u8; len];
    s.read_exact(&mut data).expect("reply data");
    u64::from_be_bytes(h[8..16].try_into().unwrap())
}

fn wait_for_log(vbd: &Vbd, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !vbd.log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "log never said {needle:?}:\n{}",
            vbd.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Opens connections until one is admitted (the harness's own probe may
/// still be counted for a moment after it closed).
fn greet_eventually(vbd: &Vbd) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = greet(vbd) {
            return s;
        }
        assert!(Instant::now() < deadline, "never admitted a connection");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn connection_limit_refuses_extra_clients_and_recovers() {
    let mut vbd = Vbd::start(
        "limit-conns",
        &[
            "--max-connections",
            "2",
            "--export",
            "name=m,backend=memory,size=1M",
        ],
    );
    let a = greet_eventually(&vbd);
    let _b = greet_eventually(&vbd);
    assert!(
        greet(&vbd).is_none(),
        "a third connection over --max-connections 2 is closed"
    );
    wait_for_log(&vbd, "connection limit reached (--max-connections)");
    drop(a);
    let _c = greet_eventually(&vbd);
    vbd.assert_running();
}

#[test]
fn handshake_timeout_disconnects_idle_negotiators_only() {
    let mut vbd = Vbd::start(
        "limit-hs",
        &[
            "--handshake-timeout",
            "1",
            "--export",
            "name=m,backend=memory,size=1M",
        ],
    );
    let mut idle = greet(&vbd).expect("greeting");
    let mut good = attach(&vbd);
    let started = Instant::now();
    let mut rest = [0u8; 1];
    let n = idle.read(&mut rest).unwrap_or(0);
    assert_eq!(n, 0, "an idle negotiator is disconnected");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "disconnected after about a second, took {:?}",
        started.elapsed()
    );
    wait_for_log(&vbd, "handshake not finished in time");
    // A client past the handshake is not subject to it.
    std::thread::sleep(Duration::from_millis(1500));
    good.write_all(&client::request(false, 0, CMD_READ, 7, 0, 4096))
        .unwrap();
    assert_eq!(read_reply(&mut good, 4096), 7);
    vbd.assert_running();
}

/// Sends `count` 1 MiB READs without reading any reply.
fn flood_reads(s: &mut UnixStream, count: u64) {
    let mut reqs = Vec::new();
    for i in 0..count {
        reqs.extend_from_slice(&client::request(false, 0, CMD_READ, i, (i % 32) * MIB, MIB));
    }
    s.write_all(&reqs)
        .expect("requests fit in the socket buffer");
}

fn drain_reads(s: &mut UnixStream, count: u64) {
    let mut seen: Vec<u64> = (0..count).map(|_| read_reply(s, MIB as usize)).collect();
    seen.sort_unstable();
    assert!(
        seen.iter().copied().eq(0..count),
        "every request answered exactly once"
    );
}

#[test]
fn clients_that_never_read_replies_hold_bounded_memory() {
    let mut vbd = Vbd::start(
        "limit-slow",
        &[
            "--threads",
            "1",
            "--max-buffered",
            "8M",
            "--max-buffered-total",
            "12M",
            "--export",
            "name=m,backend=memory,size=32M",
        ],
    );
    let uri = vbd.uri("m");
    qemu_io(&[], &["write -P 0x5a 0 32M".to_string()], &uri);
    let before = rss_kib(vbd.pid());
    // 2 x 300 MiB of replies asked for, none read.
    const COUNT: u64 = 300;
    let mut slow = [attach(&vbd), attach(&vbd)];
    for s in &mut slow {
        flood_reads(s, COUNT);
    }
    wait_for_log(&vbd, "per-connection (--max-buffered) buffer limit reached");
    wait_for_log(&vbd, "global (--max-buffered-total) buffer limit reached");
    std::thread::sleep(Duration::from_millis(500));
    let during = rss_kib(vbd.pid());
    assert!(
        during < before + 48 * 1024,
        "memory grew from {before} KiB to {during} KiB while clients ignored 600 MiB of replies"
    );
    // A well-behaved client still gets through.
    let out = qemu_io(&[], &["read -P 0x5a 0 1M".to_string()], &uri);
    assert!(
        out.stdout.contains("read 1048576/1048576"),
        "{}",
        out.stdout
    );
    // Once they read, every reply arrives, in order, intact.
    for s in &mut slow {
        drain_reads(s, COUNT);
    }
    vbd.assert_running();
}

#[test]
fn unix_sockets_are_private_by_default_and_take_a_group() {
    use std::os::unix::fs::MetadataExt;
    let vbd = Vbd::start(
        "sock-default",
        &["--export", "name=m,backend=memory,size=1M"],
    );
    let meta = std::fs::metadata(vbd.socket()).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600, "default socket mode");
    drop(vbd);
    // SAFETY: plain getters.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let gid = if euid == 0 { 4242 } else { egid };
    let gid_arg = gid.to_string();
    let vbd = Vbd::start(
        "sock-group",
        &[
            "--socket-mode",
            "660",
            "--socket-group",
            &gid_arg,
            "--export",
            "name=m,backend=memory,size=1M",
        ],
    );
    let meta = std::fs::metadata(vbd.socket()).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), gid);
}
