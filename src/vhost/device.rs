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
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vhost::vhost_user::{BackendReqHandler, Error as VhostError};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::config::DeviceConfig;
use super::handler::Handler;
use super::metrics::{DeviceMetrics, DeviceStatus};
use super::runner::QueueRunner;
use crate::lock::MutexExt;

/// A frontend that stalls mid-message is dropped after this long, so it
/// cannot wedge the control thread.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The socket could not be bound or given its mode and group.
    #[error("vhost-user socket {0}")]
    Listen(PathBuf, #[source] io::Error),
    /// Something else listens there already (another vbd, a storage daemon).
    #[error("vhost-user socket {0} is in use by another process")]
    InUse(PathBuf),
    /// A file that is not a socket is in the way; it is not ours to delete.
    #[error("{0} exists and is not a socket")]
    NotSocket(PathBuf),
    /// The control thread or its stop eventfd could not be made.
    #[error("vhost-user device thread")]
    Thread(#[source] io::Error),
}

/// Who may connect: the socket's permission bits and group, as for the
/// NBD sockets (`vbd serve --socket-mode/--socket-group`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketAccess {
    /// Permission bits, 0600 by default: only vbd's user.
    pub mode: u32,
    /// The socket's group (a gid), so a QEMU in that group may connect
    /// with mode 0660.
    pub group: Option<u32>,
}

impl Default for SocketAccess {
    fn default() -> Self {
        SocketAccess {
            mode: 0o600,
            group: None,
        }
    }
}

/// A running device; dropping it stops the device and removes its socket.
pub struct VhostUserDevice {
    path: PathBuf,
    stop: EventFd,
    metrics: Arc<DeviceMetrics>,
    num_queues: u16,
    thread: Option<JoinHandle<()>>,
}

/// Binds `path` with `access`, replacing a stale socket left by an
/// earlier run but nothing else.
fn bind(path: &Path, access: SocketAccess) -> Result<UnixListener, DeviceError> {
    let listen_err = |e| DeviceError::Listen(path.to_path_buf(), e);
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(DeviceError::NotSocket(path.to_path_buf()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(DeviceError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(listen_err)?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(listen_err)?;
    }
    let listener = UnixListener::bind(path).map_err(listen_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(access.mode))
        .map_err(listen_err)?;
    if let Some(gid) = access.group {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(listen_err)?;
    }
    listener.set_nonblocking(true).map_err(listen_err)?;
    Ok(listener)
}

impl VhostUserDevice {
    /// Listens on `path` and serves frontends with `runner`, answering
    /// GET_ID with `name`.
    pub fn start<R: QueueRunner + 'static>(
        path: &Path,
        access: SocketAccess,
        name: &str,
        config: DeviceConfig,
        runner: R,
    ) -> Result<Self, DeviceError> {
        let listener = bind(path, access)?;
        let num_queues = config.num_queues;
        let metrics = Arc::new(DeviceMetrics::new(num_queues));
        let stop = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::Thread)?;
        let handler = Handler::new(config, name, runner, metrics.clone());
        let control = Control {
            listener,
            stop: stop.try_clone().map_err(DeviceError::Thread)?,
            handler: Arc::new(Mutex::new(handler)),
            metrics: metrics.clone(),
            name: name.to_string(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("vhost-{name}"))
            .spawn(move || control.run())
            .map_err(DeviceError::Thread)?;
        Ok(VhostUserDevice {
            path: path.to_path_buf(),
            stop,
            metrics,
            num_queues,
            thread: Some(thread),
        })
    }

    /// Whether a frontend is connected now.
    pub fn frontend_attached(&self) -> bool {
        self.metrics.attached.load(Ordering::Relaxed)
    }

    /// The device as `vbd status` and `/metrics` show it.
    pub fn status(&self) -> DeviceStatus {
        let queues = self.metrics.totals();
        DeviceStatus {
            socket: self.path.clone(),
            attached: self.frontend_attached(),
            num_queues: self.num_queues,
            running_queues: queues.iter().filter(|q| q.core.is_some()).count() as u16,
            queues,
        }
    }

    /// The socket frontends connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues the device offers.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
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
    metrics: Arc<DeviceMetrics>,
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
        self.metrics.attached.store(true, Ordering::Relaxed);
        *frontend = Some(BackendReqHandler::from_stream(stream, self.handler.clone()));
    }

    /// Stops the queues and forgets the frontend's state.
    fn detach(&self) {
        for e in self.handler.locked().reset() {
            tracing::warn!(device = self.name, "stopping a queue: {e}");
        }
        self.metrics.attached.store(false, Ordering::Relaxed);
    }
}

/// Blocking with a timeout: a message is read whole once its first byte
/// is there, and a frontend that stops mid-message is dropped.
fn prepare(s: &UnixStream) -> io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(MESSAGE_TIMEOUT))?;
    s.set_write_timeout(Some(MESSAGE_TIMEOUT))
}
