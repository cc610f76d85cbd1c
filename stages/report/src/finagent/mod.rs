//! The `finagent_report` stage: FinAgent (Zhang et al., KDD 2024) as this project runs it,
//! in the paper's layouts. Sections:
//!
//! 1. Table 4 per asset: ARR %, SR, CR, SoR, MDD %, VOL % of every FinAgent configuration
//!    and every baseline (the metrics artifact's columns), and the published FinAgent row.
//! 2. Table 5 (ablations): configurations T, M, ML, MLH, MLHT by asset, ARR % and SR.
//! 3. Return curves per asset (configurations and buy-and-hold) and the trades of the full
//!    configuration on the price.
//! 4. Retrieval diagnostics from `memory_hits`: scores and item ages per query type, items
//!    retrieved by several query types on a day, queries that found no memory.
//! 5. Module calls, failures, retries, answer variety and the action mix.
//! 6. The rule tools' train records next to buy-and-hold.
//! 7. One day traced through the five modules (prompts and answers).
//!
//! Every number is read from an input artifact or the params; the report counts rows,
//! takes quantiles and formats. Configurations are the strategies of the decisions input
//! (their `modules` column) and any `finagent_<letters>` strategy of the metrics.
use std::collections::{BTreeMap, BTreeSet};

use flag_core::{
    Fingerprint, InputSpec, OutputSpec, ParamKind, ParamSpec, Params, Stage, StageContext,
    StageError, StageResult, StageSpec,
};
use serde_json::{Value, json};

use crate::data::Inputs;
use crate::render::{Block, Report, html, markdown, write_files};

pub mod diagnostics;
pub mod plots;
pub mod read;
pub mod retrieval;
pub mod sections;
pub mod trace;

use read::FinAgentInputs;
use trace::TraceKey;

const REVISION: &str = "1";
/// Printed for a value the inputs or params do not have.
pub const MISSING: &str = "—";
/// Keys of one ticker's entry in the `published` param.
const PUBLISHED_KEYS: [&str; 3] = ["arr", "sr", "mdd"];

/// The paper's Table 4 FinAgent row: ARR %, SR, MDD %.
pub fn paper_table4() -> Value {
    json!({
        "AAPL": {"arr": 31.9, "sr": 1.43, "mdd": 10.4},
        "AMZN": {"arr": 65.1, "sr": 1.61, "mdd": 13.2},
        "GOOGL": {"arr": 56.15, "sr": 1.78, "mdd": 8.45},
        "MSFT": {"arr": 44.74, "sr": 1.79, "mdd": 5.57},
        "TSLA": {"arr": 92.27, "sr": 2.01, "mdd": 12.14},
        "ETH": {"arr": 43.08, "sr": 1.18, "mdd": 12.72},
    })
}

const PAPER_SOURCE: &str = "Zhang et al., KDD 2024, Table 4 (FinAgent row)";

/// Resolved params of one FinAgent report.
#[derive(Debug, Clone)]
pub struct FinAgentParams {
    pub title: String,
    pub env: String,
    pub split: String,
    pub decimals: usize,
    pub baseline: String,
    /// Ticker -> published ARR %, SR, MDD % (None where the param leaves one out).
    pub published: BTreeMap<String, [Option<f64>; 3]>,
    pub published_source: String,
    pub trace: Option<TraceKey>,
}

impl FinAgentParams {
    pub fn from_params(p: &Params) -> StageResult<Self> {
        let s = |name: &str, default: &str| -> StageResult<String> {
            Ok(p.opt_str(name)?.unwrap_or_else(|| default.to_string()))
        };
        let decimals = match p.get("decimals") {
            Some(_) => p.usize("decimals")?,
            None => 2,
        };
        if decimals > 8 {
            return Err(StageError::param("decimals", "must be 0..=8"));
        }
        let default = paper_table4();
        let published = parse_published(p.get("published").unwrap_or(&default))?;
        Ok(FinAgentParams {
            title: s("title", "FinAgent: ours vs the paper")?,
            env: s("env", "finagent")?,
            split: s("split", "test")?,
            decimals,
            baseline: s("baseline", "buy_and_hold")?,
            published,
            published_source: s("published_source", PAPER_SOURCE)?,
            trace: trace::parse_key(p.get("trace").unwrap_or(&Value::Null))?,
        })
    }
}

fn parse_published(v: &Value) -> StageResult<BTreeMap<String, [Option<f64>; 3]>> {
    let bad = |m: String| StageError::param("published", m);
    let mut out = BTreeMap::new();
    let m = match v {
        Value::Null => return Ok(out),
        Value::Object(m) => m,
        other => {
            return Err(bad(format!(
                "must be a map ticker: {{arr, sr, mdd}}, got {other}"
            )));
        }
    };
    for (ticker, v) in m {
        let Value::Object(fields) = v else {
            return Err(bad(format!(
                "{ticker}: must be a map {{arr, sr, mdd}}, got {v}"
            )));
        };
        if let Some(k) = fields
            .keys()
            .find(|k| !PUBLISHED_KEYS.contains(&k.as_str()))
        {
            return Err(bad(format!(
                "{ticker}: unknown key '{k}' (expected arr, sr, mdd)"
            )));
        }
        let mut row = [None; 3];
        for (slot, key) in row.iter_mut().zip(PUBLISHED_KEYS) {
            *slot = match fields.get(key) {
                None | Some(Value::Null) => None,
                Some(x) => Some(
                    x.as_f64()
                        .ok_or_else(|| bad(format!("{ticker}.{key}: {x} is not a number")))?,
                ),
            };
        }
        out.insert(ticker.clone(), row);
    }
    Ok(out)
}

pub struct FinAgentReport;

impl Stage for FinAgentReport {
    fn kind(&self) -> &'static str {
        "finagent_report"
    }

    fn check_params(&self, p: &Params, _bound: &[&str]) -> StageResult<()> {
        FinAgentParams::from_params(p).map(drop)
    }

    fn spec(&self) -> StageSpec {
        let str_param = |name: &'static str, default: &str, doc: &'static str| {
            ParamSpec::with_default(name, ParamKind::Str, json!(default), doc)
        };
        StageSpec {
            doc: "FinAgent report: Table 4 (configurations, baselines, the published row) and \
                  Table 5 (ablations) layouts, return and trade charts, retrieval diagnostics, \
                  module failures and answer variety, the rule tools' records, one day traced \
                  through the modules' prompts and answers",
            inputs: vec![
                InputSpec::many(
                    "metrics",
                    "metrics",
                    "Metrics of the configurations and baselines",
                ),
                InputSpec::many("equity", "equity", "Daily portfolio paths"),
                InputSpec::many("trades", "trades", "Executed trades"),
                InputSpec::many(
                    "decisions",
                    "finagent_decisions",
                    "FinAgent's decisions of every configuration",
                ),
                InputSpec::many(
                    "intel",
                    "finagent_intel",
                    "Latest and past market intelligence",
                )
                .optional(),
                InputSpec::many("low", "finagent_low_reflection", "Low-level reflections")
                    .optional(),
                InputSpec::many(
                    "hits",
                    "memory_hits",
                    "News retrievals (memory_search) and the agent's reflection retrievals",
                )
                .optional(),
                InputSpec::many(
                    "tool_records",
                    "finagent_tool_records",
                    "The rule tools' train records",
                )
                .optional(),
                InputSpec::many("bars", "ohlcv", "Daily bars for the trade charts").optional(),
                InputSpec::many(
                    "usage",
                    "llm_usage",
                    "Calls, tokens and time of the module stages (their `usage` outputs)",
                )
                .optional(),
            ],
            outputs: vec![OutputSpec::dir(
                "report",
                "report.md, report.html and charts/*.svg",
            )],
            params: vec![
                str_param("title", "FinAgent: ours vs the paper", "Report title"),
                str_param("env", "finagent", "Environment of the compared rows"),
                str_param("split", "test", "Split of the tables and charts"),
                ParamSpec::with_default("decimals", ParamKind::Int, json!(2), "Decimals (0..=8)"),
                str_param("baseline", "buy_and_hold", "Strategy name of Buy & Hold"),
                ParamSpec::with_default(
                    "published",
                    ParamKind::Any,
                    paper_table4(),
                    "The published FinAgent row per ticker: {arr, sr, mdd} in % (SR plain)",
                ),
                str_param(
                    "published_source",
                    PAPER_SOURCE,
                    "Citation of the published figures",
                ),
                ParamSpec::with_default(
                    "trace",
                    ParamKind::Any,
                    Value::Null,
                    "The day to trace: {strategy, ticker, date}; default the first decision of \
                     the first strategy of the decisions",
                ),
            ],
        }
    }

    fn fingerprint(&self, _params: &Params) -> Fingerprint {
        Fingerprint::new(format!(
            "{}@{}+finagent{REVISION}",
            env!("CARGO_PKG_NAME"),
            env!("CARGO_PKG_VERSION")
        ))
    }
}

impl flag_core::RunStage for FinAgentReport {
    fn run(&self, ctx: &mut StageContext) -> StageResult<()> {
        let p = FinAgentParams::from_params(&ctx.params)?;
        ctx.progress(0, 3, "reading inputs");
        let inputs = Inputs::read(ctx)?;
        let fa = FinAgentInputs::read(ctx)?;
        ctx.progress(1, 3, "tables and charts");
        let report = build(&p, &inputs, &fa)?;
        ctx.progress(2, 3, "writing files");
        write_files(&ctx.output_dir("report")?, &report)?;
        ctx.log(format!(
            "finagent report: {} tables, {} charts",
            report.tables,
            report.charts.len()
        ));
        ctx.progress(3, 3, "done");
        Ok(())
    }
}

/// The day to trace: the param's key (which must name a decision), else the first decision
/// of the decisions' first strategy; None when there are no decisions.
pub fn trace_key(p: &FinAgentParams, fa: &FinAgentInputs) -> StageResult<Option<TraceKey>> {
    match &p.trace {
        Some(k) => {
            if fa
                .decisions
                .contains_key(&(k.strategy.clone(), k.ticker.clone(), k.date))
            {
                return Ok(Some(k.clone()));
            }
            let strategies: BTreeSet<&str> = fa.decisions.keys().map(|x| x.0.as_str()).collect();
            let why = if strategies.contains(k.strategy.as_str()) {
                format!(
                    "strategy '{}' has no decision for ticker '{}' on {}",
                    k.strategy,
                    k.ticker,
                    crate::data::fmt_date(k.date)
                )
            } else {
                format!(
                    "strategy '{}' is not in the decisions (they have: {})",
                    k.strategy,
                    strategies.into_iter().collect::<Vec<_>>().join(", ")
                )
            };
            Err(StageError::param("trace", why))
        }
        None => Ok(fa.decisions.keys().next().map(|(s, t, d)| TraceKey {
            strategy: s.clone(),
            ticker: t.clone(),
            date: *d,
        })),
    }
}

/// The whole report from read inputs.
pub fn build(p: &FinAgentParams, inputs: &Inputs, fa: &FinAgentInputs) -> StageResult<Report> {
    let key = trace_key(p, fa)?;
    let configs = sections::configs(p, inputs, fa);
    let mut out = sections::Out::default();
    out.blocks.push(Block::Para(format!(
        "FinAgent configurations found: {}. Modules: M = market intelligence (latest and past), \
         L = low-level reflection, H = high-level reflection, T = rule tools. Tables and charts \
         show the {} split of the {} environment; {MISSING} = not in the inputs.",
        if configs.is_empty() {
            "none".to_string()
        } else {
            configs
                .iter()
                .map(|c| format!("`{}` ({})", c.strategy, c.modules))
                .collect::<Vec<_>>()
                .join(", ")
        },
        p.split,
        p.env
    )));
    sections::table4(&mut out, p, inputs, &configs);
    sections::ablation(&mut out, p, inputs, &configs);
    plots::charts(&mut out, p, inputs, fa, &configs)?;
    diagnostics::retrieval(&mut out, fa);
    diagnostics::modules(&mut out, fa, &configs);
    sections::tools(&mut out, fa);

    out.blocks.push(Block::Heading(2, "One day traced".into()));
    let steps = match &key {
        Some(k) => {
            let steps = trace::steps(fa, k);
            let modules = fa
                .decisions
                .get(&(k.strategy.clone(), k.ticker.clone(), k.date))
                .map_or("", |d| d.modules.as_str());
            out.blocks.push(Block::Heading(3, trace::title(k)));
            out.blocks.push(Block::Para(format!(
                "Each module's prompt and raw answer of this day, in the order the method runs \
                 them. Configuration modules: {modules}; market intelligence and low-level \
                 reflection are computed once per day for every configuration, and reach the \
                 decision prompt only when their module is on."
            )));
            for i in 0..steps.len() {
                out.blocks.push(Block::Para(trace::marker(i)));
            }
            steps
        }
        None => {
            out.blocks
                .push(Block::Para("No decisions in the inputs.".into()));
            Vec::new()
        }
    };

    out.blocks.push(Block::Heading(2, "Inputs".into()));
    out.blocks.push(Block::Para(
        inputs
            .sources
            .iter()
            .chain(&fa.sources)
            .map(|s| format!("`{s}`"))
            .collect::<Vec<_>>()
            .join(", "),
    ));
    let mut md = markdown(&p.title, &out.blocks, &out.charts);
    let mut ht = html(&p.title, &out.blocks, &out.charts);
    trace::splice(&mut md, &mut ht, &steps);
    Ok(Report {
        markdown: md,
        html: ht,
        charts: out.charts,
        tables: out.tables,
    })
}
