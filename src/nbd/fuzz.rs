//! Fuzz target bodies, kept in the library so that `cargo test` replays the
//! corpus on stable Rust and `fuzz/` stays a thin wrapper. Each body feeds
//! arbitrary bytes through the protocol core in fuzzer-chosen pieces and
//! checks invariants; any panic is a bug.

use super::export::{BlockSizes, ExportInfo, Exports, Features};
use super::handshake::{Handshake, HandshakeConfig, Progress, TlsMode};
use super::reply;
use super::reply::Extent;
use super::request::{self, Command, Decoder, Event, Request};
use super::session::{BASE_ALLOCATION_ID, ReplyMode, Session};
use super::wire::*;

/// A fixed catalogue: "a" (also the default) and "ro", read-only.
struct Catalogue;

fn info(id: usize, name: &str, read_only: bool) -> ExportInfo {
    let features = Features::all(read_only);
    ExportInfo {
        id,
        name: name.into(),
        description: format!("fuzz export {name}"),
        size: 1 << 20,
        flags: features.flags(),
        block: BlockSizes::default(),
    }
}

impl Exports for Catalogue {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        match name {
            "" | "a" => Some(info(0, "a", false)),
            "ro" => Some(info(1, "ro", true)),
            _ => None,
        }
    }

    fn list(&self) -> Vec<(String, String)> {
        vec![("a".into(), String::new()), ("ro".into(), String::new())]
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// Checks that `out` is a sequence of well-formed option replies, optionally
/// followed by the `NBD_OPT_EXPORT_NAME` reply (size, flags, maybe zeroes).
fn check_option_replies(mut out: &[u8], may_end_with_export: bool) {
    while !out.is_empty() {
        if out.len() >= 8 && be64(out) == REPLY_MAGIC {
            assert!(out.len() >= 20, "truncated option reply header");
            let len = be32(&out[16..]) as usize;
            assert!(
                out.len() >= 20 + len,
                "option reply shorter than its length"
            );
            out = &out[20 + len..];
        } else {
            assert!(may_end_with_export, "bytes that are not an option reply");
            assert!(
                out.len() == 10 || out.len() == 134,
                "export-name reply of {} bytes",
                out.len()
            );
            return;
        }
    }
}

/// Drives the handshake. Byte 0 picks how the rest is split into reads
/// (low six bits) and the TLS policy (top two).
pub fn handshake(data: &[u8]) {
    let Some((&stride, input)) = data.split_first() else {
        return;
    };
    // After STARTTLS the rest is fed as if it had been decrypted.
    let tls = match stride >> 6 {
        0 => TlsMode::Off,
        1 => TlsMode::On,
        _ => TlsMode::Require,
    };
    let stride = usize::from(stride % 64) + 1;
    let mut out = Vec::new();
    let cfg = HandshakeConfig {
        max_options: 64,
        tls,
        ..HandshakeConfig::default()
    };
    let mut hs = Handshake::new(cfg, &mut out);
    assert_eq!(out.len(), 18, "greeting");
    let mut pending = Vec::new();
    let mut fed = 0;
    while fed < input.len() {
        let end = (fed + stride).min(input.len());
        pending.extend_from_slice(&input[fed..end]);
        fed = end;
        let before = out.len();
        let Ok((n, progress)) = hs.feed(&pending, &Catalogue, &mut out) else {
            return;
        };
        assert!(n <= pending.len(), "consumed more than was fed");
        pending.drain(..n);
        match progress {
            Progress::NeedMore | Progress::StartTls => check_option_replies(&out[before..], false),
            Progress::Close => {
                check_option_replies(&out[before..], false);
                return;
            }
            Progress::Transmission(s) => {
                check_option_replies(&out[before..], true);
                assert_ne!(s.flags & FLAG_HAS_FLAGS, 0);
                assert_eq!(s.flags & FLAG_SEND_DF != 0, s.mode != ReplyMode::Simple);
                if s.base_allocation.is_some() {
                    assert_ne!(
                        s.mode,
                        ReplyMode::Simple,
                        "meta context without structured replies"
                    );
                }
                return;
            }
        }
    }
}

/// Builds the session byte 0 describes: reply mode, read-only, meta context.
fn session(sel: u8) -> Session {
    let mode = match sel % 3 {
        0 => ReplyMode::Simple,
        1 => ReplyMode::Structured,
        _ => ReplyMode::Extended,
    };
    let export = info(0, "a", sel & 4 != 0);
    let mut flags = export.flags | FLAG_HAS_FLAGS;
    if mode != ReplyMode::Simple {
        flags |= FLAG_SEND_DF;
    }
    let base_allocation = (sel & 8 != 0 && mode != ReplyMode::Simple).then_some(BASE_ALLOCATION_ID);
    Session {
        export,
        flags,
        mode,
        base_allocation,
    }
}

/// Checks a reply header's framing and cookie.
fn check_header(mode: ReplyMode, h: &[u8], cookie: u64) {
    let magic = be32(h);
    match magic {
        SIMPLE_REPLY_MAGIC => assert_eq!(be64(&h[8..]), cookie),
        STRUCTURED_REPLY_MAGIC => {
            assert_eq!(mode, ReplyMode::Structured);
            assert_eq!(be64(&h[8..]), cookie);
        }
        EXTENDED_REPLY_MAGIC => {
            assert_eq!(mode, ReplyMode::Extended);
            assert_eq!(be64(&h[8..]), cookie);
        }
        _ => panic!("reply magic {magic:#x}"),
    }
    if mode == ReplyMode::Extended {
        assert_eq!(
            magic, EXTENDED_REPLY_MAGIC,
            "extended sessions use only extended replies"
        );
    }
}

/// Encodes the reply the server would send for a checked request.
fn reply_for(s: &Session, req: &Request, checked: Result<Command, request::Refusal>, seed: u64) {
    let mode = s.mode;
    match checked {
        Err(r) => {
            let (h, msg) = reply::error(mode, req.cookie, req.offset, r.code, r.message);
            check_header(mode, h.as_bytes(), req.cookie);
            if mode == ReplyMode::Simple {
                assert!(msg.is_empty());
            }
        }
        Ok(Command::Read) => {
            let h = reply::read_data(mode, req.cookie, req.offset, req.length);
            check_header(mode, h.as_bytes(), req.cookie);
        }
        Ok(Command::BlockStatus) => {
            // Synthetic extents derived from the seed, including zero-length ones.
            let mut extents = Vec::new();
            let mut x = seed | 1;
            for _ in 0..(seed % 7) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                extents.push(Extent {
                    len: x % (req.length.max(1) * 2),
                    hole: x & 1 != 0,
                    zero: x & 2 != 0,
                });
            }
            let req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
            let mut out = Vec::new();
            let ctx = s.base_allocation.unwrap_or(0);
            reply::block_status(
                mode, req.cookie, req.offset, req.length, req_one, ctx, extents, &mut out,
            );
            check_header(mode, &out, req.cookie);
            let (hdr, desc) = if mode == ReplyMode::Extended {
                (32 + 8, 16)
            } else {
                (20 + 4, 8)
            };
            assert!(
                out.len() > hdr && (out.len() - hdr) % desc == 0,
                "block status payload shape"
            );
            let mut total = 0u64;
            let mut n = 0;
            for d in out[hdr..].chunks(desc) {
                let len = if desc == 16 {
                    be64(d)
                } else {
                    u64::from(be32(d))
                };
                assert!(len > 0, "zero-length extent");
                total += len;
                n += 1;
            }
            assert!(
                total <= req.length.max(1),
                "extents describe more than was asked"
            );
            if req_one {
                assert_eq!(n, 1);
            }
        }
        Ok(_) => {
            let h = reply::ok(mode, req.cookie, req.offset);
            check_header(mode, h.as_bytes(), req.cookie);
        }
    }
}

/// Drives the transmission decoder, checks and reply encoders. Byte 0 picks
/// the session; byte 1 how the rest is split into reads.
pub fn transmission(data: &[u8]) {
    let [sel, stride, input @ ..] = data else {
        return;
    };
    let s = session(*sel);
    let stride = usize::from(*stride) * 3 + 1;
    let mut dec = Decoder::new(s.mode, 64 * 1024);
    let mut pending = Vec::new();
    let mut fed = 0;
    let mut expect_payload = 0u64;
    let mut got_payload = 0u64;
    while fed < input.len() {
        let end = (fed + stride).min(input.len());
        pending.extend_from_slice(&input[fed..end]);
        fed = end;
        loop {
            let Ok((n, ev)) = dec.next(&pending) else {
                return;
            };
            assert!(n <= pending.len());
            match ev {
                None => {
                    assert_eq!(n, 0);
                    break;
                }
                Some(Event::Request(req)) => {
                    assert_eq!(got_payload, expect_payload, "previous payload incomplete");
                    expect_payload = req.payload;
                    got_payload = 0;
                    let checked = request::check(&req, &s);
                    if let Ok(cmd) = checked {
                        // What the backend is promised about accepted requests.
                        if cmd != Command::Flush && cmd != Command::Disc {
                            assert!(
                                req.offset
                                    .checked_add(req.length)
                                    .is_some_and(|e| e <= s.export.size)
                            );
                        }
                        if cmd.writes() {
                            assert_eq!(s.flags & FLAG_READ_ONLY, 0);
                        }
                    }
                    reply_for(&s, &req, checked, req.cookie ^ req.offset);
                }
                Some(Event::Payload { data, last }) => {
                    assert!(!data.is_empty());
                    got_payload += data.len() as u64;
                    assert!(got_payload <= expect_payload);
                    assert_eq!(last, got_payload == expect_payload);
                }
            }
            pending.drain(..n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_trivial_inputs() {
        for d in [&[][..], &[0], &[1, 2], &[0xff; 100]] {
            handshake(d);
            transmission(d);
        }
    }
}
