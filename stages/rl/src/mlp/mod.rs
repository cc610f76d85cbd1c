//! The TDQN Q-network on the CPU in plain Rust: the same network, training step and optimiser
//! as [`crate::net::QNet`] with libtorch's Adam, with every sum in an order fixed by this
//! source, so a run gives the same bytes on every machine (see [`kernels`]).
//!
//! Layers as `TDQN.py`: `hidden_layers` x (Linear, BatchNorm1d, LeakyReLU, Dropout), then a
//! linear output. Weights are stored transposed (`[inputs, outputs]`), so that the forward
//! pass, the weight gradients and the input gradients are all the one product of
//! [`kernels::gemm`] with rows read contiguously.
//!
//! Per-element definitions (all f32, one rounding per operation unless a fused multiply-add is
//! named): batch mean and biased variance summed over rows in order; `xhat = (z - mean) *
//! invstd`; `y = fma(xhat, gamma, beta)`; running statistics `(1 - m) * r + m * s` with the
//! unbiased variance; evaluation `y = fma(z, scale, shift)` with `scale = gamma / sqrt(var +
//! eps)`, `shift = beta - mean * scale`; gradients as ATen's formulas; the clipping norm summed
//! in f32 over 64 interleaved lanes, a layer at a time, the layers' sums in f64.

mod keystream;
mod step;

pub use flag_kernels as kernels;

pub use step::{Adam, Workspace};

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::config::DdqnConfig;
use kernels::{Level, Strided, gemm};

/// Number of actions: 0 = SHORT, 1 = LONG.
pub const ACTIONS: usize = 2;
/// Rows per block of an evaluation pass: two activation buffers of this many rows stay in L2.
const EVAL_BLOCK: usize = 128;

/// Where one tensor lives in the flat parameter vector.
#[derive(Debug, Clone, Copy)]
struct Span {
    at: usize,
    len: usize,
}

impl Span {
    fn of<'a>(&self, v: &'a [f32]) -> &'a [f32] {
        &v[self.at..self.at + self.len]
    }
}

/// One hidden layer's parameters (spans into [`Mlp::params`]).
#[derive(Debug, Clone, Copy)]
struct HiddenSpans {
    /// `[fan_in, width]`.
    wt: Span,
    bias: Span,
    gamma: Span,
    beta: Span,
    fan_in: usize,
}

/// The network and its running statistics. Trainable parameters are one flat vector (the
/// optimiser and the clipping norm are passes over it).
#[derive(Clone)]
pub struct Mlp {
    pub level: Level,
    inputs: usize,
    width: usize,
    hidden: Vec<HiddenSpans>,
    /// `[width, ACTIONS]`.
    out_wt: Span,
    out_bias: Span,
    params: Vec<f32>,
    /// Running mean and variance of each BatchNorm, `[layer][width]`.
    running_mean: Vec<Vec<f32>>,
    running_var: Vec<Vec<f32>>,
    eps: f32,
    momentum: f32,
    slope: f32,
    dropout: f64,
}

/// A unit is dropped when its 16-bit draw is below `floor(p * 2^16)`: for p = 0.2 that is
/// 13107, so units drop with probability 0.19999695 (32-bit draws gave 0.2 within 1e-10, at
/// twice the random-number time: 7% of a gradient step).
pub fn dropout_threshold(p: f64) -> u16 {
    (p * 65_536.0).min(65_535.0) as u16
}

/// `rows x cols` values uniform in `[-bound, bound)`, drawn row by row (as [`crate::net`]).
fn uniform(rng: &mut ChaCha8Rng, rows: usize, cols: usize, bound: f64) -> Vec<f32> {
    (0..rows * cols)
        .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
        .collect()
}

impl Mlp {
    /// A network for `inputs` inputs, initialised as [`crate::net::QNet::new`] with the same
    /// random draws: Xavier-uniform weights and `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` biases
    /// (PyTorch's defaults), BatchNorm at weight 1, bias 0.
    pub fn new(cfg: &DdqnConfig, inputs: usize, level: Level, rng: &mut ChaCha8Rng) -> Mlp {
        let width = cfg.hidden;
        let mut params = Vec::new();
        let mut push = |values: &[f32]| {
            let span = Span {
                at: params.len(),
                len: values.len(),
            };
            params.extend_from_slice(values);
            span
        };
        let transposed = |w: Vec<f32>, rows: usize, cols: usize| {
            let mut t = vec![0f32; w.len()];
            kernels::transpose(level, &w, rows, cols, &mut t);
            t
        };
        let mut hidden = Vec::with_capacity(cfg.hidden_layers);
        let mut fan_in = inputs;
        for _ in 0..cfg.hidden_layers {
            let xavier = (6.0 / (fan_in + width) as f64).sqrt();
            let w = uniform(rng, width, fan_in, xavier);
            let b = uniform(rng, width, 1, 1.0 / (fan_in as f64).sqrt());
            let wt = push(&transposed(w, width, fan_in));
            let bias = push(&b);
            let gamma = push(&vec![1.0; width]);
            let beta = push(&vec![0.0; width]);
            hidden.push(HiddenSpans {
                wt,
                bias,
                gamma,
                beta,
                fan_in,
            });
            fan_in = width;
        }
        let xavier = (6.0 / (fan_in + ACTIONS) as f64).sqrt();
        let w = uniform(rng, ACTIONS, fan_in, xavier);
        let b = uniform(rng, ACTIONS, 1, 1.0 / (fan_in as f64).sqrt());
        let out_wt = push(&transposed(w, ACTIONS, fan_in));
        let out_bias = push(&b);
        let layers = cfg.hidden_layers;
        Mlp {
            level,
            inputs,
            width,
            hidden,
            out_wt,
            out_bias,
            params,
            running_mean: vec![vec![0.0; width]; layers],
            running_var: vec![vec![1.0; width]; layers],
            eps: cfg.batch_norm_eps as f32,
            momentum: cfg.batch_norm_momentum as f32,
            slope: cfg.leaky_slope as f32,
            dropout: cfg.dropout,
        }
    }

    /// Copies every parameter and running statistic of `other` (the target-network update).
    pub fn copy_from(&mut self, other: &Mlp) {
        self.params.copy_from_slice(&other.params);
        self.running_mean.clone_from(&other.running_mean);
        self.running_var.clone_from(&other.running_var);
    }

    /// Q-values in evaluation mode (running statistics, no dropout) of `rows` observations
    /// `x` (`[rows, inputs]`), as `[rows * ACTIONS]`. Rows are independent.
    pub fn q_values(&self, x: &[f32], rows: usize) -> Vec<f32> {
        assert_eq!(
            x.len(),
            rows * self.inputs,
            "observations of the wrong width"
        );
        let mut q = vec![0f32; rows * ACTIONS];
        let (scale, shift) = self.eval_affine();
        // The greedy action of every step is one row: no 128-row buffers for it.
        let block_rows = rows.min(EVAL_BLOCK);
        let mut bufs = [
            vec![0f32; block_rows * self.width],
            vec![0f32; block_rows * self.width],
        ];
        for (block, q_block) in x
            .chunks(EVAL_BLOCK * self.inputs)
            .zip(q.chunks_mut(EVAL_BLOCK * ACTIONS))
        {
            let n = block.len() / self.inputs;
            self.eval_block(block, n, &scale, &shift, &mut bufs, q_block);
        }
        q
    }

    /// Per layer, BatchNorm in evaluation mode as one multiply-add per value.
    fn eval_affine(&self) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        self.hidden
            .iter()
            .enumerate()
            .map(|(l, h)| {
                let (g, b) = (h.gamma.of(&self.params), h.beta.of(&self.params));
                let scale: Vec<f32> = g
                    .iter()
                    .zip(&self.running_var[l])
                    .map(|(g, v)| g / (v + self.eps).sqrt())
                    .collect();
                let shift = b
                    .iter()
                    .zip(&self.running_mean[l])
                    .zip(&scale)
                    .map(|((b, m), s)| b - m * s)
                    .collect();
                (scale, shift)
            })
            .unzip()
    }

    fn eval_block(
        &self,
        x: &[f32],
        n: usize,
        scale: &[Vec<f32>],
        shift: &[Vec<f32>],
        bufs: &mut [Vec<f32>; 2],
        q: &mut [f32],
    ) {
        let w = self.width;
        let [cur, next] = bufs;
        let mut input: &[f32] = x;
        for (l, h) in self.hidden.iter().enumerate() {
            let a = Strided {
                data: input,
                row: h.fan_in,
                depth: 1,
            };
            let out = &mut next[..n * w];
            let p = &self.params;
            gemm(
                self.level,
                n,
                h.fan_in,
                w,
                a,
                h.wt.of(p),
                Some(h.bias.of(p)),
                out,
            );
            step::affine_leaky(self.level, out, w, &scale[l], &shift[l], self.slope);
            std::mem::swap(cur, next);
            input = &cur[..n * w];
        }
        let a = Strided {
            data: input,
            row: w,
            depth: 1,
        };
        let p = &self.params;
        gemm(
            self.level,
            n,
            w,
            ACTIONS,
            a,
            self.out_wt.of(p),
            Some(self.out_bias.of(p)),
            &mut q[..n * ACTIONS],
        );
    }

    /// Every variable by the names [`crate::net::QNet::snapshot`] uses, weights as
    /// `[outputs, inputs]` (PyTorch's layout), sorted by name.
    pub fn snapshot(&self) -> Vec<(String, Vec<f32>)> {
        let mut vars = self.named(&self.params);
        for i in 0..self.hidden.len() {
            vars.push((format!("bn{i}.running_mean"), self.running_mean[i].clone()));
            vars.push((format!("bn{i}.running_var"), self.running_var[i].clone()));
        }
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// The trainable tensors of `p` (the parameters, or a gradient of them) by name, in
    /// PyTorch's layouts.
    fn named(&self, p: &[f32]) -> Vec<(String, Vec<f32>)> {
        let untransposed = |s: Span, fan_in: usize| {
            let outs = s.len / fan_in;
            let mut w = vec![0f32; s.len];
            kernels::transpose(self.level, s.of(p), fan_in, outs, &mut w);
            w
        };
        let mut vars = Vec::new();
        for (i, h) in self.hidden.iter().enumerate() {
            vars.push((format!("fc{i}_weight"), untransposed(h.wt, h.fan_in)));
            vars.push((format!("fc{i}_bias"), h.bias.of(p).to_vec()));
            vars.push((format!("bn{i}.weight"), h.gamma.of(p).to_vec()));
            vars.push((format!("bn{i}.bias"), h.beta.of(p).to_vec()));
        }
        vars.push(("out_weight".into(), untransposed(self.out_wt, self.width)));
        vars.push(("out_bias".into(), self.out_bias.of(p).to_vec()));
        vars
    }

    /// [`Mlp::fill_dropout_masks`] into new masks, `[layer][batch * width]`; empty when
    /// dropout is off (the tests' one-off passes).
    #[cfg(test)]
    pub fn dropout_masks(&self, rng: &mut ChaCha8Rng, batch: usize) -> Vec<Vec<f32>> {
        if self.dropout <= 0.0 {
            return Vec::new();
        }
        let mut masks = vec![vec![0f32; batch * self.width]; self.hidden.len()];
        let mut draws = Vec::new();
        self.fill_dropout_masks(rng, &mut draws, &mut masks);
        masks
    }

    /// Dropout masks for one training forward pass into `masks` (one per layer, each
    /// `batch * width` long), kept units scaled by `1 / (1 - p)`, drawn as
    /// [`crate::net::QNet`] draws them (one `fill` of u16s per layer, see
    /// [`dropout_threshold`]), with `draws` as scratch: a gradient step allocates nothing.
    pub fn fill_dropout_masks(
        &self,
        rng: &mut ChaCha8Rng,
        draws: &mut Vec<u16>,
        masks: &mut [Vec<f32>],
    ) {
        let keep = 1.0 / (1.0 - self.dropout) as f32;
        let threshold = dropout_threshold(self.dropout);
        for mask in masks.iter_mut() {
            draws.resize(mask.len(), 0);
            keystream::fill_u16(self.level, rng, draws);
            step::mask_from_draws(self.level, draws, threshold, keep, mask);
        }
    }
}

#[cfg(test)]
mod tests;
