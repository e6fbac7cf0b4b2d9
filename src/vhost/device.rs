//! One vhost-user-blk device: its socket and the control thread that
//! serves one frontend at a time. Messages are rare (set-up, reset,
//! memory hot-plug), so the thread blocks; the data path never passes
//! through it. A second frontend while one is attached is refused; a
//! frontend that breaks the protocol is disconnected (logged with the
//! reason), its queues stopped, and the next one accepted.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vhost::vhost_user::{BackendReqHandler, Error as VhostError};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::config::DeviceConfig;
use super::handler::Handler;
use super::runner::QueueRunner;
use crate::lock::MutexExt;

/// A frontend that stalls mid-message is dropped after this long, so it
/// cannot wedge the control thread.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The socket could not be bound or given its mode.
    #[error("vhost-user socket {0}")]
    Listen(PathBuf, #[source] io::Error),
    /// The control thread or its stop eventfd could not be made.
    #[error("vhost-user device thread")]
    Thread(#[source] io::Error),
}

/// A running device; dropping it stops the device and removes its socket.
pub struct VhostUserDevice {
    path: PathBuf,
    stop: EventFd,
    attached: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl VhostUserDevice {
    /// Listens on `path` (mode 0600) and serves frontends with `runner`.
    pub fn start<R: QueueRunner + 'static>(
        path: &Path,
        name: &str,
        config: DeviceConfig,
        runner: R,
    ) -> Result<Self, DeviceError> {
        let listen_err = |e| DeviceError::Listen(path.to_path_buf(), e);
        // A socket left by an earlier run would make bind fail; anything
        // else at that path is not ours to delete.
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            std::fs::remove_file(path).map_err(listen_err)?;
        }
        let listener = UnixListener::bind(path).map_err(listen_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::Thread)?;
        let control = Control {
            listener,
            stop: stop.try_clone().map_err(DeviceError::Thread)?,
            handler: Arc::new(Mutex::new(Handler::new(config, name, runner))),
            attached: Arc::new(AtomicBool::new(false)),
            name: name.to_string(),
        };
        let attached = control.attached.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vhost-{name}"))
            .spawn(move || control.run())
            .map_err(DeviceError::Thread)?;
        Ok(VhostUserDevice {
            path: path.to_path_buf(),
            stop,
            attached,
            thread: Some(thread),
        })
    }

    /// Whether a frontend is connected now.
    pub fn frontend_attached(&self) -> bool {
        self.attached.load(Ordering::Relaxed)
    }

    /// The socket frontends connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for VhostUserDevice {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Which of the watched descriptors are readable.
fn poll(fds: &[RawFd]) -> io::Result<Vec<bool>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: p is a live array of p.len() pollfds for the call.
        let n = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, -1) };
        if n >= 0 {
            return Ok(p.iter().map(|x| x.revents != 0).collect());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

struct Control<R: QueueRunner> {
    listener: UnixListener,
    stop: EventFd,
    handler: Arc<Mutex<Handler<R>>>,
    attached: Arc<AtomicBool>,
    name: String,
}

/// Whether an error just means the frontend went away.
fn is_hangup(e: &VhostError) -> bool {
    matches!(e, VhostError::Disconnected | VhostError::PartialMessage)
}

impl<R: QueueRunner> Control<R> {
    fn run(self) {
        let mut frontend: Option<BackendReqHandler<Mutex<Handler<R>>>> = None;
        loop {
            let mut fds = vec![self.stop.as_raw_fd(), self.listener.as_raw_fd()];
            if let Some(f) = &frontend {
                fds.push(f.as_raw_fd());
            }
            let ready = match poll(&fds) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(device = self.name, "vhost-user poll: {e}");
                    break;
                }
            };
            if ready[0] {
                break;
            }
            if ready.get(2) == Some(&true)
                && let Some(f) = &mut frontend
                && let Err(e) = f.handle_request()
            {
                if is_hangup(&e) {
                    tracing::info!(device = self.name, "vhost-user frontend disconnected");
                } else {
                    tracing::warn!(
                        device = self.name,
                        "vhost-user frontend disconnected after an error: {e}"
                    );
                }
                frontend = None;
                self.detach();
            }
            // After the attached frontend's messages, so that one which
            // hung up just before the next connected is gone by now.
            if ready[1] {
                self.accept(&mut frontend);
            }
        }
        if frontend.is_some() {
            self.detach();
        }
    }

    fn accept(&self, frontend: &mut Option<BackendReqHandler<Mutex<Handler<R>>>>) {
        let stream = match self.listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                tracing::warn!(device = self.name, "vhost-user accept: {e}");
                return;
            }
        };
        if frontend.is_some() {
            tracing::warn!(
                device = self.name,
                "refused a second vhost-user frontend: one is attached"
            );
            return;
        }
        if let Err(e) = prepare(&stream) {
            tracing::warn!(device = self.name, "vhost-user frontend socket: {e}");
            return;
        }
        tracing::info!(device = self.name, "vhost-user frontend attached");
        self.attached.store(true, Ordering::Relaxed);
        *frontend = Some(BackendReqHandler::from_stream(stream, self.handler.clone()));
    }

    /// Stops the queues and forgets the frontend's state.
    fn detach(&self) {
        for e in self.handler.locked().reset() {
            tracing::warn!(device = self.name, "stopping a queue: {e}");
        }
        self.attached.store(false, Ordering::Relaxed);
    }
}

/// Blocking with a timeout: a message is read whole once its first byte
/// is there, and a frontend that stops mid-message is dropped.
fn prepare(s: &UnixStream) -> io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(MESSAGE_TIMEOUT))?;
    s.set_write_timeout(Some(MESSAGE_TIMEOUT))
}
