//! Large products of block weights (a prompt's prefill): the matrix is expanded one slab of
//! weight rows at a time, exactly as the loader expands it, and multiplied with
//! `flag-kernels`' matrix product (the slab transposed, or the activations and the result),
//! the output rows split across the team. That product
//! sums each output in one fixed order (a fused multiply-add per term), so the prefill's
//! products give the same bits at every instruction-set level and thread count; and on the
//! 2-core AMD EPYC this runs on it made 243-269 GFLOP/s a thread on the prefill's shapes where
//! libtorch's GEMM (MKL's Zen kernel) made 104-115.
use flag_kernels::{Level, Strided, gemm, transpose};
use tch::{Kind, Tensor};

use super::{QMatrix, Team, split_rows};

/// Weight rows expanded at once: bounds the two transient f32 slabs (at most 8,192 x 1,536 x
/// 4 bytes = 48 MiB each; the tied 49,152-row output matrix goes in six slabs).
const SLAB_ROWS: usize = 8192;

/// Output rows per task: a multiple of the product's 8-row tile.
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
    // The product wants its right side row-major by output column: either each weight slab
    // is transposed (n x k values a call), or the activations and the result are (m x (k + n)),
    // whichever moves less. The sums are the same either way: each output is one chain over
    // k in order, and a fused multiply-add does not care which factor comes first.
    let turn_weights = m * (k + n) >= n * k;
    let x_t = if turn_weights {
        Vec::new()
    } else {
        let mut t = vec![0f32; k * m];
        transpose(level, x, m, k, &mut t);
        t
    };
    let mut turned = vec![0f32; slab_rows * if turn_weights { k } else { m }];
    // One slab's columns of the output, when the matrix takes more than one slab.
    let mut part = if slab_rows < n {
        vec![0f32; m * slab_rows]
    } else {
        Vec::new()
    };
    for r0 in (0..n).step_by(SLAB_ROWS) {
        let rows = (r0 + SLAB_ROWS).min(n) - r0;
        let slab = &mut slab[..rows * k];
        w.dequantize_rows(r0, r0 + rows, slab);
        let target: &mut [f32] = if rows == n {
            &mut *out_s
        } else {
            &mut part[..m * rows]
        };
        if turn_weights {
            let b = &mut turned[..rows * k];
            transpose(level, slab, rows, k, b);
            let b = &*b;
            split_rows(rows, ROWS_PER_TASK, target, pool, &|i0, i1, c| {
                let a = Strided {
                    data: &x[i0 * k..i1 * k],
                    row: k,
                    depth: 1,
                };
                gemm(level, i1 - i0, k, rows, a, b, None, c);
            });
        } else {
            // [rows, m] = slab . x^T, then turned into the [m, rows] result.
            let slab = &*slab;
            let ct = &mut turned[..rows * m];
            split_rows(m, ROWS_PER_TASK, ct, pool, &|j0, j1, c| {
                let a = Strided {
                    data: &slab[j0 * k..j1 * k],
                    row: k,
                    depth: 1,
                };
                gemm(level, j1 - j0, k, m, a, &x_t, None, c);
            });
            transpose(level, ct, rows, m, target);
        }
        if rows != n {
            for (i, src) in part[..m * rows].chunks_exact(rows).enumerate() {
                out_s[i * n + r0..i * n + r0 + rows].copy_from_slice(src);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::tests::matrix;
    use super::*;
    use crate::gguf::{GGML_Q4_1, GGML_Q8_0};

    /// Both orientations (the weight slab turned, or the activations and the result), one
    /// slab or several, alone or on a team: every output is the expanded weights' fused
    /// multiply-add chain over the columns in order from +0.0, bit for bit.
    #[test]
    fn every_output_is_the_one_fixed_chain() {
        let team = Team::new(2).unwrap();
        for (ty, rows, cols, m) in [
            (GGML_Q4_1, 96, 64, 200),           // m (k + n) >= n k: the slab is turned
            (GGML_Q8_0, 160, 96, 50),           // the activations and the result are turned
            (GGML_Q4_1, 72, 32, 130),           // rows and columns off the 16 x 16 blocks
            (GGML_Q4_1, SLAB_ROWS + 8, 32, 60), // two slabs, the slab turned
            (GGML_Q8_0, SLAB_ROWS + 8, 32, 20), // two slabs, the activations turned
        ] {
            let w = matrix(ty, rows, cols, 5);
            let x: Vec<f32> = (0..m * cols)
                .map(|i| (((i * 37) % 101) as f32 - 50.0) / 13.0)
                .collect();
            let mut dense = vec![0f32; rows * cols];
            w.dequantize_rows(0, rows, &mut dense);
            for pool in [None, Some(&team)] {
                let got = Vec::<f32>::try_from(&product(&w, &x, m, pool).view([-1])).unwrap();
                for i in 0..m {
                    for j in 0..rows {
                        let want = (0..cols).fold(0f32, |acc, t| {
                            x[i * cols + t].mul_add(dense[j * cols + t], acc)
                        });
                        assert_eq!(
                            got[i * rows + j].to_bits(),
                            want.to_bits(),
                            "{rows}x{cols}, m {m}, row {i}, column {j}"
                        );
                    }
                }
            }
        }
    }
}
