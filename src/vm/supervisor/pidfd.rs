//! A pidfd (Linux 5.3+): a descriptor for one process, not a number the
//! kernel may reuse. It is how vbd watches and signals a QEMU it adopted
//! after a restart: that QEMU is not vbd's child, so `waitpid` cannot see
//! it exit, and `kill(pid)` could hit whatever process got the pid since.
//! The descriptor turns readable when the process exits.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// An open pidfd.
#[derive(Debug)]
pub struct PidFd(OwnedFd);

impl PidFd {
    /// Opens a pidfd for `pid`; `ESRCH` when no such process exists.
    pub fn open(pid: u32) -> std::io::Result<PidFd> {
        let pid = libc::pid_t::try_from(pid)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
        // SAFETY: pidfd_open takes a pid and flags, no pointers; on success
        // it returns a new descriptor that nothing else owns.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = RawFd::try_from(fd).map_err(|_| std::io::Error::other("pidfd out of range"))?;
        // SAFETY: `fd` was just returned by the kernel and is ours alone.
        Ok(PidFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Sends `sig` to exactly this process; `ESRCH` once it has exited.
    pub fn signal(&self, sig: i32) -> std::io::Result<()> {
        // SAFETY: a null siginfo asks the kernel to fill in what kill(2)
        // would; the descriptor is open for the duration of the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl PidFd {
    /// Registers the descriptor with the tokio reactor, so that
    /// `readable().await` waits for the exit. Must run inside the runtime.
    pub fn watch(self) -> std::io::Result<AsyncFd<PidFd>> {
        // SAFETY: the PidFd owns its descriptor, which stays open, and
        // `as_raw_fd` returns that same descriptor, for as long as the
        // AsyncFd owns the PidFd.
        Ok(unsafe { AsyncFd::register_with_interest(self, Interest::READABLE) }?)
    }
}

impl AsRawFd for PidFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn turns_readable_when_a_process_it_did_not_start_exits() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let fd = PidFd::open(child.id()).unwrap().watch().unwrap();
        let early = tokio::time::timeout(Duration::from_millis(50), fd.readable()).await;
        assert!(early.is_err(), "readable while the process runs");
        fd.get_ref().signal(libc::SIGTERM).unwrap();
        tokio::time::timeout(Duration::from_secs(10), fd.readable())
            .await
            .expect("readable once it exited")
            .unwrap()
            .retain_ready();
        child.wait().unwrap();
        let e = fd.get_ref().signal(libc::SIGTERM).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ESRCH));
        let e = PidFd::open(u32::MAX).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ESRCH));
    }
}
