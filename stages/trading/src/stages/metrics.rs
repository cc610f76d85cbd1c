//! `metrics`: FinAgent's metrics and FLAG-Trader's log-return metrics (formulas:
//! [`crate::metrics`]) for every (strategy, env, ticker, split) path in any number of `equity`
//! tables, with trade counts from `trades`.
use std::collections::BTreeMap;
use std::sync::Arc;

use flag_core::arrow::array::{
    Array, ArrayRef, BooleanArray, Date32Array, Float64Array, RecordBatch, StringArray,
};
use flag_core::{
    Fingerprint, InputSpec, OutputSpec, ParamKind, ParamSpec, Params, Stage, StageContext,
    StageError, StageResult, StageSpec,
};
use serde_json::json;

use super::{PeriodsPerYear, VERSION, date32, float64, int64, utf8};
use crate::metrics;
use crate::series::from_days;

pub struct MetricsStage;

/// (strategy, env, ticker, split)
type Key = (String, String, String, String);

/// One path read from an equity table.
#[derive(Debug, Default)]
struct PathRows {
    reference: String,
    /// (date, value, daily_return, 1-based row)
    rows: Vec<(i32, f64, f64, usize)>,
    traded_days: i64,
}

fn col<'a, T: 'static>(
    b: &'a RecordBatch,
    input: &str,
    reference: &str,
    name: &str,
) -> StageResult<&'a T> {
    b.column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| StageError::Input {
            input: input.into(),
            message: format!("{reference}: column '{name}' is missing or has the wrong type"),
        })
}

fn key_at(cols: &[&StringArray; 4], i: usize) -> Key {
    (
        cols[0].value(i).to_string(),
        cols[1].value(i).to_string(),
        cols[2].value(i).to_string(),
        cols[3].value(i).to_string(),
    )
}

fn key_cols<'a>(
    b: &'a RecordBatch,
    input: &str,
    reference: &str,
) -> StageResult<[&'a StringArray; 4]> {
    Ok([
        col(b, input, reference, "strategy")?,
        col(b, input, reference, "env")?,
        col(b, input, reference, "ticker")?,
        col(b, input, reference, "split")?,
    ])
}

fn read_equity(tables: &[(String, RecordBatch)]) -> StageResult<BTreeMap<Key, PathRows>> {
    let mut paths: BTreeMap<Key, PathRows> = BTreeMap::new();
    for (reference, b) in tables {
        let keys = key_cols(b, "equity", reference)?;
        let date: &Date32Array = col(b, "equity", reference, "date")?;
        let value: &Float64Array = col(b, "equity", reference, "value")?;
        let ret: &Float64Array = col(b, "equity", reference, "daily_return")?;
        let traded: &BooleanArray = col(b, "equity", reference, "traded")?;
        for i in 0..b.num_rows() {
            let key = key_at(&keys, i);
            let p = paths.entry(key.clone()).or_default();
            if p.reference.is_empty() {
                p.reference = reference.clone();
            } else if &p.reference != reference {
                return Err(StageError::Input {
                    input: "equity".into(),
                    message: format!(
                        "{reference} row {}: path {key:?} also comes from {}; bind each path once",
                        i + 1,
                        p.reference
                    ),
                });
            }
            let (v, r) = (value.value(i), ret.value(i));
            if !v.is_finite() || !r.is_finite() {
                return Err(StageError::Input {
                    input: "equity".into(),
                    message: format!(
                        "{reference} row {}: value {v} / daily_return {r} is not finite",
                        i + 1
                    ),
                });
            }
            p.rows.push((date.value(i), v, r, i + 1));
            p.traded_days += i64::from(traded.value(i));
        }
    }
    for (key, p) in paths.iter_mut() {
        p.rows.sort_by_key(|r| r.0);
        if let Some(w) = p.rows.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(StageError::Input {
                input: "equity".into(),
                message: format!(
                    "{} row {}: path {key:?} has a second row for {}",
                    p.reference,
                    w[1].3,
                    from_days(w[1].0)
                ),
            });
        }
    }
    Ok(paths)
}

fn count_trades(
    tables: &[(String, RecordBatch)],
    paths: &BTreeMap<Key, PathRows>,
) -> StageResult<BTreeMap<Key, i64>> {
    let mut counts = BTreeMap::new();
    for (reference, b) in tables {
        let keys = key_cols(b, "trades", reference)?;
        for i in 0..b.num_rows() {
            let key = key_at(&keys, i);
            if !paths.contains_key(&key) {
                return Err(StageError::Input {
                    input: "trades".into(),
                    message: format!(
                        "{reference} row {}: trade of {key:?}, which no equity input has",
                        i + 1
                    ),
                });
            }
            *counts.entry(key).or_insert(0) += 1;
        }
    }
    Ok(counts)
}

/// Computes the `metrics` table from equity tables and (optional) trades tables; without
/// trades tables, the number of trades is the number of days with `traded`.
pub fn metrics_table(
    equity: &[(String, RecordBatch)],
    trades: Option<&[(String, RecordBatch)]>,
    periods: &PeriodsPerYear,
) -> StageResult<RecordBatch> {
    let paths = read_equity(equity)?;
    let counts = trades.map(|t| count_trades(t, &paths)).transpose()?;
    let mut rows = Vec::with_capacity(paths.len());
    for (key, p) in &paths {
        let (first, last) = (p.rows[0], p.rows[p.rows.len() - 1]);
        // The first row's return is against the initial capital (see schemas/equity.yaml).
        if first.2 <= -1.0 {
            return Err(StageError::Input {
                input: "equity".into(),
                message: format!(
                    "{} row {}: first daily_return {} leaves no way to recover the initial capital",
                    p.reference, first.3, first.2
                ),
            });
        }
        let initial = first.1 / (1.0 + first.2);
        let values: Vec<f64> = p.rows.iter().map(|r| r.1).collect();
        let ppy = periods.for_ticker(&key.2);
        let m = metrics::compute(initial, &values, ppy as f64);
        // FLAG-Trader's metrics on the closing values V_1..V_T (not the initial capital).
        let lm = metrics::flag_trader(&values, ppy as f64);
        let n_trades = match &counts {
            Some(c) => c.get(key).copied().unwrap_or(0),
            None => p.traded_days,
        };
        rows.push((key, first.0, last.0, ppy, m, n_trades, lm));
    }
    let log = |g: fn(&metrics::LogMetrics) -> f64| -> ArrayRef {
        Arc::new(Float64Array::from_iter(
            rows.iter().map(|r| r.6.as_ref().map(g)),
        ))
    };
    flag_core::schema::schema("metrics")?.batch(vec![
        utf8(rows.iter().map(|r| r.0.0.as_str())),
        utf8(rows.iter().map(|r| r.0.1.as_str())),
        utf8(rows.iter().map(|r| r.0.2.as_str())),
        utf8(rows.iter().map(|r| r.0.3.as_str())),
        date32(rows.iter().map(|r| r.1).collect()),
        date32(rows.iter().map(|r| r.2).collect()),
        int64(rows.iter().map(|r| r.4.days as i64).collect()),
        int64(rows.iter().map(|r| r.3).collect()),
        float64(rows.iter().map(|r| r.4.arr).collect()),
        float64(rows.iter().map(|r| r.4.sr).collect()),
        float64(rows.iter().map(|r| r.4.cr).collect()),
        float64(rows.iter().map(|r| r.4.sor).collect()),
        float64(rows.iter().map(|r| r.4.mdd).collect()),
        float64(rows.iter().map(|r| r.4.vol).collect()),
        float64(rows.iter().map(|r| r.4.total_return).collect()),
        float64(rows.iter().map(|r| r.4.pnl).collect()),
        int64(rows.iter().map(|r| r.5).collect()),
        log(|m| m.cr),
        log(|m| m.sr),
        log(|m| m.av),
        log(|m| m.mdd),
    ])
}

impl Stage for MetricsStage {
    fn kind(&self) -> &'static str {
        "metrics"
    }

    fn check_params(&self, p: &Params, _bound: &[&str]) -> StageResult<()> {
        PeriodsPerYear::from_params(p, "periods_per_year").map(drop)
    }

    fn spec(&self) -> StageSpec {
        StageSpec {
            doc: "FinAgent metrics (ARR, SR, CR, SoR, MDD, VOL, total return, P&L, trades) and \
                  FLAG-Trader's log-return CR, SR, AV, MDD (log_*) per strategy, env, ticker and \
                  split. Formulas: stages/trading/src/metrics.rs.",
            inputs: vec![
                InputSpec::many(
                    "equity",
                    "equity",
                    "Equity tables from any number of stages",
                ),
                InputSpec::many("trades", "trades", "Their trades tables (trade counts)")
                    .optional(),
            ],
            outputs: vec![OutputSpec::parquet(
                "metrics",
                "metrics",
                "One row per path",
            )],
            params: vec![ParamSpec::with_default(
                "periods_per_year",
                ParamKind::Any,
                json!({"default": 252}),
                "Annualisation: a number, or {default: 252, ETH: 365} with per-ticker overrides",
            )],
        }
    }

    fn fingerprint(&self, _params: &Params) -> Fingerprint {
        Fingerprint::new(format!("{VERSION}/metrics-2"))
    }
}

impl flag_core::RunStage for MetricsStage {
    fn run(&self, ctx: &mut StageContext) -> StageResult<()> {
        let periods = PeriodsPerYear::from_params(&ctx.params, "periods_per_year")?;
        let equity = ctx.read_inputs("equity")?;
        let trades = if ctx.has_input("trades") {
            Some(ctx.read_inputs("trades")?)
        } else {
            None
        };
        let table = metrics_table(&equity, trades.as_deref(), &periods)?;
        ctx.log(format!(
            "{} paths from {} equity tables",
            table.num_rows(),
            equity.len()
        ));
        ctx.write_parquet("metrics", &[table])?;
        Ok(())
    }
}
