//! Reply encoders: simple, structured and extended headers. Headers are
//! built in a fixed stack buffer so that a reply never allocates; payload
//! data is sent from the request's own buffer beside it.

use super::error::ErrorCode;
use super::session::ReplyMode;
use super::wire::*;
use crate::volume::{Extent, MAX_EXTENTS};

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
/// Extents are clipped to the requested range, and to one with `req_one`.
#[allow(clippy::too_many_arguments)]
pub fn block_status(
    mode: ReplyMode,
    cookie: u64,
    offset: u64,
    length: u64,
    req_one: bool,
    context: u32,
    extents: &[Extent],
    out: &mut Vec<u8>,
) {
    let extended = mode == ReplyMode::Extended;
    let limit = if req_one { 1 } else { MAX_EXTENTS };
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
