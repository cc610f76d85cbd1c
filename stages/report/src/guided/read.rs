//! Readers of the LLM-guided report's extra inputs: RL training curves and strategist
//! signals, with errors naming the file, row and column.
use std::collections::BTreeMap;

use flag_core::{StageContext, StageError, StageResult};

use crate::data::{Cols, read_all};

/// One episode of one run (`training_curve` schema).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpisodePoint {
    pub episode: i64,
    pub train_sharpe: f64,
    pub test_sharpe: f64,
}

/// (strategy, ticker) -> run -> episodes in order.
pub type Curves = BTreeMap<(String, String), BTreeMap<i64, Vec<EpisodePoint>>>;

pub fn read_curves(ctx: &StageContext) -> StageResult<(Curves, Vec<String>)> {
    let mut curves = Curves::new();
    let mut sources = Vec::new();
    for (reference, batch, file) in read_all(ctx, "curves")? {
        sources.push(reference);
        let c = Cols {
            batch: &batch,
            file: file.clone(),
        };
        let (strategy, ticker, run, episode) = (
            c.str("strategy")?,
            c.str("ticker")?,
            c.i64("run")?,
            c.i64("episode")?,
        );
        let (train, test) = (c.f64("train_sharpe")?, c.f64("test_sharpe")?);
        for row in 0..batch.num_rows() {
            let key = (strategy(row)?.to_string(), ticker(row)?.to_string());
            let runs = curves.entry(key).or_default();
            let points = runs.entry(run(row)?).or_default();
            let p = EpisodePoint {
                episode: episode(row)?,
                train_sharpe: train(row)?,
                test_sharpe: test(row)?,
            };
            if points.iter().any(|q| q.episode == p.episode) {
                return Err(StageError::data(
                    &file,
                    row as u64 + 1,
                    "episode",
                    format!("episode {} of this run appears twice", p.episode),
                ));
            }
            points.push(p);
        }
    }
    for runs in curves.values_mut() {
        for points in runs.values_mut() {
            points.sort_by_key(|p| p.episode);
        }
    }
    Ok((curves, sources))
}

/// One strategist decision (the rows of one (ticker, decision_date) collapsed).
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub date: i32,
    pub direction: f64,
    pub strength: f64,
    pub entropy: f64,
    pub perplexity: f64,
    pub attempts: i64,
    pub failed: bool,
    /// The model's explanation (empty when failed): identical ones flag a copying model.
    pub explanation: String,
    /// The model's confidence 1..3 and the signal's certainty (None when failed).
    pub confidence: Option<i64>,
    pub certainty: Option<f64>,
}

/// (prompt_version, ticker) -> decisions by date.
pub type Decisions = BTreeMap<(String, String), Vec<Decision>>;

pub fn read_signals(ctx: &StageContext) -> StageResult<(Decisions, Vec<String>)> {
    let mut out: BTreeMap<(String, String), BTreeMap<i32, Decision>> = BTreeMap::new();
    let mut sources = Vec::new();
    for (reference, batch, file) in read_all(ctx, "signals")? {
        sources.push(reference.clone());
        let c = Cols {
            batch: &batch,
            file: file.clone(),
        };
        let (prompt, ticker, decision_date) = (
            c.str("prompt_version")?,
            c.str("ticker")?,
            c.date("decision_date")?,
        );
        let (direction, strength, entropy, perplexity) = (
            c.f64("direction")?,
            c.f64("strength")?,
            c.f64("entropy")?,
            c.f64("perplexity")?,
        );
        let (attempts, failed) = (c.i64("attempts")?, c.bool("failed")?);
        // Null on failed decisions.
        let explanation = c.opt_str("explanation")?;
        let (confidence, certainty) = (c.opt_i64("confidence")?, c.opt_f64("certainty")?);
        for row in 0..batch.num_rows() {
            let d = Decision {
                date: decision_date(row)?,
                direction: direction(row)?,
                strength: strength(row)?,
                entropy: entropy(row)?,
                perplexity: perplexity(row)?,
                attempts: attempts(row)?,
                failed: failed(row)?,
                explanation: explanation(row).unwrap_or_default().to_string(),
                confidence: confidence(row),
                certainty: certainty(row).filter(|c| c.is_finite()),
            };
            let key = (prompt(row)?.to_string(), ticker(row)?.to_string());
            let by_date = out.entry(key.clone()).or_default();
            match by_date.get(&d.date) {
                // Each decision's row repeats on every day it is valid; they must agree.
                Some(old) if *old != d => {
                    return Err(StageError::data(
                        &file,
                        row as u64 + 1,
                        "decision_date",
                        format!(
                            "rows of the {} decision of {} / {} disagree ({reference})",
                            crate::data::fmt_date(d.date),
                            key.0,
                            key.1
                        ),
                    ));
                }
                Some(_) => {}
                None => {
                    by_date.insert(d.date, d);
                }
            }
        }
    }
    Ok((
        out.into_iter()
            .map(|(k, v)| (k, v.into_values().collect()))
            .collect(),
        sources,
    ))
}

/// `tdqn#3` -> (`tdqn`, Some(3)); a name without a run suffix -> (name, None).
pub fn split_run(strategy: &str) -> (&str, Option<usize>) {
    match strategy.rsplit_once('#') {
        Some((base, run)) => match run.parse() {
            Ok(r) => (base, Some(r)),
            Err(_) => (strategy, None),
        },
        None => (strategy, None),
    }
}

#[cfg(test)]
mod tests {
    use super::split_run;

    #[test]
    fn run_suffix() {
        assert_eq!(split_run("tdqn#12"), ("tdqn", Some(12)));
        assert_eq!(split_run("llm_only_P3"), ("llm_only_P3", None));
        assert_eq!(split_run("odd#name"), ("odd#name", None));
    }
}
