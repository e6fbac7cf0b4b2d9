//! Request counters and latency histograms for the hot path: written by
//! one thread (the core serving the requests) with plain relaxed loads and
//! stores, no lock, no read-modify-write and no allocation; read by anyone
//! when metrics are scraped. Latencies fall into fixed log2 buckets of
//! microseconds. Both transports (NBD's per-core export counters, vhost-
//! user's per-queue ones) count with this one type, so `/metrics` renders
//! them alike.

use std::sync::atomic::{AtomicU64, Ordering};

/// Latency buckets: bucket `i < BUCKETS - 1` holds requests that took less
/// than 2^i µs (1 µs to ~33.5 s); the last one holds the rest (+Inf).
pub const BUCKETS: usize = 27;

/// Upper bound of finite bucket `i`, in microseconds.
pub fn bucket_bound_us(i: usize) -> u64 {
    1u64 << i.min(63)
}

/// The bucket of a latency of `ns` nanoseconds.
#[inline]
fn bucket(ns: u64) -> usize {
    let us = ns / 1000;
    ((u64::BITS - us.leading_zeros()) as usize).min(BUCKETS - 1)
}

/// Adds to a counter that only the calling thread writes: a plain load and
/// store, which is all a single writer needs and much cheaper than a locked add.
#[inline]
pub fn bump(a: &AtomicU64, n: u64) {
    a.store(a.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// One kind of request's counters, written by a single thread.
#[derive(Default)]
pub struct OpCounters {
    buckets: [AtomicU64; BUCKETS],
    errors: AtomicU64,
    bytes: AtomicU64,
    sum_ns: AtomicU64,
}

impl OpCounters {
    /// Records an answered request that took `ns`: the `bytes` it covered
    /// if it succeeded, or an error. Only the owning thread may call this.
    #[inline]
    pub fn record(&self, ns: u64, bytes: u64, ok: bool) {
        bump(&self.buckets[bucket(ns)], 1);
        bump(&self.sum_ns, ns);
        if ok {
            bump(&self.bytes, bytes);
        } else {
            bump(&self.errors, 1);
        }
    }

    /// Adds these counters to `t` (at scrape time, from any thread).
    pub fn add_to(&self, t: &mut OpTotals) {
        for (b, v) in t.buckets.iter_mut().zip(&self.buckets) {
            let n = v.load(Ordering::Relaxed);
            *b += n;
            t.requests += n;
        }
        t.errors += self.errors.load(Ordering::Relaxed);
        t.bytes += self.bytes.load(Ordering::Relaxed);
        t.sum_ns += self.sum_ns.load(Ordering::Relaxed);
    }
}

/// Totals of one kind of request, summed over whatever counted them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpTotals {
    /// Requests answered (the histogram's count).
    pub requests: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Bytes moved by successful requests.
    pub bytes: u64,
    /// Summed latency, in nanoseconds.
    pub sum_ns: u64,
    /// Per-bucket (not cumulative) counts.
    pub buckets: [u64; BUCKETS],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log2_microseconds() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(999), 0, "under 1 µs");
        assert_eq!(bucket(1_000), 1, "1 µs is under 2 µs");
        assert_eq!(bucket(3_999), 2);
        assert_eq!(bucket(4_000), 3);
        assert_eq!(bucket(1_000_000), 10, "1 ms is under 1024 µs");
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
        for ns in [0u64, 1_500, 70_000, 3_000_000_000] {
            let i = bucket(ns);
            if i < BUCKETS - 1 {
                assert!(ns / 1000 < bucket_bound_us(i));
            }
            if i > 0 {
                assert!(ns / 1000 >= bucket_bound_us(i - 1));
            }
        }
    }

    #[test]
    fn counters_add_up() {
        let c = OpCounters::default();
        c.record(500, 4096, true);
        c.record(2_000_000, 0, false);
        let mut t = OpTotals::default();
        c.add_to(&mut t);
        c.add_to(&mut t);
        assert_eq!((t.requests, t.errors, t.bytes), (4, 2, 8192));
        assert_eq!(t.sum_ns, 2 * 2_000_500);
        assert_eq!((t.buckets[0], t.buckets[11]), (2, 2));
    }
}
