//! Wire constants of the NBD protocol (doc/proto.md in NetworkBlockDevice/nbd).
//!
//! Kept as plain integers so decoders can compare raw header fields without
//! conversions; the typed views live in `request` and `handshake`.

/// `NBDMAGIC`: first eight bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle greeting and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every fixed-newstyle option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flags (server → client).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// The server omits the 124 zero bytes after NBD_OPT_EXPORT_NAME's reply.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

/// Client flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// The client accepts `FLAG_NO_ZEROES`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// NBD_CMD_FLUSH is supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// NBD_CMD_FLAG_FUA is supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// The export behaves like a rotating disk (schedule I/O accordingly).
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// NBD_CMD_TRIM is supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// NBD_CMD_WRITE_ZEROES is supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// NBD_CMD_FLAG_DF (no fragmented reads) is supported.
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Every connection sees the same data; one flush covers all of them.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// NBD_CMD_CACHE is supported.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// NBD_CMD_FLAG_FAST_ZERO is supported.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Ends the handshake without a session.
pub const OPT_ABORT: u32 = 2;
/// Lists the exports.
pub const OPT_LIST: u32 = 3;
/// Upgrades the connection to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Describes an export without entering transmission.
pub const OPT_INFO: u32 = 6;
/// Describes an export and enters transmission.
pub const OPT_GO: u32 = 7;
/// Asks for structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Lists the metadata contexts an export offers.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Selects metadata contexts for the session.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Asks for extended (64-bit) request and reply headers.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply types.
pub const REP_ACK: u32 = 1;
/// One export, in reply to NBD_OPT_LIST.
pub const REP_SERVER: u32 = 2;
/// One piece of information about an export.
pub const REP_INFO: u32 = 3;
/// One metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// The option is not known.
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
/// The server's policy forbids the option.
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
/// The option's data is invalid.
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
/// The option is not supported on this platform.
pub const REP_ERR_PLATFORM: u32 = 0x8000_0004;
/// TLS is required first.
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
/// No such export.
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
/// The server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
/// The client must ask for block sizes first.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = 0x8000_0008;
/// The request is too large.
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;
/// The client must negotiate extended headers first.
pub const REP_ERR_EXT_HEADER_REQD: u32 = 0x8000_000a;

/// `NBD_REP_INFO` types.
pub const INFO_EXPORT: u16 = 0;
/// The export's name.
pub const INFO_NAME: u16 = 1;
/// The export's description.
pub const INFO_DESCRIPTION: u16 = 2;
/// The export's minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Request and reply magics.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended request header.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended reply chunk.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Commands.
pub const CMD_READ: u16 = 0;
/// Write the payload at an offset.
pub const CMD_WRITE: u16 = 1;
/// Disconnect once in-flight requests are answered.
pub const CMD_DISC: u16 = 2;
/// Make completed writes durable.
pub const CMD_FLUSH: u16 = 3;
/// Discard a range (it may read back as anything).
pub const CMD_TRIM: u16 = 4;
/// Prefetch a range.
pub const CMD_CACHE: u16 = 5;
/// Write zeroes to a range.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Report the allocation of a range.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// WRITE_ZEROES must leave the range allocated.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// READ must not be fragmented into several chunks.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// BLOCK_STATUS may answer with one extent.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// WRITE_ZEROES must fail unless it is fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// An extended header's length is the payload's (not the effect's).
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Structured reply flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// A success with no data.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// A hole (reads as zeroes) at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Block status with 32-bit extent lengths.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Block status with 64-bit extent lengths.
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// An error for the whole request.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
/// An error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// `base:allocation` state flags.
pub const STATE_HOLE: u32 = 1 << 0;
/// The range reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

/// Longest string the protocol allows (export names, messages, contexts).
pub const MAX_STRING: usize = 4096;

/// The one metadata context we serve.
pub const BASE_ALLOCATION: &str = "base:allocation";
