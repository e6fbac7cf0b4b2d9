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

/// Shared gauges checked against the global limits.
pub struct Gauges {
    connections: AtomicUsize,
    max_connections: usize,
    buffered: Box<[Arc<CoreBytes>]>,
    max_buffered: u64,
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
        }
    }

    /// Counts a new connection, or returns false when the limit is reached.
    pub fn try_connect(&self) -> bool {
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_connections).then_some(n + 1)
            })
            .is_ok()
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
