//! Scoring without generating: next-token logits and the log-likelihood of candidate
//! continuations (how a policy over e.g. {Buy, Sell, Hold} is read off the model).
use tch::{Device, Kind, Tensor};

use super::Engine;
use crate::error::Result;

impl Engine {
    /// Logits (f32, vocab long) of the token after the raw prompt (special tokens parsed,
    /// BOS only if the GGUF asks for it).
    pub fn next_token_logits(&self, prompt: &str) -> Result<Vec<f32>> {
        let ids = self.tok.encode_prompt(prompt)?;
        self.next_token_logits_ids(&ids)
    }

    pub fn next_token_logits_ids(&self, ids: &[u32]) -> Result<Vec<f32>> {
        self.check_ids(ids, "prompt")?;
        let _g = tch::no_grad_guard();
        let (x, valid) = self.left_pad(&[ids.to_vec()]);
        let h = self.model.forward(&x, &valid)?;
        let last = h.select(1, -1);
        let logits = self
            .model
            .logits(&last)
            .to_device(Device::Cpu)
            .reshape([-1]);
        Ok(Vec::<f32>::try_from(&logits)?)
    }

    /// Sum log-likelihood of each candidate continuation after `prompt` (prompt and candidate
    /// tokenised separately, special tokens parsed). How a policy over e.g. {Buy, Sell, Hold}
    /// is read off the model.
    pub fn score_continuations(&self, prompt: &str, candidates: &[String]) -> Result<Vec<f64>> {
        let mut p = self.tok.encode_prompt(prompt)?;
        if p.is_empty() {
            // Condition the first candidate token on BOS when there is no prompt text.
            p.extend(self.tok.bos_id());
        }
        self.check_ids(&p, "prompt")?;
        let cands = candidates
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let ids = self.tok.encode(c, true)?;
                self.check_ids(&ids, &format!("candidate {} ({c:?})", i + 1))?;
                Ok(ids)
            })
            .collect::<Result<Vec<_>>>()?;
        let _g = tch::no_grad_guard();
        let mut scores = Vec::with_capacity(cands.len());
        for chunk in cands.chunks(16) {
            let rows: Vec<Vec<u32>> = chunk.iter().map(|c| [p.as_slice(), c].concat()).collect();
            let (ids, valid) = self.left_pad(&rows);
            let h = self.model.forward(&ids, &valid)?;
            let t = h.size()[1];
            for (i, c) in chunk.iter().enumerate() {
                let n = c.len() as i64;
                let hid = h.get(i as i64).narrow(0, t - 1 - n, n);
                let lp = self.model.logits(&hid).log_softmax(-1, Kind::Float);
                let tgt: Vec<i64> = c.iter().map(|&x| i64::from(x)).collect();
                let tgt = Tensor::from_slice(&tgt).to_device(lp.device()).unsqueeze(1);
                let picked = lp
                    .gather(1, &tgt, false)
                    .to_kind(Kind::Double)
                    .sum(Kind::Double);
                scores.push(f64::try_from(&picked)?);
            }
        }
        Ok(scores)
    }
}
