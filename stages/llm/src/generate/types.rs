//! What generation takes and gives: options, finish reasons, scored generations.
use crate::constrain::Constraint;

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
    /// The form every answer must take; None = free text.
    pub constraint: Option<Constraint>,
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
            constraint: None,
        }
    }
}

/// Steps with at most this many allowed tokens record them all in
/// [`ConstrainedScores::alternatives`].
pub const MAX_ALTERNATIVES: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-generation token (EOS, `<|im_end|>`, `<|endoftext|>`).
    Eos,
    /// A stop string appeared in the text.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The constraint rejected the sequence (see [`Generation::error`]).
    Error,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Error => "error",
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
    /// Scores under the constraint (None for free generation).
    pub constrained: Option<ConstrainedScores>,
    /// Why the constraint ended this sequence early (finish reason `error`).
    pub error: Option<String>,
    /// Prompt tokens fed (chat template and prefill included); None when the backend did not
    /// count them (the HTTP backend).
    pub prompt_tokens: Option<usize>,
}

/// Per generated token, the scores of the distribution restricted to the allowed tokens and
/// renormalised: ln p of the chosen token (0 when it was forced) and the top-k entropy.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ConstrainedScores {
    pub logprobs: Vec<f32>,
    pub entropies: Vec<f32>,
    /// How many tokens the grammar allowed at each step.
    pub allowed: Vec<u32>,
    /// Every allowed token with its restricted ln p, most likely first, at steps with at most
    /// [`MAX_ALTERNATIVES`] allowed tokens; empty at other steps.
    pub alternatives: Vec<Vec<(u32, f32)>>,
}

/// The `n` most likely tokens of one generation step as (token id, ln p), most likely first
/// (what an OpenAI-style `top_logprobs` reports).
pub type TopLogprobs = Vec<(u32, f32)>;
