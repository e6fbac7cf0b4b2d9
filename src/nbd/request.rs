//! Transmission-phase requests: a streaming decoder that turns bytes into
//! request and payload events, and the checks that decide each request's
//! error code before any backend sees it.

use super::error::{ErrorCode, ProtocolError};
use super::session::{ReplyMode, Session};
use super::wire::*;

/// Size of a compact request header.
pub const COMPACT_HEADER: usize = 28;
/// Size of an extended request header.
pub const EXTENDED_HEADER: usize = 32;

/// The longest payload worth reading just to discard it with a refused
/// WRITE: any length a compact header can carry (32 bits). Only extended
/// headers can claim more; the spec lets a server hang up on those.
pub const MAX_DISCARDED_PAYLOAD: u64 = u32::MAX as u64;

/// A decoded request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Echoed in the reply.
    pub cookie: u64,
    /// NBD_CMD_FLAG_* bits.
    pub flags: u16,
    /// Raw command number; see [`Command::from_wire`].
    pub command: u16,
    /// Where in the export.
    pub offset: u64,
    /// Effect length: bytes to read, write, trim, zero or describe.
    pub length: u64,
    /// Bytes of payload that follow the header on the wire.
    pub payload: u64,
}

/// Commands this server knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// NBD_CMD_READ.
    Read,
    /// NBD_CMD_WRITE.
    Write,
    /// NBD_CMD_DISC.
    Disc,
    /// NBD_CMD_FLUSH.
    Flush,
    /// NBD_CMD_TRIM.
    Trim,
    /// NBD_CMD_CACHE.
    Cache,
    /// NBD_CMD_WRITE_ZEROES.
    WriteZeroes,
    /// NBD_CMD_BLOCK_STATUS.
    BlockStatus,
}

impl Command {
    /// The command for a wire number, if it is one we know.
    pub fn from_wire(v: u16) -> Option<Self> {
        Some(match v {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            _ => return None,
        })
    }

    /// Whether the command changes the export's contents.
    pub fn writes(self) -> bool {
        matches!(self, Command::Write | Command::Trim | Command::WriteZeroes)
    }
}

/// One step of decoded input.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A request header; if `payload > 0`, `Payload` events follow.
    Request(Request),
    /// Part of the current request's payload.
    Payload {
        /// The bytes, borrowed from the input.
        data: &'a [u8],
        /// This part ends the payload.
        last: bool,
    },
}

#[derive(Clone, Copy, Debug)]
enum State {
    Header,
    Payload { remaining: u64 },
}

/// Streaming request decoder for one connection.
#[derive(Debug)]
pub struct Decoder {
    extended: bool,
    max_payload: u64,
    state: State,
}

impl Decoder {
    /// A decoder for the session's header style. Payloads up to
    /// `max_payload` are passed on as events (a request refused for its
    /// length is answered once its payload is read and dropped); longer
    /// ones end the connection, as skipping them is not worth the wait.
    pub fn new(mode: ReplyMode, max_payload: u64) -> Self {
        Decoder {
            extended: mode == ReplyMode::Extended,
            max_payload,
            state: State::Header,
        }
    }

    /// Bytes a header needs.
    pub fn header_len(&self) -> usize {
        if self.extended {
            EXTENDED_HEADER
        } else {
            COMPACT_HEADER
        }
    }

    fn magic(&self) -> u32 {
        if self.extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        }
    }

    /// Whether the decoder is between requests.
    pub fn at_boundary(&self) -> bool {
        matches!(self.state, State::Header)
    }

    /// Payload bytes still expected for the current request.
    pub fn payload_remaining(&self) -> u64 {
        match self.state {
            State::Header => 0,
            State::Payload { remaining } => remaining,
        }
    }

    /// Decodes the next event from `input`, returning the bytes it used.
    /// `(0, None)` means more input is needed.
    pub fn next<'a>(
        &mut self,
        input: &'a [u8],
    ) -> Result<(usize, Option<Event<'a>>), ProtocolError> {
        match self.state {
            State::Header => {
                let len = self.header_len();
                // Check the magic as soon as it is here, so a client speaking
                // the wrong header style is told at once, not left waiting.
                if input.len() >= 4 {
                    let magic = be(&input[..4]) as u32;
                    let expected = self.magic();
                    if magic != expected {
                        return Err(ProtocolError::BadRequestMagic(magic, expected));
                    }
                }
                if input.len() < len {
                    return Ok((0, None));
                }
                let req = self.decode_header(&input[..len])?;
                if req.payload > self.max_payload {
                    return Err(ProtocolError::PayloadTooLarge(
                        req.payload,
                        self.max_payload,
                    ));
                }
                if req.payload > 0 {
                    self.state = State::Payload {
                        remaining: req.payload,
                    };
                }
                Ok((len, Some(Event::Request(req))))
            }
            State::Payload { remaining } => {
                if input.is_empty() {
                    return Ok((0, None));
                }
                let take = remaining.min(input.len() as u64) as usize;
                let left = remaining - take as u64;
                self.state = if left == 0 {
                    State::Header
                } else {
                    State::Payload { remaining: left }
                };
                let ev = Event::Payload {
                    data: &input[..take],
                    last: left == 0,
                };
                Ok((take, Some(ev)))
            }
        }
    }

    /// Records that `n` payload bytes were consumed outside `next` (received
    /// straight into a request buffer); returns whether the payload is done.
    pub fn skip_payload(&mut self, n: u64) -> bool {
        if let State::Payload { remaining } = self.state {
            let left = remaining.saturating_sub(n);
            self.state = if left == 0 {
                State::Header
            } else {
                State::Payload { remaining: left }
            };
            left == 0
        } else {
            true
        }
    }

    fn decode_header(&self, h: &[u8]) -> Result<Request, ProtocolError> {
        let magic = be(&h[0..4]) as u32;
        let flags = be(&h[4..6]) as u16;
        let command = be(&h[6..8]) as u16;
        let cookie = be(&h[8..16]);
        let offset = be(&h[16..24]);
        let expected = self.magic();
        if magic != expected {
            return Err(ProtocolError::BadRequestMagic(magic, expected));
        }
        let length = if self.extended {
            be(&h[24..32])
        } else {
            be(&h[24..28])
        };
        // WRITE always carries its length as payload; with extended headers a
        // client may also attach a payload to other commands (PAYLOAD_LEN).
        let payload =
            if command == CMD_WRITE || (self.extended && flags & CMD_FLAG_PAYLOAD_LEN != 0) {
                length
            } else {
                0
            };
        Ok(Request {
            cookie,
            flags,
            command,
            offset,
            length,
            payload,
        })
    }
}

/// Big-endian integer of up to eight bytes.
fn be(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0, |acc, &b| (acc << 8) | u64::from(b))
}

/// Why a request is refused, with a message for the client's user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The error the client gets.
    pub code: ErrorCode,
    /// Why, for the client's user (structured replies carry it).
    pub message: &'static str,
}

fn refuse(code: ErrorCode, message: &'static str) -> Refusal {
    Refusal { code, message }
}

/// Checks a request against the session, returning its command if the
/// backend should run it, or the error the client must get.
pub fn check(req: &Request, s: &Session) -> Result<Command, Refusal> {
    use ErrorCode::*;
    let Some(cmd) = Command::from_wire(req.command) else {
        return Err(refuse(Inval, "unknown command"));
    };
    let mut allowed = 0;
    if s.has(FLAG_SEND_FUA) {
        allowed |= CMD_FLAG_FUA;
    }
    match cmd {
        Command::Read if s.has(FLAG_SEND_DF) => allowed |= CMD_FLAG_DF,
        Command::Write if s.mode == ReplyMode::Extended => allowed |= CMD_FLAG_PAYLOAD_LEN,
        Command::WriteZeroes => {
            allowed |= CMD_FLAG_NO_HOLE;
            if s.has(FLAG_SEND_FAST_ZERO) {
                allowed |= CMD_FLAG_FAST_ZERO;
            }
        }
        Command::BlockStatus => allowed |= CMD_FLAG_REQ_ONE,
        _ => {}
    }
    if req.flags & !allowed != 0 {
        return Err(refuse(Inval, "command flag not valid for this command"));
    }
    if req.payload > 0 && cmd != Command::Write {
        return Err(refuse(Inval, "payload not supported for this command"));
    }
    if cmd.writes() && s.has(FLAG_READ_ONLY) {
        return Err(refuse(Perm, "export is read-only"));
    }
    let advertised = match cmd {
        Command::Flush => s.has(FLAG_SEND_FLUSH),
        Command::Trim => s.has(FLAG_SEND_TRIM),
        Command::WriteZeroes => s.has(FLAG_SEND_WRITE_ZEROES),
        _ => true,
    };
    if !advertised {
        return Err(refuse(Inval, "command not advertised for this export"));
    }
    if cmd == Command::BlockStatus && s.base_allocation.is_none() {
        return Err(refuse(Inval, "no metadata context was negotiated"));
    }
    match cmd {
        Command::Disc => return Ok(cmd),
        Command::Flush => {
            if req.offset != 0 || req.length != 0 {
                return Err(refuse(Inval, "flush offset and length must be zero"));
            }
            return Ok(cmd);
        }
        _ => {}
    }
    let size = s.export.size;
    if req.offset > size || req.length > size - req.offset {
        let code = if matches!(cmd, Command::Write | Command::WriteZeroes) {
            NoSpc
        } else {
            Inval
        };
        return Err(refuse(code, "request extends beyond the end of the export"));
    }
    let b = &s.export.block;
    let min = u64::from(b.minimum.max(1));
    if !req.offset.is_multiple_of(min) || !req.length.is_multiple_of(min) {
        return Err(refuse(
            Inval,
            "request is not aligned to the minimum block size",
        ));
    }
    if matches!(cmd, Command::Read | Command::Write | Command::Cache)
        && req.length > u64::from(b.maximum)
    {
        return Err(refuse(
            Inval,
            "request is longer than the maximum block size",
        ));
    }
    if cmd == Command::BlockStatus && req.length == 0 {
        return Err(refuse(Inval, "block status of zero bytes"));
    }
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::client::request as header;
    use crate::nbd::export::{BlockSizes, ExportInfo, Features};
    use crate::nbd::session::BASE_ALLOCATION_ID;

    fn session(mode: ReplyMode, read_only: bool) -> Session {
        let f = Features::all(read_only);
        let mut flags = f.flags();
        if mode != ReplyMode::Simple {
            flags |= FLAG_SEND_DF;
        }
        Session {
            export: ExportInfo {
                id: 0,
                name: "x".into(),
                description: String::new(),
                size: 1 << 20,
                flags,
                block: BlockSizes::default(),
            },
            flags,
            mode,
            base_allocation: (mode != ReplyMode::Simple).then_some(BASE_ALLOCATION_ID),
        }
    }

    #[test]
    fn decodes_write_with_payload_in_pieces() {
        let mut d = Decoder::new(ReplyMode::Simple, 1 << 20);
        let mut input = header(false, CMD_FLAG_FUA, CMD_WRITE, 9, 512, 6);
        input.extend_from_slice(b"abcdef");
        assert_eq!(d.next(&input[..27]), Ok((0, None)));
        let (n, ev) = d.next(&input).unwrap();
        assert_eq!(n, 28);
        assert_eq!(
            ev,
            Some(Event::Request(Request {
                cookie: 9,
                flags: CMD_FLAG_FUA,
                command: CMD_WRITE,
                offset: 512,
                length: 6,
                payload: 6
            }))
        );
        assert_eq!(d.payload_remaining(), 6);
        assert_eq!(
            d.next(&input[28..32]).unwrap(),
            (
                4,
                Some(Event::Payload {
                    data: b"abcd",
                    last: false
                })
            )
        );
        assert_eq!(
            d.next(&input[32..]).unwrap(),
            (
                2,
                Some(Event::Payload {
                    data: b"ef",
                    last: true
                })
            )
        );
        assert!(d.at_boundary());
    }

    #[test]
    fn extended_headers_carry_64_bit_lengths() {
        let mut d = Decoder::new(ReplyMode::Extended, 1 << 20);
        let input = header(true, 0, CMD_TRIM, 1, 0, 8 << 30);
        let (n, ev) = d.next(&input).unwrap();
        assert_eq!(n, 32);
        let Some(Event::Request(r)) = ev else {
            panic!()
        };
        assert_eq!((r.length, r.payload), (8 << 30, 0));
    }

    #[test]
    fn framing_errors() {
        let mut d = Decoder::new(ReplyMode::Simple, 4096);
        assert_eq!(
            d.next(&header(true, 0, CMD_READ, 1, 0, 1)),
            Err(ProtocolError::BadRequestMagic(
                EXTENDED_REQUEST_MAGIC,
                REQUEST_MAGIC
            ))
        );
        let mut d = Decoder::new(ReplyMode::Simple, 4096);
        assert_eq!(
            d.next(&header(false, 0, CMD_WRITE, 1, 0, 4097)),
            Err(ProtocolError::PayloadTooLarge(4097, 4096))
        );
    }

    #[test]
    fn wrong_magic_is_reported_before_the_header_is_complete() {
        let mut d = Decoder::new(ReplyMode::Extended, 1 << 20);
        let compact = [&REQUEST_MAGIC.to_be_bytes()[..], &[0u8; 24]].concat();
        assert_eq!(
            d.next(&compact),
            Err(ProtocolError::BadRequestMagic(
                REQUEST_MAGIC,
                EXTENDED_REQUEST_MAGIC
            ))
        );
        // A right magic still waits for the rest of the header.
        let mut d = Decoder::new(ReplyMode::Extended, 1 << 20);
        assert_eq!(d.next(&EXTENDED_REQUEST_MAGIC.to_be_bytes()), Ok((0, None)));
    }

    fn req(flags: u16, command: u16, offset: u64, length: u64) -> Request {
        Request {
            cookie: 1,
            flags,
            command,
            offset,
            length,
            payload: if command == CMD_WRITE { length } else { 0 },
        }
    }

    #[test]
    fn check_maps_refusals_to_the_spec_codes() {
        use ErrorCode::*;
        let s = session(ReplyMode::Structured, false);
        let code = |r: Request, s: &Session| check(&r, s).map_err(|e| e.code);
        let end = 1u64 << 20;
        assert_eq!(code(req(0, CMD_READ, 0, 4096), &s), Ok(Command::Read));
        assert_eq!(code(req(0, 42, 0, 0), &s), Err(Inval));
        assert_eq!(code(req(1 << 7, CMD_READ, 0, 1), &s), Err(Inval));
        assert_eq!(code(req(CMD_FLAG_NO_HOLE, CMD_READ, 0, 1), &s), Err(Inval));
        assert_eq!(code(req(0, CMD_READ, end - 1, 2), &s), Err(Inval));
        assert_eq!(code(req(0, CMD_WRITE, end - 1, 2), &s), Err(NoSpc));
        assert_eq!(code(req(0, CMD_WRITE_ZEROES, end, 1), &s), Err(NoSpc));
        assert_eq!(code(req(0, CMD_TRIM, u64::MAX, 2), &s), Err(Inval));
        assert_eq!(
            code(req(0, CMD_READ, 0, (32 << 20) + 1), &session_big()),
            Err(Inval)
        );
        assert_eq!(code(req(0, CMD_FLUSH, 0, 1), &s), Err(Inval));
        assert_eq!(
            code(req(CMD_FLAG_FUA, CMD_FLUSH, 0, 0), &s),
            Ok(Command::Flush)
        );
        assert_eq!(code(req(0, CMD_BLOCK_STATUS, 0, 0), &s), Err(Inval));
        assert_eq!(
            code(req(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 0, 1), &s),
            Ok(Command::BlockStatus)
        );
        assert_eq!(
            code(
                req(
                    CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                    CMD_WRITE_ZEROES,
                    0,
                    end
                ),
                &s
            ),
            Ok(Command::WriteZeroes)
        );
        assert_eq!(
            code(req(CMD_FLAG_DF, CMD_READ, 0, 1), &s),
            Ok(Command::Read)
        );
        let simple = session(ReplyMode::Simple, false);
        assert_eq!(code(req(CMD_FLAG_DF, CMD_READ, 0, 1), &simple), Err(Inval));
        assert_eq!(code(req(0, CMD_BLOCK_STATUS, 0, 1), &simple), Err(Inval));
        let ro = session(ReplyMode::Simple, true);
        for cmd in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            assert_eq!(code(req(0, cmd, 0, 1), &ro), Err(Perm));
        }
        assert_eq!(code(req(0, CMD_READ, 0, 1), &ro), Ok(Command::Read));
        assert_eq!(code(req(0, CMD_DISC, 5, 5), &s), Ok(Command::Disc));
        // A payload on anything but WRITE (extended PAYLOAD_LEN) is refused.
        let mut r = req(0, CMD_READ, 0, 8);
        r.payload = 8;
        assert_eq!(code(r, &session(ReplyMode::Extended, false)), Err(Inval));
    }

    fn session_big() -> Session {
        let mut s = session(ReplyMode::Structured, false);
        s.export.size = 1 << 30;
        s
    }
}
