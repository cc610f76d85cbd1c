//! From a validated strategy and its token scores to the signal the RL agent reads.
//!
//! Which token counts: the *decision token*, the generated token holding the first character
//! of the direction value, where the model chooses LONG or SHORT; the tokens after it only
//! complete the chosen word and are near-certain, so averaging them in would hide the
//! model's doubt.
//!
//! Constrained answers (the embedded engine enforcing the prompt's schema; or an HTTP backend
//! that was sent the schema, whose allowed alternatives are those of the server's
//! `top_logprobs` the schema admits, see `flag_llm::backend::openai`): at the decision
//! step the grammar allows only tokens that continue towards LONG or SHORT (e.g. `L`, `LONG`,
//! `SH`, or `"S` when the quote is still open). With p_t the model's probability of allowed
//! token t renormalised over the allowed set, each token whose text reaches the value decides
//! a word: P(LONG) = sum of p_t over tokens whose character at the value's position is `L`,
//! P(SHORT) likewise for `S` (tokens that stop before the value decide nothing and are left
//! out), then renormalised: q = P(LONG) / (P(LONG) + P(SHORT)). H is the binary entropy of q
//! in bits, `H = -(q log2 q + (1 - q) log2 (1 - q))`, in [0, 1]: 0 when the model is sure,
//! 1 at a coin flip.
//!
//! Free answers (`constrain: false`, a prefilled prompt): H is the normalised top-k entropy
//! (flag-llm's per-token value) of the decision token. If the value cannot be located among
//! the generated tokens (it lies in the prefill or the text was altered), H is the mean over
//! the whole answer.
//!
//! certainty = eps + (1 - eps)(1 - H), eps = 1e-4; strength = sqrt((confidence / 3) certainty);
//! interaction = direction (+1 / -1) * strength. A failed answer gives direction 0, strength 0.
use flag_core::StageResult;
use flag_llm::generate::Generation;

use crate::parse::Strategy;
use flag_llm::backend::LlmBackend;

pub const EPS: f64 = 1e-4;

/// certainty = eps + (1 - eps)(1 - H), H clamped to [0, 1] (NaN counts as H = 1).
pub fn certainty(entropy: f64) -> f64 {
    let h = if entropy.is_nan() {
        1.0
    } else {
        entropy.clamp(0.0, 1.0)
    };
    EPS + (1.0 - EPS) * (1.0 - h)
}

/// strength = sqrt((confidence / 3) * certainty).
pub fn strength(confidence: u8, certainty: f64) -> f64 {
    ((f64::from(confidence) / 3.0) * certainty).sqrt()
}

/// The numbers recorded per strategy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SignalValues {
    /// +1 LONG, -1 SHORT, 0 failed.
    pub direction: f64,
    pub certainty: Option<f64>,
    pub strength: f64,
    pub interaction: f64,
    pub entropy: f64,
    pub perplexity: f64,
}

impl SignalValues {
    /// The neutral signal of a failed answer (scores of its last attempt kept).
    pub fn neutral(g: &Generation) -> Self {
        SignalValues {
            direction: 0.0,
            certainty: None,
            strength: 0.0,
            interaction: 0.0,
            entropy: g.entropy,
            perplexity: g.perplexity,
        }
    }

    pub fn from_entropy(s: &Strategy, entropy: f64, perplexity: f64) -> Self {
        let c = certainty(entropy);
        let st = strength(s.confidence, c);
        SignalValues {
            direction: s.direction.sign(),
            certainty: Some(c),
            strength: st,
            interaction: s.direction.sign() * st,
            entropy,
            perplexity,
        }
    }
}

/// Index of the generated token holding byte `offset` of the generated text, found by
/// decoding growing prefixes of `ids` (answers are short, so this quadratic walk is cheap).
pub fn token_at(
    backend: &dyn LlmBackend,
    ids: &[u32],
    offset: usize,
) -> StageResult<Option<usize>> {
    for i in 0..ids.len() {
        if backend.decode(&ids[..=i])?.len() > offset {
            return Ok(Some(i));
        }
    }
    Ok(None)
}

/// Signal of a validated strategy whose answer was `prefill + g.text`.
pub fn strategy_signal(
    backend: &dyn LlmBackend,
    s: &Strategy,
    prefill_len: usize,
    g: &Generation,
) -> StageResult<SignalValues> {
    let offset = s.direction_offset.checked_sub(prefill_len);
    let token = match offset {
        Some(off) => token_at(backend, &g.ids, off)?,
        None => None,
    };
    let alternatives = match (token, g.constrained.as_ref()) {
        (Some(t), Some(c)) => c.alternatives.get(t).filter(|a| !a.is_empty()),
        _ => None,
    };
    if let (Some(t), Some(off), Some(alts)) = (token, offset, alternatives) {
        let step_start = backend.decode(&g.ids[..t])?.len();
        if let Some(q) = long_probability(backend, alts, off - step_start.min(off))? {
            return Ok(SignalValues::from_entropy(
                s,
                binary_entropy(q),
                g.perplexity,
            ));
        }
    }
    let h = token
        .and_then(|t| g.entropies.get(t))
        .map_or(g.entropy, |&e| f64::from(e));
    Ok(SignalValues::from_entropy(s, h, g.perplexity))
}

/// q = P(LONG) / (P(LONG) + P(SHORT)) from the allowed alternatives of the decision step
/// (token, renormalised ln p), where the value starts `at` bytes into the step's text. None
/// when no alternative reaches the value.
pub fn long_probability(
    backend: &dyn LlmBackend,
    alternatives: &[(u32, f32)],
    at: usize,
) -> StageResult<Option<f64>> {
    let (mut long, mut short) = (0.0f64, 0.0f64);
    for &(id, lp) in alternatives {
        let text = backend.decode(&[id])?;
        match text.as_bytes().get(at) {
            Some(b'L') => long += f64::from(lp).exp(),
            Some(b'S') => short += f64::from(lp).exp(),
            _ => {}
        }
    }
    let total = long + short;
    Ok((total > 0.0).then(|| long / total))
}

/// Binary entropy of q in bits, in [0, 1] (0 log 0 = 0).
pub fn binary_entropy(q: f64) -> f64 {
    let term = |p: f64| if p > 0.0 { -p * p.log2() } else { 0.0 };
    let q = q.clamp(0.0, 1.0);
    (term(q) + term(1.0 - q)).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::Direction;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    fn strat(direction: Direction, confidence: u8) -> Strategy {
        Strategy {
            direction,
            confidence,
            explanation: "x".into(),
            features: vec![("rsi".into(), 1.0)],
            direction_offset: 0,
        }
    }

    #[test]
    fn hand_computed_values() {
        // H = 0: certainty 1, strength sqrt(c / 3).
        assert_eq!(certainty(0.0), 1.0);
        assert!(close(strength(3, 1.0), 1.0));
        assert!(close(strength(1, 1.0), (1.0f64 / 3.0).sqrt()));
        // H = 1: certainty = eps, strength = sqrt(2/3 * 1e-4) = 0.00816496580927726.
        assert!(close(certainty(1.0), 1e-4));
        assert!(close(strength(2, certainty(1.0)), 0.008_164_965_809_277_26));
        // H = 0.25: certainty = 1e-4 + 0.9999 * 0.75 = 0.750025;
        // strength(2) = sqrt(0.750025 * 2 / 3) = sqrt(0.50001666...) = 0.70711856...
        assert!(close(certainty(0.25), 0.750025));
        let v = SignalValues::from_entropy(&strat(Direction::Short, 2), 0.25, 3.5);
        assert!(close(v.strength, (0.750025f64 * 2.0 / 3.0).sqrt()));
        assert!((v.strength - 0.707_118_56).abs() < 1e-8);
        assert!(close(v.interaction, -v.strength));
        assert_eq!((v.direction, v.entropy, v.perplexity), (-1.0, 0.25, 3.5));
        // Out-of-range entropies are clamped, never produce NaN or values above 1.
        assert_eq!(certainty(-0.5), 1.0);
        assert!(close(certainty(7.0), EPS));
        assert!(close(certainty(f64::NAN), EPS));
    }

    /// Token i decodes to `self.0[i]`; a generated text is the concatenation.
    struct Table(&'static [&'static str]);
    impl LlmBackend for Table {
        fn name(&self) -> String {
            "table".into()
        }
        fn generate(
            &self,
            _: &[flag_llm::backend::LlmRequest],
            _: &flag_llm::generate::GenerateOptions,
        ) -> StageResult<Vec<Generation>> {
            Ok(Vec::new())
        }
        fn decode(&self, ids: &[u32]) -> StageResult<String> {
            Ok(ids.iter().map(|&i| self.0[i as usize]).collect())
        }
    }

    const TOKENS: [&str; 5] = ["SH", "ORT", "\",", " \"confidence\": ", "2"];
    const FAKE: Table = Table(&TOKENS);

    #[test]
    fn decision_token_entropy_is_used() {
        let g = Generation {
            text: TOKENS.concat(),
            ids: vec![0, 1, 2, 3, 4],
            logprobs: vec![-0.1; 5],
            entropies: vec![0.4, 0.01, 0.0, 0.0, 0.3],
            entropy: 0.142,
            perplexity: 1.1,
            finish_reason: flag_llm::generate::FinishReason::Length,
            constrained: None,
            error: None,
            prompt_tokens: None,
        };
        assert_eq!(token_at(&FAKE, &g.ids, 0).unwrap(), Some(0));
        assert_eq!(token_at(&FAKE, &g.ids, 2).unwrap(), Some(1));
        assert_eq!(token_at(&FAKE, &g.ids, 99).unwrap(), None);
        // Prefill `{"direction": "` is 15 bytes; the value starts right after it.
        let mut s = strat(Direction::Short, 3);
        s.direction_offset = 15;
        let v = strategy_signal(&FAKE, &s, 15, &g).unwrap();
        assert_eq!(v.entropy, f64::from(0.4f32));
        assert!(close(
            v.interaction,
            -((certainty(f64::from(0.4f32))).sqrt())
        ));
        // A value inside the prefill cannot be located: the answer mean is used.
        s.direction_offset = 3;
        assert_eq!(strategy_signal(&FAKE, &s, 15, &g).unwrap().entropy, 0.142);
    }

    /// Decision-step alternatives: LONG-ish tokens 0.5 + 0.2, SHORT-ish 0.2, a quote that
    /// stops before the value 0.1 (left out).
    const ALT_TOKENS: [&str; 5] = ["\"L", "\"LONG", "\"SH", "\"", "ORT"];
    const ALTS: Table = Table(&ALT_TOKENS);

    #[test]
    fn constrained_decision_uses_long_vs_short_renormalised() {
        let ln = |p: f64| p.ln() as f32;
        let alts = vec![(0, ln(0.5)), (1, ln(0.2)), (2, ln(0.2)), (3, ln(0.1))];
        // The value starts one byte into the step's text (after the quote).
        let q = long_probability(&ALTS, &alts, 1).unwrap().unwrap();
        assert!((q - 0.7 / 0.9).abs() < 1e-6, "{q}");
        // H(7/9) = 0.76420450650862... bits (hand-computed).
        assert!((binary_entropy(q) - 0.764_204_506_5).abs() < 1e-6);
        assert_eq!(binary_entropy(1.0), 0.0);
        assert_eq!(binary_entropy(0.5), 1.0);
        assert_eq!(long_probability(&ALTS, &[(3, 0.0)], 1).unwrap(), None);

        // Through strategy_signal: answer `"SH` + `ORT` ..., decision token 0 is "SH.
        let g = Generation {
            text: "\"SHORT".into(),
            ids: vec![2, 4],
            logprobs: vec![-1.6, -0.01],
            entropies: vec![0.9, 0.0],
            entropy: 0.45,
            perplexity: 2.2,
            finish_reason: flag_llm::generate::FinishReason::Stop,
            constrained: Some(flag_llm::generate::ConstrainedScores {
                logprobs: vec![ln(0.2), 0.0],
                entropies: vec![0.8, 0.0],
                allowed: vec![4, 1],
                alternatives: vec![alts.clone(), vec![(4, 0.0)]],
            }),
            error: None,
            prompt_tokens: None,
        };
        let mut s = strat(Direction::Short, 3);
        s.direction_offset = 1;
        let v = strategy_signal(&ALTS, &s, 0, &g).unwrap();
        // The alternatives are f32 logprobs: agreement to f32 precision.
        assert!((v.entropy - binary_entropy(0.7 / 0.9)).abs() < 1e-6);
        assert!((v.interaction + (certainty(v.entropy)).sqrt()).abs() < 1e-12);
        // Without alternatives at that step the decision token's top-k entropy is used.
        let mut bare = g.clone();
        bare.constrained.as_mut().unwrap().alternatives[0].clear();
        assert_eq!(
            strategy_signal(&ALTS, &s, 0, &bare).unwrap().entropy,
            f64::from(0.9f32)
        );
    }

    #[test]
    fn neutral_signal_is_zero() {
        let g = Generation {
            text: "oops".into(),
            ids: vec![1, 2],
            logprobs: vec![-0.5, -1.5],
            entropies: vec![0.2, 0.4],
            entropy: 0.3,
            perplexity: 2.5,
            finish_reason: flag_llm::generate::FinishReason::Length,
            constrained: None,
            error: None,
            prompt_tokens: None,
        };
        let v = SignalValues::neutral(&g);
        assert_eq!(
            (v.direction, v.strength, v.interaction, v.certainty),
            (0.0, 0.0, 0.0, None)
        );
        assert_eq!((v.entropy, v.perplexity), (0.3, 2.5));
    }
}
