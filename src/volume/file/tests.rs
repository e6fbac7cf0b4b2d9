use super::*;
use crate::test_support::TempDir;
use crate::volume::IoFlags;
use crate::volume::sync::SyncDriver;

/// A fresh directory (kept if the test fails) and the image path in it.
fn scratch(name: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new(&format!("file-unit-{name}"));
    let path = dir.join("disk.img");
    (dir, path)
}

fn open(path: &Path, size: Option<u64>) -> FileVolume {
    FileVolume::open(
        path,
        &FileOptions {
            size,
            ..FileOptions::default()
        },
    )
    .unwrap()
}

#[test]
fn aligned_and_unaligned_io_round_trip() {
    let (_dir, path) = scratch("rw");
    let v = open(&path, Some(8 << 20));
    assert!(v.direct.is_some(), "O_DIRECT works on this filesystem");
    let mut d = SyncDriver::new().unwrap();
    let a: Vec<u8> = (0..65536u32).map(|i| (i * 7) as u8).collect();
    d.write(&v, 4096, &a, false).unwrap();
    let b: Vec<u8> = (0..3001u32).map(|i| (i * 13) as u8).collect();
    d.write(&v, 10_001, &b, true).unwrap();
    let mut want = a.clone();
    want[10_001 - 4096..10_001 - 4096 + 3001].copy_from_slice(&b);
    assert_eq!(d.read(&v, 4096, 65536).unwrap(), want);
    d.op(&v, Op::Flush, 0, 0, IoFlags::default()).unwrap();
    assert_eq!(
        &std::fs::read(&path).unwrap()[4096..4096 + 65536],
        &want[..]
    );
    assert!(v.direct_ok.load(Ordering::Relaxed));
}

/// A 1 MiB volume without O_DIRECT, so writes may go inline.
fn page_cache_only(path: &Path) -> FileVolume {
    FileVolume::open(
        path,
        &FileOptions {
            size: Some(1 << 20),
            no_direct: true,
            ..FileOptions::default()
        },
    )
    .unwrap()
}

/// Guest memory for the tests: page-aligned, as a guest's RAM is.
fn guest_ram(len: usize, seed: u32) -> crate::volume::AlignedBuf {
    let mut m = crate::volume::AlignedBuf::new();
    m.set_len(len);
    for (i, b) in m.as_mut_slice().iter_mut().enumerate() {
        *b = (i as u32).wrapping_mul(31).wrapping_add(seed) as u8;
    }
    m
}

fn gather(mem: &[u8], pieces: &[(usize, usize)]) -> Vec<u8> {
    pieces
        .iter()
        .flat_map(|&(at, n)| mem[at..at + n].to_vec())
        .collect()
}

/// How many pages of `path`'s bytes `off..off + len` are in the page
/// cache: O_DIRECT writes leave none there, buffered ones all.
fn cached_pages(path: &Path, off: usize, len: usize) -> usize {
    let f = File::open(path).unwrap();
    let page = 4096;
    let start = off / page * page;
    let span = off + len - start;
    // SAFETY: a fresh read-only shared mapping of a file we opened,
    // only handed to mincore and unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            start as i64,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let mut vec = vec![0u8; span.div_ceil(page)];
    // SAFETY: `vec` has one byte per page of the mapping.
    assert_eq!(unsafe { libc::mincore(p, span, vec.as_mut_ptr()) }, 0);
    // SAFETY: unmaps the mapping made above.
    unsafe { libc::munmap(p, span) };
    vec.iter().filter(|&&b| b & 1 == 1).count()
}

#[test]
fn guest_buffers_go_direct_when_aligned_and_through_the_page_cache_when_not() {
    let (_dir, path) = scratch("guest");
    let v = open(&path, Some(4 << 20));
    let mut d = SyncDriver::new().unwrap();
    let none = IoFlags::default();
    // Whole pages, out of order in memory: O_DIRECT straight from them.
    let mut ram = guest_ram(64 << 10, 1);
    let aligned = [(8192, 8192), (0, 4096), (40_960, 12_288)];
    d.run_guest(&v, Op::Write, 1 << 20, none, ram.as_mut_slice(), &aligned)
        .unwrap();
    let want = gather(ram.as_slice(), &aligned);
    assert!(
        v.direct_ok.load(Ordering::Relaxed),
        "O_DIRECT was not refused"
    );
    assert_eq!(
        cached_pages(&path, 1 << 20, want.len()),
        0,
        "written with O_DIRECT"
    );
    // Odd pieces at an odd offset: the page cache, FUA on.
    let odd = [(1, 1000), (2001, 3), (5000, 517)];
    let fua = IoFlags {
        fua: true,
        ..IoFlags::default()
    };
    d.run_guest(&v, Op::Write, 100_003, fua, ram.as_mut_slice(), &odd)
        .unwrap();
    let odd_want = gather(ram.as_slice(), &odd);
    assert_eq!(
        cached_pages(&path, 100_003, odd_want.len()),
        1,
        "written through the page cache"
    );
    let file = std::fs::read(&path).unwrap();
    assert_eq!(&file[1 << 20..(1 << 20) + want.len()], &want[..]);
    assert_eq!(&file[100_003..100_003 + odd_want.len()], &odd_want[..]);
    // Reads into guest buffers, aligned and not.
    let mut back = guest_ram(64 << 10, 99);
    let into = [(4096, 4096), (16_384, 16_384), (0, 4096)];
    d.run_guest(&v, Op::Read, 1 << 20, none, back.as_mut_slice(), &into)
        .unwrap();
    assert_eq!(gather(back.as_slice(), &into), want);
    let into = [(7, 1), (100, 1519)];
    d.run_guest(&v, Op::Read, 100_003, none, back.as_mut_slice(), &into)
        .unwrap();
    assert_eq!(gather(back.as_slice(), &into), odd_want);
}

#[test]
fn guest_writes_inline_and_reads_past_a_shrunk_end() {
    let (_dir, path) = scratch("guest-inline");
    let v = page_cache_only(&path);
    let mut d = SyncDriver::new().unwrap();
    let none = IoFlags::default();
    let mut ram = guest_ram(32 << 10, 5);
    let pieces = [(100, 3000), (9000, 4096), (20_000, 1)];
    d.run_guest(&v, Op::Write, 777, none, ram.as_mut_slice(), &pieces)
        .unwrap();
    assert_ne!(v.buffered.load(Ordering::Relaxed), BUFFERED_UNKNOWN);
    let want = gather(ram.as_slice(), &pieces);
    assert_eq!(d.read(&v, 777, want.len()).unwrap(), want);
    // The file loses its tail behind the volume's back: the guest reads
    // what is left, then zeroes.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(777 + 3000)
        .unwrap();
    let mut back = guest_ram(32 << 10, 6);
    let into = [(0, 2000), (4096, 5097)];
    d.run_guest(&v, Op::Read, 777, none, back.as_mut_slice(), &into)
        .unwrap();
    let got = gather(back.as_slice(), &into);
    assert_eq!(&got[..3000], &want[..3000]);
    assert!(got[3000..].iter().all(|&b| b == 0));
}

#[test]
fn page_cache_writes_inline_or_through_the_ring_read_back_alike() {
    let (_dir, path) = scratch("inline");
    let v = page_cache_only(&path);
    let mut d = SyncDriver::new().unwrap();
    let a: Vec<u8> = (0..20_000u32).map(|i| (i * 11) as u8).collect();
    d.write(&v, 777, &a, false).unwrap();
    let mode = v.buffered.load(Ordering::Relaxed);
    assert_ne!(mode, BUFFERED_UNKNOWN, "the first write settles the mode");
    // Paused (as after a slow inline write): the ring does it instead.
    v.inline_paused_until.store(u64::MAX, Ordering::Relaxed);
    let b = vec![0xa5u8; 5000];
    d.write(&v, 10_000, &b, false).unwrap();
    v.inline_paused_until.store(0, Ordering::Relaxed);
    let c = vec![0x5au8; 3];
    d.write(&v, 20_000, &c, false).unwrap();
    // Too big to copy inline: the ring again.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    d.write(&v, 100_000, &big, false).unwrap();
    let mut want = vec![0u8; 1 << 20];
    want[100_000..400_000].copy_from_slice(&big);
    want[777..777 + a.len()].copy_from_slice(&a);
    want[10_000..15_000].copy_from_slice(&b);
    want[20_000..20_003].copy_from_slice(&c);
    assert_eq!(d.read(&v, 0, 1 << 20).unwrap(), want);
    assert_eq!(std::fs::read(&path).unwrap(), want, "mode {mode}");
}

#[test]
fn trim_zeroes_and_block_status() {
    let (_dir, path) = scratch("trim");
    let v = open(&path, Some(4 << 20));
    let mut d = SyncDriver::new().unwrap();
    let st = |d: &mut SyncDriver| -> Vec<(u64, bool)> {
        d.op(&v, Op::BlockStatus, 0, 4 << 20, IoFlags::default())
            .unwrap()
            .extents
            .iter()
            .map(|e| (e.len, e.hole))
            .collect()
    };
    assert_eq!(st(&mut d), [(4 << 20, true)]);
    d.write(&v, 1 << 20, &vec![9u8; 1 << 20], false).unwrap();
    assert_eq!(
        st(&mut d),
        [(1 << 20, true), (1 << 20, false), (2 << 20, true)]
    );
    d.op(
        &v,
        Op::Trim,
        1 << 20,
        512 << 10,
        IoFlags {
            fua: true,
            ..IoFlags::default()
        },
    )
    .unwrap();
    assert_eq!(d.read(&v, 1 << 20, 512 << 10).unwrap(), vec![0; 512 << 10]);
    assert_eq!(
        st(&mut d),
        [(3 << 19, true), (512 << 10, false), (2 << 20, true)]
    );
    let nh = IoFlags {
        no_hole: true,
        ..IoFlags::default()
    };
    d.op(&v, Op::WriteZeroes, (3 << 19) + 7, 1000, nh).unwrap();
    let r = d.read(&v, 3 << 19, 4096).unwrap();
    assert!(
        r[..7].iter().all(|&x| x == 9)
            && r[7..1007].iter().all(|&x| x == 0)
            && r[1007..].iter().all(|&x| x == 9)
    );
    d.op(&v, Op::Cache, 0, 4 << 20, IoFlags::default()).unwrap();
}

#[test]
fn zeroing_falls_back_to_writes_unless_fast_is_required() {
    let (_dir, path) = scratch("fallback");
    let v = open(&path, Some(4 << 20));
    let mut d = SyncDriver::new().unwrap();
    d.write(&v, 0, &vec![5u8; 3 << 20], false).unwrap();
    // Pretend the filesystem has no fallocate zeroing.
    v.zero_range_ok.store(false, Ordering::Relaxed);
    v.punch_ok.store(false, Ordering::Relaxed);
    let fast = IoFlags {
        fast_zero: true,
        ..IoFlags::default()
    };
    assert!(matches!(
        d.op(&v, Op::WriteZeroes, 0, 1 << 20, fast),
        Err(VolumeError::NotSupported)
    ));
    assert_eq!(
        d.read(&v, 0, 16).unwrap(),
        vec![5; 16],
        "a refused fast zero changes nothing"
    );
    d.op(&v, Op::WriteZeroes, 100, (2 << 20) + 5, IoFlags::default())
        .unwrap();
    let r = d.read(&v, 0, 3 << 20).unwrap();
    assert!(r[..100].iter().all(|&x| x == 5));
    assert!(r[100..100 + (2 << 20) + 5].iter().all(|&x| x == 0));
    assert!(r[100 + (2 << 20) + 5..].iter().all(|&x| x == 5));
    // Trim without fallocate is a successful no-op (it is only a hint).
    d.op(&v, Op::Trim, 0, 4096, IoFlags::default()).unwrap();
}

#[test]
fn opening_explains_problems() {
    let (_dir, path) = scratch("open");
    assert!(matches!(
        FileVolume::open(&path, &FileOptions::default()),
        Err(FileError::Missing { .. })
    ));
    let v = open(&path, Some(1 << 20));
    assert!(matches!(
        FileVolume::open(&path, &FileOptions::default()),
        Err(FileError::Locked { .. })
    ));
    drop(v);
    assert!(matches!(
        FileVolume::open(&path, &FileOptions { size: Some(2 << 20), ..FileOptions::default() }),
        Err(FileError::SizeMismatch { actual, .. }) if actual == 1 << 20
    ));
    let ro = FileVolume::open(
        &path,
        &FileOptions {
            read_only: true,
            ..FileOptions::default()
        },
    )
    .unwrap();
    let mut d = SyncDriver::new().unwrap();
    assert!(matches!(
        d.write(&ro, 0, b"x", false),
        Err(VolumeError::ReadOnly)
    ));
}
