//! Termination signals: blocked in every thread so that only the main
//! thread, waiting in `sigwait`, receives SIGTERM and SIGINT.

use std::io;

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
