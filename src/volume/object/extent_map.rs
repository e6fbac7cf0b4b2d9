//! An interval map over block numbers: non-overlapping ranges, each with a
//! value and the sequence number of the write that produced it.
//!
//! Two kinds of update: `insert` overwrites (the write-ahead layer, where
//! every new record is newer than what it covers), and `merge` keeps, block
//! by block, whichever side wins a comparison (the persistent map, where
//! chunk indexes and checkpoints may be applied in any order and the newest
//! sequence must win). Displaced pieces are reported to a callback so callers
//! can keep per-chunk live counts without allocating.

use std::collections::BTreeMap;

/// A value that can describe the tail of its own range.
pub(super) trait Piece: Clone + PartialEq {
    /// The value for the part of a range starting `by` blocks later.
    fn advance(&self, by: u64) -> Self;
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry<V> {
    end: u64,
    seq: u64,
    value: V,
}

/// A map from block ranges to values.
#[derive(Clone, Debug)]
pub(super) struct ExtentMap<V> {
    map: BTreeMap<u64, Entry<V>>,
}

impl<V> Default for ExtentMap<V> {
    fn default() -> Self {
        ExtentMap {
            map: BTreeMap::new(),
        }
    }
}

/// One range of the map, clipped to a query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Span<V> {
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) seq: u64,
    pub(super) value: V,
}

impl<V: Piece> ExtentMap<V> {
    /// Number of ranges.
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// Removes and returns the pieces overlapping [start, end), clipped to
    /// it, re-inserting the parts outside.
    fn cut(&mut self, start: u64, end: u64, out: &mut Vec<Span<V>>) {
        // A range starting before `start` may reach into it.
        if let Some((&s, e)) = self.map.range(..start).next_back()
            && e.end > start
        {
            let Some(e) = self.map.remove(&s) else { return };
            self.map.insert(
                s,
                Entry {
                    end: start,
                    seq: e.seq,
                    value: e.value.clone(),
                },
            );
            let piece_end = e.end.min(end);
            out.push(Span {
                start,
                end: piece_end,
                seq: e.seq,
                value: e.value.advance(start - s),
            });
            if e.end > end {
                self.map.insert(
                    end,
                    Entry {
                        end: e.end,
                        seq: e.seq,
                        value: e.value.advance(end - s),
                    },
                );
            }
        }
        let keys: Vec<u64> = self.map.range(start..end).map(|(&k, _)| k).collect();
        for s in keys {
            let Some(e) = self.map.remove(&s) else {
                continue;
            };
            let piece_end = e.end.min(end);
            out.push(Span {
                start: s,
                end: piece_end,
                seq: e.seq,
                value: e.value.clone(),
            });
            if e.end > end {
                self.map.insert(
                    end,
                    Entry {
                        end: e.end,
                        seq: e.seq,
                        value: e.value.advance(end - s),
                    },
                );
            }
        }
    }

    /// Sets [start, end) to `value`, reporting what it displaced.
    pub(super) fn insert(
        &mut self,
        start: u64,
        end: u64,
        seq: u64,
        value: V,
        mut displaced: impl FnMut(&Span<V>),
    ) {
        if start >= end {
            return;
        }
        let mut old = Vec::new();
        self.cut(start, end, &mut old);
        for p in &old {
            displaced(p);
        }
        self.map.insert(start, Entry { end, seq, value });
    }

    /// Sets the blocks of [start, end) for which `wins(new_seq, &value,
    /// old_seq, &old)` holds (and every block with no value yet); reports the
    /// pieces that lost and returns the pieces of the new value that landed.
    pub(super) fn merge(
        &mut self,
        start: u64,
        end: u64,
        seq: u64,
        value: V,
        wins: impl Fn(u64, &V, u64, &V) -> bool,
        mut displaced: impl FnMut(&Span<V>),
    ) -> u64 {
        if start >= end {
            return 0;
        }
        let mut old = Vec::new();
        self.cut(start, end, &mut old);
        let mut landed = 0;
        // The run of blocks taking the new value, coalesced into one range.
        let mut run: Option<(u64, u64)> = None;
        let mut pos = start;
        for p in old {
            if pos < p.start {
                run = Some((run.map_or(pos, |r| r.0), p.start));
            }
            if wins(seq, &value.advance(p.start - start), p.seq, &p.value) {
                displaced(&p);
                run = Some((run.map_or(p.start, |r| r.0), p.end));
            } else {
                if let Some((s, e)) = run.take() {
                    landed += e - s;
                    self.put(s, e, seq, value.advance(s - start));
                }
                self.put(p.start, p.end, p.seq, p.value);
            }
            pos = p.end;
        }
        if pos < end {
            run = Some((run.map_or(pos, |r| r.0), end));
        }
        if let Some((s, e)) = run {
            landed += e - s;
            self.put(s, e, seq, value.advance(s - start));
        }
        landed
    }

    /// Inserts a range, joining it with neighbours that continue it (same
    /// sequence, contiguous values) so merges do not fragment the map.
    fn put(&mut self, mut start: u64, mut end: u64, seq: u64, mut value: V) {
        if let Some((&ps, pe)) = self.map.range(..start).next_back()
            && pe.end == start
            && pe.seq == seq
            && pe.value.advance(start - ps) == value
        {
            start = ps;
            value = pe.value.clone();
            self.map.remove(&ps);
        }
        if let Some(ne) = self.map.get(&end)
            && ne.seq == seq
            && value.advance(end - start) == ne.value
        {
            let ne_end = ne.end;
            self.map.remove(&end);
            end = ne_end;
        }
        self.map.insert(start, Entry { end, seq, value });
    }

    /// Removes [start, end), reporting what was there.
    pub(super) fn remove(&mut self, start: u64, end: u64, mut displaced: impl FnMut(&Span<V>)) {
        if start >= end {
            return;
        }
        let mut old = Vec::new();
        self.cut(start, end, &mut old);
        for p in &old {
            displaced(p);
        }
    }

    /// Calls `f` for each piece overlapping [start, end), clipped to it, in order.
    pub(super) fn for_each_in(&self, start: u64, end: u64, mut f: impl FnMut(Span<V>)) {
        if start >= end {
            return;
        }
        // A small read overlaps a few pieces: walking back from `end` finds
        // them with one descent of the tree, where looking for the piece
        // before `start` and then the pieces after it takes two (on every
        // read, in a map that random writes cut into many pieces).
        const FEW: usize = 4;
        let mut few: [Option<(u64, &Entry<V>)>; FEW] = [None; FEW];
        let mut n = 0;
        for (&s, e) in self.map.range(..end).rev() {
            if e.end <= start {
                break;
            }
            if n == FEW {
                return self.for_each_in_many(start, end, f);
            }
            few[n] = Some((s, e));
            n += 1;
        }
        for &(s, e) in few[..n].iter().rev().flatten() {
            f(Span {
                start: s.max(start),
                end: e.end.min(end),
                seq: e.seq,
                value: if s < start {
                    e.value.advance(start - s)
                } else {
                    e.value.clone()
                },
            });
        }
    }

    /// [`ExtentMap::for_each_in`] for a range over many pieces.
    fn for_each_in_many(&self, start: u64, end: u64, mut f: impl FnMut(Span<V>)) {
        if let Some((&s, e)) = self.map.range(..start).next_back()
            && e.end > start
        {
            f(Span {
                start,
                end: e.end.min(end),
                seq: e.seq,
                value: e.value.advance(start - s),
            });
        }
        for (&s, e) in self.map.range(start..end) {
            f(Span {
                start: s,
                end: e.end.min(end),
                seq: e.seq,
                value: e.value.clone(),
            });
        }
    }

    /// The piece containing `block`, if any, from `block` to its end.
    pub(super) fn get(&self, block: u64) -> Option<Span<V>> {
        let (&s, e) = self.map.range(..=block).next_back()?;
        (e.end > block).then(|| Span {
            start: block,
            end: e.end,
            seq: e.seq,
            value: e.value.advance(block - s),
        })
    }

    /// Where the first piece starting at or after `block` starts (for a
    /// caller that knows `block` itself has no value).
    pub(super) fn next_piece_from(&self, block: u64) -> Option<u64> {
        self.map.range(block..).next().map(|(&k, _)| k)
    }

    /// Every range, in order.
    pub(super) fn iter(&self) -> impl Iterator<Item = Span<V>> + '_ {
        self.map.iter().map(|(&s, e)| Span {
            start: s,
            end: e.end,
            seq: e.seq,
            value: e.value.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value that records where in some source a block came from.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct At(u64);
    impl Piece for At {
        fn advance(&self, by: u64) -> Self {
            At(self.0 + by)
        }
    }

    fn spans(m: &ExtentMap<At>) -> Vec<(u64, u64, u64, u64)> {
        m.iter()
            .map(|s| (s.start, s.end, s.seq, s.value.0))
            .collect()
    }

    #[test]
    fn insert_splits_and_overwrites() {
        let mut m = ExtentMap::default();
        m.insert(0, 100, 1, At(1000), |_| {});
        let mut gone = Vec::new();
        m.insert(10, 20, 2, At(5000), |p| {
            gone.push((p.start, p.end, p.value.0))
        });
        assert_eq!(gone, [(10, 20, 1010)]);
        assert_eq!(
            spans(&m),
            [(0, 10, 1, 1000), (10, 20, 2, 5000), (20, 100, 1, 1020)]
        );
        m.insert(5, 25, 3, At(7000), |_| {});
        assert_eq!(
            spans(&m),
            [(0, 5, 1, 1000), (5, 25, 3, 7000), (25, 100, 1, 1025)]
        );
        assert_eq!(m.get(30).map(|s| s.value), Some(At(1030)));
        assert_eq!(m.get(100), None);
        let mut got = Vec::new();
        m.for_each_in(3, 27, |s| got.push((s.start, s.end, s.value.0)));
        assert_eq!(got, [(3, 5, 1003), (5, 25, 7000), (25, 27, 1025)]);
        m.remove(0, 50, |_| {});
        assert_eq!(spans(&m), [(50, 100, 1, 1050)]);
        assert_eq!(m.next_piece_from(0), Some(50));
        assert_eq!(m.next_piece_from(50), Some(50));
        assert_eq!(m.next_piece_from(60), None);
    }

    #[test]
    fn for_each_in_clips_few_and_many_pieces_alike() {
        // Pieces of 3 blocks every 5 blocks: [0,3) [5,8) [10,13) ...
        let mut m = ExtentMap::default();
        for i in 0..40u64 {
            m.insert(i * 5, i * 5 + 3, i, At(1000 * i), |_| {});
        }
        // What every query must see: the pieces, clipped, block by block.
        let oracle = |start: u64, end: u64| {
            let mut want: Vec<(u64, u64, u64)> = Vec::new();
            for b in start..end {
                if let Some(sp) = m.get(b) {
                    match want.last_mut() {
                        Some(l) if l.1 == b && sp.start == b && m.get(b - 1).is_some() => {
                            l.1 = b + 1
                        }
                        _ => want.push((b, b + 1, sp.value.0)),
                    }
                }
            }
            want
        };
        for (start, end) in [
            (0, 1),
            (1, 2),
            (3, 5),
            (2, 11),
            (6, 27),
            (1, 200),
            (0, 400),
            (7, 8),
        ] {
            let mut got = Vec::new();
            m.for_each_in(start, end, |s| got.push((s.start, s.end, s.value.0)));
            assert_eq!(got, oracle(start, end), "[{start}, {end})");
        }
    }

    #[test]
    fn merge_keeps_the_newest_per_block_in_any_order() {
        let newer = |ns: u64, _: &At, os: u64, _: &At| ns > os;
        let ops = [
            (0u64, 50u64, 5u64, 100u64),
            (20, 80, 3, 200),
            (40, 60, 9, 300),
            (10, 30, 7, 400),
        ];
        // Every order of application gives the same map.
        let mut results = Vec::new();
        for perm in [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]] {
            let mut m = ExtentMap::default();
            for i in perm {
                let (s, e, q, v) = ops[i];
                m.merge(s, e, q, At(v), newer, |_| {});
            }
            // Normalise: expand to per-block (seq, value).
            let mut blocks = Vec::new();
            m.for_each_in(0, 100, |s| {
                for b in s.start..s.end {
                    blocks.push((b, s.seq, s.value.0 + (b - s.start)));
                }
            });
            results.push(blocks);
        }
        assert!(results.windows(2).all(|w| w[0] == w[1]));
        let r = &results[0];
        assert_eq!(r[0], (0, 5, 100));
        assert_eq!(r[15], (15, 7, 405));
        assert_eq!(r[45], (45, 9, 305));
        assert_eq!(r[70], (70, 3, 250));
        assert_eq!(r.len(), 80);
    }

    #[test]
    fn merge_reports_losers_and_landed_blocks() {
        let mut m = ExtentMap::default();
        m.insert(0, 10, 5, At(0), |_| {});
        let mut lost = Vec::new();
        let landed = m.merge(
            5,
            20,
            4,
            At(100),
            |ns, _, os, _| ns > os,
            |p| lost.push(p.start),
        );
        assert_eq!(landed, 10, "only the blocks past the newer range land");
        assert!(lost.is_empty());
        let landed = m.merge(
            0,
            20,
            6,
            At(200),
            |ns, _, os, _| ns > os,
            |p| lost.push(p.start),
        );
        assert_eq!(landed, 20);
        assert_eq!(lost, [0, 10]);
        assert_eq!(spans(&m), [(0, 20, 6, 200)], "continuous pieces coalesce");
    }
}
