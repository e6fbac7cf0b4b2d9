//! The NBD protocol, sans-IO: handshake and transmission as pure state
//! machines and codecs (bytes in, events and bytes out). No sockets, no
//! clocks; the server and the fuzzers drive the same code.
//!
//! `handshake` negotiates options, `session` is what it agreed on,
//! `request` decodes transmission requests, `reply` encodes replies,
//! `export` describes an export without knowing its storage, `wire` holds
//! the protocol's constants and `error` its error codes.

#[cfg(any(test, feature = "test-support"))]
pub mod client;
pub mod error;
pub mod export;
#[cfg(feature = "fuzzing")]
pub mod fuzz;
pub mod handshake;
pub mod reply;
pub mod request;
pub mod session;
pub mod wire;

pub use error::{ErrorCode, ProtocolError};
pub use export::{BlockSizes, ExportInfo, Exports, Features};
pub use handshake::{DEFAULT_MAX_PAYLOAD, Handshake, HandshakeConfig, Progress, TlsMode};
pub use request::{Command, Decoder, Event, Refusal, Request};
pub use session::{ReplyMode, Session};
