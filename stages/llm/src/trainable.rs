//! Trainable mode for PPO: the bottom blocks (and the embedding) stay frozen outside any
//! VarStore, the top M blocks and the final norm are copied into the caller's VarStore as
//! f32 trainable variables, and a policy head (d_model -> actions) and a value MLP
//! (d_model -> hidden -> 1, tanh) read the last real token's hidden state.
//!
//! The forward is split at the freeze line so a PPO update can cache the frozen part:
//! [`TrainablePolicy::frozen_forward`] runs the embedding and the bottom blocks under no_grad
//! (their activations carry no graph, their weights can never change) and returns a
//! [`FrozenHidden`]; [`TrainablePolicy::head_forward`] runs the trainable top from it. Cached
//! hidden states of prompts of different lengths batch together with
//! [`FrozenHidden::left_pad`]: RoPE positions count valid tokens only, so padding changes no
//! row's result.
//!
//! Precision: the frozen part runs in the base model's kind (f32 on CPU; bf16 on CUDA); the
//! trainable tensors are always f32 master weights, cast to the compute kind inside the
//! forward (so with bf16 the matmuls run in bf16 and the gradients reach the f32 masters, as
//! autocast would do it); the heads run in f32.

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor, nn};

use crate::error::{LlmError, Result};
use crate::generate::Engine;
use crate::llama::{Block, LlamaModel, Weight, rms_norm};

mod prefix;
pub use prefix::FrozenPrefix;

/// What a policy is built from: an already-loaded model (or engine) or a GGUF path.
pub enum PolicyBase {
    Model(Box<LlamaModel>),
    Path(PathBuf),
}

impl From<LlamaModel> for PolicyBase {
    fn from(m: LlamaModel) -> Self {
        PolicyBase::Model(Box::new(m))
    }
}

impl From<Engine> for PolicyBase {
    fn from(e: Engine) -> Self {
        PolicyBase::Model(Box::new(e.into_model()))
    }
}

impl From<&Path> for PolicyBase {
    fn from(p: &Path) -> Self {
        PolicyBase::Path(p.to_path_buf())
    }
}

impl From<PathBuf> for PolicyBase {
    fn from(p: PathBuf) -> Self {
        PolicyBase::Path(p)
    }
}

/// Optimizer group of the heads' variables (the transformer blocks and norm are group 0).
pub const HEAD_GROUP: usize = 1;

/// How the policy head starts.
#[derive(Debug, Clone, PartialEq)]
pub enum HeadInit {
    /// Row a = the output-embedding row of token `ids[a]` (bias 0): the starting logits are
    /// the model's own next-token logits of those tokens, so the starting policy is the
    /// model's preference among the action words.
    TokenRows(Vec<u32>),
    /// As `TokenRows`, with bias a = `bias[a]` (e.g. the log-probability of the rest of an
    /// action's answer after its first token, so the head scores whole action strings).
    TokenRowsWithBias(Vec<u32>, Vec<f64>),
    /// N(0, 0.01²) weights, zero bias (CleanRL's small-gain policy init).
    Random,
}

/// The shape of the trainable part.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyShape {
    /// Top blocks that train (M); the bottom n_layer - M stay frozen.
    pub trainable_blocks: usize,
    pub n_actions: usize,
    /// Width of the value MLP's hidden layer.
    pub value_hidden: usize,
    pub head_init: HeadInit,
    /// Seeds the random initial weights (value MLP, a random policy head). A local ChaCha8
    /// stream, not libtorch's global generator, so concurrent trainings cannot disturb it.
    pub seed: u64,
}

/// `n` values from U(lo, hi) or N(0, std) (Box-Muller) of a seeded ChaCha8 stream, as f32.
fn seeded(rng: &mut rand_chacha::ChaCha8Rng, shape: &[i64], dist: Dist) -> Tensor {
    use rand::Rng;
    let n: i64 = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| match dist {
            Dist::Uniform(lo, hi) => lo + (hi - lo) * rng.random::<f64>(),
            Dist::Normal(std) => {
                let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
                let u2: f64 = rng.random();
                std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
            }
        } as f32)
        .collect();
    Tensor::from_slice(&v).view(shape)
}

#[derive(Clone, Copy)]
enum Dist {
    Uniform(f64, f64),
    Normal(f64),
}

/// The frozen bottom's output for a batch: hidden states [B, T, D] in the compute kind and
/// validity [B, T] (false = padding).
#[derive(Debug)]
pub struct FrozenHidden {
    pub hidden: Tensor,
    pub valid: Tensor,
}

impl FrozenHidden {
    /// Row `i` alone, its padding removed ([1, len_i, D]).
    pub fn row(&self, i: i64) -> FrozenHidden {
        let valid = self.valid.get(i);
        let n = valid.to_kind(Kind::Int64).sum(Kind::Int64).int64_value(&[]);
        let t = valid.size()[0];
        // Rows are left- or right-padded; find the first valid position.
        let start = if n == t {
            0
        } else {
            valid.to_kind(Kind::Int64).argmax(0, false).int64_value(&[])
        };
        FrozenHidden {
            hidden: self.hidden.get(i).narrow(0, start, n).unsqueeze(0),
            valid: valid.narrow(0, start, n).unsqueeze(0),
        }
    }

    /// Stacks single rows ([1, T_i, D] each) into one batch, left-padded with zeros.
    pub fn left_pad(rows: &[&FrozenHidden]) -> Result<FrozenHidden> {
        let first = rows
            .first()
            .ok_or_else(|| LlmError::Invalid("no rows to batch".into()))?;
        let d = first.hidden.size()[2];
        let t = rows.iter().map(|r| r.hidden.size()[1]).max().unwrap_or(0);
        let (kind, dev) = (first.hidden.kind(), first.hidden.device());
        let mut hs = Vec::with_capacity(rows.len());
        let mut vs = Vec::with_capacity(rows.len());
        for r in rows {
            let (b, n, _) = r.hidden.size3()?;
            if b != 1 {
                return Err(LlmError::Invalid(format!(
                    "left_pad takes single rows, got a batch of {b}"
                )));
            }
            let pad = t - n;
            hs.push(Tensor::cat(
                &[
                    Tensor::zeros([1, pad, d], (kind, dev)),
                    r.hidden.shallow_clone(),
                ],
                1,
            ));
            vs.push(Tensor::cat(
                &[
                    Tensor::zeros([1, pad], (Kind::Bool, dev)),
                    r.valid.to_kind(Kind::Bool),
                ],
                1,
            ));
        }
        Ok(FrozenHidden {
            hidden: Tensor::cat(&hs, 0),
            valid: Tensor::cat(&vs, 0),
        })
    }
}

/// The trainable top: blocks, final norm and the two heads (f32).
#[derive(Debug)]
pub struct TopStack {
    pub blocks: Vec<Block>,
    pub norm: Tensor,
    pub policy_w: Tensor,
    pub policy_b: Tensor,
    pub value_w1: Tensor,
    pub value_b1: Tensor,
    pub value_w2: Tensor,
    pub value_b2: Tensor,
}

fn copy_block(b: &Block) -> Block {
    Block {
        attn_norm: b.attn_norm.detach().copy(),
        wqkv: Weight::Dense(b.wqkv.to_dense().detach().copy()),
        wo: Weight::Dense(b.wo.to_dense().detach().copy()),
        ffn_norm: b.ffn_norm.detach().copy(),
        w_gate_up: Weight::Dense(b.w_gate_up.to_dense().detach().copy()),
        w_down: Weight::Dense(b.w_down.to_dense().detach().copy()),
    }
}

fn cast_block(b: &Block, kind: Kind) -> Block {
    Block {
        attn_norm: b.attn_norm.to_kind(kind),
        wqkv: Weight::Dense(b.wqkv.to_dense().to_kind(kind)),
        wo: Weight::Dense(b.wo.to_dense().to_kind(kind)),
        ffn_norm: b.ffn_norm.to_kind(kind),
        w_gate_up: Weight::Dense(b.w_gate_up.to_dense().to_kind(kind)),
        w_down: Weight::Dense(b.w_down.to_dense().to_kind(kind)),
    }
}

impl TopStack {
    /// A detached copy (e.g. the reference policy of a KL penalty): same values, no graph,
    /// never updated.
    pub fn detached_copy(&self) -> TopStack {
        let c = |t: &Tensor| t.detach().copy();
        TopStack {
            blocks: self.blocks.iter().map(copy_block).collect(),
            norm: c(&self.norm),
            policy_w: c(&self.policy_w),
            policy_b: c(&self.policy_b),
            value_w1: c(&self.value_w1),
            value_b1: c(&self.value_b1),
            value_w2: c(&self.value_w2),
            value_b2: c(&self.value_b2),
        }
    }
}

pub struct TrainablePolicy {
    /// Embedding and the frozen bottom blocks (`blocks` truncated to them).
    frozen: LlamaModel,
    top: TopStack,
}

impl std::fmt::Debug for TrainablePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainablePolicy")
            .field("frozen_blocks", &self.frozen.blocks.len())
            .field("trainable_blocks", &self.top.blocks.len())
            .finish()
    }
}

impl TrainablePolicy {
    /// Splits the model: the top `shape.trainable_blocks` blocks and the final norm become f32
    /// variables of `vs` (on `vs`'s device) named `block{i}.*` and `final_norm`, plus
    /// `policy.{weight,bias}` and `value.{w1,b1,w2,b2}`. The base model must be on `vs`'s
    /// device, in f32 or (CUDA) bf16 / f16: its kind is the compute kind.
    pub fn new(base: impl Into<PolicyBase>, shape: &PolicyShape, vs: &nn::Path) -> Result<Self> {
        let device = vs.device();
        let mut model = match base.into() {
            PolicyBase::Model(m) => *m,
            PolicyBase::Path(p) => LlamaModel::load(&p, device, Kind::Float)?,
        };
        let n_layer = model.blocks.len();
        let m = shape.trainable_blocks;
        if m == 0 || m > n_layer {
            return Err(LlmError::Invalid(format!(
                "trainable_blocks {m} must be in 1..={n_layer}"
            )));
        }
        if shape.n_actions == 0 || shape.value_hidden == 0 {
            return Err(LlmError::Invalid(
                "n_actions and value_hidden must be at least 1".into(),
            ));
        }
        let kind_ok = match model.kind() {
            Kind::Float => true,
            Kind::BFloat16 | Kind::Half => device.is_cuda(),
            _ => false,
        };
        if model.device() != device || !kind_ok {
            return Err(LlmError::Invalid(format!(
                "the base model is {:?} on {:?}; training needs it on the VarStore's {device:?} \
                 in f32 (or bf16/f16 on CUDA)",
                model.kind(),
                model.device()
            )));
        }
        let d = model.cfg.d_model as i64;
        let out_rows = model.lm_head.as_ref().unwrap_or(&model.embed);
        let (row_ids, start_bias) = match &shape.head_init {
            HeadInit::TokenRows(ids) => (Some(ids), None),
            HeadInit::TokenRowsWithBias(ids, bias) => {
                if bias.len() != shape.n_actions || bias.iter().any(|b| !b.is_finite()) {
                    return Err(LlmError::Invalid(format!(
                        "head-init bias {bias:?} must hold {} finite values",
                        shape.n_actions
                    )));
                }
                (Some(ids), Some(bias))
            }
            HeadInit::Random => (None, None),
        };
        let policy_init = match row_ids {
            Some(ids) => {
                if ids.len() != shape.n_actions {
                    return Err(LlmError::Invalid(format!(
                        "{} head-init tokens for {} actions",
                        ids.len(),
                        shape.n_actions
                    )));
                }
                let mut seen = ids.clone();
                seen.sort_unstable();
                seen.dedup();
                if seen.len() != ids.len() {
                    return Err(LlmError::Invalid(format!(
                        "head-init tokens {ids:?} must be distinct"
                    )));
                }
                if let Some(bad) = ids.iter().find(|&&i| i as usize >= model.cfg.vocab) {
                    return Err(LlmError::Invalid(format!(
                        "head-init token {bad} is outside the vocabulary of {}",
                        model.cfg.vocab
                    )));
                }
                let idx: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
                let rows = tch::no_grad(|| {
                    out_rows
                        .to_dense()
                        .index_select(0, &Tensor::from_slice(&idx).to_device(device))
                        .to_kind(Kind::Float)
                });
                Some(rows)
            }
            None => None,
        };
        let n_frozen = n_layer - m;
        let top_src = model.blocks.split_off(n_frozen);
        let f32_copy = |p: &nn::Path, name: &str, t: &Tensor| {
            p.var_copy(name, &tch::no_grad(|| t.to_kind(Kind::Float)))
        };
        let blocks = top_src
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let p = vs.sub(format!("block{}", n_frozen + i));
                Block {
                    attn_norm: f32_copy(&p, "attn_norm", &b.attn_norm),
                    wqkv: Weight::Dense(f32_copy(&p, "wqkv", &b.wqkv.to_dense())),
                    wo: Weight::Dense(f32_copy(&p, "wo", &b.wo.to_dense())),
                    ffn_norm: f32_copy(&p, "ffn_norm", &b.ffn_norm),
                    w_gate_up: Weight::Dense(f32_copy(&p, "w_gate_up", &b.w_gate_up.to_dense())),
                    w_down: Weight::Dense(f32_copy(&p, "w_down", &b.w_down.to_dense())),
                }
            })
            .collect();
        let norm = f32_copy(vs, "final_norm", &model.norm);
        // The heads are optimizer group 1 (the blocks and norm group 0), so a trainer can
        // give the freshly initialised heads and the pretrained blocks their own rates.
        let heads = vs.set_group(HEAD_GROUP);
        let pol = &heads / "policy";
        let n_act = shape.n_actions as i64;
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(shape.seed);
        let policy_w = match policy_init {
            Some(rows) => pol.var_copy("weight", &rows),
            None => pol.var_copy(
                "weight",
                &seeded(&mut rng, &[n_act, d], Dist::Normal(0.01)).to_device(device),
            ),
        };
        let policy_b = match start_bias {
            Some(b) => {
                let b: Vec<f32> = b.iter().map(|&x| x as f32).collect();
                pol.var_copy("bias", &Tensor::from_slice(&b).to_device(device))
            }
            None => pol.zeros("bias", &[n_act]),
        };
        let val = &heads / "value";
        let h = shape.value_hidden as i64;
        // Scaled like torch's Linear default (U(-1/sqrt(in), 1/sqrt(in)));
        // the output layer starts at 0 so the first value estimates are 0.
        let bound = 1.0 / (d as f64).sqrt();
        let value_w1 = val.var_copy(
            "w1",
            &seeded(&mut rng, &[h, d], Dist::Uniform(-bound, bound)).to_device(device),
        );
        let value_b1 = val.zeros("b1", &[h]);
        let value_w2 = val.zeros("w2", &[1, h]);
        let value_b2 = val.zeros("b2", &[1]);
        Ok(TrainablePolicy {
            frozen: model,
            top: TopStack {
                blocks,
                norm,
                policy_w,
                policy_b,
                value_w1,
                value_b1,
                value_w2,
                value_b2,
            },
        })
    }

    /// The frozen bottom blocks (for inspection; never updated).
    pub fn frozen_blocks(&self) -> &[Block] {
        &self.frozen.blocks
    }

    pub fn trainable_blocks(&self) -> &[Block] {
        &self.top.blocks
    }

    /// The trainable part (blocks, norm, heads).
    pub fn top(&self) -> &TopStack {
        &self.top
    }

    /// The token embedding (dense: a policy is built from dense weights).
    pub fn frozen_embedding(&self) -> Tensor {
        self.frozen.embed.to_dense()
    }

    pub fn device(&self) -> Device {
        self.frozen.device()
    }

    /// The kind the transformer blocks compute in.
    pub fn compute_kind(&self) -> Kind {
        self.frozen.kind()
    }

    /// The base model's architecture.
    pub fn config(&self) -> &crate::llama::LlamaConfig {
        &self.frozen.cfg
    }

    pub fn n_layer(&self) -> usize {
        self.frozen.blocks.len() + self.top.blocks.len()
    }

    /// Embedding + frozen bottom blocks under no_grad. `ids` [B, T] token ids, `mask` [B, T]
    /// (nonzero = real token; padding on either side).
    pub fn frozen_forward(&self, ids: &Tensor, mask: &Tensor) -> Result<FrozenHidden> {
        let (b, t) = ids.size2()?;
        if mask.size() != [b, t] || t == 0 {
            return Err(LlmError::Invalid(format!(
                "ids {:?} and mask {:?} must both be [B, T] with T > 0",
                ids.size(),
                mask.size()
            )));
        }
        let cfg = &self.frozen.cfg;
        let dev = self.device();
        let ids = ids.to_device(dev).to_kind(Kind::Int64);
        let (lo, hi) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
        if lo < 0 || hi >= cfg.vocab as i64 {
            return Err(LlmError::Invalid(format!(
                "token ids must be in 0..{}, found {lo}..={hi}",
                cfg.vocab
            )));
        }
        let valid = mask.to_device(dev).ne(0);
        if valid
            .sum_dim_intlist(1, false, Kind::Int64)
            .min()
            .int64_value(&[])
            == 0
        {
            return Err(LlmError::Invalid(
                "a row of the batch has no real token".into(),
            ));
        }
        let first = Tensor::zeros([b], (Kind::Int64, dev));
        let (att, _) = self.frozen.attn_inputs(&valid, None, &first);
        let hidden = tch::no_grad(|| {
            let mut x = self.frozen.embed_tokens(&ids);
            for blk in &self.frozen.blocks {
                x = blk.forward(cfg, &x, &att, None, 0);
            }
            x
        });
        Ok(FrozenHidden { hidden, valid })
    }

    /// The trainable top on a frozen output: (policy logits [B, n_actions] f32, value [B]
    /// f32) at each row's last real token.
    pub fn head_forward(&self, fh: &FrozenHidden) -> Result<(Tensor, Tensor)> {
        self.head_forward_with(&self.top, fh)
    }

    /// [`head_forward`](Self::head_forward) with other top weights of the same shapes (e.g.
    /// a [`TopStack::detached_copy`] taken before training).
    pub fn head_forward_with(&self, top: &TopStack, fh: &FrozenHidden) -> Result<(Tensor, Tensor)> {
        let cfg = &self.frozen.cfg;
        let dev = self.device();
        let (b, t, d) = fh.hidden.size3()?;
        if fh.valid.size() != [b, t] || d != cfg.d_model as i64 {
            return Err(LlmError::Invalid(format!(
                "frozen hidden {:?} / validity {:?} do not fit d_model {}",
                fh.hidden.size(),
                fh.valid.size(),
                cfg.d_model
            )));
        }
        let valid = fh.valid.to_device(dev).to_kind(Kind::Bool);
        let first = Tensor::zeros([b], (Kind::Int64, dev));
        let (att, _) = self.frozen.attn_inputs(&valid, None, &first);
        let kind = self.compute_kind();
        let mut x = fh.hidden.to_device(dev).to_kind(kind);
        for blk in &top.blocks {
            x = if kind == Kind::Float {
                blk.forward(cfg, &x, &att, None, 0)
            } else {
                cast_block(blk, kind).forward(cfg, &x, &att, None, 0)
            };
        }
        let x = rms_norm(&x, &top.norm.to_kind(kind), cfg.eps);
        // Last real token of each row: the largest position whose mask is set.
        let last = (valid.to_kind(Kind::Int64)
            * Tensor::arange(t, (Kind::Int64, dev)).unsqueeze(0))
        .argmax(-1, false);
        let idx = last.view([b, 1, 1]).expand([b, 1, d], false);
        let h = x.gather(1, &idx, false).squeeze_dim(1).to_kind(Kind::Float);
        let logits = h.linear(&top.policy_w, Some(&top.policy_b));
        let value = h
            .linear(&top.value_w1, Some(&top.value_b1))
            .tanh()
            .linear(&top.value_w2, Some(&top.value_b2))
            .squeeze_dim(-1);
        Ok((logits, value))
    }

    /// Full forward: [`frozen_forward`](Self::frozen_forward) then
    /// [`head_forward`](Self::head_forward).
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<(Tensor, Tensor)> {
        let fh = self.frozen_forward(ids, mask)?;
        self.head_forward(&fh)
    }
}
