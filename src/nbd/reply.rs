//! Reply encoders: simple, structured and extended headers. Headers are
//! built in a fixed stack buffer so that a reply never allocates; payload
//! data is sent from the request's own buffer beside it.

use super::error::ErrorCode;
use super::session::ReplyMode;
use super::wire::*;

/// A run of bytes with one allocation state, as `base:allocation`
/// describes it; the server converts its store's extents to these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub len: u64,
    /// Not allocated (`NBD_STATE_HOLE`).
    pub hole: bool,
    /// Reads as zeroes (`NBD_STATE_ZERO`).
    pub zero: bool,
}

/// Most descriptors one BLOCK_STATUS reply carries; clients ask again for
/// the rest.
pub const MAX_DESCRIPTORS: usize = 1024;

/// A reply header plus any fixed payload prefix, ready to send.
#[derive(Clone, Copy)]
pub struct Header {
    buf: [u8; 48],
    len: u8,
}

impl Header {
    fn new() -> Self {
        Header {
            buf: [0; 48],
            len: 0,
        }
    }
    fn put(&mut self, bytes: &[u8]) {
        let at = self.len as usize;
        self.buf[at..at + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len() as u8;
    }
    /// The encoded bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }
}

impl Default for Header {
    /// An empty header, for replies whose bytes all live in the payload.
    fn default() -> Self {
        Header::new()
    }
}

impl std::fmt::Debug for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Header({:02x?})", self.as_bytes())
    }
}

fn simple(cookie: u64, error: u32) -> Header {
    let mut h = Header::new();
    h.put(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h.put(&error.to_be_bytes());
    h.put(&cookie.to_be_bytes());
    h
}

/// A structured or extended chunk header for `payload` bytes.
fn chunk(mode: ReplyMode, flags: u16, typ: u16, cookie: u64, offset: u64, payload: u64) -> Header {
    let mut h = Header::new();
    let extended = mode == ReplyMode::Extended;
    let magic = if extended {
        EXTENDED_REPLY_MAGIC
    } else {
        STRUCTURED_REPLY_MAGIC
    };
    h.put(&magic.to_be_bytes());
    h.put(&flags.to_be_bytes());
    h.put(&typ.to_be_bytes());
    h.put(&cookie.to_be_bytes());
    if extended {
        h.put(&offset.to_be_bytes());
        h.put(&payload.to_be_bytes());
    } else {
        h.put(&(payload as u32).to_be_bytes());
    }
    h
}

/// Success with no data.
pub fn ok(mode: ReplyMode, cookie: u64, offset: u64) -> Header {
    match mode {
        // A simple reply is allowed for anything but READ in structured mode.
        ReplyMode::Simple | ReplyMode::Structured => simple(cookie, 0),
        ReplyMode::Extended => chunk(mode, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, offset, 0),
    }
}

/// An error reply; send `message` right after the header (it is empty where
/// the reply style cannot carry one).
pub fn error(
    mode: ReplyMode,
    cookie: u64,
    offset: u64,
    code: ErrorCode,
    message: &'static str,
) -> (Header, &'static str) {
    match mode {
        ReplyMode::Simple => (simple(cookie, code.wire()), ""),
        ReplyMode::Structured | ReplyMode::Extended => {
            let message = &message[..message.len().min(MAX_STRING)];
            let payload = 6 + message.len() as u64;
            let mut h = chunk(
                mode,
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                cookie,
                offset,
                payload,
            );
            h.put(&code.wire().to_be_bytes());
            h.put(&(message.len() as u16).to_be_bytes());
            (h, message)
        }
    }
}

/// Header for a successful READ of `len` bytes; the data follows it.
pub fn read_data(mode: ReplyMode, cookie: u64, offset: u64, len: u64) -> Header {
    match mode {
        ReplyMode::Simple => simple(cookie, 0),
        // A data chunk must carry at least one byte.
        _ if len == 0 => chunk(mode, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, offset, 0),
        _ => {
            let mut h = chunk(
                mode,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                cookie,
                offset,
                8 + len,
            );
            h.put(&offset.to_be_bytes());
            h
        }
    }
}

/// Encodes a complete BLOCK_STATUS reply for one context into `out`.
/// Extents are clipped to the requested range, to [`MAX_DESCRIPTORS`], and
/// to one with `req_one`.
#[allow(clippy::too_many_arguments)]
pub fn block_status(
    mode: ReplyMode,
    cookie: u64,
    offset: u64,
    length: u64,
    req_one: bool,
    context: u32,
    extents: impl IntoIterator<Item = Extent>,
    out: &mut Vec<u8>,
) {
    let extended = mode == ReplyMode::Extended;
    let limit = if req_one { 1 } else { MAX_DESCRIPTORS };
    // Compact descriptors have 32-bit lengths; keep them block-aligned.
    let max_desc = if extended {
        u64::MAX
    } else {
        u64::from(u32::MAX) & !511
    };
    let start = out.len();
    let prefix = if extended { 8 } else { 4 };
    let desc_len = if extended { 16 } else { 8 };
    // Reserve the header; it is rewritten once the count is known.
    out.extend_from_slice(&[0u8; 32][..if extended { 32 } else { 20 }]);
    out.extend_from_slice(&context.to_be_bytes());
    if extended {
        out.extend_from_slice(&0u32.to_be_bytes());
    }
    let mut covered = 0u64;
    let mut count = 0usize;
    let emit = |len: u64, flags: u32, out: &mut Vec<u8>| {
        if extended {
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&u64::from(flags).to_be_bytes());
        } else {
            out.extend_from_slice(&(len as u32).to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
        }
    };
    for e in extents {
        if count == limit || covered >= length {
            break;
        }
        let len = e.len.min(length - covered).min(max_desc);
        if len == 0 {
            continue;
        }
        let flags = (if e.hole { STATE_HOLE } else { 0 }) | (if e.zero { STATE_ZERO } else { 0 });
        emit(len, flags, out);
        covered += len;
        count += 1;
    }
    if count == 0 {
        // Always describe something: status 0 ("allocated, contents unknown")
        // is safe for any range.
        emit(length.min(max_desc), 0, out);
        count = 1;
    }
    let payload = (prefix + desc_len * count) as u64;
    let typ = if extended {
        REPLY_TYPE_BLOCK_STATUS_EXT
    } else {
        REPLY_TYPE_BLOCK_STATUS
    };
    let h = chunk(mode, REPLY_FLAG_DONE, typ, cookie, offset, payload);
    let hb = h.as_bytes();
    out[start..start + hb.len()].copy_from_slice(hb);
    if extended {
        let at = start + hb.len() + 4;
        out[at..at + 4].copy_from_slice(&(count as u32).to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_replies() {
        let h = ok(ReplyMode::Simple, 0x0102, 0);
        assert_eq!(
            h.as_bytes(),
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2]
        );
        let (h, msg) = error(ReplyMode::Simple, 5, 0, ErrorCode::NoSpc, "full");
        assert_eq!(&h.as_bytes()[4..8], &28u32.to_be_bytes());
        assert_eq!(msg, "");
        assert_eq!(
            read_data(ReplyMode::Simple, 5, 0, 4096).as_bytes().len(),
            16
        );
    }

    #[test]
    fn structured_replies() {
        // Structured mode still answers non-READ successes with a simple reply.
        assert_eq!(ok(ReplyMode::Structured, 1, 0).as_bytes().len(), 16);
        let h = read_data(ReplyMode::Structured, 9, 4096, 512);
        let b = h.as_bytes();
        assert_eq!(b.len(), 28);
        assert_eq!(&b[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&b[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&b[6..8], &REPLY_TYPE_OFFSET_DATA.to_be_bytes());
        assert_eq!(&b[8..16], &9u64.to_be_bytes());
        assert_eq!(&b[16..20], &(8u32 + 512).to_be_bytes());
        assert_eq!(&b[20..28], &4096u64.to_be_bytes());
        // A zero-length read cannot be a data chunk.
        let b = read_data(ReplyMode::Structured, 9, 0, 0);
        assert_eq!(&b.as_bytes()[6..8], &REPLY_TYPE_NONE.to_be_bytes());
        let (h, msg) = error(ReplyMode::Structured, 3, 0, ErrorCode::Inval, "bad");
        let b = h.as_bytes();
        assert_eq!(&b[6..8], &REPLY_TYPE_ERROR.to_be_bytes());
        assert_eq!(&b[16..20], &9u32.to_be_bytes());
        assert_eq!(&b[20..24], &22u32.to_be_bytes());
        assert_eq!(&b[24..26], &3u16.to_be_bytes());
        assert_eq!(msg, "bad");
    }

    #[test]
    fn extended_replies_echo_the_offset() {
        let b = ok(ReplyMode::Extended, 4, 777);
        let b = b.as_bytes();
        assert_eq!(b.len(), 32);
        assert_eq!(&b[..4], &EXTENDED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&b[6..8], &REPLY_TYPE_NONE.to_be_bytes());
        assert_eq!(&b[16..24], &777u64.to_be_bytes());
        assert_eq!(&b[24..32], &0u64.to_be_bytes());
        let h = read_data(ReplyMode::Extended, 4, 777, 10);
        assert_eq!(&h.as_bytes()[24..32], &18u64.to_be_bytes());
        assert_eq!(h.as_bytes().len(), 40);
    }

    fn ext(len: u64, hole: bool) -> Extent {
        Extent {
            len,
            hole,
            zero: hole,
        }
    }

    #[test]
    fn block_status_clips_to_the_request() {
        let extents = [
            ext(100, true),
            ext(0, false),
            ext(1000, false),
            ext(5000, true),
        ];
        let mut out = Vec::new();
        block_status(
            ReplyMode::Structured,
            1,
            0,
            1500,
            false,
            1,
            extents,
            &mut out,
        );
        assert_eq!(&out[16..20], &(4u32 + 3 * 8).to_be_bytes());
        let descs: Vec<(u32, u32)> = out[24..]
            .chunks(8)
            .map(|c| {
                (
                    u32::from_be_bytes(c[..4].try_into().unwrap()),
                    u32::from_be_bytes(c[4..].try_into().unwrap()),
                )
            })
            .collect();
        assert_eq!(descs, [(100, 3), (1000, 0), (400, 3)]);
        out.clear();
        block_status(ReplyMode::Structured, 1, 0, 50, true, 1, extents, &mut out);
        assert_eq!(out.len(), 20 + 4 + 8);
        assert_eq!(&out[24..28], &50u32.to_be_bytes());
        out.clear();
        block_status(ReplyMode::Extended, 1, 8, 50, false, 1, [], &mut out);
        assert_eq!(&out[6..8], &REPLY_TYPE_BLOCK_STATUS_EXT.to_be_bytes());
        assert_eq!(&out[16..24], &8u64.to_be_bytes());
        assert_eq!(
            &out[36..40],
            &1u32.to_be_bytes(),
            "one descriptor when the volume gave none"
        );
        assert_eq!(&out[40..48], &50u64.to_be_bytes());
    }
}
