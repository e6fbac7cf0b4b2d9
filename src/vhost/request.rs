//! The virtio-blk request parser, sans-IO: a pure function from one
//! descriptor chain over guest memory to a typed request, or a typed
//! refusal saying which status the guest gets (or that the chain is too
//! broken to carry one). It reads the 16-byte header and the
//! discard/write-zeroes ranges from guest memory and nothing else; data
//! stays in the guest, described by segments for the I/O path.

use std::fmt;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::config::{Limits, SECTOR_SIZE};

/// Bytes of the request header (`virtio_blk_outhdr`: type, ioprio, sector).
pub(crate) const HEADER_LEN: u32 = 16;
/// Bytes of one discard/write-zeroes range (`virtio_blk_discard_write_zeroes`).
pub(crate) const RANGE_LEN: u32 = 16;
/// Bytes a GET_ID reply fills at most (`VIRTIO_BLK_ID_BYTES`).
pub(crate) const ID_LEN: u32 = 20;

/// One host-contiguous piece of guest memory: never crosses a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    /// Guest-physical address of the first byte.
    pub(crate) addr: GuestAddress,
    /// Bytes, at least 1.
    pub(crate) len: u32,
}

/// One DISCARD or WRITE_ZEROES range, checked against the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Range {
    /// First 512-byte sector.
    pub(crate) sector: u64,
    /// Length in sectors (may be 0: nothing to do).
    pub(crate) sectors: u32,
    /// WRITE_ZEROES may deallocate (never set for DISCARD).
    pub(crate) unmap: bool,
}

/// What the guest asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// VIRTIO_BLK_T_IN: the disk into the guest's segments.
    Read,
    /// VIRTIO_BLK_T_OUT: the guest's segments onto the disk.
    Write,
    /// VIRTIO_BLK_T_FLUSH: every completed write made durable.
    Flush,
    /// The serial into the guest's segments (at most [`ID_LEN`] bytes).
    GetId,
    /// Ranges in [`Scratch::ranges`].
    Discard,
    /// Ranges in [`Scratch::ranges`].
    WriteZeroes,
}

/// A request that passed every check: its data segments are in
/// [`Scratch::segments`], in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Request {
    /// What to do.
    pub(crate) kind: Kind,
    /// First sector (Read and Write; 0 otherwise).
    pub(crate) sector: u64,
    /// Data bytes across the segments.
    pub(crate) len: u32,
    /// Where the one-byte status goes.
    pub(crate) status: GuestAddress,
}

/// Buffers the parser fills, owned by the queue and reused for every
/// request, so parsing allocates only while they grow to their bound
/// (`seg_max` segments times regions crossed; `max_*_seg` ranges).
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    /// A read's, write's or GET_ID's data, in stream order.
    pub(crate) segments: Vec<Segment>,
    /// A DISCARD's or WRITE_ZEROES's ranges, decoded and checked.
    pub(crate) ranges: Vec<Range>,
    /// The chain, collected first so its last descriptor can be checked.
    descs: Vec<Descriptor>,
}

impl Scratch {
    /// Buffers sized for `queue_size`-long chains.
    pub(crate) fn with_capacity(queue_size: u16) -> Self {
        Scratch {
            segments: Vec::with_capacity(usize::from(queue_size)),
            ranges: Vec::with_capacity(16),
            descs: Vec::with_capacity(usize::from(queue_size)),
        }
    }
}

/// Why a request is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Reason {
    #[error("empty chain (bad head index or indirect table)")]
    Empty,
    #[error("chain longer than the queue ({0} descriptors)")]
    TooLong(u16),
    #[error("chain cut short: a next index or indirect table is invalid")]
    Truncated,
    #[error("last descriptor ({len} bytes, writable: {writable}) is not a 1-byte status")]
    StatusDescriptor { len: u32, writable: bool },
    #[error("status byte at {0:#x} is outside guest memory")]
    StatusOutsideMemory(u64),
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("header descriptor is {0} bytes or device-writable; needs 16 readable")]
    Header(u32),
    #[error("buffer {addr:#x}+{len} is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("request type {0} is not supported")]
    UnknownType(u32),
    #[error("{0:?} was not negotiated")]
    NotNegotiated(Kind),
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("{0:?} carries data in the wrong direction")]
    WrongDirection(Kind),
    #[error("{0} data segments (at most {1})")]
    TooManySegments(u32, u32),
    #[error("data segment of {0} bytes (at most {1})")]
    SegmentTooLarge(u32, u32),
    #[error("{0:?} needs data")]
    NoData(Kind),
    #[error("sector {0} overflows")]
    Overflow(u64),
    #[error("sector {sector} + {sectors} is beyond the disk's {capacity} sectors")]
    OutOfRange {
        sector: u64,
        sectors: u64,
        capacity: u64,
    },
    #[error("sector {sector} + {bytes} bytes is not aligned to {block}-byte blocks")]
    Unaligned { sector: u64, bytes: u64, block: u32 },
    #[error("range list of {0} bytes is not a multiple of 16")]
    RangeList(u32),
    #[error("{0} ranges (at most {1})")]
    TooManyRanges(u32, u32),
    #[error("range of {0} sectors (at most {1})")]
    RangeTooLarge(u32, u32),
    #[error("range flags {0:#x} are not supported")]
    RangeFlags(u32),
}

/// A refused request and what the guest sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Write `status` (VIRTIO_BLK_S_IOERR or _UNSUPP) at `at` and complete
    /// the chain with one byte used.
    Status {
        at: GuestAddress,
        status: u8,
        reason: Reason,
    },
    /// No usable status byte: complete the chain with nothing written and
    /// count it against the driver (a conforming driver never sends one).
    BadChain(Reason),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Status { status, reason, .. } => write!(f, "{reason} (status {status})"),
            Refusal::BadChain(reason) => write!(f, "malformed chain: {reason}"),
        }
    }
}

const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// Parses one chain. `descs` yields the chain's descriptors in order (a
/// `virtio_queue::DescriptorChain`, or [`super::chain::Chain`] for a
/// re-submitted head); `queue_size` bounds its length; `limits` are the
/// negotiated ones. On success the data segments are in `scratch`.
pub(crate) fn parse<M: GuestMemoryBackend>(
    mem: &M,
    descs: impl IntoIterator<Item = Descriptor>,
    queue_size: u16,
    limits: &Limits,
    scratch: &mut Scratch,
) -> Result<Request, Refusal> {
    scratch.segments.clear();
    scratch.ranges.clear();
    scratch.descs.clear();
    for d in descs {
        if scratch.descs.len() >= usize::from(queue_size) {
            return Err(Refusal::BadChain(Reason::TooLong(queue_size)));
        }
        scratch.descs.push(d);
    }
    let descs = &scratch.descs;
    let (last, body) = descs.split_last().ok_or(Refusal::BadChain(Reason::Empty))?;
    // The walk stops early, without saying why, on a bad next index, an
    // unreadable descriptor or a too-long chain: what it yielded last still
    // points onward.
    if last.has_next() {
        return Err(Refusal::BadChain(Reason::Truncated));
    }
    if !last.is_write_only() || last.len() != 1 {
        return Err(Refusal::BadChain(Reason::StatusDescriptor {
            len: last.len(),
            writable: last.is_write_only(),
        }));
    }
    let status = last.addr();
    if !mem.check_range(status, 1) {
        return Err(Refusal::BadChain(Reason::StatusOutsideMemory(status.0)));
    }
    let ioerr = |reason| Refusal::Status {
        at: status,
        status: IOERR,
        reason,
    };
    let unsupp = |reason| Refusal::Status {
        at: status,
        status: UNSUPP,
        reason,
    };

    // Device-readable descriptors first, then device-writable ones.
    let readable = body.iter().take_while(|d| !d.is_write_only()).count();
    let (out, inn) = body.split_at(readable);
    if inn.iter().any(|d| !d.is_write_only()) {
        return Err(ioerr(Reason::ReadableAfterWritable));
    }
    let header = match out.first() {
        Some(h) if h.len() >= HEADER_LEN => *h,
        Some(h) => return Err(ioerr(Reason::Header(h.len()))),
        None => return Err(ioerr(Reason::Header(0))),
    };
    let mut hdr = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut hdr, header.addr())
        .map_err(|_| ioerr(outside(header.addr(), HEADER_LEN)))?;
    let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes([
        hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
    ]);
    // ANY_LAYOUT: the header's descriptor may carry data after the header.
    let rest = (header.len() > HEADER_LEN).then(|| {
        Descriptor::new(
            header.addr().0.wrapping_add(u64::from(HEADER_LEN)),
            header.len() - HEADER_LEN,
            0,
            0,
        )
    });
    let out_data = rest.iter().chain(&out[1..]);
    let out_len: u64 = out_data.clone().map(|d| u64::from(d.len())).sum();
    let in_len: u64 = inn.iter().map(|d| u64::from(d.len())).sum();

    let kind = match req_type {
        VIRTIO_BLK_T_IN => Kind::Read,
        VIRTIO_BLK_T_OUT => Kind::Write,
        VIRTIO_BLK_T_FLUSH => Kind::Flush,
        VIRTIO_BLK_T_GET_ID => Kind::GetId,
        VIRTIO_BLK_T_DISCARD => Kind::Discard,
        VIRTIO_BLK_T_WRITE_ZEROES => Kind::WriteZeroes,
        t => return Err(unsupp(Reason::UnknownType(t))),
    };
    let negotiated = match kind {
        Kind::Flush => limits.flush,
        Kind::Discard => limits.discard,
        Kind::WriteZeroes => limits.write_zeroes,
        Kind::Read | Kind::Write | Kind::GetId => true,
    };
    if !negotiated {
        return Err(unsupp(Reason::NotNegotiated(kind)));
    }
    if limits.read_only && matches!(kind, Kind::Write | Kind::Discard | Kind::WriteZeroes) {
        return Err(ioerr(Reason::ReadOnly));
    }
    // Which side carries data; the other side must be empty.
    let (data_in, wrong) = match kind {
        Kind::Read | Kind::GetId => (true, out_len),
        Kind::Write | Kind::Discard | Kind::WriteZeroes => (false, in_len),
        Kind::Flush => (false, out_len + in_len),
    };
    if wrong != 0 {
        return Err(ioerr(Reason::WrongDirection(kind)));
    }

    let mut req = Request {
        kind,
        sector: 0,
        len: 0,
        status,
    };
    match kind {
        Kind::Flush => {}
        Kind::Read | Kind::Write | Kind::GetId => {
            let data: &mut dyn Iterator<Item = &Descriptor> = if data_in {
                &mut inn.iter()
            } else {
                &mut out_data.clone()
            };
            let len = collect_segments(mem, data, limits, &mut scratch.segments).map_err(ioerr)?;
            if kind == Kind::GetId {
                if len == 0 {
                    return Err(ioerr(Reason::NoData(kind)));
                }
            } else {
                check_range(sector, u64::from(len), limits).map_err(ioerr)?;
                req.sector = sector;
            }
            req.len = len;
        }
        Kind::Discard | Kind::WriteZeroes => {
            let len = collect_segments(mem, &mut out_data.clone(), limits, &mut scratch.segments)
                .map_err(ioerr)?;
            if len == 0 || !len.is_multiple_of(RANGE_LEN) {
                return Err(ioerr(Reason::RangeList(len)));
            }
            let (max_seg, max_sectors) = if kind == Kind::Discard {
                (limits.max_discard_seg, limits.max_discard_sectors)
            } else {
                (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
            };
            let count = len / RANGE_LEN;
            if count > max_seg {
                return Err(unsupp(Reason::TooManyRanges(count, max_seg)));
            }
            for i in 0..count {
                let mut raw = [0u8; RANGE_LEN as usize];
                read_stream(mem, &scratch.segments, i * RANGE_LEN, &mut raw).map_err(ioerr)?;
                let r = range(&raw, kind, max_sectors, limits).map_err(|(s, reason)| {
                    Refusal::Status {
                        at: status,
                        status: s,
                        reason,
                    }
                })?;
                scratch.ranges.push(r);
            }
            // The ranges are all that the I/O path needs.
            scratch.segments.clear();
        }
    }
    Ok(req)
}

fn outside(addr: GuestAddress, len: u32) -> Reason {
    Reason::OutsideMemory { addr: addr.0, len }
}

/// Appends the data descriptors as region-bounded segments; returns the
/// total bytes.
fn collect_segments<M: GuestMemoryBackend>(
    mem: &M,
    data: &mut dyn Iterator<Item = &Descriptor>,
    limits: &Limits,
    out: &mut Vec<Segment>,
) -> Result<u32, Reason> {
    let mut count = 0u32;
    let mut total = 0u32;
    for d in data {
        count += 1;
        if count > limits.seg_max {
            return Err(Reason::TooManySegments(count, limits.seg_max));
        }
        if d.len() > limits.size_max {
            return Err(Reason::SegmentTooLarge(d.len(), limits.size_max));
        }
        // The chain walk already refuses chains above 4 GiB in total.
        total = total
            .checked_add(d.len())
            .ok_or(Reason::SegmentTooLarge(d.len(), limits.size_max))?;
        split_by_region(mem, d.addr(), d.len(), out)?;
    }
    Ok(total)
}

/// Splits `addr+len` at region boundaries, so each piece maps to one
/// contiguous host range.
fn split_by_region<M: GuestMemoryBackend>(
    mem: &M,
    addr: GuestAddress,
    len: u32,
    out: &mut Vec<Segment>,
) -> Result<(), Reason> {
    let mut at = addr;
    let mut left = u64::from(len);
    while left > 0 {
        let region = mem.find_region(at).ok_or(outside(addr, len))?;
        let offset = at.unchecked_offset_from(region.start_addr());
        let piece = (region.len() - offset).min(left);
        out.push(Segment {
            addr: at,
            len: piece as u32,
        });
        left -= piece;
        at = at.checked_add(piece).ok_or(outside(addr, len))?;
    }
    Ok(())
}

/// Reads `buf.len()` bytes at byte `offset` of the stream the segments form.
fn read_stream<M: GuestMemoryBackend>(
    mem: &M,
    segments: &[Segment],
    mut offset: u32,
    buf: &mut [u8],
) -> Result<(), Reason> {
    let mut done = 0;
    for s in segments {
        if done == buf.len() {
            break;
        }
        if offset >= s.len {
            offset -= s.len;
            continue;
        }
        let n = ((s.len - offset) as usize).min(buf.len() - done);
        let at = s.addr.unchecked_add(u64::from(offset));
        mem.read_slice(&mut buf[done..done + n], at)
            .map_err(|_| outside(at, n as u32))?;
        done += n;
        offset = 0;
    }
    // Segments were checked to cover the stream, so this is never short.
    if done == buf.len() {
        Ok(())
    } else {
        Err(Reason::RangeList(done as u32))
    }
}

/// Checks a read or write of `bytes` at `sector` against the disk.
fn check_range(sector: u64, bytes: u64, limits: &Limits) -> Result<(), Reason> {
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(Reason::Overflow(sector))?;
    let block = u64::from(limits.block_size);
    if !offset.is_multiple_of(block) || !bytes.is_multiple_of(block) {
        return Err(Reason::Unaligned {
            sector,
            bytes,
            block: limits.block_size,
        });
    }
    let sectors = bytes / SECTOR_SIZE;
    match sector.checked_add(sectors) {
        Some(end) if end <= limits.capacity_sectors => Ok(()),
        _ => Err(Reason::OutOfRange {
            sector,
            sectors,
            capacity: limits.capacity_sectors,
        }),
    }
}

/// Decodes and checks one discard/write-zeroes range; the error carries
/// the status the spec (and QEMU) give it.
fn range(
    raw: &[u8; RANGE_LEN as usize],
    kind: Kind,
    max_sectors: u32,
    limits: &Limits,
) -> Result<Range, (u8, Reason)> {
    let sector = u64::from_le_bytes([
        raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7],
    ]);
    let sectors = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
    let flags = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
    let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
    // Unknown flags, and UNMAP on a discard, are "unsupported" (virtio 1.2
    // 5.2.6.2); so is UNMAP when the device did not offer it.
    if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0
        || (unmap && (kind == Kind::Discard || !limits.write_zeroes_may_unmap))
    {
        return Err((UNSUPP, Reason::RangeFlags(flags)));
    }
    if sectors > max_sectors {
        return Err((IOERR, Reason::RangeTooLarge(sectors, max_sectors)));
    }
    check_range(sector, u64::from(sectors) * SECTOR_SIZE, limits).map_err(|r| (IOERR, r))?;
    Ok(Range {
        sector,
        sectors,
        unmap,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhost::config::{DeviceConfig, ExportCaps};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::GuestMemoryMmap;

    const R: u16 = 0;
    const W: u16 = VRING_DESC_F_WRITE as u16;
    const HDR: u64 = 0x1000;
    const DATA: u64 = 0x2000;
    const STATUS: u64 = 0x9000;

    /// Two adjacent regions (0..64K, 64K..128K) and one after a hole.
    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x10000),
            (GuestAddress(0x100000), 0x1000),
        ])
        .unwrap()
    }

    fn limits() -> Limits {
        DeviceConfig::new(&ExportCaps {
            size_bytes: 1 << 20,
            block_size: 512,
            read_only: false,
            flush: true,
            trim: true,
            write_zeroes: true,
            num_queues: 1,
        })
        .unwrap()
        .limits
    }

    fn header(m: &GuestMemoryMmap, t: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    /// A chain from (addr, len, flags) triples; NEXT is added as needed.
    fn chain(parts: &[(u64, u32, u16)]) -> Vec<Descriptor> {
        let n = parts.len();
        parts
            .iter()
            .enumerate()
            .map(|(i, &(a, l, f))| {
                let next = if i + 1 < n {
                    VRING_DESC_F_NEXT as u16
                } else {
                    0
                };
                Descriptor::new(a, l, f | next, i as u16 + 1)
            })
            .collect()
    }

    fn run(m: &GuestMemoryMmap, descs: Vec<Descriptor>, l: &Limits) -> Result<Request, Refusal> {
        let mut s = Scratch::with_capacity(128);
        parse(m, descs, 128, l, &mut s)
    }

    fn run_s(
        m: &GuestMemoryMmap,
        descs: Vec<Descriptor>,
        l: &Limits,
    ) -> (Result<Request, Refusal>, Scratch) {
        let mut s = Scratch::with_capacity(128);
        let r = parse(m, descs, 128, l, &mut s);
        (r, s)
    }

    fn status_of(r: Result<Request, Refusal>) -> (u8, Reason) {
        match r {
            Err(Refusal::Status { at, status, reason }) => {
                assert_eq!(at, GuestAddress(STATUS));
                (status, reason)
            }
            other => panic!("expected a status refusal, got {other:?}"),
        }
    }

    fn bad_chain(r: Result<Request, Refusal>) -> Reason {
        match r {
            Err(Refusal::BadChain(reason)) => reason,
            other => panic!("expected a bad chain, got {other:?}"),
        }
    }

    #[test]
    fn read_write_flush_and_get_id() {
        let m = mem();
        let l = limits();
        header(&m, VIRTIO_BLK_T_IN, 8);
        let (r, s) = run_s(
            &m,
            chain(&[(HDR, 16, R), (DATA, 4096, W), (STATUS, 1, W)]),
            &l,
        );
        assert_eq!(
            r,
            Ok(Request {
                kind: Kind::Read,
                sector: 8,
                len: 4096,
                status: GuestAddress(STATUS)
            })
        );
        assert_eq!(
            s.segments,
            [Segment {
                addr: GuestAddress(DATA),
                len: 4096
            }]
        );

        header(&m, VIRTIO_BLK_T_OUT, 0);
        let r = run(
            &m,
            chain(&[
                (HDR, 16, R),
                (DATA, 512, R),
                (DATA + 512, 1024, R),
                (STATUS, 1, W),
            ]),
            &l,
        )
        .unwrap();
        assert_eq!((r.kind, r.len), (Kind::Write, 1536));

        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        let r = run(&m, chain(&[(HDR, 16, R), (STATUS, 1, W)]), &l).unwrap();
        assert_eq!((r.kind, r.len), (Kind::Flush, 0));

        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        let r = run(
            &m,
            chain(&[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)]),
            &l,
        )
        .unwrap();
        assert_eq!((r.kind, r.len), (Kind::GetId, 20));
    }

    #[test]
    fn data_in_the_header_descriptor_and_across_regions() {
        let m = mem();
        let l = limits();
        // ANY_LAYOUT: header and data in one readable buffer.
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let (r, s) = run_s(&m, chain(&[(HDR, 16 + 512, R), (STATUS, 1, W)]), &l);
        assert_eq!(r.unwrap().len, 512);
        assert_eq!(s.segments[0].addr, GuestAddress(HDR + 16));
        // A buffer spanning the two adjacent regions becomes two segments.
        header(&m, VIRTIO_BLK_T_IN, 0);
        let (r, s) = run_s(
            &m,
            chain(&[(HDR, 16, R), (0xf000, 8192, W), (STATUS, 1, W)]),
            &l,
        );
        assert_eq!(r.unwrap().len, 8192);
        assert_eq!(
            s.segments,
            [
                Segment {
                    addr: GuestAddress(0xf000),
                    len: 4096
                },
                Segment {
                    addr: GuestAddress(0x10000),
                    len: 4096
                }
            ]
        );
    }

    #[test]
    fn broken_chains_have_no_status() {
        let m = mem();
        let l = limits();
        header(&m, VIRTIO_BLK_T_IN, 0);
        assert_eq!(bad_chain(run(&m, vec![], &l)), Reason::Empty);
        // The walk stopped on a descriptor that still says NEXT.
        let mut c = chain(&[(HDR, 16, R), (DATA, 512, W)]);
        c.truncate(1);
        assert_eq!(bad_chain(run(&m, c, &l)), Reason::Truncated);
        // A data buffer where the status byte belongs.
        assert_eq!(
            bad_chain(run(&m, chain(&[(HDR, 16, R), (DATA, 512, W)]), &l)),
            Reason::StatusDescriptor {
                len: 512,
                writable: true
            }
        );
        // A device-readable status.
        assert_eq!(
            bad_chain(run(&m, chain(&[(HDR, 16, R), (STATUS, 1, R)]), &l)),
            Reason::StatusDescriptor {
                len: 1,
                writable: false
            }
        );
        // A status byte in the hole between regions.
        assert_eq!(
            bad_chain(run(&m, chain(&[(HDR, 16, R), (0x50000, 1, W)]), &l)),
            Reason::StatusOutsideMemory(0x50000)
        );
        // Longer than the queue.
        let long: Vec<_> = (0..129).map(|_| (DATA, 512, W)).collect();
        let mut s = Scratch::with_capacity(128);
        assert_eq!(
            bad_chain(parse(&m, chain(&long), 128, &l, &mut s)),
            Reason::TooLong(128)
        );
    }

    #[test]
    fn header_problems_are_io_errors() {
        let m = mem();
        let l = limits();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let (s, r) = status_of(run(&m, chain(&[(HDR, 8, R), (STATUS, 1, W)]), &l));
        assert_eq!((s, r), (IOERR, Reason::Header(8)));
        let (s, r) = status_of(run(&m, chain(&[(STATUS, 1, W)]), &l));
        assert_eq!((s, r), (IOERR, Reason::Header(0)));
        // Header outside guest memory.
        let (s, r) = status_of(run(&m, chain(&[(0x80000, 16, R), (STATUS, 1, W)]), &l));
        assert_eq!(
            (s, r),
            (
                IOERR,
                Reason::OutsideMemory {
                    addr: 0x80000,
                    len: 16
                }
            )
        );
        // Readable after writable.
        let (s, r) = status_of(run(
            &m,
            chain(&[(HDR, 16, R), (DATA, 512, W), (DATA, 512, R), (STATUS, 1, W)]),
            &l,
        ));
        assert_eq!((s, r), (IOERR, Reason::ReadableAfterWritable));
    }

    #[test]
    fn unknown_and_unnegotiated_types_are_unsupported() {
        let m = mem();
        let mut l = limits();
        for t in [2, 3, 10, 14, 15, 0x8000_0000] {
            header(&m, t, 0);
            let (s, r) = status_of(run(&m, chain(&[(HDR, 16, R), (STATUS, 1, W)]), &l));
            assert_eq!((s, r), (UNSUPP, Reason::UnknownType(t)));
        }
        l.flush = false;
        l.discard = false;
        l.write_zeroes = false;
        for (t, k) in [
            (VIRTIO_BLK_T_FLUSH, Kind::Flush),
            (VIRTIO_BLK_T_DISCARD, Kind::Discard),
            (VIRTIO_BLK_T_WRITE_ZEROES, Kind::WriteZeroes),
        ] {
            header(&m, t, 0);
            let (s, r) = status_of(run(&m, chain(&[(HDR, 16, R), (STATUS, 1, W)]), &l));
            assert_eq!((s, r), (UNSUPP, Reason::NotNegotiated(k)));
        }
    }

    #[test]
    fn directions_and_read_only() {
        let m = mem();
        let mut l = limits();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let (s, r) = status_of(run(
            &m,
            chain(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]),
            &l,
        ));
        assert_eq!((s, r), (IOERR, Reason::WrongDirection(Kind::Read)));
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let (s, r) = status_of(run(
            &m,
            chain(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]),
            &l,
        ));
        assert_eq!((s, r), (IOERR, Reason::WrongDirection(Kind::Write)));
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        let (s, r) = status_of(run(
            &m,
            chain(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]),
            &l,
        ));
        assert_eq!((s, r), (IOERR, Reason::WrongDirection(Kind::Flush)));
        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        let (s, r) = status_of(run(&m, chain(&[(HDR, 16, R), (STATUS, 1, W)]), &l));
        assert_eq!((s, r), (IOERR, Reason::NoData(Kind::GetId)));

        l.read_only = true;
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let (s, r) = status_of(run(
            &m,
            chain(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]),
            &l,
        ));
        assert_eq!((s, r), (IOERR, Reason::ReadOnly));
        // Reads still work.
        header(&m, VIRTIO_BLK_T_IN, 0);
        assert!(
            run(
                &m,
                chain(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]),
                &l
            )
            .is_ok()
        );
    }

    #[test]
    fn data_outside_memory_and_segment_limits() {
        let m = mem();
        let mut l = limits();
        header(&m, VIRTIO_BLK_T_IN, 0);
        // Runs off the end of the last region.
        let (s, r) = status_of(run(
            &m,
            chain(&[(HDR, 16, R), (0x100800, 4096, W), (STATUS, 1, W)]),
            &l,
        ));
        assert_eq!(
            (s, r),
            (
                IOERR,
                Reason::OutsideMemory {
                    addr: 0x100800,
                    len: 4096
                }
            )
        );
        // Wraps around the address space.
        let (s, _) = status_of(run(
            &m,
            chain(&[(HDR, 16, R), (u64::MAX - 10, 512, W), (STATUS, 1, W)]),
            &l,
        ));
        assert_eq!(s, IOERR);
        l.seg_max = 2;
        let (s, r) = status_of(run(
            &m,
            chain(&[
                (HDR, 16, R),
                (DATA, 512, W),
                (DATA, 512, W),
                (DATA, 512, W),
                (STATUS, 1, W),
            ]),
            &l,
        ));
        assert_eq!((s, r), (IOERR, Reason::TooManySegments(3, 2)));
        l.size_max = 1024;
        let (s, r) = status_of(run(
            &m,
            chain(&[(HDR, 16, R), (DATA, 2048, W), (STATUS, 1, W)]),
            &l,
        ));
        assert_eq!((s, r), (IOERR, Reason::SegmentTooLarge(2048, 1024)));
    }

    #[test]
    fn sectors_are_checked_for_overflow_alignment_and_range() {
        let m = mem();
        let mut l = limits();
        let rw = chain(&[(HDR, 16, R), (DATA, 1024, W), (STATUS, 1, W)]);
        header(&m, VIRTIO_BLK_T_IN, u64::MAX / 256);
        let (s, r) = status_of(run(&m, rw.clone(), &l));
        assert_eq!((s, r), (IOERR, Reason::Overflow(u64::MAX / 256)));
        // The last two sectors are fine, one more is not.
        header(&m, VIRTIO_BLK_T_IN, 2046);
        assert!(run(&m, rw.clone(), &l).is_ok());
        header(&m, VIRTIO_BLK_T_IN, 2047);
        let (s, r) = status_of(run(&m, rw.clone(), &l));
        assert_eq!(
            (s, r),
            (
                IOERR,
                Reason::OutOfRange {
                    sector: 2047,
                    sectors: 2,
                    capacity: 2048
                }
            )
        );
        header(&m, VIRTIO_BLK_T_IN, u64::MAX / 512);
        let (s, _) = status_of(run(&m, rw.clone(), &l));
        assert_eq!(s, IOERR);
        // Partial sectors, and 4 KiB blocks.
        header(&m, VIRTIO_BLK_T_IN, 0);
        let (s, r) = status_of(run(
            &m,
            chain(&[(HDR, 16, R), (DATA, 100, W), (STATUS, 1, W)]),
            &l,
        ));
        assert_eq!(
            (s, r),
            (
                IOERR,
                Reason::Unaligned {
                    sector: 0,
                    bytes: 100,
                    block: 512
                }
            )
        );
        l.block_size = 4096;
        header(&m, VIRTIO_BLK_T_IN, 1);
        let (s, _) = status_of(run(&m, rw, &l));
        assert_eq!(s, IOERR);
    }

    fn ranges(m: &GuestMemoryMmap, list: &[(u64, u32, u32)]) {
        let mut b = Vec::new();
        for &(sector, n, flags) in list {
            b.extend_from_slice(&sector.to_le_bytes());
            b.extend_from_slice(&n.to_le_bytes());
            b.extend_from_slice(&flags.to_le_bytes());
        }
        m.write_slice(&b, GuestAddress(DATA)).unwrap();
    }

    #[test]
    fn discard_and_write_zeroes_ranges() {
        let m = mem();
        let l = limits();
        ranges(&m, &[(0, 8, 0), (100, 4, 0)]);
        header(&m, VIRTIO_BLK_T_DISCARD, 0);
        // The list split across two descriptors, mid-range.
        let (r, s) = run_s(
            &m,
            chain(&[
                (HDR, 16, R),
                (DATA, 10, R),
                (DATA + 10, 22, R),
                (STATUS, 1, W),
            ]),
            &l,
        );
        assert_eq!(r.unwrap().kind, Kind::Discard);
        assert_eq!(
            s.ranges,
            [
                Range {
                    sector: 0,
                    sectors: 8,
                    unmap: false
                },
                Range {
                    sector: 100,
                    sectors: 4,
                    unmap: false
                }
            ]
        );
        let wz = |list: &[(u64, u32, u32)], t: u32| {
            ranges(&m, list);
            header(&m, t, 0);
            let len = 16 * list.len() as u32;
            run(
                &m,
                chain(&[(HDR, 16, R), (DATA, len, R), (STATUS, 1, W)]),
                &l,
            )
        };
        let (r, s) = {
            ranges(&m, &[(8, 8, 1)]);
            header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
            run_s(
                &m,
                chain(&[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)]),
                &l,
            )
        };
        assert_eq!(r.unwrap().kind, Kind::WriteZeroes);
        assert!(s.ranges[0].unmap);
        // UNMAP on a discard, unknown flags.
        assert_eq!(
            status_of(wz(&[(0, 8, 1)], VIRTIO_BLK_T_DISCARD)),
            (UNSUPP, Reason::RangeFlags(1))
        );
        assert_eq!(
            status_of(wz(&[(0, 8, 2)], VIRTIO_BLK_T_WRITE_ZEROES)),
            (UNSUPP, Reason::RangeFlags(2))
        );
        // Too many ranges, too many sectors, beyond the disk, overflow.
        let many: Vec<_> = (0..17).map(|i| (i * 8, 8, 0)).collect();
        assert_eq!(
            status_of(wz(&many, VIRTIO_BLK_T_DISCARD)),
            (UNSUPP, Reason::TooManyRanges(17, 16))
        );
        let l2 = Limits {
            max_discard_sectors: 16,
            ..l
        };
        ranges(&m, &[(0, 17, 0)]);
        header(&m, VIRTIO_BLK_T_DISCARD, 0);
        assert_eq!(
            status_of(run(
                &m,
                chain(&[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)]),
                &l2
            )),
            (IOERR, Reason::RangeTooLarge(17, 16))
        );
        assert_eq!(
            status_of(wz(&[(2040, 16, 0)], VIRTIO_BLK_T_WRITE_ZEROES)).0,
            IOERR
        );
        assert_eq!(
            status_of(wz(&[(u64::MAX - 1, 8, 0)], VIRTIO_BLK_T_DISCARD)),
            (IOERR, Reason::Overflow(u64::MAX - 1))
        );
        // A list that is not a whole number of ranges, or empty.
        header(&m, VIRTIO_BLK_T_DISCARD, 0);
        assert_eq!(
            status_of(run(
                &m,
                chain(&[(HDR, 16, R), (DATA, 20, R), (STATUS, 1, W)]),
                &l
            )),
            (IOERR, Reason::RangeList(20))
        );
        assert_eq!(
            status_of(run(&m, chain(&[(HDR, 16, R), (STATUS, 1, W)]), &l)),
            (IOERR, Reason::RangeList(0))
        );
    }

    #[test]
    fn write_zeroes_unmap_needs_the_offer() {
        let m = mem();
        let l = Limits {
            write_zeroes_may_unmap: false,
            ..limits()
        };
        ranges(&m, &[(0, 8, 1)]);
        header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        assert_eq!(
            status_of(run(
                &m,
                chain(&[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)]),
                &l
            )),
            (UNSUPP, Reason::RangeFlags(1))
        );
    }
}
