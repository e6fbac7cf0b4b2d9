//! A connection's limits, and what its handlers borrow from the core.

use std::time::Duration;

use crate::nbd::HandshakeConfig;
use crate::server::limits::Gauges;
use crate::server::registry::Registry;
use crate::uring::{RemoteSink, Ring};
use crate::volume::RemoteResult;

/// Limits for connections, each and all together.
#[derive(Clone, Copy, Debug)]
pub struct ConnConfig {
    /// Requests in flight at once; more wait in the socket.
    pub max_inflight: usize,
    /// Bytes of request data held at once before reading stops.
    pub max_buffered: u64,
    /// Receive buffer size.
    pub rbuf: usize,
    /// Handshake limits and TLS policy.
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
    /// The core's ring.
    pub ring: &'a mut Ring,
    /// Where the core receives off-core completions.
    pub sink: &'a RemoteSink<RemoteResult>,
    /// The exports, looked up at the end of the handshake.
    pub registry: &'a Registry,
    /// Connection limits.
    pub cfg: &'a ConnConfig,
    /// Server-wide limits and counters.
    pub gauges: &'a Gauges,
    /// This core's index.
    pub core: usize,
    /// This connection's index on its core.
    pub id: usize,
}
