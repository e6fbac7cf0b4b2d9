//! Socket activation (`sd_listen_fds`): a service manager, or a client
//! such as libnbd that starts its own server, opens the listening sockets
//! and passes them as descriptors 3, 4, … with `LISTEN_FDS` (how many),
//! `LISTEN_PID` (for which process) and optionally `LISTEN_FDNAMES`
//! (colon-separated names, systemd's `FileDescriptorName=`). The sockets
//! stay open in the manager while vbd restarts, so clients that connect
//! meanwhile wait in the listen backlog instead of failing.

use std::ffi::OsString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use thiserror::Error;

/// The first passed descriptor (after stdin, stdout and stderr).
pub const LISTEN_FDS_START: RawFd = 3;

/// Most descriptors taken: a bound, so a stray `LISTEN_FDS` cannot make vbd
/// claim (and close) every descriptor it has.
pub const MAX_LISTEN_FDS: usize = 64;

/// The name systemd gives a descriptor without `FileDescriptorName=` in a
/// socket passed by other means, and the one vbd uses when none is given.
pub const UNNAMED: &str = "unknown";

/// Why the passed sockets cannot be used.
#[derive(Debug, Error)]
pub enum ActivationError {
    /// `LISTEN_PID` is not a process id.
    #[error("LISTEN_PID={0:?} is not a process id")]
    BadPid(String),
    /// `LISTEN_FDS` is not a count.
    #[error("LISTEN_FDS={0:?} is not a number of descriptors")]
    BadCount(String),
    /// More descriptors than vbd takes.
    #[error("LISTEN_FDS={0} passes more than the {MAX_LISTEN_FDS} descriptors vbd takes")]
    TooMany(usize),
    /// `LISTEN_FDNAMES` does not name every descriptor.
    #[error("LISTEN_FDNAMES has {names} names for the {fds} descriptors of LISTEN_FDS")]
    NameCount {
        /// Names given.
        names: usize,
        /// Descriptors passed.
        fds: usize,
    },
    /// A variable is not UTF-8.
    #[error("{0} is not UTF-8")]
    NotUtf8(&'static str),
    /// A passed descriptor is not open.
    #[error("descriptor {fd} ({name}) passed by LISTEN_FDS is not open")]
    NotOpen {
        /// The descriptor.
        fd: RawFd,
        /// Its name.
        name: String,
        /// What fcntl said.
        #[source]
        source: io::Error,
    },
}

/// A descriptor passed in, now owned (and close-on-exec).
#[derive(Debug)]
pub struct Passed {
    /// The socket.
    pub fd: OwnedFd,
    /// Its name from `LISTEN_FDNAMES`, or [`UNNAMED`].
    pub name: String,
}

/// The protocol's variables, as found in the environment.
#[derive(Clone, Debug, Default)]
pub struct ListenEnv {
    /// `LISTEN_PID`.
    pub pid: Option<String>,
    /// `LISTEN_FDS`.
    pub fds: Option<String>,
    /// `LISTEN_FDNAMES`.
    pub names: Option<String>,
}

/// What the variables pass to process `me`: descriptors and their names.
/// Nothing when they are absent or meant for another process (a parent
/// that did not unset them).
pub fn parse(env: &ListenEnv, me: u32) -> Result<Vec<(RawFd, String)>, ActivationError> {
    let (Some(pid), Some(fds)) = (&env.pid, &env.fds) else {
        return Ok(Vec::new());
    };
    let pid: u32 = pid
        .trim()
        .parse()
        .map_err(|_| ActivationError::BadPid(pid.clone()))?;
    if pid != me {
        return Ok(Vec::new());
    }
    let n: usize = fds
        .trim()
        .parse()
        .map_err(|_| ActivationError::BadCount(fds.clone()))?;
    if n > MAX_LISTEN_FDS {
        return Err(ActivationError::TooMany(n));
    }
    if n == 0 {
        return Ok(Vec::new());
    }
    let names: Vec<String> = match &env.names {
        None => vec![UNNAMED.to_owned(); n],
        Some(s) => s
            .split(':')
            .map(|name| if name.is_empty() { UNNAMED } else { name }.to_owned())
            .collect(),
    };
    if names.len() != n {
        return Err(ActivationError::NameCount {
            names: names.len(),
            fds: n,
        });
    }
    Ok((LISTEN_FDS_START..).zip(names).collect())
}

/// Takes the descriptors passed to this process, marks them close-on-exec
/// and unsets the variables, so children (QEMU) inherit neither.
///
/// # Safety
/// No other thread may read or change the environment during the call:
/// call it before starting threads. The descriptors it returns must not be
/// owned by anything else in the process, which holds as long as nothing
/// opened them before: the protocol hands them over at exec.
pub unsafe fn take() -> Result<Vec<Passed>, ActivationError> {
    let var = |key: &'static str| -> Result<Option<String>, ActivationError> {
        std::env::var_os(key)
            .map(|v: OsString| v.into_string().map_err(|_| ActivationError::NotUtf8(key)))
            .transpose()
    };
    let env = ListenEnv {
        pid: var("LISTEN_PID")?,
        fds: var("LISTEN_FDS")?,
        names: var("LISTEN_FDNAMES")?,
    };
    for key in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // SAFETY: the caller guarantees no other thread touches the
        // environment now.
        unsafe { std::env::remove_var(key) };
    }
    let mut out = Vec::new();
    for (fd, name) in parse(&env, std::process::id())? {
        // SAFETY: fcntl on a descriptor number; it only reads and sets the
        // descriptor's flags.
        let r = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        if r != 0 {
            return Err(ActivationError::NotOpen {
                fd,
                name,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: the descriptor is open (fcntl succeeded) and, by the
        // protocol and the caller's promise, nothing else owns it; the
        // variables are unset, so no later call takes it again.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        out.push(Passed { fd, name });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pid: &str, fds: &str, names: Option<&str>) -> ListenEnv {
        ListenEnv {
            pid: Some(pid.into()),
            fds: Some(fds.into()),
            names: names.map(String::from),
        }
    }

    #[test]
    fn descriptors_and_names_for_this_process_only() {
        let got = parse(&env("42", "3", Some("nbd:control:")), 42).unwrap();
        assert_eq!(
            got,
            [
                (3, "nbd".into()),
                (4, "control".into()),
                (5, "unknown".into())
            ]
        );
        assert_eq!(
            parse(&env("42", "2", None), 42).unwrap(),
            [(3, "unknown".into()), (4, "unknown".into())]
        );
        assert!(parse(&env("41", "2", None), 42).unwrap().is_empty());
        assert!(parse(&ListenEnv::default(), 42).unwrap().is_empty());
        let no_pid = ListenEnv {
            fds: Some("1".into()),
            ..ListenEnv::default()
        };
        assert!(parse(&no_pid, 42).unwrap().is_empty());
        assert!(parse(&env("42", "0", None), 42).unwrap().is_empty());
    }

    #[test]
    fn malformed_variables_are_errors_that_name_them() {
        let msg = |e: ListenEnv| parse(&e, 42).unwrap_err().to_string();
        assert_eq!(
            msg(env("x", "1", None)),
            "LISTEN_PID=\"x\" is not a process id"
        );
        assert_eq!(
            msg(env("42", "-1", None)),
            "LISTEN_FDS=\"-1\" is not a number of descriptors"
        );
        assert!(msg(env("42", "65", None)).contains("more than the 64"));
        assert_eq!(
            msg(env("42", "2", Some("nbd"))),
            "LISTEN_FDNAMES has 1 names for the 2 descriptors of LISTEN_FDS"
        );
    }
}
