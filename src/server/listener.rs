//! Listening sockets and per-connection socket options.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
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
    /// A passed-in descriptor is one client's connection (Accept=yes).
    #[error(
        "socket {name:?} (descriptor {}) passed by the service manager is one client's connection (Accept=yes): serve it with --stdin, or use Accept=no",
        fd.as_raw_fd()
    )]
    Connected {
        /// Its name (`FileDescriptorName=`).
        name: String,
        /// The descriptor, still open: the caller may serve it.
        fd: OwnedFd,
    },
    /// A passed-in descriptor is not a listening stream socket.
    #[error(
        "socket {name:?} (descriptor {fd}) passed by the service manager is {what}, not a listening stream socket"
    )]
    NotListening {
        /// Its name (`FileDescriptorName=`).
        name: String,
        /// The descriptor.
        fd: RawFd,
        /// What it is instead.
        what: &'static str,
    },
    /// A passed-in descriptor could not be inspected.
    #[error("cannot inspect socket {name:?} (descriptor {fd}) passed by the service manager")]
    Inspect {
        /// Its name.
        name: String,
        /// The descriptor.
        fd: RawFd,
        /// Why.
        #[source]
        source: io::Error,
    },
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
    /// A Unix socket: local clients, guarded by the socket's file mode.
    Unix,
    /// TCP: remote clients, where TLS may be required.
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
    /// The Unix socket's file, if it has one.
    pub path: Option<PathBuf>,
    /// vbd bound the socket, so it removes the file on shutdown; a socket
    /// passed in belongs to whoever bound it and outlives vbd.
    pub owned: bool,
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
            owned: true,
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
            owned: true,
        })
    }

    /// A listening socket passed in by a service manager (socket
    /// activation) under `name`: Unix or TCP, told by its address family.
    /// Its file, if any, is left in place on shutdown.
    pub fn inherited(fd: OwnedFd, name: &str) -> Result<Self, ListenError> {
        let raw = fd.as_raw_fd();
        let inspect = |source| ListenError::Inspect {
            name: name.to_owned(),
            fd: raw,
            source,
        };
        let not_listening = |what| ListenError::NotListening {
            name: name.to_owned(),
            fd: raw,
            what,
        };
        match getsockopt_int(raw, libc::SOL_SOCKET, libc::SO_TYPE) {
            Ok(libc::SOCK_STREAM) => {}
            Ok(_) => return Err(not_listening("not a stream socket")),
            Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => {
                return Err(not_listening("not a socket"));
            }
            Err(e) => return Err(inspect(e)),
        }
        if getsockopt_int(raw, libc::SOL_SOCKET, libc::SO_ACCEPTCONN).map_err(inspect)? == 0 {
            // Accept=yes passes one connection, not a listener.
            return Err(ListenError::Connected {
                name: name.to_owned(),
                fd,
            });
        }
        match getsockopt_int(raw, libc::SOL_SOCKET, libc::SO_DOMAIN).map_err(inspect)? {
            libc::AF_UNIX => {
                let listener = UnixListener::from(fd);
                let local = listener.local_addr().map_err(inspect)?;
                let path = local.as_pathname().map(Path::to_path_buf);
                let addr = match (&path, local.as_abstract_name()) {
                    (Some(p), _) => p.display().to_string(),
                    (None, Some(abs)) => format!("@{}", String::from_utf8_lossy(abs)),
                    (None, None) => format!("{name} (unnamed Unix socket)"),
                };
                Ok(Listener {
                    fd: listener.into(),
                    transport: Transport::Unix,
                    addr,
                    path,
                    owned: false,
                })
            }
            libc::AF_INET | libc::AF_INET6 => {
                let listener = TcpListener::from(fd);
                let addr = listener.local_addr().map_err(inspect)?.to_string();
                Ok(Listener {
                    fd: listener.into(),
                    transport: Transport::Tcp,
                    addr,
                    path: None,
                    owned: false,
                })
            }
            _ => Err(not_listening("neither a Unix nor a TCP socket")),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    fn refusal(fd: OwnedFd) -> String {
        match Listener::inherited(fd, "nbd") {
            Ok(l) => panic!("{} taken as a listener", l.addr),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn inherited_sockets_are_told_apart_by_family() {
        let dir = std::env::temp_dir().join(format!("vbd-listener-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("passed.sock");
        let _ = std::fs::remove_file(&path);
        let unix = UnixListener::bind(&path).unwrap();
        let l = Listener::inherited(unix.into(), "nbd").unwrap();
        assert_eq!(l.transport, Transport::Unix);
        assert_eq!(l.path.as_deref(), Some(path.as_path()));
        assert!(!l.owned, "a passed socket's file is not vbd's to remove");

        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        let l = Listener::inherited(tcp.into(), "nbd").unwrap();
        assert_eq!(
            (l.transport, l.addr, l.path),
            (Transport::Tcp, format!("127.0.0.1:{port}"), None)
        );

        let name = format!("vbd-listener-unit-{}", std::process::id());
        let abs = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let l = Listener::inherited(UnixListener::bind_addr(&abs).unwrap().into(), "x").unwrap();
        assert_eq!((l.addr, l.path), (format!("@{name}"), None));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn what_is_not_a_listening_stream_socket_is_named() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(refusal(a.into()).contains("is one client's connection (Accept=yes)"));
        let (d, _e) = UnixDatagram::pair().unwrap();
        assert!(refusal(d.into()).contains("is not a stream socket"));
        let file = std::fs::File::open("/dev/null").unwrap();
        let msg = refusal(file.into());
        assert!(
            msg.starts_with("socket \"nbd\" (descriptor ") && msg.contains("is not a socket"),
            "{msg}"
        );
    }
}
