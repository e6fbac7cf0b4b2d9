//! TLS on one connection: the bridge between the socket's ciphertext
//! (received and sent through the core's ring) and the plaintext the
//! connection parses and replies with. Encrypted connections copy;
//! plaintext ones never come here after the handshake's first bytes.

use std::io::{self, Read, Write};
use std::sync::Arc;

use rustls::ServerConnection;
use thiserror::Error;
use tracing::info;

use super::TlsServer;
use crate::nbd::TlsMode;
use crate::server::listener::Transport;

/// Ciphertext held before rustls takes it; a record is at most ~16 KiB.
const CIPHER_IN: usize = 64 << 10;
/// Plaintext encrypted for one send at most; the rest waits for the next.
const CIPHER_OUT: usize = 256 << 10;

/// Why TLS on one connection failed; the connection ends.
#[derive(Debug, Error)]
pub enum StreamError {
    /// rustls refused the peer's records.
    #[error(transparent)]
    Tls(#[from] rustls::Error),
    /// Moving records in or out failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The client started TLS where it was not offered.
    #[error("STARTTLS accepted on a connection that was not offered TLS")]
    NotOffered,
    /// The client sent more than a ClientHello with STARTTLS.
    #[error("{0} bytes arrived with STARTTLS, more than a TLS ClientHello")]
    Early(usize),
}
/// A connection's TLS state.
pub enum ConnTls {
    /// Not offered on this connection.
    Off,
    /// Offered; the client has not started it.
    Offered(Arc<TlsServer>),
    /// Running since STARTTLS.
    On(Box<TlsStream>),
}

impl ConnTls {
    /// The state and handshake policy of a new connection on `transport`.
    pub fn offer(server: Option<&Arc<TlsServer>>, transport: Transport) -> (Self, TlsMode) {
        match server {
            Some(s) if s.mode(transport) != TlsMode::Off => {
                (ConnTls::Offered(s.clone()), s.mode(transport))
            }
            _ => (ConnTls::Off, TlsMode::Off),
        }
    }

    /// Starts TLS once STARTTLS is acknowledged; `early` is what the client
    /// sent after the option (the start of its ClientHello, if anything).
    pub fn start(&mut self, early: &[u8]) -> Result<(), StreamError> {
        let ConnTls::Offered(server) = self else {
            return Err(StreamError::NotOffered);
        };
        if early.len() > CIPHER_IN {
            return Err(StreamError::Early(early.len()));
        }
        let conn = ServerConnection::new(server.config.clone())?;
        let mut cin = vec![0u8; CIPHER_IN].into_boxed_slice();
        cin[..early.len()].copy_from_slice(early);
        *self = ConnTls::On(Box::new(TlsStream {
            conn,
            cin,
            cin_start: 0,
            cin_end: early.len(),
            wire: Vec::new(),
            wire_sent: 0,
            sending: false,
            raw: true,
            client_auth: server.client_auth,
            established: false,
            closing: false,
            failed: false,
        }));
        Ok(())
    }

    /// Whether TLS has nothing left to send before the connection closes.
    pub fn idle(&self) -> bool {
        match self {
            ConnTls::On(t) => t.idle(),
            _ => true,
        }
    }
}

/// What one `decrypt` produced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Decrypted {
    /// Plaintext bytes written.
    pub bytes: usize,
    /// The client closed TLS (close_notify): no more input will come.
    pub closed: bool,
}

/// TLS running on one connection.
pub struct TlsStream {
    conn: ServerConnection,
    /// Received ciphertext; `cin[cin_start..cin_end]` awaits rustls.
    cin: Box<[u8]>,
    cin_start: usize,
    cin_end: usize,
    /// Ciphertext to send; `wire[wire_sent..]` is unsent.
    wire: Vec<u8>,
    wire_sent: usize,
    /// A send from `wire` is in flight: the kernel reads it, so it must not change.
    sending: bool,
    /// The STARTTLS ACK (and replies before it) still go out in plaintext.
    raw: bool,
    client_auth: bool,
    established: bool,
    /// close_notify is queued.
    closing: bool,
    /// TLS failed; only the alert rustls prepared is still sent.
    failed: bool,
}

impl TlsStream {
    /// Whether the plaintext prefix is still being sent, given whether the
    /// connection still has plaintext handshake bytes unsent; once those
    /// are out, everything goes through TLS.
    pub fn raw_prefix(&mut self, plaintext_unsent: bool) -> bool {
        self.raw &= plaintext_unsent;
        self.raw
    }

    /// Where the next receive may write ciphertext; empty when full.
    pub fn recv_space(&mut self) -> (*mut u8, usize) {
        if self.cin_start == self.cin_end {
            self.cin_start = 0;
            self.cin_end = 0;
        } else if self.cin_start > 0 {
            self.cin.copy_within(self.cin_start..self.cin_end, 0);
            self.cin_end -= self.cin_start;
            self.cin_start = 0;
        }
        let space = if self.failed {
            0
        } else {
            self.cin.len() - self.cin_end
        };
        (self.cin[self.cin_end..].as_mut_ptr(), space)
    }

    /// A receive into `recv_space` completed with `n` bytes.
    pub fn received(&mut self, n: usize) {
        self.cin_end = (self.cin_end + n).min(self.cin.len());
    }

    /// Moves received ciphertext through rustls and the plaintext it
    /// yields into `dst`, as much as fits.
    pub fn decrypt(&mut self, dst: &mut [u8], peer: &str) -> Result<Decrypted, StreamError> {
        let mut done = Decrypted::default();
        if self.failed || self.raw {
            return Ok(done);
        }
        loop {
            while done.bytes < dst.len() {
                match self.conn.reader().read(&mut dst[done.bytes..]) {
                    Ok(0) => {
                        done.closed = true;
                        return Ok(done);
                    }
                    Ok(n) => done.bytes += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(self.fail(e.into())),
                }
            }
            // rustls wants no more while it holds plaintext or owes a reply.
            if done.bytes == dst.len() || self.cin_start == self.cin_end || !self.conn.wants_read()
            {
                return Ok(done);
            }
            let mut input = &self.cin[self.cin_start..self.cin_end];
            match self.conn.read_tls(&mut input) {
                Ok(n) => self.cin_start += n,
                Err(e) => return Err(self.fail(e.into())),
            }
            if let Err(e) = self.conn.process_new_packets() {
                return Err(self.fail(e.into()));
            }
            if !self.established && !self.conn.is_handshaking() {
                self.established = true;
                info!(
                    peer,
                    version = ?self.conn.protocol_version(),
                    suite = ?self.conn.negotiated_cipher_suite().map(|s| s.suite()),
                    client_certificate = self.client_auth && self.conn.peer_certificates().is_some(),
                    "TLS established"
                );
            }
        }
    }

    fn fail(&mut self, e: StreamError) -> StreamError {
        // The alert rustls queued goes out with the next send.
        self.failed = true;
        e
    }

    /// Encrypts plaintext from `parts` in order, up to a send's worth;
    /// returns how many bytes were taken. Never while a send is in flight.
    pub fn encrypt<'a>(&mut self, parts: impl Iterator<Item = &'a [u8]>) -> usize {
        debug_assert!(!self.sending);
        if self.wire_sent >= self.wire.len() {
            self.wire.clear();
            self.wire_sent = 0;
        }
        let mut taken = 0;
        if !self.failed && !self.closing {
            'parts: for mut part in parts {
                while !part.is_empty() {
                    if taken >= CIPHER_OUT {
                        break 'parts;
                    }
                    // rustls takes up to its buffer limit per write.
                    let n = self.conn.writer().write(part).unwrap_or(0);
                    taken += n;
                    part = &part[n..];
                    if self.drain() == 0 && n == 0 {
                        break 'parts;
                    }
                }
            }
        }
        self.drain();
        taken
    }

    /// Moves the records rustls has ready onto the wire buffer.
    fn drain(&mut self) -> usize {
        let before = self.wire.len();
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.wire) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        self.wire.len() - before
    }

    /// Queues close_notify: nothing more will be sent.
    pub fn close(&mut self) {
        if !self.closing && !self.failed {
            self.closing = true;
            self.conn.send_close_notify();
            self.drain();
        }
    }

    /// Whether TLS failed (the connection must end once the alert is out).
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Whether close_notify is queued: no more plaintext is taken.
    pub fn closing(&self) -> bool {
        self.closing
    }

    /// The ciphertext still to send.
    pub fn wire(&self) -> &[u8] {
        &self.wire[self.wire_sent..]
    }

    /// A send of `wire()` was submitted.
    pub fn start_send(&mut self) {
        self.sending = true;
    }

    /// Whether the completed send was one of `wire()` (and no longer is in flight).
    pub fn take_send(&mut self) -> bool {
        std::mem::take(&mut self.sending)
    }

    /// `n` bytes of `wire()` went out.
    pub fn sent(&mut self, n: usize) {
        self.wire_sent = (self.wire_sent + n).min(self.wire.len());
    }

    fn idle(&self) -> bool {
        !self.sending && self.wire_sent >= self.wire.len() && (self.closing || self.failed)
    }
}
