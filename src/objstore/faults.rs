//! Fault injection for the store: fail a share of operations, adjustable
//! at run time, so tests can break the store and then let it recover.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// A failure rate shared by every clone of a store.
#[derive(Debug)]
pub struct Faults {
    /// Failures per million operations.
    per_million: AtomicU32,
    state: AtomicU64,
    injected: AtomicU64,
}

impl Faults {
    /// Fails `rate` (0.0 to 1.0) of operations, deterministically from `seed`.
    pub fn new(rate: f64, seed: u64) -> Self {
        let f = Faults {
            per_million: AtomicU32::new(0),
            state: AtomicU64::new(seed | 1),
            injected: AtomicU64::new(0),
        };
        f.set_rate(rate);
        f
    }

    /// Changes the failure rate.
    pub fn set_rate(&self, rate: f64) {
        let pm = (rate.clamp(0.0, 1.0) * 1_000_000.0) as u32;
        self.per_million.store(pm, Ordering::Relaxed);
    }

    /// Failures injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// Decides whether the next operation fails.
    pub fn should_fail(&self) -> bool {
        let pm = self.per_million.load(Ordering::Relaxed);
        if pm == 0 {
            return false;
        }
        // xorshift64: a lost update between threads only changes which call fails.
        let mut x = self.state.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state.store(x, Ordering::Relaxed);
        let fail = (x % 1_000_000) < u64::from(pm);
        if fail {
            self.injected.fetch_add(1, Ordering::Relaxed);
        }
        fail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_is_roughly_honoured_and_adjustable() {
        let f = Faults::new(0.25, 7);
        let n = (0..100_000).filter(|_| f.should_fail()).count();
        assert!((20_000..30_000).contains(&n), "{n}");
        f.set_rate(0.0);
        assert!((0..10_000).all(|_| !f.should_fail()));
        assert_eq!(f.injected(), n as u64);
    }
}
