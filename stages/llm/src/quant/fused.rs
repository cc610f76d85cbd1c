//! Decode of the default format `gguf` (one activation row, or a batch's few) with AVX-512
//! or AVX2: each weight block is expanded in registers and dotted at once with every
//! activation row of the tile, instead of being written to a row buffer and read back (at
//! one row the expansion had taken five times the dot: 51% of batch-1 decode against 11%),
//! and the next tile's blocks are prefetched while this one's are dotted.
//!
//! AVX-512: a 4-bit block has only 16 distinct weights, so its 16 values are computed once,
//! in the loader's arithmetic (`float(n) * d + m` for Q4_1, `float(n - 8) * d` for Q4_0, as
//! `gguf::dequant_blocks` rounds them), and each nibble picks its weight with one permute
//! (`vpermps` reads the index's low 4 bits, so the low nibbles need no mask). AVX2 (8-entry
//! permutes) converts each nibble and applies the same arithmetic. Q4_1's multiply-add is
//! fused: `n * d` is exact in f32 (an f16 scale has 11 significant bits, n 4), so rounding
//! once gives the loader's separate multiply and add bit for bit (a test checks every f16).
//! Q8_0 is converted and scaled directly. The weights are therefore the loader's bit for
//! bit, and each dot runs in [`super::dot_tile`]'s order: 16 lanes (one register, or two of
//! 8), lane i takes elements 16c + i for c = 0, 1, ... through one fused multiply-add each,
//! then [`super::reduce_lanes`]. So every path gives the same bits (the kernel test compares
//! them).

#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::{BLOCK, QMatrix, reduce_lanes};
use crate::gguf::{GGML_Q4_0, GGML_Q4_1, GGML_Q8_0};

/// The register kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Level {
    /// AVX-512F, FMA, F16C: 16-lane registers, tiles of 8 x 1 or 4 x 4.
    Avx512,
    /// AVX2, FMA, F16C: 8-lane registers (a dot's 16 lanes in two), tiles of 4 x 1 or 2 x 2.
    Avx2,
}

impl Level {
    /// Activation rows up to which a product takes this kernel. Measured on 2 cores (Zen 5),
    /// decode tok/s, registers vs the row buffer: AVX-512 at batch 2 199 vs 112, 4 357 vs
    /// 200, 8 415 vs 323, 16 412 vs 382, 24 426 vs 430, 32 423 vs 452; AVX2 (the same machine
    /// under `ATEN_CPU_CAPABILITY=avx2`) at 1 128 vs 72, 2 169 vs 92, 4 215 vs 175, 6 244 vs
    /// 204, 8 249 vs 255, 16 266 vs 295.
    pub(super) fn max_rows(self) -> usize {
        match self {
            Level::Avx512 => 16,
            Level::Avx2 => 7,
        }
    }
}

/// The register kernel this machine runs, within `ATEN_CPU_CAPABILITY` ([`super::simd_cap`]).
pub(super) fn level() -> Option<Level> {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<Option<Level>> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let base = is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
        if !base {
            return None;
        }
        if super::simd_cap() >= 2 && is_x86_feature_detected!("avx512f") {
            return Some(Level::Avx512);
        }
        (super::simd_cap() >= 1 && is_x86_feature_detected!("avx2")).then_some(Level::Avx2)
    })
}

/// out [r1 - r0, m]: rows r0..r1 of `w` dotted with each of the m activation rows of `x`
/// ([m, w.cols] row-major).
///
/// # Safety
/// The CPU must have the level's features (a level [`level`] returned, or a narrower one).
pub(super) unsafe fn rows(
    level: Level,
    w: &QMatrix,
    x: &[f32],
    m: usize,
    r0: usize,
    r1: usize,
    out: &mut [f32],
) {
    assert!(x.len() == m * w.cols && out.len() == (r1 - r0) * m && r1 <= w.rows);
    // SAFETY: the caller vouches for the level's features.
    unsafe {
        match (level, w.ggml_type) {
            (Level::Avx512, GGML_Q4_1) => rows_of::<true, 1, 8, 4, 4>(w, x, m, r0, r1, out),
            (Level::Avx512, GGML_Q4_0) => rows_of::<true, 0, 8, 4, 4>(w, x, m, r0, r1, out),
            (Level::Avx512, GGML_Q8_0) => rows_of::<true, 8, 8, 4, 4>(w, x, m, r0, r1, out),
            (Level::Avx2, GGML_Q4_1) => rows_of::<false, 1, 4, 2, 2>(w, x, m, r0, r1, out),
            (Level::Avx2, GGML_Q4_0) => rows_of::<false, 0, 4, 2, 2>(w, x, m, r0, r1, out),
            (Level::Avx2, GGML_Q8_0) => rows_of::<false, 8, 4, 2, 2>(w, x, m, r0, r1, out),
            _ => unreachable!("QMatrix holds only Q4_0, Q4_1 and Q8_0 blocks"),
        }
    }
}

/// The dots of R weight rows with A activation rows, in 16-lane registers (`WIDE`) or in
/// pairs of 8-lane ones.
///
/// # Safety
/// The CPU has AVX-512F (`WIDE`) or AVX2, and FMA and F16C.
unsafe fn tile<const WIDE: bool, const TY: u8, const R: usize, const A: usize>(
    w: &QMatrix,
    x: [&[f32]; A],
    rows: [usize; R],
) -> [[f32; A]; R] {
    // SAFETY: the caller vouches for the features.
    unsafe {
        if WIDE {
            tile_avx512::<TY, R, A>(w, x, rows)
        } else {
            tile_avx2::<TY, R, A>(w, x, rows)
        }
    }
}

/// One activation row: tiles of RS weight rows (AVX-512: 8, 16 independent multiply-add
/// chains a block; measured on 2 cores: single-stream decode ~127 tok/s against ~107 with 4,
/// ~96 with 16), then single rows. Several: tiles of RB weight rows x AB activation rows
/// (each block expanded once for AB rows of a batch), then fewer activations; then single
/// weight rows. A tile covers whole rows, so one call a tile costs nothing measurable.
///
/// # Safety
/// The CPU has the features of `WIDE`'s level.
unsafe fn rows_of<
    const WIDE: bool,
    const TY: u8,
    const RS: usize,
    const RB: usize,
    const AB: usize,
>(
    w: &QMatrix,
    x: &[f32],
    m: usize,
    r0: usize,
    r1: usize,
    out: &mut [f32],
) {
    let k = w.cols;
    let xr = |a: usize| &x[a * k..(a + 1) * k];
    let mut r = r0;
    // SAFETY (the tiles): the caller vouches for the level's features.
    unsafe {
        if m == 1 {
            while r + RS <= r1 {
                let t = tile::<WIDE, TY, RS, 1>(w, [xr(0)], std::array::from_fn(|i| r + i));
                store(out, 1, r - r0, 0, t);
                r += RS;
            }
        }
        while r + RB <= r1 {
            let rows = std::array::from_fn(|i| r + i);
            across::<WIDE, TY, RB, AB>(w, &xr, m, rows, out, r - r0);
            r += RB;
        }
        while r < r1 {
            across::<WIDE, TY, 1, AB>(w, &xr, m, [r], out, r - r0);
            r += 1;
        }
    }
}

/// The R weight rows `rows` against all m activation rows, AB, then 2, then 1 at a time,
/// into out's rows from `at`.
///
/// # Safety
/// The CPU has the features of `WIDE`'s level.
unsafe fn across<'x, const WIDE: bool, const TY: u8, const R: usize, const AB: usize>(
    w: &QMatrix,
    xr: &impl Fn(usize) -> &'x [f32],
    m: usize,
    rows: [usize; R],
    out: &mut [f32],
    at: usize,
) {
    let mut a = 0;
    // SAFETY (the tiles): the caller vouches for the level's features.
    unsafe {
        while a + AB <= m {
            let t = tile::<WIDE, TY, R, AB>(w, std::array::from_fn(|i| xr(a + i)), rows);
            store(out, m, at, a, t);
            a += AB;
        }
        if a + 2 <= m {
            store(
                out,
                m,
                at,
                a,
                tile::<WIDE, TY, R, 2>(w, [xr(a), xr(a + 1)], rows),
            );
            a += 2;
        }
        if a < m {
            store(out, m, at, a, tile::<WIDE, TY, R, 1>(w, [xr(a)], rows));
        }
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
#[target_feature(enable = "f16c")]
#[inline]
unsafe fn scale_min(blk: *const u8) -> (f32, f32) {
    // SAFETY: the caller passes a whole block, at least 8 bytes.
    let v = _mm_cvtph_ps(unsafe { _mm_loadl_epi64(blk as *const __m128i) });
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

/// The block at `blk` as its two 16-lane halves of f32 weights (elements 0..16, 16..32).
#[target_feature(enable = "avx512f,fma,f16c")]
#[inline]
unsafe fn expand_avx512<const TY: u8>(blk: *const u8) -> (__m512, __m512) {
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

/// The loop both kernels share: block by block, each weight row's block expanded once
/// (`expand`, given the block's address) with the same block of the next tile's rows asked
/// for, then dotted into each activation row's accumulator (`step`, given the activation
/// row's 32 floats of the block). The prefetch: the rows are adjacent in memory, and the
/// product streams ~100 MB a token and waited on memory without it (measured: single-stream
/// decode ~135 -> ~175 tok/s on 2 cores; 512 or 2,048 bytes ahead gained less; the int8
/// kernel does the same). A prefetch past the matrix's end is a no-op.
#[inline(always)]
fn tile_loop<Wv, Acc: Copy, const R: usize, const A: usize>(
    w: &QMatrix,
    x: [&[f32]; A],
    rows: [usize; R],
    zero: Acc,
    expand: impl Fn(*const u8) -> Wv,
    step: impl Fn(&mut Acc, &Wv, *const f32),
) -> [[Acc; A]; R] {
    let (nb, bb) = (w.cols / BLOCK, w.block_bytes);
    let wrow = rows.map(|r| w.row(r));
    // The closures read a whole block and 32 floats at the addresses given: in bounds.
    assert!(x.iter().all(|v| v.len() == nb * BLOCK) && wrow.iter().all(|v| v.len() == nb * bb));
    let mut acc = [[zero; A]; R];
    let ahead = R * nb * bb;
    for b in 0..nb {
        for (ar, row) in acc.iter_mut().zip(&wrow) {
            let wv = expand(row[b * bb..].as_ptr());
            super::prefetch_at(row.as_ptr().wrapping_add(b * bb + ahead));
            for (acc_ra, xa) in ar.iter_mut().zip(&x) {
                step(acc_ra, &wv, xa[b * BLOCK..].as_ptr());
            }
        }
    }
    acc
}

/// `$name::<TY, R, A>(w, x, rows)`: the dots of R weight rows with A activation rows, on one
/// instruction set: [`tile_loop`] with its `$expand` and `$step`, then `$reduce` per dot.
macro_rules! tile_kernel {
    ($name:ident, $features:literal, $zero:expr, $expand:ident, $step:ident, $reduce:ident) => {
        #[target_feature(enable = $features)]
        fn $name<const TY: u8, const R: usize, const A: usize>(
            w: &QMatrix,
            x: [&[f32]; A],
            rows: [usize; R],
        ) -> [[f32; A]; R] {
            let acc = tile_loop(
                w,
                x,
                rows,
                $zero,
                // SAFETY: `tile_loop` passes the address of a whole block of this type.
                |blk| unsafe { $expand::<TY>(blk) },
                // SAFETY: `tile_loop` passes the address of the block's 32 activations.
                |acc, wv, p| unsafe { $step(acc, wv, p) },
            );
            acc.map(|ar| ar.map(|a| $reduce(a)))
        }
    };
}

tile_kernel!(
    tile_avx512,
    "avx512f,fma,f16c",
    _mm512_setzero_ps(),
    expand_avx512,
    step_avx512,
    reduce_avx512
);
tile_kernel!(
    tile_avx2,
    "avx2,fma,f16c",
    [_mm256_setzero_ps(); 2],
    expand_avx2,
    step_avx2,
    reduce_avx2
);

/// One block into a dot's 16 lanes: elements 0..16, then 16..32.
#[target_feature(enable = "avx512f,fma,f16c")]
#[inline]
unsafe fn step_avx512(acc: &mut __m512, &(wl, wh): &(__m512, __m512), p: *const f32) {
    // SAFETY: the caller passes the address of 32 floats.
    let (xl, xh) = unsafe { (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))) };
    *acc = _mm512_fmadd_ps(wl, xl, *acc);
    *acc = _mm512_fmadd_ps(wh, xh, *acc);
}

/// A dot's 16 lanes, summed in [`reduce_lanes`]' order.
#[target_feature(enable = "avx512f,fma,f16c")]
#[inline]
fn reduce_avx512(acc: __m512) -> f32 {
    let mut lanes = [0f32; 16];
    // SAFETY: lanes holds 16 floats.
    unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), acc) };
    reduce_lanes(&lanes)
}

/// The block at `blk` as four 8-lane parts of f32 weights (elements 0..8, 8..16, 16..24,
/// 24..32).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn expand_avx2<const TY: u8>(blk: *const u8) -> [__m256; 4] {
    // SAFETY (the loads): the caller passes a whole block of this type.
    unsafe {
        let (d, m) = scale_min(blk);
        let d = _mm256_set1_ps(d);
        if TY == 8 {
            return std::array::from_fn(|j| {
                let q = _mm_loadl_epi64(blk.add(2 + 8 * j) as *const __m128i);
                _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d)
            });
        }
        let at = if TY == 1 { 4 } else { 2 };
        // Byte j holds element j (low nibble) and element j + 16 (high nibble).
        let q = _mm_loadu_si128(blk.add(at) as *const __m128i);
        let (b0, b1) = (
            _mm256_cvtepu8_epi32(q),
            _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(q)),
        );
        let low = _mm256_set1_epi32(0x0f);
        let nibbles = [
            _mm256_and_si256(b0, low),
            _mm256_and_si256(b1, low),
            _mm256_srli_epi32::<4>(b0),
            _mm256_srli_epi32::<4>(b1),
        ];
        nibbles.map(|n| {
            if TY == 1 {
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(n), d, _mm256_set1_ps(m))
            } else {
                _mm256_mul_ps(
                    _mm256_cvtepi32_ps(_mm256_sub_epi32(n, _mm256_set1_epi32(8))),
                    d,
                )
            }
        })
    }
}

/// One block into a dot's 16 lanes held in two 8-lane registers: lanes 0..8 take elements
/// 0..8 and then 16..24, lanes 8..16 elements 8..16 and then 24..32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn step_avx2(acc: &mut [__m256; 2], wv: &[__m256; 4], p: *const f32) {
    for (j, wj) in wv.iter().enumerate() {
        // SAFETY: the caller passes the address of 32 floats.
        let xj = unsafe { _mm256_loadu_ps(p.add(8 * j)) };
        acc[j % 2] = _mm256_fmadd_ps(*wj, xj, acc[j % 2]);
    }
}

/// A dot's 16 lanes (two registers), summed in [`reduce_lanes`]' order.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn reduce_avx2([lo, hi]: [__m256; 2]) -> f32 {
    let mut lanes = [0f32; 16];
    // SAFETY: lanes holds 16 floats, 8 at 0 and 8 at 8.
    unsafe {
        _mm256_storeu_ps(lanes.as_mut_ptr(), lo);
        _mm256_storeu_ps(lanes.as_mut_ptr().add(8), hi);
    }
    reduce_lanes(&lanes)
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
