//! The `ppo` stage's tables, in their schemas' sort orders.

use std::sync::Arc;

use flag_core::StageResult;
use flag_core::arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray,
};
use flag_core::schema::schema;

use crate::stage::RunResult;
use crate::train::EvalDay;

/// The trading environment the paths follow (FinAgent's all-in / all-out dynamics).
pub const ENV: &str = "finagent";

const ACTIONS_UPPER: [&str; 3] = ["SELL", "HOLD", "BUY"];

fn utf8<S: AsRef<str>>(v: impl IntoIterator<Item = S>) -> ArrayRef {
    let v: Vec<S> = v.into_iter().collect();
    Arc::new(StringArray::from_iter_values(v))
}
fn f64s(v: impl IntoIterator<Item = f64>) -> ArrayRef {
    Arc::new(Float64Array::from_iter_values(v))
}
fn opt_f64s(v: impl IntoIterator<Item = Option<f64>>) -> ArrayRef {
    Arc::new(Float64Array::from_iter(v))
}
fn i64s(v: impl IntoIterator<Item = i64>) -> ArrayRef {
    Arc::new(Int64Array::from_iter_values(v))
}
fn dates(v: impl IntoIterator<Item = i32>) -> ArrayRef {
    Arc::new(Date32Array::from_iter_values(v))
}

/// (strategy#run, ticker, split, path) sorted by the equity schema's order.
fn sorted_paths<'a>(
    strategy: &str,
    results: &'a [RunResult],
) -> Vec<(String, &'a str, &'static str, &'a [EvalDay])> {
    let mut rows: Vec<_> = results
        .iter()
        .flat_map(|r| {
            r.paths.iter().map(move |(split, days)| {
                (
                    format!("{strategy}#{}", r.run),
                    r.ticker.as_str(),
                    *split,
                    days.as_slice(),
                )
            })
        })
        .collect();
    rows.sort_by(|a, b| (&a.0, a.1, a.2).cmp(&(&b.0, b.1, b.2)));
    rows
}

pub fn equity_batch(strategy: &str, results: &[RunResult]) -> StageResult<RecordBatch> {
    let paths = sorted_paths(strategy, results);
    let rows: Vec<(&str, &str, &str, &EvalDay)> = paths
        .iter()
        .flat_map(|(s, t, split, days)| days.iter().map(move |d| (s.as_str(), *t, *split, d)))
        .collect();
    schema("equity")?.batch(vec![
        utf8(rows.iter().map(|r| r.0)),
        utf8(rows.iter().map(|_| ENV)),
        utf8(rows.iter().map(|r| r.1)),
        utf8(rows.iter().map(|r| r.2)),
        dates(rows.iter().map(|r| r.3.day.date)),
        f64s(rows.iter().map(|r| r.3.day.price)),
        utf8(rows.iter().map(|r| r.3.day.outcome.action)),
        f64s(rows.iter().map(|r| r.3.day.outcome.position)),
        f64s(rows.iter().map(|r| r.3.day.outcome.cash)),
        f64s(rows.iter().map(|r| r.3.day.outcome.value)),
        f64s(rows.iter().map(|r| r.3.day.outcome.daily_return)),
        Arc::new(BooleanArray::from_iter(
            rows.iter().map(|r| Some(r.3.day.outcome.fill.is_some())),
        )),
    ])
}

pub fn trades_batch(strategy: &str, results: &[RunResult]) -> StageResult<RecordBatch> {
    let paths = sorted_paths(strategy, results);
    let rows: Vec<_> = paths
        .iter()
        .flat_map(|(s, t, split, days)| {
            days.iter().filter_map(move |d| {
                d.day
                    .outcome
                    .fill
                    .map(|f| (s.as_str(), *t, *split, d.day.date, f))
            })
        })
        .collect();
    schema("trades")?.batch(vec![
        utf8(rows.iter().map(|r| r.0)),
        utf8(rows.iter().map(|_| ENV)),
        utf8(rows.iter().map(|r| r.1)),
        utf8(rows.iter().map(|r| r.2)),
        dates(rows.iter().map(|r| r.3)),
        utf8(rows.iter().map(|r| r.4.side.as_str())),
        f64s(rows.iter().map(|r| r.4.shares)),
        f64s(rows.iter().map(|r| r.4.price)),
        f64s(rows.iter().map(|r| r.4.cost)),
    ])
}

fn by_ticker_run(results: &[RunResult]) -> Vec<&RunResult> {
    let mut v: Vec<&RunResult> = results.iter().collect();
    v.sort_by(|a, b| (&a.ticker, a.run).cmp(&(&b.ticker, b.run)));
    v
}

pub fn log_batch(strategy: &str, results: &[RunResult]) -> StageResult<RecordBatch> {
    let rows: Vec<_> = by_ticker_run(results)
        .into_iter()
        .flat_map(|r| r.log.iter().map(move |l| (r, l)))
        .collect();
    let f = |g: fn(&crate::train::UpdateLog) -> f64| f64s(rows.iter().map(|(_, l)| g(l)));
    schema("ppo_log")?.batch(vec![
        utf8(rows.iter().map(|_| strategy)),
        utf8(rows.iter().map(|(r, _)| r.ticker.as_str())),
        i64s(rows.iter().map(|(r, _)| r.run as i64)),
        i64s(rows.iter().map(|(r, _)| r.seed as i64)),
        i64s(rows.iter().map(|(_, l)| l.iteration as i64)),
        i64s(rows.iter().map(|(_, l)| l.global_step as i64)),
        f(|l| l.learning_rate),
        f(|l| l.policy_loss),
        f(|l| l.value_loss),
        f(|l| l.entropy),
        f(|l| l.kl_ref),
        f(|l| l.approx_kl),
        f(|l| l.clip_fraction),
        opt_f64s(
            rows.iter()
                .map(|(_, l)| Some(l.explained_variance).filter(|x| x.is_finite())),
        ),
        f(|l| l.grad_norm),
        f(|l| l.mean_reward),
        opt_f64s(rows.iter().map(|(_, l)| l.episode_return)),
    ])
}

pub fn timing_batch(strategy: &str, results: &[RunResult]) -> StageResult<RecordBatch> {
    let rows: Vec<_> = by_ticker_run(results)
        .into_iter()
        .flat_map(|r| r.log.iter().map(move |l| (r, l)))
        .collect();
    let f = |g: fn(&crate::train::UpdateLog) -> f64| f64s(rows.iter().map(|(_, l)| g(l)));
    schema("ppo_timing")?.batch(vec![
        utf8(rows.iter().map(|_| strategy)),
        utf8(rows.iter().map(|(r, _)| r.ticker.as_str())),
        i64s(rows.iter().map(|(r, _)| r.run as i64)),
        i64s(rows.iter().map(|(_, l)| l.iteration as i64)),
        f(|l| l.rollout_ms),
        f(|l| l.update_ms),
        f(|l| l.steps_per_s),
        f(|l| l.prompt_tokens_per_s),
    ])
}

/// One decision row.
struct DecisionRow<'a> {
    ticker: &'a str,
    run: usize,
    phase: &'static str,
    step: usize,
    date: i32,
    probs: &'a [f64],
    action: usize,
    value: f64,
    reward: Option<f64>,
}

pub fn decisions_batch(strategy: &str, results: &[RunResult]) -> StageResult<RecordBatch> {
    let mut rows: Vec<DecisionRow> = Vec::new();
    for r in by_ticker_run(results) {
        // Phase order as the schema sorts: rollout, test, train.
        for s in &r.steps {
            rows.push(DecisionRow {
                ticker: &r.ticker,
                run: r.run,
                phase: "rollout",
                step: s.global_step,
                date: s.date.unwrap_or_default(),
                probs: &s.probs,
                action: s.action,
                value: s.value,
                reward: Some(s.reward),
            });
        }
        let mut paths: Vec<_> = r.paths.iter().collect();
        paths.sort_by_key(|(split, _)| *split);
        for (split, days) in paths {
            for (i, d) in days.iter().enumerate() {
                rows.push(DecisionRow {
                    ticker: &r.ticker,
                    run: r.run,
                    phase: split,
                    step: i + 1,
                    date: d.day.date,
                    probs: &d.probs,
                    action: d.day.action,
                    value: d.value,
                    reward: d.day.reward,
                });
            }
        }
    }
    let p = |k: usize| f64s(rows.iter().map(|r| r.probs.get(k).copied().unwrap_or(0.0)));
    schema("ppo_decisions")?.batch(vec![
        utf8(rows.iter().map(|_| strategy)),
        utf8(rows.iter().map(|r| r.ticker)),
        i64s(rows.iter().map(|r| r.run as i64)),
        utf8(rows.iter().map(|r| r.phase)),
        i64s(rows.iter().map(|r| r.step as i64)),
        dates(rows.iter().map(|r| r.date)),
        p(0),
        p(1),
        p(2),
        utf8(rows.iter().map(|r| ACTIONS_UPPER[r.action.min(2)])),
        f64s(rows.iter().map(|r| r.value)),
        opt_f64s(rows.iter().map(|r| r.reward)),
    ])
}
