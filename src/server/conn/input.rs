//! Parsing what the client sent: handshake options until the session
//! starts, then requests and their WRITE payloads.

use tracing::{debug, warn};

use super::{Conn, Env, Phase};
use crate::nbd::Progress;
use crate::nbd::request::Event;

impl Conn {
    /// Parses buffered plaintext until it runs out or input must pause.
    pub(super) fn process_input(&mut self, env: &mut Env<'_>) {
        loop {
            let input = self.rbuf.input();
            match &mut self.phase {
                Phase::Handshake(hs) => {
                    // Answers are appended to the handshake output, which
                    // must not grow (and move) while a send reads from it.
                    if input.is_empty() || self.stop_reading || self.out.sending_handshake() {
                        return;
                    }
                    match hs.feed(input, env.registry, self.out.handshake_out()) {
                        Err(e) => {
                            env.gauges.note_handshake_failure();
                            warn!(peer = %self.peer, "handshake failed: {e}; disconnecting");
                            self.hard_disconnect();
                            return;
                        }
                        Ok((n, progress)) => {
                            self.rbuf.consume(n);
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
                        if !self.slots.has_free() || !self.slots.may_buffer(&self.peer, env) {
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
                            self.rbuf.consume(n);
                            if !self.on_request(req, env) {
                                return;
                            }
                        }
                        Some(Event::Payload { data, last }) => {
                            let Some(s) = self.slots.payload else {
                                self.rbuf.consume(n);
                                continue;
                            };
                            let slot = self.slots.get_mut(s);
                            if slot.refusal.is_none() {
                                slot.io.buf_mut().as_mut_slice()[slot.filled..slot.filled + n]
                                    .copy_from_slice(data);
                            }
                            slot.filled += n;
                            let filled = slot.filled;
                            self.rbuf.consume(n);
                            if last {
                                self.slots.payload = None;
                                self.stats.bytes_written += filled as u64;
                                self.run(s, env);
                            }
                        }
                    }
                }
            }
        }
    }
}
