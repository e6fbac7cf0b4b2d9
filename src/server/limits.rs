//! Server-wide limits that protect vbd from hostile or broken clients: how
//! many connections may be open, and how many bytes of request data all
//! connections together may hold. Per-connection limits live in
//! [`super::ConnConfig`]; these are the shared gauges behind the global ones.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// One core's share of the buffered-bytes gauge, on its own cache line so
/// cores never contend for it on the request path.
#[repr(align(128))]
#[derive(Default)]
pub struct CoreBytes(AtomicU64);

impl CoreBytes {
    /// Adds bytes this core's connections now hold.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Removes bytes this core's connections released.
    pub fn sub(&self, n: u64) {
        self.0.fetch_sub(n, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Shared gauges checked against the global limits, and counters of the
/// (rare) times a limit or a handshake turned a client away.
pub struct Gauges {
    connections: AtomicUsize,
    max_connections: usize,
    buffered: Box<[Arc<CoreBytes>]>,
    max_buffered: u64,
    events: Events,
}

/// Counts of connection events; each happens at most once per connection
/// (or per pause), so shared atomics cost nothing measurable.
#[derive(Default)]
struct Events {
    accepted: AtomicU64,
    refused: AtomicU64,
    handshake_failures: AtomicU64,
    handshake_timeouts: AtomicU64,
    paused_connection: AtomicU64,
    paused_global: AtomicU64,
}

/// What [`Gauges`] have counted since the server started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventCounts {
    /// Connections let in past `--max-connections`.
    pub accepted: u64,
    /// Connections closed at accept by `--max-connections`.
    pub refused: u64,
    /// Handshakes that ended in a protocol error.
    pub handshake_failures: u64,
    /// Clients disconnected by `--handshake-timeout`.
    pub handshake_timeouts: u64,
    /// Input pauses by `--max-buffered`.
    pub paused_connection: u64,
    /// Input pauses by `--max-buffered-total`.
    pub paused_global: u64,
}

impl Gauges {
    /// Gauges for `cores` reactors.
    pub fn new(cores: usize, max_connections: usize, max_buffered: u64) -> Self {
        Gauges {
            connections: AtomicUsize::new(0),
            max_connections,
            buffered: (0..cores.max(1))
                .map(|_| Arc::new(CoreBytes::default()))
                .collect(),
            max_buffered,
            events: Events::default(),
        }
    }

    /// Counts a new connection, or returns false when the limit is reached.
    pub fn try_connect(&self) -> bool {
        let ok = self
            .connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_connections).then_some(n + 1)
            })
            .is_ok();
        let e = &self.events;
        if ok { &e.accepted } else { &e.refused }.fetch_add(1, Ordering::Relaxed);
        ok
    }

    /// Counts a handshake that failed with a protocol error.
    pub fn note_handshake_failure(&self) {
        self.events
            .handshake_failures
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts clients disconnected for negotiating too long.
    pub fn note_handshake_timeouts(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.events
            .handshake_timeouts
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts a connection's input pausing on a buffer limit: the global
    /// one, or its own.
    pub fn note_pause(&self, global: bool) {
        let e = &self.events;
        if global {
            &e.paused_global
        } else {
            &e.paused_connection
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// The event counters so far.
    pub fn events(&self) -> EventCounts {
        let e = &self.events;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        EventCounts {
            accepted: get(&e.accepted),
            refused: get(&e.refused),
            handshake_failures: get(&e.handshake_failures),
            handshake_timeouts: get(&e.handshake_timeouts),
            paused_connection: get(&e.paused_connection),
            paused_global: get(&e.paused_global),
        }
    }

    /// Uncounts a connection that closed (or was refused after counting).
    pub fn disconnect(&self) {
        // Saturating: a stray call must not wrap the gauge.
        let _ = self
            .connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// The connection limit.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// The global buffered-bytes limit.
    pub fn max_buffered(&self) -> u64 {
        self.max_buffered
    }

    /// The buffered-bytes gauge of core `i`.
    pub fn core(&self, i: usize) -> Arc<CoreBytes> {
        self.buffered[i % self.buffered.len()].clone()
    }

    /// Bytes all connections hold.
    pub fn buffered(&self) -> u64 {
        self.buffered.iter().map(|c| c.get()).sum()
    }

    /// Whether core `i` may take in more request data. A core under its
    /// fair share never looks at the others' lines; only one over it pays
    /// for the sum.
    pub fn may_buffer(&self, i: usize) -> bool {
        let share = self.max_buffered / self.buffered.len() as u64;
        self.buffered[i % self.buffered.len()].get() < share || self.buffered() < self.max_buffered
    }
}

/// Logs a repeated refusal at most once a second, with how many it hid.
pub struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    /// A log that has said nothing yet.
    pub const fn new() -> Self {
        RateLimitedLog {
            last: None,
            suppressed: 0,
        }
    }

    /// Returns `Some(hidden)` when a line should be written now.
    pub fn tick(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

impl Default for RateLimitedLog {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_limit_counts_and_refuses() {
        let g = Gauges::new(2, 2, 1 << 20);
        assert!(g.try_connect());
        assert!(g.try_connect());
        assert!(!g.try_connect(), "third connection over a limit of two");
        assert_eq!((g.events().accepted, g.events().refused), (2, 1));
        g.disconnect();
        assert!(g.try_connect());
        g.disconnect();
        g.disconnect();
        g.disconnect();
        assert_eq!(g.connections(), 0, "never wraps below zero");
    }

    #[test]
    fn buffered_share_then_global_sum() {
        let g = Gauges::new(2, 10, 100);
        let (a, b) = (g.core(0), g.core(1));
        a.add(60);
        assert!(g.may_buffer(0), "over its share of 50, but 60 < 100 in all");
        b.add(40);
        assert!(!g.may_buffer(0), "100 held in all");
        assert!(g.may_buffer(1), "40 is under its own share of 50");
        a.sub(60);
        assert!(g.may_buffer(0));
        assert_eq!(g.buffered(), 40);
    }

    #[test]
    fn rate_limited_log_hides_bursts() {
        let mut l = RateLimitedLog::new();
        assert_eq!(l.tick(), Some(0));
        assert_eq!(l.tick(), None);
        assert_eq!(l.tick(), None);
        l.last = Some(Instant::now() - Duration::from_secs(2));
        assert_eq!(l.tick(), Some(2));
    }
}
