//! One vhost-user-blk device: its socket and the control thread that
//! serves one frontend at a time. Messages are rare (set-up, reset,
//! memory hot-plug), so the thread blocks; the data path never passes
//! through it. A second frontend while one is attached is refused; a
//! frontend that breaks the protocol is disconnected (logged with the
//! reason), its queues stopped, and the next one accepted.
//!
//! A resize ([`VhostUserDevice::set_capacity`]) changes the capacity the
//! queues enforce and GET_CONFIG reports, and announces it with
//! CONFIG_CHANGE_MSG on the backend request channel (BACKEND_REQ). The
//! `vhost` crate turns that channel into a `Backend` that cannot send this
//! message, so the control thread keeps its own copy of the channel's
//! socket: it peeks at each message's header and, for
//! SET_BACKEND_REQ_FD, receives the descriptor with the peek (the kernel
//! hands a peeking reader its own duplicate) before the crate reads it.

use std::io;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vhost::vhost_user::{BackendReqHandler, Error as VhostError};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::config::{DeviceConfig, whole_block_sectors};
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
    /// A resize to less than one block.
    #[error("a disk of {0} bytes holds no whole {1}-byte block")]
    TooSmall(u64, u32),
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
    block_size: u32,
    /// The disk's size in sectors, shared with the handler and queues.
    capacity_sectors: Arc<AtomicU64>,
    /// The attached frontend's backend request channel, if it gave one.
    channel: Arc<Mutex<Option<UnixStream>>>,
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
        let block_size = config.limits.block_size;
        let metrics = Arc::new(DeviceMetrics::new(num_queues));
        let stop = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::Thread)?;
        let handler = Handler::new(config, name, runner, metrics.clone());
        let capacity_sectors = handler.capacity_sectors();
        let channel = Arc::new(Mutex::new(None));
        let control = Control {
            listener,
            stop: stop.try_clone().map_err(DeviceError::Thread)?,
            handler: Arc::new(Mutex::new(handler)),
            metrics: metrics.clone(),
            channel: channel.clone(),
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
            block_size,
            capacity_sectors,
            channel,
            thread: Some(thread),
        })
    }

    /// The disk is `size_bytes` now (the volume was resized): requests
    /// are checked against the new size and GET_CONFIG reports it, and an
    /// attached frontend that gave a backend request channel is told with
    /// CONFIG_CHANGE_MSG (QEMU then re-reads the config space and tells
    /// the guest). Returns whether a frontend was told.
    pub fn set_capacity(&self, size_bytes: u64) -> Result<bool, DeviceError> {
        let sectors = whole_block_sectors(size_bytes, self.block_size);
        if sectors == 0 {
            return Err(DeviceError::TooSmall(size_bytes, self.block_size));
        }
        self.capacity_sectors.store(sectors, Ordering::Relaxed);
        let mut channel = self.channel.locked();
        let Some(sock) = channel.as_mut() else {
            return Ok(false);
        };
        // No NEED_REPLY: QEMU answers the notice only after reading the
        // config space back over the main socket, which this device's
        // control thread serves; waiting here would gain nothing.
        let mut msg = [0u8; 12];
        msg[0..4].copy_from_slice(&BACKEND_CONFIG_CHANGE_MSG.to_le_bytes());
        msg[4..8].copy_from_slice(&VHOST_USER_VERSION.to_le_bytes());
        match sock.write_all(&msg) {
            Ok(()) => Ok(true),
            Err(e) => {
                tracing::warn!(device = %self.path.display(), "config change not sent: {e}");
                *channel = None;
                Ok(false)
            }
        }
    }

    /// The disk's size in bytes as the device reports it now.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_sectors.load(Ordering::Relaxed) * 512
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
    channel: Arc<Mutex<Option<UnixStream>>>,
    name: String,
}

/// vhost-user's SET_BACKEND_REQ_FD request code.
const SET_BACKEND_REQ_FD: u32 = 21;
/// The backend channel's CONFIG_CHANGE_MSG request code.
const BACKEND_CONFIG_CHANGE_MSG: u32 = 2;
/// The header flags of every message: protocol version 1.
const VHOST_USER_VERSION: u32 = 1;
/// vhost-user's header: request, flags, payload size (u32 each).
const HEADER_LEN: usize = 12;

/// When the next message on `sock` is SET_BACKEND_REQ_FD, receives the
/// socket it carries by peeking (the message stays queued for the
/// `vhost` crate, which receives its own copy); `None` for any other
/// message, or one not fully arrived.
fn peek_backend_channel(sock: RawFd) -> io::Result<Option<UnixStream>> {
    let mut hdr = [0u8; HEADER_LEN];
    // SAFETY: `hdr` is valid for HEADER_LEN bytes for the call; no control
    // buffer is given, so no descriptor is received.
    let n = unsafe {
        libc::recv(
            sock,
            hdr.as_mut_ptr().cast(),
            HEADER_LEN,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
            _ => Err(e),
        };
    }
    let code = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    if n as usize != HEADER_LEN || code != SET_BACKEND_REQ_FD {
        return Ok(None);
    }
    // Room for a few descriptors: any beyond the first are closed.
    const MAX_FDS: usize = 4;
    let space = cmsg_space(MAX_FDS);
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: HEADER_LEN,
    };
    // SAFETY: an all-zero msghdr is a valid empty one; the pointers set
    // below stay valid for the recvmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points at `iov` (HEADER_LEN bytes of `hdr`) and at
    // `control` (`space` bytes), both alive across the call.
    let n = unsafe {
        libc::recvmsg(
            sock,
            &mut msg,
            libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR/NXTHDR stay
    // inside `msg_controllen` bytes of `control`.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is a header inside the control buffer (above).
        let c = unsafe { &*cmsg };
        if c.cmsg_level == libc::SOL_SOCKET && c.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) is a constant computation.
            let data_len = c.cmsg_len as usize - unsafe { libc::CMSG_LEN(0) } as usize;
            // SAFETY: the data of an SCM_RIGHTS message is `data_len` bytes
            // of descriptors, inside the control buffer.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
            for i in 0..data_len / std::mem::size_of::<RawFd>() {
                // SAFETY: `i` indexes a descriptor inside the data (above),
                // which may be unaligned.
                fds.push(unsafe { data.add(i).read_unaligned() });
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    let mut fds = fds.into_iter().map(|fd| {
        // SAFETY: each descriptor was just installed in this process by
        // the peek and is owned by nobody else.
        unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
    });
    let first = fds.next();
    // Extra descriptors close as they drop.
    drop(fds);
    Ok(first.map(UnixStream::from))
}

/// CMSG_SPACE for `n` descriptors.
fn cmsg_space(n: usize) -> usize {
    // SAFETY: CMSG_SPACE is a constant computation on its argument.
    unsafe { libc::CMSG_SPACE((n * std::mem::size_of::<RawFd>()) as u32) as usize }
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
                && let Err(e) = self.handle(f)
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

    /// Handles the frontend's next message, keeping the backend request
    /// channel it carries if it is SET_BACKEND_REQ_FD and the device took it.
    fn handle(&self, f: &mut BackendReqHandler<Mutex<Handler<R>>>) -> Result<(), VhostError> {
        let peeked = match peek_backend_channel(f.as_raw_fd()) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(device = self.name, "peeking at a message: {e}");
                None
            }
        };
        f.handle_request()?;
        if let Some(channel) = peeked
            && self.handler.locked().backend_channel_acked()
        {
            *self.channel.locked() = Some(channel);
        }
        Ok(())
    }

    /// Stops the queues and forgets the frontend's state.
    fn detach(&self) {
        *self.channel.locked() = None;
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
