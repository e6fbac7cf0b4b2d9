//! Termination signals: blocked in every thread so that only the main
//! thread, waiting in `sigwait`, receives SIGTERM and SIGINT.

use std::io;
use std::time::Duration;

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local, zero-initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// Blocks SIGTERM and SIGINT in the calling thread and every thread it
/// starts afterwards; also ignores SIGPIPE (sends use MSG_NOSIGNAL anyway).
pub fn block_termination() -> io::Result<()> {
    let set = termination_set();
    // SAFETY: standard signal-mask calls with valid pointers.
    unsafe {
        let r = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    Ok(())
}

/// Waits for SIGTERM or SIGINT; returns the signal number.
pub fn wait_for_termination() -> io::Result<i32> {
    let set = termination_set();
    let mut sig = 0;
    // SAFETY: set and sig are live for the call.
    let r = unsafe { libc::sigwait(&set, &mut sig) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(sig)
}

/// Waits for SIGTERM or SIGINT while `go_on()` holds, asking it every
/// `period`; returns the signal, or `None` once `go_on()` is false.
pub fn wait_for_termination_while(
    period: Duration,
    mut go_on: impl FnMut() -> bool,
) -> io::Result<Option<i32>> {
    let set = termination_set();
    let timeout = libc::timespec {
        tv_sec: period.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: libc::c_long::from(period.subsec_nanos() as i32),
    };
    while go_on() {
        // SAFETY: set and timeout are live for the call; no siginfo is asked.
        let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
        if sig > 0 {
            return Ok(Some(sig));
        }
        let e = io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) {
            return Err(e);
        }
    }
    Ok(None)
}
