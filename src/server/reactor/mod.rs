//! One core's event loop: its own [`Ring`], its connections in a slab, and
//! an eventfd through which other threads hand it connections, off-core
//! completions and the order to stop.
//!
//! Completions find their owner by [`Token`]: the core's own (wake-up,
//! timer), a listener's (`accept`), a connection's (socket and volume
//! I/O, looked up in `conns` and checked against its generation), or a
//! hosted object's ([`Hosted`]: another transport's per-core work, such as
//! a vhost-user virtqueue, looked up in `hosted`). Connections are called
//! directly; hosted objects through one dynamic call per completion.

mod accept;

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use io_uring::{opcode, types};
use slab::Slab;
use tracing::{debug, info, warn};

use accept::ListenerState;

use super::conn::{Conn, ConnConfig, Env};
use super::limits::{Gauges, RateLimitedLog};
use super::listener::{Listener, SocketTuning, Transport};
use super::metrics::ConnSummary;
use super::registry::Registry;
use super::tls::TlsServer;
use crate::uring::{Completion, HostCx, Hosted, Kind, RemoteDone, RemoteSink, Ring, Token, Waker};
use crate::volume::{RemoteResult, Wake};

/// A message for a core.
pub enum CoreMsg {
    /// A connection accepted elsewhere, now this core's for life.
    Conn {
        /// The connected socket.
        fd: OwnedFd,
        /// What it arrived on.
        transport: Transport,
        /// Who is on the other end.
        peer: String,
    },
    /// Stop accepting, finish in-flight requests, close, exit.
    Stop,
    /// Reply with a summary of every connection on this core (`vbd status`).
    Snapshot(Sender<Vec<ConnSummary>>),
    /// Another transport's object to run on this core until it finishes.
    Host(Box<dyn Hosted<RemoteResult>>),
}

/// How other threads reach a core.
#[derive(Clone)]
pub struct CoreHandle {
    /// The core's message queue.
    pub tx: Sender<CoreMsg>,
    /// Wakes the core to read it.
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
    /// This core's number.
    pub index: usize,
    /// Messages for this core.
    pub rx: Receiver<CoreMsg>,
    /// Off-core completions for this core's requests.
    pub remote_rx: Receiver<RemoteDone<RemoteResult>>,
    /// Where backends send those completions.
    pub sink: RemoteSink<RemoteResult>,
    /// The eventfd that `rx` and `remote_rx` senders ring.
    pub waker: Arc<Waker>,
    /// Every core, this one included, for handing connections over.
    pub peers: Vec<CoreHandle>,
    /// Listeners this core accepts on.
    pub listeners: Vec<Listener>,
    /// The exports.
    pub registry: Arc<Registry>,
    /// Connection limits.
    pub conn: ConnConfig,
    /// Server-wide limits and counters.
    pub gauges: Arc<Gauges>,
    /// Socket buffer sizes for new connections.
    pub tuning: SocketTuning,
    /// Submission queue entries.
    pub ring_entries: u32,
    /// How long to spin for new completions before sleeping, after a round
    /// that served clients; zero sleeps at once.
    pub busy_poll: Duration,
    /// STARTTLS certificates and policy, if offered.
    pub tls: Option<Arc<TlsServer>>,
}

/// How often a spinning core offers its CPU to other runnable threads.
const YIELD_EVERY: Duration = Duration::from_micros(5);
/// A yield that kept the core away this long means another program wants
/// this CPU (a client taking its turn comes back in tens of µs; a
/// compiler's time slice is milliseconds).
const CONTENDED_YIELD: Duration = Duration::from_micros(200);
/// How long a core sleeps instead of spinning once its CPU is contended:
/// there, a spin mostly hands the CPU to someone else and the core waits
/// its turn to get it back, which measured 2.5x the p99 and 1.7x the CPU
/// per request of sleeping at once (QD1, load average 9 on 2 CPUs).
const CONTENDED_BACKOFF: Duration = Duration::from_millis(50);

/// A hosted object and what the core keeps about it.
struct HostedEntry {
    object: Box<dyn Hosted<RemoteResult>>,
    generation: u16,
    /// Already on the list for `end_round` this round.
    queued: bool,
}

/// One core's state. Field order matters: `ring` is dropped first, so the
/// boxed buffers below it (`tick`, `wake_buf`) and the hosted objects
/// outlive every operation that points at them.
struct Reactor {
    ring: Ring,
    index: usize,
    conns: Slab<Box<Conn>>,
    hosted: Slab<HostedEntry>,
    /// Hosted objects that had events this round.
    hosted_dirty: Vec<usize>,
    generation: u16,
    listeners: Vec<ListenerState>,
    rx: Receiver<CoreMsg>,
    remote_rx: Receiver<RemoteDone<RemoteResult>>,
    sink: RemoteSink<RemoteResult>,
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
    cqes: Vec<Completion>,
    /// Target of the eventfd read; boxed so its address is stable.
    wake_buf: Box<u64>,
    busy_poll: Duration,
    /// The last round handled client traffic, so more is likely soon.
    active: bool,
    /// Connections pumped in the last round.
    touched: Vec<usize>,
    /// No spinning before this: the CPU was found contended.
    spin_paused_until: Option<Instant>,
}

/// Runs a core until it is told to stop and its connections are closed.
pub fn run(setup: CoreSetup) -> std::io::Result<()> {
    let ring = Ring::for_core(setup.ring_entries)?;
    // Requests take their buffers from the core's pool and give them back.
    crate::volume::use_pool_on_this_thread();
    let mut r = Reactor {
        ring,
        index: setup.index,
        conns: Slab::new(),
        hosted: Slab::new(),
        hosted_dirty: Vec::new(),
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
        spin_paused_until: None,
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
            self.ring.enter(want)?;
            let mut cqes = std::mem::take(&mut self.cqes);
            self.ring.reap(&mut cqes);
            for c in &cqes {
                self.on_cqe(c);
            }
            cqes.clear();
            self.cqes = cqes;
            self.pump_dirty();
            self.pump_hosted();
            if self.stopping
                && self.conns.is_empty()
                && self.hosted.is_empty()
                && self.listeners.iter().all(|l| l.listener.is_none())
            {
                debug!(core = self.index, "reactor stopped");
                return Ok(());
            }
        }
    }

    /// Submits what is queued, then spins up to `busy_poll` for the kernel
    /// to post a completion or flag task work; returns whether it did.
    /// Sleeping and waking costs more than the gap between a client's
    /// requests, so while traffic flows the core stays awake; once it stops,
    /// the core sleeps after one window. It yields every few microseconds so a
    /// client sharing this CPU is not starved by the spin; a yield that
    /// comes back late says other programs want the CPU, and the core then
    /// sleeps at once for a while.
    fn poll_briefly(&mut self) -> std::io::Result<bool> {
        if self.spin_paused_until.is_some_and(|t| Instant::now() < t) {
            return Ok(false);
        }
        self.ring.enter(0)?;
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
                if self.ring.ready() {
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
                yielded = Instant::now();
                if yielded.duration_since(now) >= CONTENDED_YIELD {
                    self.spin_paused_until = Some(yielded + CONTENDED_BACKOFF);
                    return Ok(self.ring.ready());
                }
            }
        }
    }

    /// Queues connection `conn` to be pumped at the end of this round.
    fn mark(&mut self, conn: usize) {
        if let Some(c) = self.conns.get_mut(conn)
            && !c.queued
        {
            c.queued = true;
            self.dirty.push(conn);
        }
    }

    /// Connection `id` (if it still exists) and what its handlers borrow.
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

    /// Pumps every connection something happened to; removes finished ones.
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

    /// Hands a completion to its owner.
    fn on_cqe(&mut self, c: &Completion) {
        let Some(t) = Token::decode(c.user_data) else {
            warn!(
                core = self.index,
                ud = c.user_data,
                "completion with unknown user data"
            );
            return;
        };
        match t.kind {
            Kind::Wake => self.on_wake(c.result),
            Kind::Timer => self.on_timer(),
            Kind::Accept => self.on_accept(t.index, c.result, c.more()),
            Kind::Hosted => {
                self.active = true;
                if let Some((object, mut cx)) = self.hosted_cx(t.index, t.generation) {
                    object.on_cqe(t.slot, c, &mut cx);
                    self.mark_hosted(t.index);
                } else {
                    debug!(
                        core = self.index,
                        ?t,
                        "completion for a finished hosted object"
                    );
                }
            }
            Kind::Recv | Kind::Send | Kind::Cancel | Kind::Io => {
                self.active = true;
                let (conn, mut env) = self.env(t.index);
                let Some(conn) = conn.filter(|c| c.generation == t.generation) else {
                    debug!(core = self.index, ?t, "completion for a closed connection");
                    return;
                };
                match t.kind {
                    Kind::Recv => conn.on_recv(c.result),
                    Kind::Send => conn.on_send(c.result),
                    Kind::Cancel => conn.on_cancel(),
                    _ => conn.on_io(t.slot, Wake::Cqe(c.result), &mut env),
                }
                self.mark(t.index);
            }
        }
    }

    /// Queues the read of the core's eventfd.
    fn arm_wake(&mut self) -> std::io::Result<()> {
        let entry = opcode::Read::new(
            types::Fd(self.waker.raw_fd()),
            (&mut *self.wake_buf as *mut u64).cast(),
            8,
        )
        .build()
        .user_data(Token::encode(Kind::Wake, 0, 0, 0));
        // SAFETY: the read writes 8 bytes into the boxed `wake_buf`, which
        // nothing else touches and which is dropped after the ring (field
        // order); the eventfd is held open by `waker` just as long.
        unsafe { self.ring.push(&entry) }
    }

    /// The eventfd fired: take messages and off-core completions.
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
                CoreMsg::Snapshot(reply) => {
                    let summaries = self.conns.iter().map(|(_, c)| c.summary(self.index));
                    // The asker may have given up waiting: that is fine.
                    let _ = reply.send(summaries.collect());
                }
                CoreMsg::Host(object) => self.add_hosted(object),
            }
        }
        while let Ok(done) = self.remote_rx.try_recv() {
            let Some(t) = Token::decode(done.token) else {
                continue;
            };
            if t.kind == Kind::Hosted {
                if let Some((object, mut cx)) = self.hosted_cx(t.index, t.generation) {
                    object.on_remote(t.slot, done.result, &mut cx);
                    self.mark_hosted(t.index);
                }
                continue;
            }
            if t.kind != Kind::Io {
                continue;
            }
            let (conn, mut env) = self.env(t.index);
            if let Some(conn) = conn.filter(|c| c.generation == t.generation) {
                conn.on_io(t.slot, Wake::Remote(done.result), &mut env);
                self.mark(t.index);
            }
        }
    }

    /// Queues the next handshake-timeout sweep.
    fn arm_timer(&mut self) {
        let entry = opcode::Timeout::new(&*self.tick)
            .build()
            .user_data(Token::encode(Kind::Timer, 0, 0, 0));
        // SAFETY: the boxed `tick` is never changed and is dropped after
        // the ring (field order), so it outlives the timeout.
        if let Err(e) = unsafe { self.ring.push(&entry) } {
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

    /// Stops accepting and tells every connection to finish.
    fn stop(&mut self) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        self.stop_accepting();
        let ids: Vec<usize> = self.conns.iter().map(|(id, _)| id).collect();
        for id in ids {
            if let Some(c) = self.conns.get_mut(id) {
                c.stop();
            }
            self.mark(id);
        }
        let ids: Vec<(usize, u16)> = self
            .hosted
            .iter()
            .map(|(id, h)| (id, h.generation))
            .collect();
        for (id, generation) in ids {
            if let Some((object, mut cx)) = self.hosted_cx(id, generation) {
                object.stop(&mut cx);
            }
            self.mark_hosted(id);
        }
    }

    /// Takes a hosted object: it gets an index and generation of its own
    /// and queues its first operations.
    fn add_hosted(&mut self, object: Box<dyn Hosted<RemoteResult>>) {
        self.generation = self.generation.wrapping_add(1);
        let generation = self.generation;
        let id = self.hosted.insert(HostedEntry {
            object,
            generation,
            queued: false,
        });
        let stopping = self.stopping;
        if let Some((object, mut cx)) = self.hosted_cx(id, generation) {
            object.attach(&mut cx);
            if stopping {
                object.stop(&mut cx);
            }
        }
        self.mark_hosted(id);
    }

    /// Hosted object `id` if it is still of `generation`, with its view of
    /// the core.
    fn hosted_cx(
        &mut self,
        id: usize,
        generation: u16,
    ) -> Option<(&mut dyn Hosted<RemoteResult>, HostCx<'_, RemoteResult>)> {
        let entry = self
            .hosted
            .get_mut(id)
            .filter(|h| h.generation == generation)?;
        let cx = HostCx::new(&mut self.ring, &self.sink, self.index, id, generation);
        Some((&mut *entry.object, cx))
    }

    /// Queues hosted object `id` for `end_round`.
    fn mark_hosted(&mut self, id: usize) {
        if let Some(h) = self.hosted.get_mut(id)
            && !h.queued
        {
            h.queued = true;
            self.hosted_dirty.push(id);
        }
    }

    /// Ends the round for every hosted object that had events; drops the
    /// finished ones.
    fn pump_hosted(&mut self) {
        while let Some(id) = self.hosted_dirty.pop() {
            let Some(entry) = self.hosted.get_mut(id) else {
                continue;
            };
            entry.queued = false;
            let generation = entry.generation;
            if let Some((object, mut cx)) = self.hosted_cx(id, generation) {
                object.end_round(&mut cx);
                if object.finished() {
                    self.hosted.remove(id);
                    debug!(core = self.index, id, "hosted object finished");
                }
            }
        }
    }
}
