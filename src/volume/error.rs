//! Why a volume operation failed, and the errno a protocol reports for it.

use std::error::Error as StdError;

use thiserror::Error;

/// Why a volume operation failed.
#[derive(Debug, Error)]
pub enum VolumeError {
    /// A system call failed; its errno goes to the client as is.
    #[error("{op} failed")]
    Os {
        /// The system call or step that failed, for the message.
        op: &'static str,
        /// The OS error, whose errno the client receives.
        #[source]
        source: std::io::Error,
    },
    /// The backing store is full.
    #[error("not enough space")]
    NoSpace,
    /// The operation (or its fast form, for FAST_ZERO) is not available.
    #[error("operation not supported quickly")]
    NotSupported,
    /// A write-class operation on a read-only volume.
    #[error("volume is read-only")]
    ReadOnly,
    /// A request reaching past the volume's end.
    #[error("range {offset}+{len} is outside the volume")]
    OutOfRange {
        /// First byte of the request.
        offset: u64,
        /// Request length in bytes.
        len: u64,
    },
    /// A request not on the volume's block boundaries.
    #[error("range {offset}+{len} is not aligned to the volume's {block}-byte blocks")]
    Unaligned {
        /// First byte of the request.
        offset: u64,
        /// Request length in bytes.
        len: u64,
        /// The volume's block size in bytes.
        block: u32,
    },
    /// The volume is closing and accepts no more requests.
    #[error("volume is shutting down")]
    Shutdown,
    /// A backend's own failure (a store that stayed down, a WAL that
    /// cannot be written, data that fails its checks), typed by the
    /// backend and kept whole so its causes can be walked. Clients see EIO.
    #[error(transparent)]
    Backend(Box<dyn StdError + Send + Sync>),
}

impl VolumeError {
    /// An error from a raw `-errno` result, as io_uring reports them.
    pub fn from_errno(op: &'static str, errno: i32) -> Self {
        VolumeError::Os {
            op,
            source: std::io::Error::from_raw_os_error(errno),
        }
    }

    /// A backend failure with its typed cause.
    pub fn backend(e: impl StdError + Send + Sync + 'static) -> Self {
        VolumeError::Backend(Box::new(e))
    }

    /// The errno closest to this error, for protocols that speak errno.
    pub fn errno(&self) -> i32 {
        match self {
            VolumeError::Os { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            VolumeError::NoSpace => libc::ENOSPC,
            VolumeError::NotSupported => libc::EOPNOTSUPP,
            VolumeError::ReadOnly => libc::EPERM,
            VolumeError::OutOfRange { .. } | VolumeError::Unaligned { .. } => libc::EINVAL,
            VolumeError::Shutdown => libc::ESHUTDOWN,
            VolumeError::Backend(_) => libc::EIO,
        }
    }
}

/// A backend resumed with a completion of a kind it never queued: a bug in
/// whoever drives it, reported rather than trusted.
#[derive(Debug, Error)]
#[error("{backend} volume resumed by {got}, which it did not wait for")]
pub struct UnexpectedWake {
    /// The backend's name (`memory`, `file`, `object`).
    pub backend: &'static str,
    /// What arrived ("a ring completion", "a remote completion", ...).
    pub got: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Chain;

    #[test]
    fn errno_follows_the_error() {
        let os = VolumeError::from_errno("write", libc::ENOSPC);
        assert_eq!(os.errno(), libc::ENOSPC);
        let wake = UnexpectedWake {
            backend: "memory",
            got: "a ring completion",
        };
        assert_eq!(VolumeError::backend(wake).errno(), libc::EIO);
        let custom = VolumeError::Os {
            op: "x",
            source: std::io::Error::other("no errno"),
        };
        assert_eq!(custom.errno(), libc::EIO);
        assert_eq!(VolumeError::ReadOnly.errno(), libc::EPERM);
        assert_eq!(VolumeError::Shutdown.errno(), libc::ESHUTDOWN);
    }

    #[test]
    fn causes_print_once() {
        let os = VolumeError::from_errno("fsync", libc::EIO);
        assert_eq!(os.to_string(), "fsync failed");
        assert_eq!(
            Chain(&os).to_string(),
            "fsync failed: Input/output error (os error 5)"
        );
        // A boxed backend error stands for itself: no wrapper line.
        let e = VolumeError::backend(UnexpectedWake {
            backend: "file",
            got: "a remote completion",
        });
        assert_eq!(
            Chain(&e).to_string(),
            "file volume resumed by a remote completion, which it did not wait for"
        );
    }
}
