//! Fixtures: real daily closes from the shared data, simple strategies simulated on them,
//! and their metrics, written as Parquet in the schemas the report reads.
#![allow(dead_code)]
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flag_core::arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray,
};
use flag_core::parquet_io::write_parquet_file;
use flag_core::{InputArtifact, Params, StageContext, StageResult, schema};
use serde_json::Value;

pub fn data_dir() -> PathBuf {
    std::env::var_os("FLAG_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"))
}

/// (date as days since epoch, open, high, low, close, volume) from a TDQN CSV.
pub fn read_bars(file: &str, limit: usize) -> Vec<(i32, [f64; 5])> {
    let path = data_dir().join("tdqn").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let d = chrono::NaiveDate::parse_from_str(f[0], "%Y-%m-%d").ok()?;
            let v: Vec<f64> = f[1..6]
                .iter()
                .map(|x| x.parse().ok())
                .collect::<Option<_>>()?;
            Some((
                (d - epoch).num_days() as i32,
                [v[0], v[1], v[2], v[3], v[4]],
            ))
        })
        .take(limit)
        .collect()
}

/// (date, BUY?, shares, price, cost)
pub type TradeRow = (i32, bool, f64, f64, f64);

#[derive(Debug, Clone)]
pub struct Run {
    pub strategy: String,
    pub env: String,
    pub ticker: String,
    pub split: String,
    pub dates: Vec<i32>,
    pub prices: Vec<f64>,
    pub values: Vec<f64>,
    pub positions: Vec<f64>,
    pub cash: Vec<f64>,
    pub trades: Vec<TradeRow>,
}

/// Long-only all-in/all-out simulation at the close, 0.1 % cost; `long(t)` sees closes <= t.
pub fn simulate(
    strategy: &str,
    env: &str,
    ticker: &str,
    split: &str,
    bars: &[(i32, [f64; 5])],
    long: impl Fn(&[f64]) -> bool,
) -> Run {
    let closes: Vec<f64> = bars.iter().map(|b| b.1[3]).collect();
    let (mut cash, mut pos) = (10_000.0f64, 0.0f64);
    let mut r = Run {
        strategy: strategy.into(),
        env: env.into(),
        ticker: ticker.into(),
        split: split.into(),
        dates: vec![],
        prices: vec![],
        values: vec![],
        positions: vec![],
        cash: vec![],
        trades: vec![],
    };
    for (t, (d, _)) in bars.iter().enumerate() {
        let p = closes[t];
        let want_long = long(&closes[..=t]);
        if want_long && pos == 0.0 {
            let shares = (cash / (p * 1.001)).floor();
            if shares > 0.0 {
                let cost = shares * p * 0.001;
                cash -= shares * p + cost;
                pos = shares;
                r.trades.push((*d, true, shares, p, cost));
            }
        } else if !want_long && pos > 0.0 {
            let cost = pos * p * 0.001;
            cash += pos * p - cost;
            r.trades.push((*d, false, pos, p, cost));
            pos = 0.0;
        }
        r.dates.push(*d);
        r.prices.push(p);
        r.positions.push(pos);
        r.cash.push(cash);
        r.values.push(cash + pos * p);
    }
    r
}

pub fn sma_above(closes: &[f64], n: usize) -> bool {
    if closes.len() < n {
        return false;
    }
    let w = &closes[closes.len() - n..];
    closes[closes.len() - 1] > w.iter().sum::<f64>() / n as f64
}

/// ARR, SR, CR, SoR, MDD, VOL as in FinAgent 5.2 (rf = 0, 252 periods).
pub fn metrics(r: &Run) -> [f64; 6] {
    let v = &r.values;
    let rets: Vec<f64> = (1..v.len()).map(|i| v[i] / v[i - 1] - 1.0).collect();
    let n = rets.len() as f64;
    let mean = rets.iter().sum::<f64>() / n;
    let sd = (rets.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    let down = (rets.iter().map(|x| x.min(0.0).powi(2)).sum::<f64>() / n).sqrt();
    let arr = ((v[v.len() - 1] / v[0]).powf(252.0 / n) - 1.0) * 100.0;
    let mut peak = f64::MIN;
    let mut mdd = 0.0f64;
    for x in v {
        peak = peak.max(*x);
        mdd = mdd.max((1.0 - x / peak) * 100.0);
    }
    let ann = 252f64.sqrt();
    [
        arr,
        mean / sd * ann,
        arr / mdd,
        mean / down * ann,
        mdd,
        sd * ann * 100.0,
    ]
}

fn s(v: Vec<&str>) -> ArrayRef {
    Arc::new(StringArray::from(v))
}
fn f(v: Vec<f64>) -> ArrayRef {
    Arc::new(Float64Array::from(v))
}
fn none(n: usize) -> ArrayRef {
    Arc::new(Float64Array::from(vec![None::<f64>; n]))
}
fn d(v: Vec<i32>) -> ArrayRef {
    Arc::new(Date32Array::from(v))
}
fn i(v: Vec<i64>) -> ArrayRef {
    Arc::new(Int64Array::from(v))
}

fn rep(x: &str, n: usize) -> Vec<&str> {
    vec![x; n]
}

pub fn metrics_batch(runs: &[(&Run, [f64; 6])]) -> RecordBatch {
    let col = |k: usize| f(runs.iter().map(|(_, m)| m[k]).collect());
    let last = |r: &Run| r.values[r.values.len() - 1];
    schema::schema("metrics")
        .unwrap()
        .batch(vec![
            s(runs.iter().map(|(r, _)| r.strategy.as_str()).collect()),
            s(runs.iter().map(|(r, _)| r.env.as_str()).collect()),
            s(runs.iter().map(|(r, _)| r.ticker.as_str()).collect()),
            s(runs.iter().map(|(r, _)| r.split.as_str()).collect()),
            d(runs.iter().map(|(r, _)| r.dates[0]).collect()),
            d(runs
                .iter()
                .map(|(r, _)| r.dates[r.dates.len() - 1])
                .collect()),
            i(runs.iter().map(|(r, _)| r.dates.len() as i64).collect()),
            i(vec![252; runs.len()]),
            col(0),
            col(1),
            col(2),
            col(3),
            col(4),
            col(5),
            f(runs
                .iter()
                .map(|(r, _)| (last(r) / r.values[0] - 1.0) * 100.0)
                .collect()),
            f(runs.iter().map(|(r, _)| last(r) - r.values[0]).collect()),
            i(runs.iter().map(|(r, _)| r.trades.len() as i64).collect()),
            // FLAG-Trader's log_cr, log_sr, log_av, log_mdd: not read by the report.
            none(runs.len()),
            none(runs.len()),
            none(runs.len()),
            none(runs.len()),
        ])
        .unwrap()
}

pub fn equity_batch(runs: &[&Run]) -> RecordBatch {
    let mut c: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let (mut dates, mut price, mut pos, mut cash, mut value, mut ret, mut traded) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for r in runs {
        for t in 0..r.dates.len() {
            for (k, v) in [
                ("strategy", &r.strategy),
                ("env", &r.env),
                ("ticker", &r.ticker),
                ("split", &r.split),
            ] {
                c.entry(k).or_default().push(v.clone());
            }
            let is_trade = r.trades.iter().any(|x| x.0 == r.dates[t]);
            c.entry("action").or_default().push(
                if is_trade {
                    if r.positions[t] > 0.0 { "BUY" } else { "SELL" }
                } else {
                    "HOLD"
                }
                .into(),
            );
            dates.push(r.dates[t]);
            price.push(r.prices[t]);
            pos.push(r.positions[t]);
            cash.push(r.cash[t]);
            value.push(r.values[t]);
            ret.push(if t == 0 {
                0.0
            } else {
                r.values[t] / r.values[t - 1] - 1.0
            });
            traded.push(is_trade);
        }
    }
    let st = |k: &str| -> ArrayRef { Arc::new(StringArray::from(c[k].clone())) };
    schema::schema("equity")
        .unwrap()
        .batch(vec![
            st("strategy"),
            st("env"),
            st("ticker"),
            st("split"),
            d(dates),
            f(price),
            st("action"),
            f(pos),
            f(cash),
            f(value),
            f(ret),
            Arc::new(BooleanArray::from(traded)),
        ])
        .unwrap()
}

pub fn trades_batch(runs: &[&Run], side_override: Option<&str>) -> RecordBatch {
    let all: Vec<(&Run, &TradeRow)> = runs
        .iter()
        .flat_map(|r| r.trades.iter().map(move |t| (*r, t)))
        .collect();
    schema::schema("trades")
        .unwrap()
        .batch(vec![
            s(all.iter().map(|(r, _)| r.strategy.as_str()).collect()),
            s(all.iter().map(|(r, _)| r.env.as_str()).collect()),
            s(all.iter().map(|(r, _)| r.ticker.as_str()).collect()),
            s(all.iter().map(|(r, _)| r.split.as_str()).collect()),
            d(all.iter().map(|(_, t)| t.0).collect()),
            s(all
                .iter()
                .map(|(_, t)| side_override.unwrap_or(if t.1 { "BUY" } else { "SELL" }))
                .collect()),
            f(all.iter().map(|(_, t)| t.2).collect()),
            f(all.iter().map(|(_, t)| t.3).collect()),
            f(all.iter().map(|(_, t)| t.4).collect()),
        ])
        .unwrap()
}

pub fn ohlcv_batch(ticker: &str, bars: &[(i32, [f64; 5])]) -> RecordBatch {
    let col = |k: usize| f(bars.iter().map(|b| b.1[k]).collect());
    schema::schema("ohlcv")
        .unwrap()
        .batch(vec![
            s(rep(ticker, bars.len())),
            d(bars.iter().map(|b| b.0).collect()),
            col(0),
            col(1),
            col(2),
            col(3),
            col(4),
            Arc::new(Float64Array::from(vec![None::<f64>; bars.len()])),
        ])
        .unwrap()
}

/// Writes a batch as the single file of an artifact.
pub fn artifact(
    dir: &Path,
    reference: &str,
    batch: &RecordBatch,
    schema_name: Option<&'static str>,
) -> InputArtifact {
    let path = dir.join(format!("{}.parquet", reference.replace('.', "_")));
    write_parquet_file(&path, batch.schema(), std::slice::from_ref(batch)).unwrap();
    InputArtifact {
        reference: reference.into(),
        files: vec![path],
        schema: schema_name,
    }
}

/// Runs the report stage into `staging` and returns the result.
pub fn run_stage(
    inputs: &BTreeMap<String, Vec<InputArtifact>>,
    params: &[(&str, Value)],
    staging: &Path,
) -> StageResult<()> {
    run_stage_of(&flag_report::ReportStage, inputs, params, staging)
}

/// Runs `stage` (with its declared defaults) into `staging`.
pub fn run_stage_of(
    stage: &dyn flag_core::RunStage,
    inputs: &BTreeMap<String, Vec<InputArtifact>>,
    params: &[(&str, Value)],
    staging: &Path,
) -> StageResult<()> {
    let mut p = BTreeMap::new();
    for ps in stage.spec().params {
        if let Some(d) = ps.default {
            p.insert(ps.name.to_string(), d);
        }
    }
    for (k, v) in params {
        p.insert(k.to_string(), v.clone());
    }
    std::fs::create_dir_all(staging).unwrap();
    let mut ctx = StageContext::new(
        stage.kind(),
        Params::new(p),
        inputs.clone(),
        stage.spec().outputs,
        staging.to_path_buf(),
        BTreeMap::new(),
        None,
        None,
    );
    stage.run(&mut ctx)
}

/// The experiment of the tests: three strategies on AAPL and MSFT (tdqn env, train and
/// test splits) plus a FinAgent-env run on AAPL in a second artifact.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub runs: Vec<(Run, [f64; 6], &'static str)>,
    pub inputs: BTreeMap<String, Vec<InputArtifact>>,
}

pub fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut runs = Vec::new();
    let mut bars_inputs = Vec::new();
    for ticker in ["AAPL", "MSFT"] {
        let test = read_bars(&format!("{ticker}_2018-1-1_2020-1-1.csv"), usize::MAX);
        let train = read_bars(&format!("{ticker}_2012-1-1_2018-1-1.csv"), 300);
        for (split, bars) in [("train", &train), ("test", &test)] {
            runs.push((
                simulate("buy_and_hold", "tdqn", ticker, split, bars, |_| true),
                "bt.metrics",
            ));
            runs.push((
                simulate("sma_trend", "tdqn", ticker, split, bars, |c| {
                    sma_above(c, 20)
                }),
                "bt.metrics",
            ));
            runs.push((
                simulate("mean_reversion", "tdqn", ticker, split, bars, |c| {
                    !sma_above(c, 10)
                }),
                "bt.metrics",
            ));
        }
        if ticker == "AAPL" {
            runs.push((
                simulate("buy_and_hold", "finagent", ticker, "test", &test, |_| true),
                "fa.metrics",
            ));
            runs.push((
                simulate("sma_trend", "finagent", ticker, "test", &test, |c| {
                    sma_above(c, 50)
                }),
                "fa.metrics",
            ));
        }
        let mut all = train.clone();
        all.extend(test.iter().copied());
        bars_inputs.push(artifact(
            dir.path(),
            &format!("ingest_{ticker}.ohlcv"),
            &ohlcv_batch(ticker, &all),
            Some("ohlcv"),
        ));
    }
    let runs: Vec<(Run, [f64; 6], &'static str)> = runs
        .into_iter()
        .map(|(r, src)| {
            let m = metrics(&r);
            (r, m, src)
        })
        .collect();
    let mut inputs: BTreeMap<String, Vec<InputArtifact>> = BTreeMap::new();
    for (src, eq, tr) in [
        ("bt.metrics", "bt.equity", "bt.trades"),
        ("fa.metrics", "fa.equity", "fa.trades"),
    ] {
        let mine: Vec<&(Run, [f64; 6], &str)> = runs.iter().filter(|x| x.2 == src).collect();
        let mb = metrics_batch(&mine.iter().map(|x| (&x.0, x.1)).collect::<Vec<_>>());
        let rs: Vec<&Run> = mine.iter().map(|x| &x.0).collect();
        inputs.entry("metrics".into()).or_default().push(artifact(
            dir.path(),
            src,
            &mb,
            Some("metrics"),
        ));
        inputs.entry("equity".into()).or_default().push(artifact(
            dir.path(),
            eq,
            &equity_batch(&rs),
            Some("equity"),
        ));
        inputs.entry("trades".into()).or_default().push(artifact(
            dir.path(),
            tr,
            &trades_batch(&rs, None),
            Some("trades"),
        ));
    }
    inputs.insert("bars".into(), bars_inputs);
    Fixture { dir, runs, inputs }
}
