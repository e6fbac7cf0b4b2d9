//! CRC-32C of a concatenation from the CRCs of its parts, in a few dozen
//! operations. The write path checksums a record's data before it takes
//! the write-ahead layer's lock and folds in the header (which holds the
//! sequence number) under it; `crc32c::crc32c_combine` squares 32×32 bit
//! matrices for every bit of the length, microseconds per 4 KiB record,
//! which made that lock the volume's bottleneck. This is zlib's newer
//! method: multiply by x^(8·len) modulo the polynomial, with the powers
//! x^(2^k) in a table computed at compile time.

/// CRC-32C's polynomial, bit-reversed (the crate's and the hardware's order).
const POLY: u32 = 0x82F6_3B78;

/// a·b modulo the polynomial, both in the reflected bit order.
const fn mult_mod_p(a: u32, mut b: u32) -> u32 {
    let mut m = 1u32 << 31;
    let mut p = 0u32;
    loop {
        if a & m != 0 {
            p ^= b;
            if a & (m - 1) == 0 {
                return p;
            }
        }
        m >>= 1;
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
    }
}

/// x^(2^k) modulo the polynomial, for every k a 64-bit byte count needs.
/// (zlib keeps 32 and wraps k, which holds for its primitive polynomial;
/// CRC-32C's has a factor x + 1, so the powers do not cycle with period 32.)
const X2N: [u32; 67] = {
    let mut t = [0u32; 67];
    // x^1 in the reflected order.
    let mut p = 1u32 << 30;
    t[0] = p;
    let mut k = 1;
    while k < t.len() {
        p = mult_mod_p(p, p);
        t[k] = p;
        k += 1;
    }
    t
};

/// x^(8·n) modulo the polynomial: the operator that appends n zero bytes.
fn x8n_mod_p(mut n: u64) -> u32 {
    // x^0 in the reflected order.
    let mut p = 1u32 << 31;
    // 8·n = n << 3: start at the table's entry for 2^3; a u64 has 64
    // bits, so k stays below 67.
    let mut k = 3;
    while n != 0 {
        if n & 1 != 0 {
            p = mult_mod_p(X2N[k], p);
        }
        n >>= 1;
        k += 1;
    }
    p
}

/// The CRC-32C of A followed by B, given crc(A), crc(B) and B's length.
pub(super) fn combine(crc_a: u32, crc_b: u32, len_b: usize) -> u32 {
    if len_b == 0 {
        return crc_a;
    }
    mult_mod_p(x8n_mod_p(len_b as u64), crc_a) ^ crc_b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combine_matches_the_crc_of_the_concatenation() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let mut bytes = vec![0u8; 3 * 4096 + 77];
        for b in bytes.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        for split in [0, 1, 7, 24, 31, 32, 100, 4096, 4096 + 24, bytes.len()] {
            for end in [split, split + 1, split + 4096, bytes.len()] {
                let end = end.min(bytes.len());
                let (a, b) = bytes[..end].split_at(split.min(end));
                let want = crc32c::crc32c(&bytes[..end]);
                assert_eq!(
                    combine(crc32c::crc32c(a), crc32c::crc32c(b), b.len()),
                    want,
                    "split {split}, end {end}"
                );
                // The slow reference agrees too.
                assert_eq!(
                    crc32c::crc32c_combine(crc32c::crc32c(a), crc32c::crc32c(b), b.len()),
                    want
                );
            }
        }
    }

    #[test]
    fn long_lengths_agree_with_the_reference() {
        // Lengths with many bits set exercise every table entry they use.
        for len in [
            4096usize,
            8192,
            255 * 4096,
            (1 << 20) - 1,
            u32::MAX as usize,
            (1usize << 40) + 12345,
        ] {
            for (a, b) in [(0u32, 0u32), (0xdead_beef, 0x1234_5678), (u32::MAX, 1)] {
                assert_eq!(
                    combine(a, b, len),
                    crc32c::crc32c_combine(a, b, len),
                    "len {len}"
                );
            }
        }
    }
}
