//! One client connection on one core: the handshake, request decoding,
//! dispatch to the export's volume, and batched replies. Socket I/O goes
//! through the core's ring; event handlers only record what happened and
//! `pump` decides what to submit next, so replies completed together leave
//! in one `sendmsg`.
//!
//! The rooms: `recv` (the receive buffer and ring receives), `send` (the
//! reply queue, its iovecs and sendmsg), `slots` (requests in flight and the
//! bytes they hold), `input` (decoding the handshake and requests),
//! `dispatch` (requests to the volume, replies back) and `tls` (the
//! connection's side of STARTTLS).

mod config;
mod dispatch;
mod input;
mod recv;
mod send;
mod slots;
#[cfg(test)]
mod tests;
mod tls;

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::warn;

pub use config::{ConnConfig, Env};
use recv::RecvBuf;
use send::SendQueue;
use slots::Slots;

use super::limits::CoreBytes;
use super::metrics::{ConnSummary, ExportHandle};
use super::registry::Export;
use super::tls::ConnTls;
use crate::nbd::request::Decoder;
use crate::nbd::{Handshake, HandshakeConfig, Session, TlsMode};

/// Unread bytes beyond twice the latest batch that mean a backlog: room
/// for the kernel's per-buffer overhead on a batch or two.
const BACKLOG_SLACK: usize = 16 << 10;

/// A connection attached to an export.
struct Transmission {
    session: Session,
    decoder: Decoder,
    export: Arc<Export>,
    metrics: ExportHandle,
}

enum Phase {
    Handshake(Handshake),
    Transmission(Box<Transmission>),
}

/// Counters reported when the connection closes.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnStats {
    /// Requests decoded.
    pub requests: u64,
    /// Bytes of read data answered.
    pub bytes_read: u64,
    /// Bytes of write payload received.
    pub bytes_written: u64,
    /// Requests answered with an error.
    pub errors: u64,
}

/// A client connection.
pub struct Conn {
    fd: OwnedFd,
    /// Tells this connection's completions from a previous one's at the
    /// same index.
    pub generation: u16,
    /// Who is on the other end, for logs.
    pub peer: String,
    /// Already on the core's list of connections to pump this round.
    pub queued: bool,
    phase: Phase,
    rbuf: RecvBuf,
    out: SendQueue,
    slots: Slots,
    cancel_pending: bool,
    /// No more input will be read (EOF, DISC, abort, error or shutdown).
    stop_reading: bool,
    /// The connection is being torn down; unsent replies are dropped.
    broken: bool,
    /// TLS offered, or running: then socket bytes go through it.
    tls: ConnTls,
    accepted: Instant,
    /// What the connection has done so far.
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
        (tls, tls_mode): (ConnTls, TlsMode),
    ) -> Box<Self> {
        let mut greeting = Vec::new();
        let hs = Handshake::new(
            HandshakeConfig {
                tls: tls_mode,
                ..cfg.handshake
            },
            &mut greeting,
        );
        Box::new(Conn {
            fd,
            generation,
            peer,
            queued: false,
            phase: Phase::Handshake(hs),
            rbuf: RecvBuf::new(cfg.rbuf),
            out: SendQueue::new(greeting),
            slots: Slots::new(gauge),
            cancel_pending: false,
            stop_reading: false,
            broken: false,
            tls,
            accepted: Instant::now(),
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

    /// What this connection on `core` has done so far, for `vbd status`.
    pub fn summary(&self, core: usize) -> ConnSummary {
        ConnSummary {
            core,
            peer: self.peer.clone(),
            export: self.export_name().map(String::from),
            requests: self.stats.requests,
            errors: self.stats.errors,
            bytes_read: self.stats.bytes_read,
            bytes_written: self.stats.bytes_written,
        }
    }

    /// Whether every submitted operation has completed and nothing is left to do.
    pub fn finished(&self) -> bool {
        self.stop_reading
            && !self.rbuf.pending
            && !self.out.pending
            && !self.cancel_pending
            && self.slots.inflight_io == 0
            && (self.broken || (self.out.is_empty() && self.tls.idle()))
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
        r == 0 && unread as usize > 2 * self.out.last_send + BACKLOG_SLACK
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
        self.cancel_recv(env);
    }
}
