//! One core's event loop: its own io_uring, its connections in a slab, and
//! an eventfd through which other threads hand it connections, off-core
//! completions and the order to stop.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use io_uring::{IoUring, cqueue, opcode, types};
use slab::Slab;
use tracing::{debug, info, warn};

use super::conn::{Conn, ConnConfig, Env};
use super::limits::{Gauges, RateLimitedLog};
use super::listener::{self, Listener, SocketTuning, Transport};
use super::metrics::{ConnSummary, answer_snapshot};
use super::registry::Registry;
use super::tls::{ConnTls, TlsServer};
use super::token::{Kind, MAX_CONNS, Token};
use crate::volume::ring::{RemoteDone, RemoteSink, push_sqe};
use crate::volume::{Wake, Waker};

/// A message for a core.
pub enum CoreMsg {
    /// A connection accepted elsewhere, now this core's for life.
    Conn {
        fd: OwnedFd,
        transport: Transport,
        peer: String,
    },
    /// Stop accepting, finish in-flight requests, close, exit.
    Stop,
    /// Reply with a summary of every connection on this core (`vbd status`).
    Snapshot(Sender<Vec<ConnSummary>>),
}

/// How other threads reach a core.
#[derive(Clone)]
pub struct CoreHandle {
    pub tx: Sender<CoreMsg>,
    pub waker: Arc<Waker>,
}

impl CoreHandle {
    /// Sends a message and wakes the core.
    pub fn send(&self, msg: CoreMsg) {
        // A closed channel means the core already exited.
        let _ = self.tx.send(msg);
        self.waker.wake();
    }
}

/// Everything a core needs, built before its thread starts.
pub struct CoreSetup {
    pub index: usize,
    pub rx: Receiver<CoreMsg>,
    pub remote_rx: Receiver<RemoteDone>,
    pub sink: RemoteSink,
    pub waker: Arc<Waker>,
    pub peers: Vec<CoreHandle>,
    pub listeners: Vec<Listener>,
    pub registry: Arc<Registry>,
    pub conn: ConnConfig,
    pub gauges: Arc<Gauges>,
    pub tuning: SocketTuning,
    pub ring_entries: u32,
    /// How long to spin for new completions before sleeping, after a round
    /// that served clients; zero sleeps at once.
    pub busy_poll: Duration,
    pub tls: Option<Arc<TlsServer>>,
}

/// How often a spinning core offers its CPU to other runnable threads.
const YIELD_EVERY: Duration = Duration::from_micros(5);

struct ListenerState {
    listener: Option<Listener>,
    armed: bool,
}

struct Reactor {
    ring: IoUring,
    index: usize,
    conns: Slab<Box<Conn>>,
    generation: u16,
    listeners: Vec<ListenerState>,
    rx: Receiver<CoreMsg>,
    remote_rx: Receiver<RemoteDone>,
    sink: RemoteSink,
    waker: Arc<Waker>,
    peers: Vec<CoreHandle>,
    next_core: usize,
    registry: Arc<Registry>,
    cfg: ConnConfig,
    gauges: Arc<Gauges>,
    refusals: RateLimitedLog,
    /// Period of the handshake-timeout sweep; boxed so its address is
    /// stable while the kernel holds it.
    tick: Box<types::Timespec>,
    tuning: SocketTuning,
    tls: Option<Arc<TlsServer>>,
    logged_tuning: bool,
    stopping: bool,
    dirty: Vec<usize>,
    cqes: Vec<(u64, i32, u32)>,
    /// Target of the eventfd read; boxed so its address is stable.
    wake_buf: Box<u64>,
    busy_poll: Duration,
    /// The last round handled client traffic, so more is likely soon.
    active: bool,
    /// Connections pumped in the last round.
    touched: Vec<usize>,
}

/// Runs a core until it is told to stop and its connections are closed.
pub fn run(setup: CoreSetup) -> std::io::Result<()> {
    let ring = IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .setup_defer_taskrun()
        // Lets the busy-poll see pending task work without a syscall.
        .setup_taskrun_flag()
        .setup_cqsize(setup.ring_entries * 8)
        .build(setup.ring_entries)?;
    let mut r = Reactor {
        ring,
        index: setup.index,
        conns: Slab::new(),
        generation: 0,
        listeners: setup
            .listeners
            .into_iter()
            .map(|l| ListenerState {
                listener: Some(l),
                armed: false,
            })
            .collect(),
        rx: setup.rx,
        remote_rx: setup.remote_rx,
        sink: setup.sink,
        waker: setup.waker,
        peers: setup.peers,
        next_core: setup.index,
        registry: setup.registry,
        cfg: setup.conn,
        gauges: setup.gauges,
        refusals: RateLimitedLog::new(),
        tick: Box::new(types::Timespec::new().sec(1)),
        tuning: setup.tuning,
        tls: setup.tls,
        logged_tuning: false,
        stopping: false,
        dirty: Vec::new(),
        cqes: Vec::with_capacity(1024),
        wake_buf: Box::new(0),
        busy_poll: setup.busy_poll,
        active: false,
        touched: Vec::new(),
    };
    r.arm_wake()?;
    if !r.cfg.handshake_timeout.is_zero() {
        r.arm_timer();
    }
    for i in 0..r.listeners.len() {
        r.arm_accept(i);
    }
    debug!(core = r.index, "reactor running");
    r.run()
}

impl Reactor {
    fn run(&mut self) -> std::io::Result<()> {
        loop {
            let want = if self.active && !self.busy_poll.is_zero() && self.poll_briefly()? {
                0
            } else {
                1
            };
            self.active = false;
            self.touched.clear();
            self.enter(want)?;
            let mut cqes = std::mem::take(&mut self.cqes);
            cqes.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            for &(ud, res, flags) in &cqes {
                self.on_cqe(ud, res, flags);
            }
            cqes.clear();
            self.cqes = cqes;
            self.pump_dirty();
            if self.stopping
                && self.conns.is_empty()
                && self.listeners.iter().all(|l| l.listener.is_none())
            {
                debug!(core = self.index, "reactor stopped");
                return Ok(());
            }
        }
    }

    /// Submits what is queued and waits for `want` completions. A signal
    /// (EINTR) or a full completion queue (EBUSY) just ends the wait early:
    /// the caller's loop reaps and comes back.
    fn enter(&mut self, want: usize) -> std::io::Result<()> {
        match self.ring.submit_and_wait(want) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Submits what is queued, then spins up to `busy_poll` for the kernel
    /// to post a completion or flag task work; returns whether it did.
    /// Sleeping and waking costs more than the gap between a client's
    /// requests, so while traffic flows the core stays awake; once it stops,
    /// the core sleeps after one window. It yields every few microseconds so a
    /// client sharing this CPU is not starved by the spin.
    fn poll_briefly(&mut self) -> std::io::Result<bool> {
        self.enter(0)?;
        // A client still reading earlier replies is busy, not waiting on
        // us: sleeping lets its next requests gather into one batch, which
        // costs both sides less than answering them one by one.
        if !self.touched.is_empty()
            && self
                .touched
                .iter()
                .all(|&id| self.conns.get(id).is_none_or(|c| c.peer_backlogged()))
        {
            return Ok(false);
        }
        let start = Instant::now();
        let mut yielded = start;
        loop {
            for _ in 0..64 {
                if self.ring.submission().taskrun() || !self.ring.completion().is_empty() {
                    return Ok(true);
                }
                std::hint::spin_loop();
            }
            let now = Instant::now();
            if now.duration_since(start) >= self.busy_poll {
                return Ok(false);
            }
            if now.duration_since(yielded) >= YIELD_EVERY {
                std::thread::yield_now();
                yielded = now;
            }
        }
    }

    fn mark(&mut self, conn: usize) {
        if let Some(c) = self.conns.get_mut(conn)
            && !c.queued
        {
            c.queued = true;
            self.dirty.push(conn);
        }
    }

    fn env(&mut self, id: usize) -> (Option<&mut Box<Conn>>, Env<'_>) {
        let conn = self.conns.get_mut(id);
        let env = Env {
            ring: &mut self.ring,
            sink: &self.sink,
            registry: &self.registry,
            cfg: &self.cfg,
            gauges: &self.gauges,
            core: self.index,
            id,
        };
        (conn, env)
    }

    fn pump_dirty(&mut self) {
        while let Some(id) = self.dirty.pop() {
            self.touched.push(id);
            let (conn, mut env) = self.env(id);
            let Some(conn) = conn else { continue };
            conn.queued = false;
            conn.pump(&mut env);
            if conn.finished() {
                let conn = self.conns.remove(id);
                self.gauges.disconnect();
                let s = conn.stats;
                info!(
                    core = self.index,
                    peer = %conn.peer,
                    export = conn.export_name().unwrap_or("-"),
                    requests = s.requests,
                    errors = s.errors,
                    bytes_read = s.bytes_read,
                    bytes_written = s.bytes_written,
                    "connection closed"
                );
            }
        }
    }

    fn on_cqe(&mut self, ud: u64, res: i32, flags: u32) {
        let Some(t) = Token::decode(ud) else {
            warn!(core = self.index, ud, "completion with unknown user data");
            return;
        };
        match t.kind {
            Kind::Wake => self.on_wake(res),
            Kind::Timer => self.on_timer(),
            Kind::Accept => self.on_accept(t.conn, res, flags),
            Kind::Recv | Kind::Send | Kind::Cancel | Kind::Io => {
                self.active = true;
                let (conn, mut env) = self.env(t.conn);
                let Some(conn) = conn.filter(|c| c.generation == t.generation) else {
                    debug!(core = self.index, ?t, "completion for a closed connection");
                    return;
                };
                match t.kind {
                    Kind::Recv => conn.on_recv(res),
                    Kind::Send => conn.on_send(res),
                    Kind::Cancel => conn.on_cancel(),
                    _ => conn.on_io(t.slot, Wake::Cqe(res), &mut env),
                }
                self.mark(t.conn);
            }
        }
    }

    fn arm_wake(&mut self) -> std::io::Result<()> {
        let entry = opcode::Read::new(
            types::Fd(self.waker.raw_fd()),
            (&mut *self.wake_buf as *mut u64).cast(),
            8,
        )
        .build()
        .user_data(Token::encode(Kind::Wake, 0, 0, 0));
        push_sqe(&mut self.ring, entry)
    }

    fn on_wake(&mut self, res: i32) {
        if res < 0 && res != -libc::EAGAIN && res != -libc::EINTR {
            warn!(core = self.index, error = %std::io::Error::from_raw_os_error(-res), "eventfd read failed");
        }
        if let Err(e) = self.arm_wake() {
            warn!(core = self.index, "cannot re-arm the wake-up read: {e}");
        }
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                CoreMsg::Conn {
                    fd,
                    transport,
                    peer,
                } => self.add_conn(fd, transport, peer),
                CoreMsg::Stop => self.stop(),
                CoreMsg::Snapshot(reply) => answer_snapshot(&reply, self.index, &self.conns),
            }
        }
        while let Ok(done) = self.remote_rx.try_recv() {
            let Some(t) = Token::decode(done.token).filter(|t| t.kind == Kind::Io) else {
                continue;
            };
            let (conn, mut env) = self.env(t.conn);
            if let Some(conn) = conn.filter(|c| c.generation == t.generation) {
                conn.on_io(t.slot, Wake::Remote(done.result), &mut env);
                self.mark(t.conn);
            }
        }
    }

    fn arm_timer(&mut self) {
        let entry = opcode::Timeout::new(&*self.tick)
            .build()
            .user_data(Token::encode(Kind::Timer, 0, 0, 0));
        if let Err(e) = push_sqe(&mut self.ring, entry) {
            warn!(
                core = self.index,
                "cannot arm the handshake-timeout sweep: {e}"
            );
        }
    }

    /// Once a second: disconnect clients that have not finished negotiating.
    fn on_timer(&mut self) {
        let now = Instant::now();
        let limit = self.cfg.handshake_timeout;
        let expired: Vec<usize> = self
            .conns
            .iter_mut()
            .filter_map(|(id, c)| c.expire_handshake(now, limit).then_some(id))
            .collect();
        self.gauges.note_handshake_timeouts(expired.len());
        for id in expired {
            self.mark(id);
        }
        if !self.stopping {
            self.arm_timer();
        }
    }

    fn arm_accept(&mut self, i: usize) {
        let Some(l) = self.listeners[i].listener.as_ref() else {
            return;
        };
        let entry = opcode::AcceptMulti::new(types::Fd(l.fd.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(Token::encode(Kind::Accept, i, 0, 0));
        match push_sqe(&mut self.ring, entry) {
            Ok(()) => self.listeners[i].armed = true,
            Err(e) => warn!(core = self.index, "cannot arm accept: {e}"),
        }
    }

    fn on_accept(&mut self, i: usize, res: i32, flags: u32) {
        if i >= self.listeners.len() {
            return;
        }
        let more = cqueue::more(flags);
        if !more {
            self.listeners[i].armed = false;
        }
        if res >= 0 {
            // SAFETY: the kernel handed us this new descriptor.
            let fd = unsafe { OwnedFd::from_raw_fd(res) };
            let Some(l) = self.listeners[i].listener.as_ref() else {
                return;
            };
            let transport = l.transport;
            let peer = peer_name(&fd, transport, &l.addr);
            if self.stopping {
                return;
            }
            if !self.gauges.try_connect() {
                if let Some(hidden) = self.refusals.tick() {
                    warn!(
                        core = self.index,
                        limit = self.gauges.max_connections(),
                        refused_since_last_line = hidden,
                        "connection limit reached (--max-connections); refusing {peer}"
                    );
                }
                drop(fd);
                if !more {
                    self.arm_accept(i);
                }
                return;
            }
            let target = self.next_core % self.peers.len().max(1);
            self.next_core = self.next_core.wrapping_add(1);
            if target == self.index || self.peers.is_empty() {
                self.add_conn(fd, transport, peer);
            } else {
                self.peers[target].send(CoreMsg::Conn {
                    fd,
                    transport,
                    peer,
                });
            }
        } else if res != -libc::ECANCELED {
            warn!(core = self.index, error = %std::io::Error::from_raw_os_error(-res), "accept failed");
        }
        if !more {
            if self.stopping {
                // Cancelled for shutdown: the listener closes here.
                self.listeners[i].listener = None;
            } else {
                self.arm_accept(i);
            }
        }
    }

    fn add_conn(&mut self, fd: OwnedFd, transport: Transport, peer: String) {
        if self.stopping {
            self.gauges.disconnect();
            return;
        }
        if self.conns.len() >= MAX_CONNS {
            self.gauges.disconnect();
            warn!(
                core = self.index,
                "connection limit reached; refusing {peer}"
            );
            return;
        }
        let granted = listener::tune(&fd, transport, self.tuning);
        listener::log_granted(self.tuning, granted, !self.logged_tuning);
        self.logged_tuning = true;
        self.generation = self.generation.wrapping_add(1);
        let gauge = self.gauges.core(self.index);
        let tls = ConnTls::offer(self.tls.as_ref(), transport);
        let conn = Conn::new(fd, peer, self.generation, &self.cfg, gauge, tls);
        debug!(core = self.index, peer = %conn.peer, "connection accepted");
        let id = self.conns.insert(conn);
        self.mark(id);
    }

    fn stop(&mut self) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        for i in 0..self.listeners.len() {
            if self.listeners[i].armed {
                let entry = opcode::AsyncCancel::new(Token::encode(Kind::Accept, i, 0, 0))
                    .build()
                    .user_data(Token::encode(Kind::Cancel, MAX_CONNS, 0, 0));
                if push_sqe(&mut self.ring, entry).is_err() {
                    self.listeners[i].listener = None;
                }
            } else {
                self.listeners[i].listener = None;
            }
        }
        let ids: Vec<usize> = self.conns.iter().map(|(id, _)| id).collect();
        for id in ids {
            if let Some(c) = self.conns.get_mut(id) {
                c.stop();
            }
            self.mark(id);
        }
    }
}

/// A printable name for the peer of an accepted socket.
fn peer_name(fd: &OwnedFd, transport: Transport, listener: &str) -> String {
    if transport == Transport::Tcp {
        // SAFETY: getpeername writes at most `len` bytes into storage.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as u32;
        let r = unsafe {
            libc::getpeername(
                fd.as_raw_fd(),
                (&mut storage as *mut libc::sockaddr_storage).cast(),
                &mut len,
            )
        };
        if r == 0
            && let Some(addr) = sockaddr_to_string(&storage)
        {
            return addr;
        }
    }
    format!("{listener}#fd{}", fd.as_raw_fd())
}

fn sockaddr_to_string(s: &libc::sockaddr_storage) -> Option<String> {
    match i32::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(format!("{ip}:{}", u16::from_be(a.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(format!("[{ip}]:{}", u16::from_be(a.sin6_port)))
        }
        _ => None,
    }
}
