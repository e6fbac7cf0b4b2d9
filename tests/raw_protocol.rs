//! Hand-written NBD over a raw Unix socket: malformed handshakes, hostile
//! requests and abrupt disconnects. Each case gets the spec's error or a
//! clean disconnect, and the server keeps serving a well-behaved client.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use vbd::nbd::wire::*;

const EXPORTS: [&str; 4] = [
    "--export",
    "name=mem,backend=memory,size=16M",
    "--export",
    "name=ro,backend=memory,size=1M,read-only",
];

struct Client {
    s: UnixStream,
}

impl Client {
    /// Connects and reads the 18-byte greeting.
    fn connect(v: &Vbd) -> Client {
        let s = UnixStream::connect(&v.socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut c = Client { s };
        let g = c.read(18);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(
            u16::from_be_bytes([g[16], g[17]]),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
        c
    }

    /// Connects and sends client flags (fixed newstyle, no zeroes).
    fn negotiating(v: &Vbd) -> Client {
        let mut c = Client::connect(v);
        c.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        c
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    fn read(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.s
            .read_exact(&mut b)
            .unwrap_or_else(|e| panic!("reading {n} bytes: {e}"));
        b
    }

    /// True once the server has closed the connection (EOF or reset);
    /// false if it sent more bytes; a timeout fails the test.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!("the server neither closed the connection nor replied")
            }
            Err(_) => true,
        }
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// Reads one option reply: (option, type, data).
    fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.read(20);
        assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), REPLY_MAGIC);
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        (opt, typ, self.read(len))
    }

    /// Reads replies until a final one (ACK or error); returns them all.
    fn replies(&mut self) -> Vec<(u32, u32, Vec<u8>)> {
        let mut all = Vec::new();
        loop {
            let r = self.reply();
            let last = r.1 == REP_ACK || r.1 & 0x8000_0000 != 0;
            all.push(r);
            if last {
                return all;
            }
        }
    }

    /// NBD_OPT_GO for `name`; returns (size, flags).
    fn go(&mut self, name: &str) -> (u64, u16) {
        self.option(OPT_GO, &go_data(name, &[INFO_BLOCK_SIZE]));
        let rs = self.replies();
        assert_eq!(rs.last().unwrap().1, REP_ACK, "GO {name} failed: {rs:?}");
        let info = rs
            .iter()
            .find(|r| r.1 == REP_INFO && r.2[..2] == INFO_EXPORT.to_be_bytes())
            .expect("NBD_INFO_EXPORT");
        (
            u64::from_be_bytes(info.2[2..10].try_into().unwrap()),
            u16::from_be_bytes(info.2[10..12].try_into().unwrap()),
        )
    }

    fn request(
        &mut self,
        flags: u16,
        cmd: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.send(&b);
    }

    /// Reads a simple reply: (error, cookie).
    fn simple(&mut self) -> (u32, u64) {
        let h = self.read(16);
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC,
            "{h:02x?}"
        );
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    /// Reads a structured chunk: (flags, type, cookie, payload).
    fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let h = self.read(20);
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            STRUCTURED_REPLY_MAGIC,
            "{h:02x?}"
        );
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        (
            u16::from_be_bytes(h[4..6].try_into().unwrap()),
            u16::from_be_bytes(h[6..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
            self.read(len),
        )
    }
}

fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// A well-behaved client on its own connection: writes and reads back.
fn still_serving(v: &Vbd, round: u8) {
    let mut c = Client::negotiating(v);
    c.go("mem");
    let data = vec![round; 4096];
    c.request(0, CMD_WRITE, 1, 8192, 4096, &data);
    assert_eq!(c.simple(), (0, 1));
    c.request(0, CMD_READ, 2, 8192, 4096, &[]);
    assert_eq!(c.simple(), (0, 2));
    assert_eq!(c.read(4096), data);
    c.request(0, CMD_DISC, 3, 0, 0, &[]);
    assert!(c.closed());
}

fn server() -> Vbd {
    Vbd::start("raw", &EXPORTS)
}

#[test]
fn bad_client_flags_disconnect() {
    let v = server();
    let mut c = Client::connect(&v);
    c.send(&0x8000_0001u32.to_be_bytes());
    assert!(c.closed());
    still_serving(&v, 1);
    assert!(v.log_text().contains("client flags"));
    v.stop();
}

#[test]
fn bad_option_magic_disconnects() {
    let v = server();
    let mut c = Client::negotiating(&v);
    c.send(b"NOTMAGIC\x00\x00\x00\x03\x00\x00\x00\x00");
    assert!(c.closed());
    still_serving(&v, 2);
    v.stop();
}

#[test]
fn unknown_and_oversized_options_are_refused_and_parsing_continues() {
    let v = server();
    let mut c = Client::negotiating(&v);
    c.option(0xdead, b"some data");
    let (opt, typ, _) = c.reply();
    assert_eq!((opt, typ), (0xdead, REP_ERR_UNSUP));
    // Over the 64 KiB option limit: skipped, not buffered, then refused.
    c.option(OPT_LIST, &vec![7u8; 200_000]);
    assert_eq!(c.reply().1, REP_ERR_TOO_BIG);
    // The stream is still in sync: LIST works.
    c.option(OPT_LIST, &[]);
    let rs = c.replies();
    let names: Vec<String> = rs
        .iter()
        .filter(|r| r.1 == REP_SERVER)
        .map(|r| {
            let n = u32::from_be_bytes(r.2[..4].try_into().unwrap()) as usize;
            String::from_utf8_lossy(&r.2[4..4 + n]).into_owned()
        })
        .collect();
    assert_eq!(names, ["mem", "ro"]);
    // LIST with data is invalid.
    c.option(OPT_LIST, b"x");
    assert_eq!(c.reply().1, REP_ERR_INVALID);
    still_serving(&v, 3);
    v.stop();
}

#[test]
fn malformed_info_and_unknown_exports() {
    let v = server();
    let mut c = Client::negotiating(&v);
    // Name length pointing past the end of the option.
    c.option(OPT_INFO, &[0, 0, 1, 0, b'm', 0, 0]);
    assert_eq!(c.reply().1, REP_ERR_INVALID);
    // Trailing garbage after the info requests.
    let mut d = go_data("mem", &[INFO_NAME]);
    d.push(0);
    c.option(OPT_GO, &d);
    assert_eq!(c.reply().1, REP_ERR_INVALID);
    // Unknown export through GO: an error reply, and the session goes on.
    c.option(OPT_GO, &go_data("nope", &[]));
    assert_eq!(c.reply().1, REP_ERR_UNKNOWN);
    // INFO with every info type answers each.
    c.option(
        OPT_INFO,
        &go_data("mem", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]),
    );
    let rs = c.replies();
    assert_eq!(rs.last().unwrap().1, REP_ACK);
    let info = |t: u16| {
        rs.iter()
            .find(|r| r.1 == REP_INFO && r.2[..2] == t.to_be_bytes())
            .map(|r| r.2[2..].to_vec())
    };
    assert_eq!(info(INFO_NAME).unwrap(), b"mem");
    assert!(
        String::from_utf8(info(INFO_DESCRIPTION).unwrap())
            .unwrap()
            .contains("memory")
    );
    let bs = info(INFO_BLOCK_SIZE).unwrap();
    assert_eq!(
        bs,
        [
            &1u32.to_be_bytes()[..],
            &4096u32.to_be_bytes(),
            &(32u32 << 20).to_be_bytes()
        ]
        .concat()
    );
    // The default export answers to the empty name.
    let (size, _) = c.go("");
    assert_eq!(size, 16 << 20);
    drop(c);
    // EXPORT_NAME cannot return an error: unknown name means disconnect.
    let mut c = Client::negotiating(&v);
    c.option(OPT_EXPORT_NAME, b"nope");
    assert!(c.closed());
    // EXPORT_NAME of a real export: size, flags, no zeroes (negotiated away).
    let mut c = Client::negotiating(&v);
    c.option(OPT_EXPORT_NAME, b"mem");
    let r = c.read(10);
    assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), 16 << 20);
    c.request(0, CMD_READ, 9, 0, 512, &[]);
    assert_eq!(c.simple(), (0, 9));
    assert_eq!(c.read(512), vec![0u8; 512]);
    still_serving(&v, 4);
    v.stop();
}

#[test]
fn starttls_is_refused_by_policy_and_abort_is_acknowledged() {
    let v = server();
    let mut c = Client::negotiating(&v);
    c.option(OPT_STARTTLS, &[]);
    let (_, typ, msg) = c.reply();
    assert_eq!(typ, REP_ERR_POLICY);
    assert!(String::from_utf8_lossy(&msg).contains("TLS"));
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.reply().1, REP_ACK);
    assert!(c.closed());
    still_serving(&v, 5);
    v.stop();
}

#[test]
fn meta_contexts_and_block_status() {
    let v = server();
    let mut c = Client::negotiating(&v);
    // Meta contexts need structured replies first.
    c.option(
        OPT_SET_META_CONTEXT,
        &meta_data("mem", &["base:allocation"]),
    );
    assert_eq!(c.reply().1, REP_ERR_INVALID);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.reply().1, REP_ACK);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(
        c.reply().1,
        REP_ERR_INVALID,
        "a second STRUCTURED_REPLY is refused"
    );
    c.option(OPT_LIST_META_CONTEXT, &meta_data("mem", &["base:"]));
    let rs = c.replies();
    assert_eq!(rs.len(), 2);
    assert_eq!(rs[0].1, REP_META_CONTEXT);
    assert_eq!(&rs[0].2[4..], b"base:allocation");
    // Unknown namespaces are ignored, not errors.
    c.option(
        OPT_LIST_META_CONTEXT,
        &meta_data("mem", &["qemu:dirty-bitmap:x"]),
    );
    assert_eq!(c.replies().len(), 1);
    c.option(
        OPT_SET_META_CONTEXT,
        &meta_data("mem", &["base:allocation", "x-foo:bar"]),
    );
    let rs = c.replies();
    assert_eq!(rs.len(), 2);
    let id = u32::from_be_bytes(rs[0].2[..4].try_into().unwrap());
    let (_, flags) = c.go("mem");
    assert_ne!(
        flags & FLAG_SEND_DF,
        0,
        "DF is offered with structured replies"
    );
    c.request(0, CMD_WRITE, 1, 1 << 20, 4096, &[1u8; 4096]);
    assert_eq!(c.simple(), (0, 1));
    c.request(0, CMD_BLOCK_STATUS, 2, 0, 4 << 20, &[]);
    let (flags, typ, cookie, p) = c.chunk();
    assert_eq!(
        (flags, typ, cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 2)
    );
    assert_eq!(u32::from_be_bytes(p[..4].try_into().unwrap()), id);
    let ext: Vec<(u32, u32)> = p[4..]
        .chunks(8)
        .map(|e| {
            (
                u32::from_be_bytes(e[..4].try_into().unwrap()),
                u32::from_be_bytes(e[4..].try_into().unwrap()),
            )
        })
        .collect();
    assert_eq!(
        ext,
        [
            (1 << 20, STATE_HOLE | STATE_ZERO),
            (64 << 10, 0),
            ((3 << 20) - (64 << 10), STATE_HOLE | STATE_ZERO)
        ]
    );
    // REQ_ONE: exactly one extent, not longer than asked.
    c.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 3, 0, 4096, &[]);
    let (_, _, _, p) = c.chunk();
    assert_eq!(p.len(), 12);
    assert_eq!(u32::from_be_bytes(p[4..8].try_into().unwrap()), 4096);
    // Structured READ: one OFFSET_DATA chunk with DONE.
    c.request(CMD_FLAG_DF, CMD_READ, 4, 1 << 20, 4096, &[]);
    let (flags, typ, cookie, p) = c.chunk();
    assert_eq!(
        (flags, typ, cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 4)
    );
    assert_eq!(u64::from_be_bytes(p[..8].try_into().unwrap()), 1 << 20);
    assert_eq!(&p[8..], &[1u8; 4096][..]);
    // A READ error is a structured error chunk carrying a message.
    c.request(0, CMD_READ, 5, 16 << 20, 1, &[]);
    let (flags, typ, cookie, p) = c.chunk();
    assert_eq!((flags, typ, cookie), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 5));
    assert_eq!(u32::from_be_bytes(p[..4].try_into().unwrap()), 22);
    let mlen = u16::from_be_bytes([p[4], p[5]]) as usize;
    assert_eq!(p.len(), 6 + mlen);
    assert!(mlen > 0);
    v.stop();
}

#[test]
fn block_status_without_meta_context_is_einval() {
    let v = server();
    let mut c = Client::negotiating(&v);
    c.go("mem");
    c.request(0, CMD_BLOCK_STATUS, 1, 0, 4096, &[]);
    assert_eq!(c.simple(), (22, 1));
    v.stop();
}

#[test]
fn hostile_requests_get_errors_and_the_connection_survives() {
    let v = server();
    let mut c = Client::negotiating(&v);
    c.go("mem");
    let size = 16u64 << 20;
    // Unknown command and unknown flag.
    c.request(0, 99, 1, 0, 0, &[]);
    assert_eq!(c.simple(), (22, 1));
    c.request(1 << 9, CMD_READ, 2, 0, 512, &[]);
    assert_eq!(c.simple(), (22, 2));
    // DF without structured replies is a flag the client may not use.
    c.request(CMD_FLAG_DF, CMD_READ, 3, 0, 512, &[]);
    assert_eq!(c.simple(), (22, 3));
    // Past the end: read EINVAL, write ENOSPC (payload still consumed).
    c.request(0, CMD_READ, 4, size - 100, 200, &[]);
    assert_eq!(c.simple(), (22, 4));
    c.request(0, CMD_WRITE, 5, size, 4096, &[0xee; 4096]);
    assert_eq!(c.simple(), (28, 5));
    c.request(0, CMD_WRITE, 6, u64::MAX - 10, 4096, &[0xee; 4096]);
    assert_eq!(c.simple(), (28, 6), "offset+length overflow");
    // Longer than the 32 MiB maximum block size.
    c.request(0, CMD_READ, 7, 0, (32 << 20) + 1, &[]);
    assert_eq!(c.simple(), (22, 7));
    // FLUSH must have zero offset and length.
    c.request(0, CMD_FLUSH, 8, 1, 0, &[]);
    assert_eq!(c.simple(), (22, 8));
    // After all that the stream is in sync and data is untouched.
    c.request(0, CMD_WRITE, 9, 0, 4, b"abcd");
    assert_eq!(c.simple(), (0, 9));
    c.request(0, CMD_READ, 10, 0, 4, &[]);
    assert_eq!(c.simple(), (0, 10));
    assert_eq!(c.read(4), b"abcd");
    // Pipelined: many requests in one write, all answered.
    let mut batch = Vec::new();
    for i in 0..300u64 {
        batch.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        batch.extend_from_slice(&0u16.to_be_bytes());
        batch.extend_from_slice(&CMD_WRITE.to_be_bytes());
        batch.extend_from_slice(&(1000 + i).to_be_bytes());
        batch.extend_from_slice(&(i * 512).to_be_bytes());
        batch.extend_from_slice(&512u32.to_be_bytes());
        batch.extend_from_slice(&[i as u8; 512]);
    }
    c.send(&batch);
    let mut cookies: Vec<u64> = (0..300)
        .map(|_| c.simple())
        .map(|(e, k)| {
            assert_eq!(e, 0);
            k
        })
        .collect();
    cookies.sort();
    assert_eq!(cookies, (1000..1300).collect::<Vec<_>>());
    c.request(0, CMD_READ, 11, 299 * 512, 512, &[]);
    assert_eq!(c.simple(), (0, 11));
    assert_eq!(c.read(512), vec![299u16 as u8; 512]);
    still_serving(&v, 6);
    v.stop();
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let v = server();
    let mut c = Client::negotiating(&v);
    let (_, flags) = c.go("ro");
    assert_ne!(flags & FLAG_READ_ONLY, 0);
    c.request(0, CMD_WRITE, 1, 0, 512, &[1; 512]);
    assert_eq!(c.simple(), (1, 1));
    c.request(0, CMD_TRIM, 2, 0, 512, &[]);
    assert_eq!(c.simple(), (1, 2));
    c.request(0, CMD_WRITE_ZEROES, 3, 0, 512, &[]);
    assert_eq!(c.simple(), (1, 3));
    c.request(0, CMD_READ, 4, 0, 512, &[]);
    assert_eq!(c.simple(), (0, 4));
    assert_eq!(c.read(512), vec![0; 512]);
    v.stop();
}

#[test]
fn protocol_violations_disconnect_without_harm() {
    let v = server();
    // Bad request magic.
    let mut c = Client::negotiating(&v);
    c.go("mem");
    c.send(&[0x12; 28]);
    assert!(c.closed());
    // Write payload over 32 MiB: refused by hanging up, not buffered.
    let mut c = Client::negotiating(&v);
    c.go("mem");
    c.request(0, CMD_WRITE, 1, 0, (32 << 20) + 4096, &[]);
    assert!(c.closed());
    // Truncated payload, then the client vanishes.
    let mut c = Client::negotiating(&v);
    c.go("mem");
    c.request(0, CMD_WRITE, 1, 0, 65536, &[0x77; 1000]);
    drop(c);
    // Truncated header, then the client vanishes.
    let mut c = Client::negotiating(&v);
    c.go("mem");
    c.send(&REQUEST_MAGIC.to_be_bytes());
    drop(c);
    // Disconnect mid-handshake.
    let mut c = Client::negotiating(&v);
    c.send(&IHAVEOPT.to_be_bytes()[..5]);
    drop(c);
    still_serving(&v, 7);
    // Nothing of the truncated write landed.
    let mut c = Client::negotiating(&v);
    c.go("mem");
    c.request(0, CMD_READ, 2, 0, 1000, &[]);
    assert_eq!(c.simple(), (0, 2));
    assert_eq!(c.read(1000), vec![0; 1000]);
    assert!(v.log_text().contains("request header has magic"));
    assert!(v.log_text().contains("payload of"));
    v.stop();
}

#[test]
fn disc_answers_in_flight_requests_then_closes() {
    let v = server();
    let mut c = Client::negotiating(&v);
    c.go("mem");
    let mut b = Vec::new();
    for i in 0..8u64 {
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&CMD_READ.to_be_bytes());
        b.extend_from_slice(&i.to_be_bytes());
        b.extend_from_slice(&0u64.to_be_bytes());
        b.extend_from_slice(&4096u32.to_be_bytes());
    }
    b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&CMD_DISC.to_be_bytes());
    b.extend_from_slice(&[0; 20]);
    c.send(&b);
    for _ in 0..8 {
        assert_eq!(c.simple().0, 0);
        c.read(4096);
    }
    assert!(c.closed());
    v.stop();
}

/// Sends an extended-header request.
fn ext_request(
    c: &mut Client,
    flags: u16,
    cmd: u16,
    cookie: u64,
    offset: u64,
    len: u64,
    payload: &[u8],
) {
    let mut b = EXTENDED_REQUEST_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&cmd.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(payload);
    c.send(&b);
}

/// Reads an extended reply chunk: (flags, type, cookie, offset, payload).
fn ext_chunk(c: &mut Client) -> (u16, u16, u64, u64, Vec<u8>) {
    let h = c.read(32);
    assert_eq!(
        u32::from_be_bytes(h[..4].try_into().unwrap()),
        EXTENDED_REPLY_MAGIC,
        "{h:02x?}"
    );
    let len = u64::from_be_bytes(h[24..32].try_into().unwrap()) as usize;
    (
        u16::from_be_bytes(h[4..6].try_into().unwrap()),
        u16::from_be_bytes(h[6..8].try_into().unwrap()),
        u64::from_be_bytes(h[8..16].try_into().unwrap()),
        u64::from_be_bytes(h[16..24].try_into().unwrap()),
        c.read(len),
    )
}

#[test]
fn extended_headers() {
    let v = server();
    let mut c = Client::negotiating(&v);
    c.option(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(c.reply().1, REP_ACK);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.reply().1, REP_ERR_EXT_HEADER_REQD);
    c.option(
        OPT_SET_META_CONTEXT,
        &meta_data("mem", &["base:allocation"]),
    );
    assert_eq!(c.replies().len(), 2);
    c.go("mem");
    ext_request(&mut c, 0, CMD_WRITE, 1, 4096, 8192, &[3u8; 8192]);
    assert_eq!(
        ext_chunk(&mut c),
        (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1, 4096, vec![])
    );
    ext_request(&mut c, 0, CMD_READ, 2, 4096, 8192, &[]);
    let (flags, typ, cookie, off, p) = ext_chunk(&mut c);
    assert_eq!(
        (flags, typ, cookie, off),
        (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 2, 4096)
    );
    assert_eq!(u64::from_be_bytes(p[..8].try_into().unwrap()), 4096);
    assert_eq!(&p[8..], &[3u8; 8192][..]);
    // 64-bit lengths: a trim of 8 GiB is past the end (16 MiB export).
    ext_request(&mut c, 0, CMD_TRIM, 3, 0, 8 << 30, &[]);
    let (_, typ, cookie, _, p) = ext_chunk(&mut c);
    assert_eq!((typ, cookie), (REPLY_TYPE_ERROR, 3));
    assert_eq!(u32::from_be_bytes(p[..4].try_into().unwrap()), 22);
    ext_request(&mut c, 0, CMD_BLOCK_STATUS, 4, 0, 16 << 20, &[]);
    let (_, typ, cookie, _, p) = ext_chunk(&mut c);
    assert_eq!((typ, cookie), (REPLY_TYPE_BLOCK_STATUS_EXT, 4));
    let count = u32::from_be_bytes(p[4..8].try_into().unwrap()) as usize;
    assert_eq!(p.len(), 8 + 16 * count);
    let first = (
        u64::from_be_bytes(p[8..16].try_into().unwrap()),
        u64::from_be_bytes(p[16..24].try_into().unwrap()),
    );
    assert_eq!(first, (64 << 10, 0), "first extent is the written page");
    // A compact request on an extended session is a protocol violation.
    c.request(0, CMD_READ, 5, 0, 512, &[]);
    assert!(c.closed());
    still_serving(&v, 8);
    v.stop();
}
