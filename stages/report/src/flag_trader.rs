//! The `flag_trader_report` stage: FLAG-Trader (Xiong et al. 2025) against Buy & Hold and
//! the paper's own row, in the layout of the paper's Table 2 (CR %, SR, AV %, MDD %), and
//! the PPO training curves (reward and entropy over environment steps, mean over runs with
//! a min..max band).
//!
//! Every number of ours is read from the metrics artifact's log_* columns (the paper's
//! definitions, computed by the metrics stage); mean and sample standard deviation over runs
//! are the only arithmetic done here. The paper's figures come from the stage's params.
use std::collections::{BTreeMap, BTreeSet};

use flag_core::{
    Fingerprint, InputSpec, OutputSpec, ParamKind, ParamSpec, Params, Stage, StageContext,
    StageError, StageResult, StageSpec,
};
use serde_json::{Value, json};

use crate::charts;
use crate::data::{Cols, Key, fmt_date, read_all};
use crate::guided::plots::{Band, band_chart};
use crate::guided::read::split_run;
use crate::render::{Block, ChartFile, Report, file_name, html, markdown, write_files};
use crate::stats::mean_std;
use crate::tables::{Cell, Table, cell, fmt_num, mean_std_text};

const REVISION: &str = "1";
/// Printed for a value the inputs or params do not have.
pub const MISSING: &str = "—";

/// The four columns of the paper's Table 2, with their metrics columns.
pub const COLUMNS: [(&str, &str); 4] = [
    ("CR %", "log_cr"),
    ("SR", "log_sr"),
    ("AV %", "log_av"),
    ("MDD %", "log_mdd"),
];
/// Keys of one ticker's entry in the `paper` param, in column order.
const PAPER_KEYS: [&str; 4] = ["cr", "sr", "av", "mdd"];

/// Resolved params of one FLAG-Trader report.
#[derive(Debug, Clone)]
pub struct FlagTraderParams {
    pub title: String,
    pub env: String,
    pub split: String,
    pub decimals: usize,
    pub strategy: String,
    pub baseline: String,
    /// Ticker -> the paper's CR, SR, AV, MDD (None where the param leaves one out).
    pub paper: BTreeMap<String, [Option<f64>; 4]>,
    pub paper_source: String,
}

impl FlagTraderParams {
    pub fn from_params(p: &Params) -> StageResult<Self> {
        let s = |name: &str, default: &str| -> StageResult<String> {
            Ok(p.opt_str(name)?.unwrap_or_else(|| default.to_string()))
        };
        let decimals = match p.get("decimals") {
            Some(_) => p.usize("decimals")?,
            None => 3,
        };
        if decimals > 8 {
            return Err(StageError::param("decimals", "must be 0..=8"));
        }
        let mut paper = BTreeMap::new();
        match p.get("paper") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                for (ticker, v) in m {
                    let Value::Object(fields) = v else {
                        return Err(StageError::param(
                            "paper",
                            format!("{ticker}: must be a map {{cr, sr, av, mdd}}, got {v}"),
                        ));
                    };
                    if let Some(k) = fields.keys().find(|k| !PAPER_KEYS.contains(&k.as_str())) {
                        return Err(StageError::param(
                            "paper",
                            format!("{ticker}: unknown key '{k}' (expected cr, sr, av, mdd)"),
                        ));
                    }
                    let mut row = [None; 4];
                    for (slot, key) in row.iter_mut().zip(PAPER_KEYS) {
                        *slot = match fields.get(key) {
                            None | Some(Value::Null) => None,
                            Some(x) => Some(x.as_f64().ok_or_else(|| {
                                StageError::param(
                                    "paper",
                                    format!("{ticker}.{key}: {x} is not a number"),
                                )
                            })?),
                        };
                    }
                    paper.insert(ticker.clone(), row);
                }
            }
            Some(other) => {
                return Err(StageError::param(
                    "paper",
                    format!("must be a map ticker: {{cr, sr, av, mdd}}, got {other}"),
                ));
            }
        }
        Ok(FlagTraderParams {
            title: s("title", "FLAG-Trader: ours vs the paper")?,
            env: s("env", "finagent")?,
            split: s("split", "test")?,
            decimals,
            strategy: s("strategy", "flag_trader")?,
            baseline: s("baseline", "buy_and_hold")?,
            paper,
            paper_source: s("paper_source", "the paper")?,
        })
    }
}

/// One metrics row's log_* values (None where the metrics stage wrote null).
#[derive(Debug, Clone)]
pub struct LogMetric {
    pub start: i32,
    pub end: i32,
    pub values: [Option<f64>; 4],
    pub source: usize,
}

/// The metrics inputs' FLAG-Trader columns by (env, split, ticker, strategy).
#[derive(Debug, Default)]
pub struct LogMetrics {
    /// Input references, in binding order.
    pub sources: Vec<String>,
    pub rows: BTreeMap<Key, LogMetric>,
}

impl LogMetrics {
    pub fn read(ctx: &StageContext) -> StageResult<LogMetrics> {
        let mut out = LogMetrics::default();
        for (reference, batch, file) in read_all(ctx, "metrics")? {
            let src = match out.sources.iter().position(|s| *s == reference) {
                Some(i) => i,
                None => {
                    out.sources.push(reference.clone());
                    out.sources.len() - 1
                }
            };
            let c = Cols {
                batch: &batch,
                file: file.clone(),
            };
            let key = c.key()?;
            let (start, end) = (c.date("start_date")?, c.date("end_date")?);
            let [a, b, d, e] = COLUMNS.map(|(_, col)| c.opt_f64(col));
            let getters = [a?, b?, d?, e?];
            for row in 0..batch.num_rows() {
                let k = key(row)?;
                if let Some(old) = out.rows.get(&k) {
                    return Err(StageError::Input {
                        input: "metrics".into(),
                        message: format!(
                            "strategy '{}' env '{}' ticker '{}' split '{}' appears twice ({} and {})",
                            k.strategy,
                            k.env,
                            k.ticker,
                            k.split,
                            out.sources[old.source],
                            reference
                        ),
                    });
                }
                let m = LogMetric {
                    start: start(row)?,
                    end: end(row)?,
                    values: std::array::from_fn(|i| getters[i](row)),
                    source: src,
                };
                out.rows.insert(k, m);
            }
        }
        Ok(out)
    }

    fn get(&self, p: &FlagTraderParams, ticker: &str, strategy: &str) -> Option<&LogMetric> {
        self.rows.get(&Key {
            env: p.env.clone(),
            split: p.split.clone(),
            ticker: ticker.into(),
            strategy: strategy.into(),
        })
    }

    /// The FLAG-Trader runs of one ticker: (run index, row), by run.
    fn runs(&self, p: &FlagTraderParams, ticker: &str) -> Vec<(Option<usize>, &LogMetric)> {
        let mut v: Vec<(Option<usize>, &LogMetric)> = self
            .rows
            .iter()
            .filter(|(k, _)| k.env == p.env && k.split == p.split && k.ticker == ticker)
            .filter_map(|(k, m)| {
                let (base, run) = split_run(&k.strategy);
                (base == p.strategy).then_some((run, m))
            })
            .collect();
        v.sort_by_key(|x| x.0);
        v
    }
}

/// One PPO iteration's logged values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogPoint {
    pub global_step: i64,
    pub mean_reward: f64,
    pub episode_return: Option<f64>,
    pub entropy: f64,
}

/// (strategy, ticker) -> run -> iterations by global step.
pub type PpoLogs = BTreeMap<(String, String), BTreeMap<i64, Vec<LogPoint>>>;

pub fn read_ppo_logs(ctx: &StageContext) -> StageResult<(PpoLogs, Vec<String>)> {
    let mut logs = PpoLogs::new();
    let mut sources = Vec::new();
    let mut seen: BTreeSet<(String, String, i64, i64)> = BTreeSet::new();
    for (reference, batch, file) in read_all(ctx, "curves")? {
        sources.push(reference);
        let c = Cols {
            batch: &batch,
            file: file.clone(),
        };
        let (strategy, ticker, run, iteration, step) = (
            c.str("strategy")?,
            c.str("ticker")?,
            c.i64("run")?,
            c.i64("iteration")?,
            c.i64("global_step")?,
        );
        let (reward, ret, entropy) = (
            c.f64("mean_reward")?,
            c.opt_f64("episode_return")?,
            c.f64("entropy")?,
        );
        for row in 0..batch.num_rows() {
            let (s, t, r, it) = (
                strategy(row)?.to_string(),
                ticker(row)?.to_string(),
                run(row)?,
                iteration(row)?,
            );
            if !seen.insert((s.clone(), t.clone(), r, it)) {
                return Err(StageError::data(
                    &file,
                    row as u64 + 1,
                    "iteration",
                    format!("{s} / {t} run {r}: iteration {it} appears twice"),
                ));
            }
            logs.entry((s, t))
                .or_default()
                .entry(r)
                .or_default()
                .push(LogPoint {
                    global_step: step(row)?,
                    mean_reward: reward(row)?,
                    episode_return: ret(row),
                    entropy: entropy(row)?,
                });
        }
    }
    for runs in logs.values_mut() {
        for points in runs.values_mut() {
            points.sort_by_key(|p| p.global_step);
        }
    }
    Ok((logs, sources))
}

pub struct FlagTraderReport;

impl Stage for FlagTraderReport {
    fn kind(&self) -> &'static str {
        "flag_trader_report"
    }

    fn check_params(&self, p: &Params, _bound: &[&str]) -> StageResult<()> {
        FlagTraderParams::from_params(p).map(drop)
    }

    fn spec(&self) -> StageSpec {
        let str_param = |name: &'static str, default: &str, doc: &'static str| {
            ParamSpec::with_default(name, ParamKind::Str, json!(default), doc)
        };
        StageSpec {
            doc: "FLAG-Trader report in the paper's Table 2 layout (CR %, SR, AV %, MDD %): Buy & \
                  Hold, ours as mean (std) over runs, the paper's row; PPO training curves \
                  (reward, episode return, entropy over environment steps, band over runs)",
            inputs: vec![
                InputSpec::many(
                    "metrics",
                    "metrics",
                    "Metrics with the log_* columns of every run and of Buy & Hold",
                ),
                InputSpec::many("curves", "ppo_log", "PPO training logs").optional(),
            ],
            outputs: vec![OutputSpec::dir(
                "report",
                "report.md, report.html and charts/*.svg",
            )],
            params: vec![
                str_param("title", "FLAG-Trader: ours vs the paper", "Report title"),
                str_param("env", "finagent", "Environment of the compared rows"),
                str_param("split", "test", "Split of the tables"),
                ParamSpec::with_default("decimals", ParamKind::Int, json!(3), "Decimals (0..=8)"),
                str_param(
                    "strategy",
                    "flag_trader",
                    "Strategy name of FLAG-Trader (runs are <strategy>#<run>)",
                ),
                str_param("baseline", "buy_and_hold", "Strategy name of Buy & Hold"),
                ParamSpec::with_default(
                    "paper",
                    ParamKind::Any,
                    json!({}),
                    "The paper's FLAG-Trader row per ticker: {cr, sr, av, mdd}",
                ),
                str_param(
                    "paper_source",
                    "the paper",
                    "Citation of the paper's figures",
                ),
            ],
        }
    }

    fn fingerprint(&self, _params: &Params) -> Fingerprint {
        Fingerprint::new(format!(
            "{}@{}+flag{REVISION}",
            env!("CARGO_PKG_NAME"),
            env!("CARGO_PKG_VERSION")
        ))
    }
}

impl flag_core::RunStage for FlagTraderReport {
    fn run(&self, ctx: &mut StageContext) -> StageResult<()> {
        let p = FlagTraderParams::from_params(&ctx.params)?;
        ctx.progress(0, 3, "reading inputs");
        let metrics = LogMetrics::read(ctx)?;
        let (logs, log_sources) = if ctx.has_input("curves") {
            read_ppo_logs(ctx)?
        } else {
            Default::default()
        };
        ctx.progress(1, 3, "tables and charts");
        let report = build(&p, &metrics, &logs, &log_sources)?;
        ctx.progress(2, 3, "writing files");
        write_files(&ctx.output_dir("report")?, &report)?;
        ctx.log(format!(
            "flag_trader report: {} tables, {} charts",
            report.tables,
            report.charts.len()
        ));
        ctx.progress(3, 3, "done");
        Ok(())
    }
}

/// The whole report from read inputs.
pub fn build(
    p: &FlagTraderParams,
    metrics: &LogMetrics,
    logs: &PpoLogs,
    log_sources: &[String],
) -> StageResult<Report> {
    let mut blocks = Vec::new();
    let mut charts_out = Vec::new();
    let mut used = BTreeSet::new();
    let in_split = |k: &Key| k.env == p.env && k.split == p.split;
    let tickers: BTreeSet<&str> = metrics
        .rows
        .keys()
        .filter(|k| {
            in_split(k) && (k.strategy == p.baseline || split_run(&k.strategy).0 == p.strategy)
        })
        .map(|k| k.ticker.as_str())
        .chain(p.paper.keys().map(String::as_str))
        .collect();

    blocks.push(Block::Heading(2, "Table 2 layout".into()));
    blocks.push(Block::Para(format!(
        "Columns as the paper defines them (metrics columns log_cr, log_sr, log_av, log_mdd): CR = \
         cumulative log return %, SR = annualised log return / AV, AV = annualised volatility of \
         the daily log returns %, MDD = maximum drawdown %. {} split, {} environment. Ours: mean \
         (sample std, n - 1) over the runs of `{}`; the paper's row: {}. {MISSING} = not in the \
         inputs.",
        p.split, p.env, p.strategy, p.paper_source
    )));
    let mut ntables = 0;
    for ticker in &tickers {
        blocks.push(Block::Heading(3, ticker.to_string()));
        blocks.push(Block::Table(ticker_table(p, metrics, ticker)));
        ntables += 1;
    }
    if tickers.is_empty() {
        blocks.push(Block::Para(format!(
            "No metrics of {} or {} in the {} split of the {} environment, and no paper figures.",
            p.strategy, p.baseline, p.split, p.env
        )));
    }

    blocks.push(Block::Heading(2, "PPO training curves".into()));
    let mut any = false;
    for ((strategy, ticker), runs) in logs {
        let at = charts_out.len();
        training_charts(strategy, ticker, runs, &mut charts_out, &mut used)?;
        if charts_out.len() > at {
            blocks.push(Block::Heading(3, format!("{ticker} ({strategy})")));
            blocks.push(Block::Figures(
                (at..charts_out.len()).collect(),
                log_sources
                    .iter()
                    .map(|s| (s.clone(), "ppo_log".to_string()))
                    .collect(),
            ));
            any = true;
        }
    }
    if !any {
        blocks.push(Block::Para("No PPO training logs in the inputs.".into()));
    }

    blocks.push(Block::Heading(2, "Inputs".into()));
    blocks.push(Block::Para(
        metrics
            .sources
            .iter()
            .chain(log_sources)
            .map(|s| format!("`{s}`"))
            .collect::<Vec<_>>()
            .join(", "),
    ));
    Ok(Report {
        markdown: markdown(&p.title, &blocks, &charts_out),
        html: html(&p.title, &blocks, &charts_out),
        charts: charts_out,
        tables: ntables,
    })
}

fn value_cell(v: Option<f64>, d: usize) -> Cell {
    cell(v.map_or_else(|| MISSING.to_string(), |x| fmt_num(x, d)))
}

/// One ticker in the paper's Table 2 layout: Buy & Hold, ours (mean (std) over runs), the
/// run with the median SR (labelled as selected on the split it is shown for), the paper.
pub fn ticker_table(p: &FlagTraderParams, metrics: &LogMetrics, ticker: &str) -> Table {
    let d = p.decimals;
    let mut rows = Vec::new();
    let mut prov: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    let mut range: Option<(i32, i32)> = None;
    let mut widen = |m: &LogMetric| {
        range = Some(range.map_or((m.start, m.end), |(a, b)| (a.min(m.start), b.max(m.end))));
    };

    let bh = metrics.get(p, ticker, &p.baseline);
    if let Some(m) = bh {
        prov.entry(m.source).or_default().push(p.baseline.clone());
        widen(m);
    }
    rows.push((
        "Buy & Hold".to_string(),
        (0..4)
            .map(|i| value_cell(bh.and_then(|m| m.values[i]), d))
            .collect(),
    ));

    let runs = metrics.runs(p, ticker);
    for (run, m) in &runs {
        let name = run.map_or_else(|| p.strategy.clone(), |r| format!("{}#{r}", p.strategy));
        prov.entry(m.source).or_default().push(name);
        widen(m);
    }
    let cells: Vec<Cell> = (0..4)
        .map(|i| {
            let xs: Vec<f64> = runs.iter().filter_map(|(_, m)| m.values[i]).collect();
            let ms = mean_std(&xs);
            match ms.n {
                0 => cell(MISSING.into()),
                n if n < runs.len() => cell(format!("{} [n = {n}]", mean_std_text(&ms, d))),
                _ => cell(mean_std_text(&ms, d)),
            }
        })
        .collect();
    rows.push((
        format!(
            "FLAG-Trader (ours), mean (std), n = {} run{}",
            runs.len(),
            if runs.len() == 1 { "" } else { "s" }
        ),
        cells,
    ));

    // The run with the median SR (the lower middle one for an even count): the paper reports
    // its median-SR run, but choosing it by the split shown is selection on that split.
    let mut by_sr: Vec<&(Option<usize>, &LogMetric)> =
        runs.iter().filter(|(_, m)| m.values[1].is_some()).collect();
    if by_sr.len() > 1 {
        by_sr.sort_by(|a, b| {
            a.1.values[1]
                .partial_cmp(&b.1.values[1])
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        let (run, m) = by_sr[(by_sr.len() - 1) / 2];
        let name = run.map_or_else(|| p.strategy.clone(), |r| format!("#{r}"));
        rows.push((
            format!(
                "FLAG-Trader (ours), median-SR run {name} (selected on {})",
                p.split
            ),
            (0..4).map(|i| value_cell(m.values[i], d)).collect(),
        ));
    }

    let paper = p.paper.get(ticker);
    rows.push((
        "FLAG-Trader (paper)".to_string(),
        (0..4)
            .map(|i| value_cell(paper.and_then(|r| r[i]), d))
            .collect(),
    ));

    let mut provenance: Vec<(String, String)> = prov
        .into_iter()
        .map(|(src, names)| (metrics.sources[src].clone(), names.join(", ")))
        .collect();
    provenance.push((
        "params.paper".into(),
        if paper.is_some() {
            p.paper_source.clone()
        } else {
            format!("no entry for {ticker}")
        },
    ));
    let period = range.map_or_else(String::new, |(a, b)| {
        format!(", {} to {}", fmt_date(a), fmt_date(b))
    });
    Table {
        caption: format!(
            "{ticker}, {} split{period}: CR %, SR, AV %, MDD % as in the paper's Table 2. \
             Paper row: {}.",
            p.split, p.paper_source
        ),
        corner: "Method".into(),
        groups: Vec::new(),
        columns: COLUMNS.iter().map(|c| c.0.to_string()).collect(),
        rows,
        provenance,
        mark: "best",
    }
}

/// Reads one logged value of an iteration (None when not logged).
type Field = fn(&LogPoint) -> Option<f64>;

/// Reward, episode return and entropy over environment steps for one (strategy, ticker):
/// the mean over runs at each logged global step, with a min..max band.
fn training_charts(
    strategy: &str,
    ticker: &str,
    runs: &BTreeMap<i64, Vec<LogPoint>>,
    out: &mut Vec<ChartFile>,
    used: &mut BTreeSet<String>,
) -> StageResult<()> {
    let n = runs.len();
    let label = format!(
        "{strategy}: mean over {n} run{} (band: min..max)",
        if n == 1 { "" } else { "s" }
    );
    let series: [(&str, &str, Field); 3] = [
        ("reward", "mean reward per step", |x| Some(x.mean_reward)),
        ("episode_return", "episode return", |x| x.episode_return),
        ("entropy", "policy entropy (nats)", |x| Some(x.entropy)),
    ];
    for (file, what, get) in series {
        let mut at: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
        for points in runs.values() {
            for pt in points {
                if let Some(v) = get(pt).filter(|v| v.is_finite()) {
                    at.entry(pt.global_step).or_default().push(v);
                }
            }
        }
        if at.is_empty() {
            continue;
        }
        let points = at
            .iter()
            .map(|(step, vs)| {
                let lo = vs.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = vs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                (*step as f64, mean_std(vs).mean, lo, hi)
            })
            .collect();
        let title = format!("{ticker}: {what} during PPO training");
        out.push(ChartFile {
            file: file_name(used, &["ppo", file, strategy, ticker]),
            alt: title.clone(),
            svg: band_chart(
                &title,
                "environment steps (global_step)",
                what,
                &[Band {
                    label: &label,
                    color: charts::color(0),
                    points,
                }],
            )?,
        });
    }
    Ok(())
}
