//! Readiness notification (`sd_notify`): a unit with `Type=notify` sets
//! `NOTIFY_SOCKET` to a datagram socket, a path or, starting with `@`, an
//! abstract name; the service sends newline-separated `KEY=VALUE` lines
//! there. vbd sends `READY=1` once it listens and serves, `STATUS=` lines
//! for `systemctl status`, and `STOPPING=1` when it begins to shut down.
//! Without `NOTIFY_SOCKET` every call does nothing.

use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use thiserror::Error;
use tracing::warn;

/// Why `NOTIFY_SOCKET` cannot be used.
#[derive(Debug, Error)]
pub enum NotifyError {
    /// Not a path or an abstract name (systemd also knows `vsock:`).
    #[error(
        "NOTIFY_SOCKET={0:?} is not a socket path or an @abstract name; readiness will not be reported"
    )]
    Unsupported(String),
    /// The address or the sending socket could not be made.
    #[error("cannot use NOTIFY_SOCKET={addr:?}")]
    Socket {
        /// The variable's value.
        addr: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Where notifications go, if anywhere.
#[derive(Debug, Default)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Takes `NOTIFY_SOCKET` and unsets it, so children do not send as vbd.
    ///
    /// # Safety
    /// No other thread may read or change the environment during the call.
    pub unsafe fn from_env() -> Result<Self, NotifyError> {
        let value = std::env::var_os("NOTIFY_SOCKET");
        // SAFETY: the caller guarantees no other thread touches the
        // environment now.
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        match value {
            Some(v) if !v.is_empty() => Self::to(&v),
            _ => Ok(Self::disabled()),
        }
    }

    /// A notifier sending to `addr`, in `NOTIFY_SOCKET`'s syntax.
    pub fn to(addr: &OsStr) -> Result<Self, NotifyError> {
        let text = || addr.to_string_lossy().into_owned();
        let bytes = addr.as_bytes();
        let socket_error = |source| NotifyError::Socket {
            addr: text(),
            source,
        };
        let target = match bytes.first() {
            Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]),
            Some(b'/') => SocketAddr::from_pathname(addr),
            _ => return Err(NotifyError::Unsupported(text())),
        }
        .map_err(socket_error)?;
        let socket = UnixDatagram::unbound().map_err(socket_error)?;
        Ok(Notifier {
            target: Some((socket, target)),
        })
    }

    /// Whether notifications go anywhere.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends `state` (newline-separated assignments) as one datagram.
    pub fn send(&self, state: &str) -> io::Result<()> {
        match &self.target {
            Some((socket, addr)) => socket.send_to_addr(state.as_bytes(), addr).map(drop),
            None => Ok(()),
        }
    }

    /// Tells the manager vbd is serving, with a status line.
    pub fn ready(&self, status: &str) {
        self.report(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// Tells the manager vbd is shutting down, with a status line.
    pub fn stopping(&self, status: &str) {
        self.report(&format!("STOPPING=1\nSTATUS={}", one_line(status)));
    }

    /// Updates the status line `systemctl status` shows.
    pub fn status(&self, status: &str) {
        self.report(&format!("STATUS={}", one_line(status)));
    }

    fn report(&self, state: &str) {
        if let Err(e) = self.send(state) {
            // The manager may be gone or restarting; serving goes on.
            warn!("cannot notify the service manager: {e}");
        }
    }
}

/// A status value: one line, as each assignment is.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn receive(socket: &UnixDatagram) -> String {
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn ready_status_and_stopping_reach_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("vbd-notify-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let manager = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::to(path.as_os_str()).unwrap();
        assert!(n.enabled());
        n.ready("serving 2 exports\non /run/vbd.sock");
        assert_eq!(
            receive(&manager),
            "READY=1\nSTATUS=serving 2 exports on /run/vbd.sock"
        );
        n.status("stopping VMs");
        assert_eq!(receive(&manager), "STATUS=stopping VMs");
        n.stopping("flushing");
        assert_eq!(receive(&manager), "STOPPING=1\nSTATUS=flushing");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn abstract_sockets_start_with_an_at_sign() {
        let name = format!("vbd-notify-unit-{}", std::process::id());
        let manager =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        let n = Notifier::to(OsStr::new(&format!("@{name}"))).unwrap();
        n.ready("up");
        assert_eq!(receive(&manager), "READY=1\nSTATUS=up");
    }

    #[test]
    fn without_a_socket_nothing_is_sent_and_odd_ones_are_refused() {
        let n = Notifier::disabled();
        assert!(!n.enabled());
        n.ready("nobody listens");
        assert!(n.send("READY=1").is_ok());
        let e = Notifier::to(OsStr::new("vsock:2:1234")).unwrap_err();
        assert!(e.to_string().contains("not a socket path"), "{e}");
        let e = Notifier::to(OsStr::new("relative/path")).unwrap_err();
        assert!(matches!(e, NotifyError::Unsupported(_)), "{e}");
    }
}
