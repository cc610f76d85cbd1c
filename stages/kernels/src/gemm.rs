//! The one matrix product, with its arithmetic fixed by this source.
//!
//! `C[r, c] = init[c] + sum_t A(r, t) * B[t, c]`, each term one fused multiply-add, in
//! increasing `t`, starting from `init[c]` (or +0.0). Every output is its own chain, so how
//! the work is tiled (which depends on the CPU) cannot change a bit: the same source is
//! compiled for AVX-512, AVX2 + FMA and for any other CPU (where `f32::mul_add` is libm's
//! correctly rounded `fmaf`), and all three give the same result on every machine. Unit tests
//! check that on shapes with every kind of edge.
//!
//! MKL, which libtorch's CPU products use, picks its kernel (and so its summation order) by
//! CPU model; on the AMD EPYC this was written on its Zen kernel ran at ~100-113 GFLOP/s on one
//! thread, the AVX-512 tile here at ~250-280 on the DDQN's shapes.
use std::sync::OnceLock;

/// Which compilation of the kernel runs. The result does not depend on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Avx512,
    Avx2,
    Generic,
}

impl Level {
    /// The best level this CPU runs, within `ATEN_CPU_CAPABILITY` as libtorch reads it
    /// (`avx2`: no AVX-512; `default`: the plain build), like the LLM kernels. The bytes do not
    /// depend on it; the cap lets one machine run, check and time the narrower builds
    /// (`ATEN_CPU_CAPABILITY=default flag verify --recompute ddqn`).
    pub fn detect() -> Level {
        static BEST: OnceLock<Level> = OnceLock::new();
        *BEST.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                let cap = flag_core::numerics::cpu_capability();
                let fma = is_x86_feature_detected!("fma");
                if cap == "avx512" && is_x86_feature_detected!("avx512f") && fma {
                    return Level::Avx512;
                }
                if cap != "default" && is_x86_feature_detected!("avx2") && fma {
                    return Level::Avx2;
                }
            }
            Level::Generic
        })
    }

    /// Every level this CPU runs, best first (for tests that compare them).
    pub fn all_here() -> Vec<Level> {
        [Level::Avx512, Level::Avx2, Level::Generic]
            .into_iter()
            .filter(|l| *l as u8 >= Level::detect() as u8)
            .collect()
    }

    /// This level, or the best this CPU has when it lacks this one.
    pub fn here(self) -> Level {
        if self as u8 >= Level::detect() as u8 {
            self
        } else {
            Level::detect()
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Level::Avx512 => "avx512",
            Level::Avx2 => "avx2",
            Level::Generic => "generic",
        }
    }
}

/// The left operand: `A(r, t) = data[r * row + t * depth]` (a row-major matrix, or its
/// transpose with `row = 1`).
#[derive(Clone, Copy)]
pub struct Strided<'a> {
    pub data: &'a [f32],
    pub row: usize,
    pub depth: usize,
}

/// `c[r * cols + col] = init[col] + sum_{t < depth} a(r, t) * b[t * cols + col]` for
/// `r < rows`, `col < cols`; see the module's comment for the order of the arithmetic.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    level: Level,
    rows: usize,
    depth: usize,
    cols: usize,
    a: Strided,
    b: &[f32],
    init: Option<&[f32]>,
    c: &mut [f32],
) {
    if rows == 0 || cols == 0 {
        return;
    }
    if depth > 0 {
        assert!(
            (rows - 1) * a.row + (depth - 1) * a.depth < a.data.len(),
            "gemm: left operand too short"
        );
    }
    assert!(b.len() >= depth * cols, "gemm: right operand too short");
    assert!(c.len() >= rows * cols, "gemm: output too short");
    if let Some(i) = init {
        assert!(i.len() >= cols, "gemm: init too short");
    }
    let p = Product {
        depth,
        cols,
        a,
        b,
        init,
    };
    match level.here() {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => {
            // SAFETY: `here` says the CPU has AVX-512F and FMA; bounds checked above.
            #[allow(unsafe_code)]
            unsafe {
                // 8 rows x 32 columns: 16 zmm accumulators (measured against 4x64, 6x64,
                // 12x32, 8x48, 6x32, 4x32, 16x16). One or two rows (the agent's action, a
                // block's edge) take 128 columns, for 8 or 16 independent chains.
                if rows < 4 {
                    avx512::run::<2, 128>(&p, rows, c)
                } else {
                    avx512::run::<8, 32>(&p, rows, c)
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => {
            // SAFETY: `here` says the CPU has AVX2 and FMA; bounds checked above.
            #[allow(unsafe_code)]
            unsafe {
                // 6 rows x 16 columns: 12 of the 16 ymm registers hold accumulators; one or
                // two rows take 48 columns.
                if rows < 3 {
                    avx2::run::<2, 48>(&p, rows, c)
                } else {
                    avx2::run::<6, 16>(&p, rows, c)
                }
            }
        }
        _ => generic::run::<4, 8>(&p, rows, c),
    }
}

#[derive(Clone, Copy)]
struct Product<'a> {
    depth: usize,
    cols: usize,
    a: Strided<'a>,
    b: &'a [f32],
    init: Option<&'a [f32]>,
}

/// The tile loops, compiled once per instruction set (`$attr`). Each tile shape is its own
/// function: inlined together into one, LLVM left the accumulators in memory.
macro_rules! tile_loops {
    ($(#[$attr:meta])*) => {
        use super::Product;

        /// Tiles of `R` rows x `W` columns, then narrower column tiles (W/2, ..., 1) and
        /// fewer rows at the edges.
        $(#[$attr])*
        pub(super) fn run<const R: usize, const W: usize>(p: &Product, rows: usize, c: &mut [f32]) {
            let mut c0 = columns::<R, W>(p, rows, 0, c);
            if W >= 32 {
                c0 = columns::<R, 16>(p, rows, c0, c);
            }
            if W >= 16 {
                c0 = columns::<R, 8>(p, rows, c0, c);
            }
            if W >= 8 {
                c0 = columns::<R, 4>(p, rows, c0, c);
            }
            columns::<R, 1>(p, rows, c0, c);
        }

        /// Every full `W`-wide column tile from `c0`; returns where they stop.
        $(#[$attr])*
        #[inline(never)]
        fn columns<const R: usize, const W: usize>(
            p: &Product,
            rows: usize,
            mut c0: usize,
            c: &mut [f32],
        ) -> usize {
            while c0 + W <= p.cols {
                let mut r0 = 0;
                while r0 + R <= rows {
                    tile::<R, W>(p, r0, c0, c);
                    r0 += R;
                }
                // Edge rows, one tile with a row count known at compile time.
                match rows - r0 {
                    0 => {}
                    1 => tile::<1, W>(p, r0, c0, c),
                    2 => tile::<2, W>(p, r0, c0, c),
                    3 => tile::<3, W>(p, r0, c0, c),
                    4 => tile::<4, W>(p, r0, c0, c),
                    5 => tile::<5, W>(p, r0, c0, c),
                    6 => tile::<6, W>(p, r0, c0, c),
                    7 => tile::<7, W>(p, r0, c0, c),
                    _ => unreachable!("tiles have at most 8 rows"),
                }
                c0 += W;
            }
            c0
        }

        $(#[$attr])*
        #[inline(never)]
        fn tile<const R: usize, const W: usize>(p: &Product, r0: usize, c0: usize, c: &mut [f32]) {
            if !wide_tile::<R, W>(p, r0, c0, c) {
                let Product { depth, cols, a, b, init } = *p;
                super::tile_body::<R, W>(depth, cols, a.data, a.row, a.depth, b, init, r0, c0, c)
            }
        }
    };
}

/// A tile whose width is a whole number of vectors, written with the instruction set's
/// vectors: `R x V` accumulators, each term one fused multiply-add in increasing `t` as
/// [`tile_body`]. The autovectorised [`tile_body`] alone ran at full speed or at 1/30 of it
/// depending on the crate it was compiled in (LLVM sometimes left the accumulators in memory).
#[cfg(target_arch = "x86_64")]
macro_rules! vector_tile {
    ($feature:literal, $vec:ty, $lanes:literal, $zero:ident, $load:ident, $splat:ident, $fma:ident, $store:ident, $($w:literal => $v:literal),+) => {
        /// Tiles whose width is listed, in vectors; false for the narrower edges.
        #[target_feature(enable = $feature)]
        #[inline]
        fn wide_tile<const R: usize, const W: usize>(
            p: &Product,
            r0: usize,
            c0: usize,
            c: &mut [f32],
        ) -> bool {
            match W {
                $($w => vectors::<R, $v>(p, r0, c0, c),)+
                _ => return false,
            }
            true
        }

        #[target_feature(enable = $feature)]
        #[inline]
        #[allow(unsafe_code)]
        fn vectors<const R: usize, const V: usize>(
            p: &Product,
            r0: usize,
            c0: usize,
            c: &mut [f32],
        ) {
            use std::arch::x86_64::*;
            let Product {
                depth,
                cols,
                a,
                b,
                init,
            } = *p;
            let mut acc: [[$vec; V]; R] = [[$zero(); V]; R];
            if let Some(init) = init {
                for v in 0..V {
                    // SAFETY: c0 + V * lanes <= cols <= init.len(), asserted in `gemm`.
                    let x = unsafe { $load(init.as_ptr().add(c0 + $lanes * v)) };
                    for row in acc.iter_mut() {
                        row[v] = x;
                    }
                }
            }
            let (ap, bp) = (a.data.as_ptr(), b.as_ptr());
            for t in 0..depth {
                let mut bv: [$vec; V] = [$zero(); V];
                for (v, x) in bv.iter_mut().enumerate() {
                    // SAFETY: t < depth and c0 + V * lanes <= cols: inside `b` (asserted).
                    *x = unsafe { $load(bp.add(t * cols + c0 + $lanes * v)) };
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    // SAFETY: r0 + r < rows and t < depth: inside `a` (asserted in `gemm`).
                    let x = $splat(unsafe { *ap.add((r0 + r) * a.row + t * a.depth) });
                    for v in 0..V {
                        row[v] = $fma(x, bv[v], row[v]);
                    }
                }
            }
            let cp = c.as_mut_ptr();
            for (r, row) in acc.iter().enumerate() {
                for (v, x) in row.iter().enumerate() {
                    // SAFETY: row r0 + r < rows, columns below cols: inside `c` (asserted).
                    unsafe { $store(cp.add((r0 + r) * cols + c0 + $lanes * v), *x) };
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    tile_loops!(#[target_feature(enable = "avx512f,fma")]);
    vector_tile!(
        "avx512f,fma",
        __m512,
        16,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_storeu_ps,
        16 => 1,
        32 => 2,
        128 => 8
    );
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    tile_loops!(#[target_feature(enable = "avx2,fma")]);
    vector_tile!(
        "avx2,fma",
        __m256,
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        _mm256_storeu_ps,
        8 => 1,
        16 => 2,
        48 => 6
    );
}

mod generic {
    tile_loops!();

    /// Every tile through [`super::tile_body`].
    #[inline(always)]
    fn wide_tile<const R: usize, const W: usize>(
        _: &Product,
        _: usize,
        _: usize,
        _: &mut [f32],
    ) -> bool {
        false
    }
}

/// One tile: `R x W` accumulators, one chain each over `t`. Inlined into each instruction
/// set's `tile`. (Written as a free function of plain arguments: as a method reading the
/// fields of `Product`, LLVM kept the accumulators in memory, at 1/30 of the speed.)
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile_body<const R: usize, const W: usize>(
    depth: usize,
    cols: usize,
    a: &[f32],
    a_row: usize,
    a_depth: usize,
    b: &[f32],
    init: Option<&[f32]>,
    r0: usize,
    c0: usize,
    c: &mut [f32],
) {
    let mut acc = [[0f32; W]; R];
    if let Some(init) = init {
        let i: &[f32; W] = init[c0..c0 + W].try_into().expect("W columns");
        for row in acc.iter_mut() {
            *row = *i;
        }
    }
    // Raw pointers, no bounds checks in the loop: `gemm` asserted that row r0 + R - 1 at
    // depth `depth - 1` lies inside `a`, and that `b` holds `depth` rows of `cols`.
    // SAFETY (both): offsets up to those asserted bounds.
    #[allow(unsafe_code)]
    let mut a_rows: [*const f32; R] =
        std::array::from_fn(|r| unsafe { a.as_ptr().add((r0 + r) * a_row) });
    #[allow(unsafe_code)]
    let mut b_row = unsafe { b.as_ptr().add(c0) };
    for _ in 0..depth {
        // SAFETY: this row is < depth and c0 + W <= cols, so it is in bounds.
        #[allow(unsafe_code)]
        let bw: &[f32; W] = unsafe { &*(b_row as *const [f32; W]) };
        for r in 0..R {
            // SAFETY: at most the bound asserted in `gemm`; `a_rows[r]` advances below.
            #[allow(unsafe_code)]
            let av = unsafe { *a_rows[r] };
            for l in 0..W {
                acc[r][l] = av.mul_add(bw[l], acc[r][l]);
            }
        }
        for p in a_rows.iter_mut() {
            *p = p.wrapping_add(a_depth);
        }
        b_row = b_row.wrapping_add(cols);
    }
    for (r, row) in acc.iter().enumerate() {
        let at = (r0 + r) * cols + c0;
        c[at..at + W].copy_from_slice(row);
    }
}

/// `dst[j * rows + i] = src[i * cols + j]`: a `rows x cols` matrix transposed. Data movement
/// only, so every level gives the same result. With AVX-512 and both sides multiples of 16
/// (the backward pass's `[batch, width]` blocks), 16 x 16 blocks go through registers: the
/// 8 x 8 blocks LLVM made of the portable loop took 2.3% of a DDQN run.
pub fn transpose(level: Level, src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    assert!(src.len() >= rows * cols && dst.len() >= rows * cols);
    #[cfg(target_arch = "x86_64")]
    if level.here() == Level::Avx512 && rows.is_multiple_of(16) && cols.is_multiple_of(16) {
        // SAFETY: `here` says the CPU has AVX-512F; sides and lengths checked above.
        #[allow(unsafe_code)]
        unsafe {
            transpose16::run(src, rows, cols, dst)
        };
        return;
    }
    transpose8(level, src, rows, cols, dst)
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
pub mod transpose16 {
    use std::arch::x86_64::*;

    /// `rows x cols` in 16 x 16 blocks through [`registers`].
    ///
    /// # Safety
    /// The CPU has AVX-512F; `rows` and `cols` are multiples of 16 and both slices hold at
    /// least `rows * cols` values.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn run(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        for i0 in (0..rows).step_by(16) {
            for j0 in (0..cols).step_by(16) {
                let mut r = [_mm512_setzero_ps(); 16];
                for (i, reg) in r.iter_mut().enumerate() {
                    // SAFETY: row i0 + i < rows, columns j0..j0 + 16 <= cols.
                    *reg = unsafe { _mm512_loadu_ps(s.add((i0 + i) * cols + j0)) };
                }
                registers(&mut r);
                for (k, reg) in r.iter().enumerate() {
                    // SAFETY: column j0 + k < cols is row j0 + k of `dst`, rows i0..i0 + 16.
                    unsafe { _mm512_storeu_ps(d.add((j0 + k) * rows + i0), *reg) };
                }
            }
        }
    }

    /// Sixteen registers (rows of a 16 x 16 block) become its columns: rows interleaved in
    /// pairs (32-bit), then in fours (64-bit), then 128-bit lanes gathered twice. Moves bits
    /// only (also used for u32 words).
    ///
    /// # Safety
    /// The CPU has AVX-512F (a caller compiled for it may call this without `unsafe`).
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub fn registers(r: &mut [__m512; 16]) {
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        for i in 0..4 {
            let [a, b, c, e] =
                [t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]].map(|x| _mm512_castps_pd(x));
            r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
            r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
            r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, e));
            r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, e));
        }
        for g in 0..2 {
            for j in 0..4 {
                let (a, b) = (r[8 * g + j], r[8 * g + j + 4]);
                t[8 * g + j] = _mm512_shuffle_f32x4::<0x88>(a, b);
                t[8 * g + j + 4] = _mm512_shuffle_f32x4::<0xdd>(a, b);
            }
        }
        for j in 0..8 {
            r[j] = _mm512_shuffle_f32x4::<0x88>(t[j], t[j + 8]);
            r[j + 8] = _mm512_shuffle_f32x4::<0xdd>(t[j], t[j + 8]);
        }
    }
}

crate::multiversion! {
    /// [`transpose`] in 8 x 8 blocks (the edges element by element), compiled per level so
    /// that the blocks become vector shuffles.
    fn transpose8(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
        const B: usize = 8;
        assert!(src.len() >= rows * cols && dst.len() >= rows * cols);
        let (full_r, full_c) = (rows / B * B, cols / B * B);
        for i0 in (0..full_r).step_by(B) {
            for j0 in (0..full_c).step_by(B) {
                let mut block = [[0f32; B]; B];
                for (i, row) in block.iter_mut().enumerate() {
                    let at = (i0 + i) * cols + j0;
                    row.copy_from_slice(&src[at..at + B]);
                }
                for j in 0..B {
                    let at = (j0 + j) * rows + i0;
                    let out: &mut [f32; B] = (&mut dst[at..at + B]).try_into().expect("B values");
                    for (o, row) in out.iter_mut().zip(&block) {
                        *o = row[j];
                    }
                }
            }
        }
        for i in 0..rows {
            let from = if i < full_r { full_c } else { 0 };
            for j in from..cols {
                dst[j * rows + i] = src[i * cols + j];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        // Small integers scaled by powers of two would make every sum exact and hide order
        // changes; these are full-precision values of mixed sign.
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0
            })
            .collect()
    }

    /// The definition, one chain per output, in plain scalar code.
    fn reference(
        rows: usize,
        depth: usize,
        cols: usize,
        a: Strided,
        b: &[f32],
        init: Option<&[f32]>,
    ) -> Vec<f32> {
        let mut c = vec![0f32; rows * cols];
        for r in 0..rows {
            for col in 0..cols {
                let mut acc = init.map_or(0.0, |i| i[col]);
                for t in 0..depth {
                    acc = a.data[r * a.row + t * a.depth].mul_add(b[t * cols + col], acc);
                }
                c[r * cols + col] = acc;
            }
        }
        c
    }

    #[test]
    fn every_level_equals_the_scalar_definition_bit_for_bit() {
        // Row and column counts around every tile edge (8/6/4/2 rows; 128/48/32/16/8/4/1
        // columns),
        // plain and transposed left operands, with and without init.
        let shapes = [
            (1, 117, 512),
            (2, 40, 300),
            (3, 9, 130),
            (64, 117, 512),
            (13, 29, 61),
            (7, 512, 2),
            (32, 5, 37),
            (9, 1, 33),
            (17, 64, 32),
        ];
        for (rows, depth, cols) in shapes {
            for transposed in [false, true] {
                let a_data = values(rows * depth, 1);
                let a = if transposed {
                    Strided {
                        data: &a_data,
                        row: 1,
                        depth: rows,
                    }
                } else {
                    Strided {
                        data: &a_data,
                        row: depth,
                        depth: 1,
                    }
                };
                let b = values(depth * cols, 2);
                let init = values(cols, 3);
                for with_init in [false, true] {
                    let i = with_init.then_some(&init[..]);
                    let want = reference(rows, depth, cols, a, &b, i);
                    for level in Level::all_here() {
                        let mut c = vec![f32::NAN; rows * cols];
                        gemm(level, rows, depth, cols, a, &b, i, &mut c);
                        let same = c.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits());
                        assert!(
                            same,
                            "{} differs at {rows}x{depth}x{cols} (transposed {transposed}, init \
                             {with_init})",
                            level.name()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_order_of_the_sum_is_visible_to_the_check() {
        // The equality above means something only if another order gives other bits here.
        let (depth, cols) = (117, 4);
        let a_data = values(depth, 5);
        let b = values(depth * cols, 6);
        let a = Strided {
            data: &a_data,
            row: depth,
            depth: 1,
        };
        let want = reference(1, depth, cols, a, &b, None);
        let backwards: Vec<f32> = (0..cols)
            .map(|col| {
                (0..depth)
                    .rev()
                    .fold(0f32, |acc, t| a_data[t].mul_add(b[t * cols + col], acc))
            })
            .collect();
        assert_ne!(want, backwards);
    }

    #[test]
    fn transpose_swaps_rows_and_columns() {
        for (rows, cols) in [
            (6, 35),
            (32, 512),
            (512, 32),
            (16, 48),
            (17, 9),
            (8, 8),
            (1, 3),
        ] {
            let src: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
            let mut dst = vec![-1f32; src.len()];
            for level in Level::all_here() {
                transpose(level, &src, rows, cols, &mut dst);
                for i in 0..rows {
                    for j in 0..cols {
                        assert_eq!(dst[j * rows + i], src[i * cols + j], "{rows}x{cols}");
                    }
                }
            }
        }
    }
}
