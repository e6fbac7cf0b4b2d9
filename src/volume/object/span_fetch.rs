//! Fetching scattered runs of one chunk's data with few GETs: garbage
//! collection's live runs of a victim, flatten's runs of a parent's chunk.
//! Runs close together share one ranged GET, reading through the dead
//! blocks between them.

use std::ops::Range;

use super::format::BLOCK;
use super::{Inner, ObjectError};

/// Dead data a fetch reads through rather than split in two: one GET's fixed cost (a round trip, signing, the store's own
/// work per request) is worth about this much transfer, and a fragmented
/// chunk would otherwise cost a GET per live run.
const FETCH_GAP_BLOCKS: u64 = (256 << 10) / BLOCK as u64;

/// A run of a chunk's data to fetch, and where it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Missing {
    /// Its first block in the chunk's data.
    pub(super) from: u32,
    pub(super) blocks: u32,
    /// Where it goes in the caller's buffer (bytes).
    pub(super) to: usize,
}

/// One ranged GET of the chunk's data and the missing runs it carries.
#[derive(Debug, PartialEq, Eq)]
struct Span {
    /// Blocks of the chunk's data.
    blocks: Range<u64>,
    /// The runs in it: indexes into the missing runs, once sorted.
    runs: Range<usize>,
}

/// Sorts `missing` by place in the chunk and groups it into spans, a run
/// joining the span before it when at most `max_gap` blocks lie between
/// them. Every span lies within the chunk's data, as its runs do.
fn plan_spans(missing: &mut [Missing], max_gap: u64) -> Vec<Span> {
    missing.sort_unstable_by_key(|m| m.from);
    let mut spans: Vec<Span> = Vec::new();
    for (i, m) in missing.iter().enumerate() {
        let (start, end) = (u64::from(m.from), u64::from(m.from) + u64::from(m.blocks));
        match spans.last_mut() {
            Some(s) if start <= s.blocks.end + max_gap => {
                s.blocks.end = s.blocks.end.max(end);
                s.runs.end = i + 1;
            }
            _ => spans.push(Span {
                blocks: start..end,
                runs: i..i + 1,
            }),
        }
    }
    spans
}

/// Fetches the missing runs of a chunk (`key`, data from byte
/// `data_start`) into `data`, one ranged GET per span of [`plan_spans`].
pub(super) async fn fetch_missing(
    inner: &Inner,
    key: &str,
    data_start: u64,
    missing: &mut [Missing],
    data: &mut [u8],
) -> Result<(), ObjectError> {
    const B: u64 = BLOCK as u64;
    for span in plan_spans(missing, FETCH_GAP_BLOCKS) {
        let from = data_start + span.blocks.start * B;
        let want = ((span.blocks.end - span.blocks.start) * B) as usize;
        let bytes = inner.store.get_range(key, from..from + want as u64).await?;
        // A range past the object's end comes back clipped, not refused;
        // copying from it would shift every later run.
        if bytes.len() != want {
            return Err(ObjectError::ShortRead {
                key: key.to_owned(),
                got: bytes.len(),
                want,
            });
        }
        for m in &missing[span.runs] {
            let at = (u64::from(m.from) - span.blocks.start) as usize * BLOCK;
            let len = m.blocks as usize * BLOCK;
            data[m.to..m.to + len].copy_from_slice(&bytes[at..at + len]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(from: u32, blocks: u32, to: usize) -> Missing {
        Missing { from, blocks, to }
    }

    fn span(blocks: Range<u64>, runs: Range<usize>) -> Span {
        Span { blocks, runs }
    }

    #[test]
    fn spans_join_runs_across_gaps_up_to_the_limit() {
        // Out of order, as the new chunk's layout (by volume block) leaves
        // them; gaps of 2, 0, 32, 2 and 59 blocks once sorted.
        let runs = [
            run(40, 2, 0),
            run(0, 1, 2),
            run(3, 4, 3),
            run(7, 1, 7),
            run(104, 1, 8),
            run(44, 1, 9),
        ];
        let mut missing = runs.to_vec();
        assert_eq!(plan_spans(&mut missing, 59), [span(0..105, 0..6)]);
        let froms: Vec<u32> = missing.iter().map(|m| m.from).collect();
        assert_eq!(
            froms,
            [0, 3, 7, 40, 44, 104],
            "sorted by place in the victim"
        );
        assert_eq!(
            plan_spans(&mut runs.to_vec(), 58),
            [span(0..45, 0..5), span(104..105, 5..6)]
        );
        assert_eq!(
            plan_spans(&mut runs.to_vec(), 31),
            [span(0..8, 0..3), span(40..45, 3..5), span(104..105, 5..6)]
        );
        assert_eq!(
            plan_spans(&mut runs.to_vec(), 0),
            [
                span(0..1, 0..1),
                span(3..8, 1..3),
                span(40..42, 3..4),
                span(44..45, 4..5),
                span(104..105, 5..6)
            ]
        );
        assert_eq!(plan_spans(&mut [], 64), []);
    }

    #[test]
    fn a_run_inside_another_does_not_shrink_its_span() {
        let mut missing = [run(10, 8, 0), run(12, 2, 32 << 10)];
        assert_eq!(plan_spans(&mut missing, 0), [span(10..18, 0..2)]);
    }
}
