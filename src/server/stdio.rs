//! One client on standard input and output (`vbd serve --stdin`), as
//! inetd, `nbdkit -s` and libnbd's `nbd_connect_command` expect: requests
//! arrive on descriptor 0 and replies leave on descriptor 1.
//!
//! When both are the same socket (a socketpair from libnbd, an inetd
//! connection) the connection uses it directly. Otherwise (two pipes, as
//! from `ssh` or a shell) a socketpair stands between them and the core,
//! with one thread copying each way, because the ring's receives and
//! sends need a socket. Either way descriptors 0 and 1 are then pointed
//! elsewhere (stdin at /dev/null, stdout at stderr), so nothing printed by
//! mistake can corrupt the protocol stream and children inherit neither.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use thiserror::Error;
use tracing::debug;

/// Why standard input and output cannot carry a client.
#[derive(Debug, Error)]
pub enum StdioError {
    /// A descriptor could not be examined, copied or replaced.
    #[error("cannot take {what} for the client connection")]
    Io {
        /// Which step.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> StdioError {
    move |source| StdioError::Io { what, source }
}

/// The client's side of standard input and output, as one socket.
pub struct Stdio {
    /// What the connection reads and writes.
    pub conn: OwnedFd,
    /// How it is connected, for logs: "socket" or "pipes".
    pub kind: &'static str,
}

/// `fstat` of a descriptor.
fn stat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: all-zero bytes are a valid `stat`; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a live, writable stat buffer.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// A close-on-exec copy of `fd`, numbered above the standard three.
fn dup(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor; it reads no memory.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` was just made by fcntl and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Points descriptor `target` at what `source` refers to.
fn redirect(source: RawFd, target: RawFd) -> io::Result<()> {
    // SAFETY: dup2 replaces a descriptor number; it reads no memory. The
    // standard descriptors it replaces are owned by no Rust object here.
    if unsafe { libc::dup2(source, target) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes descriptors 0 and 1 for one client connection.
///
/// Call it once, before anything else reads stdin or writes stdout.
pub fn take() -> Result<Stdio, StdioError> {
    let input = stat(0).map_err(io_err("standard input"))?;
    let output = stat(1).map_err(io_err("standard output"))?;
    let is_socket = |st: &libc::stat| st.st_mode & libc::S_IFMT == libc::S_IFSOCK;
    let same = input.st_dev == output.st_dev && input.st_ino == output.st_ino;
    let taken = if is_socket(&input) && same {
        Stdio {
            conn: dup(0).map_err(io_err("the standard input socket"))?,
            kind: "socket",
        }
    } else {
        Stdio {
            conn: bridge()?,
            kind: "pipes",
        }
    };
    let null = File::options()
        .read(true)
        .open("/dev/null")
        .map_err(io_err("/dev/null"))?;
    redirect(null.as_raw_fd(), 0).map_err(io_err("standard input"))?;
    redirect(2, 1).map_err(io_err("standard output"))?;
    Ok(taken)
}

/// Bytes moved per read: what a pipe holds by default, a few requests.
const PUMP_BYTES: usize = 64 << 10;

/// Copies `from` to `to` until end of input or an error, passing on each
/// read at once. (`io::copy` may splice, which from a socket can hold
/// small messages back until more arrive: a greeting would wait forever.)
fn pump(from: &mut impl Read, to: &mut impl Write) -> io::Result<u64> {
    let mut buf = vec![0u8; PUMP_BYTES];
    let mut total = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// A socketpair whose far end two threads join to copies of descriptors
/// 0 and 1; returns the near end.
fn bridge() -> Result<OwnedFd, StdioError> {
    let (near, far) = UnixStream::pair().map_err(io_err("a socketpair"))?;
    let mut input = File::from(dup(0).map_err(io_err("standard input"))?);
    let mut output = File::from(dup(1).map_err(io_err("standard output"))?);
    let mut far_in = far.try_clone().map_err(io_err("a socketpair"))?;
    let mut far_out = far;
    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .map(drop)
            .map_err(io_err("a copying thread"))
    };
    spawn(
        "vbd-stdin",
        Box::new(move || {
            let r = pump(&mut input, &mut far_in);
            debug!(?r, "standard input ended");
            // The client's end of input: the connection sees EOF.
            let _ = far_in.shutdown(Shutdown::Write);
        }),
    )?;
    spawn(
        "vbd-stdout",
        Box::new(move || {
            let r = pump(&mut far_out, &mut output);
            debug!(?r, "standard output ended");
            // The client stopped reading (or the connection closed): end
            // both ways, so the connection's sends fail and it closes.
            let _ = far_out.shutdown(Shutdown::Both);
        }),
    )?;
    Ok(near.into())
}
