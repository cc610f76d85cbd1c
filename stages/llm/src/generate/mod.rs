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
//!
//! With a [`Constraint`] every step samples from the model's logits restricted to the tokens
//! the grammar allows (greedy and seeded sampling alike). The scores above stay those of the
//! unrestricted distribution (what the model wanted); [`ConstrainedScores`] holds the same
//! numbers for the restricted, renormalised distribution (what it was allowed), and the
//! allowed alternatives themselves at steps where there are few of them (the decision tokens).

use std::path::Path;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use crate::constrain::{
    CompiledConstraint, Constraint, ConstraintCompiler, SequenceMatcher, mask_to_bools,
};
use crate::error::{LlmError, Result};
use crate::gguf::GgufFile;
use crate::llama::{KvCache, LlamaModel, WeightFormat};
pub use crate::sampling::{choose_tokens, json_object_end, restrict, sample, top_k_entropy};
use crate::sampling::{gather_cpu, step_entropies};
use crate::tokenizer::{ChatMessage, LlmTokenizer};

/// Sets libtorch's intra-op thread count (CPU matmuls).
pub fn set_threads(n: usize) {
    tch::set_num_threads(n.max(1) as i32);
}

mod prefix;
mod scoring;
mod types;

pub use prefix::{MIN_PREFIX, PrefixStats, PrefixStore};

/// The weight format of engines loaded for the CPU: env `FLAG_LLM_WEIGHTS` = `gguf` (the
/// GGUF's blocks as stored, the default: a third of dense's resident memory and faster decode
/// up to batch ~8), `gguf-int8` (the same blocks, decode's activations rounded to 8 bits:
/// faster, logits within the rounding of f32's) or `dense` (f32; the format of keys made
/// before the choice existed). See README "LLM weights on the CPU".
pub fn cpu_weights_by_env() -> Result<WeightFormat> {
    match std::env::var("FLAG_LLM_WEIGHTS") {
        Ok(v) if !v.trim().is_empty() => {
            WeightFormat::parse(&v).map_err(|e| LlmError::Invalid(format!("FLAG_LLM_WEIGHTS: {e}")))
        }
        _ => Ok(WeightFormat::GgufBlocks),
    }
}

/// What engines keep across calls (`FLAG_LLM_PREFIX_STORE`, default `exact`).
pub fn prefix_store_by_env() -> std::result::Result<PrefixStore, String> {
    prefix::store_by_env()
}

/// Whether engines start with prefix caching on (`FLAG_LLM_PREFIX_CACHE`, default on).
pub fn prefix_cache_by_env() -> bool {
    prefix::enabled_by_env()
}

pub use types::{
    ConstrainedScores, FinishReason, GenerateOptions, Generation, MAX_ALTERNATIVES, TopLogprobs,
};

/// A generation and, per generated token, its step's most likely tokens.
pub type Scored = (Generation, Vec<TopLogprobs>);

pub struct Engine {
    model: LlamaModel,
    tok: LlmTokenizer,
    eog: Vec<u32>,
    /// Built on first constrained use (the vocabulary trie costs ~0.1 s).
    constraints: std::cell::OnceCell<ConstraintCompiler>,
    /// Prefix caching on (see [`prefix`]); from `FLAG_LLM_PREFIX_CACHE`, default on.
    prefix_on: std::cell::Cell<bool>,
    prefix_log: bool,
    /// The prefix kept across calls.
    prefix_store: std::cell::RefCell<prefix::Store>,
    /// Which heads are kept across calls and reused (see [`PrefixStore`]).
    prefix_store_mode: std::cell::Cell<PrefixStore>,
    prefix_stats: std::cell::Cell<PrefixStats>,
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
    matcher: Option<SequenceMatcher>,
    /// Allowed tokens of the next step (constrained rows only).
    allowed: Vec<bool>,
    constrained: ConstrainedScores,
    error: Option<String>,
    /// Given up by the caller (see [`Engine::generate_ids_cancellable`]).
    cancelled: bool,
}

impl SeqState {
    /// Asks the matcher for the next mask; ends the row when only the end is left or the
    /// grammar failed.
    fn refresh_mask(&mut self) {
        let Some(m) = self.matcher.as_mut() else {
            return;
        };
        match m.mask() {
            Ok(mask) if SequenceMatcher::only_end_allowed(&mask, m.eos()) => {
                self.finish = Some(FinishReason::Stop);
            }
            Ok(mask) => mask_to_bools(&mask, &mut self.allowed),
            Err(e) => self.fail(e),
        }
    }

    fn fail(&mut self, e: String) {
        self.error = Some(e);
        self.finish = Some(FinishReason::Error);
    }
}

impl Engine {
    /// Loads model and tokenizer: on the CPU f32 activations with the weights in the format of
    /// env `FLAG_LLM_WEIGHTS` ([`cpu_weights_by_env`]), on CUDA dense bf16. Honours env
    /// `FLAG_LLM_THREADS`.
    pub fn load(path: impl AsRef<Path>, device: Device) -> Result<Engine> {
        if device.is_cuda() {
            Self::load_as(path, device, Kind::BFloat16, WeightFormat::Dense)
        } else {
            Self::load_as(path, device, Kind::Float, cpu_weights_by_env()?)
        }
    }

    /// Dense weights in `kind` (what training needs).
    pub fn load_with_kind(path: impl AsRef<Path>, device: Device, kind: Kind) -> Result<Engine> {
        Self::load_as(path, device, kind, WeightFormat::Dense)
    }

    pub fn load_as(
        path: impl AsRef<Path>,
        device: Device,
        kind: Kind,
        format: WeightFormat,
    ) -> Result<Engine> {
        if let Ok(v) = std::env::var("FLAG_LLM_THREADS") {
            let n: usize = v.trim().parse().map_err(|_| {
                LlmError::Invalid(format!("FLAG_LLM_THREADS='{v}' is not a thread count"))
            })?;
            set_threads(n);
        }
        let g = GgufFile::open(path)?;
        let tok = LlmTokenizer::from_gguf(&g)?;
        let model = LlamaModel::from_gguf_with(&g, device, kind, format)?;
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
        Ok(Engine {
            model,
            tok,
            eog,
            constraints: std::cell::OnceCell::new(),
            prefix_on: std::cell::Cell::new(prefix::enabled_by_env()),
            prefix_log: prefix::log_by_env(),
            prefix_store: std::cell::RefCell::new(prefix::Store::default()),
            prefix_store_mode: std::cell::Cell::new(
                prefix::store_by_env().map_err(LlmError::Invalid)?,
            ),
            prefix_stats: std::cell::Cell::new(PrefixStats::default()),
        })
    }

    /// Turns prefix caching on or off (the default comes from env `FLAG_LLM_PREFIX_CACHE`);
    /// turning it off also drops the prefix kept across calls.
    pub fn set_prefix_cache(&self, on: bool) {
        self.prefix_on.set(on);
        if !on {
            self.clear_prefix_store();
        }
    }

    /// Sets which heads are kept across calls and reused (see [`PrefixStore`]; the default,
    /// what stages run with, is [`PrefixStore::Exact`]). Changing the mode drops what is kept.
    pub fn set_prefix_store(&self, mode: PrefixStore) {
        if self.prefix_store_mode.replace(mode) != mode {
            self.clear_prefix_store();
        }
    }

    pub fn prefix_cache(&self) -> bool {
        self.prefix_on.get()
    }

    /// Token counts of the prompt prefills since load (or the last reset).
    pub fn prefix_stats(&self) -> PrefixStats {
        self.prefix_stats.get()
    }

    pub fn reset_prefix_stats(&self) {
        self.prefix_stats.set(PrefixStats::default());
    }

    /// Drops the prefix kept across calls (the next call computes its head afresh).
    pub fn clear_prefix_store(&self) {
        self.prefix_store.borrow_mut().clear();
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

    /// The constraint compiler over this model's vocabulary (built once).
    pub fn constraint_compiler(&self) -> Result<&ConstraintCompiler> {
        if let Some(c) = self.constraints.get() {
            return Ok(c);
        }
        let eos = *self
            .eog
            .first()
            .ok_or_else(|| LlmError::Invalid("the model has no end-of-generation token".into()))?;
        let c = ConstraintCompiler::new(&self.tok, self.model.cfg.vocab, eos)?;
        Ok(self.constraints.get_or_init(|| c))
    }

    /// Compiles a constraint against this model's vocabulary.
    pub fn compile(&self, c: &Constraint) -> Result<CompiledConstraint> {
        self.constraint_compiler()?.compile(c)
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
        let out = self.generate_ids_cancellable(prompts, opts, top_n, &|_| false)?;
        Ok(out
            .into_iter()
            .map(|g| g.expect("nothing is cancelled"))
            .collect())
    }

    /// [`generate_ids_with_top`](Self::generate_ids_with_top) where a sequence can be given
    /// up while it is decoded: before every decoding step `cancelled(i)` is asked for each
    /// unfinished prompt `i`, and a `true` drops that row from the batch (its KV-cache row
    /// is freed; the others go on unchanged). A dropped sequence's result is `None`. The
    /// prefill is not interrupted (it is bounded by the context).
    pub fn generate_ids_cancellable(
        &self,
        prompts: &[Vec<u32>],
        opts: &GenerateOptions,
        top_n: usize,
        cancelled: &dyn Fn(usize) -> bool,
    ) -> Result<Vec<Option<Scored>>> {
        validate(opts)?;
        for (i, p) in prompts.iter().enumerate() {
            self.check_ids(p, &format!("prompt {}", i + 1))?;
        }
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        let compiled = opts
            .constraint
            .as_ref()
            .map(|c| self.compile(c))
            .transpose()?;
        let _g = tch::no_grad_guard();
        let n = prompts.len();
        let vocab = self.model.cfg.vocab;
        let (mut cache, mut logits) = self.prefill(prompts, opts.max_tokens)?;
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
                    matcher: compiled.as_ref().map(CompiledConstraint::matcher),
                    allowed: if compiled.is_some() {
                        vec![false; vocab]
                    } else {
                        Vec::new()
                    },
                    constrained: ConstrainedScores::default(),
                    error: None,
                    cancelled: false,
                }
            })
            .collect();
        for st in &mut states {
            st.refresh_mask();
        }
        // Cache row -> sequence index.
        let mut active: Vec<usize> = (0..n).collect();
        let decode_started = std::time::Instant::now();
        let mut steps = 0usize;
        loop {
            let next = if active.iter().all(|&s| states[s].finish.is_some()) {
                // Every row ended before its first token (an empty complete answer or a
                // grammar that failed to start).
                vec![0; active.len()]
            } else {
                self.step(&logits, &active, &mut states, opts, top_n)?
            };
            for &s in &active {
                if states[s].finish.is_none() && cancelled(s) {
                    states[s].cancelled = true;
                    states[s].finish = Some(FinishReason::Length);
                }
            }
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
            steps += 1;
        }
        if self.prefix_log {
            let tokens: usize = states.iter().map(|s| s.ids.len()).sum();
            eprintln!(
                "decode: {n} row(s), {steps} steps, {tokens} tokens, {:.0} ms",
                decode_started.elapsed().as_secs_f64() * 1e3
            );
        }
        states
            .into_iter()
            .zip(prompts)
            .map(|(s, prompt)| {
                if s.cancelled {
                    return Ok(None);
                }
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
                    constrained: s.matcher.is_some().then_some(s.constrained),
                    error: s.error,
                    prompt_tokens: Some(prompt.len()),
                };
                Ok(Some((g, s.top)))
            })
            .collect()
    }

    /// Runs the prompts into a new cache with room for `extra` more positions; returns it and
    /// the next-token logits [B, V] of every row. With prefix caching on, a head the prompts
    /// share (or share with the prefix kept from an earlier call) is run once (see [`prefix`]).
    fn prefill(&self, prompts: &[Vec<u32>], extra: usize) -> Result<(KvCache, Tensor)> {
        let t0 = std::time::Instant::now();
        let n = prompts.len();
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
        let mut stats = self.prefix_stats.get();
        stats.prefills += 1;
        stats.prompt_tokens += prompt_tokens as u64;
        let p = if self.prefix_on.get() {
            prefix::shared_len(prompts)
        } else {
            0
        };
        let mode = self.prefix_store_mode.get();
        let (entry, reuse) = match mode {
            PrefixStore::Off => (0, 0),
            PrefixStore::Any => self.prefix_store.borrow().best(&prompts[0][..p]),
            // A batch runs its head apart from its suffixes anyway, so a kept head of exactly
            // these tokens holds the very bits this call would compute. A single prompt would
            // be prefilled in one pass instead: it never takes a kept head here.
            PrefixStore::Exact if n > 1 => self
                .prefix_store
                .borrow()
                .exact(&prompts[0][..p])
                .map_or((0, 0), |i| (i, p)),
            PrefixStore::Exact => (0, 0),
        };
        // A single prompt takes the prefix path only when a stored head covers at least half
        // of it: the rest then runs under an explicit attention mask (past keys), which costs
        // more than the causal kernel of a plain prefill saves on a short head (measured:
        // strategist prompts of ~1,300 tokens reusing 95 prefilled slower).
        let single_pays = reuse >= prefix::MIN_PREFIX && 2 * reuse >= prompts[0].len();
        if !(p >= prefix::MIN_PREFIX && (n > 1 || single_pays)) {
            // Plain prefill: every prompt in full, left-padded to the longest.
            let mut cache = self.model.new_cache(n, longest + extra)?;
            let (ids, valid) = self.left_pad(prompts);
            let h = self.model.forward_cached(&ids, &valid, &mut cache)?;
            let logits = self.model.logits(&h.select(1, -1));
            stats.computed_tokens += prompt_tokens as u64;
            stats.computed_positions += (n * longest) as u64;
            self.prefix_stats.set(stats);
            if mode == PrefixStore::Any && n == 1 && p >= prefix::MIN_PREFIX {
                // Keep this prompt's head for the next call (a copy of its first p slots).
                self.store_prefix(&prompts[0][..p], &cache, mode)?;
            }
            self.log_prefill(t0, n, prompt_tokens, 0, 0, (prompt_tokens, n * longest));
            return Ok((cache, logits));
        }
        // The head: reuse what the store holds of it, run the rest at batch 1, keep it.
        let head = &prompts[0][..p];
        let cap = longest + extra;
        let mut cache = if reuse < p {
            let mut c = if reuse > 0 {
                let store = self.prefix_store.borrow();
                self.model
                    .new_cache_with_prefix(&store.get(entry).kv, reuse, 1, p)?
            } else {
                self.model.new_cache(1, p)?
            };
            let rest = head.len() - reuse;
            let (ids, valid) = self.left_pad(&[head[reuse..].to_vec()]);
            let _ = self.model.forward_cached(&ids, &valid, &mut c)?;
            stats.computed_tokens += rest as u64;
            stats.computed_positions += rest as u64;
            let cache = self.model.new_cache_with_prefix(&c, p, n, cap)?;
            // Under `Exact`, reuse is 0 or p: what it keeps was computed whole.
            if mode != PrefixStore::Off {
                let stored = prefix::Stored {
                    ids: head.to_vec(),
                    kv: c,
                };
                let bpp = self.model.kv_bytes_per_position();
                self.prefix_store.borrow_mut().insert(stored, bpp, mode);
            }
            cache
        } else {
            let mut store = self.prefix_store.borrow_mut();
            let kept = store.touch(entry);
            self.model.new_cache_with_prefix(&kept.kv, p, n, cap)?
        };
        stats.reused_tokens += reuse as u64;
        // The suffixes, left-padded behind the broadcast head.
        let suffixes: Vec<Vec<u32>> = prompts.iter().map(|r| r[p..].to_vec()).collect();
        let longest_suffix = longest - p;
        let (ids, valid) = self.left_pad(&suffixes);
        let h = self.model.forward_cached(&ids, &valid, &mut cache)?;
        let logits = self.model.logits(&h.select(1, -1));
        let suffix_tokens = prompt_tokens - n * p;
        stats.computed_tokens += suffix_tokens as u64;
        stats.computed_positions += (n * longest_suffix) as u64;
        stats.with_prefix += 1;
        self.prefix_stats.set(stats);
        self.log_prefill(
            t0,
            n,
            prompt_tokens,
            p,
            reuse,
            (
                (p - reuse) + suffix_tokens,
                (p - reuse) + n * longest_suffix,
            ),
        );
        Ok((cache, logits))
    }

    /// Keeps a copy of the first `ids.len()` slots of row 0 of `cache` as a stored head (if
    /// it fits [`prefix::STORE_BYTES`]).
    fn store_prefix(&self, ids: &[u32], cache: &KvCache, mode: PrefixStore) -> Result<()> {
        let bpp = self.model.kv_bytes_per_position();
        if ids.len() * bpp > prefix::STORE_BYTES {
            return Ok(());
        }
        let kv = self
            .model
            .new_cache_with_prefix(cache, ids.len(), 1, ids.len())?;
        let stored = prefix::Stored {
            ids: ids.to_vec(),
            kv,
        };
        self.prefix_store.borrow_mut().insert(stored, bpp, mode);
        Ok(())
    }

    /// One stderr line per prefill with `FLAG_LLM_PREFIX_LOG=1` (the time is wall time up to
    /// the logits; on CUDA kernels may still be running).
    fn log_prefill(
        &self,
        t0: std::time::Instant,
        rows: usize,
        tokens: usize,
        shared: usize,
        reused: usize,
        (run, positions): (usize, usize),
    ) {
        if self.prefix_log {
            eprintln!(
                "prefill: {rows} prompt(s), {tokens} tokens, shared head {shared} (reused {reused}), \
                 {run} tokens run in {positions} positions (padding included), {:.0} ms",
                t0.elapsed().as_secs_f64() * 1e3
            );
        }
    }

    /// Picks the next token of every active row from `logits` [A, V], records its scores and
    /// whether the row finished. Returns the chosen ids (by cache row). Rows that are already
    /// finished (possible only before the first step) are left untouched.
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
        let allowed = self.allowed_tensor(active, states, vocab, logits.device());
        let pick_from = match &allowed {
            Some(a) => restrict(logits, a),
            None => logits.shallow_clone(),
        };
        let next = {
            let mut by_state: Vec<Option<&mut ChaCha8Rng>> =
                states.iter_mut().map(|s| Some(&mut s.rng)).collect();
            let mut rngs: Vec<&mut ChaCha8Rng> = active
                .iter()
                .map(|&s| by_state[s].take().expect("active rows are distinct"))
                .collect();
            choose_tokens(&pick_from, opts.temperature, opts.top_p, &mut rngs)?
        };
        let idx = Tensor::from_slice(&next)
            .to_device(lp.device())
            .unsqueeze(1);
        let chosen = gather_cpu(&lp, &idx)?;
        let entropies = step_entropies(&lp, None, opts.top_k_entropy)?;
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
        if let Some(allowed) = &allowed {
            let clp = pick_from.log_softmax(-1, Kind::Float);
            let c_chosen = gather_cpu(&clp, &idx)?;
            let c_entropies = step_entropies(&clp, Some(allowed), opts.top_k_entropy)?;
            for (r, &s) in active.iter().enumerate() {
                let st = &mut states[s];
                if st.finish.is_some() {
                    continue;
                }
                let ids: Vec<u32> = (0..st.allowed.len() as u32)
                    .filter(|&i| st.allowed[i as usize])
                    .collect();
                let alternatives = if ids.len() <= MAX_ALTERNATIVES {
                    let sel: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
                    let sel = Tensor::from_slice(&sel).to_device(clp.device());
                    let vals = Vec::<f32>::try_from(
                        &clp.get(r as i64)
                            .index_select(0, &sel)
                            .to_device(Device::Cpu),
                    )?;
                    let mut alt: Vec<(u32, f32)> = ids.iter().copied().zip(vals).collect();
                    alt.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                    alt
                } else {
                    Vec::new()
                };
                let c = &mut st.constrained;
                c.logprobs.push(c_chosen[r]);
                c.entropies.push(c_entropies[r]);
                c.allowed.push(ids.len() as u32);
                c.alternatives.push(alternatives);
            }
        }
        for (r, &s) in active.iter().enumerate() {
            let st = &mut states[s];
            if st.finish.is_some() {
                continue;
            }
            let id = next[r] as u32;
            st.ids.push(id);
            st.logprobs.push(chosen[r]);
            st.entropies.push(entropies[r]);
            if self.eog.contains(&id) {
                st.finish = Some(FinishReason::Eos);
            } else if let Some(m) = st.matcher.as_mut() {
                match m.advance(id) {
                    Ok(crate::constrain::MatchState::Complete) => {
                        st.finish = Some(FinishReason::Stop)
                    }
                    Ok(crate::constrain::MatchState::Open) => st.refresh_mask(),
                    Err(e) => st.fail(e),
                }
            }
            if st.finish.is_none() && (!opts.stop.is_empty() || opts.json_prefill.is_some()) {
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

    /// The allowed-token mask of the active rows as a [A, V] bool tensor (None when
    /// unconstrained). Finished rows allow everything so their softmax stays finite.
    fn allowed_tensor(
        &self,
        active: &[usize],
        states: &[SeqState],
        vocab: i64,
        device: Device,
    ) -> Option<Tensor> {
        if active.iter().all(|&s| states[s].matcher.is_none()) {
            return None;
        }
        let v = vocab as usize;
        let mut bools = Vec::with_capacity(active.len() * v);
        for &s in active {
            let st = &states[s];
            if st.finish.is_some() || st.allowed.len() != v {
                bools.extend(std::iter::repeat_n(true, v));
            } else {
                bools.extend_from_slice(&st.allowed);
            }
        }
        Some(
            Tensor::from_slice(&bools)
                .view([active.len() as i64, vocab])
                .to_device(device),
        )
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
