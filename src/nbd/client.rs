//! What an NBD client sends: options and request headers, the mirror of
//! what `handshake` and `request` decode. vbd never acts as a client, so
//! this is built only for tests (feature `test-support`): the unit tests,
//! the integration tests, the benches and the fuzz seed writer all speak to
//! the server through these encoders instead of keeping copies of their own.
//! Deliberately malformed input stays hand-written next to the test that
//! sends it.

use super::wire::{EXTENDED_REQUEST_MAGIC, IHAVEOPT, REQUEST_MAGIC};

/// An option as a client sends it: magic, option number, data length, data.
pub fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + data.len());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// A string with its 32-bit length in front, as option data carries names.
pub fn string(s: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + s.len());
    v.extend_from_slice(&(s.len() as u32).to_be_bytes());
    v.extend_from_slice(s.as_bytes());
    v
}

/// The data of NBD_OPT_INFO and NBD_OPT_GO: export name, then the
/// NBD_INFO_* items asked for.
pub fn go_data(export: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = string(export);
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

/// The data of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT:
/// export name, then the context queries.
pub fn meta_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = string(export);
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend(string(q));
    }
    v
}

/// Appends a request header: compact (28 bytes, length truncated to 32
/// bits as the wire has it) or, after NBD_OPT_EXTENDED_HEADERS, extended
/// (32 bytes). A WRITE's payload is the caller's to append.
pub fn put_request(
    out: &mut Vec<u8>,
    extended: bool,
    flags: u16,
    cmd: u16,
    cookie: u64,
    offset: u64,
    len: u64,
) {
    let magic = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    out.extend_from_slice(&magic.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&cmd.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    if extended {
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
}

/// A request header on its own; see [`put_request`].
pub fn request(
    extended: bool,
    flags: u16,
    cmd: u16,
    cookie: u64,
    offset: u64,
    len: u64,
) -> Vec<u8> {
    let mut v = Vec::with_capacity(32);
    put_request(&mut v, extended, flags, cmd, cookie, offset, len);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::request::{COMPACT_HEADER, Decoder, EXTENDED_HEADER, Event, Request};
    use crate::nbd::session::ReplyMode;
    use crate::nbd::wire::{CMD_FLAG_FUA, CMD_READ, OPT_GO};

    #[test]
    fn requests_decode_to_what_was_encoded() {
        for (mode, extended, size) in [
            (ReplyMode::Simple, false, COMPACT_HEADER),
            (ReplyMode::Extended, true, EXTENDED_HEADER),
        ] {
            let bytes = request(extended, CMD_FLAG_FUA, CMD_READ, 7, 4096, 512);
            assert_eq!(bytes.len(), size);
            let mut d = Decoder::new(mode, 1 << 20);
            let want = Request {
                cookie: 7,
                flags: CMD_FLAG_FUA,
                command: CMD_READ,
                offset: 4096,
                length: 512,
                payload: 0,
            };
            assert_eq!(d.next(&bytes), Ok((size, Some(Event::Request(want)))));
        }
    }

    #[test]
    fn options_frame_their_data() {
        let go = go_data("ab", &[3]);
        assert_eq!(go, [0, 0, 0, 2, b'a', b'b', 0, 1, 0, 3]);
        let meta = meta_data("", &["x"]);
        assert_eq!(meta, [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, b'x']);
        let o = option(OPT_GO, &go);
        assert_eq!(&o[..8], b"IHAVEOPT");
        assert_eq!(&o[8..12], &OPT_GO.to_be_bytes());
        assert_eq!(&o[12..16], &(go.len() as u32).to_be_bytes());
        assert_eq!(&o[16..], &go[..]);
    }
}
