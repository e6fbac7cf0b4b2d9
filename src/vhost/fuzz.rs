//! Fuzz target body for the virtio-blk request parser, kept in the
//! library so that `cargo test` replays the corpus on stable Rust (see
//! `tests/fuzz_corpus.rs`) and `fuzz/` stays a thin wrapper.
//!
//! The input is a whole split virtqueue in a fake guest memory of three
//! regions (two adjacent, one after a hole):
//!
//! ```text
//! byte 0   device: bit 0 read-only, 1 no flush, 2 no discard, 3 no write
//!          zeroes, 4 no unmap, 5 4 KiB blocks; bits 6-7 queue size 4/16/64/256
//! byte 1   chains to take from the avail ring (and the inflight used index)
//! then     the descriptor table (size x 16 bytes) at 0x0,
//!          the avail ring's entries (size x 2 bytes) at 0x1004,
//!          the rest at 0x3000 (headers, data, ranges, indirect tables)
//! ```
//!
//! Each chain the queue yields is walked again by `Chain` (which must
//! agree with `virtio_queue`), parsed, and the result checked against the
//! limits; the tail is also read as an inflight area and recovered.

use std::cell::RefCell;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    VolatileSlice,
};

use super::chain::Chain;
use super::config::{DeviceConfig, ExportCaps, Limits, SECTOR_SIZE};
use super::inflight;
use super::request::{self, Kind, Refusal, Scratch};

// Where the fake guest's pieces live: the descriptor table, the avail and
// used rings, then the bytes descriptors point into.
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
const DATA_AREA: u64 = 0x3000;
/// Regions: [0, 64K) and [64K, 96K) adjacent, [256K, 260K) after a hole.
const REGIONS: [(u64, usize); 3] = [(0, 0x10000), (0x10000, 0x8000), (0x40000, 0x1000)];
/// Bytes of input the data area takes at most (up to the end of region 2).
const DATA_AREA_LEN: usize = 0x18000 - DATA_AREA as usize;
const DISK_BYTES: u64 = 1 << 20;

/// The queue size byte 0 selects.
pub fn queue_size(flags: u8) -> u16 {
    [4, 16, 64, 256][usize::from(flags >> 6)]
}

fn device(flags: u8) -> DeviceConfig {
    let caps = ExportCaps {
        size_bytes: DISK_BYTES,
        block_size: if flags & 32 != 0 { 4096 } else { 512 },
        read_only: flags & 1 != 0,
        flush: flags & 2 == 0,
        trim: flags & 4 == 0 && flags & 16 == 0,
        write_zeroes: flags & 8 == 0,
        num_queues: 1,
    };
    // Every combination above is a valid export.
    match DeviceConfig::new(&caps) {
        Ok(d) => d,
        Err(e) => panic!("fuzz export refused: {e}"),
    }
}

thread_local! {
    static MEM: RefCell<Option<GuestMemoryMmap>> = const { RefCell::new(None) };
}

/// A zeroed fake guest memory, reused between inputs.
fn with_memory<T>(f: impl FnOnce(&GuestMemoryMmap) -> T) -> T {
    MEM.with(|m| {
        let mut m = m.borrow_mut();
        let mem = m.get_or_insert_with(|| {
            let ranges: Vec<_> = REGIONS.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
            match GuestMemoryMmap::from_ranges(&ranges) {
                Ok(mem) => mem,
                Err(e) => panic!("fake guest memory: {e}"),
            }
        });
        static ZEROES: [u8; 0x10000] = [0; 0x10000];
        for &(a, l) in &REGIONS {
            let _ = mem.write_slice(&ZEROES[..l], GuestAddress(a));
        }
        f(mem)
    })
}

fn same(a: &Descriptor, b: &Descriptor) -> bool {
    (a.addr(), a.len(), a.flags(), a.next()) == (b.addr(), b.len(), b.flags(), b.next())
}

/// The fuzz target body.
pub fn virtio_blk(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Some((&count, rest)) = rest.split_first() else {
        return;
    };
    let size = queue_size(flags);
    let table_len = usize::from(size) * 16;
    let ring_len = usize::from(size) * 2;
    let config = device(flags);
    let limits = config.negotiated(config.features);
    with_memory(|mem| {
        let (table, rest) = rest.split_at(rest.len().min(table_len));
        let (ring, tail) = rest.split_at(rest.len().min(ring_len));
        let tail = &tail[..tail.len().min(DATA_AREA_LEN)];
        let _ = mem.write_slice(table, GuestAddress(DESC_TABLE));
        let _ = mem.write_slice(ring, GuestAddress(AVAIL_RING + 4));
        let _ = mem.write_slice(tail, GuestAddress(DATA_AREA));
        let avail = u16::from(count) % (size + 1);
        let _ = mem.write_obj(avail, GuestAddress(AVAIL_RING + 2));

        let mut q = match Queue::new(size) {
            Ok(q) => q,
            Err(e) => panic!("queue of {size}: {e}"),
        };
        let placed = q
            .try_set_desc_table_address(GuestAddress(DESC_TABLE))
            .is_ok()
            && q.try_set_avail_ring_address(GuestAddress(AVAIL_RING))
                .is_ok()
            && q.try_set_used_ring_address(GuestAddress(USED_RING)).is_ok();
        assert!(placed, "ring addresses refused");
        q.set_ready(true);
        assert!(q.is_valid(mem), "fake queue invalid");

        let mut scratch = Scratch::with_capacity(size);
        for _ in 0..avail {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let theirs: Vec<Descriptor> = chain.clone().collect();
            let ours: Vec<Descriptor> =
                Chain::new(mem, GuestAddress(DESC_TABLE), size, head).collect();
            assert!(
                theirs.len() == ours.len() && theirs.iter().zip(&ours).all(|(a, b)| same(a, b)),
                "chain walks differ at head {head}: {} vs {} descriptors",
                theirs.len(),
                ours.len()
            );
            let parsed = request::parse(mem, chain, size, &limits, &mut scratch);
            check(mem, &limits, &scratch, parsed, size);
        }
        check_inflight(tail, size, u16::from(count));
    });
}

fn check(
    mem: &GuestMemoryMmap,
    limits: &Limits,
    scratch: &Scratch,
    parsed: Result<request::Request, Refusal>,
    size: u16,
) {
    let req = match parsed {
        Ok(r) => r,
        Err(Refusal::Status { at, status, .. }) => {
            assert!(mem.check_range(at, 1), "status outside memory");
            assert!(status == 1 || status == 2, "status {status}");
            return;
        }
        Err(Refusal::BadChain(_)) => return,
    };
    assert!(mem.check_range(req.status, 1), "status outside memory");
    let mut total = 0u64;
    for s in &scratch.segments {
        assert!(s.len > 0, "empty segment");
        let region = mem.find_region(s.addr).expect("segment outside memory");
        let end = s.addr.checked_add(u64::from(s.len) - 1).expect("wraps");
        assert!(
            end <= region.last_addr(),
            "segment crosses a region boundary"
        );
        total += u64::from(s.len);
    }
    assert!(scratch.segments.len() <= usize::from(size) * REGIONS.len());
    let block = u64::from(limits.block_size);
    match req.kind {
        Kind::Read | Kind::Write => {
            assert_eq!(total, u64::from(req.len), "segments vs length");
            assert!(!(req.kind == Kind::Write && limits.read_only));
            let offset = req.sector.checked_mul(SECTOR_SIZE).expect("overflow");
            assert_eq!(offset % block, 0);
            assert_eq!(u64::from(req.len) % block, 0);
            assert!(offset + u64::from(req.len) <= limits.capacity_sectors * SECTOR_SIZE);
        }
        Kind::GetId => {
            assert_eq!(total, u64::from(req.len));
            assert!(req.len > 0);
        }
        Kind::Flush => {
            assert!(limits.flush);
            assert_eq!(req.len, 0);
        }
        Kind::Discard | Kind::WriteZeroes => {
            assert!(!limits.read_only);
            let (enabled, max_seg, max_sectors) = if req.kind == Kind::Discard {
                (
                    limits.discard,
                    limits.max_discard_seg,
                    limits.max_discard_sectors,
                )
            } else {
                (
                    limits.write_zeroes,
                    limits.max_write_zeroes_seg,
                    limits.max_write_zeroes_sectors,
                )
            };
            assert!(enabled);
            let n = scratch.ranges.len();
            assert!(n >= 1 && n <= max_seg as usize);
            for r in &scratch.ranges {
                assert!(r.sectors <= max_sectors);
                assert!(r.sector + u64::from(r.sectors) <= limits.capacity_sectors);
                assert!(
                    !r.unmap || (req.kind == Kind::WriteZeroes && limits.write_zeroes_may_unmap)
                );
            }
        }
    }
}

/// Reads the tail as a queue's inflight area (what a frontend hands over)
/// and checks that recovery stays within the queue.
fn check_inflight(tail: &[u8], size: u16, used_idx: u16) {
    // u64s, so the area's fields are aligned as in a real mapping.
    let mut area = vec![0u64; inflight::queue_area_size(size) / 8];
    for (i, b) in tail.iter().take(area.len() * 8).enumerate() {
        area[i / 8] |= u64::from(*b) << (8 * (i % 8));
    }
    // SAFETY: the u64 buffer viewed as bytes, for its whole length, with no
    // other reference to it while the slice lives.
    let bytes =
        unsafe { std::slice::from_raw_parts_mut(area.as_mut_ptr().cast::<u8>(), area.len() * 8) };
    let slice = VolatileSlice::from(bytes);
    let r = inflight::recover(&slice, size, used_idx);
    assert!(r.resubmit.len() <= usize::from(size));
    assert!(
        r.resubmit.iter().all(|&h| h < size),
        "head beyond the queue"
    );
    let mut heads = r.resubmit.clone();
    heads.sort_unstable();
    heads.dedup();
    assert_eq!(heads.len(), r.resubmit.len(), "a head twice");
    assert_eq!(r.next_avail, used_idx.wrapping_add(r.resubmit.len() as u16));
    // A second recovery with no progress in between finds the same.
    assert_eq!(inflight::recover(&slice, size, used_idx), r);
}

/// One seed: device flags, descriptors (addr, len, flags, next) from index
/// 0, the avail ring's heads, and (address, bytes) put in the data area.
type Case = (u8, Vec<(u64, u32, u16, u16)>, Vec<u16>, Vec<(u64, Vec<u8>)>);

fn header(t: u32, sector: u64) -> Vec<u8> {
    let mut h = t.to_le_bytes().to_vec();
    h.extend([0; 4]);
    h.extend(sector.to_le_bytes());
    h
}

fn range(sector: u64, n: u32, flags: u32) -> Vec<u8> {
    let mut r = sector.to_le_bytes().to_vec();
    r.extend(n.to_le_bytes());
    r.extend(flags.to_le_bytes());
    r
}

fn desc_bytes(addr: u64, len: u32, flags: u16, next: u16) -> Vec<u8> {
    let mut b = addr.to_le_bytes().to_vec();
    b.extend(len.to_le_bytes());
    b.extend(flags.to_le_bytes());
    b.extend(next.to_le_bytes());
    b
}

/// Encodes a case as a fuzz input.
fn encode((flags, descs, heads, data): Case) -> Vec<u8> {
    let size = usize::from(queue_size(flags));
    let mut out = vec![flags, heads.len() as u8];
    let mut table = vec![0u8; size * 16];
    for (i, &(a, l, f, n)) in descs.iter().enumerate() {
        table[i * 16..i * 16 + 16].copy_from_slice(&desc_bytes(a, l, f, n));
    }
    out.extend(table);
    let mut ring = vec![0u8; size * 2];
    for (i, h) in heads.iter().enumerate() {
        ring[i * 2..i * 2 + 2].copy_from_slice(&h.to_le_bytes());
    }
    out.extend(ring);
    let mut area = Vec::new();
    for (addr, bytes) in data {
        let at = (addr - DATA_AREA) as usize;
        if area.len() < at + bytes.len() {
            area.resize(at + bytes.len(), 0);
        }
        area[at..at + bytes.len()].copy_from_slice(&bytes);
    }
    out.extend(area);
    out
}

/// Hand-made inputs: one valid request of each kind, the layouts drivers
/// use (indirect tables, buffers across regions, ranges split across
/// descriptors), and broken ones (a loop, a missing status).
pub fn seeds() -> Vec<Vec<u8>> {
    const R: u16 = 0;
    const W: u16 = 2; // VRING_DESC_F_WRITE
    const N: u16 = 1; // VRING_DESC_F_NEXT
    const I: u16 = 4; // VRING_DESC_F_INDIRECT
    let h = DATA_AREA; // request headers
    let st = DATA_AREA + 0x100; // status bytes
    let d = DATA_AREA + 0x1000; // data buffers
    let cases: Vec<Case> = vec![
        // read 4 KiB at sector 8
        (
            0x40,
            vec![(h, 16, R | N, 1), (d, 4096, W | N, 2), (st, 1, W, 0)],
            vec![0],
            vec![(h, header(0, 8))],
        ),
        // write 1 KiB from two buffers, then flush, then get-id
        (
            0x40,
            vec![
                (h, 16, R | N, 1),
                (d, 512, R | N, 2),
                (d + 512, 512, R | N, 3),
                (st, 1, W, 0),
                (h + 16, 16, R | N, 5),
                (st + 1, 1, W, 0),
                (h + 32, 16, R | N, 7),
                (d, 20, W | N, 8),
                (st + 2, 1, W, 0),
            ],
            vec![0, 4, 6],
            vec![(h, [header(1, 0), header(4, 0), header(8, 0)].concat())],
        ),
        // discard two ranges split across descriptors; write zeroes + unmap
        (
            0x40,
            vec![
                (h, 16, R | N, 1),
                (d, 10, R | N, 2),
                (d + 10, 22, R | N, 3),
                (st, 1, W, 0),
                (h + 16, 16, R | N, 5),
                (d + 32, 16, R | N, 6),
                (st + 1, 1, W, 0),
            ],
            vec![0, 4],
            vec![
                (h, [header(11, 0), header(13, 0)].concat()),
                (
                    d,
                    [range(0, 8, 0), range(64, 16, 0), range(8, 8, 1)].concat(),
                ),
            ],
        ),
        // an indirect table of three at d + 0x800, 4 KiB blocks
        (
            0x60,
            vec![(d + 0x800, 48, I, 0)],
            vec![0],
            vec![
                (h, header(0, 16)),
                (
                    d + 0x800,
                    [
                        desc_bytes(h, 16, R | N, 1),
                        desc_bytes(d, 4096, W | N, 2),
                        desc_bytes(st, 1, W, 0),
                    ]
                    .concat(),
                ),
            ],
        ),
        // a read across the two adjacent regions
        (
            0x40,
            vec![(h, 16, R | N, 1), (0xf000, 8192, W | N, 2), (st, 1, W, 0)],
            vec![0],
            vec![(h, header(0, 0))],
        ),
        // a loop, a missing status, a read-only write, an unknown type
        (
            0x41,
            vec![
                (h, 16, R | N, 0),
                (h, 16, R | N, 2),
                (d, 512, W, 0),
                (h + 16, 16, R | N, 4),
                (d, 512, R | N, 5),
                (st, 1, W, 0),
                (h + 32, 16, R | N, 7),
                (st + 1, 1, W, 0),
            ],
            vec![0, 1, 3, 6],
            vec![(h, [header(0, 0), header(1, 0), header(99, 0)].concat())],
        ),
    ];
    cases.into_iter().map(encode).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_reach_the_request_checks() {
        for s in seeds() {
            virtio_blk(&s);
        }
        // The first seed is a valid read, not just a refusal.
        let s = &seeds()[0];
        with_memory(|mem| {
            let size = queue_size(s[0]);
            let tail = 2 + usize::from(size) * 18;
            mem.write_slice(&s[2..2 + usize::from(size) * 16], GuestAddress(DESC_TABLE))
                .unwrap();
            mem.write_slice(&s[tail..], GuestAddress(DATA_AREA))
                .unwrap();
            let chain = Chain::new(mem, GuestAddress(DESC_TABLE), size, 0);
            let limits = device(s[0]).limits;
            let mut sc = Scratch::with_capacity(size);
            let r = request::parse(mem, chain, size, &limits, &mut sc).unwrap();
            assert_eq!((r.kind, r.sector, r.len), (Kind::Read, 8, 4096));
        });
    }
}
