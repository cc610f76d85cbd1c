//! Decode of the default format `gguf` on AVX-512 (one activation row, or a batch's few):
//! each weight block is expanded in registers and dotted at once with every activation row
//! of the tile, instead of being written to a row buffer and read back (at one row the
//! expansion had taken five times the dot: 51% of batch-1 decode against 11%), and the next
//! tile's blocks are prefetched while this one's are dotted.
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

/// out [r1 - r0, m]: rows r0..r1 of `w` dotted with each of the m activation rows of `x`
/// ([m, w.cols] row-major).
///
/// # Safety
/// The CPU must have AVX-512F, FMA and F16C ([`available`]).
#[target_feature(enable = "avx512f,fma,f16c")]
pub(super) unsafe fn rows(w: &QMatrix, x: &[f32], m: usize, r0: usize, r1: usize, out: &mut [f32]) {
    assert!(x.len() == m * w.cols && out.len() == (r1 - r0) * m && r1 <= w.rows);
    match w.ggml_type {
        GGML_Q4_1 => rows_of::<1>(w, x, m, r0, r1, out),
        GGML_Q4_0 => rows_of::<0>(w, x, m, r0, r1, out),
        GGML_Q8_0 => rows_of::<8>(w, x, m, r0, r1, out),
        _ => unreachable!("QMatrix holds only Q4_0, Q4_1 and Q8_0 blocks"),
    }
}

/// One activation row: tiles of 8 weight rows (16 independent multiply-add chains a block;
/// measured on 2 cores: single-stream decode ~127 tok/s against ~107 with 4, ~96 with 16),
/// then 4, then 1. Several: tiles of 4 weight rows x 4 activation rows (each block expanded
/// once for 4 rows of a batch; 16 accumulators), then 4 x 2 and 4 x 1; then single weight
/// rows.
#[target_feature(enable = "avx512f,fma,f16c")]
#[inline]
fn rows_of<const TY: u8>(w: &QMatrix, x: &[f32], m: usize, r0: usize, r1: usize, out: &mut [f32]) {
    let k = w.cols;
    let xr = |a: usize| &x[a * k..(a + 1) * k];
    let mut r = r0;
    if m == 1 {
        while r + 8 <= r1 {
            let t = tile::<TY, 8, 1>(w, [xr(0)], std::array::from_fn(|i| r + i));
            store(out, 1, r - r0, 0, t);
            r += 8;
        }
    }
    while r + 4 <= r1 {
        across::<TY, 4>(w, &xr, m, [r, r + 1, r + 2, r + 3], out, r - r0);
        r += 4;
    }
    while r < r1 {
        across::<TY, 1>(w, &xr, m, [r], out, r - r0);
        r += 1;
    }
}

/// The R weight rows `rows` against all m activation rows, 4, then 2, then 1 at a time,
/// into out's rows from `at`.
#[target_feature(enable = "avx512f,fma,f16c")]
#[inline]
fn across<'x, const TY: u8, const R: usize>(
    w: &QMatrix,
    xr: &impl Fn(usize) -> &'x [f32],
    m: usize,
    rows: [usize; R],
    out: &mut [f32],
    at: usize,
) {
    let mut a = 0;
    while a + 4 <= m {
        let t = tile::<TY, R, 4>(w, [xr(a), xr(a + 1), xr(a + 2), xr(a + 3)], rows);
        store(out, m, at, a, t);
        a += 4;
    }
    if a + 2 <= m {
        store(out, m, at, a, tile::<TY, R, 2>(w, [xr(a), xr(a + 1)], rows));
        a += 2;
    }
    if a < m {
        store(out, m, at, a, tile::<TY, R, 1>(w, [xr(a)], rows));
    }
}

/// Writes an R x A tile into out [.., m] at weight row `at`, activation `a`.
#[inline(always)]
fn store<const R: usize, const A: usize>(
    out: &mut [f32],
    m: usize,
    at: usize,
    a: usize,
    t: [[f32; A]; R],
) {
    for (i, ti) in t.iter().enumerate() {
        out[(at + i) * m + a..(at + i) * m + a + A].copy_from_slice(ti);
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

/// The dots of R weight rows with A activation rows.
#[target_feature(enable = "avx512f,fma,f16c")]
#[inline]
fn tile<const TY: u8, const R: usize, const A: usize>(
    w: &QMatrix,
    x: [&[f32]; A],
    rows: [usize; R],
) -> [[f32; A]; R] {
    let (nb, bb) = (w.cols / BLOCK, w.block_bytes);
    let wrow: [&[u8]; R] = rows.map(|r| w.row(r));
    assert!(x.iter().all(|v| v.len() == nb * BLOCK) && wrow.iter().all(|v| v.len() == nb * bb));
    let mut acc = [[_mm512_setzero_ps(); A]; R];
    // The same block of the next tile's rows (the rows are adjacent in memory), asked for
    // now: the product streams ~100 MB a token and waited on memory without it (measured:
    // single-stream decode ~135 -> ~175 tok/s on 2 cores; 512 or 2,048 bytes ahead gained
    // less; the int8 kernel does the same). A prefetch past the matrix's end is a no-op.
    let ahead = R * nb * bb;
    for b in 0..nb {
        for (ar, row) in acc.iter_mut().zip(&wrow) {
            // SAFETY: each row holds nb blocks of bb bytes (asserted above).
            let (wl, wh) = unsafe { expand::<TY>(row.as_ptr().add(b * bb)) };
            _mm_prefetch::<_MM_HINT_T0>(row.as_ptr().wrapping_add(b * bb + ahead) as *const i8);
            for (acc_ra, xa) in ar.iter_mut().zip(&x) {
                // SAFETY: each activation row holds nb blocks of 32 floats (asserted above).
                let (xl, xh) = unsafe {
                    let p = xa.as_ptr().add(b * BLOCK);
                    (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
                };
                *acc_ra = _mm512_fmadd_ps(wl, xl, *acc_ra);
                *acc_ra = _mm512_fmadd_ps(wh, xh, *acc_ra);
            }
        }
    }
    acc.map(|ar| {
        ar.map(|a| {
            let mut lanes = [0f32; 16];
            // SAFETY: lanes holds 16 floats.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), a) };
            reduce_lanes(&lanes)
        })
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
