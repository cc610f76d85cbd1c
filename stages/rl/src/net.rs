//! The TDQN Q-network: `hidden_layers` x (Linear, BatchNorm1d, LeakyReLU, Dropout), then a
//! linear output with one Q-value per action (`TDQN.py`, class `DQN`).
//!
//! Every random number (Xavier init, dropout masks) comes from the run's seeded ChaCha
//! generator, not from libtorch's global generator: runs on parallel threads then stay
//! bit-identical to a sequential run with the same seed.
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

use crate::config::DdqnConfig;

/// Number of actions: 0 = SHORT, 1 = LONG (the reference's encoding).
pub const ACTIONS: i64 = 2;

/// `negative_slope` of ATen's `leaky_relu`, the only slope tch's binding passes.
const ATEN_LEAKY_SLOPE: f64 = 0.01;

struct Hidden {
    w: Tensor,
    b: Tensor,
    bn: nn::BatchNorm,
}

pub struct QNet {
    pub vs: nn::VarStore,
    hidden: Vec<Hidden>,
    out_w: Tensor,
    out_b: Tensor,
    dropout: f64,
    slope: f64,
    width: i64,
}

/// `rows x cols` values uniform in `[-bound, bound)`, as a tensor on `device`.
fn uniform(rng: &mut ChaCha8Rng, rows: usize, cols: usize, bound: f64, device: Device) -> Tensor {
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
        .collect();
    let t = Tensor::from_slice(&v).to_device(device);
    if cols == 1 {
        t
    } else {
        t.view([rows as i64, cols as i64])
    }
}

impl QNet {
    /// A network for `inputs` inputs. With `rng`, weights get Xavier-uniform values and biases
    /// PyTorch's Linear default `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`; without, zeros (a target
    /// network about to receive a copy).
    pub fn new(
        cfg: &DdqnConfig,
        inputs: usize,
        device: Device,
        mut rng: Option<&mut ChaCha8Rng>,
    ) -> QNet {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let mut param = |name: String, rows: usize, cols: usize, bound: f64| -> Tensor {
            let init = match rng.as_deref_mut() {
                Some(r) => uniform(r, rows, cols, bound, device),
                None if cols == 1 => Tensor::zeros([rows as i64], (Kind::Float, device)),
                None => Tensor::zeros([rows as i64, cols as i64], (Kind::Float, device)),
            };
            root.var_copy(&name, &init)
        };
        let bn_cfg = nn::BatchNormConfig {
            eps: cfg.batch_norm_eps,
            momentum: cfg.batch_norm_momentum,
            // PyTorch's BatchNorm1d starts at weight 1, bias 0 (tch defaults to uniform).
            ws_init: nn::Init::Const(1.0),
            bs_init: nn::Init::Const(0.0),
            ..Default::default()
        };
        let mut hidden = Vec::with_capacity(cfg.hidden_layers);
        let mut fan_in = inputs;
        for i in 0..cfg.hidden_layers {
            let xavier = (6.0 / (fan_in + cfg.hidden) as f64).sqrt();
            let w = param(format!("fc{i}_weight"), cfg.hidden, fan_in, xavier);
            let b = param(
                format!("fc{i}_bias"),
                cfg.hidden,
                1,
                1.0 / (fan_in as f64).sqrt(),
            );
            let bn = nn::batch_norm1d(&root / format!("bn{i}"), cfg.hidden as i64, bn_cfg);
            hidden.push(Hidden { w, b, bn });
            fan_in = cfg.hidden;
        }
        let xavier = (6.0 / (fan_in + ACTIONS as usize) as f64).sqrt();
        let out_w = param("out_weight".into(), ACTIONS as usize, fan_in, xavier);
        let out_b = param(
            "out_bias".into(),
            ACTIONS as usize,
            1,
            1.0 / (fan_in as f64).sqrt(),
        );
        QNet {
            vs,
            hidden,
            out_w,
            out_b,
            dropout: cfg.dropout,
            slope: cfg.leaky_slope,
            width: cfg.hidden as i64,
        }
    }

    /// Q-values `[batch, 2]`. `train`: BatchNorm uses (and updates) batch statistics and
    /// dropout masks are drawn from `rng`; otherwise running statistics, no dropout.
    pub fn forward(&self, x: &Tensor, train: bool, mut rng: Option<&mut ChaCha8Rng>) -> Tensor {
        let batch = x.size()[0];
        let mut x = x.shallow_clone();
        for h in &self.hidden {
            x = x.linear(&h.w, Some(&h.b));
            x = h.bn.forward_t(&x, train);
            x = self.leaky_relu(&x);
            if train
                && self.dropout > 0.0
                && let Some(r) = rng.as_deref_mut()
            {
                let mask = self.dropout_mask(r, batch, x.device());
                x *= mask;
            }
        }
        x.linear(&self.out_w, Some(&self.out_b))
    }

    /// LeakyReLU. At the reference's slope (0.01, ATen's default) this is ATen's own
    /// `leaky_relu`: one kernel each way. `max(x, slope x)` gives the same values, but its
    /// backward is five kernels (compare, where, halve, two masked fills) and cost a tenth of
    /// a gradient step; the two differ only in the gradient at exactly x = 0.
    fn leaky_relu(&self, x: &Tensor) -> Tensor {
        if self.slope == ATEN_LEAKY_SLOPE {
            x.leaky_relu()
        } else {
            x.maximum(&(x * self.slope))
        }
    }

    /// Inverted dropout: kept units are scaled by 1 / (1 - p), as `nn.Dropout`. The draws are
    /// one `fill` of u16s (the CPU network's stream, [`crate::mlp::dropout_threshold`]).
    fn dropout_mask(&self, rng: &mut ChaCha8Rng, batch: i64, device: Device) -> Tensor {
        let keep = 1.0 / (1.0 - self.dropout) as f32;
        let threshold = crate::mlp::dropout_threshold(self.dropout);
        let n = (batch * self.width) as usize;
        let mut draws = vec![0u16; n];
        rng.fill(&mut draws[..]);
        let v: Vec<f32> = draws
            .iter()
            .map(|&u| if u >= threshold { keep } else { 0.0 })
            .collect();
        Tensor::from_slice(&v)
            .view([batch, self.width])
            .to_device(device)
    }

    /// Every variable (weights, biases, BatchNorm affine and running statistics) as f32
    /// vectors, by name: for bit-for-bit comparisons and checkpoints.
    pub fn snapshot(&self) -> Vec<(String, Vec<f32>)> {
        let mut vars: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars.into_iter()
            .map(|(name, t)| {
                let flat = t.to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1);
                let n = flat.numel();
                let mut v = vec![0f32; n];
                flat.copy_data(&mut v, n);
                (name, v)
            })
            .collect()
    }
}
