//! The generate-parse-retry loop shared by the LLM stages. A malformed answer is retried with
//! the rejection reason appended to the prompt (and seed + k, which only matters when
//! sampling), at most `retries` times; then it is a recorded failure, never a guess.
use std::collections::BTreeMap;

use flag_core::{StageError, StageResult};
use flag_llm::generate::Generation;

use crate::parse::ParseError;
use crate::prompt::render;
use flag_llm::backend::{LlmBackend, LlmRequest, LlmSettings};

/// The result of one request after its attempts.
#[derive(Debug, Clone)]
pub struct Outcome<T> {
    /// The validated value; None when every attempt failed.
    pub value: Option<T>,
    pub attempts: usize,
    /// The last rejection reason (None when valid).
    pub error: Option<String>,
    /// Scores of the last attempt.
    pub generation: Generation,
    /// The last answer when valid, else every attempt's answer.
    pub raw_text: String,
    /// What the request cost over all its attempts.
    pub usage: CallUsage,
}

/// What one request cost, summed over its attempts. A measurement: the time is wall-clock.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CallUsage {
    /// Prompt tokens fed (chat template and answer prefill included); None when the backend
    /// cannot count them without generating (the HTTP backend).
    pub prompt_tokens: Option<u64>,
    /// Tokens generated.
    pub completion_tokens: u64,
    /// Wall time of the batches the request was in, each split evenly over its requests (a
    /// batch runs until its longest answer ends, so each request shares its whole cost).
    pub ms: f64,
}

/// Runs `requests` as one batch, then re-batches the malformed ones.
pub fn run_with_retries<T>(
    backend: &dyn LlmBackend,
    settings: &LlmSettings,
    retry_template: (&str, &str),
    requests: &[LlmRequest],
    parse: impl Fn(&str) -> Result<T, ParseError>,
) -> StageResult<Vec<Outcome<T>>> {
    let mut out: Vec<Option<Outcome<T>>> = (0..requests.len()).map(|_| None).collect();
    let mut history: Vec<Vec<String>> = vec![Vec::new(); requests.len()];
    let mut errors: Vec<Option<String>> = vec![None; requests.len()];
    let mut usage = vec![CallUsage::default(); requests.len()];
    let mut pending: Vec<usize> = (0..requests.len()).collect();
    for attempt in 0..=settings.retries {
        if pending.is_empty() {
            break;
        }
        let batch = pending
            .iter()
            .map(|&i| {
                let mut r = requests[i].clone();
                if let Some(e) = &errors[i] {
                    let vars: BTreeMap<&str, String> = [("error", e.clone())].into_iter().collect();
                    r.user = format!(
                        "{}\n\n{}",
                        r.user,
                        render(retry_template.1, retry_template.0, &vars)?.trim_end()
                    );
                }
                Ok(r)
            })
            .collect::<StageResult<Vec<_>>>()?;
        let mut opts = settings.opts.clone();
        opts.seed = opts.seed.wrapping_add(attempt as u64);
        let started = std::time::Instant::now();
        let gens = backend.generate(&batch, &opts)?;
        let share_ms = started.elapsed().as_secs_f64() * 1e3 / batch.len().max(1) as f64;
        if gens.len() != batch.len() {
            return Err(StageError::Invalid(format!(
                "backend {} returned {} generations for {} prompts",
                backend.name(),
                gens.len(),
                batch.len()
            )));
        }
        let mut still = Vec::new();
        for ((&i, g), r) in pending.iter().zip(gens).zip(&batch) {
            let u = &mut usage[i];
            u.prompt_tokens = match (attempt, u.prompt_tokens, g.prompt_tokens) {
                (0, _, Some(n)) => Some(n as u64),
                (_, Some(sum), Some(n)) => Some(sum + n as u64),
                _ => None,
            };
            u.completion_tokens += g.ids.len() as u64;
            u.ms += share_ms;
            let answer = format!("{}{}", r.prefill, g.text);
            history[i].push(answer.clone());
            // A generation the backend flagged (the answer left its schema) is rejected with
            // that reason, even if the parser would accept its text.
            let verdict = match &g.error {
                Some(e) => Err(format!("the answer does not match its schema: {e}")),
                None => parse(&answer).map_err(|e| e.to_string()),
            };
            match verdict {
                Ok(v) => {
                    out[i] = Some(Outcome {
                        value: Some(v),
                        attempts: attempt + 1,
                        error: None,
                        generation: g,
                        raw_text: answer,
                        usage: usage[i],
                    })
                }
                Err(e) => {
                    errors[i] = Some(e);
                    if attempt == settings.retries {
                        let raw = history[i]
                            .iter()
                            .enumerate()
                            .map(|(k, a)| format!("--- attempt {} ---\n{a}", k + 1))
                            .collect::<Vec<_>>()
                            .join("\n");
                        out[i] = Some(Outcome {
                            value: None,
                            attempts: attempt + 1,
                            error: errors[i].clone(),
                            generation: g,
                            raw_text: raw,
                            usage: usage[i],
                        });
                    } else {
                        still.push(i);
                    }
                }
            }
        }
        pending = still;
    }
    // Every request ends valid or failed on the last attempt; a gap would be a bug above.
    out.into_iter()
        .map(|o| {
            o.ok_or_else(|| StageError::Invalid("a request was left without an outcome".into()))
        })
        .collect()
}
