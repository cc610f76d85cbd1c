//! One gradient step of [`Mlp`]: the training-mode forward pass of two batches at once (the
//! states, with everything the backward pass needs kept, and the next states), the backward
//! pass of the first, the clipping norm and Adam. Element-wise passes are compiled per
//! instruction set with [`multiversion!`]; their arithmetic is plain f32 (or named fused
//! multiply-adds), so the level changes speed only.
use flag_kernels::multiversion;

use super::kernels::{Strided, gemm, transpose};
use super::{ACTIONS, Mlp};

/// Adam's first- and second-moment decay and epsilon (PyTorch's defaults).
const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const ADAM_EPS: f32 = 1e-8;
/// Added to the clipping norm before dividing, as `clip_grad_norm_`.
const CLIP_EPS: f64 = 1e-6;

/// Adam with L2 weight decay added to the gradient (`torch.optim.Adam(weight_decay=...)`),
/// over [`Mlp`]'s flat parameter vector.
#[derive(Clone)]
pub struct Adam {
    lr: f64,
    weight_decay: f32,
    step: i32,
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
}

impl Adam {
    pub fn new(net: &Mlp, lr: f64, weight_decay: f64) -> Adam {
        Adam {
            lr,
            weight_decay: weight_decay as f32,
            step: 0,
            exp_avg: vec![0.0; net.params.len()],
            exp_avg_sq: vec![0.0; net.params.len()],
        }
    }
}

/// Buffers of one gradient step, kept between steps (a step allocates nothing).
pub struct Workspace {
    batch: usize,
    /// Layer 0's input, `[2 batch, inputs]`.
    x: Vec<f32>,
    /// Per layer: the normalised pre-activation, `[2 batch, width]`.
    xhat: Vec<Vec<f32>>,
    /// Per layer: the output after LeakyReLU and dropout, `[2 batch, width]`.
    h: Vec<Vec<f32>>,
    /// Per layer: `1 / sqrt(var + eps)` of the first batch.
    invstd: Vec<Vec<f32>>,
    /// Q-values of both batches, `[2 batch, ACTIONS]`.
    q: Vec<f32>,
    pub(super) grad: Vec<f32>,
    dq: Vec<f32>,
    dq_t: Vec<f32>,
    dh: Vec<f32>,
    dz: Vec<f32>,
    dz_t: Vec<f32>,
    dx_t: Vec<f32>,
    column: [Vec<f32>; 3],
    /// Squared L2 norm of `grad`, summed by [`Mlp::backward`] (out layer, then the hidden
    /// layers from the top).
    pub(super) squared_norm: f64,
}

impl Workspace {
    pub fn new(net: &Mlp, batch: usize) -> Workspace {
        let (w, layers) = (net.width, net.hidden.len());
        let big = 2 * batch * w;
        let wide = batch * w.max(net.inputs);
        Workspace {
            batch,
            x: vec![0.0; 2 * batch * net.inputs],
            xhat: vec![vec![0.0; big]; layers],
            h: vec![vec![0.0; big]; layers],
            invstd: vec![vec![0.0; w]; layers],
            q: vec![0.0; 2 * batch * ACTIONS],
            grad: vec![0.0; net.params.len()],
            dq: vec![0.0; batch * ACTIONS],
            dq_t: vec![0.0; batch * ACTIONS],
            dh: vec![0.0; wide],
            dz: vec![0.0; batch * w],
            dz_t: vec![0.0; batch * w],
            dx_t: vec![0.0; wide],
            column: [vec![0.0; w], vec![0.0; w], vec![0.0; w]],
            squared_norm: 0.0,
        }
    }

    /// Layer 0's input: the first batch's observations, then the second's.
    pub fn inputs_mut(&mut self) -> &mut [f32] {
        &mut self.x
    }

    /// Q-values of the second batch after [`Mlp::forward_train`], `[batch, ACTIONS]`.
    pub fn second_q(&self) -> &[f32] {
        &self.q[self.batch * ACTIONS..]
    }

    /// Q-values of the first batch, `[batch, ACTIONS]`.
    pub fn first_q(&self) -> &[f32] {
        &self.q[..self.batch * ACTIONS]
    }

    /// `dL/dQ` of the first batch, `[batch, ACTIONS]`, for [`Mlp::backward`].
    pub fn dq_mut(&mut self) -> &mut [f32] {
        &mut self.dq
    }
}

impl Mlp {
    /// Training-mode forward pass of both batches in [`Workspace::inputs_mut`]: each batch
    /// normalised by its own statistics, the running statistics updated by the first batch
    /// and then by the second (the order of two separate passes), `masks[g * layers + l]`
    /// the dropout of batch `g` at layer `l` (none when empty).
    pub fn forward_train(&mut self, ws: &mut Workspace, masks: &[Vec<f32>]) {
        let layers = self.hidden.len();
        assert!(masks.is_empty() || masks.len() == 2 * layers);
        let (n, w) = (ws.batch, self.width);
        for l in 0..layers {
            let h = self.hidden[l];
            let (before, rest) = ws.h.split_at_mut(l);
            let input: &[f32] = if l == 0 { &ws.x } else { &before[l - 1] };
            let a = Strided {
                data: input,
                row: h.fan_in,
                depth: 1,
            };
            let z = &mut ws.xhat[l];
            gemm(
                self.level,
                2 * n,
                h.fan_in,
                w,
                a,
                h.wt.of(&self.params),
                Some(h.bias.of(&self.params)),
                z,
            );
            for g in 0..2 {
                let rows = g * n * w..(g + 1) * n * w;
                let mask = masks.get(g * layers + l).map(|m| &m[..]);
                normalise(
                    self.level,
                    &mut z[rows.clone()],
                    &mut rest[0][rows],
                    h.gamma.of(&self.params),
                    h.beta.of(&self.params),
                    mask,
                    self.eps,
                    self.slope,
                    &mut ws.column,
                );
                let [mean, var, invstd] = &ws.column;
                if g == 0 {
                    ws.invstd[l].copy_from_slice(invstd);
                }
                update_running(
                    &mut self.running_mean[l],
                    &mut self.running_var[l],
                    mean,
                    var,
                    n,
                    self.momentum,
                );
            }
        }
        let a = Strided {
            data: &ws.h[layers - 1],
            row: w,
            depth: 1,
        };
        gemm(
            self.level,
            2 * n,
            w,
            ACTIONS,
            a,
            self.out_wt.of(&self.params),
            Some(self.out_bias.of(&self.params)),
            &mut ws.q,
        );
    }

    /// Backward pass of the first batch from `dq` (`dL/dQ`, `[batch, ACTIONS]`, put in
    /// `ws` by the caller through [`Workspace::dq_mut`]), into the workspace's gradient.
    pub fn backward(&self, ws: &mut Workspace, masks: &[Vec<f32>]) {
        let layers = self.hidden.len();
        let (n, w) = (ws.batch, self.width);
        let p = &self.params;
        let grad = &mut ws.grad;
        // Output layer.
        let last = &ws.h[layers - 1][..n * w];
        gemm(
            self.level,
            w,
            n,
            ACTIONS,
            Strided {
                data: last,
                row: 1,
                depth: w,
            },
            &ws.dq,
            None,
            &mut grad[self.out_wt.at..self.out_wt.at + self.out_wt.len],
        );
        for a in 0..ACTIONS {
            grad[self.out_bias.at + a] = (0..n).fold(0.0, |s, i| s + ws.dq[i * ACTIONS + a]);
        }
        // The clipping norm, a layer at a time while its gradient is still in cache.
        let out_span = self.out_wt.at..self.out_bias.at + self.out_bias.len;
        let mut sq = f64::from(squared_norm(self.level, &grad[out_span]));
        transpose(self.level, &ws.dq, n, ACTIONS, &mut ws.dq_t);
        gemm(
            self.level,
            w,
            ACTIONS,
            n,
            Strided {
                data: self.out_wt.of(p),
                row: ACTIONS,
                depth: 1,
            },
            &ws.dq_t,
            None,
            &mut ws.dx_t,
        );
        transpose(self.level, &ws.dx_t, w, n, &mut ws.dh);
        for l in (0..layers).rev() {
            let h = self.hidden[l];
            let mask = masks.get(l).map(|m| &m[..n * w]);
            let [dgamma, dbeta, _] = &mut ws.column;
            normalise_backward(
                self.level,
                &ws.dh[..n * w],
                &ws.h[l][..n * w],
                &ws.xhat[l][..n * w],
                mask,
                &ws.invstd[l],
                h.gamma.of(p),
                self.slope,
                &mut ws.dz,
                dgamma,
                dbeta,
            );
            grad[h.gamma.at..h.gamma.at + w].copy_from_slice(dgamma);
            grad[h.beta.at..h.beta.at + w].copy_from_slice(dbeta);
            column_sums(self.level, &ws.dz, n, &mut grad[h.bias.at..h.bias.at + w]);
            let input: &[f32] = if l == 0 {
                &ws.x[..n * h.fan_in]
            } else {
                &ws.h[l - 1][..n * w]
            };
            gemm(
                self.level,
                h.fan_in,
                n,
                w,
                Strided {
                    data: input,
                    row: 1,
                    depth: h.fan_in,
                },
                &ws.dz,
                None,
                &mut grad[h.wt.at..h.wt.at + h.wt.len],
            );
            // wt, bias, gamma and beta lie in that order, one range.
            sq += f64::from(squared_norm(
                self.level,
                &grad[h.wt.at..h.beta.at + h.beta.len],
            ));
            if l > 0 {
                transpose(self.level, &ws.dz, n, w, &mut ws.dz_t);
                gemm(
                    self.level,
                    h.fan_in,
                    w,
                    n,
                    Strided {
                        data: h.wt.of(p),
                        row: w,
                        depth: 1,
                    },
                    &ws.dz_t,
                    None,
                    &mut ws.dx_t,
                );
                transpose(self.level, &ws.dx_t, h.fan_in, n, &mut ws.dh);
            }
        }
        ws.squared_norm = sq;
    }

    /// Clips the workspace's gradient to joint L2 norm `max_norm` (`clip_grad_norm_`) and
    /// takes one Adam step. Returns the norm before clipping.
    pub fn clip_and_step(&mut self, ws: &Workspace, adam: &mut Adam, max_norm: f64) -> f64 {
        let norm = ws.squared_norm.sqrt();
        let coef = max_norm / (norm + CLIP_EPS);
        let scale = if coef < 1.0 { coef as f32 } else { 1.0 };
        adam.step += 1;
        let bias_correction1 = 1.0 - BETA1.powi(adam.step);
        let bias_correction2 = 1.0 - BETA2.powi(adam.step);
        let k = AdamConsts {
            scale,
            weight_decay: adam.weight_decay,
            beta1: BETA1 as f32,
            one_minus_beta1: (1.0 - BETA1) as f32,
            beta2: BETA2 as f32,
            one_minus_beta2: (1.0 - BETA2) as f32,
            inv_bias_correction2_sqrt: (1.0 / bias_correction2.sqrt()) as f32,
            step_size: (adam.lr / bias_correction1) as f32,
        };
        adam_pass(
            self.level,
            &k,
            &mut self.params,
            &ws.grad,
            &mut adam.exp_avg,
            &mut adam.exp_avg_sq,
        );
        norm
    }
}

/// Running statistics updated by one batch's mean and biased variance (PyTorch keeps the
/// unbiased variance).
fn update_running(
    rmean: &mut [f32],
    rvar: &mut [f32],
    mean: &[f32],
    var: &[f32],
    n: usize,
    m: f32,
) {
    let unbias = n as f32 / (n as f32 - 1.0).max(1.0);
    for j in 0..rmean.len() {
        rmean[j] = (1.0 - m) * rmean[j] + m * mean[j];
        rvar[j] = (1.0 - m) * rvar[j] + m * (var[j] * unbias);
    }
}

multiversion! {
    /// BatchNorm with the batch's statistics, LeakyReLU and dropout of one batch `z`
    /// (`[rows, width]`): `z` becomes `xhat`, `out` the layer's output, and `column` holds the
    /// batch's `[mean, biased variance, invstd]`.
    fn normalise(
        z: &mut [f32],
        out: &mut [f32],
        gamma: &[f32],
        beta: &[f32],
        mask: Option<&[f32]>,
        eps: f32,
        slope: f32,
        column: &mut [Vec<f32>; 3],
    ) {
        let w = gamma.len();
        let rows = (z.len() / w) as f32;
        let [mean, var, invstd] = column;
        mean.fill(0.0);
        for row in z.chunks_exact(w) {
            for (m, x) in mean.iter_mut().zip(row) {
                *m += x;
            }
        }
        mean.iter_mut().for_each(|m| *m /= rows);
        var.fill(0.0);
        for row in z.chunks_exact(w) {
            for ((v, x), m) in var.iter_mut().zip(row).zip(mean.iter()) {
                let d = x - m;
                *v = d.mul_add(d, *v);
            }
        }
        var.iter_mut().for_each(|v| *v /= rows);
        for (s, v) in invstd.iter_mut().zip(var.iter()) {
            *s = 1.0 / (v + eps).sqrt();
        }
        for (r, (zr, or)) in z
            .chunks_exact_mut(w)
            .zip(out.chunks_exact_mut(w))
            .enumerate()
        {
            let mr = mask.map(|m| &m[r * w..(r + 1) * w]);
            for j in 0..w {
                let xhat = (zr[j] - mean[j]) * invstd[j];
                zr[j] = xhat;
                let y = xhat.mul_add(gamma[j], beta[j]);
                let a = if y > 0.0 { y } else { y * slope };
                or[j] = match mr {
                    Some(m) => a * m[j],
                    None => a,
                };
            }
        }
    }
}

multiversion! {
    /// Through dropout, LeakyReLU (slope where the output is not positive: the input was not
    /// positive, or the unit was dropped and its gradient is zero anyway) and BatchNorm:
    /// `dz = (dy - sum(dy) / n - xhat * sum(dy * xhat) / n) * invstd * gamma`.
    fn normalise_backward(
        dh: &[f32],
        h: &[f32],
        xhat: &[f32],
        mask: Option<&[f32]>,
        invstd: &[f32],
        gamma: &[f32],
        slope: f32,
        dz: &mut [f32],
        dgamma: &mut [f32],
        dbeta: &mut [f32],
    ) {
        let w = gamma.len();
        let rows = dh.len() / w;
        // dy into dz first.
        for i in 0..rows {
            let at = i * w;
            for j in 0..w {
                let mut g = dh[at + j];
                if let Some(m) = mask {
                    g *= m[at + j];
                }
                dz[at + j] = if h[at + j] > 0.0 { g } else { g * slope };
            }
        }
        dgamma.fill(0.0);
        dbeta.fill(0.0);
        for i in 0..rows {
            let at = i * w;
            for j in 0..w {
                dgamma[j] = dz[at + j].mul_add(xhat[at + j], dgamma[j]);
                dbeta[j] += dz[at + j];
            }
        }
        let nf = rows as f32;
        for i in 0..rows {
            let at = i * w;
            for j in 0..w {
                let centred = dz[at + j] - dbeta[j] / nf - xhat[at + j] * (dgamma[j] / nf);
                dz[at + j] = centred * (invstd[j] * gamma[j]);
            }
        }
    }
}

multiversion! {
    /// `out[j] = sum_i m[i, j]`, rows in order.
    fn column_sums(m: &[f32], rows: usize, out: &mut [f32]) {
        let w = out.len();
        out.fill(0.0);
        for row in m[..rows * w].chunks_exact(w) {
            for (o, x) in out.iter_mut().zip(row) {
                *o += x;
            }
        }
    }
}

multiversion! {
    /// Sum of squares: element `i` into lane `i % 64` (four independent vector chains), the lanes
    /// then halved pairwise (`l + 32`, `l + 16`, ...). f32 is ample for a clipping threshold.
    fn squared_norm(g: &[f32]) -> f32 {
        const LANES: usize = 64;
        let mut lanes = [0f32; LANES];
        let mut chunks = g.chunks_exact(LANES);
        for c in &mut chunks {
            for l in 0..LANES {
                lanes[l] = c[l].mul_add(c[l], lanes[l]);
            }
        }
        for (l, x) in chunks.remainder().iter().enumerate() {
            lanes[l] = x.mul_add(*x, lanes[l]);
        }
        let mut half = LANES / 2;
        while half > 0 {
            for l in 0..half {
                lanes[l] += lanes[l + half];
            }
            half /= 2;
        }
        lanes[0]
    }
}

struct AdamConsts {
    /// The clipping factor (1 when the norm is within bounds).
    scale: f32,
    weight_decay: f32,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    /// `1 / sqrt(bias_correction2)`: PyTorch divides by the square root; one division per
    /// value (of two) was a tenth of the step here.
    inv_bias_correction2_sqrt: f32,
    step_size: f32,
}

multiversion! {
    /// One pass of Adam over every parameter: `g = clip * g + wd * p`, then PyTorch's update
    /// `p -= step_size * m / (sqrt(v) / sqrt(bias_correction2) + eps)` (the inner division as a
    /// multiplication by the reciprocal).
    fn adam_pass(k: &AdamConsts, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        for i in 0..p.len() {
            let gi = g[i] * k.scale + k.weight_decay * p[i];
            let mi = k.beta1 * m[i] + k.one_minus_beta1 * gi;
            let vi = k.beta2 * v[i] + k.one_minus_beta2 * (gi * gi);
            m[i] = mi;
            v[i] = vi;
            let denom = vi.sqrt() * k.inv_bias_correction2_sqrt + ADAM_EPS;
            p[i] -= k.step_size * (mi / denom);
        }
    }
}

multiversion! {
    /// Evaluation-mode BatchNorm and LeakyReLU in place: `fma(z, scale, shift)`.
    pub(super) fn affine_leaky(z: &mut [f32], width: usize, scale: &[f32], shift: &[f32], slope: f32) {
        for row in z.chunks_exact_mut(width) {
            for j in 0..width {
                let y = row[j].mul_add(scale[j], shift[j]);
                row[j] = if y > 0.0 { y } else { y * slope };
            }
        }
    }
}

multiversion! {
    /// A unit is kept (scaled by `keep`) when its draw is at least `threshold`.
    pub(super) fn mask_from_draws(draws: &[u16], threshold: u16, keep: f32, mask: &mut [f32]) {
        for (m, d) in mask.iter_mut().zip(draws) {
            *m = if *d >= threshold { keep } else { 0.0 };
        }
    }
}
