//! Trainable mode for PPO: the bottom blocks (and the embedding) stay frozen outside any
//! VarStore, the top N blocks and the final norm are copied into the caller's VarStore as
//! trainable variables, and a policy head and a value head read the last real token's hidden
//! state. Gradients flow through the top blocks only: the frozen part runs under no_grad, so
//! its activations carry no graph and its weights can never change.

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor, nn, nn::Module};

use crate::error::{LlmError, Result};
use crate::generate::Engine;
use crate::llama::{Block, LlamaModel, rms_norm};

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

pub struct TrainablePolicy {
    /// Embedding and the frozen bottom blocks (`blocks` truncated to them).
    frozen: LlamaModel,
    top: Vec<Block>,
    norm: Tensor,
    policy_head: nn::Linear,
    value_head: nn::Linear,
}

impl std::fmt::Debug for TrainablePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainablePolicy")
            .field("frozen_blocks", &self.frozen.blocks.len())
            .field("trainable_blocks", &self.top.len())
            .finish()
    }
}

impl TrainablePolicy {
    /// Splits the model: the top `n_trainable_top_blocks` blocks and the final norm become
    /// variables of `vs` (f32, on `vs`'s device), plus `policy` (d_model -> n_actions) and
    /// `value` (d_model -> 1) heads.
    pub fn new(
        base: impl Into<PolicyBase>,
        n_trainable_top_blocks: usize,
        n_actions: usize,
        vs: &nn::Path,
    ) -> Result<Self> {
        let device = vs.device();
        let mut model = match base.into() {
            PolicyBase::Model(m) => *m,
            PolicyBase::Path(p) => LlamaModel::load(&p, device, Kind::Float)?,
        };
        let n_layer = model.blocks.len();
        if n_trainable_top_blocks == 0 || n_trainable_top_blocks > n_layer {
            return Err(LlmError::Invalid(format!(
                "n_trainable_top_blocks {n_trainable_top_blocks} must be in 1..={n_layer}"
            )));
        }
        if n_actions == 0 {
            return Err(LlmError::Invalid("n_actions must be at least 1".into()));
        }
        if model.device() != device || model.kind() != Kind::Float {
            return Err(LlmError::Invalid(format!(
                "the base model is {:?} on {:?}; training needs f32 on the VarStore's {device:?}",
                model.kind(),
                model.device()
            )));
        }
        let n_frozen = n_layer - n_trainable_top_blocks;
        let top_src = model.blocks.split_off(n_frozen);
        let top = top_src
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let p = vs.sub(format!("block{}", n_frozen + i));
                Block {
                    attn_norm: p.var_copy("attn_norm", &b.attn_norm),
                    wqkv: p.var_copy("wqkv", &b.wqkv),
                    wo: p.var_copy("wo", &b.wo),
                    ffn_norm: p.var_copy("ffn_norm", &b.ffn_norm),
                    w_gate_up: p.var_copy("w_gate_up", &b.w_gate_up),
                    w_down: p.var_copy("w_down", &b.w_down),
                }
            })
            .collect();
        let norm = vs.var_copy("final_norm", &model.norm);
        let d = model.cfg.d_model as i64;
        let policy_head = nn::linear(vs / "policy", d, n_actions as i64, Default::default());
        let value_head = nn::linear(vs / "value", d, 1, Default::default());
        Ok(TrainablePolicy {
            frozen: model,
            top,
            norm,
            policy_head,
            value_head,
        })
    }

    /// The frozen bottom blocks (for inspection; never updated).
    pub fn frozen_blocks(&self) -> &[Block] {
        &self.frozen.blocks
    }

    pub fn trainable_blocks(&self) -> &[Block] {
        &self.top
    }

    pub fn frozen_embedding(&self) -> &Tensor {
        &self.frozen.embed
    }

    pub fn device(&self) -> Device {
        self.frozen.device()
    }

    /// `ids` [B, T] token ids, `mask` [B, T] (nonzero = real token; padding may be on either
    /// side). Returns (policy logits [B, n_actions], value [B]) read at each row's last real
    /// token.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<(Tensor, Tensor)> {
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
        let first = Tensor::zeros([b], (Kind::Int64, dev));
        let (att, _) = self.frozen.attn_inputs(&valid, None, &first);
        let x = tch::no_grad(|| {
            let mut x = self.frozen.embed_tokens(&ids);
            for blk in &self.frozen.blocks {
                x = blk.forward(cfg, &x, &att, None, 0);
            }
            x
        });
        let mut x = x;
        for blk in &self.top {
            x = blk.forward(cfg, &x, &att, None, 0);
        }
        let x = rms_norm(&x, &self.norm, cfg.eps);
        // Last real token of each row: the largest position whose mask is set.
        let last = (valid.to_kind(Kind::Int64)
            * Tensor::arange(t, (Kind::Int64, dev)).unsqueeze(0))
        .argmax(-1, false);
        let idx = last
            .view([b, 1, 1])
            .expand([b, 1, cfg.d_model as i64], false);
        let h = x.gather(1, &idx, false).squeeze_dim(1);
        Ok((
            self.policy_head.forward(&h),
            self.value_head.forward(&h).squeeze_dim(-1),
        ))
    }
}
