//! Generation engine: batched greedy / temperature + top-p sampling with a seed, stop on EOS or
//! stop strings, chat template, and the scores the strategist reads.
//!
//! Scores (all from the model's untempered distribution p = softmax(logits), whatever the
//! sampling temperature):
//! - `logprobs[t]` = ln p(token_t | prefix).
//! - Top-k entropy (LLM-guided RL paper): with p_1..p_k the k largest probabilities at a step
//!   and r = max(0, 1 - sum_i p_i) the unobserved remainder treated as one extra outcome,
//!   `H = -(sum_i p_i ln p_i + r ln r) / ln(k + 1)`, in [0, 1] (0 ln 0 = 0). With k = 0 the
//!   full Shannon entropy normalised by ln(vocab) is used instead.
//!   `Generation::entropy` is the mean of the per-token values.
//! - `perplexity` = exp(-mean_t logprobs[t]) over the generated tokens (EOS included).
//! - `score_continuations` = sum of ln p over each candidate's tokens after the prompt.

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use crate::error::{LlmError, Result};
use crate::gguf::GgufFile;
use crate::llama::LlamaModel;
use crate::tokenizer::{ChatMessage, LlmTokenizer};

/// Sets libtorch's intra-op thread count (CPU matmuls).
pub fn set_threads(n: usize) {
    tch::set_num_threads(n.max(1) as i32);
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    /// 0 = greedy (argmax).
    pub temperature: f64,
    /// Nucleus sampling mass in (0, 1]; 1 disables it.
    pub top_p: f64,
    pub seed: u64,
    /// Generation ends when the decoded text contains one of these; the text is cut before it.
    pub stop: Vec<String>,
    /// k of the top-k entropy (0 = full normalised entropy).
    pub top_k_entropy: usize,
    /// Wrap each prompt as one user message in the model's chat template.
    pub chat: bool,
    /// Stop as soon as `prefill + text` holds one complete JSON object (braces balanced
    /// outside strings); the text keeps the closing brace. `Some(prefill)` for answers that
    /// must be one JSON object, so the model is not left to ramble up to `max_tokens`.
    pub json_prefill: Option<String>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: Vec::new(),
            top_k_entropy: 10,
            chat: false,
            json_prefill: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-generation token (EOS, `<|im_end|>`, `<|endoftext|>`).
    Eos,
    /// A stop string appeared in the text.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Generation {
    /// Decoded generated text, special tokens skipped, cut before a matched stop string.
    pub text: String,
    /// Generated token ids (an ending EOS included).
    pub ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub entropies: Vec<f32>,
    /// Mean of `entropies`.
    pub entropy: f64,
    pub perplexity: f64,
    pub finish_reason: FinishReason,
}

/// The `n` most likely tokens of one generation step as (token id, ln p), most likely first
/// (what an OpenAI-style `top_logprobs` reports).
pub type TopLogprobs = Vec<(u32, f32)>;

/// Where the JSON object begun in `prefix` (or in `text`) closes: the byte offset in `text`
/// just after its final `}`, when braces and brackets balance outside strings. None while it
/// is still open, or when the prefix already closed one (nothing to wait for).
pub fn json_object_end(prefix: &str, text: &str) -> Option<usize> {
    let (mut depth, mut in_string, mut escaped, mut opened) = (0usize, false, false, false);
    let chars = prefix
        .char_indices()
        .map(|(i, c)| (None, i, c))
        .chain(text.char_indices().map(|(i, c)| (Some(()), i, c)));
    for (in_text, i, c) in chars {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' | '[' => {
                depth += 1;
                opened = true;
            }
            '}' | ']' if depth > 0 => {
                depth -= 1;
                if depth == 0 && opened {
                    return in_text.map(|_| i + c.len_utf8());
                }
            }
            _ => {}
        }
    }
    None
}

/// Normalised top-k entropy of one step from its k largest probabilities (see module docs).
pub fn top_k_entropy(top_probs: &[f64]) -> f64 {
    let k = top_probs.len();
    if k == 0 {
        return 0.0;
    }
    let plogp = |p: f64| if p > 0.0 { p * p.ln() } else { 0.0 };
    let mass: f64 = top_probs.iter().sum();
    let r = (1.0 - mass).max(0.0);
    let h = -(top_probs.iter().map(|&p| plogp(p)).sum::<f64>() + plogp(r));
    (h / ((k + 1) as f64).ln()).clamp(0.0, 1.0)
}

pub struct Engine {
    model: LlamaModel,
    tok: LlmTokenizer,
    eog: Vec<u32>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.model)
            .finish()
    }
}

struct SeqState {
    ids: Vec<u32>,
    logprobs: Vec<f32>,
    entropies: Vec<f32>,
    top: Vec<TopLogprobs>,
    finish: Option<FinishReason>,
    stop_text: Option<String>,
    rng: ChaCha8Rng,
}

impl Engine {
    /// Loads model and tokenizer: f32 on CPU, bf16 on CUDA. Honours env `FLAG_LLM_THREADS`.
    pub fn load(path: impl AsRef<Path>, device: Device) -> Result<Engine> {
        let kind = if device.is_cuda() {
            Kind::BFloat16
        } else {
            Kind::Float
        };
        Self::load_with_kind(path, device, kind)
    }

    pub fn load_with_kind(path: impl AsRef<Path>, device: Device, kind: Kind) -> Result<Engine> {
        if let Ok(v) = std::env::var("FLAG_LLM_THREADS") {
            let n: usize = v.trim().parse().map_err(|_| {
                LlmError::Invalid(format!("FLAG_LLM_THREADS='{v}' is not a thread count"))
            })?;
            set_threads(n);
        }
        let g = GgufFile::open(path)?;
        let tok = LlmTokenizer::from_gguf(&g)?;
        let model = LlamaModel::from_gguf(&g, device, kind)?;
        Self::from_parts(model, tok)
    }

    pub fn from_parts(model: LlamaModel, tok: LlmTokenizer) -> Result<Engine> {
        if tok.vocab_size() > model.cfg.vocab {
            return Err(LlmError::Invalid(format!(
                "tokenizer vocabulary {} exceeds the model's {}",
                tok.vocab_size(),
                model.cfg.vocab
            )));
        }
        let mut eog: Vec<u32> = tok.eos_id().into_iter().collect();
        for t in ["<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>"] {
            if let Some(id) = tok.token_id(t).filter(|id| !eog.contains(id)) {
                eog.push(id);
            }
        }
        Ok(Engine { model, tok, eog })
    }

    pub fn tokenizer(&self) -> &LlmTokenizer {
        &self.tok
    }

    pub fn model(&self) -> &LlamaModel {
        &self.model
    }

    pub fn into_model(self) -> LlamaModel {
        self.model
    }

    /// End-of-generation token ids.
    pub fn eog_ids(&self) -> &[u32] {
        &self.eog
    }

    fn check_ids(&self, ids: &[u32], what: &str) -> Result<()> {
        if ids.is_empty() {
            return Err(LlmError::Invalid(format!("{what} encodes to no tokens")));
        }
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.model.cfg.vocab) {
            return Err(LlmError::Invalid(format!(
                "{what}: token id {bad} is outside the vocabulary of {}",
                self.model.cfg.vocab
            )));
        }
        Ok(())
    }

    /// Left-pads rows to one length: (ids [B, T] i64, valid [B, T] bool) on the model device.
    fn left_pad(&self, rows: &[Vec<u32>]) -> (Tensor, Tensor) {
        let t = rows.iter().map(Vec::len).max().unwrap_or(0);
        let pad = i64::from(self.tok.pad_id().or(self.tok.eos_id()).unwrap_or(0));
        let mut ids = Vec::with_capacity(rows.len() * t);
        let mut valid = Vec::with_capacity(rows.len() * t);
        for r in rows {
            let n_pad = t - r.len();
            ids.extend(std::iter::repeat_n(pad, n_pad));
            ids.extend(r.iter().map(|&i| i64::from(i)));
            valid.extend(std::iter::repeat_n(false, n_pad));
            valid.extend(std::iter::repeat_n(true, r.len()));
        }
        let dev = self.model.device();
        let shape = [rows.len() as i64, t as i64];
        (
            Tensor::from_slice(&ids).view(shape).to_device(dev),
            Tensor::from_slice(&valid).view(shape).to_device(dev),
        )
    }

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

    /// Prompt token ids as generation sees them (chat template applied if asked).
    pub fn prompt_ids(&self, prompt: &str, chat: bool) -> Result<Vec<u32>> {
        if chat {
            let text = self
                .tok
                .apply_chat_template(&[ChatMessage::user(prompt)], true)?;
            self.tok.encode(&text, true)
        } else {
            self.tok.encode_prompt(prompt)
        }
    }

    /// Batched generation, one result per prompt, in order.
    pub fn generate(&self, prompts: &[String], opts: &GenerateOptions) -> Result<Vec<Generation>> {
        let ids = prompts
            .iter()
            .map(|p| self.prompt_ids(p, opts.chat))
            .collect::<Result<Vec<_>>>()?;
        self.generate_ids(&ids, opts)
    }

    /// Batched generation from token ids (left padding, one KV cache, finished rows dropped).
    pub fn generate_ids(
        &self,
        prompts: &[Vec<u32>],
        opts: &GenerateOptions,
    ) -> Result<Vec<Generation>> {
        Ok(self
            .generate_ids_with_top(prompts, opts, 0)?
            .into_iter()
            .map(|(g, _)| g)
            .collect())
    }

    /// [`generate_ids`](Self::generate_ids), also returning for every generated token the
    /// `top_n` most likely tokens of its step with their logprobs (from the untempered
    /// distribution, like `logprobs`). `top_n = 0` records none; it is capped at the vocabulary.
    pub fn generate_ids_with_top(
        &self,
        prompts: &[Vec<u32>],
        opts: &GenerateOptions,
        top_n: usize,
    ) -> Result<Vec<(Generation, Vec<TopLogprobs>)>> {
        validate(opts)?;
        for (i, p) in prompts.iter().enumerate() {
            self.check_ids(p, &format!("prompt {}", i + 1))?;
        }
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        let _g = tch::no_grad_guard();
        let n = prompts.len();
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let mut cache = self.model.new_cache(n, longest + opts.max_tokens)?;
        let (ids, valid) = self.left_pad(prompts);
        let h = self.model.forward_cached(&ids, &valid, &mut cache)?;
        let mut logits = self.model.logits(&h.select(1, -1));
        let mut states: Vec<SeqState> = (0..n)
            .map(|i| {
                let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
                rng.set_stream(i as u64);
                SeqState {
                    ids: Vec::new(),
                    logprobs: Vec::new(),
                    entropies: Vec::new(),
                    top: Vec::new(),
                    finish: None,
                    stop_text: None,
                    rng,
                }
            })
            .collect();
        // Cache row -> sequence index.
        let mut active: Vec<usize> = (0..n).collect();
        loop {
            let next = self.step(&logits, &active, &mut states, opts, top_n)?;
            let keep: Vec<usize> = (0..active.len())
                .filter(|&r| states[active[r]].finish.is_none())
                .collect();
            if keep.is_empty() {
                break;
            }
            if keep.len() < active.len() {
                let rows: Vec<i64> = keep.iter().map(|&r| r as i64).collect();
                cache.retain_rows(&rows);
            }
            let feed: Vec<i64> = keep.iter().map(|&r| next[r]).collect();
            active = keep.iter().map(|&r| active[r]).collect();
            let dev = self.model.device();
            let x = Tensor::from_slice(&feed)
                .view([feed.len() as i64, 1])
                .to_device(dev);
            let v = Tensor::ones([feed.len() as i64, 1], (Kind::Bool, dev));
            let h = self.model.forward_cached(&x, &v, &mut cache)?;
            logits = self.model.logits(&h.select(1, 0));
        }
        states
            .into_iter()
            .map(|s| {
                let text = match s.stop_text {
                    Some(t) => t,
                    None => self.tok.decode(&s.ids, true)?,
                };
                let count = s.logprobs.len().max(1) as f64;
                let mean_lp = s.logprobs.iter().map(|&l| f64::from(l)).sum::<f64>() / count;
                let g = Generation {
                    text,
                    entropy: s.entropies.iter().map(|&e| f64::from(e)).sum::<f64>() / count,
                    perplexity: (-mean_lp).exp(),
                    ids: s.ids,
                    logprobs: s.logprobs,
                    entropies: s.entropies,
                    finish_reason: s.finish.unwrap_or(FinishReason::Length),
                };
                Ok((g, s.top))
            })
            .collect()
    }

    /// Picks the next token of every active row from `logits` [A, V], records its scores and
    /// whether the row finished. Returns the chosen ids (by cache row).
    fn step(
        &self,
        logits: &Tensor,
        active: &[usize],
        states: &mut [SeqState],
        opts: &GenerateOptions,
        top_n: usize,
    ) -> Result<Vec<i64>> {
        let lp = logits.log_softmax(-1, Kind::Float);
        let vocab = lp.size()[1];
        let next: Vec<i64> = if opts.temperature == 0.0 {
            Vec::<i64>::try_from(&lp.argmax(-1, false).to_device(Device::Cpu))?
        } else {
            let cpu = logits.to_device(Device::Cpu);
            let mut out = Vec::with_capacity(active.len());
            for (r, &s) in active.iter().enumerate() {
                let row = Vec::<f32>::try_from(&cpu.get(r as i64))?;
                out.push(sample(&row, opts.temperature, opts.top_p, &mut states[s].rng) as i64);
            }
            out
        };
        let idx = Tensor::from_slice(&next)
            .to_device(lp.device())
            .unsqueeze(1);
        let chosen = Vec::<f32>::try_from(
            &lp.gather(1, &idx, false)
                .reshape([-1])
                .to_device(Device::Cpu),
        )?;
        let entropies: Vec<f32> = if opts.top_k_entropy == 0 {
            let h = (lp.exp() * &lp)
                .sum_dim_intlist(-1, false, Kind::Float)
                .neg()
                / (vocab as f64).ln();
            Vec::<f32>::try_from(&h.to_device(Device::Cpu))?
        } else {
            let k = (opts.top_k_entropy as i64).min(vocab);
            let (top, _) = lp.topk(k, -1, true, false);
            let top = Vec::<f32>::try_from(&top.exp().reshape([-1]).to_device(Device::Cpu))?;
            top.chunks(k as usize)
                .map(|c| top_k_entropy(&c.iter().map(|&p| f64::from(p)).collect::<Vec<_>>()) as f32)
                .collect()
        };
        let top_n = (top_n as i64).min(vocab);
        if top_n > 0 {
            let (vals, idx) = lp.topk(top_n, -1, true, true);
            let vals = Vec::<f32>::try_from(&vals.reshape([-1]).to_device(Device::Cpu))?;
            let idx = Vec::<i64>::try_from(&idx.reshape([-1]).to_device(Device::Cpu))?;
            let n = top_n as usize;
            for (r, &s) in active.iter().enumerate() {
                let row = (r * n..(r + 1) * n).map(|j| (idx[j] as u32, vals[j]));
                states[s].top.push(row.collect());
            }
        }
        for (r, &s) in active.iter().enumerate() {
            let st = &mut states[s];
            let id = next[r] as u32;
            st.ids.push(id);
            st.logprobs.push(chosen[r]);
            st.entropies.push(entropies[r]);
            if self.eog.contains(&id) {
                st.finish = Some(FinishReason::Eos);
            } else if !opts.stop.is_empty() || opts.json_prefill.is_some() {
                let text = self.tok.decode(&st.ids, true)?;
                let at_stop = opts.stop.iter().filter_map(|s| text.find(s.as_str())).min();
                let json_end = opts
                    .json_prefill
                    .as_deref()
                    .and_then(|pre| json_object_end(pre, &text));
                let cut = match (at_stop, json_end) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                if let Some(cut) = cut {
                    st.stop_text = Some(text[..cut].to_string());
                    st.finish = Some(FinishReason::Stop);
                }
            }
            if st.finish.is_none() && st.ids.len() >= opts.max_tokens {
                st.finish = Some(FinishReason::Length);
            }
        }
        Ok(next)
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

fn validate(opts: &GenerateOptions) -> Result<()> {
    if opts.max_tokens == 0 {
        return Err(LlmError::Invalid("max_tokens must be at least 1".into()));
    }
    if !(opts.temperature.is_finite() && opts.temperature >= 0.0) {
        return Err(LlmError::Invalid(format!(
            "temperature {} must be finite and >= 0",
            opts.temperature
        )));
    }
    if !(opts.top_p > 0.0 && opts.top_p <= 1.0) {
        return Err(LlmError::Invalid(format!(
            "top_p {} must be in (0, 1]",
            opts.top_p
        )));
    }
    if opts.stop.iter().any(String::is_empty) {
        return Err(LlmError::Invalid("stop strings must not be empty".into()));
    }
    Ok(())
}

/// Samples from softmax(logits / temperature), restricted to the smallest set of most likely
/// tokens whose mass reaches `top_p` (the token that crosses it included, as transformers).
pub fn sample(logits: &[f32], temperature: f64, top_p: f64, rng: &mut impl Rng) -> usize {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let probs: Vec<f64> = logits
        .iter()
        .map(|&l| ((f64::from(l) - f64::from(max)) / temperature).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    let mut order: Vec<usize> = (0..probs.len()).collect();
    let mut kept = probs.len();
    if top_p < 1.0 {
        order.sort_unstable_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        let mut cum = 0.0;
        for (n, &i) in order.iter().enumerate() {
            cum += probs[i] / total;
            if cum >= top_p {
                kept = n + 1;
                break;
            }
        }
    }
    let kept_mass: f64 = order[..kept].iter().map(|&i| probs[i]).sum();
    let mut u = rng.random::<f64>() * kept_mass;
    for &i in &order[..kept] {
        u -= probs[i];
        if u <= 0.0 {
            return i;
        }
    }
    order[kept - 1]
}

#[cfg(test)]
mod json_end_tests {
    use super::json_object_end;

    #[test]
    fn finds_the_close_of_the_object_the_prefill_opened() {
        let pre = "{\"direction\": \"";
        assert_eq!(json_object_end(pre, "LONG\", \"confidence\": 2"), None);
        let t = "LONG\", \"f\": {\"a\": 0.5}} trailing";
        assert_eq!(
            json_object_end(pre, t),
            Some(t.find("} trailing").unwrap() + 1)
        );
        // Braces inside strings, escaped quotes included, do not count.
        let t = "LO}NG\", \"e\": \"a \\\" } b\"}";
        assert_eq!(json_object_end(pre, t), Some(t.len()));
        // Without a prefill the object must open in the text; a closed prefix waits for none.
        assert_eq!(json_object_end("", "x {\"a\": [1, {}]} y"), Some(16));
        assert_eq!(json_object_end("{}", "{"), None);
    }
}
