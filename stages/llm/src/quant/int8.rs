//! The row kernel of the opt-in weight format `gguf-int8`: activations are rounded to 8 bits
//! per block of 32 (scale = largest magnitude / 127, as llama.cpp's Q8_1), so each weight
//! block's products become one exact integer dot product, the arithmetic llama.cpp decodes
//! with. The weights are the same GGUF blocks as `gguf`'s; only the activations are rounded.
//!
//! Every path gives the same bits. The integer part is exact whichever instructions form it
//! (AVX-512 VNNI's `dpbusd`, AVX2's `maddubs` + `madd` pairs, plain Rust), and the float steps
//! after it are spelled out and taken in the same order everywhere:
//! per block, 8 lanes of 4 products each, `acc[j] = fma(float(p[j]), d_w * d_x, acc[j])`; for
//! Q4_1 also `acc_min = fma(m_w, s_x, acc_min)` in block order; at the end
//! `((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7))` plus `acc_min`. A fused multiply-add rounds once
//! wherever it runs (`f32::mul_add` is the correctly rounded one without the instruction).

use super::{BLOCK, QMatrix};
use crate::gguf::{GGML_Q4_0, GGML_Q4_1, GGML_Q8_0};

/// Activation rows rounded to 8 bits per block of 32.
pub struct Q8Rows {
    /// Elements per row (a multiple of 32).
    k: usize,
    q: Vec<i8>,
    /// Per block, block-major ([block][row], so a tile's rows are adjacent): the scale (q * d
    /// is the rounded activation)...
    d: Vec<f32>,
    /// ...and d times the block's sum of q (what a Q4_1 minimum multiplies).
    s: Vec<f32>,
    /// Per block, 8 lanes: the sum of q over elements 4j..4j+4 (what a signed weight's
    /// offset multiplies: the kernels dot unsigned bytes, w + offset).
    lane_sums: Vec<i32>,
}

impl Q8Rows {
    /// Rounds the `m` rows of `x` ([m, k] row-major, k a multiple of 32). A block holding a
    /// NaN or an infinity gets a NaN scale, so the products it enters are NaN, as in f32.
    pub fn quantize(x: &[f32], k: usize) -> Self {
        assert!(k.is_multiple_of(BLOCK) && x.len().is_multiple_of(k));
        let (blocks, m, nb) = (x.len() / BLOCK, x.len() / k, k / BLOCK);
        let mut q = vec![0i8; x.len()];
        let (mut d, mut s) = (vec![0f32; blocks], vec![0f32; blocks]);
        let mut lane_sums = vec![0i32; blocks * 8];
        for (i, (xb, qb)) in x
            .chunks_exact(BLOCK)
            .zip(q.chunks_exact_mut(BLOCK))
            .enumerate()
        {
            let at = (i % nb) * m + i / nb;
            let Some((scale, inv)) = block_scale(xb) else {
                d[at] = f32::NAN;
                s[at] = f32::NAN;
                continue;
            };
            let sum = round_block(xb, inv, qb);
            d[at] = scale;
            s[at] = scale * sum as f32;
        }
        for (l, qb) in lane_sums.iter_mut().zip(q.chunks_exact(4)) {
            *l = qb.iter().map(|&v| i32::from(v)).sum();
        }
        Q8Rows {
            k,
            q,
            d,
            s,
            lane_sums,
        }
    }

    fn rows(&self) -> usize {
        self.q.len() / self.k
    }

    /// The rounded activations as f32 ([m, k] row-major): q * d, what the integer dots
    /// multiply; the reference for [`rounded_f32`], which large products (prefill) hand to an
    /// f32 GEMM, so a row gives the same logits up to summation order whichever path its
    /// batch takes.
    #[cfg(test)]
    fn rounded(&self) -> Vec<f32> {
        let (m, nb) = (self.rows(), self.k / BLOCK);
        let mut out = vec![0f32; self.q.len()];
        for (i, (o, q)) in out
            .chunks_exact_mut(BLOCK)
            .zip(self.q.chunks_exact(BLOCK))
            .enumerate()
        {
            let d = self.d[(i % nb) * m + i / nb];
            for (ov, &qv) in o.iter_mut().zip(q) {
                *ov = f32::from(qv) * d;
            }
        }
        out
    }
}

/// [`Q8Rows::quantize`] then [`Q8Rows::rounded`] block by block (the same bits, without the
/// integer rows the GEMM does not need): what a large product hands to the f32 GEMM.
pub fn rounded_f32(x: &[f32], k: usize) -> Vec<f32> {
    assert!(k.is_multiple_of(BLOCK) && x.len().is_multiple_of(k));
    let mut out = vec![0f32; x.len()];
    let mut q = [0i8; BLOCK];
    for (xb, ob) in x.chunks_exact(BLOCK).zip(out.chunks_exact_mut(BLOCK)) {
        let Some((scale, inv)) = block_scale(xb) else {
            ob.fill(f32::NAN);
            continue;
        };
        round_block(xb, inv, &mut q);
        for (o, &qv) in ob.iter_mut().zip(&q) {
            *o = f32::from(qv) * scale;
        }
    }
    out
}

/// A block's (scale, 1 / scale): scale = largest magnitude / 127, and 0 for 1 / 0. None when
/// the block holds a NaN or an infinity.
fn block_scale(x: &[f32]) -> Option<(f32, f32)> {
    if !x.iter().all(|v| v.is_finite()) {
        return None;
    }
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = amax / 127.0;
    Some((scale, if amax > 0.0 { 1.0 / scale } else { 0.0 }))
}

/// q = round(x * inv) to nearest, ties to even, within +-127; returns the sum of q.
fn round_block(x: &[f32], inv: f32, q: &mut [i8]) -> i32 {
    #[cfg(target_arch = "x86_64")]
    {
        if simd_level() != SimdLevel::Scalar {
            #[allow(unsafe_code)]
            // SAFETY: both SIMD levels include AVX2 (and with it SSE4.1's rounding instruction).
            return unsafe { round_block_avx2(x, inv, q) };
        }
    }
    round_block_with(x, inv, q)
}

/// The same arithmetic compiled for AVX2: a rounding instruction per 8 values instead of a
/// call to libm's `rintf` per value (same IEEE multiply, same ties-to-even rounding).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn round_block_avx2(x: &[f32], inv: f32, q: &mut [i8]) -> i32 {
    round_block_with(x, inv, q)
}

#[inline(always)]
fn round_block_with(x: &[f32], inv: f32, q: &mut [i8]) -> i32 {
    let mut sum = 0i32;
    for (o, &v) in q.iter_mut().zip(x) {
        let r = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
        sum += i32::from(r);
        *o = r;
    }
    sum
}

/// out [r1 - r0, m]: rows r0..r1 of `w` dotted with each rounded activation row.
pub fn rows_into(w: &QMatrix, x: &Q8Rows, r0: usize, r1: usize, out: &mut [f32]) {
    assert_eq!(x.k, w.cols);
    assert_eq!(out.len(), (r1 - r0) * x.rows());
    #[cfg(target_arch = "x86_64")]
    {
        #[allow(unsafe_code)]
        match simd_level() {
            // SAFETY: the CPU has the features each function enables, checked at run time.
            SimdLevel::Vnni => return unsafe { x86::rows_vnni(w, x, r0, r1, out) },
            SimdLevel::Avx2 => return unsafe { x86::rows_avx2(w, x, r0, r1, out) },
            SimdLevel::Scalar => {}
        }
    }
    rows_scalar(w, x, r0, r1, out)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum SimdLevel {
    Vnni,
    Avx2,
    Scalar,
}

/// The best path this CPU runs (all give the same bits; the tests compare them directly).
fn simd_level() -> SimdLevel {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(best_level)
}

fn best_level() -> SimdLevel {
    #[cfg(target_arch = "x86_64")]
    {
        let cap = super::simd_cap();
        if cap >= 1 && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c") {
            let vnni = cap >= 2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni");
            return if vnni {
                SimdLevel::Vnni
            } else {
                SimdLevel::Avx2
            };
        }
    }
    SimdLevel::Scalar
}

/// The f16 at byte `i` of a block, as f32 (exact).
fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// The reference path: the integers and float steps every SIMD path reproduces.
fn rows_scalar(w: &QMatrix, x: &Q8Rows, r0: usize, r1: usize, out: &mut [f32]) {
    let (m, nb, bb) = (x.rows(), w.cols / BLOCK, w.block_bytes);
    for (r, o) in (r0..r1).zip(out.chunks_exact_mut(m)) {
        let row = w.row(r);
        for (a, v) in o.iter_mut().enumerate() {
            let mut acc = [0f32; 8];
            let mut acc_min = 0f32;
            for b in 0..nb {
                let blk = &row[b * bb..(b + 1) * bb];
                let xq = &x.q[(a * nb + b) * BLOCK..(a * nb + b + 1) * BLOCK];
                let (ai, scale) = (b * m + a, f16_at(blk, 0) * x.d[b * m + a]);
                let wv = block_values(w.ggml_type, blk);
                for (j, lane) in acc.iter_mut().enumerate() {
                    let p: i32 = (4 * j..4 * j + 4).map(|e| wv[e] * i32::from(xq[e])).sum();
                    *lane = (p as f32).mul_add(scale, *lane);
                }
                if w.ggml_type == GGML_Q4_1 {
                    acc_min = f16_at(blk, 2).mul_add(x.s[ai], acc_min);
                }
            }
            *v = reduce8(&acc) + acc_min;
        }
    }
}

/// The 32 integer weights of a block (without scale or minimum), in element order.
fn block_values(ty: u32, blk: &[u8]) -> [i32; 32] {
    let mut v = [0i32; 32];
    match ty {
        GGML_Q8_0 => {
            for (o, &q) in v.iter_mut().zip(&blk[2..34]) {
                *o = i32::from(q as i8);
            }
        }
        GGML_Q4_0 | GGML_Q4_1 => {
            let (at, off) = if ty == GGML_Q4_0 { (2, 8) } else { (4, 0) };
            for (i, &q) in blk[at..at + 16].iter().enumerate() {
                v[i] = i32::from(q & 0x0f) - off;
                v[i + 16] = i32::from(q >> 4) - off;
            }
        }
        _ => unreachable!("QMatrix holds only Q4_0, Q4_1 and Q8_0 blocks"),
    }
    v
}

/// The fixed-order sum of 8 lanes (what a 256-bit halving reduction computes).
fn reduce8(a: &[f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use super::Q8Rows;
    use crate::quant::QMatrix;

    /// One copy of the kernel per instruction set: every function in it carries the same
    /// target features, so each inlines into the next; only the integer dot differs.
    macro_rules! kernel {
        ($module:ident, $features:literal, q8_by_sign: $q8_by_sign:literal,
         |$init:ident, $u:ident, $s:ident| $idot:expr) => {
            pub(super) mod $module {
                /// Whether Q8_0's signed weights are dotted by moving their sign onto the
                /// activation (|w| <= 128) rather than as w + 128 (which needs no i16 step).
                const Q8_BY_SIGN: bool = $q8_by_sign;

                use std::arch::x86_64::*;

                use super::super::{BLOCK, Q8Rows, reduce8};
                use crate::gguf::{GGML_Q4_0, GGML_Q4_1, GGML_Q8_0};
                use crate::quant::QMatrix;

                #[target_feature(enable = $features)]
                pub fn rows(w: &QMatrix, x: &Q8Rows, r0: usize, r1: usize, out: &mut [f32]) {
                    match w.ggml_type {
                        GGML_Q4_1 => rows_of::<1>(w, x, r0, r1, out),
                        GGML_Q4_0 => rows_of::<0>(w, x, r0, r1, out),
                        GGML_Q8_0 => rows_of::<8>(w, x, r0, r1, out),
                        _ => unreachable!("QMatrix holds only Q4_0, Q4_1 and Q8_0 blocks"),
                    }
                }

                /// Tiles of 8 (or 4) weight rows x 1 activation row (one activation: 8
                /// independent chains; 8 gave single-stream decode ~8% more than 4) or 2 x 4 (a batch: each weight block unpacked once for 4 rows, each
                /// activation block loaded once for 2 weight rows).
                #[target_feature(enable = $features)]
                #[inline]
                fn rows_of<const TY: u8>(
                    w: &QMatrix,
                    x: &Q8Rows,
                    r0: usize,
                    r1: usize,
                    out: &mut [f32],
                ) {
                    let m = x.rows();
                    let mut r = r0;
                    while r < r1 {
                        let o = &mut out[(r - r0) * m..];
                        if m == 1 && r + 8 <= r1 {
                            let rows = [r, r + 1, r + 2, r + 3, r + 4, r + 5, r + 6, r + 7];
                            let t = tile::<TY, 8, 1>(w, x, rows, [0]);
                            for (oi, ti) in o.iter_mut().zip(t) {
                                *oi = ti[0];
                            }
                            r += 8;
                            continue;
                        }
                        if m == 1 && r + 4 <= r1 {
                            let t = tile::<TY, 4, 1>(w, x, [r, r + 1, r + 2, r + 3], [0]);
                            for (oi, ti) in o.iter_mut().zip(t) {
                                *oi = ti[0];
                            }
                            r += 4;
                            continue;
                        }
                        if m >= 4 && r + 2 <= r1 {
                            // Two weight rows share each activation block's loads.
                            let mut a = 0;
                            while a + 4 <= m {
                                let acts = [a, a + 1, a + 2, a + 3];
                                let t = tile::<TY, 2, 4>(w, x, [r, r + 1], acts);
                                o[a..a + 4].copy_from_slice(&t[0]);
                                o[m + a..m + a + 4].copy_from_slice(&t[1]);
                                a += 4;
                            }
                            while a < m {
                                let t = tile::<TY, 2, 1>(w, x, [r, r + 1], [a]);
                                o[a] = t[0][0];
                                o[m + a] = t[1][0];
                                a += 1;
                            }
                            r += 2;
                            continue;
                        }
                        let mut a = 0;
                        while a + 4 <= m {
                            let t = tile::<TY, 1, 4>(w, x, [r], [a, a + 1, a + 2, a + 3]);
                            o[a..a + 4].copy_from_slice(&t[0]);
                            a += 4;
                        }
                        while a < m {
                            o[a] = tile::<TY, 1, 1>(w, x, [r], [a])[0][0];
                            a += 1;
                        }
                        r += 1;
                    }
                }

                /// Weight block `blk` as 32 bytes in element order: the weight plus its type's
                /// offset as unsigned bytes (Q4_1 0, Q4_0 8: the nibbles as stored; Q8_0 128),
                /// or with [`Q8_BY_SIGN`] Q8_0's signed bytes as stored.
                #[target_feature(enable = $features)]
                #[inline]
                unsafe fn unpack<const TY: u8>(blk: *const u8) -> __m256i {
                    // SAFETY (the loads): the caller passes a whole block of this type.
                    unsafe {
                        if TY == 8 {
                            let v = _mm256_loadu2_m128i(
                                blk.add(18) as *const __m128i,
                                blk.add(2) as *const __m128i,
                            );
                            if Q8_BY_SIGN {
                                return v;
                            }
                            return _mm256_xor_si256(v, _mm256_set1_epi8(-128));
                        }
                        let at = if TY == 1 { 4 } else { 2 };
                        let q = _mm_loadu_si128(blk.add(at) as *const __m128i);
                        let nib = _mm_set1_epi8(0x0f);
                        let lo = _mm_and_si128(q, nib);
                        let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), nib);
                        _mm256_set_m128i(hi, lo)
                    }
                }

                /// 8 lanes, lane j `init[j]` plus the exact sum of the products of elements
                /// 4j..4j+4 (unsigned weight bytes, signed activations).
                #[target_feature(enable = $features)]
                #[inline]
                fn idot($init: __m256i, $u: __m256i, $s: __m256i) -> __m256i {
                    $idot
                }

                /// A block's f16 scale and (Q4_1) minimum, as f32 (exact). One 8-byte load
                /// that zeroes the rest of the register: a 2-byte insert would merge into
                /// whatever register the compiler picks, an accumulator included, and chain
                /// every block behind the last one's sum.
                #[target_feature(enable = $features)]
                #[inline]
                unsafe fn scale_min(blk: *const u8) -> (f32, f32) {
                    // SAFETY: every block type holds at least 18 bytes.
                    let v = _mm_cvtph_ps(unsafe { _mm_loadl_epi64(blk as *const __m128i) });
                    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
                }

                /// The dots of R weight rows with A activation rows, in the reference's
                /// arithmetic.
                #[target_feature(enable = $features)]
                #[inline]
                fn tile<const TY: u8, const R: usize, const A: usize>(
                    w: &QMatrix,
                    x: &Q8Rows,
                    rows: [usize; R],
                    acts: [usize; A],
                ) -> [[f32; A]; R] {
                    let (nb, bb) = (w.cols / BLOCK, w.block_bytes);
                    let wrow: [&[u8]; R] = rows.map(|r| w.row(r));
                    let xq: [&[i8]; A] = acts.map(|a| &x.q[a * nb * BLOCK..(a + 1) * nb * BLOCK]);
                    let m = x.rows();
                    assert!(acts.iter().all(|&a| a < m) && x.d.len() == nb * m);
                    let xl: [&[i32]; A] = acts.map(|a| &x.lane_sums[a * nb * 8..(a + 1) * nb * 8]);
                    // Signed weights are dotted as w + offset: each lane starts at
                    // -offset * (its activations' sum), so the integer is exactly sum(w * x).
                    let offset = match TY {
                        0 => 8,
                        8 if !Q8_BY_SIGN => 128,
                        _ => 0,
                    };
                    assert!(wrow.iter().all(|r| r.len() == nb * bb));
                    let mut acc = [[_mm256_setzero_ps(); A]; R];
                    let mut acc_min = [[0f32; A]; R];
                    for b in 0..nb {
                        let mut xv = [_mm256_setzero_si256(); A];
                        let mut init = [_mm256_setzero_si256(); A];
                        for a in 0..A {
                            // SAFETY: xq[a] holds nb blocks of 32 bytes, xl[a] nb of 8 lanes.
                            unsafe {
                                xv[a] =
                                    _mm256_loadu_si256(xq[a].as_ptr().add(b * BLOCK) as *const _);
                                if offset != 0 {
                                    let l =
                                        _mm256_loadu_si256(xl[a].as_ptr().add(b * 8) as *const _);
                                    init[a] = _mm256_mullo_epi32(l, _mm256_set1_epi32(-offset));
                                }
                            }
                        }
                        for r in 0..R {
                            // SAFETY: wrow[r] holds nb whole blocks of bb bytes (asserted).
                            let (wv, dw, mw) = unsafe {
                                let blk = wrow[r].as_ptr().add(b * bb);
                                // The next tile's rows, R rows on: the hardware's prefetcher
                                // alone left single-thread decode at a third of the bandwidth
                                // a plain stream gets. A prefetch never faults.
                                _mm_prefetch::<_MM_HINT_T0>(
                                    blk.wrapping_add(R * nb * bb) as *const i8
                                );
                                let (dw, mw) = scale_min(blk);
                                (unpack::<TY>(blk), dw, mw)
                            };
                            for a in 0..A {
                                let p = if TY == 8 && Q8_BY_SIGN {
                                    let (u, v) =
                                        (_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv[a], wv));
                                    _mm256_cvtepi32_ps(idot(init[a], u, v))
                                } else {
                                    _mm256_cvtepi32_ps(idot(init[a], wv, xv[a]))
                                };
                                let at = b * m + acts[a];
                                let scale = _mm256_set1_ps(dw * x.d[at]);
                                acc[r][a] = _mm256_fmadd_ps(p, scale, acc[r][a]);
                                if TY == 1 {
                                    acc_min[r][a] = mw.mul_add(x.s[at], acc_min[r][a]);
                                }
                            }
                        }
                    }
                    let mut out = [[0f32; A]; R];
                    for r in 0..R {
                        for a in 0..A {
                            let mut lanes = [0f32; 8];
                            // SAFETY: lanes has 8 floats.
                            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][a]) };
                            out[r][a] = reduce8(&lanes) + acc_min[r][a];
                        }
                    }
                    out
                }
            }
        };
    }

    kernel!(vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", q8_by_sign: false, |init, u, s| {
        _mm256_dpbusd_epi32(init, u, s)
    });
    // maddubs adds pairs of u8 x i8 products in i16 (saturating): w + 128 (<= 255) could
    // leave it, |w| <= 128 cannot (2 * 128 * 127 = 32,512).
    kernel!(avx2, "avx2,fma,f16c", q8_by_sign: true, |init, u, s| {
        _mm256_add_epi32(
            init,
            _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)),
        )
    });

    /// # Safety
    /// The CPU has AVX2, FMA, F16C, AVX-512 F and VL, and AVX-512 VNNI.
    pub(super) unsafe fn rows_vnni(w: &QMatrix, x: &Q8Rows, r0: usize, r1: usize, out: &mut [f32]) {
        // SAFETY: the caller's promise.
        unsafe { vnni::rows(w, x, r0, r1, out) }
    }

    /// # Safety
    /// The CPU has AVX2, FMA and F16C.
    pub(super) unsafe fn rows_avx2(w: &QMatrix, x: &Q8Rows, r0: usize, r1: usize, out: &mut [f32]) {
        // SAFETY: the caller's promise.
        unsafe { avx2::rows(w, x, r0, r1, out) }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::matrix;
    use super::*;

    fn activations(m: usize, k: usize, seed: usize) -> Vec<f32> {
        (0..m * k)
            .map(|i| (((i * 37 + seed * 11) % 101) as f32 - 50.0) / 13.0)
            .collect()
    }

    /// Every SIMD path this CPU has gives the scalar path's bits, for each block type, tile
    /// edge and batch size.
    #[test]
    fn simd_paths_equal_the_scalar_path_bit_for_bit() {
        for ty in [GGML_Q8_0, GGML_Q4_0, GGML_Q4_1] {
            let (rows, cols) = (67, 96);
            let w = matrix(ty, rows, cols, 5);
            for m in [1, 2, 3, 5, 8] {
                let x = Q8Rows::quantize(&activations(m, cols, m), cols);
                let mut want = vec![0f32; rows * m];
                rows_scalar(&w, &x, 0, rows, &mut want);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                #[cfg(target_arch = "x86_64")]
                #[allow(unsafe_code)]
                for level in [SimdLevel::Avx2, SimdLevel::Vnni] {
                    if best_level() == SimdLevel::Scalar
                        || (level == SimdLevel::Vnni && best_level() != SimdLevel::Vnni)
                    {
                        continue;
                    }
                    let mut got = vec![0f32; rows * m];
                    // The partial range exercises a 4-row tile's edge.
                    let (r0, r1) = (3, rows);
                    // SAFETY: the CPU has the level's features (checked just above).
                    unsafe {
                        match level {
                            SimdLevel::Vnni => {
                                x86::rows_vnni(&w, &x, r0, r1, &mut got[r0 * m..]);
                                x86::rows_vnni(&w, &x, 0, r0, &mut got[..r0 * m]);
                            }
                            _ => {
                                x86::rows_avx2(&w, &x, r0, r1, &mut got[r0 * m..]);
                                x86::rows_avx2(&w, &x, 0, r0, &mut got[..r0 * m]);
                            }
                        }
                    }
                    assert_eq!(bits(&got), bits(&want), "type {ty}, m {m}, {level:?}");
                }
            }
        }
    }

    /// The integer dot products are those of the rounded activations: the result is within
    /// the rounding of the activations of the f32 product (each activation moves by at most
    /// half a step, d / 2), and a NaN activation makes its products NaN.
    #[test]
    fn products_are_the_f32_products_of_the_rounded_activations() {
        for ty in [GGML_Q8_0, GGML_Q4_0, GGML_Q4_1] {
            let (rows, cols, m) = (9, 128, 3);
            let w = matrix(ty, rows, cols, 3);
            let xs = activations(m, cols, 7);
            let x = Q8Rows::quantize(&xs, cols);
            let mut got = vec![0f32; rows * m];
            rows_into(&w, &x, 0, rows, &mut got);
            let mut wrow = vec![0f32; cols];
            for r in 0..rows {
                crate::gguf::dequant_blocks(ty, w.row(r), &mut wrow);
                for a in 0..m {
                    let xa = &xs[a * cols..(a + 1) * cols];
                    let exact: f64 = wrow.iter().zip(xa).map(|(p, q)| f64::from(p * q)).sum();
                    // Rounding bound: sum over elements of |w| * d_block / 2.
                    let bound: f64 = wrow
                        .iter()
                        .enumerate()
                        .map(|(i, p)| f64::from(p.abs()) * f64::from(x.d[(i / 32) * m + a]))
                        .sum::<f64>()
                        / 2.0;
                    let diff = (f64::from(got[r * m + a]) - exact).abs();
                    assert!(
                        diff <= bound * 1.01 + 1e-4,
                        "type {ty} row {r} act {a}: {} vs {exact} (bound {bound})",
                        got[r * m + a]
                    );
                    assert!(bound > 0.0);
                }
            }
            let mut bad = xs.clone();
            bad[40] = f32::NAN;
            let x = Q8Rows::quantize(&bad, cols);
            rows_into(&w, &x, 0, rows, &mut got);
            assert!((0..rows).all(|r| got[r * m].is_nan()), "type {ty}");
            assert!((0..rows).all(|r| got[r * m + 1].is_finite()), "type {ty}");
        }
    }

    /// The one-pass rounding for the GEMM path gives quantize-then-expand's bits.
    #[test]
    fn one_pass_rounding_equals_quantize_then_expand() {
        let mut x = activations(3, 96, 2);
        x[100] = f32::NAN;
        x[7] = 1e-30;
        let want = Q8Rows::quantize(&x, 96).rounded();
        let got = rounded_f32(&x, 96);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want));
        assert!(got[96..128].iter().all(|v| v.is_nan()));
    }

    /// Rounding: the block's largest magnitude maps to +-127, zeros stay zero.
    #[test]
    fn activations_round_to_127_steps_of_their_block() {
        let mut x = vec![0f32; 64];
        x[3] = -2.0;
        x[4] = 1.1;
        x[5] = 0.5;
        let q = Q8Rows::quantize(&x, 64);
        assert_eq!(&q.q[3..6], &[-127, 70, 32]);
        assert_eq!(q.d[0], 2.0 / 127.0);
        assert_eq!(q.s[0], q.d[0] * (-127 + 70 + 32) as f32);
        assert!(q.q[32..].iter().all(|&v| v == 0));
        assert_eq!(q.d[1], 0.0);
        // Two rows of two blocks: scales are stored block-major ([block][row]).
        let mut x2 = vec![0f32; 128];
        x2[64] = 127.0; // row 1, block 0
        x2[96] = 254.0; // row 1, block 1
        let q2 = Q8Rows::quantize(&x2, 64);
        assert_eq!(q2.d, vec![0.0, 1.0, 0.0, 2.0]);
    }
}
