//! Errors of the NBD layer: the error codes sent to clients, and the framing
//! faults that end a connection.

use thiserror::Error;

/// An error code a reply carries (`NBD_E*`); the spec restricts them to these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ErrorCode {
    /// EPERM: the operation is not allowed (read-only export).
    Perm = 1,
    /// EIO: the storage failed.
    Io = 5,
    /// ENOMEM: out of memory.
    NoMem = 12,
    /// EINVAL: the request is invalid.
    Inval = 22,
    /// ENOSPC: no space left.
    NoSpc = 28,
    /// EOVERFLOW: the request is too large for the reply.
    Overflow = 75,
    /// ENOTSUP: not supported (a fast zero that would not be fast).
    NotSup = 95,
    /// ESHUTDOWN: the server is shutting down.
    Shutdown = 108,
}

impl ErrorCode {
    /// The value on the wire.
    pub fn wire(self) -> u32 {
        self as u32
    }

    /// Maps an errno from the kernel to the nearest code the spec allows.
    pub fn from_errno(errno: i32) -> Self {
        match errno {
            libc::EPERM | libc::EACCES | libc::EROFS => ErrorCode::Perm,
            libc::ENOMEM => ErrorCode::NoMem,
            libc::EINVAL => ErrorCode::Inval,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ErrorCode::NoSpc,
            libc::EOVERFLOW => ErrorCode::Overflow,
            libc::EOPNOTSUPP => ErrorCode::NotSup,
            libc::ESHUTDOWN => ErrorCode::Shutdown,
            _ => ErrorCode::Io,
        }
    }
}

/// Input that cannot be answered with an error reply: the connection must end.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// The client sent flags this server does not know.
    #[error("client flags {0:#x} carry bits this server did not offer")]
    BadClientFlags(u32),
    /// An option did not start with IHAVEOPT.
    #[error("option header has magic {0:#018x}, expected IHAVEOPT")]
    BadOptionMagic(u64),
    /// NBD_OPT_EXPORT_NAME named no export.
    #[error("NBD_OPT_EXPORT_NAME for unknown export {0:?}")]
    UnknownExport(String),
    /// An export name longer than the protocol allows.
    #[error("NBD_OPT_EXPORT_NAME with a name of {0} bytes (limit 4096)")]
    ExportNameTooLong(u64),
    /// More options than `HandshakeConfig::max_options`.
    #[error("more than {0} options during the handshake")]
    TooManyOptions(usize),
    /// The client tried to skip TLS where it is required.
    #[error("NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS, but this server requires TLS")]
    TlsRequired,
    /// TLS needs the fixed newstyle handshake.
    #[error(
        "client did not set NBD_FLAG_C_FIXED_NEWSTYLE, so it cannot start the TLS this server requires"
    )]
    TlsNeedsFixedNewstyle,
    /// A request did not start with the magic the session expects.
    #[error("request header has magic {0:#010x}, expected {1:#010x}")]
    BadRequestMagic(u32, u32),
    /// A payload too long even to read and discard.
    #[error("request carries a payload of {0} bytes, over the {1}-byte limit")]
    PayloadTooLarge(u64, u64),
}
