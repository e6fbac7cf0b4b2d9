//! What the crash tests share: the blocks their writers leave (a tag and
//! the block number, repeated; zeroes for a zeroed block), what each block
//! may hold after a crash, and a seeded random source a failure can repeat.

/// A block's tag: 0 for zeroes, None if the block is neither a whole write
/// of block `blk` nor zeroes (torn or corrupt).
pub fn tag_of(block: &[u8], blk: u64) -> Option<u64> {
    if block.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let tag = u64::from_le_bytes(block[..8].try_into().unwrap());
    let mut want = Vec::with_capacity(4096);
    for _ in 0..256 {
        want.extend_from_slice(&tag.to_le_bytes());
        want.extend_from_slice(&blk.to_le_bytes());
    }
    (block == want.as_slice()).then_some(tag)
}

/// Per block: the value that must have survived and others that may have.
#[derive(Clone, Default)]
pub struct Allowed {
    pub durable: u64,
    pub maybe: Vec<u64>,
}

/// The crash test's seed (`VBD_CRASH_SEED`, else the time, printed so a
/// failing run can be repeated) and a xorshift source seeded with it.
pub fn crash_seed() -> (u64, impl FnMut() -> u64) {
    let seed: u64 = std::env::var("VBD_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(1)
        });
    eprintln!("crash test seed {seed} (set VBD_CRASH_SEED to repeat)");
    let mut rng = seed | 1;
    let next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    (seed, next)
}
