//! The receive side: one fixed buffer that ring receives fill at its end
//! and the decoder consumes from its start.

use std::os::fd::AsRawFd;

use io_uring::{opcode, types};
use tracing::{debug, warn};

use super::{Conn, Env};
use crate::server::tls::ConnTls;
use crate::uring::{Kind, Token};

/// Received bytes: `buf[start..end]` awaits parsing, `buf[end..]` is free.
pub(super) struct RecvBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// A receive into `buf[end..]` (or TLS's buffer) is in flight.
    pub(super) pending: bool,
}

impl RecvBuf {
    /// An empty buffer of `size` bytes, allocated once per connection.
    pub(super) fn new(size: usize) -> Self {
        RecvBuf {
            buf: vec![0u8; size].into_boxed_slice(),
            start: 0,
            end: 0,
            pending: false,
        }
    }

    /// What awaits parsing.
    pub(super) fn input(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Where parsing stands (it moves when input is consumed).
    pub(super) fn parsed(&self) -> usize {
        self.start
    }

    /// The parser took `n` bytes.
    pub(super) fn consume(&mut self, n: usize) {
        self.start += n;
    }

    /// Where plaintext may be appended (TLS decrypts into it).
    pub(super) fn spare(&mut self) -> &mut [u8] {
        &mut self.buf[self.end..]
    }

    /// `n` bytes were appended at the end.
    pub(super) fn filled(&mut self, n: usize) {
        self.end += n;
    }

    /// Forgets everything (what was left is TLS's now).
    pub(super) fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Makes room at the end: resets the buffer when empty, or moves the
    /// unparsed tail to the front once little room is left.
    pub(super) fn compact(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 && self.buf.len() - self.end < self.buf.len() / 4 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }
}

impl Conn {
    /// A recv completed with `res`.
    pub fn on_recv(&mut self, res: i32) {
        self.rbuf.pending = false;
        if res > 0 {
            match &mut self.tls {
                ConnTls::On(t) => t.received(res as usize),
                _ => self.rbuf.filled(res as usize),
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

    /// Queues a receive into the free end of the buffer (or TLS's), unless
    /// one is in flight, input has stopped, or the buffer is full.
    pub(super) fn submit_recv(&mut self, env: &mut Env<'_>) {
        if self.rbuf.pending || self.stop_reading || self.broken {
            return;
        }
        let (ptr, space) = match &mut self.tls {
            ConnTls::On(t) => t.recv_space(),
            _ => {
                self.rbuf.compact();
                let spare = self.rbuf.spare();
                (spare.as_mut_ptr(), spare.len())
            }
        };
        if space == 0 {
            // Full of requests waiting for free slots; reading resumes as they finish.
            return;
        }
        let entry = opcode::Recv::new(types::Fd(self.fd.as_raw_fd()), ptr, space as u32)
            .build()
            .user_data(Token::encode(Kind::Recv, env.id, 0, self.generation));
        // SAFETY: `ptr..ptr+space` is the free end of a boxed buffer this
        // boxed connection owns (rbuf, or TLS's ciphertext buffer); neither
        // moves nor is compacted, parsed or dropped while `pending` is set,
        // and the connection is not dropped before `finished`, which waits
        // for this receive's completion.
        match unsafe { env.ring.push(&entry) } {
            Ok(()) => self.rbuf.pending = true,
            Err(e) => {
                warn!(peer = %self.peer, "cannot queue a receive: {e}; disconnecting");
                self.hard_disconnect();
            }
        }
    }

    /// Cancels the receive in flight once input has stopped.
    pub(super) fn cancel_recv(&mut self, env: &mut Env<'_>) {
        if !self.stop_reading || !self.rbuf.pending || self.cancel_pending {
            return;
        }
        let target = Token::encode(Kind::Recv, env.id, 0, self.generation);
        let entry = opcode::AsyncCancel::new(target)
            .build()
            .user_data(Token::encode(Kind::Cancel, env.id, 0, self.generation));
        // SAFETY: a cancel points at no memory.
        if unsafe { env.ring.push(&entry) }.is_ok() {
            self.cancel_pending = true;
        }
    }
}
