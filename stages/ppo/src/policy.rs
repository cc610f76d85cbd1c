//! The LLM actor-critic: SmolLM2 split at the freeze line ([`TrainablePolicy`]) plus its
//! tokenizer. A prompt is the chat template around the user message, then the answer prefix
//! (`{"Action": "`); the policy head reads the hidden state of its last token.

use std::path::Path;
use std::sync::Mutex;

use flag_llm::generate::Engine;
use flag_llm::tokenizer::{ChatMessage, LlmTokenizer};
use flag_llm::trainable::{FrozenHidden, FrozenPrefix, HeadInit, PolicyShape, TrainablePolicy};
use tch::{Device, Kind, Tensor, nn};

use crate::env::ACTION_NAMES;
use crate::prompt::PromptText;

/// How the policy head starts (param `head_init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadStart {
    /// From the output-embedding rows of the action words' first tokens after the answer
    /// prefix ("S"ell, "Hold", "Buy" for SmolLM2): the model's own preference.
    ActionWords,
    /// As `ActionWords`, plus a bias per action: the log-probability the model gives the rest
    /// of that action's answer after its first token (`ell"}` after `S`, `"}` after `Hold`),
    /// scored on a calibration prompt (the stage uses the first training prompt). On that
    /// prompt the starting policy is exactly the softmax of the whole answers' log-probs
    /// (`Sell"}`, `Hold"}`, `Buy"}`); on other prompts the bias is the calibration prompt's.
    ActionScores,
    /// Small random weights.
    Random,
}

impl HeadStart {
    pub fn parse(s: &str) -> Option<HeadStart> {
        match s {
            "action_words" => Some(HeadStart::ActionWords),
            "action_scores" => Some(HeadStart::ActionScores),
            "random" => Some(HeadStart::Random),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            HeadStart::ActionWords => "action_words",
            HeadStart::ActionScores => "action_scores",
            HeadStart::Random => "random",
        }
    }
}

/// The policy's shape and start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyConfig {
    pub trainable_blocks: usize,
    pub value_hidden: usize,
    pub head_start: HeadStart,
    /// Prompts longer than this (in tokens) are an error, never silently cut.
    pub max_prompt_tokens: usize,
    /// Seeds the random initial weights (value MLP; a random policy head).
    pub init_seed: u64,
}

pub struct LlmPolicy {
    pub net: TrainablePolicy,
    tok: LlmTokenizer,
    cfg: PolicyConfig,
    action_tokens: Vec<u32>,
    /// Prompt heads' frozen passes, most recently used last (at most [`HEADS_KEPT`]).
    heads: Mutex<Vec<FrozenPrefix>>,
}

/// Prompt heads kept: a run has one per ticker and set of legible actions (2 or 3); each
/// holds ~10 MB of keys and values on the CPU.
const HEADS_KEPT: usize = 4;
/// A shorter shared head is run with its prompt.
const MIN_HEAD_TOKENS: usize = 16;

/// The first token of each action word as it follows `answer_prefix`.
pub fn action_tokens(tok: &LlmTokenizer, answer_prefix: &str) -> Result<Vec<u32>, String> {
    let base = tok
        .encode(answer_prefix, false)
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for word in ACTION_NAMES {
        let ids = tok
            .encode(&format!("{answer_prefix}{word}"), false)
            .map_err(|e| e.to_string())?;
        if !ids.starts_with(&base) || ids.len() == base.len() {
            return Err(format!(
                "the answer prefix '{answer_prefix}' does not tokenise as a prefix of '{answer_prefix}{word}'"
            ));
        }
        out.push(ids[base.len()]);
    }
    let mut uniq = out.clone();
    uniq.sort_unstable();
    uniq.dedup();
    if uniq.len() != out.len() {
        return Err(format!(
            "the action words {ACTION_NAMES:?} start with the same token after the answer prefix"
        ));
    }
    Ok(out)
}

/// The closing of an answer after the action word (`{"Action": "Hold"}`).
pub const ANSWER_CLOSE: &str = "\"}";

/// Per action, ln p(the answer's tokens after the action's first token | the prompt and that
/// token): what `ActionScores` adds to the first token's logit so the head scores the whole
/// answer on the calibration prompt.
fn rest_of_answer_logprobs(
    engine: &Engine,
    tok: &LlmTokenizer,
    p: &PromptText,
    first: &[u32],
) -> Result<Vec<f64>, String> {
    let text = tok
        .apply_chat_template(&[ChatMessage::user(p.user.as_str())], true)
        .map_err(|e| e.to_string())?;
    let prompt = tok
        .encode(&format!("{text}{}", p.answer_prefix), true)
        .map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(ACTION_NAMES.len());
    for (word, &first_id) in ACTION_NAMES.iter().zip(first) {
        let whole = tok
            .encode(
                &format!("{text}{}{word}{ANSWER_CLOSE}", p.answer_prefix),
                true,
            )
            .map_err(|e| e.to_string())?;
        if !whole.starts_with(&prompt) || whole.get(prompt.len()) != Some(&first_id) {
            return Err(format!(
                "the answer '{}{word}{ANSWER_CLOSE}' does not tokenise as the prompt, then the \
                 action word's first token",
                p.answer_prefix
            ));
        }
        let mut sum = 0.0f64;
        for k in prompt.len() + 1..whole.len() {
            let logits = engine
                .next_token_logits_ids(&whole[..k])
                .map_err(|e| e.to_string())?;
            sum += log_softmax_at(&logits, whole[k] as usize);
        }
        out.push(sum);
    }
    Ok(out)
}

/// ln softmax(logits)[i], accumulated in f64.
fn log_softmax_at(logits: &[f32], i: usize) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let z: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    logits[i] as f64 - max - z.ln()
}

impl LlmPolicy {
    /// Loads the GGUF (f32 on CPU, bf16 compute on CUDA with f32 trainable masters) and
    /// builds the actor-critic in `vs` (which must be empty: its variables are exactly the
    /// trainable tensors).
    pub fn load(
        gguf: &Path,
        cfg: PolicyConfig,
        answer_prefix: &str,
        vs: &nn::Path,
    ) -> Result<Self, String> {
        Self::load_calibrated(gguf, cfg, answer_prefix, vs, None)
    }

    /// [`LlmPolicy::load`] with the calibration prompt that `head_start: ActionScores` needs
    /// (ignored by the other starts).
    pub fn load_calibrated(
        gguf: &Path,
        cfg: PolicyConfig,
        answer_prefix: &str,
        vs: &nn::Path,
        calibration: Option<&PromptText>,
    ) -> Result<Self, String> {
        let device = vs.device();
        let kind = if device.is_cuda() {
            Kind::BFloat16
        } else {
            Kind::Float
        };
        let engine = Engine::load_with_kind(gguf, device, kind).map_err(|e| e.to_string())?;
        let tok = engine.tokenizer().clone();
        let action_tokens = action_tokens(&tok, answer_prefix)?;
        let shape = PolicyShape {
            trainable_blocks: cfg.trainable_blocks,
            n_actions: ACTION_NAMES.len(),
            value_hidden: cfg.value_hidden,
            head_init: match cfg.head_start {
                HeadStart::ActionWords => HeadInit::TokenRows(action_tokens.clone()),
                HeadStart::ActionScores => {
                    let p = calibration.ok_or(
                        "head_init action_scores needs a calibration prompt (the first training \
                         prompt)",
                    )?;
                    let bias = rest_of_answer_logprobs(&engine, &tok, p, &action_tokens)?;
                    HeadInit::TokenRowsWithBias(action_tokens.clone(), bias)
                }
                HeadStart::Random => HeadInit::Random,
            },
            seed: cfg.init_seed,
        };
        let net = TrainablePolicy::new(engine, &shape, vs).map_err(|e| e.to_string())?;
        Ok(LlmPolicy {
            net,
            tok,
            cfg,
            action_tokens,
            heads: Mutex::new(Vec::new()),
        })
    }

    pub fn config(&self) -> PolicyConfig {
        self.cfg
    }

    pub fn device(&self) -> Device {
        self.net.device()
    }

    /// The action words' token ids the head was (or would be) initialised from.
    pub fn action_token_ids(&self) -> &[u32] {
        &self.action_tokens
    }

    /// Token ids of a prompt: chat template around the user message, then the answer prefix.
    pub fn encode(&self, p: &PromptText) -> Result<Vec<i64>, String> {
        let text = self.chat_text(p)?;
        self.prompt_ids(&text, p)
    }

    /// [`LlmPolicy::encode`] and how many leading tokens are the prompt's head
    /// ([`PromptText::head`]): those the head's own tokens share with the whole prompt.
    pub fn encode_with_head(&self, p: &PromptText) -> Result<(Vec<i64>, usize), String> {
        let text = self.chat_text(p)?;
        let ids = self.prompt_ids(&text, p)?;
        if p.head == 0 || !p.user.is_char_boundary(p.head) {
            return Ok((ids, 0));
        }
        let Some(at) = text.find(p.user.as_str()) else {
            return Ok((ids, 0));
        };
        let head = self
            .tok
            .encode(&text[..at + p.head], true)
            .map_err(|e| e.to_string())?;
        let shared = ids
            .iter()
            .zip(&head)
            .take_while(|&(a, &b)| *a == i64::from(b))
            .count();
        Ok((ids, shared))
    }

    /// The chat template around the user message.
    fn chat_text(&self, p: &PromptText) -> Result<String, String> {
        self.tok
            .apply_chat_template(&[ChatMessage::user(p.user.as_str())], true)
            .map_err(|e| e.to_string())
    }

    /// Token ids of `text` (the templated message) and the answer prefix, within
    /// `max_prompt_tokens`.
    fn prompt_ids(&self, text: &str, p: &PromptText) -> Result<Vec<i64>, String> {
        let ids = self
            .tok
            .encode(&format!("{text}{}", p.answer_prefix), true)
            .map_err(|e| e.to_string())?;
        if ids.len() > self.cfg.max_prompt_tokens {
            return Err(format!(
                "the prompt is {} tokens, more than max_prompt_tokens {} (shorten window/history \
                 or raise the limit)",
                ids.len(),
                self.cfg.max_prompt_tokens
            ));
        }
        Ok(ids.into_iter().map(i64::from).collect())
    }

    /// [`LlmPolicy::frozen`] of a prompt whose first `head` tokens are a head other prompts
    /// share: the head's pass is kept and only the rest runs (the outputs differ from a
    /// whole-prompt pass by rounding, and do not depend on which prompt ran the head first).
    pub fn frozen_with_head(&self, ids: &[i64], head: usize) -> Result<FrozenHidden, String> {
        let head = head.min(ids.len().saturating_sub(1));
        if head < MIN_HEAD_TOKENS {
            return self.frozen(ids);
        }
        let mut heads = self
            .heads
            .lock()
            .map_err(|_| "the prompt head cache was poisoned".to_string())?;
        match heads.iter().position(|h| h.ids() == &ids[..head]) {
            Some(i) => {
                let h = heads.remove(i);
                heads.push(h);
            }
            None => {
                let h = self
                    .net
                    .frozen_prefix(&ids[..head])
                    .map_err(|e| e.to_string())?;
                if heads.len() == HEADS_KEPT {
                    heads.remove(0);
                }
                heads.push(h);
            }
        }
        let h = heads.last().expect("pushed above");
        self.net
            .frozen_forward_after(h, &ids[head..])
            .map_err(|e| e.to_string())
    }

    /// Prompt heads held now (for tests and logs).
    pub fn heads_kept(&self) -> usize {
        self.heads.lock().map_or(0, |h| h.len())
    }

    /// The frozen bottom's output for one prompt ([1, T, D]).
    pub fn frozen(&self, ids: &[i64]) -> Result<FrozenHidden, String> {
        let n = ids.len() as i64;
        let t = Tensor::from_slice(ids).view([1, n]);
        let mask = Tensor::ones([1, n], (Kind::Int64, Device::Cpu));
        self.net
            .frozen_forward(&t, &mask)
            .map_err(|e| e.to_string())
    }
}
