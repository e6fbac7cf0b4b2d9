//! Listening sockets and per-connection socket options.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use thiserror::Error;
use tracing::{debug, info};

/// Why a listener could not be opened.
#[derive(Debug, Error)]
pub enum ListenError {
    /// A live server already listens on the Unix socket.
    #[error("another server is already listening on {0}; stop it or choose another --unix path")]
    InUse(PathBuf),
    /// The Unix socket path is taken by something else.
    #[error("{0} exists and is not a socket; remove it or choose another --unix path")]
    NotSocket(PathBuf),
    /// The socket could not be opened.
    #[error("cannot listen on {what}")]
    Io {
        /// The address or path.
        what: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// What kind of socket a connection arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Unix,
    Tcp,
}

/// An open listening socket.
pub struct Listener {
    /// The listening socket.
    pub fd: OwnedFd,
    /// Unix or TCP.
    pub transport: Transport,
    /// Human-readable address for logs.
    pub addr: String,
    /// Socket file to remove on shutdown.
    pub path: Option<PathBuf>,
}

impl Listener {
    /// Binds a Unix socket at `path` with permission bits `mode` (and group
    /// `group`), replacing a stale socket file but never a live server's.
    pub fn unix(path: &Path, mode: u32, group: Option<u32>) -> Result<Self, ListenError> {
        let io_err = |source| ListenError::Io {
            what: path.display().to_string(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(ListenError::NotSocket(path.to_owned()));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(ListenError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(io_err)?;
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io_err)?;
        }
        let listener = UnixListener::bind(path).map_err(io_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_err)?;
        if let Some(gid) = group {
            std::os::unix::fs::chown(path, None, Some(gid)).map_err(io_err)?;
        }
        Ok(Listener {
            fd: listener.into(),
            transport: Transport::Unix,
            addr: path.display().to_string(),
            path: Some(path.to_owned()),
        })
    }

    /// Binds a TCP socket.
    pub fn tcp(addr: SocketAddr) -> Result<Self, ListenError> {
        let listener = TcpListener::bind(addr).map_err(|source| ListenError::Io {
            what: addr.to_string(),
            source,
        })?;
        let local = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| addr.to_string());
        Ok(Listener {
            fd: listener.into(),
            transport: Transport::Tcp,
            addr: local,
            path: None,
        })
    }
}

fn setsockopt_int(fd: RawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: passes a pointer to a live i32 of the stated length.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as u32,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn getsockopt_int(fd: RawFd, level: i32, name: i32) -> io::Result<i32> {
    let mut value: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as u32;
    // SAFETY: value and len are live and sized for an int option.
    let r = unsafe { libc::getsockopt(fd, level, name, (&mut value as *mut i32).cast(), &mut len) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Buffer sizes to request on every connection.
#[derive(Clone, Copy, Debug, Default)]
pub struct SocketTuning {
    /// SO_SNDBUF to request, in bytes.
    pub sndbuf: Option<u32>,
    /// SO_RCVBUF to request, in bytes.
    pub rcvbuf: Option<u32>,
}

/// Applies per-connection options; returns the (sndbuf, rcvbuf) the kernel granted.
pub(super) fn tune(
    fd: &OwnedFd,
    transport: Transport,
    tuning: SocketTuning,
) -> (Option<i32>, Option<i32>) {
    let fd = fd.as_raw_fd();
    if transport == Transport::Tcp {
        // Replies often span packets; Nagle would hold the tail back.
        if let Err(e) = setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1) {
            debug!(error = %e, "TCP_NODELAY failed");
        }
    }
    let apply = |want: Option<u32>, name: i32| {
        let want = want?;
        if let Err(e) = setsockopt_int(fd, libc::SOL_SOCKET, name, want.min(i32::MAX as u32) as i32)
        {
            debug!(error = %e, "setting socket buffer failed");
        }
        getsockopt_int(fd, libc::SOL_SOCKET, name).ok()
    };
    (
        apply(tuning.sndbuf, libc::SO_SNDBUF),
        apply(tuning.rcvbuf, libc::SO_RCVBUF),
    )
}

/// Logs what the kernel granted, once per server at info level.
pub(super) fn log_granted(tuning: SocketTuning, granted: (Option<i32>, Option<i32>), first: bool) {
    if tuning.sndbuf.is_none() && tuning.rcvbuf.is_none() {
        return;
    }
    let msg =
        "socket buffers: the kernel reports twice the usable size, capped by net.core.[wr]mem_max";
    if first {
        info!(
            sndbuf_requested = tuning.sndbuf,
            sndbuf_granted = granted.0,
            rcvbuf_requested = tuning.rcvbuf,
            rcvbuf_granted = granted.1,
            "{msg}"
        );
    } else {
        debug!(
            sndbuf_granted = granted.0,
            rcvbuf_granted = granted.1,
            "{msg}"
        );
    }
}
