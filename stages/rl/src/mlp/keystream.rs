//! The dropout draws: `rng.fill(&mut [u16])` of [`ChaCha8Rng`], 16 ChaCha blocks at a time
//! with AVX-512. rand_chacha's widest path makes 4 blocks with AVX2; the draws took 3.8% of a
//! DDQN run. The bytes are ChaCha8's keystream from the generator's word position (key =
//! seed, 64-bit block counter, 64-bit stream: rand_chacha's layout), and the generator is left
//! where `fill` leaves it, so nothing downstream can tell; tests compare both.
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::kernels::Level;

/// Below this many draws the generator's own buffer is used (seeking refills it).
const WIDE_FROM: usize = 1024;

/// `rng.fill(out)`: the same values, and `rng` at the same position afterwards.
pub fn fill_u16(level: Level, rng: &mut ChaCha8Rng, out: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if level.here() == Level::Avx512 && out.len() >= WIDE_FROM {
        let pos = rng.get_word_pos();
        let seed = rng.get_seed();
        let key: [u32; 8] =
            std::array::from_fn(|i| u32::from_le_bytes(seed[4 * i..4 * i + 4].try_into().unwrap()));
        // SAFETY: `here` says the CPU has AVX-512F.
        #[allow(unsafe_code)]
        unsafe {
            wide::fill(&key, rng.get_stream(), pos, out)
        };
        // `fill_bytes` consumes whole words.
        rng.set_word_pos(pos + out.len().div_ceil(2) as u128);
        return;
    }
    let _ = level;
    rng.fill(out);
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod wide {
    use std::arch::x86_64::*;

    use super::super::kernels::transpose16;

    const BLOCK_WORDS: u128 = 16;
    /// "expand 32-byte k".
    const SIGMA: [u32; 4] = [0x6170_7865, 0x3320_646e, 0x7962_2d32, 0x6b20_6574];

    /// The keystream from word `pos` into `out` (two values a word, low half first).
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fill(key: &[u32; 8], stream: u64, pos: u128, out: &mut [u16]) {
        let mut block = (pos / BLOCK_WORDS) as u64;
        let mut skip = (pos % BLOCK_WORDS) as usize;
        let mut words = [0u32; 256];
        let mut done = 0;
        while done < out.len() {
            sixteen_blocks(key, stream, block, &mut words);
            let whole = ((out.len() - done) / 2).min(256 - skip);
            // SAFETY: `whole` words from `skip` lie inside `words`; their 4 * whole bytes are
            // 2 * whole values from `done`, inside `out`. Plain bytes both sides: a word's
            // low half is its first u16 (little-endian, as `fill`'s bytes).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    words.as_ptr().add(skip).cast::<u8>(),
                    out.as_mut_ptr().add(done).cast::<u8>(),
                    4 * whole,
                )
            };
            done += 2 * whole;
            if done + 1 == out.len() && skip + whole < 256 {
                // An odd count ends on the low half of one more word.
                out[done] = words[skip + whole] as u16;
                done += 1;
            }
            skip = 0;
            block = block.wrapping_add(16);
        }
    }

    /// Blocks `first .. first + 16` of ChaCha8, block after block, word after word.
    #[target_feature(enable = "avx512f")]
    fn sixteen_blocks(key: &[u32; 8], stream: u64, first: u64, out: &mut [u32; 256]) {
        let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let low = _mm512_add_epi32(_mm512_set1_epi32(first as u32 as i32), lanes);
        // The counter's high word carries where the low word wrapped (unsigned low < lanes).
        let wrapped = _mm512_cmplt_epu32_mask(low, lanes);
        let high = _mm512_mask_add_epi32(
            _mm512_set1_epi32((first >> 32) as u32 as i32),
            wrapped,
            _mm512_set1_epi32((first >> 32) as u32 as i32),
            _mm512_set1_epi32(1),
        );
        let mut input = [_mm512_setzero_si512(); 16];
        for (i, s) in SIGMA.iter().enumerate() {
            input[i] = _mm512_set1_epi32(*s as i32);
        }
        for (i, k) in key.iter().enumerate() {
            input[4 + i] = _mm512_set1_epi32(*k as i32);
        }
        input[12] = low;
        input[13] = high;
        input[14] = _mm512_set1_epi32(stream as u32 as i32);
        input[15] = _mm512_set1_epi32((stream >> 32) as u32 as i32);
        let mut x = input;
        for _ in 0..4 {
            quarter(&mut x, 0, 4, 8, 12);
            quarter(&mut x, 1, 5, 9, 13);
            quarter(&mut x, 2, 6, 10, 14);
            quarter(&mut x, 3, 7, 11, 15);
            quarter(&mut x, 0, 5, 10, 15);
            quarter(&mut x, 1, 6, 11, 12);
            quarter(&mut x, 2, 7, 8, 13);
            quarter(&mut x, 3, 4, 9, 14);
        }
        // Register i holds word i of the 16 blocks; transposed, register b holds block b.
        let mut r = [_mm512_setzero_ps(); 16];
        for i in 0..16 {
            r[i] = _mm512_castsi512_ps(_mm512_add_epi32(x[i], input[i]));
        }
        transpose16::registers(&mut r);
        for (b, reg) in r.iter().enumerate() {
            // SAFETY: 16 words from 16 * b, b < 16, inside the 256.
            unsafe {
                _mm512_storeu_si512(
                    out.as_mut_ptr().add(16 * b).cast(),
                    _mm512_castps_si512(*reg),
                )
            };
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn quarter(x: &mut [__m512i; 16], a: usize, b: usize, c: usize, d: usize) {
        x[a] = _mm512_add_epi32(x[a], x[b]);
        x[d] = _mm512_rol_epi32::<16>(_mm512_xor_si512(x[d], x[a]));
        x[c] = _mm512_add_epi32(x[c], x[d]);
        x[b] = _mm512_rol_epi32::<12>(_mm512_xor_si512(x[b], x[c]));
        x[a] = _mm512_add_epi32(x[a], x[b]);
        x[d] = _mm512_rol_epi32::<8>(_mm512_xor_si512(x[d], x[a]));
        x[c] = _mm512_add_epi32(x[c], x[d]);
        x[b] = _mm512_rol_epi32::<7>(_mm512_xor_si512(x[b], x[c]));
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, RngCore, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    /// Every level, from word positions inside a block and at its edges, odd and even
    /// lengths, a non-zero stream and a counter about to carry into its high word: the same
    /// values as `fill`, and the same next draws after.
    #[test]
    fn same_draws_and_position_as_rand_chacha() {
        for level in Level::all_here() {
            for (seed, stream, start, len) in [
                (7u64, 0u64, 0u128, 16_384usize),
                (7, 0, 5, 16_384),
                (8, 3, 17, 1_025),
                (9, 0, 16 * 1000 + 15, 4_099),
                (10, 1 << 40, (u64::MAX as u128 - 20) * 16 + 3, 2_048),
            ] {
                let mut ours = ChaCha8Rng::seed_from_u64(seed);
                ours.set_stream(stream);
                ours.set_word_pos(start);
                let mut theirs = ours.clone();
                let mut a = vec![0u16; len];
                let mut b = vec![0u16; len];
                fill_u16(level, &mut ours, &mut a);
                theirs.fill(&mut b[..]);
                assert_eq!(a, b, "{level:?} seed {seed} start {start} len {len}");
                assert_eq!(ours.get_word_pos(), theirs.get_word_pos());
                assert_eq!(ours.next_u64(), theirs.next_u64());
            }
        }
    }
}
