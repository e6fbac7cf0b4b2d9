//! Requests to the export's volume and replies back: a decoded request
//! takes a slot, runs on the volume (inline, on the ring, or off-core),
//! and its reply joins the send queue when it completes, in any order.

use std::task::Poll;

use tracing::{debug, info, warn};

use super::slots::{SlotState, Tail};
use super::{Conn, Env, Phase, Transmission};
use crate::error::Chain;
use crate::nbd::reply::{self, Header};
use crate::nbd::request::{self, Command, Decoder, MAX_DISCARDED_PAYLOAD, Request};
use crate::nbd::wire::{CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE};
use crate::nbd::{ErrorCode, Session};
use crate::server::metrics::Timer;
use crate::uring::{Kind, Token};
use crate::volume::{Ctx, IoFlags, Op, VolumeError, Wake};

impl Conn {
    /// The handshake chose `session`: attach to its export and open slots.
    pub(super) fn enter_transmission(&mut self, session: Session, env: &mut Env<'_>) {
        let Some(export) = env.registry.get(session.export.id) else {
            warn!(peer = %self.peer, export = %session.export.name, "export was removed during the handshake; disconnecting");
            self.hard_disconnect();
            return;
        };
        info!(peer = %self.peer, export = %export.name, mode = ?session.mode, "client attached");
        // A WRITE over the maximum block size is refused by `check` with
        // EINVAL; its payload is still read (and dropped) so the
        // connection stays usable.
        let decoder = Decoder::new(session.mode, MAX_DISCARDED_PAYLOAD);
        let n = env.cfg.max_inflight.clamp(1, u16::MAX as usize);
        self.slots.open(n);
        self.phase = Phase::Transmission(Box::new(Transmission {
            session,
            decoder,
            metrics: export.metrics.attach(env.core),
            export,
        }));
    }

    /// Takes a decoded request; returns false when input must stop.
    pub(super) fn on_request(&mut self, req: Request, env: &mut Env<'_>) -> bool {
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
        let Some(s) = self.slots.take() else {
            return false;
        };
        let slot = self.slots.get_mut(s);
        slot.timer = Timer::start(req.command);
        slot.cookie = req.cookie;
        slot.offset = req.offset;
        slot.filled = 0;
        slot.req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
        slot.command = checked.ok();
        slot.refusal = checked.err();
        if let Ok(cmd) = checked {
            let flags = IoFlags {
                fua: req.flags & CMD_FLAG_FUA != 0,
                no_hole: req.flags & CMD_FLAG_NO_HOLE != 0,
                fast_zero: req.flags & CMD_FLAG_FAST_ZERO != 0,
            };
            self.slots
                .prepare(s, op_of(cmd), req.offset, req.length, flags);
        }
        if req.payload > 0 {
            self.slots.get_mut(s).state = SlotState::Payload;
            self.slots.payload = Some(s);
        } else {
            self.run(s, env);
        }
        true
    }

    /// Starts a request whose input is complete, or answers its refusal.
    pub(super) fn run(&mut self, s: u16, env: &mut Env<'_>) {
        let Phase::Transmission(tx) = &self.phase else {
            return;
        };
        let slot = self.slots.get_mut(s);
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
            Poll::Pending => self.slots.inflight_io += 1,
        }
    }

    /// The volume finished (or advanced) the work queued for `slot`.
    pub fn on_io(&mut self, slot: u16, wake: Wake, env: &mut Env<'_>) {
        let Phase::Transmission(tx) = &self.phase else {
            return;
        };
        let Some(s) = self.slots.lookup(slot) else {
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
            self.slots.inflight_io -= 1;
            self.complete(slot, r);
        }
    }

    /// Builds the reply of a finished request and queues it.
    fn complete(&mut self, s: u16, result: Result<(), VolumeError>) {
        let Phase::Transmission(tx) = &self.phase else {
            return;
        };
        let mode = tx.session.mode;
        let context = tx.session.base_allocation.unwrap_or(0);
        let slot = self.slots.get_mut(s);
        match result {
            Err(e) => {
                let (code, message) = describe(&e);
                if code == ErrorCode::NotSup {
                    debug!(peer = %self.peer, "{}", Chain(&e));
                } else {
                    warn!(peer = %self.peer, export = %tx.export.name, "request failed: {}", Chain(&e));
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
                        slot.io.extents.iter().map(|e| reply::Extent {
                            len: e.len,
                            hole: e.hole,
                            zero: e.zero,
                        }),
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
        self.out.push_reply(s);
    }

    /// Queues an error reply for slot `s`.
    fn reply_error(&mut self, s: u16, code: ErrorCode, message: &'static str) {
        let Phase::Transmission(tx) = &self.phase else {
            return;
        };
        self.stats.errors += 1;
        let slot = self.slots.get_mut(s);
        tx.metrics.done(slot.timer, 0, false);
        let (header, message) =
            reply::error(tx.session.mode, slot.cookie, slot.offset, code, message);
        slot.header = header;
        slot.tail = Tail::Message(message);
        slot.state = SlotState::Replying;
        self.out.push_reply(s);
    }
}

// Volumes stop at MAX_EXTENTS, so a reply carries all they found.
const _: () = assert!(crate::volume::MAX_EXTENTS <= reply::MAX_DESCRIPTORS);

/// The volume operation of an accepted command.
fn op_of(cmd: Command) -> Op {
    match cmd {
        Command::Read => Op::Read,
        Command::Write => Op::Write,
        Command::Flush => Op::Flush,
        Command::Trim => Op::Trim,
        Command::Cache => Op::Cache,
        Command::WriteZeroes => Op::WriteZeroes,
        Command::BlockStatus | Command::Disc => Op::BlockStatus,
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
        // The storage's own failures (I/O errors and the like).
        _ => (
            ErrorCode::from_errno(e.errno()),
            "the volume's storage reported an error",
        ),
    }
}
