//! The listening side of a core: multishot accepts on its listeners, the
//! connection limit, and the round-robin hand-off of new connections.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use io_uring::{opcode, types};
use tracing::{debug, warn};

use super::{CoreMsg, Reactor};
use crate::server::conn::Conn;
use crate::server::listener::{self, Listener, Transport};
use crate::server::tls::ConnTls;
use crate::uring::{Kind, MAX_INDEX, Token};

/// A listener and whether its multishot accept is armed.
pub(super) struct ListenerState {
    /// `None` once closed (at shutdown).
    pub(super) listener: Option<Listener>,
    pub(super) armed: bool,
}

impl Reactor {
    /// Arms a multishot accept on listener `i`.
    pub(super) fn arm_accept(&mut self, i: usize) {
        let Some(l) = self.listeners[i].listener.as_ref() else {
            return;
        };
        let entry = opcode::AcceptMulti::new(types::Fd(l.fd.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(Token::encode(Kind::Accept, i, 0, 0));
        // SAFETY: the accept asks for no peer address, so it points at no
        // memory; the listener stays open until the accept is cancelled.
        match unsafe { self.ring.push(&entry) } {
            Ok(()) => self.listeners[i].armed = true,
            Err(e) => warn!(core = self.index, "cannot arm accept: {e}"),
        }
    }

    /// Listener `i` accepted a connection (`res` is its descriptor) or
    /// failed; `more` says whether the multishot accept is still armed.
    pub(super) fn on_accept(&mut self, i: usize, res: i32, more: bool) {
        if i >= self.listeners.len() {
            return;
        }
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

    /// Takes a connection for life (accepted here or handed over).
    pub(super) fn add_conn(&mut self, fd: OwnedFd, transport: Transport, peer: String) {
        if self.stopping {
            self.gauges.disconnect();
            return;
        }
        if self.conns.len() >= MAX_INDEX {
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

    /// Cancels the armed accepts; listeners close as their cancels land.
    pub(super) fn stop_accepting(&mut self) {
        for i in 0..self.listeners.len() {
            if self.listeners[i].armed {
                let entry = opcode::AsyncCancel::new(Token::encode(Kind::Accept, i, 0, 0))
                    .build()
                    .user_data(Token::encode(Kind::Cancel, MAX_INDEX, 0, 0));
                // SAFETY: a cancel points at no memory.
                if unsafe { self.ring.push(&entry) }.is_err() {
                    self.listeners[i].listener = None;
                }
            } else {
                self.listeners[i].listener = None;
            }
        }
    }
}

/// A printable name for the peer of an accepted socket.
fn peer_name(fd: &OwnedFd, transport: Transport, listener: &str) -> String {
    if transport == Transport::Tcp {
        // SAFETY: all-zero bytes are a valid sockaddr_storage.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as u32;
        // SAFETY: getpeername writes at most `len` bytes into storage.
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
