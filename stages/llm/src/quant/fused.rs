//! Single-stream decode (one activation row) of the default format `gguf` on AVX-512: each
//! weight block is expanded in registers and dotted at once, instead of being written to a
//! row buffer and read back (the expansion had taken five times the dot: 51% of batch-1
//! decode against 11%), and the next tile's blocks are prefetched while this one's are dotted.
//!
//! A 4-bit block has only 16 distinct weights, so its 16 values are computed once, in the
//! loader's arithmetic (`float(n) * d + m` for Q4_1, `float(n - 8) * d` for Q4_0, as
//! `gguf::dequant_blocks` rounds them), and each nibble picks its weight with one permute
//! (`vpermps` reads the index's low 4 bits, so the low nibbles need no mask). Q4_1's table is
//! one fused multiply-add: `n * d` is exact in f32 (an f16 scale has 11 significant bits, n
//! 4), so rounding once gives the loader's separate multiply and add bit for bit (a test
//! checks every f16). Q8_0 is converted and scaled directly. The weights are therefore the
//! loader's bit for bit, and each dot runs in [`super::dot_tile`]'s order: 16 lanes, lane i
//! takes elements 16c + i for c = 0, 1, ... through one fused multiply-add each, then
//! [`super::reduce_lanes`]. So this path gives the bits of the AVX2 and plain ones (the
//! kernel test compares them).

#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::{BLOCK, QMatrix, reduce_lanes};
use crate::gguf::{GGML_Q4_0, GGML_Q4_1, GGML_Q8_0};

/// Whether this CPU runs [`rows`].
pub(super) fn available() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

/// out [r1 - r0]: rows r0..r1 of `w` dotted with the one activation row `x` (w.cols floats).
///
/// # Safety
/// The CPU must have AVX-512F, FMA and F16C ([`available`]).
#[target_feature(enable = "avx512f,fma,f16c")]
pub(super) unsafe fn rows(w: &QMatrix, x: &[f32], r0: usize, r1: usize, out: &mut [f32]) {
    assert!(x.len() == w.cols && out.len() == r1 - r0 && r1 <= w.rows);
    match w.ggml_type {
        GGML_Q4_1 => rows_of::<1>(w, x, r0, r1, out),
        GGML_Q4_0 => rows_of::<0>(w, x, r0, r1, out),
        GGML_Q8_0 => rows_of::<8>(w, x, r0, r1, out),
        _ => unreachable!("QMatrix holds only Q4_0, Q4_1 and Q8_0 blocks"),
    }
}

/// Tiles of 8 weight rows (16 independent multiply-add chains a block; measured on 2 cores:
/// single-stream decode ~127 tok/s against ~107 with 4, ~96 with 16), then 4, then 1.
#[target_feature(enable = "avx512f,fma,f16c")]
#[inline]
fn rows_of<const TY: u8>(w: &QMatrix, x: &[f32], r0: usize, r1: usize, out: &mut [f32]) {
    let mut r = r0;
    while r + 8 <= r1 {
        let t = tile::<TY, 8>(w, x, [r, r + 1, r + 2, r + 3, r + 4, r + 5, r + 6, r + 7]);
        out[r - r0..r - r0 + 8].copy_from_slice(&t);
        r += 8;
    }
    while r + 4 <= r1 {
        let t = tile::<TY, 4>(w, x, [r, r + 1, r + 2, r + 3]);
        out[r - r0..r - r0 + 4].copy_from_slice(&t);
        r += 4;
    }
    while r < r1 {
        out[r - r0] = tile::<TY, 1>(w, x, [r])[0];
        r += 1;
    }
}

/// A block's f16 scale and (Q4_1) minimum as f32 (exact): one 8-byte load that zeroes the
/// rest of the register (every block type holds at least 18 bytes).
#[target_feature(enable = "avx512f,fma,f16c")]
#[inline]
unsafe fn scale_min(blk: *const u8) -> (f32, f32) {
    // SAFETY: the caller passes a whole block, at least 8 bytes.
    let v = _mm_cvtph_ps(unsafe { _mm_loadl_epi64(blk as *const __m128i) });
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

/// The block at `blk` as its two 16-lane halves of f32 weights (elements 0..16, 16..32).
#[target_feature(enable = "avx512f,fma,f16c")]
#[inline]
unsafe fn expand<const TY: u8>(blk: *const u8) -> (__m512, __m512) {
    // SAFETY (the loads): the caller passes a whole block of this type.
    unsafe {
        let (d, m) = scale_min(blk);
        if TY == 8 {
            let d = _mm512_set1_ps(d);
            let lo = _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(2) as *const __m128i));
            let hi = _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(18) as *const __m128i));
            return (
                _mm512_mul_ps(_mm512_cvtepi32_ps(lo), d),
                _mm512_mul_ps(_mm512_cvtepi32_ps(hi), d),
            );
        }
        // The block's 16 possible weights, indexed by nibble.
        let table = if TY == 1 {
            let n = _mm512_setr_ps(
                0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.,
            );
            _mm512_fmadd_ps(n, _mm512_set1_ps(d), _mm512_set1_ps(m))
        } else {
            let n = _mm512_setr_ps(
                -8., -7., -6., -5., -4., -3., -2., -1., 0., 1., 2., 3., 4., 5., 6., 7.,
            );
            _mm512_mul_ps(n, _mm512_set1_ps(d))
        };
        let at = if TY == 1 { 4 } else { 2 };
        // Byte j holds element j (low nibble) and element j + 16 (high nibble).
        let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(blk.add(at) as *const __m128i));
        (
            _mm512_permutexvar_ps(bytes, table),
            _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(bytes), table),
        )
    }
}

/// The dots of R weight rows with `x`.
#[target_feature(enable = "avx512f,fma,f16c")]
#[inline]
fn tile<const TY: u8, const R: usize>(w: &QMatrix, x: &[f32], rows: [usize; R]) -> [f32; R] {
    let (nb, bb) = (w.cols / BLOCK, w.block_bytes);
    let wrow: [&[u8]; R] = rows.map(|r| w.row(r));
    assert!(x.len() == nb * BLOCK && wrow.iter().all(|v| v.len() == nb * bb));
    let mut acc = [_mm512_setzero_ps(); R];
    // The same block of the next tile's rows (the rows are adjacent in memory), asked for
    // now: the product streams ~100 MB a token and waited on memory without it (measured:
    // single-stream decode ~135 -> ~175 tok/s on 2 cores; 512 or 2,048 bytes ahead gained
    // less). A prefetch past the matrix's end is a no-op.
    let ahead = R * nb * bb;
    for b in 0..nb {
        // SAFETY: x holds nb blocks of 32 floats, so the 32 at 32 b are in it.
        let (xl, xh) = unsafe {
            let p = x.as_ptr().add(b * BLOCK);
            (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
        };
        for (a, row) in acc.iter_mut().zip(&wrow) {
            // SAFETY: each row holds nb blocks of bb bytes (asserted above).
            let (wl, wh) = unsafe { expand::<TY>(row.as_ptr().add(b * bb)) };
            _mm_prefetch::<_MM_HINT_T0>(row.as_ptr().wrapping_add(b * bb + ahead) as *const i8);
            *a = _mm512_fmadd_ps(wl, xl, *a);
            *a = _mm512_fmadd_ps(wh, xh, *a);
        }
    }
    acc.map(|a| {
        let mut lanes = [0f32; 16];
        // SAFETY: lanes holds 16 floats.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), a) };
        reduce_lanes(&lanes)
    })
}

#[cfg(test)]
mod tests {
    /// The premise of Q4_1's fused table: `n * d` is exact in f32 for every finite f16 scale
    /// and every nibble, so `fma(n, d, m)` rounds exactly as `n * d + m`.
    #[test]
    fn nibble_times_any_f16_scale_is_exact_in_f32() {
        for bits in 0..=u16::MAX {
            let d = half::f16::from_bits(bits).to_f32();
            if !d.is_finite() {
                continue;
            }
            for n in 0..16u8 {
                let n = f32::from(n);
                assert_eq!(f64::from(n * d), f64::from(n) * f64::from(d), "{n} x {d}");
                for m in [0.0f32, -0.37, 1.0e-3, 65504.0] {
                    assert_eq!(n.mul_add(d, m).to_bits(), (n * d + m).to_bits());
                }
            }
        }
    }
}
