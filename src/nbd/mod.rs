//! The NBD protocol, sans-IO: handshake and transmission as pure state
//! machines and codecs (bytes in, events and bytes out). No sockets, no
//! clocks; the server and the fuzzers drive the same code.

pub mod error;
pub mod export;
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
