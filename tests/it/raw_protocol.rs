//! NBD spoken by hand over a Unix socket: the hostile and unusual inputs real
//! clients never send. Each test starts its own vbd, checks the exact reply
//! (or disconnect) the spec asks for, and then that the server is still up
//! and a well-behaved client on a fresh connection reads the right data.

use crate::common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use vbd::nbd::client::{self, go_data, meta_data, string};
use vbd::nbd::wire::*;

const MIB: u64 = 1 << 20;
/// Size of the writable export `mem` (the default export).
const SIZE: u64 = 64 * MIB;
/// Size of the read-only export `ro`.
const RO_SIZE: u64 = MIB;
/// Bytes at offset 0 of `mem` that every test seeds and checks afterwards.
const SEED_LEN: usize = 64 * 1024;
/// The largest READ/WRITE the server accepts (NBD_INFO_BLOCK_SIZE maximum):
/// these servers run with `--max-request 32M`, below the export's size.
const MAX_IO: u64 = 32 * MIB;

const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

/// How replies are framed on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Simple,
    Structured,
    Extended,
}

/// A vbd with a seeded `mem` export and a read-only `ro` export.
struct Server {
    vbd: Vbd,
    seed: Vec<u8>,
}

impl Server {
    fn start(tag: &str) -> Self {
        let vbd = Vbd::start(
            tag,
            &[
                "--max-request",
                "32M",
                "--export",
                "name=mem,backend=memory,size=64M",
                "--export",
                "name=ro,backend=memory,size=1M,read-only",
            ],
        );
        let seed = pattern(0x5eed, SEED_LEN);
        let mut c = Client::attach(&vbd, "mem", Mode::Simple);
        c.write_ok(1, 0, &seed);
        c.request(0, CMD_FLUSH, 2, 0, 0, &[]);
        c.expect_ok(2);
        c.disconnect();
        Server { vbd, seed }
    }

    fn connect(&self) -> Client {
        Client::connect(&self.vbd)
    }

    /// The handshake on `c` still works after whatever it was sent: GO on
    /// `mem` attaches and reads the seed; then the whole server is checked.
    fn go_and_check(&mut self, mut c: Client, what: &str) {
        c.go("mem");
        assert_eq!(c.size, SIZE);
        self.assert_reads_seed(&mut c, 1, what);
        c.disconnect();
        self.assert_healthy();
    }

    /// The connection still works: it reads the seed's first 4 KiB.
    fn assert_reads_seed(&self, c: &mut Client, cookie: u64, what: &str) {
        let got = c.read_ok(cookie, 0, 4096);
        assert_bytes_eq(&got, &self.seed[..4096], what);
    }

    fn attach(&self, export: &str, mode: Mode) -> Client {
        Client::attach(&self.vbd, export, mode)
    }

    /// The server survived: still running, and a fresh, well-behaved client
    /// reads the seed back intact in every reply mode.
    fn assert_healthy(&mut self) {
        self.vbd.assert_running();
        for mode in [Mode::Simple, Mode::Structured, Mode::Extended] {
            let mut c = self.attach("mem", mode);
            let got = c.read_ok(7, 0, SEED_LEN as u64);
            assert_bytes_eq(
                &got,
                &self.seed,
                &format!("seed read back in {mode:?} mode"),
            );
            c.disconnect();
        }
        self.vbd.assert_running();
    }
}

/// An option reply.
#[derive(Debug)]
struct OptReply {
    opt: u32,
    typ: u32,
    data: Vec<u8>,
}

/// A structured or extended reply chunk.
#[derive(Debug)]
struct Chunk {
    flags: u16,
    typ: u16,
    cookie: u64,
    /// The header's offset field (extended replies only, else 0).
    offset: u64,
    payload: Vec<u8>,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

struct Client {
    s: UnixStream,
    mode: Mode,
    /// Transmission flags from the handshake.
    flags: u16,
    size: u64,
    /// The id the server gave `base:allocation`, if selected.
    meta_id: Option<u32>,
}

impl Client {
    /// Connects and checks the greeting; nothing sent yet.
    fn connect(vbd: &Vbd) -> Self {
        let s = UnixStream::connect(vbd.socket()).expect("connecting to vbd");
        // Only a guard against a hung server; no test measures time.
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut c = Client {
            s,
            mode: Mode::Simple,
            flags: 0,
            size: 0,
            meta_id: None,
        };
        let g = c.recv(18);
        assert_eq!(be64(&g[0..]), NBDMAGIC, "greeting magic");
        assert_eq!(be64(&g[8..]), IHAVEOPT, "greeting option magic");
        assert_eq!(
            be16(&g[16..]),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
            "handshake flags"
        );
        c
    }

    /// Connects and sends the usual client flags.
    fn options(vbd: &Vbd) -> Self {
        let mut c = Self::connect(vbd);
        c.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        c
    }

    /// A connection in transmission on `export`, with `mode` negotiated and,
    /// beyond simple mode, `base:allocation` selected.
    fn attach(vbd: &Vbd, export: &str, mode: Mode) -> Self {
        let mut c = Self::options(vbd);
        match mode {
            Mode::Simple => {}
            Mode::Structured => c.option_ok(OPT_STRUCTURED_REPLY, &[]),
            Mode::Extended => c.option_ok(OPT_EXTENDED_HEADERS, &[]),
        }
        if mode != Mode::Simple {
            let ids = c.set_meta(export, &["base:allocation"]);
            assert_eq!(ids.len(), 1, "base:allocation selected: {ids:?}");
            assert_eq!(ids[0].1, "base:allocation");
            c.meta_id = Some(ids[0].0);
        }
        c.go(export);
        c.mode = mode;
        c
    }

    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("sending to vbd");
    }

    fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s
            .read_exact(&mut b)
            .unwrap_or_else(|e| panic!("reading {n} bytes from vbd: {e}"));
        b
    }

    /// Asserts the server closes the connection without sending anything more.
    fn expect_closed(&mut self) {
        let mut b = [0u8; 256];
        match self.s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Ok(n) => panic!(
                "expected a disconnect, got {n} more bytes: {:02x?}",
                &b[..n]
            ),
            Err(e) => panic!("expected a disconnect, got {e}"),
        }
    }

    // ---- handshake ----

    fn option(&mut self, opt: u32, data: &[u8]) {
        self.send(&client::option(opt, data));
    }

    fn opt_reply(&mut self) -> OptReply {
        let h = self.recv(20);
        assert_eq!(be64(&h), REPLY_MAGIC, "option reply magic in {h:02x?}");
        let len = be32(&h[16..]) as usize;
        OptReply {
            opt: be32(&h[8..]),
            typ: be32(&h[12..]),
            data: self.recv(len),
        }
    }

    /// Reads one reply to `opt`, asserting its type; returns its data.
    fn expect_reply(&mut self, opt: u32, typ: u32) -> Vec<u8> {
        let r = self.opt_reply();
        assert_eq!(
            (r.opt, r.typ),
            (opt, typ),
            "reply to option {opt}: {r:?} ({})",
            String::from_utf8_lossy(&r.data)
        );
        r.data
    }

    fn option_ok(&mut self, opt: u32, data: &[u8]) {
        self.option(opt, data);
        let ack = self.expect_reply(opt, REP_ACK);
        assert!(ack.is_empty(), "ACK with data {ack:02x?}");
    }

    /// Sends an option expected to fail with `err`; the error carries a
    /// message for humans.
    fn option_err(&mut self, opt: u32, data: &[u8], err: u32) {
        self.option(opt, data);
        let msg = self.expect_reply(opt, err);
        assert!(
            std::str::from_utf8(&msg).is_ok(),
            "error message is not UTF-8: {msg:02x?}"
        );
    }

    /// NBD_OPT_LIST: the export names.
    fn list(&mut self) -> Vec<String> {
        self.option(OPT_LIST, &[]);
        let mut names = Vec::new();
        loop {
            let r = self.opt_reply();
            assert_eq!(r.opt, OPT_LIST);
            match r.typ {
                REP_SERVER => {
                    let n = be32(&r.data) as usize;
                    names.push(String::from_utf8(r.data[4..4 + n].to_vec()).unwrap());
                }
                REP_ACK => return names,
                t => panic!("unexpected reply {t:#x} to NBD_OPT_LIST"),
            }
        }
    }

    /// LIST or SET_META_CONTEXT: the (id, name) pairs the server replied.
    fn meta(&mut self, opt: u32, export: &str, queries: &[&str]) -> Vec<(u32, String)> {
        self.option(opt, &meta_data(export, queries));
        let mut out = Vec::new();
        loop {
            let r = self.opt_reply();
            assert_eq!(r.opt, opt);
            match r.typ {
                REP_META_CONTEXT => out.push((
                    be32(&r.data),
                    String::from_utf8(r.data[4..].to_vec()).unwrap(),
                )),
                REP_ACK => return out,
                t => panic!(
                    "unexpected reply {t:#x} to meta context option: {}",
                    String::from_utf8_lossy(&r.data)
                ),
            }
        }
    }

    fn set_meta(&mut self, export: &str, queries: &[&str]) -> Vec<(u32, String)> {
        self.meta(OPT_SET_META_CONTEXT, export, queries)
    }

    /// INFO or GO on `export`: returns (size, transmission flags), checking
    /// the block sizes sent along.
    fn info_or_go(&mut self, opt: u32, export: &str) -> (u64, u16) {
        self.option(opt, &go_data(export, &[INFO_BLOCK_SIZE]));
        let mut export_info = None;
        let mut block = None;
        loop {
            let r = self.opt_reply();
            assert_eq!(r.opt, opt);
            match r.typ {
                REP_INFO => match be16(&r.data) {
                    INFO_EXPORT => export_info = Some((be64(&r.data[2..]), be16(&r.data[10..]))),
                    INFO_BLOCK_SIZE => {
                        block = Some((be32(&r.data[2..]), be32(&r.data[6..]), be32(&r.data[10..])))
                    }
                    _ => {}
                },
                REP_ACK => break,
                t => panic!(
                    "option {opt} on {export:?} failed with {t:#x}: {}",
                    String::from_utf8_lossy(&r.data)
                ),
            }
        }
        assert_eq!(block, Some((1, 4096, MAX_IO as u32)), "NBD_INFO_BLOCK_SIZE");
        export_info.expect("NBD_INFO_EXPORT")
    }

    fn go(&mut self, export: &str) {
        let (size, flags) = self.info_or_go(OPT_GO, export);
        self.size = size;
        self.flags = flags;
    }

    // ---- transmission ----

    fn request(&mut self, flags: u16, cmd: u16, cookie: u64, offset: u64, len: u64, data: &[u8]) {
        let mut m = client::request(self.mode == Mode::Extended, flags, cmd, cookie, offset, len);
        m.extend_from_slice(data);
        self.send(&m);
    }

    /// A simple reply: (error, cookie).
    fn simple_reply(&mut self) -> (u32, u64) {
        let h = self.recv(16);
        assert_eq!(
            be32(&h),
            SIMPLE_REPLY_MAGIC,
            "simple reply magic in {h:02x?}"
        );
        (be32(&h[4..]), be64(&h[8..]))
    }

    fn chunk(&mut self) -> Chunk {
        let extended = self.mode == Mode::Extended;
        let h = self.recv(if extended { 32 } else { 20 });
        let magic = if extended {
            EXTENDED_REPLY_MAGIC
        } else {
            STRUCTURED_REPLY_MAGIC
        };
        assert_eq!(be32(&h), magic, "chunk magic in {h:02x?}");
        let (offset, len) = if extended {
            (be64(&h[16..]), be64(&h[24..]))
        } else {
            (0, u64::from(be32(&h[16..])))
        };
        Chunk {
            flags: be16(&h[4..]),
            typ: be16(&h[6..]),
            cookie: be64(&h[8..]),
            offset,
            payload: self.recv(len as usize),
        }
    }

    /// Reads a reply that must be a success without data.
    fn expect_ok(&mut self, cookie: u64) {
        if self.mode == Mode::Extended {
            let c = self.chunk();
            assert_eq!(
                (c.cookie, c.flags, c.typ, c.payload.len()),
                (cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0),
                "{c:?}"
            );
        } else {
            // Simple replies are allowed for everything but READ.
            assert_eq!(
                self.simple_reply(),
                (0, cookie),
                "reply to request {cookie}"
            );
        }
    }

    /// Reads a reply that must be error `code` for `cookie`.
    fn expect_error(&mut self, cookie: u64, code: u32) {
        if self.mode == Mode::Simple {
            assert_eq!(
                self.simple_reply(),
                (code, cookie),
                "reply to request {cookie}"
            );
            return;
        }
        let c = self.chunk();
        assert_eq!(
            (c.cookie, c.flags, c.typ),
            (cookie, REPLY_FLAG_DONE, REPLY_TYPE_ERROR),
            "expected an error chunk: {c:?}"
        );
        assert_eq!(be32(&c.payload), code, "error code in {c:?}");
        let msg_len = be16(&c.payload[4..]) as usize;
        assert_eq!(c.payload.len(), 6 + msg_len, "error chunk length");
        assert!(msg_len > 0, "error chunk without a message");
        assert!(std::str::from_utf8(&c.payload[6..]).is_ok());
    }

    /// Reads a successful READ reply for `cookie` of `len` bytes at `offset`.
    fn read_reply(&mut self, cookie: u64, offset: u64, len: u64) -> Vec<u8> {
        if self.mode == Mode::Simple {
            assert_eq!(self.simple_reply(), (0, cookie), "READ {cookie}");
            return self.recv(len as usize);
        }
        let c = self.chunk();
        assert_eq!(
            (c.cookie, c.flags, c.typ),
            (cookie, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA),
            "READ {cookie}: chunk {:?}",
            (c.cookie, c.flags, c.typ, c.offset, c.payload.len())
        );
        assert_eq!(c.payload.len() as u64, 8 + len, "OFFSET_DATA length");
        assert_eq!(be64(&c.payload), offset, "OFFSET_DATA offset");
        if self.mode == Mode::Extended {
            assert_eq!(c.offset, offset, "extended reply header offset");
        }
        c.payload[8..].to_vec()
    }

    fn read_ok(&mut self, cookie: u64, offset: u64, len: u64) -> Vec<u8> {
        self.request(0, CMD_READ, cookie, offset, len, &[]);
        self.read_reply(cookie, offset, len)
    }

    fn write_ok(&mut self, cookie: u64, offset: u64, data: &[u8]) {
        self.request(0, CMD_WRITE, cookie, offset, data.len() as u64, data);
        self.expect_ok(cookie);
    }

    /// BLOCK_STATUS for base:allocation: (context id, [(length, flags)]).
    fn block_status(
        &mut self,
        cookie: u64,
        flags: u16,
        offset: u64,
        len: u64,
    ) -> (u32, Vec<(u64, u64)>) {
        self.request(flags, CMD_BLOCK_STATUS, cookie, offset, len, &[]);
        let c = self.chunk();
        let extended = self.mode == Mode::Extended;
        let typ = if extended {
            REPLY_TYPE_BLOCK_STATUS_EXT
        } else {
            REPLY_TYPE_BLOCK_STATUS
        };
        assert_eq!(
            (c.cookie, c.flags, c.typ),
            (cookie, REPLY_FLAG_DONE, typ),
            "{c:?}"
        );
        let p = &c.payload;
        let id = be32(p);
        let mut extents = Vec::new();
        if extended {
            let count = be32(&p[4..]) as usize;
            assert_eq!(p.len(), 8 + 16 * count, "BLOCK_STATUS_EXT length");
            for d in p[8..].chunks(16) {
                extents.push((be64(d), be64(&d[8..])));
            }
        } else {
            assert_eq!((p.len() - 4) % 8, 0, "BLOCK_STATUS length");
            for d in p[4..].chunks(8) {
                extents.push((u64::from(be32(d)), u64::from(be32(&d[4..]))));
            }
        }
        (id, extents)
    }

    /// A polite goodbye.
    fn disconnect(mut self) {
        self.request(0, CMD_DISC, 0, 0, 0, &[]);
        self.expect_closed();
    }
}

// ---------------------------------------------------------------- handshake

#[test]
fn bad_client_flags_disconnect() {
    let mut srv = Server::start("raw-client-flags");
    let mut c = srv.connect();
    c.send(&(FLAG_C_FIXED_NEWSTYLE | 1 << 31).to_be_bytes());
    c.expect_closed();
    srv.assert_healthy();
}

#[test]
fn bad_option_magic_disconnects() {
    let mut srv = Server::start("raw-opt-magic");
    let mut c = Client::options(&srv.vbd);
    let mut m = 0x4948_4156_454f_5055u64.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_LIST.to_be_bytes());
    m.extend_from_slice(&0u32.to_be_bytes());
    c.send(&m);
    c.expect_closed();
    srv.assert_healthy();
}

#[test]
fn unknown_option_is_unsupported_and_the_next_option_works() {
    let mut srv = Server::start("raw-unknown-opt");
    let mut c = Client::options(&srv.vbd);
    c.option_err(0x1234, b"whatever", REP_ERR_UNSUP);
    c.option_err(OPT_STRUCTURED_REPLY + 100, &[], REP_ERR_UNSUP);
    assert_eq!(c.list(), ["mem", "ro"]);
    srv.go_and_check(c, "read after UNSUP");
}

#[test]
fn option_data_over_64k_is_skipped_with_too_big() {
    let mut srv = Server::start("raw-too-big");
    let mut c = Client::options(&srv.vbd);
    // A GO whose data is too long must be skipped whole, not acted on: the
    // data even starts like a valid GO for "mem".
    let mut data = go_data("mem", &[]);
    data.resize(64 * 1024 + 1, 0xee);
    c.option_err(OPT_GO, &data, REP_ERR_TOO_BIG);
    c.option_err(OPT_LIST, &vec![0; 100_000], REP_ERR_TOO_BIG);
    assert_eq!(c.list(), ["mem", "ro"]);
    srv.go_and_check(c, "read after TOO_BIG");
}

#[test]
fn export_name_over_64k_disconnects() {
    let mut srv = Server::start("raw-long-name");
    let mut c = Client::options(&srv.vbd);
    // Only the header: the server must not wait for (or buffer) the name.
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    m.extend_from_slice(&(64 * 1024 + 1u32).to_be_bytes());
    c.send(&m);
    c.expect_closed();
    srv.assert_healthy();
}

#[test]
fn malformed_info_and_go_data_is_invalid() {
    let mut srv = Server::start("raw-malformed-go");
    let mut c = Client::options(&srv.vbd);
    let mut name_too_short = 100u32.to_be_bytes().to_vec();
    name_too_short.extend_from_slice(b"mem");
    let mut trailing = go_data("mem", &[INFO_NAME]);
    trailing.push(0);
    let mut missing_request = string("mem");
    missing_request.extend_from_slice(&3u16.to_be_bytes());
    missing_request.extend_from_slice(&INFO_NAME.to_be_bytes());
    let mut not_utf8 = 3u32.to_be_bytes().to_vec();
    not_utf8.extend_from_slice(&[0xff, 0xfe, 0xfd, 0, 0]);
    let mut name_over_4096 = string(&"m".repeat(4097));
    name_over_4096.extend_from_slice(&0u16.to_be_bytes());
    let cases: [&[u8]; 7] = [
        &[],
        &[0, 0],
        &name_too_short,
        &trailing,
        &missing_request,
        &not_utf8,
        &name_over_4096,
    ];
    for opt in [OPT_INFO, OPT_GO] {
        for data in cases {
            c.option_err(opt, data, REP_ERR_INVALID);
        }
    }
    // INFO succeeds without ending the handshake; GO then attaches.
    let (size, flags) = c.info_or_go(OPT_INFO, "ro");
    assert_eq!(size, RO_SIZE);
    assert_ne!(flags & FLAG_READ_ONLY, 0, "ro is read-only");
    srv.go_and_check(c, "read after INVALID");
}

#[test]
fn unknown_export_via_go_is_unknown_and_via_export_name_disconnects() {
    let mut srv = Server::start("raw-unknown-export");
    let mut c = Client::options(&srv.vbd);
    c.option_err(OPT_INFO, &go_data("nope", &[]), REP_ERR_UNKNOWN);
    c.option_err(OPT_GO, &go_data("nope", &[]), REP_ERR_UNKNOWN);
    // The empty name is the default export, the first one configured.
    c.go("");
    assert_eq!(c.size, SIZE);
    srv.assert_reads_seed(&mut c, 1, "default export");
    c.disconnect();

    let mut c = Client::options(&srv.vbd);
    c.option(OPT_EXPORT_NAME, b"nope");
    c.expect_closed();
    srv.assert_healthy();
}

#[test]
fn export_names_cannot_reach_outside_the_registry() {
    let mut srv = Server::start("raw-name-traversal");
    let bad = [
        "../mem", "mem/..", "./mem", "/mem", "mem/", "a/b", "..", ".", "mem\0", "\0",
    ];
    let mut c = Client::options(&srv.vbd);
    for name in bad {
        c.option_err(OPT_INFO, &go_data(name, &[]), REP_ERR_UNKNOWN);
        c.option_err(OPT_GO, &go_data(name, &[]), REP_ERR_UNKNOWN);
    }
    srv.go_and_check(c, "after hostile names");
    for name in ["../mem", "a/b", "mem\0"] {
        let mut c = Client::options(&srv.vbd);
        c.option(OPT_EXPORT_NAME, name.as_bytes());
        c.expect_closed();
    }
    srv.assert_healthy();
    // Nor can such a name be configured.
    for name in ["../x", "a/b", "", ".."] {
        let spec = format!("name={name},backend=memory,size=1M");
        let sock = srv.vbd.path("other.sock").display().to_string();
        let msg = vbd_fails(&["serve", "--unix", &sock, "--export", &spec]);
        assert!(msg.contains("invalid"), "{spec}: {msg}");
    }
}

#[test]
fn export_name_attaches_with_and_without_zero_padding() {
    let mut srv = Server::start("raw-export-name");
    for no_zeroes in [true, false] {
        let mut c = srv.connect();
        let flags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
        c.send(&flags.to_be_bytes());
        c.option(OPT_EXPORT_NAME, b"mem");
        let reply = c.recv(10);
        assert_eq!(be64(&reply), SIZE);
        assert_ne!(be16(&reply[8..]) & FLAG_HAS_FLAGS, 0);
        if !no_zeroes {
            assert_eq!(c.recv(124), vec![0; 124], "zero padding");
        }
        srv.assert_reads_seed(&mut c, 1, "after EXPORT_NAME");
        c.disconnect();
    }
    srv.assert_healthy();
}

#[test]
fn starttls_is_refused_by_policy() {
    let mut srv = Server::start("raw-starttls");
    let mut c = Client::options(&srv.vbd);
    c.option_err(OPT_STARTTLS, &[], REP_ERR_POLICY);
    srv.go_and_check(c, "read after STARTTLS");
}

#[test]
fn abort_is_acknowledged_then_closed() {
    let mut srv = Server::start("raw-abort");
    let mut c = Client::options(&srv.vbd);
    c.option_ok(OPT_ABORT, &[]);
    c.expect_closed();
    srv.assert_healthy();
}

#[test]
fn meta_contexts_list_and_set_base_allocation() {
    let mut srv = Server::start("raw-meta");
    let mut c = Client::options(&srv.vbd);
    // Meta contexts need structured replies first.
    c.option_err(
        OPT_SET_META_CONTEXT,
        &meta_data("mem", &["base:allocation"]),
        REP_ERR_INVALID,
    );
    c.option_ok(OPT_STRUCTURED_REPLY, &[]);
    let listed = c.meta(OPT_LIST_META_CONTEXT, "mem", &[]);
    assert_eq!(
        listed,
        [(0, "base:allocation".to_string())],
        "LIST with no query"
    );
    let listed = c.meta(OPT_LIST_META_CONTEXT, "mem", &["base:"]);
    assert_eq!(listed, [(0, "base:allocation".to_string())], "LIST base:");
    assert_eq!(
        c.meta(OPT_LIST_META_CONTEXT, "mem", &["qemu:dirty-bitmap:x"]),
        []
    );
    c.option_err(
        OPT_SET_META_CONTEXT,
        &meta_data("nope", &["base:allocation"]),
        REP_ERR_UNKNOWN,
    );
    c.option_err(OPT_SET_META_CONTEXT, &[0, 0, 0, 3, b'm'], REP_ERR_INVALID);
    let set = c.set_meta("mem", &["qemu:dirty-bitmap:x", "base:allocation"]);
    assert_eq!(set.len(), 1);
    let (id, name) = &set[0];
    assert_eq!(name, "base:allocation");
    c.go("mem");
    c.mode = Mode::Structured;
    // The seed made the first 64 KiB page data; the rest is a hole.
    let (ctx, extents) = c.block_status(1, 0, 0, MIB);
    assert_eq!(ctx, *id, "context id of the reply");
    let hole_zero = u64::from(STATE_HOLE | STATE_ZERO);
    assert_eq!(
        extents,
        [(SEED_LEN as u64, 0), (MIB - SEED_LEN as u64, hole_zero)]
    );
    let (_, one) = c.block_status(2, CMD_FLAG_REQ_ONE, 0, MIB);
    assert_eq!(one, [(SEED_LEN as u64, 0)], "REQ_ONE");
    let (_, tail) = c.block_status(3, 0, SIZE - 4096, 4096);
    assert_eq!(tail, [(4096, hole_zero)], "last 4 KiB");
    c.disconnect();
    srv.assert_healthy();
}

#[test]
fn structured_read_is_one_data_chunk_and_errors_are_error_chunks() {
    let mut srv = Server::start("raw-structured");
    let mut c = srv.attach("mem", Mode::Structured);
    assert_ne!(
        c.flags & FLAG_SEND_DF,
        0,
        "DF is offered with structured replies"
    );
    let got = c.read_ok(1, 100, 4096);
    assert_bytes_eq(&got, &srv.seed[100..4196], "structured READ");
    // DF (don't fragment) is accepted and still one chunk.
    c.request(CMD_FLAG_DF, CMD_READ, 2, 5, 10, &[]);
    assert_bytes_eq(&c.read_reply(2, 5, 10), &srv.seed[5..15], "READ with DF");
    c.request(0, CMD_READ, 3, SIZE - 10, 20, &[]);
    c.expect_error(3, EINVAL);
    // Non-read commands may still get simple replies.
    c.write_ok(4, MIB, b"structured");
    assert_eq!(c.read_ok(5, MIB, 10), b"structured");
    c.disconnect();
    srv.assert_healthy();
}

// ------------------------------------------------------------- transmission

#[test]
fn bad_request_magic_disconnects() {
    let mut srv = Server::start("raw-req-magic");
    let mut c = srv.attach("mem", Mode::Simple);
    let mut m = 0x2560_9514u32.to_be_bytes().to_vec();
    m.extend_from_slice(&[0; 24]);
    c.send(&m);
    c.expect_closed();
    srv.assert_healthy();
}

#[test]
fn unknown_command_and_unknown_flag_are_einval() {
    let mut srv = Server::start("raw-unknown-cmd");
    for mode in [Mode::Simple, Mode::Structured, Mode::Extended] {
        let mut c = srv.attach("mem", mode);
        // (flags, command, payload): an unknown command, an unknown flag, and
        // REQ_ONE, which only BLOCK_STATUS takes, on a WRITE whose payload
        // must still be consumed for the next request to parse.
        let refused: [(u16, u16, &[u8]); 3] = [
            (0, 99, &[]),
            (1 << 9, CMD_READ, &[]),
            (CMD_FLAG_REQ_ONE, CMD_WRITE, &[0xab; 512]),
        ];
        for (cookie, (flags, cmd, payload)) in (1..).zip(refused) {
            let len = if payload.is_empty() {
                4096
            } else {
                payload.len() as u64
            };
            c.request(flags, cmd, cookie, 0, len, payload);
            c.expect_error(cookie, EINVAL);
        }
        srv.assert_reads_seed(&mut c, 4, "after EINVAL");
        c.disconnect();
    }
    srv.assert_healthy();
}

#[test]
fn read_past_end_and_over_maximum_are_einval() {
    let mut srv = Server::start("raw-read-range");
    let mut c = srv.attach("mem", Mode::Simple);
    let refused = [
        (SIZE - 100, 200),
        (SIZE + 4096, 0),
        (u64::MAX - 10, 4096),
        (0, MAX_IO + 1),
    ];
    for (cookie, (offset, len)) in (1..).zip(refused) {
        c.request(0, CMD_READ, cookie, offset, len, &[]);
        c.expect_error(cookie, EINVAL);
    }
    // The edges themselves are fine.
    assert_eq!(c.read_ok(5, SIZE - 100, 100), vec![0; 100]);
    let big = c.read_ok(6, 0, MAX_IO);
    assert_bytes_eq(&big[..SEED_LEN], &srv.seed, "32 MiB read");
    assert!(big[SEED_LEN..].iter().all(|&b| b == 0));
    c.disconnect();
    srv.assert_healthy();
}

#[test]
fn write_past_end_is_enospc_with_the_payload_consumed() {
    let mut srv = Server::start("raw-write-range");
    let mut c = srv.attach("mem", Mode::Simple);
    c.request(0, CMD_WRITE, 1, SIZE - 512, 4096, &[0xcd; 4096]);
    c.expect_error(1, ENOSPC);
    c.request(0, CMD_WRITE_ZEROES, 2, SIZE - 512, 4096, &[]);
    c.expect_error(2, ENOSPC);
    // Had the payload been taken for headers, this would not parse.
    assert_eq!(
        c.read_ok(3, SIZE - 512, 512),
        vec![0; 512],
        "nothing written"
    );
    c.write_ok(4, SIZE - 512, &[0xcd; 512]);
    assert_eq!(c.read_ok(5, SIZE - 512, 512), vec![0xcd; 512]);
    c.disconnect();
    srv.assert_healthy();
}

#[test]
fn write_over_maximum_is_einval_with_the_payload_dropped() {
    let mut srv = Server::start("raw-write-max");
    for mode in [Mode::Simple, Mode::Extended] {
        let mut c = srv.attach("mem", mode);
        // The payload is request headers: parsed, they would be answered.
        let junk = client::request(mode == Mode::Extended, 0, CMD_TRIM, 99, 0, 4096);
        let payload: Vec<u8> = junk
            .iter()
            .copied()
            .cycle()
            .take((MAX_IO + 4096) as usize)
            .collect();
        c.request(0, CMD_WRITE, 1, 0, MAX_IO + 4096, &payload);
        c.expect_error(1, EINVAL);
        // Same connection: the seed is intact and the next write lands.
        srv.assert_reads_seed(&mut c, 2, "after the refused write");
        c.write_ok(3, 8 * MIB, &[0x3c; 4096]);
        assert_eq!(c.read_ok(4, 8 * MIB, 4096), vec![0x3c; 4096]);
        c.request(0, CMD_WRITE_ZEROES, 5, 8 * MIB, 4096, &[]);
        c.expect_ok(5);
        c.disconnect();
    }
    // An extended header may claim a payload no server should wait for.
    let mut c = srv.attach("mem", Mode::Extended);
    c.request(0, CMD_WRITE, 1, 0, 5 << 30, &[]);
    c.expect_closed();
    srv.assert_healthy();
}

#[test]
fn truncated_write_payload_then_close_changes_nothing() {
    let mut srv = Server::start("raw-truncated");
    let mut c = srv.attach("mem", Mode::Simple);
    c.request(0, CMD_WRITE, 1, 0, SEED_LEN as u64, &[0xff; 1000]);
    drop(c);
    // The half-received write must never reach the volume.
    srv.assert_healthy();
}

#[test]
fn writes_to_a_read_only_export_are_eperm() {
    let mut srv = Server::start("raw-read-only");
    let mut c = srv.attach("ro", Mode::Simple);
    assert_eq!(c.size, RO_SIZE);
    assert_ne!(c.flags & FLAG_READ_ONLY, 0, "read-only flag");
    assert_eq!(c.flags & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES), 0);
    c.request(0, CMD_WRITE, 1, 0, 4096, &[0x11; 4096]);
    c.expect_error(1, EPERM);
    c.request(0, CMD_TRIM, 2, 0, 4096, &[]);
    c.expect_error(2, EPERM);
    c.request(0, CMD_WRITE_ZEROES, 3, 0, 4096, &[]);
    c.expect_error(3, EPERM);
    assert_eq!(
        c.read_ok(4, 0, 4096),
        vec![0; 4096],
        "read-only export content"
    );
    c.disconnect();
    srv.assert_healthy();
}

#[test]
fn block_status_without_a_meta_context_is_einval() {
    let mut srv = Server::start("raw-bs-no-ctx");
    for mode in [Mode::Simple, Mode::Structured] {
        let mut c = Client::options(&srv.vbd);
        if mode == Mode::Structured {
            c.option_ok(OPT_STRUCTURED_REPLY, &[]);
        }
        c.go("mem");
        c.mode = mode;
        c.request(0, CMD_BLOCK_STATUS, 1, 0, 4096, &[]);
        c.expect_error(1, EINVAL);
        srv.assert_reads_seed(&mut c, 2, "after EINVAL");
        c.disconnect();
    }
    srv.assert_healthy();
}

#[test]
fn disc_answers_requests_in_flight_then_closes() {
    let mut srv = Server::start("raw-disc");
    let mut c = srv.attach("mem", Mode::Simple);
    // Eight reads and a write in one burst, DISC right behind them.
    let mut burst = Vec::new();
    let header = |cmd, cookie, offset, len| client::request(false, 0, cmd, cookie, offset, len);
    for i in 0..8u64 {
        burst.extend(header(CMD_READ, 100 + i, i * 8192, 8192));
    }
    burst.extend(header(CMD_WRITE, 200, 2 * MIB, 4096));
    burst.extend([0x42; 4096]);
    burst.extend(header(CMD_DISC, 300, 0, 0));
    c.send(&burst);
    let mut seen = Vec::new();
    for _ in 0..9 {
        let (err, cookie) = c.simple_reply();
        assert_eq!(err, 0, "request {cookie}");
        if cookie >= 200 {
            assert_eq!(cookie, 200);
        } else {
            let i = (cookie - 100) as usize;
            let data = c.recv(8192);
            assert_bytes_eq(&data, &srv.seed[i * 8192..(i + 1) * 8192], "burst read");
        }
        seen.push(cookie);
    }
    seen.sort_unstable();
    assert_eq!(seen, [100, 101, 102, 103, 104, 105, 106, 107, 200]);
    c.expect_closed();
    let mut check = srv.attach("mem", Mode::Simple);
    assert_eq!(
        check.read_ok(1, 2 * MIB, 4096),
        vec![0x42; 4096],
        "write before DISC"
    );
    check.disconnect();
    srv.assert_healthy();
}

#[test]
fn extended_headers_frame_requests_and_replies_in_32_bytes() {
    let mut srv = Server::start("raw-extended");
    let mut c = srv.attach("mem", Mode::Extended);
    assert_eq!(c.size, SIZE);
    // READ: an OFFSET_DATA chunk with a 32-byte header.
    assert_bytes_eq(
        &c.read_ok(1, 1000, 5000),
        &srv.seed[1000..6000],
        "extended READ",
    );
    // WRITE and FLUSH: NONE chunks with DONE.
    let data = pattern(11, 8192);
    c.write_ok(2, 2 * MIB, &data);
    c.request(CMD_FLAG_FUA, CMD_WRITE, 3, 2 * MIB + 8192, 3, b"fua");
    c.expect_ok(3);
    c.request(0, CMD_FLUSH, 4, 0, 0, &[]);
    c.expect_ok(4);
    assert_bytes_eq(&c.read_ok(5, 2 * MIB, 8192), &data, "extended WRITE");
    // BLOCK_STATUS_EXT: 64-bit lengths and flags.
    let hole_zero = u64::from(STATE_HOLE | STATE_ZERO);
    let page = SEED_LEN as u64; // the memory volume allocates 64 KiB pages
    let (ctx, extents) = c.block_status(6, 0, 0, 4 * MIB);
    assert_eq!(Some(ctx), c.meta_id, "context id of the reply");
    assert_eq!(
        extents,
        [
            (page, 0),
            (2 * MIB - page, hole_zero),
            (page, 0),
            (2 * MIB - page, hole_zero)
        ]
    );
    // Errors come as extended error chunks.
    c.request(0, CMD_READ, 7, SIZE, 1, &[]);
    c.expect_error(7, EINVAL);
    c.request(0, CMD_WRITE, 8, SIZE - 1, 2, b"xx");
    c.expect_error(8, ENOSPC);
    // A compact header is a protocol violation once extended ones are agreed.
    let mut compact = REQUEST_MAGIC.to_be_bytes().to_vec();
    compact.extend_from_slice(&[0; 24]);
    c.send(&compact);
    c.expect_closed();
    srv.assert_healthy();
}
