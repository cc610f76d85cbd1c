//! The `guided_report` stage: the LLM-guided RL paper's tables and charts (Darmanin & Vella
//! 2025) from the pipeline's artifacts: LLM+RL vs RL-only vs LLM-only over runs with paired
//! t-tests, the published TDQN Sharpe ratios beside ours, prompt versions P0-P4 (Sharpe,
//! perplexity, entropy, failures), price with RL trades and LLM signals, and the Sharpe over
//! training episodes with a band over runs. Every number is read from an input artifact or,
//! for the published figures, from the stage's params.
use std::collections::{BTreeMap, BTreeSet};

use flag_core::{
    Fingerprint, InputSpec, OutputSpec, ParamKind, ParamSpec, Params, Stage, StageContext,
    StageError, StageResult, StageSpec,
};
use serde_json::{Value, json};

use crate::charts;
use crate::data::{Inputs, Key, fmt_date};
use crate::render::{Block, ChartFile, Report, file_name, html, markdown, write_files};
use crate::tables::Table;

pub mod plots;
pub mod read;
pub mod tables;

const REVISION: &str = "3";

/// Resolved params of one guided report.
#[derive(Debug, Clone)]
pub struct GuidedParams {
    pub title: String,
    pub env: String,
    pub split: String,
    pub decimals: usize,
    pub guided: String,
    pub rl_only: String,
    pub llm_only: String,
    pub prompts: Vec<String>,
    pub prompt_prefix: String,
    /// Ticker -> published TDQN test Sharpe ratio.
    pub published: BTreeMap<String, f64>,
    pub published_source: String,
    pub chart_ticker: Option<String>,
    /// First and last day of the split, from the metrics (filled in by `run`).
    pub split_range: Option<(i32, i32)>,
}

impl GuidedParams {
    pub fn from_params(p: &Params) -> StageResult<Self> {
        let s = |name: &str, default: &str| -> StageResult<String> {
            Ok(p.opt_str(name)?.unwrap_or_else(|| default.to_string()))
        };
        let decimals = p.usize("decimals")?;
        if decimals > 8 {
            return Err(StageError::param("decimals", "must be 0..=8"));
        }
        let mut published = BTreeMap::new();
        match p.get("published") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                for (ticker, v) in m {
                    let x = v.as_f64().ok_or_else(|| {
                        StageError::param("published", format!("{ticker}: {v} is not a number"))
                    })?;
                    published.insert(ticker.clone(), x);
                }
            }
            Some(other) => {
                return Err(StageError::param(
                    "published",
                    format!("must be a map ticker: sharpe, got {other}"),
                ));
            }
        }
        let prompts = match p.get("prompts") {
            None | Some(Value::Null) => Vec::new(),
            Some(_) => p.str_list("prompts")?,
        };
        Ok(GuidedParams {
            title: s("title", "LLM-guided RL report")?,
            env: s("env", "tdqn")?,
            split: s("split", "test")?,
            decimals,
            guided: s("guided", "llm_guided_ddqn")?,
            rl_only: s("rl_only", "tdqn")?,
            llm_only: s("llm_only", "llm_only")?,
            prompts,
            prompt_prefix: s("prompt_prefix", "llm_only_")?,
            published,
            published_source: s("published_source", "published")?,
            chart_ticker: p.opt_str("chart_ticker")?,
            split_range: None,
        })
    }

    /// Strategy name of the LLM-only agent of one prompt version.
    pub fn prompt_strategy(&self, prompt: &str) -> String {
        format!("{}{prompt}", self.prompt_prefix)
    }
}

pub struct GuidedReport;

impl Stage for GuidedReport {
    fn kind(&self) -> &'static str {
        "guided_report"
    }

    fn check_params(&self, p: &Params, _bound: &[&str]) -> StageResult<()> {
        GuidedParams::from_params(p).map(drop)
    }

    fn spec(&self) -> StageSpec {
        let str_param = |name: &'static str, default: &str, doc: &'static str| {
            ParamSpec::with_default(name, ParamKind::Str, json!(default), doc)
        };
        StageSpec {
            doc: "LLM-guided RL report: LLM+RL vs RL-only vs LLM-only (mean (std) over runs, paired \
                  t-tests), published TDQN Sharpe beside ours, prompt versions (Sharpe, \
                  perplexity, entropy, failures), price + RL trades + LLM signals, Sharpe over \
                  episodes with a band over runs",
            inputs: vec![
                InputSpec::many("metrics", "metrics", "Metrics of every agent and run"),
                InputSpec::many(
                    "equity",
                    "equity",
                    "Daily paths (prices for the signal chart)",
                ),
                InputSpec::many("trades", "trades", "Trades (the RL agent's, for the chart)"),
                InputSpec::many("curves", "training_curve", "RL training curves").optional(),
                InputSpec::many("signals", "llm_signal", "Strategist signals").optional(),
            ],
            outputs: vec![OutputSpec::dir(
                "report",
                "report.md, report.html and charts/*.svg",
            )],
            params: vec![
                str_param("title", "LLM-guided RL report", "Report title"),
                str_param("env", "tdqn", "Environment of the compared agents"),
                str_param("split", "test", "Split of the tables"),
                ParamSpec::with_default("decimals", ParamKind::Int, json!(2), "Decimals (0..=8)"),
                str_param(
                    "guided",
                    "llm_guided_ddqn",
                    "Strategy name of the LLM-guided DDQN",
                ),
                str_param("rl_only", "tdqn", "Strategy name of the RL-only agent"),
                str_param(
                    "llm_only",
                    "llm_only",
                    "Strategy name of the LLM-only agent",
                ),
                ParamSpec::with_default(
                    "prompts",
                    ParamKind::List,
                    json!([]),
                    "Prompt versions of the prompt tables (their LLM-only strategies are \
                     <prompt_prefix><prompt>)",
                ),
                str_param(
                    "prompt_prefix",
                    "llm_only_",
                    "Strategy-name prefix of the per-prompt LLM-only agents",
                ),
                ParamSpec::with_default(
                    "published",
                    ParamKind::Any,
                    json!({}),
                    "Published TDQN test Sharpe ratio per ticker, shown beside ours",
                ),
                str_param(
                    "published_source",
                    "published",
                    "Citation of the published figures",
                ),
                ParamSpec::with_default(
                    "chart_ticker",
                    ParamKind::Str,
                    Value::Null,
                    "Ticker of the signal chart (default: the first)",
                ),
            ],
        }
    }

    fn fingerprint(&self, _params: &Params) -> Fingerprint {
        Fingerprint::new(format!(
            "{}@{}+guided{REVISION}",
            env!("CARGO_PKG_NAME"),
            env!("CARGO_PKG_VERSION")
        ))
    }
}

impl flag_core::RunStage for GuidedReport {
    fn run(&self, ctx: &mut StageContext) -> StageResult<()> {
        let mut p = GuidedParams::from_params(&ctx.params)?;
        ctx.progress(0, 3, "reading inputs");
        let inputs = Inputs::read(ctx)?;
        let split_rows: Vec<_> = inputs.metrics_of(&p.env, &p.split).collect();
        if split_rows.is_empty() {
            return Err(StageError::param(
                "split",
                format!("no metrics for env '{}' split '{}'", p.env, p.split),
            ));
        }
        p.split_range = Some((
            split_rows.iter().map(|(_, m)| m.start).min().unwrap_or(0),
            split_rows.iter().map(|(_, m)| m.end).max().unwrap_or(0),
        ));
        let (curves, curve_sources) = if ctx.has_input("curves") {
            read::read_curves(ctx)?
        } else {
            Default::default()
        };
        let (decisions, signal_sources) = if ctx.has_input("signals") {
            read::read_signals(ctx)?
        } else {
            Default::default()
        };
        ctx.progress(1, 3, "tables and charts");
        let (blocks, charts, ntables) = build(&p, &inputs, &curves, &decisions)?;
        ctx.progress(2, 3, "writing files");
        let mut blocks = blocks;
        blocks.push(Block::Heading(2, "Inputs".into()));
        blocks.push(Block::Para(
            inputs
                .sources
                .iter()
                .chain(&curve_sources)
                .chain(&signal_sources)
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(", "),
        ));
        let report = Report {
            markdown: markdown(&p.title, &blocks, &charts),
            html: html(&p.title, &blocks, &charts),
            charts,
            tables: ntables,
        };
        write_files(&ctx.output_dir("report")?, &report)?;
        ctx.log(format!(
            "guided report: {} tables, {} charts",
            report.tables,
            report.charts.len()
        ));
        ctx.progress(3, 3, "done");
        Ok(())
    }
}

/// Blocks, charts and table count of the report body.
pub(crate) fn build(
    p: &GuidedParams,
    inputs: &Inputs,
    curves: &read::Curves,
    decisions: &read::Decisions,
) -> StageResult<(Vec<Block>, Vec<ChartFile>, usize)> {
    let mut blocks = Vec::new();
    let mut charts_out = Vec::new();
    let mut used = BTreeSet::new();
    let mut ntables = 0;
    let mut push_table = |blocks: &mut Vec<Block>, t: Table| {
        blocks.push(Block::Table(t));
        ntables += 1;
    };

    blocks.push(Block::Heading(2, "LLM+RL vs RL-only vs LLM-only".into()));
    match tables::comparison_table(inputs, p) {
        Some((t, runs)) => {
            blocks.push(Block::Para(format!(
                "Up to {runs} independent runs per ticker and RL agent, each with its own seed \
                 (run r of both RL agents uses the same seed, so runs pair up)."
            )));
            push_table(&mut blocks, t);
        }
        None => blocks.push(Block::Para(format!(
            "No metrics of {}, {} or {} in the {} split.",
            p.guided, p.rl_only, p.llm_only, p.split
        ))),
    }

    if let Some((t, notes)) = tables::published_table(inputs, p) {
        blocks.push(Block::Heading(2, "TDQN: published vs ours".into()));
        push_table(&mut blocks, t);
        let episodes = curves
            .iter()
            .filter(|((s, _), _)| *s == p.rl_only)
            .flat_map(|(_, runs)| runs.values().filter_map(|v| v.last().map(|e| e.episode)))
            .max();
        let episodes =
            episodes.map_or_else(|| "an unknown number of".to_string(), |e| e.to_string());
        blocks.push(Block::Para(format!(
            "Why they can differ: the published figure is the expected Sharpe ratio over 50 \
             training and testing iterations of 50 episodes each; ours is the mean over this \
             run's seeds, trained for {episodes} episodes each, so with fewer runs or episodes \
             the gap includes seed noise and under-training. Both use the same TDQN CSVs (the \
             authors' data: Close dividend-adjusted, Open/High/Low only split-adjusted), so data \
             adjustment is not a source of difference here; implementation details can be (our \
             evaluation starts each split from fresh capital, and our random numbers differ)."
        )));
        for n in notes {
            blocks.push(Block::Para(n));
        }
    }

    let ptables = tables::prompt_tables(inputs, p, decisions);
    if !ptables.is_empty() {
        blocks.push(Block::Heading(2, "Prompt versions".into()));
        for t in ptables {
            push_table(&mut blocks, t);
        }
    }
    if p.prompts.is_empty() && !decisions.is_empty() {
        blocks.push(Block::Heading(
            2,
            "Strategist failures and answer variety".into(),
        ));
        let mut q = p.clone();
        q.prompts = decisions
            .keys()
            .map(|(prompt, _)| prompt.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        // Without the prompt comparison, only the failure and answer-variety tables apply.
        let all = tables::prompt_tables(inputs, &q, decisions);
        for t in all.into_iter().skip(3) {
            push_table(&mut blocks, t);
        }
    }

    blocks.push(Block::Heading(2, "Charts".into()));
    let at = charts_out.len();
    let prov = signal_chart(p, inputs, decisions, &mut charts_out, &mut used)?;
    episode_charts(p, curves, &mut charts_out, &mut used)?;
    if charts_out.len() > at {
        blocks.push(Block::Figures((at..charts_out.len()).collect(), prov));
    } else {
        blocks.push(Block::Para("No chart inputs.".into()));
    }
    Ok((blocks, charts_out, ntables))
}

/// Price with the first guided run's trades and the LLM decisions, for one ticker.
fn signal_chart(
    p: &GuidedParams,
    inputs: &Inputs,
    decisions: &read::Decisions,
    out: &mut Vec<ChartFile>,
    used: &mut BTreeSet<String>,
) -> StageResult<Vec<(String, String)>> {
    let guided_runs: Vec<&Key> = inputs
        .equity
        .keys()
        .filter(|k| {
            k.env == p.env && k.split == p.split && read::split_run(&k.strategy).0 == p.guided
        })
        .collect();
    let ticker = match &p.chart_ticker {
        Some(t) => t.clone(),
        None => match guided_runs.first() {
            Some(k) => k.ticker.clone(),
            None => return Ok(Vec::new()),
        },
    };
    // The lowest run index of that ticker ("#0" when present).
    let Some(key) = guided_runs
        .iter()
        .filter(|k| k.ticker == ticker)
        .min_by_key(|k| read::split_run(&k.strategy).1)
    else {
        return Err(StageError::param(
            "chart_ticker",
            format!(
                "no {} equity for ticker '{ticker}' in the {} split",
                p.guided, p.split
            ),
        ));
    };
    let series = &inputs.equity[*key];
    let prices: Vec<(i32, f64)> = series.points.iter().map(|e| (e.date, e.price)).collect();
    let (from, to) = (
        prices.first().map_or(0, |x| x.0),
        prices.last().map_or(0, |x| x.0),
    );
    let trades = inputs
        .trades
        .get(*key)
        .map(|t| t.trades.clone())
        .unwrap_or_default();
    let candidates: Vec<String> = decisions
        .keys()
        .filter(|(_, t)| *t == ticker)
        .map(|(q, _)| q.clone())
        .collect();
    let prompt = chart_prompt(p, &candidates);
    let ds: Vec<read::Decision> = prompt
        .as_ref()
        .and_then(|q| decisions.get(&(q.clone(), ticker.clone())))
        .map(|v| {
            v.iter()
                .filter(|d| (from..=to).contains(&d.date))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let title = format!(
        "{ticker}: {} trades and LLM signals{} ({} {} to {})",
        key.strategy,
        prompt.map(|q| format!(" ({q})")).unwrap_or_default(),
        p.split,
        fmt_date(from),
        fmt_date(to)
    );
    out.push(ChartFile {
        file: file_name(used, &["signals", &ticker]),
        alt: title.clone(),
        svg: plots::signals_chart(&title, &prices, &trades, &ds)?,
    });
    Ok(vec![(
        inputs.sources[series.source].clone(),
        format!("prices and trades of {}", key.strategy),
    )])
}

/// The prompt whose signals the chart shows: that of the LLM-only agent
/// (`<prompt_prefix><prompt>`), the one the guided agent is compared with; else the first
/// prompt listed in `prompts` (or found) among `candidates`.
fn chart_prompt(p: &GuidedParams, candidates: &[String]) -> Option<String> {
    p.llm_only
        .strip_prefix(&p.prompt_prefix)
        .filter(|q| candidates.iter().any(|c| c == q))
        .map(str::to_string)
        .or_else(|| {
            candidates
                .iter()
                .find(|q| p.prompts.is_empty() || p.prompts.contains(q))
                .cloned()
        })
}

/// Sharpe ratio over training episodes, RL-only vs guided, mean +- std over runs, one chart
/// per ticker and split (train, test).
fn episode_charts(
    p: &GuidedParams,
    curves: &read::Curves,
    out: &mut Vec<ChartFile>,
    used: &mut BTreeSet<String>,
) -> StageResult<()> {
    let tickers: BTreeSet<&str> = curves.keys().map(|(_, t)| t.as_str()).collect();
    for ticker in tickers {
        for split in ["train", "test"] {
            let mut bands = Vec::new();
            for (i, agent) in [p.rl_only.as_str(), p.guided.as_str()].iter().enumerate() {
                let Some(runs) = curves.get(&(agent.to_string(), ticker.to_string())) else {
                    continue;
                };
                let mut by_episode: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
                for points in runs.values() {
                    for e in points {
                        let v = if split == "train" {
                            e.train_sharpe
                        } else {
                            e.test_sharpe
                        };
                        by_episode.entry(e.episode).or_default().push(v);
                    }
                }
                let points = by_episode
                    .into_iter()
                    .map(|(ep, vs)| {
                        let m = crate::stats::mean_std(&vs);
                        let sd = if m.std.is_finite() { m.std } else { 0.0 };
                        (ep as f64, m.mean, m.mean - sd, m.mean + sd)
                    })
                    .collect();
                bands.push(plots::Band {
                    label: agent,
                    color: charts::color(i),
                    points,
                });
            }
            if bands.is_empty() {
                continue;
            }
            let n = curves
                .iter()
                .filter(|((_, t), _)| t == ticker)
                .map(|(_, r)| r.len())
                .max()
                .unwrap_or(0);
            let title = format!("{ticker}: {split} Sharpe over episodes (mean ± std, {n} runs)");
            out.push(ChartFile {
                file: file_name(used, &["episodes", ticker, split]),
                alt: title.clone(),
                svg: plots::episodes_chart(&title, &format!("{split} Sharpe ratio"), &bands)?,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(llm_only: &str, prompts: &[&str]) -> GuidedParams {
        let mut p = GuidedParams::from_params(&Params::new(
            [("decimals".to_string(), json!(2))].into_iter().collect(),
        ))
        .unwrap();
        p.llm_only = llm_only.into();
        p.prompts = prompts.iter().map(|s| s.to_string()).collect();
        p
    }

    /// Regression: the chart showed P0's signals for a guided agent trained on P4.
    #[test]
    fn chart_shows_the_compared_prompt() {
        let all: Vec<String> = ["P0", "P1", "P2", "P3", "P4"].map(String::from).to_vec();
        let p = params("llm_only_P4", &["P0", "P1", "P2", "P3", "P4"]);
        assert_eq!(chart_prompt(&p, &all).as_deref(), Some("P4"));
        let p = params("llm_only", &["P2"]);
        assert_eq!(chart_prompt(&p, &all).as_deref(), Some("P2"));
        let p = params("llm_only_P9", &[]);
        assert_eq!(chart_prompt(&p, &all).as_deref(), Some("P0"));
        assert_eq!(chart_prompt(&p, &[]), None);
    }
}
