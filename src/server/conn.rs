//! One client connection on one core: the handshake, request decoding,
//! dispatch to the export's volume, and batched replies. Socket I/O goes
//! through the core's ring; event handlers only record what happened and
//! `pump` decides what to submit next, so replies completed together leave
//! in one `sendmsg`.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use io_uring::{IoUring, opcode, types};
use tracing::{debug, info, warn};

use super::limits::{CoreBytes, Gauges};
use super::metrics::{ExportHandle, Timer};
use super::registry::{Export, Registry};
use super::tls::ConnTls;
use super::token::{Kind, Token};
use crate::nbd::reply::{self, Header};
use crate::nbd::request::{self, Command, Decoder, Event, Refusal, Request};
use crate::nbd::wire::{CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE};
use crate::nbd::{ErrorCode, Handshake, HandshakeConfig, Progress, Session};
use crate::volume::ring::{RemoteSink, push_sqe};
use crate::volume::{Ctx, Io, IoFlags, Op, VolumeError, Wake};

/// Limits for connections, each and all together.
#[derive(Clone, Copy, Debug)]
pub struct ConnConfig {
    /// Requests in flight at once; more wait in the socket.
    pub max_inflight: usize,
    /// Bytes of request data held at once before reading stops.
    pub max_buffered: u64,
    /// Buffer capacity kept for reuse after requests finish.
    pub retain: u64,
    /// Receive buffer size.
    pub rbuf: usize,
    pub handshake: HandshakeConfig,
    /// A client still negotiating after this long is disconnected; zero
    /// means never.
    pub handshake_timeout: Duration,
    /// Open connections at once, over all listeners; more are closed at accept.
    pub max_connections: usize,
    /// Bytes of request data all connections together may hold.
    pub max_buffered_total: u64,
}

impl Default for ConnConfig {
    fn default() -> Self {
        ConnConfig {
            max_inflight: 512,
            max_buffered: 256 << 20,
            retain: 64 << 20,
            rbuf: 256 << 10,
            handshake: HandshakeConfig::default(),
            handshake_timeout: Duration::from_secs(10),
            max_connections: 1024,
            max_buffered_total: 1 << 30,
        }
    }
}

/// What a connection handler may use besides its own state.
pub struct Env<'a> {
    pub ring: &'a mut IoUring,
    pub sink: &'a RemoteSink,
    pub registry: &'a Registry,
    pub cfg: &'a ConnConfig,
    pub gauges: &'a Gauges,
    /// This core's index.
    pub core: usize,
    /// This connection's index on its core.
    pub id: usize,
}

/// Unread bytes beyond twice the latest batch that mean a backlog: room
/// for the kernel's per-buffer overhead on a batch or two.
const BACKLOG_SLACK: usize = 16 << 10;

/// Most iovecs in one sendmsg (IOV_MAX is 1024).
const MAX_IOV: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Free,
    /// Receiving a WRITE payload (or discarding one we refused).
    Payload,
    /// The volume is working on it.
    Running,
    /// Reply queued or being sent.
    Replying,
}

#[derive(Clone, Copy, Debug)]
enum Tail {
    None,
    Message(&'static str),
    /// The request buffer (read data).
    Data,
    /// The slot's encoded reply (block status).
    Aux,
}

struct Slot {
    io: Io,
    state: SlotState,
    cookie: u64,
    offset: u64,
    command: Option<Command>,
    req_one: bool,
    refusal: Option<Refusal>,
    /// Payload bytes received so far.
    filled: usize,
    header: Header,
    tail: Tail,
    aux: Vec<u8>,
    timer: Timer,
}

impl Slot {
    fn new() -> Self {
        Slot {
            io: Io::new(),
            state: SlotState::Free,
            cookie: 0,
            offset: 0,
            command: None,
            req_one: false,
            refusal: None,
            filled: 0,
            header: reply::ok(crate::nbd::ReplyMode::Simple, 0, 0),
            tail: Tail::None,
            aux: Vec::new(),
            timer: Timer::default(),
        }
    }

    fn parts(&self) -> [&[u8]; 2] {
        let tail: &[u8] = match self.tail {
            Tail::None => &[],
            Tail::Message(m) => m.as_bytes(),
            Tail::Data => self.io.buf.as_slice(),
            Tail::Aux => &self.aux,
        };
        [self.header.as_bytes(), tail]
    }

    fn reply_len(&self) -> usize {
        self.parts().iter().map(|p| p.len()).sum()
    }
}

struct Tx {
    session: Session,
    decoder: Decoder,
    export: Arc<Export>,
    metrics: ExportHandle,
}

enum Phase {
    Handshake(Handshake),
    Transmission(Box<Tx>),
}

/// Counters reported when the connection closes.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnStats {
    pub requests: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
}

/// A client connection.
pub struct Conn {
    fd: OwnedFd,
    pub generation: u16,
    pub peer: String,
    /// Already on the core's list of connections to pump this round.
    pub queued: bool,
    phase: Phase,
    rbuf: Box<[u8]>,
    rstart: usize,
    rend: usize,
    recv_pending: bool,
    send_pending: bool,
    cancel_pending: bool,
    /// No more input will be read (EOF, DISC, abort, error or shutdown).
    stop_reading: bool,
    /// The connection is being torn down; unsent replies are dropped.
    broken: bool,
    hs_out: Vec<u8>,
    hs_sent: usize,
    /// Bytes handed to the last sendmsg, to tell a new batch from a backlog.
    last_send: usize,
    /// TLS offered, or running: then socket bytes go through it.
    tls: ConnTls,
    outq: VecDeque<u16>,
    /// Bytes of the head of `outq` already sent.
    out_sent: usize,
    iov: Vec<libc::iovec>,
    msg: libc::msghdr,
    slots: Vec<Slot>,
    free: Vec<u16>,
    payload_slot: Option<u16>,
    inflight_io: usize,
    buffered: u64,
    /// This core's share of the global buffered-bytes gauge.
    gauge: Arc<CoreBytes>,
    /// Input is paused by a buffering limit (logged once per pause).
    throttled: bool,
    accepted: Instant,
    retained: u64,
    retain: u64,
    pub stats: ConnStats,
}

impl Conn {
    /// A new connection; the greeting is queued for the first `pump`.
    pub fn new(
        fd: OwnedFd,
        peer: String,
        generation: u16,
        cfg: &ConnConfig,
        gauge: Arc<CoreBytes>,
        (tls, tls_mode): (ConnTls, crate::nbd::TlsMode),
    ) -> Box<Self> {
        let mut hs_out = Vec::new();
        let hs = Handshake::new(
            HandshakeConfig {
                tls: tls_mode,
                ..cfg.handshake
            },
            &mut hs_out,
        );
        // SAFETY: an all-zero msghdr is a valid empty message.
        let msg: libc::msghdr = unsafe { std::mem::zeroed() };
        Box::new(Conn {
            fd,
            generation,
            peer,
            queued: false,
            phase: Phase::Handshake(hs),
            rbuf: vec![0u8; cfg.rbuf].into_boxed_slice(),
            rstart: 0,
            rend: 0,
            recv_pending: false,
            send_pending: false,
            cancel_pending: false,
            stop_reading: false,
            broken: false,
            hs_out,
            hs_sent: 0,
            last_send: 0,
            tls,
            outq: VecDeque::new(),
            out_sent: 0,
            iov: Vec::with_capacity(MAX_IOV),
            msg,
            slots: Vec::new(),
            free: Vec::new(),
            payload_slot: None,
            inflight_io: 0,
            buffered: 0,
            gauge,
            throttled: false,
            accepted: Instant::now(),
            retained: 0,
            retain: cfg.retain,
            stats: ConnStats::default(),
        })
    }

    /// The export this connection is attached to, once in transmission.
    pub fn export_name(&self) -> Option<&str> {
        match &self.phase {
            Phase::Transmission(tx) => Some(&tx.export.name),
            Phase::Handshake(_) => None,
        }
    }

    /// Whether every submitted operation has completed and nothing is left to do.
    pub fn finished(&self) -> bool {
        self.stop_reading
            && !self.recv_pending
            && !self.send_pending
            && !self.cancel_pending
            && self.inflight_io == 0
            && (self.broken
                || (self.outq.is_empty() && self.hs_sent >= self.hs_out.len() && self.tls.idle()))
    }

    /// Disconnects a client still negotiating `limit` after it connected;
    /// returns whether it did.
    pub fn expire_handshake(&mut self, now: Instant, limit: Duration) -> bool {
        if !matches!(self.phase, Phase::Handshake(_))
            || self.broken
            || now.duration_since(self.accepted) < limit
        {
            return false;
        }
        warn!(peer = %self.peer, timeout_s = limit.as_secs_f64(), "handshake not finished in time (--handshake-timeout); disconnecting");
        self.hard_disconnect();
        true
    }

    /// Whether the client has yet to read more than our latest batch of
    /// replies: then it is busy, its next requests come when it gets to
    /// them, and there is no point spinning for them. On a Unix socket
    /// SIOCOUTQ counts what the peer has not read yet (with ~768 bytes of
    /// buffer overhead per batch); on TCP it counts only what is not yet
    /// acknowledged, which on a live link is little, so TCP always looks idle.
    pub fn peer_backlogged(&self) -> bool {
        if !matches!(self.phase, Phase::Transmission(_)) || self.broken {
            return false;
        }
        let mut unread: libc::c_int = 0;
        // SAFETY: SIOCOUTQ writes one int through the pointer.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TIOCOUTQ, &mut unread) };
        r == 0 && unread as usize > 2 * self.last_send + BACKLOG_SLACK
    }

    /// Stops reading new requests; in-flight ones finish and are answered.
    pub fn stop(&mut self) {
        self.stop_reading = true;
    }

    /// Ends the connection at once: the peer gets no more replies.
    fn hard_disconnect(&mut self) {
        self.stop_reading = true;
        self.broken = true;
        // Completes any pending recv and send immediately.
        // SAFETY: shutdown on a descriptor we own.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
    }

    /// A recv completed with `res`.
    pub fn on_recv(&mut self, res: i32) {
        self.recv_pending = false;
        if res > 0 {
            match &mut self.tls {
                ConnTls::On(t) => t.received(res as usize),
                _ => self.rend += res as usize,
            }
        } else if res == 0 {
            self.stop_reading = true;
        } else if res != -libc::ECANCELED {
            debug!(peer = %self.peer, error = %std::io::Error::from_raw_os_error(-res), "recv failed");
            self.hard_disconnect();
        }
    }

    /// A cancel completed.
    pub fn on_cancel(&mut self) {
        self.cancel_pending = false;
    }

    /// A sendmsg completed with `res`.
    pub fn on_send(&mut self, res: i32) {
        self.send_pending = false;
        if res < 0 {
            if !self.broken {
                debug!(peer = %self.peer, error = %std::io::Error::from_raw_os_error(-res), "send failed");
            }
            self.hard_disconnect();
            return;
        }
        if let ConnTls::On(t) = &mut self.tls
            && t.take_send()
        {
            t.sent(res as usize);
            return;
        }
        self.account_sent(res as usize);
    }

    /// `n` bytes of the handshake output or the queued replies are on their
    /// way; finished replies free their slots.
    fn account_sent(&mut self, mut n: usize) {
        if self.hs_sent < self.hs_out.len() {
            self.hs_sent += n;
            if self.hs_sent >= self.hs_out.len() {
                self.hs_out = Vec::new();
                self.hs_sent = 0;
            }
            return;
        }
        n += self.out_sent;
        while let Some(&s) = self.outq.front() {
            let len = self.slots[s as usize].reply_len();
            if n < len {
                break;
            }
            n -= len;
            self.outq.pop_front();
            self.release(s);
        }
        self.out_sent = n;
    }

    /// The volume finished (or advanced) the work queued for `slot`.
    pub fn on_io(&mut self, slot: u16, wake: Wake, env: &mut Env<'_>) {
        let Phase::Transmission(tx) = &self.phase else {
            return;
        };
        let Some(s) = self.slots.get_mut(slot as usize) else {
            return;
        };
        if s.state != SlotState::Running {
            warn!(peer = %self.peer, slot, "completion for an idle request slot ignored");
            return;
        }
        let token = Token::encode(Kind::Io, env.id, slot, self.generation);
        let poll =
            tx.export
                .volume
                .resume(&mut s.io, wake, &mut Ctx::new(env.ring, token, env.sink));
        if let Poll::Ready(r) = poll {
            self.inflight_io -= 1;
            self.complete(slot, r);
        }
    }

    /// Parses buffered input, then submits whatever sends, receives or
    /// cancels the connection now needs.
    pub fn pump(&mut self, env: &mut Env<'_>) {
        if !self.broken {
            if matches!(self.tls, ConnTls::On(_)) {
                self.tls_input(env);
            } else {
                self.process_input(env);
            }
        }
        self.submit_send(env);
        self.submit_recv(env);
        if self.stop_reading && self.recv_pending && !self.cancel_pending {
            let target = Token::encode(Kind::Recv, env.id, 0, self.generation);
            let entry = opcode::AsyncCancel::new(target)
                .build()
                .user_data(Token::encode(Kind::Cancel, env.id, 0, self.generation));
            if push_sqe(env.ring, entry).is_ok() {
                self.cancel_pending = true;
            }
        }
    }

    fn process_input(&mut self, env: &mut Env<'_>) {
        loop {
            let input = &self.rbuf[self.rstart..self.rend];
            match &mut self.phase {
                Phase::Handshake(hs) => {
                    if input.is_empty() || self.stop_reading {
                        return;
                    }
                    match hs.feed(input, env.registry, &mut self.hs_out) {
                        Err(e) => {
                            env.gauges.note_handshake_failure();
                            warn!(peer = %self.peer, "handshake failed: {e}; disconnecting");
                            self.hard_disconnect();
                            return;
                        }
                        Ok((n, progress)) => {
                            self.rstart += n;
                            match progress {
                                Progress::NeedMore => return,
                                Progress::Close => {
                                    debug!(peer = %self.peer, "client aborted the handshake");
                                    self.stop_reading = true;
                                    return;
                                }
                                Progress::Transmission(session) => {
                                    self.enter_transmission(session, env)
                                }
                                Progress::StartTls => {
                                    self.start_tls();
                                    return;
                                }
                            }
                        }
                    }
                }
                Phase::Transmission(tx) => {
                    if self.broken {
                        return;
                    }
                    if tx.decoder.at_boundary() {
                        // Requests already received are served even when
                        // stopping; a DISC ends the input for good.
                        if self.free.is_empty()
                            || !may_buffer(&mut self.throttled, self.buffered, &self.peer, env)
                        {
                            return;
                        }
                    }
                    let (n, event) = match tx.decoder.next(input) {
                        Ok(v) => v,
                        Err(e) => {
                            warn!(peer = %self.peer, "protocol violation: {e}; disconnecting");
                            self.hard_disconnect();
                            return;
                        }
                    };
                    match event {
                        None => return,
                        Some(Event::Request(req)) => {
                            self.rstart += n;
                            if !self.on_request(req, env) {
                                return;
                            }
                        }
                        Some(Event::Payload { data, last }) => {
                            if let Some(s) = self.payload_slot {
                                let slot = &mut self.slots[s as usize];
                                if slot.refusal.is_none() {
                                    slot.io.buf.as_mut_slice()[slot.filled..slot.filled + n]
                                        .copy_from_slice(data);
                                }
                                slot.filled += n;
                                self.rstart += n;
                                if last {
                                    self.payload_slot = None;
                                    self.stats.bytes_written += slot.filled as u64;
                                    self.run(s, env);
                                }
                            } else {
                                self.rstart += n;
                            }
                        }
                    }
                }
            }
        }
    }

    /// STARTTLS was acknowledged: what follows the option is ciphertext.
    fn start_tls(&mut self) {
        // Input is parsed as soon as it lands, so no receive is in flight
        // into `rbuf` here; if one were, its bytes would bypass TLS.
        let r = if self.recv_pending {
            Err("a receive was in flight".to_string())
        } else {
            let early = &self.rbuf[self.rstart..self.rend];
            self.tls.start(early).map_err(|e| e.to_string())
        };
        match r {
            Ok(()) => {
                debug!(peer = %self.peer, "STARTTLS: TLS handshake starts");
                self.rstart = 0;
                self.rend = 0;
            }
            Err(e) => {
                warn!(peer = %self.peer, "cannot start TLS: {e}; disconnecting");
                self.hard_disconnect();
            }
        }
    }

    /// Decrypts what TLS received into `rbuf` and parses it, until neither
    /// makes progress.
    fn tls_input(&mut self, env: &mut Env<'_>) {
        loop {
            let ConnTls::On(t) = &mut self.tls else {
                return;
            };
            if t.raw_prefix(self.hs_sent < self.hs_out.len()) {
                return;
            }
            compact(&mut self.rbuf, &mut self.rstart, &mut self.rend);
            let done = match t.decrypt(&mut self.rbuf[self.rend..], &self.peer) {
                Ok(d) => d,
                Err(e) => {
                    warn!(peer = %self.peer, "TLS failed: {e}; disconnecting");
                    self.stop_reading = true;
                    return;
                }
            };
            self.rend += done.bytes;
            if done.closed {
                debug!(peer = %self.peer, "client closed TLS");
                self.stop_reading = true;
            }
            let before = self.rstart;
            self.process_input(env);
            if done.bytes == 0 && self.rstart == before {
                return;
            }
        }
    }

    fn enter_transmission(&mut self, session: Session, env: &mut Env<'_>) {
        let Some(export) = env.registry.get(session.export.id) else {
            warn!(peer = %self.peer, export = %session.export.name, "export was removed during the handshake; disconnecting");
            self.hard_disconnect();
            return;
        };
        info!(peer = %self.peer, export = %export.name, mode = ?session.mode, "client attached");
        let max_payload = u64::from(session.export.block.maximum);
        let decoder = Decoder::new(session.mode, max_payload);
        let n = env.cfg.max_inflight.clamp(1, u16::MAX as usize);
        self.slots = (0..n).map(|_| Slot::new()).collect();
        self.free = (0..n as u16).rev().collect();
        self.phase = Phase::Transmission(Box::new(Tx {
            session,
            decoder,
            metrics: export.metrics.attach(env.core),
            export,
        }));
    }

    /// Takes a decoded request; returns false when input must stop.
    fn on_request(&mut self, req: Request, env: &mut Env<'_>) -> bool {
        let Phase::Transmission(tx) = &self.phase else {
            return false;
        };
        self.stats.requests += 1;
        let checked = request::check(&req, &tx.session);
        if checked == Ok(Command::Disc) {
            debug!(peer = %self.peer, "client sent NBD_CMD_DISC");
            self.stop_reading = true;
            return false;
        }
        let Some(s) = self.free.pop() else {
            return false;
        };
        let slot = &mut self.slots[s as usize];
        slot.timer = Timer::start(req.command);
        slot.cookie = req.cookie;
        slot.offset = req.offset;
        slot.filled = 0;
        slot.req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
        slot.command = checked.ok();
        slot.refusal = checked.err();
        if let Ok(cmd) = checked {
            let op = match cmd {
                Command::Read => Op::Read,
                Command::Write => Op::Write,
                Command::Flush => Op::Flush,
                Command::Trim => Op::Trim,
                Command::Cache => Op::Cache,
                Command::WriteZeroes => Op::WriteZeroes,
                Command::BlockStatus | Command::Disc => Op::BlockStatus,
            };
            let flags = IoFlags {
                fua: req.flags & CMD_FLAG_FUA != 0,
                no_hole: req.flags & CMD_FLAG_NO_HOLE != 0,
                fast_zero: req.flags & CMD_FLAG_FAST_ZERO != 0,
            };
            let before = slot.io.buf.capacity() as u64;
            slot.io.prepare(op, req.offset, req.length, flags);
            self.retained += (slot.io.buf.capacity() as u64).saturating_sub(before);
            self.buffered += slot.io.buf.len() as u64;
            self.gauge.add(slot.io.buf.len() as u64);
        }
        if req.payload > 0 {
            slot.state = SlotState::Payload;
            self.payload_slot = Some(s);
        } else {
            self.run(s, env);
        }
        true
    }

    /// Starts a request whose input is complete, or answers its refusal.
    fn run(&mut self, s: u16, env: &mut Env<'_>) {
        let Phase::Transmission(tx) = &self.phase else {
            return;
        };
        let slot = &mut self.slots[s as usize];
        if let Some(refusal) = slot.refusal {
            debug!(peer = %self.peer, code = ?refusal.code, "request refused: {}", refusal.message);
            self.reply_error(s, refusal.code, refusal.message);
            return;
        }
        slot.state = SlotState::Running;
        let token = Token::encode(Kind::Io, env.id, s, self.generation);
        match tx
            .export
            .volume
            .start(&mut slot.io, &mut Ctx::new(env.ring, token, env.sink))
        {
            Poll::Ready(r) => self.complete(s, r),
            Poll::Pending => self.inflight_io += 1,
        }
    }

    fn complete(&mut self, s: u16, result: Result<(), VolumeError>) {
        let Phase::Transmission(tx) = &self.phase else {
            return;
        };
        let mode = tx.session.mode;
        let context = tx.session.base_allocation.unwrap_or(0);
        let slot = &mut self.slots[s as usize];
        match result {
            Err(e) => {
                let (code, message) = describe(&e);
                if code == ErrorCode::NotSup {
                    debug!(peer = %self.peer, "{e}");
                } else {
                    warn!(peer = %self.peer, export = %tx.export.name, "request failed: {e}");
                }
                self.reply_error(s, code, message);
                return;
            }
            Ok(()) => match slot.command {
                Some(Command::Read) => {
                    slot.header = reply::read_data(mode, slot.cookie, slot.offset, slot.io.len);
                    slot.tail = Tail::Data;
                    self.stats.bytes_read += slot.io.len;
                }
                Some(Command::BlockStatus) => {
                    slot.aux.clear();
                    reply::block_status(
                        mode,
                        slot.cookie,
                        slot.offset,
                        slot.io.len,
                        slot.req_one,
                        context,
                        &slot.io.extents,
                        &mut slot.aux,
                    );
                    slot.header = Header::default();
                    slot.tail = Tail::Aux;
                }
                _ => {
                    slot.header = reply::ok(mode, slot.cookie, slot.offset);
                    slot.tail = Tail::None;
                }
            },
        }
        tx.metrics.done(slot.timer, slot.io.len, true);
        slot.state = SlotState::Replying;
        self.outq.push_back(s);
    }

    fn reply_error(&mut self, s: u16, code: ErrorCode, message: &'static str) {
        let Phase::Transmission(tx) = &self.phase else {
            return;
        };
        self.stats.errors += 1;
        let slot = &mut self.slots[s as usize];
        tx.metrics.done(slot.timer, 0, false);
        let (header, message) =
            reply::error(tx.session.mode, slot.cookie, slot.offset, code, message);
        slot.header = header;
        slot.tail = Tail::Message(message);
        slot.state = SlotState::Replying;
        self.outq.push_back(s);
    }

    fn release(&mut self, s: u16) {
        let slot = &mut self.slots[s as usize];
        let held = (slot.io.buf.len() as u64).min(self.buffered);
        self.buffered -= held;
        self.gauge.sub(held);
        if self.retained > self.retain {
            // Over budget: let this buffer go rather than pin memory.
            self.retained = self.retained.saturating_sub(slot.io.buf.capacity() as u64);
            slot.io.buf.shrink_above(0);
        }
        slot.state = SlotState::Free;
        slot.tail = Tail::None;
        self.free.push(s);
    }

    fn submit_send(&mut self, env: &mut Env<'_>) {
        if self.send_pending || self.broken {
            return;
        }
        self.iov.clear();
        if self.hs_sent < self.hs_out.len() {
            let rest = &self.hs_out[self.hs_sent..];
            self.iov.push(libc::iovec {
                iov_base: rest.as_ptr() as *mut _,
                iov_len: rest.len(),
            });
        } else {
            let mut skip = self.out_sent;
            for &s in &self.outq {
                if self.iov.len() + 2 > MAX_IOV {
                    break;
                }
                for part in self.slots[s as usize].parts() {
                    if skip >= part.len() {
                        skip -= part.len();
                        continue;
                    }
                    let part = &part[skip..];
                    skip = 0;
                    self.iov.push(libc::iovec {
                        iov_base: part.as_ptr() as *mut _,
                        iov_len: part.len(),
                    });
                }
            }
        }
        if let ConnTls::On(t) = &mut self.tls
            && !t.raw_prefix(self.hs_sent < self.hs_out.len())
        {
            self.tls_encrypt();
        }
        if self.iov.is_empty() {
            return;
        }
        self.msg.msg_iov = self.iov.as_mut_ptr();
        self.msg.msg_iovlen = self.iov.len();
        self.last_send = self.iov.iter().map(|v| v.iov_len).sum();
        let entry = opcode::SendMsg::new(types::Fd(self.fd.as_raw_fd()), &self.msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(Token::encode(Kind::Send, env.id, 0, self.generation));
        match push_sqe(env.ring, entry) {
            Ok(()) => {
                self.send_pending = true;
                if let ConnTls::On(t) = &mut self.tls
                    && !t.raw_prefix(self.hs_sent < self.hs_out.len())
                {
                    t.start_send();
                }
            }
            Err(e) => {
                warn!(peer = %self.peer, "cannot queue a send: {e}; disconnecting");
                self.hard_disconnect();
            }
        }
    }

    /// Encrypts the plaintext `submit_send` gathered into `iov` and puts
    /// the ciphertext to send there instead.
    fn tls_encrypt(&mut self) {
        let ConnTls::On(t) = &mut self.tls else {
            return;
        };
        // SAFETY: `iov` was just filled from live slices of `hs_out` and
        // the queued replies, which nothing has changed since.
        let parts = self
            .iov
            .iter()
            .map(|v| unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) });
        let had_plaintext = !self.iov.is_empty();
        let taken = t.encrypt(parts);
        // TLS failed, or replies came after close_notify: they cannot go out.
        let stuck = t.failed() || (t.closing() && had_plaintext && taken == 0);
        self.account_sent(taken);
        let ConnTls::On(t) = &mut self.tls else {
            return;
        };
        if self.stop_reading
            && self.inflight_io == 0
            && self.outq.is_empty()
            && self.hs_sent >= self.hs_out.len()
        {
            t.close();
        }
        let wire = t.wire();
        self.iov.clear();
        if !wire.is_empty() {
            self.iov.push(libc::iovec {
                iov_base: wire.as_ptr() as *mut _,
                iov_len: wire.len(),
            });
        } else if stuck {
            // What TLS had to say (an alert) is out: end the connection.
            self.hard_disconnect();
        }
    }

    fn submit_recv(&mut self, env: &mut Env<'_>) {
        if self.recv_pending || self.stop_reading || self.broken {
            return;
        }
        let (ptr, space) = match &mut self.tls {
            ConnTls::On(t) => t.recv_space(),
            _ => {
                compact(&mut self.rbuf, &mut self.rstart, &mut self.rend);
                (
                    self.rbuf[self.rend..].as_mut_ptr(),
                    self.rbuf.len() - self.rend,
                )
            }
        };
        if space == 0 {
            // Full of requests waiting for free slots; reading resumes as they finish.
            return;
        }
        let entry = opcode::Recv::new(types::Fd(self.fd.as_raw_fd()), ptr, space as u32)
            .build()
            .user_data(Token::encode(Kind::Recv, env.id, 0, self.generation));
        match push_sqe(env.ring, entry) {
            Ok(()) => self.recv_pending = true,
            Err(e) => {
                warn!(peer = %self.peer, "cannot queue a receive: {e}; disconnecting");
                self.hard_disconnect();
            }
        }
    }
}

/// Makes room at the end of the receive buffer: resets it when empty, or
/// moves the unparsed tail to the front once little room is left.
fn compact(rbuf: &mut [u8], rstart: &mut usize, rend: &mut usize) {
    if *rstart == *rend {
        *rstart = 0;
        *rend = 0;
    } else if *rstart > 0 && rbuf.len() - *rend < rbuf.len() / 4 {
        rbuf.copy_within(*rstart..*rend, 0);
        *rend -= *rstart;
        *rstart = 0;
    }
}

/// Whether another request's data may be taken in. A connection holding
/// nothing may always take one, so a well-behaved client keeps moving
/// however much hostile ones hold.
fn may_buffer(throttled: &mut bool, buffered: u64, peer: &str, env: &Env<'_>) -> bool {
    let over = if buffered >= env.cfg.max_buffered {
        Some("per-connection (--max-buffered)")
    } else if buffered > 0 && !env.gauges.may_buffer(env.core) {
        Some("global (--max-buffered-total)")
    } else {
        None
    };
    match over {
        None => {
            *throttled = false;
            true
        }
        Some(which) => {
            if !*throttled {
                *throttled = true;
                env.gauges.note_pause(buffered < env.cfg.max_buffered);
                info!(peer = %peer, held = buffered, "{which} buffer limit reached; pausing this client's input until its replies drain");
            }
            false
        }
    }
}

impl Drop for Conn {
    /// Gives back what a torn-down connection still held (unsent replies).
    fn drop(&mut self) {
        self.gauge.sub(self.buffered);
    }
}

/// The NBD error for a volume error, with a message for the client's user.
fn describe(e: &VolumeError) -> (ErrorCode, &'static str) {
    match e {
        VolumeError::NoSpace => (ErrorCode::NoSpc, "no space left in the volume's storage"),
        VolumeError::NotSupported => (ErrorCode::NotSup, "zeroing this range would not be fast"),
        VolumeError::ReadOnly => (ErrorCode::Perm, "export is read-only"),
        VolumeError::OutOfRange { .. } => (
            ErrorCode::Inval,
            "request extends beyond the end of the export",
        ),
        VolumeError::Unaligned { .. } => (
            ErrorCode::Inval,
            "request is not aligned to the export's block size",
        ),
        VolumeError::Shutdown => (ErrorCode::Shutdown, "server is shutting down"),
        VolumeError::Os { .. } | VolumeError::Backend(_) => (
            ErrorCode::from_errno(e.errno()),
            "the volume's storage reported an error",
        ),
    }
}
