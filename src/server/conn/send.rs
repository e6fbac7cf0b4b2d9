//! The send side: the handshake's output, then the queue of finished
//! replies, gathered into one `sendmsg` of up to [`MAX_IOV`] iovecs.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;

use io_uring::{opcode, types};
use tracing::{debug, warn};

use super::slots::Slots;
use super::{Conn, Env};
use crate::server::tls::ConnTls;
use crate::uring::{Kind, Token};

/// Most iovecs in one sendmsg (IOV_MAX is 1024).
pub(super) const MAX_IOV: usize = 1024;

/// What is waiting to be sent, and the iovecs and message of the send in
/// flight (the kernel reads them, so they live here, not on a stack).
pub(super) struct SendQueue {
    /// Handshake output; `hs[hs_sent..]` is unsent.
    hs: Vec<u8>,
    hs_sent: usize,
    /// Slots whose replies are queued, in sending order.
    replies: VecDeque<u16>,
    /// Bytes of the head of `replies` already sent.
    reply_sent: usize,
    iov: Vec<libc::iovec>,
    msg: libc::msghdr,
    /// Bytes handed to the last sendmsg, to tell a new batch from a backlog.
    pub(super) last_send: usize,
    /// A sendmsg is in flight.
    pub(super) pending: bool,
}

impl SendQueue {
    /// An empty queue whose handshake output is `hs` (the greeting).
    pub(super) fn new(hs: Vec<u8>) -> Self {
        // SAFETY: an all-zero msghdr is a valid empty message.
        let msg: libc::msghdr = unsafe { std::mem::zeroed() };
        SendQueue {
            hs,
            hs_sent: 0,
            replies: VecDeque::new(),
            reply_sent: 0,
            // Grows to what the largest batch needed (`gather` fills it
            // before a send, never during one): idle connections keep little.
            iov: Vec::new(),
            msg,
            last_send: 0,
            pending: false,
        }
    }

    /// Where the handshake appends its replies. Never while
    /// [`Self::sending_handshake`]: growing the buffer may move it.
    pub(super) fn handshake_out(&mut self) -> &mut Vec<u8> {
        debug_assert!(!self.sending_handshake());
        &mut self.hs
    }

    /// Whether the send in flight reads from the handshake output (in TLS,
    /// the output is encrypted and counted as sent before its send starts).
    pub(super) fn sending_handshake(&self) -> bool {
        self.pending && self.handshake_unsent()
    }

    /// Whether handshake output is still unsent.
    pub(super) fn handshake_unsent(&self) -> bool {
        self.hs_sent < self.hs.len()
    }

    /// Whether nothing at all is waiting to be sent.
    pub(super) fn is_empty(&self) -> bool {
        self.replies.is_empty() && !self.handshake_unsent()
    }

    /// Queues slot `s`'s reply behind the others.
    pub(super) fn push_reply(&mut self, s: u16) {
        self.replies.push_back(s);
    }

    /// Fills the iovecs with what is unsent: the handshake output, or as
    /// many queued replies as fit.
    pub(super) fn gather(&mut self, slots: &Slots) {
        self.iov.clear();
        if self.handshake_unsent() {
            let rest = &self.hs[self.hs_sent..];
            self.iov.push(libc::iovec {
                iov_base: rest.as_ptr() as *mut _,
                iov_len: rest.len(),
            });
            return;
        }
        let mut skip = self.reply_sent;
        for &s in &self.replies {
            if self.iov.len() + 2 > MAX_IOV {
                break;
            }
            for part in slots.get(s).parts() {
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

    /// The bytes the iovecs point to, in order.
    pub(super) fn gathered(&self) -> impl Iterator<Item = &[u8]> {
        self.iov.iter().map(|v| {
            // SAFETY: `gather` filled `iov` from live slices of `hs` and of
            // queued replies, which cannot change while `self` is borrowed.
            unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) }
        })
    }

    /// Whether the iovecs are empty.
    pub(super) fn nothing_gathered(&self) -> bool {
        self.iov.is_empty()
    }

    /// Replaces the iovecs with one for `wire` (TLS ciphertext), or none.
    pub(super) fn gather_only(&mut self, wire: &[u8]) {
        self.iov.clear();
        if !wire.is_empty() {
            self.iov.push(libc::iovec {
                iov_base: wire.as_ptr() as *mut _,
                iov_len: wire.len(),
            });
        }
    }

    /// `n` bytes of the handshake output or the queued replies are on their
    /// way; finished replies free their slots.
    pub(super) fn account(&mut self, mut n: usize, slots: &mut Slots) {
        if self.handshake_unsent() {
            self.hs_sent += n;
            if self.hs_sent >= self.hs.len() {
                self.hs = Vec::new();
                self.hs_sent = 0;
            }
            return;
        }
        n += self.reply_sent;
        while let Some(&s) = self.replies.front() {
            let len = slots.get(s).reply_len();
            if n < len {
                break;
            }
            n -= len;
            self.replies.pop_front();
            slots.release(s);
        }
        self.reply_sent = n;
    }
}

impl Conn {
    /// A sendmsg completed with `res`.
    pub fn on_send(&mut self, res: i32) {
        self.out.pending = false;
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
        self.out.account(res as usize, &mut self.slots);
    }

    /// Sends what is unsent in one sendmsg, through TLS once it runs.
    pub(super) fn submit_send(&mut self, env: &mut Env<'_>) {
        if self.out.pending || self.broken {
            return;
        }
        self.out.gather(&self.slots);
        let plaintext_unsent = self.out.handshake_unsent();
        if let ConnTls::On(t) = &mut self.tls
            && !t.raw_prefix(plaintext_unsent)
        {
            self.tls_encrypt();
        }
        if self.out.nothing_gathered() {
            return;
        }
        let out = &mut self.out;
        out.msg.msg_iov = out.iov.as_mut_ptr();
        out.msg.msg_iovlen = out.iov.len();
        out.last_send = out.iov.iter().map(|v| v.iov_len).sum();
        let entry = opcode::SendMsg::new(types::Fd(self.fd.as_raw_fd()), &out.msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(Token::encode(Kind::Send, env.id, 0, self.generation));
        // SAFETY: `msg` and `iov` live in this boxed connection, which is
        // not dropped before `finished`, i.e. before this send completes.
        // The iovecs point into the handshake output (not grown while
        // `pending`: see `handshake_out`), into replies of slots queued in
        // `replies` (not released or reused until `account` after this
        // send completes), or into TLS's ciphertext (not changed while
        // its send is marked in flight).
        match unsafe { env.ring.push(&entry) } {
            Ok(()) => {
                self.out.pending = true;
                if let ConnTls::On(t) = &mut self.tls
                    && !t.raw_prefix(self.out.handshake_unsent())
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
}
