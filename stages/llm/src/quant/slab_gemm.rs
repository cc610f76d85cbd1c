//! Large products of block weights (a prompt's prefill): the matrix is expanded one slab of
//! weight rows at a time, exactly as the loader expands it, transposed, and multiplied with
//! `flag-kernels`' matrix product, the activation rows split across the team. That product
//! sums each output in one fixed order (a fused multiply-add per term), so the prefill's
//! products give the same bits at every instruction-set level and thread count; and on the
//! 2-core AMD EPYC this runs on it made 243-269 GFLOP/s a thread on the prefill's shapes where
//! libtorch's GEMM (MKL's Zen kernel) made 104-115.
use flag_kernels::{Level, Strided, gemm, transpose};
use tch::{Kind, Tensor};

use super::{QMatrix, Team};

/// Weight rows expanded at once: bounds the two transient f32 slabs (at most 8,192 x 1,536 x
/// 4 bytes = 48 MiB each; the tied 49,152-row output matrix goes in six slabs).
const SLAB_ROWS: usize = 8192;

/// Activation rows per task: a multiple of the product's 8-row tile.
const ROWS_PER_TASK: usize = 64;

/// `x @ w.T` for `m` activation rows `x` ([m, w.cols] f32): [m, w.rows] f32.
pub(super) fn product(w: &QMatrix, x: &[f32], m: usize, pool: Option<&Team>) -> Tensor {
    let (k, n) = (w.cols, w.rows);
    debug_assert_eq!(x.len(), m * k);
    let level = Level::detect();
    let out = Tensor::empty([m as i64, n as i64], (Kind::Float, tch::Device::Cpu));
    #[allow(unsafe_code)]
    // SAFETY: `out` is a new contiguous f32 tensor of m x n elements, written only here.
    let out_s: &mut [f32] =
        unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, m * n) };
    let slab_rows = SLAB_ROWS.min(n);
    let mut slab = vec![0f32; slab_rows * k];
    let mut slab_t = vec![0f32; slab_rows * k];
    // One slab's columns of the output, when the matrix takes more than one slab.
    let mut part = if slab_rows < n {
        vec![0f32; m * slab_rows]
    } else {
        Vec::new()
    };
    for r0 in (0..n).step_by(SLAB_ROWS) {
        let rows = (r0 + SLAB_ROWS).min(n) - r0;
        w.dequantize_rows(r0, r0 + rows, &mut slab[..rows * k]);
        transpose(level, &slab[..rows * k], rows, k, &mut slab_t[..rows * k]);
        let b = &slab_t[..rows * k];
        let target: &mut [f32] = if rows == n {
            &mut *out_s
        } else {
            &mut part[..m * rows]
        };
        split_rows(m, rows, target, pool, &|i0, i1, c| {
            let a = Strided {
                data: &x[i0 * k..i1 * k],
                row: k,
                depth: 1,
            };
            gemm(level, i1 - i0, k, rows, a, b, None, c);
        });
        if rows != n {
            for (i, src) in part[..m * rows].chunks_exact(rows).enumerate() {
                out_s[i * n + r0..i * n + r0 + rows].copy_from_slice(src);
            }
        }
    }
    out
}

/// `f(i0, i1, c)` for runs of activation rows, `c` the [i1 - i0, cols] rows of `out`, across
/// the team.
fn split_rows(
    m: usize,
    cols: usize,
    out: &mut [f32],
    pool: Option<&Team>,
    f: &(dyn Fn(usize, usize, &mut [f32]) + Sync),
) {
    let chunk = ROWS_PER_TASK * cols;
    match pool {
        Some(team) if team.threads() > 1 && m > ROWS_PER_TASK => {
            // Disjoint parts of the output, one per task (a lock each: never contended).
            let parts: Vec<std::sync::Mutex<&mut [f32]>> =
                out.chunks_mut(chunk).map(std::sync::Mutex::new).collect();
            team.run(parts.len(), &|t| {
                let mut c = parts[t].lock().unwrap_or_else(|e| e.into_inner());
                let i0 = t * ROWS_PER_TASK;
                f(i0, i0 + c.len() / cols, &mut c)
            });
        }
        _ => {
            for (t, c) in out.chunks_mut(chunk).enumerate() {
                let i0 = t * ROWS_PER_TASK;
                f(i0, i0 + c.len() / cols, c);
            }
        }
    }
}
