//! One QEMU process, watched by a task that owns it and signalled only
//! through that task, so a pid that is no longer QEMU is never signalled.
//! A QEMU vbd spawns is its child (its exit status is known); one adopted
//! after a vbd restart is watched through a [`PidFd`] (its exit status is
//! not: only a parent can reap a process and read it).

use std::fs::File;
use std::path::Path;
use std::process::{ExitStatus, Stdio};

use tokio::process::Command;
use tokio::sync::{mpsc, watch};

use super::pidfd::PidFd;

/// How a QEMU process ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exit {
    /// Exit status, when QEMU exited by itself.
    pub code: Option<i32>,
    /// Signal number, when a signal killed it.
    pub signal: Option<i32>,
}

impl Exit {
    fn from_status(s: ExitStatus) -> Exit {
        use std::os::unix::process::ExitStatusExt;
        Exit {
            code: s.code(),
            signal: s.signal(),
        }
    }

    /// An exit whose status vbd cannot know: the process was not its
    /// child, or waiting for it failed.
    pub fn unknown() -> Exit {
        Exit {
            code: None,
            signal: None,
        }
    }

    /// Whether QEMU exited by itself with status 0.
    pub fn clean(&self) -> bool {
        self.code == Some(0)
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit status {c}"),
            (None, Some(s)) => write!(f, "killed by signal {s}"),
            _ => write!(f, "exit status unknown"),
        }
    }
}

/// Handle to a running QEMU.
pub struct Process {
    /// QEMU's process id.
    pub pid: u32,
    signals: mpsc::UnboundedSender<i32>,
    exit: watch::Receiver<Option<Exit>>,
}

impl Process {
    /// Starts `argv` with stdout and stderr going to `log`.
    pub fn spawn(argv: &[String], log: &Path) -> std::io::Result<Process> {
        let Some((program, args)) = argv.split_first() else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "empty QEMU command line",
            ));
        };
        let out = File::create(log)?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                // Its own session (and so process group): a terminal's Ctrl-C
                // or a signal to vbd's group reaches vbd, which stops the VM
                // in order or leaves it running (--vms-on-exit), instead of
                // killing QEMU outright.
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // vbd blocks SIGTERM/SIGINT and ignores SIGPIPE; QEMU must not
                // inherit that, or a graceful SIGTERM would never arrive.
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGTERM);
                libc::sigaddset(&mut set, libc::SIGINT);
                libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                // Nothing of vbd's but stdio reaches QEMU, even descriptors
                // opened without O_CLOEXEC (sockets systemd passes in): a
                // QEMU outliving vbd must not hold its listeners or locks.
                // A kernel without close_range (before 5.11) keeps the
                // old behaviour.
                libc::syscall(
                    libc::SYS_close_range,
                    3u32,
                    u32::MAX,
                    libc::CLOSE_RANGE_CLOEXEC,
                );
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        let pid = child.id().unwrap_or(0);
        let (sig_tx, mut sig_rx) = mpsc::unbounded_channel::<i32>();
        let (exit_tx, exit_rx) = watch::channel(None);
        tokio::spawn(async move {
            let status = loop {
                tokio::select! {
                    status = child.wait() => break status,
                    Some(sig) = sig_rx.recv() => {
                        // Still unreaped here, so the pid is still ours.
                        if let Some(pid) = child.id() {
                            // SAFETY: plain kill(2) on our own child.
                            unsafe { libc::kill(pid as i32, sig) };
                        }
                    }
                }
            };
            let exit = match status {
                Ok(s) => Exit::from_status(s),
                Err(e) => {
                    tracing::error!(pid, "waiting for QEMU failed: {e}");
                    Exit::unknown()
                }
            };
            let _ = exit_tx.send(Some(exit));
        });
        Ok(Process {
            pid,
            signals: sig_tx,
            exit: exit_rx,
        })
    }

    /// Watches `pid`, which is not our child, through `pidfd` (opened
    /// before the caller checked that `pid` is the right process, so the
    /// descriptor cannot name a later holder of the pid). Its exit status
    /// is never known.
    pub fn adopt(pid: u32, pidfd: PidFd) -> std::io::Result<Process> {
        let fd = pidfd.watch()?;
        let (sig_tx, mut sig_rx) = mpsc::unbounded_channel::<i32>();
        let (exit_tx, exit_rx) = watch::channel(None);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = fd.readable() => {
                        if let Err(e) = r {
                            tracing::error!(pid, "watching adopted QEMU failed: {e}");
                        }
                        break;
                    }
                    Some(sig) = sig_rx.recv() => {
                        if let Err(e) = fd.get_ref().signal(sig) {
                            tracing::debug!(pid, sig, "signal not sent: {e}");
                        }
                    }
                }
            }
            let _ = exit_tx.send(Some(Exit::unknown()));
        });
        Ok(Process {
            pid,
            signals: sig_tx,
            exit: exit_rx,
        })
    }

    /// A process that is already gone, with an unknown exit: the QEMU of
    /// a VM found dead at adoption.
    pub fn gone(pid: u32) -> Process {
        let (signals, _) = mpsc::unbounded_channel();
        let (_, exit) = watch::channel(Some(Exit::unknown()));
        Process { pid, signals, exit }
    }

    /// Sends `sig` unless the process has already been reaped.
    pub fn signal(&self, sig: i32) {
        let _ = self.signals.send(sig);
    }

    /// How it ended, if it has.
    pub fn exited(&self) -> Option<Exit> {
        self.exit.borrow().clone()
    }

    /// Waits for the exit, however long it takes.
    pub async fn wait_exit(&self) -> Exit {
        let mut rx = self.exit.clone();
        loop {
            if let Some(e) = rx.borrow_and_update().clone() {
                return e;
            }
            if rx.changed().await.is_err() {
                return Exit::unknown();
            }
        }
    }

    /// Waits for the exit; `None` if `limit` passes first.
    pub async fn wait(&self, limit: std::time::Duration) -> Option<Exit> {
        tokio::time::timeout(limit, self.wait_exit()).await.ok()
    }
}
