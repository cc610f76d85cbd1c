//! A prompt head's pass through the frozen bottom, computed once. Every PPO prompt repeats
//! its task text (the ticker, the legible actions) before the day's state: a quarter to two
//! fifths of its ~600 tokens. [`FrozenPrefix`] holds the head's keys and values in each frozen
//! block and its output; [`TrainablePolicy::frozen_forward_after`] runs only the rest of a
//! prompt, attending to them. The head runs alone, so what it holds does not depend on which
//! prompt came first; a prompt's rest differs from a whole-prompt pass by rounding only
//! (other matrix shapes), checked by the tests.
use tch::{Kind, Tensor};

use super::{FrozenHidden, TrainablePolicy};
use crate::error::{LlmError, Result};

/// The frozen bottom's keys, values ([1, n_kv, L, head_dim] per block) and output ([1, L,
/// D]) for the head `ids`.
pub struct FrozenPrefix {
    ids: Vec<i64>,
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    hidden: Tensor,
}

impl FrozenPrefix {
    pub fn ids(&self) -> &[i64] {
        &self.ids
    }
}

impl std::fmt::Debug for FrozenPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FrozenPrefix({} tokens)", self.ids.len())
    }
}

impl TrainablePolicy {
    /// The frozen bottom of a head: one row of real tokens.
    pub fn frozen_prefix(&self, ids: &[i64]) -> Result<FrozenPrefix> {
        self.check_token_ids(ids)?;
        let cfg = &self.frozen.cfg;
        let dev = self.device();
        let (nkv, hd) = (cfg.n_kv_head as i64, cfg.head_dim as i64);
        let l = ids.len() as i64;
        let t = Tensor::from_slice(ids).view([1, l]).to_device(dev);
        let valid = Tensor::ones([1, l], (Kind::Bool, dev));
        let first = Tensor::zeros([1], (Kind::Int64, dev));
        let (att, _) = self.frozen.attn_inputs(&valid, None, &first);
        let kind = self.frozen.kind();
        Ok(tch::no_grad(|| {
            let mut x = self.frozen.embed_tokens(&t);
            let (mut keys, mut values) = (Vec::new(), Vec::new());
            for blk in &self.frozen.blocks {
                let k = Tensor::zeros([1, nkv, l, hd], (kind, dev));
                let v = Tensor::zeros([1, nkv, l, hd], (kind, dev));
                x = blk.forward(cfg, &x, &att, Some((&k, &v)), 0);
                keys.push(k);
                values.push(v);
            }
            FrozenPrefix {
                ids: ids.to_vec(),
                keys,
                values,
                hidden: x,
            }
        }))
    }

    /// [`TrainablePolicy::frozen_forward`] of the one prompt `prefix.ids() ++ rest`, running
    /// `rest` only: [1, L + R] hidden states, every position real.
    pub fn frozen_forward_after(
        &self,
        prefix: &FrozenPrefix,
        rest: &[i64],
    ) -> Result<FrozenHidden> {
        if rest.is_empty() {
            return Err(LlmError::Invalid(
                "a prompt needs a token after its cached head".into(),
            ));
        }
        self.check_token_ids(rest)?;
        let cfg = &self.frozen.cfg;
        let dev = self.device();
        let (nkv, hd) = (cfg.n_kv_head as i64, cfg.head_dim as i64);
        let (l, r) = (prefix.ids.len() as i64, rest.len() as i64);
        let t = Tensor::from_slice(rest).view([1, r]).to_device(dev);
        let valid = Tensor::ones([1, r], (Kind::Bool, dev));
        let past = Tensor::ones([1, l], (Kind::Bool, dev));
        let first = Tensor::from_slice(&[l]).to_device(dev);
        let (att, _) = self.frozen.attn_inputs(&valid, Some(&past), &first);
        let kind = self.frozen.kind();
        let hidden = tch::no_grad(|| {
            let mut x = self.frozen.embed_tokens(&t);
            for (i, blk) in self.frozen.blocks.iter().enumerate() {
                let k = Tensor::zeros([1, nkv, l + r, hd], (kind, dev));
                let v = Tensor::zeros([1, nkv, l + r, hd], (kind, dev));
                k.narrow(2, 0, l).copy_(&prefix.keys[i]);
                v.narrow(2, 0, l).copy_(&prefix.values[i]);
                x = blk.forward(cfg, &x, &att, Some((&k, &v)), l);
            }
            Tensor::cat(&[&prefix.hidden, &x], 1)
        });
        Ok(FrozenHidden {
            hidden,
            valid: Tensor::ones([1, l + r], (Kind::Bool, dev)),
        })
    }

    fn check_token_ids(&self, ids: &[i64]) -> Result<()> {
        let vocab = self.frozen.cfg.vocab as i64;
        match ids.iter().find(|&&id| id < 0 || id >= vocab) {
            _ if ids.is_empty() => Err(LlmError::Invalid("no token ids".into())),
            Some(bad) => Err(LlmError::Invalid(format!(
                "token ids must be in 0..{vocab}, found {bad}"
            ))),
            None => Ok(()),
        }
    }
}
