//! Weights kept in memory as the GGUF stores them (blocks of 32: Q4_0, Q4_1, Q8_0; the CPU
//! default) and multiplied without ever materialising the f32 matrix: a few weight rows at a
//! time are expanded into a small per-thread buffer with exactly the arithmetic of the f32
//! loader (`gguf::dequant_blocks`, or its AVX2 twin that gives the same bits), then dotted
//! with the activation rows in register tiles (4 weight rows x 1 activation, or 1 x 4). The
//! weights the model computes with are therefore the dense path's weights bit for bit; only
//! the order of the sums differs (at most 2.7e-5 relative in the logits, measured in
//! `tests/quant_weights.rs`). Activations stay f32: unlike llama.cpp, nothing is rounded to 8
//! bits on the way in.
//!
//! Large products (many activation rows: a prompt's prefill) expand the matrix one slab of
//! rows at a time and multiply it with a register-tiled GEMM, which reuses each weight far
//! better than a dot per row can (`quant/slab_gemm.rs`); the slab is freed straight after.

use std::sync::Arc;

use tch::{Kind, Tensor};

use crate::error::{LlmError, Result};
use crate::gguf::{self, GGML_Q4_0, GGML_Q4_1, GGML_Q8_0, GgufFile};

#[cfg(target_arch = "x86_64")]
mod fused;
mod int8;
mod slab_gemm;
mod team;

pub use team::Team;

/// How a block matrix meets its activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activations {
    /// f32, as they are (the format `gguf`).
    F32,
    /// Rounded to 8 bits per block of 32 (the format `gguf-int8`): dotted as integers in
    /// small products, and handed rounded to the f32 GEMM in large ones (prefill), so a row's
    /// result does not depend on how many rows share its product beyond summation order.
    Int8,
}

/// Elements per block in every supported format.
const BLOCK: usize = 32;

/// Activation rows at or above which a product goes through a dequantised slab and a GEMM
/// instead of the row kernel (batched decode stays below it, a prompt's prefill above).
pub const GEMM_MIN_ROWS: usize = 48;

/// A [rows, cols] weight matrix stored as GGML blocks, row-major (each row is cols/32 blocks).
pub struct QMatrix {
    rows: usize,
    cols: usize,
    ggml_type: u32,
    block_bytes: usize,
    data: Vec<u8>,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QMatrix({}x{} {})",
            self.rows,
            self.cols,
            gguf::ggml_type_name(self.ggml_type)
        )
    }
}

/// Bytes of one block of 32 in the formats the row kernel reads; None for any other type.
pub fn block_bytes(ggml_type: u32) -> Option<usize> {
    match ggml_type {
        GGML_Q4_0 => Some(18),
        GGML_Q4_1 => Some(20),
        GGML_Q8_0 => Some(34),
        _ => None,
    }
}

impl QMatrix {
    /// The tensor `name` as stored, if its type is a supported block format and its shape is
    /// [rows, cols] (row-major); `Ok(None)` for other types (the caller keeps those dense).
    pub fn from_gguf(g: &GgufFile, name: &str, rows: usize, cols: usize) -> Result<Option<Self>> {
        let info = g
            .tensor_info(name)
            .ok_or_else(|| LlmError::MissingTensor(name.into()))?;
        let Some(bb) = block_bytes(info.ggml_type) else {
            return Ok(None);
        };
        if info.shape() != [rows, cols] || !cols.is_multiple_of(BLOCK) {
            return Err(LlmError::Shape {
                tensor: name.into(),
                expected: vec![rows, cols],
                found: info.shape(),
            });
        }
        let bytes = g.tensor_bytes(name)?;
        if bytes.len() != rows * cols / BLOCK * bb {
            return Err(LlmError::Invalid(format!(
                "tensor '{name}' holds {} bytes, {rows}x{cols} {} needs {}",
                bytes.len(),
                info.type_name(),
                rows * cols / BLOCK * bb
            )));
        }
        let data = bytes.to_vec();
        g.release(name);
        Ok(Some(QMatrix {
            rows,
            cols,
            ggml_type: info.ggml_type,
            block_bytes: bb,
            data,
        }))
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn ggml_type(&self) -> u32 {
        self.ggml_type
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    fn row_bytes(&self) -> usize {
        self.cols / BLOCK * self.block_bytes
    }

    fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// The matrix whose row i is row `order[i]` of this one (every row exactly once).
    pub fn permute_rows(&self, order: &[usize]) -> Self {
        debug_assert_eq!(order.len(), self.rows);
        let mut data = Vec::with_capacity(self.data.len());
        for &r in order {
            data.extend_from_slice(self.row(r));
        }
        QMatrix { data, ..*self }
    }

    /// Row-wise concatenation (one fused projection from several): same type and width.
    pub fn stack(parts: Vec<QMatrix>) -> Result<Self> {
        let first = parts
            .first()
            .ok_or_else(|| LlmError::Invalid("nothing to stack".into()))?;
        let (cols, ty, bb) = (first.cols, first.ggml_type, first.block_bytes);
        if parts.iter().any(|p| p.cols != cols || p.ggml_type != ty) {
            return Err(LlmError::Invalid(format!(
                "cannot stack {parts:?}: widths or block types differ"
            )));
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
        for p in parts {
            data.extend_from_slice(&p.data);
        }
        Ok(QMatrix {
            rows,
            cols,
            ggml_type: ty,
            block_bytes: bb,
            data,
        })
    }

    /// Rows `r0..r1` as f32, exactly as the dense loader computes them.
    pub fn dequantize_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        dequant_fast(self.ggml_type, &self.data[r0 * rb..r1 * rb], out);
    }

    /// The whole matrix as an f32 tensor [rows, cols] (for code that needs dense weights).
    pub fn to_dense(&self) -> Tensor {
        let mut buf = vec![0f32; self.rows * self.cols];
        self.dequantize_rows(0, self.rows, &mut buf);
        Tensor::from_slice(&buf).view([self.rows as i64, self.cols as i64])
    }

    /// Rows `ids` (e.g. token embeddings) as an f32 tensor [ids.len(), cols].
    pub fn gather_rows(&self, ids: &[i64]) -> Result<Tensor> {
        let mut out = vec![0f32; ids.len() * self.cols];
        for (o, &id) in out.chunks_exact_mut(self.cols).zip(ids) {
            let r = usize::try_from(id)
                .ok()
                .filter(|&r| r < self.rows)
                .ok_or_else(|| {
                    LlmError::Invalid(format!("token id {id} outside 0..{}", self.rows))
                })?;
            self.dequantize_rows(r, r + 1, o);
        }
        Ok(Tensor::from_slice(&out).view([ids.len() as i64, self.cols as i64]))
    }
}

/// `x @ w.T` for f32 activations `x` [..., cols] on the CPU: [..., rows] f32.
pub fn linear(w: &QMatrix, x: &Tensor, acts: Activations, pool: Option<&Team>) -> Tensor {
    let mut lead = x.size();
    let k = lead.pop().expect("activations have a last dimension");
    debug_assert_eq!(k as usize, w.cols);
    let x2 = if x.kind() == Kind::Float && x.is_contiguous() {
        x.view([-1, k])
    } else {
        x.to_kind(Kind::Float).contiguous().view([-1, k])
    };
    let m = x2.size()[0] as usize;
    lead.push(w.rows as i64);
    assert_eq!(
        x2.device(),
        tch::Device::Cpu,
        "block weights multiply on the CPU"
    );
    if m == 0 {
        return Tensor::zeros(lead.as_slice(), (Kind::Float, tch::Device::Cpu));
    }
    #[allow(unsafe_code)]
    // SAFETY: x2 is a contiguous f32 CPU tensor (checked above) of m >= 1 rows of k elements,
    // alive and unchanged until this function returns.
    let xs: &[f32] =
        unsafe { std::slice::from_raw_parts(x2.data_ptr() as *const f32, m * k as usize) };
    if m >= GEMM_MIN_ROWS {
        if acts == Activations::Int8 {
            let rounded = int8::rounded_f32(xs, w.cols);
            return slab_gemm::product(w, &rounded, m, pool).view(lead.as_slice());
        }
        return slab_gemm::product(w, xs, m, pool).view(lead.as_slice());
    }
    // Computed weight-row-major ([rows, m]: each task owns a contiguous run), then transposed
    // (nothing to transpose for one activation row, the decode of one sequence).
    let out = Tensor::empty([w.rows as i64, m as i64], (Kind::Float, tch::Device::Cpu));
    #[allow(unsafe_code)]
    // SAFETY: `out` is a new contiguous f32 tensor of rows x m elements, written only here.
    let out_t: &mut [f32] =
        unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, w.rows * m) };
    match acts {
        Activations::F32 => row_kernel(w, m, out_t, pool, |r0, r1, o| {
            rows_into(w, xs, m, r0, r1, o)
        }),
        Activations::Int8 => {
            let q = int8::Q8Rows::quantize(xs, w.cols);
            row_kernel(w, m, out_t, pool, |r0, r1, o| {
                int8::rows_into(w, &q, r0, r1, o)
            })
        }
    }
    if m == 1 {
        return out.view(lead.as_slice());
    }
    out.transpose(0, 1).contiguous().view(lead.as_slice())
}

/// Weight rows per task: enough work to outweigh a task's hand-off, few enough to balance.
/// One activation row takes longer runs (measured on 2 cores: 128 rows gave single-stream
/// decode ~8% more than 64, 16 or 32 rows less); a batch already has m times the work a row.
fn rows_per_task(m: usize) -> usize {
    if m == 1 { 128 } else { 64 }
}

/// out_t [w.rows, m] = w . x.T for m activation rows: `rows(r0, r1, out)` fills the
/// [r1 - r0, m] part of rows r0..r1, in tasks of [`rows_per_task`] rows across the team.
fn row_kernel(
    w: &QMatrix,
    m: usize,
    out_t: &mut [f32],
    pool: Option<&Team>,
    rows: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    debug_assert_eq!(out_t.len(), w.rows * m);
    split_rows(m, rows_per_task(m), out_t, pool, &rows);
}

/// `f(r0, r1, part)` over runs of `per_task` rows of `out` (`[rows, cols]`), `part` rows
/// r0..r1, across the team when it has more than one thread.
fn split_rows(
    cols: usize,
    per_task: usize,
    out: &mut [f32],
    pool: Option<&Team>,
    f: &(dyn Fn(usize, usize, &mut [f32]) + Sync),
) {
    let task = |t: usize, part: &mut [f32]| {
        let r0 = t * per_task;
        f(r0, r0 + part.len() / cols, part);
    };
    match pool {
        Some(team) if team.threads() > 1 => {
            // Disjoint parts of the output, one per task (a lock each: never contended).
            let parts: Vec<std::sync::Mutex<&mut [f32]>> = out
                .chunks_mut(per_task * cols)
                .map(std::sync::Mutex::new)
                .collect();
            team.run(parts.len(), &|t| {
                task(t, &mut parts[t].lock().unwrap_or_else(|e| e.into_inner()))
            });
        }
        _ => {
            for (t, part) in out.chunks_mut(per_task * cols).enumerate() {
                task(t, part);
            }
        }
    }
}

/// out [r1 - r0, m]: rows r0..r1 of w dotted with each of the m rows of x, with AVX-512 or
/// AVX2 + FMA where the CPU has them (the expansion of the weights is exact either way; the
/// dot's rounding is not, but both SIMD paths give the same bits: see [`rows_into_with`]).
fn rows_into(w: &QMatrix, x: &[f32], m: usize, r0: usize, r1: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        // Up to a few activation rows, each block expanded in registers and dotted at once
        // (through the row buffer below, a store and a load a weight, the expansion had taken
        // five times the dot at one row); from `max_rows` on, the buffer's one expansion a
        // row wins (see `fused::Level::max_rows`).
        if let Some(level) = fused::level().filter(|l| m <= l.max_rows()) {
            #[allow(unsafe_code)]
            // SAFETY: `level` is what the CPU has, checked at run time.
            return unsafe { fused::rows(level, w, x, m, r0, r1, out) };
        }
        if m > 1 && avx512_available() {
            #[allow(unsafe_code)]
            // SAFETY: the CPU has AVX-512F, AVX2 and FMA, checked at run time.
            return unsafe { rows_into_avx512(w, x, m, r0, r1, out) };
        }
        if fma_available() {
            #[allow(unsafe_code)]
            // SAFETY: the CPU has AVX2 and FMA, checked at run time.
            return unsafe { rows_into_fma(w, x, m, r0, r1, out) };
        }
    }
    let ty = w.ggml_type;
    let dequant = |bytes: &[u8], row: &mut [f32]| gguf::dequant_blocks(ty, bytes, row);
    rows_into_with::<false>(w, x, m, r0..r1, out, dequant, |a, b, acc| a * b + acc)
}

/// The widest instructions these kernels may use, as libtorch's own: 0 plain, 1 AVX2, 2
/// AVX-512. `ATEN_CPU_CAPABILITY` caps it (`avx2`: no AVX-512; `default`: plain Rust), so a
/// machine can run, and be measured, as a narrower one; the CPU's features still decide what
/// it has. The capability is in every LLM stage's key already. The int8 paths give the same
/// bits at every level; the f32 path's plain level rounds its multiply-adds twice.
#[cfg(target_arch = "x86_64")]
pub(crate) fn simd_cap() -> u8 {
    use std::sync::OnceLock;
    static CAP: OnceLock<u8> = OnceLock::new();
    *CAP.get_or_init(|| match flag_core::numerics::cpu_capability().as_str() {
        "avx512" => 2,
        "avx2" => 1,
        _ => 0,
    })
}

#[cfg(target_arch = "x86_64")]
fn fma_available() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        simd_cap() >= 1 && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    })
}

#[cfg(target_arch = "x86_64")]
fn avx512_available() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| simd_cap() >= 2 && fma_available() && is_x86_feature_detected!("avx512f"))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn rows_into_fma(w: &QMatrix, x: &[f32], m: usize, r0: usize, r1: usize, out: &mut [f32]) {
    let ty = w.ggml_type;
    // A closure in a function with AVX2 enabled has it too: the call needs no unsafe.
    let dequant = |bytes: &[u8], row: &mut [f32]| dequant_avx2(ty, bytes, row);
    rows_into_with::<false>(w, x, m, r0..r1, out, dequant, f32::mul_add)
}

/// [`rows_into_fma`] with 512-bit registers for a batch: a dot's 16 lanes are one register
/// instead of two, and there are 32 of them, so a tile holds 4 weight rows x 4 activation
/// rows and each loaded vector feeds more multiply-adds. Same lanes, same order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn rows_into_avx512(w: &QMatrix, x: &[f32], m: usize, r0: usize, r1: usize, out: &mut [f32]) {
    let ty = w.ggml_type;
    let dequant = |bytes: &[u8], row: &mut [f32]| dequant_avx2(ty, bytes, row);
    rows_into_with::<true>(w, x, m, r0..r1, out, dequant, f32::mul_add)
}

/// [`gguf::dequant_blocks`], with AVX2 where the CPU has it (the same bits either way).
fn dequant_fast(ty: u32, bytes: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if fma_available() {
            #[allow(unsafe_code)]
            // SAFETY: the CPU has AVX2 and FMA, checked at run time.
            return unsafe { dequant_avx2(ty, bytes, out) };
        }
    }
    gguf::dequant_blocks(ty, bytes, out)
}

/// [`gguf::dequant_blocks`] for one row with AVX2, 8 elements an instruction: the same
/// integer-to-float conversions, multiplies and adds (no fused multiply-add), so the same
/// bits; the compiler left the scalar loops unvectorised (a byte and a convert at a time).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(unsafe_code)]
fn dequant_avx2(ty: u32, bytes: &[u8], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let scale =
        |b: &[u8], i: usize| half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32();
    match ty {
        GGML_Q4_0 | GGML_Q4_1 => {
            let (bb, at) = if ty == GGML_Q4_0 { (18, 2) } else { (20, 4) };
            assert!(out.len() / BLOCK <= bytes.len() / bb);
            for (o, b) in out.chunks_exact_mut(BLOCK).zip(bytes.chunks_exact(bb)) {
                let d = _mm256_set1_ps(scale(b, 0));
                let m = _mm256_set1_ps(if ty == GGML_Q4_1 { scale(b, 2) } else { 0.0 });
                // SAFETY: b has bb bytes, so the 16 at `at` are in it.
                let q = unsafe { _mm_loadu_si128(b.as_ptr().add(at) as *const __m128i) };
                let nib = _mm_set1_epi8(0x0f);
                let lo = _mm_and_si128(q, nib);
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), nib);
                for (first, v) in [(0, lo), (16, hi)] {
                    for (part, v8) in [(0, v), (8, _mm_srli_si128::<8>(v))] {
                        let n = _mm256_cvtepu8_epi32(v8);
                        let x = if ty == GGML_Q4_0 {
                            let f = _mm256_cvtepi32_ps(_mm256_sub_epi32(n, _mm256_set1_epi32(8)));
                            _mm256_mul_ps(f, d)
                        } else {
                            _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(n), d), m)
                        };
                        // SAFETY: o has 32 floats; first + part + 8 <= 32.
                        unsafe { _mm256_storeu_ps(o.as_mut_ptr().add(first + part), x) };
                    }
                }
            }
        }
        GGML_Q8_0 => {
            assert!(out.len() / BLOCK <= bytes.len() / 34);
            for (o, b) in out.chunks_exact_mut(BLOCK).zip(bytes.chunks_exact(34)) {
                let d = _mm256_set1_ps(scale(b, 0));
                for part in 0..4 {
                    // SAFETY: b has 34 bytes: 8 at 2 + 8 * part (<= 26) are in it; o has 32
                    // floats, 8 at 8 * part.
                    unsafe {
                        let q = _mm_loadl_epi64(b.as_ptr().add(2 + 8 * part) as *const __m128i);
                        let x = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
                        _mm256_storeu_ps(o.as_mut_ptr().add(8 * part), x);
                    }
                }
            }
        }
        _ => gguf::dequant_blocks(ty, bytes, out),
    }
}

#[inline(always)]
fn rows_into_with<const WIDE: bool>(
    w: &QMatrix,
    x: &[f32],
    m: usize,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
    dequant: impl Fn(&[u8], &mut [f32]),
    fmadd: impl Fn(f32, f32, f32) -> f32 + Copy,
) {
    let (k, r0, r1) = (w.cols, rows.start, rows.end);
    // Tiles of weight rows x activation rows, so that 8 accumulators are in flight: one dot
    // alone is 2 dependent FMA chains, a quarter of what the FMA units can take. Each dot in
    // a tile sums in exactly the order `dot_lanes` does, so the tiling changes no bit. With
    // 256-bit registers (16 of them) a dot's lanes take two, so tiles hold 8 dots; with
    // 512-bit ones (`WIDE`, 32 registers) a dot takes one and a 4 x 4 tile fits.
    let rows_per_tile = match (WIDE, m) {
        (false, 1) | (true, _) => 4,
        (false, _) => 1,
    };
    let mut wbuf = vec![0f32; rows_per_tile * k];
    let mut r = r0;
    while r < r1 {
        let rt = rows_per_tile.min(r1 - r);
        for (i, buf) in wbuf.chunks_exact_mut(k).take(rt).enumerate() {
            dequant(w.row(r + i), buf);
            // The same row of the next tile, asked for while this tile is dotted (as the
            // single-row kernels do; the hardware's prefetcher alone leaves them waiting).
            if r + i + rows_per_tile < w.rows {
                prefetch(w.row(r + i + rows_per_tile));
            }
        }
        let o = &mut out[(r - r0) * m..(r - r0 + rt) * m];
        let wr = |i: usize| &wbuf[i * k..(i + 1) * k];
        let xr = |a: usize| &x[a * k..(a + 1) * k];
        match (WIDE, rt) {
            (true, 4) => {
                wide_tile_rows([wr(0), wr(1), wr(2), wr(3)], xr, m, o, fmadd);
            }
            (true, _) => {
                for (i, oi) in o.chunks_exact_mut(m).enumerate() {
                    wide_tile_rows([wr(i)], xr, m, oi, fmadd);
                }
            }
            (false, 4) => {
                // m == 1: four weight rows against the one activation row.
                let t = dot_tile::<4, 1>([wr(0), wr(1), wr(2), wr(3)], [xr(0)], fmadd);
                for (oi, ti) in o.iter_mut().zip(t) {
                    *oi = ti[0];
                }
            }
            (false, 1) if m >= 4 => {
                let mut a = 0;
                while a + 4 <= m {
                    let t =
                        dot_tile::<1, 4>([wr(0)], [xr(a), xr(a + 1), xr(a + 2), xr(a + 3)], fmadd);
                    o[a..a + 4].copy_from_slice(&t[0]);
                    a += 4;
                }
                for (a, v) in o.iter_mut().enumerate().skip(a) {
                    *v = dot_tile::<1, 1>([wr(0)], [xr(a)], fmadd)[0][0];
                }
            }
            (false, _) => {
                for (i, oi) in o.chunks_exact_mut(m).enumerate() {
                    for (a, v) in oi.iter_mut().enumerate() {
                        *v = dot_tile::<1, 1>([wr(i)], [xr(a)], fmadd)[0][0];
                    }
                }
            }
        }
        r += rt;
    }
}

/// Asks for `bytes` to be brought into the cache, line by line.
#[inline(always)]
fn prefetch(bytes: &[u8]) {
    for line in bytes.chunks(64) {
        prefetch_at(line.as_ptr());
    }
}

/// Asks for the cache line holding `p` (a hint: any address, it never faults or reads).
#[inline(always)]
fn prefetch_at(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: a prefetch only hints (SSE: every x86-64 CPU has it).
        #[allow(unsafe_code)]
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// o [R, m]: R weight rows against all m activation rows, 4, then 2, then 1 activation
/// rows a tile (the 512-bit path).
#[inline(always)]
fn wide_tile_rows<'x, const R: usize>(
    w: [&[f32]; R],
    xr: impl Fn(usize) -> &'x [f32],
    m: usize,
    o: &mut [f32],
    fmadd: impl Fn(f32, f32, f32) -> f32 + Copy,
) {
    fn store<const R: usize, const A: usize>(o: &mut [f32], m: usize, a: usize, t: [[f32; A]; R]) {
        for (i, ti) in t.iter().enumerate() {
            o[i * m + a..i * m + a + A].copy_from_slice(ti);
        }
    }
    let mut a = 0;
    while a + 4 <= m {
        let t = dot_tile::<R, 4>(w, [xr(a), xr(a + 1), xr(a + 2), xr(a + 3)], fmadd);
        store(o, m, a, t);
        a += 4;
    }
    if a + 2 <= m {
        store(o, m, a, dot_tile::<R, 2>(w, [xr(a), xr(a + 1)], fmadd));
        a += 2;
    }
    if a < m {
        store(o, m, a, dot_tile::<R, 1>(w, [xr(a)], fmadd));
    }
}

/// The R x A dots of R weight rows with A activation rows (equal lengths, a multiple of 16),
/// each in 16 lanes summed in a fixed order ([`dot_lanes`]'s), all R x A at once.
#[inline(always)]
fn dot_tile<const R: usize, const A: usize>(
    w: [&[f32]; R],
    x: [&[f32]; A],
    fmadd: impl Fn(f32, f32, f32) -> f32 + Copy,
) -> [[f32; A]; R] {
    let mut acc = [[[0f32; 16]; A]; R];
    let wc: [&[[f32; 16]]; R] = w.map(|v| v.as_chunks::<16>().0);
    let xc: [&[[f32; 16]]; A] = x.map(|v| v.as_chunks::<16>().0);
    let n = wc[0].len();
    // Equal lengths up front: the loop below then runs without bounds checks.
    assert!(wc.iter().all(|v| v.len() == n) && xc.iter().all(|v| v.len() == n));
    for c in 0..n {
        for r in 0..R {
            let wv = &wc[r][c];
            for a in 0..A {
                let xv = &xc[a][c];
                for i in 0..16 {
                    acc[r][a][i] = fmadd(wv[i], xv[i], acc[r][a][i]);
                }
            }
        }
    }
    acc.map(|row| row.map(|lanes| reduce_lanes(&lanes)))
}

/// The fixed-order sum of 16 lanes: halves, then quarters, then pairs.
#[inline(always)]
fn reduce_lanes(acc: &[f32; 16]) -> f32 {
    let mut s8 = [0f32; 8];
    for i in 0..8 {
        s8[i] = acc[i] + acc[i + 8];
    }
    let s4 = [s8[0] + s8[4], s8[1] + s8[5], s8[2] + s8[6], s8[3] + s8[7]];
    (s4[0] + s4[2]) + (s4[1] + s4[3])
}

/// Dot product of two equal-length slices whose length is a multiple of 16, in 16 lanes
/// summed in a fixed order (the compiler vectorises the lanes).
#[cfg(test)]
fn dot_lanes(a: &[f32], b: &[f32], fmadd: impl Fn(f32, f32, f32) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    for (ac, bc) in a.chunks_exact(16).zip(b.chunks_exact(16)) {
        for i in 0..16 {
            acc[i] = fmadd(ac[i], bc[i], acc[i]);
        }
    }
    reduce_lanes(&acc)
}

/// The team for the row kernel: `threads` threads, the caller included (None for one thread:
/// run inline).
pub fn kernel_pool(threads: usize) -> Result<Option<Arc<Team>>> {
    if threads <= 1 {
        return Ok(None);
    }
    Team::new(threads).map(|t| Some(Arc::new(t)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    /// A Q8_0, Q4_0 or Q4_1 matrix of seeded pseudo-random blocks (finite scales).
    pub(super) fn matrix(ggml_type: u32, rows: usize, cols: usize, seed: u64) -> QMatrix {
        let bb = block_bytes(ggml_type).unwrap();
        let mut state = seed;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        let mut data = Vec::with_capacity(rows * cols / BLOCK * bb);
        for _ in 0..rows * cols / BLOCK {
            let d = f16::from_f32(0.001 + (next() % 1000) as f32 * 1e-5).to_bits();
            data.extend_from_slice(&d.to_le_bytes());
            let mut head = 2;
            if ggml_type == GGML_Q4_1 {
                let min = f16::from_f32((next() % 2000) as f32 * -1e-4).to_bits();
                data.extend_from_slice(&min.to_le_bytes());
                head = 4;
            }
            data.extend((head..bb).map(|_| next() as u8));
        }
        QMatrix {
            rows,
            cols,
            ggml_type,
            block_bytes: bb,
            data,
        }
    }

    /// The AVX2 expansion gives the scalar loader's bits, for every block type.
    #[test]
    fn fast_dequant_equals_the_loader_bit_for_bit() {
        for ty in [GGML_Q8_0, GGML_Q4_0, GGML_Q4_1] {
            let w = matrix(ty, 9, 128, 11);
            let (mut fast, mut slow) = (vec![0f32; 9 * 128], vec![0f32; 9 * 128]);
            w.dequantize_rows(0, 9, &mut fast);
            gguf::dequant_blocks(ty, &w.data, &mut slow);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&slow), "type {ty}");
        }
    }

    /// The tiled kernel computes each dot exactly as one dot alone would (same lanes, same
    /// reduction), on every SIMD path this CPU has (so AVX-512 and AVX2 give the same bits),
    /// for every batch size and row count that exercises a tile edge.
    #[test]
    fn tiled_kernel_equals_single_dots_bit_for_bit() {
        type Path = fn(&QMatrix, &[f32], usize, usize, usize, &mut [f32]);
        let mut paths: Vec<(&str, Path)> = vec![("dispatched", rows_into)];
        #[cfg(target_arch = "x86_64")]
        {
            #[allow(unsafe_code)]
            fn fma(w: &QMatrix, x: &[f32], m: usize, r0: usize, r1: usize, o: &mut [f32]) {
                // SAFETY: only listed when the CPU has AVX2 and FMA.
                unsafe { rows_into_fma(w, x, m, r0, r1, o) }
            }
            #[allow(unsafe_code)]
            fn wide(w: &QMatrix, x: &[f32], m: usize, r0: usize, r1: usize, o: &mut [f32]) {
                // SAFETY: only listed when the CPU has AVX-512F, AVX2 and FMA.
                unsafe { rows_into_avx512(w, x, m, r0, r1, o) }
            }
            if fma_available() {
                paths.push(("avx2", fma));
            }
            if avx512_available() {
                paths.push(("avx512", wide));
            }
            #[allow(unsafe_code)]
            fn fused512(w: &QMatrix, x: &[f32], m: usize, r0: usize, r1: usize, o: &mut [f32]) {
                // SAFETY: only listed when the CPU has AVX-512F, FMA and F16C.
                unsafe { fused::rows(fused::Level::Avx512, w, x, m, r0, r1, o) }
            }
            #[allow(unsafe_code)]
            fn fused2(w: &QMatrix, x: &[f32], m: usize, r0: usize, r1: usize, o: &mut [f32]) {
                // SAFETY: only listed when the CPU has AVX2, FMA and F16C.
                unsafe { fused::rows(fused::Level::Avx2, w, x, m, r0, r1, o) }
            }
            match fused::level() {
                Some(fused::Level::Avx512) => {
                    paths.push(("avx512 in registers", fused512));
                    paths.push(("avx2 in registers", fused2));
                }
                Some(fused::Level::Avx2) => paths.push(("avx2 in registers", fused2)),
                None => {}
            }
        }
        for ty in [GGML_Q8_0, GGML_Q4_0, GGML_Q4_1] {
            let (rows, cols) = (67, 96);
            let w = matrix(ty, rows, cols, 7);
            for m in (1..=9).chain([16, 17]) {
                let x: Vec<f32> = (0..m * cols)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 13.0)
                    .collect();
                let mut want = vec![0f32; rows * m];
                let mut wrow = vec![0f32; cols];
                for r in 0..rows {
                    gguf::dequant_blocks(ty, w.row(r), &mut wrow);
                    for a in 0..m {
                        want[r * m + a] =
                            dot_lanes(&wrow, &x[a * cols..(a + 1) * cols], |p, q, acc| {
                                if fma_or_not() {
                                    p.mul_add(q, acc)
                                } else {
                                    p * q + acc
                                }
                            });
                    }
                }
                for (name, path) in &paths {
                    // A row range that starts inside a tile, as a team task may not.
                    for r0 in [0, 3] {
                        let mut got = vec![f32::NAN; (rows - r0) * m];
                        path(&w, &x, m, r0, rows, &mut got);
                        for (i, (g, e)) in got.iter().zip(&want[r0 * m..]).enumerate() {
                            assert_eq!(
                                g.to_bits(),
                                e.to_bits(),
                                "{name}: type {ty}, m {m}, row {}, activation {}",
                                r0 + i / m,
                                i % m
                            );
                        }
                    }
                }
            }
        }
    }

    fn acts_tensor(m: usize, cols: usize, seed: usize) -> Tensor {
        let v: Vec<f32> = (0..m * cols)
            .map(|i| (((i * 31 + seed * 7) % 97) as f32 - 48.0) / 17.0)
            .collect();
        Tensor::from_slice(&v).view([m as i64, cols as i64])
    }

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(&t.contiguous().view([-1])).unwrap()
    }

    /// A product's bits do not depend on the team: tasks own disjoint rows, m = 1 is written
    /// in place, m > 1 transposed; the same for both activation formats.
    #[test]
    fn products_on_a_team_equal_those_on_one_thread_bit_for_bit() {
        let w = matrix(GGML_Q4_1, 300, 128, 9);
        let team = Team::new(2).unwrap();
        for acts in [Activations::F32, Activations::Int8] {
            for m in [1, 5] {
                let x = acts_tensor(m, 128, m);
                let one = values(&linear(&w, &x, acts, None));
                let two = values(&linear(&w, &x, acts, Some(&team)));
                assert_eq!(one.len(), 300 * m);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&one), bits(&two), "{acts:?}, m {m}");
            }
        }
    }

    /// Regression: with int8 activations a row's products must not depend on whether its
    /// product is large (the GEMM path, prefill or a big batch) or small (the integer path).
    /// The GEMM path used the unrounded f32 activations, so a row batched with 49 others
    /// moved by the whole rounding (~4e-3 of sum |w x| here); now only summation order
    /// differs.
    #[test]
    fn int8_rows_give_the_same_products_alone_and_in_a_large_batch() {
        let (rows, cols, m) = (40, 256, GEMM_MIN_ROWS + 2);
        let w = matrix(GGML_Q4_1, rows, cols, 4);
        let x = acts_tensor(m, cols, 3);
        let batched = values(&linear(&w, &x, Activations::Int8, None));
        let xs = values(&x);
        let mut wrow = vec![0f32; cols];
        let mut worst = 0f64;
        for a in 0..m {
            let alone = values(&linear(
                &w,
                &x.narrow(0, a as i64, 1),
                Activations::Int8,
                None,
            ));
            for r in 0..rows {
                gguf::dequant_blocks(GGML_Q4_1, w.row(r), &mut wrow);
                let scale: f64 = wrow
                    .iter()
                    .zip(&xs[a * cols..(a + 1) * cols])
                    .map(|(p, q)| f64::from((p * q).abs()))
                    .sum();
                let diff = f64::from((alone[r] - batched[a * rows + r]).abs());
                worst = worst.max(diff / scale);
            }
        }
        assert!(
            worst < 1e-4,
            "alone vs batched differ by {worst:.2e} of sum |w x|"
        );
    }

    /// Whether `rows_into` takes the FMA path on this CPU (its dots round once per step).
    fn fma_or_not() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            fma_available()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }
}
