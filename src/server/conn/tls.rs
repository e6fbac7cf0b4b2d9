//! The connection's side of STARTTLS: from the acknowledgement on, socket
//! bytes pass through [`crate::server::tls::TlsStream`] while parsing and
//! replies stay the same.

use tracing::{debug, warn};

use super::{Conn, Env};
use crate::server::tls::ConnTls;

impl Conn {
    /// STARTTLS was acknowledged: what follows the option is ciphertext.
    pub(super) fn start_tls(&mut self) {
        // Input is parsed as soon as it lands, so no receive is in flight
        // into `rbuf` here; if one were, its bytes would bypass TLS.
        let r = if self.rbuf.pending {
            Err("a receive was in flight".to_string())
        } else {
            self.tls.start(self.rbuf.input()).map_err(|e| e.to_string())
        };
        match r {
            Ok(()) => {
                debug!(peer = %self.peer, "STARTTLS: TLS handshake starts");
                self.rbuf.clear();
            }
            Err(e) => {
                warn!(peer = %self.peer, "cannot start TLS: {e}; disconnecting");
                self.hard_disconnect();
            }
        }
    }

    /// Decrypts what TLS received into `rbuf` and parses it, until neither
    /// makes progress.
    pub(super) fn tls_input(&mut self, env: &mut Env<'_>) {
        loop {
            let ConnTls::On(t) = &mut self.tls else {
                return;
            };
            if t.raw_prefix(self.out.handshake_unsent()) {
                return;
            }
            self.rbuf.compact();
            let done = match t.decrypt(self.rbuf.spare(), &self.peer) {
                Ok(d) => d,
                Err(e) => {
                    warn!(peer = %self.peer, "TLS failed: {e}; disconnecting");
                    self.stop_reading = true;
                    return;
                }
            };
            self.rbuf.filled(done.bytes);
            if done.closed {
                debug!(peer = %self.peer, "client closed TLS");
                self.stop_reading = true;
            }
            let before = self.rbuf.parsed();
            self.process_input(env);
            if done.bytes == 0 && self.rbuf.parsed() == before {
                return;
            }
        }
    }

    /// Encrypts the plaintext `submit_send` gathered and puts the
    /// ciphertext to send in its place.
    pub(super) fn tls_encrypt(&mut self) {
        let ConnTls::On(t) = &mut self.tls else {
            return;
        };
        let had_plaintext = !self.out.nothing_gathered();
        let taken = t.encrypt(self.out.gathered());
        // TLS failed, or replies came after close_notify: they cannot go out.
        let stuck = t.failed() || (t.closing() && had_plaintext && taken == 0);
        self.out.account(taken, &mut self.slots);
        let ConnTls::On(t) = &mut self.tls else {
            return;
        };
        if self.stop_reading && self.slots.inflight_io == 0 && self.out.is_empty() {
            t.close();
        }
        self.out.gather_only(t.wire());
        if self.out.nothing_gathered() && stuck {
            // What TLS had to say (an alert) is out: end the connection.
            self.hard_disconnect();
        }
    }
}
