//! The Internet checksum (RFC 1071) at memory speed.
//!
//! The one's-complement sum does not depend on byte order (RFC 1071 §2(B)):
//! the data is summed as native-endian 32-bit words into eight independent
//! 64-bit lanes — no carries to propagate, and a loop the compiler turns
//! into wide vector adds — folded to 16 bits once, and byte-swapped once
//! into network order. On x86-64 with AVX2 (detected at run time) the same
//! loop is compiled for 256-bit registers; elsewhere it is the baseline
//! build. `tests` checks both against the word-by-word definition.

/// Bytes below which the vector build is not worth the dispatch.
const WIDE_FROM: usize = 128;

/// One's-complement sum of `data` (big-endian 16-bit words, odd byte padded)
/// added to `initial`, not folded: sums of pieces can be added together
/// (a piece of odd length must be the last). For buffers under 4 GiB.
#[inline(always)]
pub fn sum(data: &[u8], initial: u64) -> u64 {
    initial + u16::from_be(super::fold(native(data))) as u64
}

/// The native-order sum, unfolded: headers (addresses, a TCP header)
/// inline where they are summed, payloads out of line in the wide build.
#[inline(always)]
fn native(data: &[u8]) -> u64 {
    if data.len() < WIDE_FROM {
        return lanes(data);
    }
    wide(data)
}

#[inline(never)]
fn wide(data: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present (checked just above).
        return unsafe { lanes_avx2(data) };
    }
    lanes(data)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn lanes_avx2(data: &[u8]) -> u64 {
    lanes(data)
}

/// Eight lanes of 32-bit words; each lane takes 2^32 words before it could
/// overflow, far beyond any packet.
#[inline(always)]
fn lanes(data: &[u8]) -> u64 {
    let word = |b: &[u8]| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as u64;
    let mut acc = [0u64; 8];
    let mut chunks = data.chunks_exact(32);
    for c in &mut chunks {
        for (i, a) in acc.iter_mut().enumerate() {
            *a += word(&c[4 * i..]);
        }
    }
    let mut total: u64 = acc.iter().sum();
    let mut rest = chunks.remainder();
    while rest.len() >= 4 {
        total += word(rest);
        rest = &rest[4..];
    }
    if rest.len() >= 2 {
        total += u16::from_ne_bytes([rest[0], rest[1]]) as u64;
        rest = &rest[2..];
    }
    if let Some(&b) = rest.first() {
        // The odd byte is the high byte of a zero-padded network word.
        total += u16::from_ne_bytes([b, 0]) as u64;
    }
    total
}

/// The definition, word by word: the reference the fast sum is tested
/// against (and the baseline the benchmark shows).
pub fn sum_reference(data: &[u8], initial: u64) -> u64 {
    let mut acc = initial;
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        acc += u16::from_be_bytes([w[0], w[1]]) as u64;
    }
    if let Some(&b) = words.remainder().first() {
        acc += (b as u64) << 8;
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::super::fold;
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn matches_the_definition_on_random_lengths_offsets_and_initial_sums() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(16);
        let mut buf = vec![0u8; 70_000];
        rng.fill(&mut buf[..]);
        for round in 0..3_000 {
            let len = match round % 4 {
                0 => rng.gen_range(0..64),
                1 => rng.gen_range(0..2000),
                2 => rng.gen_range(0..70_000 - 64),
                _ => 65_535 - rng.gen_range(0..64),
            };
            let off = rng.gen_range(0..buf.len() - len + 1).min(buf.len() - len);
            let initial = if round % 3 == 0 {
                0
            } else {
                rng.gen_range(0..1u64 << 40)
            };
            let d = &buf[off..off + len];
            assert_eq!(
                fold(sum(d, initial)),
                fold(sum_reference(d, initial)),
                "len {len} offset {off} initial {initial}"
            );
            // The portable build too, whatever this CPU has.
            assert_eq!(
                fold(u16::from_be(fold(lanes(d))) as u64 + initial),
                fold(sum_reference(d, initial)),
                "portable: len {len} offset {off}"
            );
        }
    }

    #[test]
    fn extremes_and_pieces() {
        // All ones: the sum that tests the end-around carry hardest.
        let ones = vec![0xffu8; 65_535];
        for len in [0, 1, 2, 3, 31, 32, 33, 127, 128, 129, 1448, 65_535] {
            assert_eq!(
                fold(sum(&ones[..len], 0)),
                fold(sum_reference(&ones[..len], 0))
            );
        }
        // Even pieces add up to the whole.
        let data: Vec<u8> = (0..3000u32).map(|i| (i * 7 + 3) as u8).collect();
        let whole = fold(sum(&data, 0));
        let parts = sum(&data[..1000], 0) + sum(&data[1000..2002], 0) + sum(&data[2002..], 0);
        assert_eq!(fold(parts), whole);
        // RFC 1071's example: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
        assert_eq!(
            fold(sum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7], 0)),
            0xddf2
        );
    }
}
