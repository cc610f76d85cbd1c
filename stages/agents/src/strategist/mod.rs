//! `strategist`: every `period` trading days, per ticker, the LLM writes a strategy for the
//! next period (direction, confidence 1-3, explanation, weighted features), parsed strictly
//! and turned into the daily `llm_signal` rows the LLM-guided DDQN and `llm_only` read.
//! The i-th decision of every ticker goes to the model as one batch.
pub mod blocks;

use std::collections::BTreeMap;

use flag_core::arrow::array::{Array, Date32Array, RecordBatch, StringArray};
use flag_core::schema::schema;
use flag_core::{
    Fingerprint, InputSpec, OutputSpec, ParamKind, ParamSpec, Params, Stage, StageContext,
    StageError, StageResult, StageSpec,
};
use flag_trading::series::{Series, read_series, to_days};
use serde_json::{Value, json};

use self::blocks::{BlockInput, COLUMNS, Decided, blocks};
use crate::anon::Anonymiser;
use crate::parse::{Strategy, parse_strategy, reject_copied_strategy, template_examples};
use crate::prompt::{placeholders, prompt_files, prompt_param, prompt_path, read_prompts, render};
use crate::runner::{Outcome, run_with_retries};
use crate::signal::{SignalValues, strategy_signal};
use crate::util::{self, column};
use flag_llm::backend::{
    LlmBackend, LlmRequest, LlmSettings, backend_numerics, device_env, llm_param_specs, model_files,
};

/// The answer starts here; the model continues with the direction value.
pub const PREFILL: &str = "{\"direction\": \"";
const VERSION: &str = concat!(
    env!("CARGO_PKG_NAME"),
    "@",
    env!("CARGO_PKG_VERSION"),
    "/strategist-4"
);

pub struct Strategist;

/// Validated params.
#[derive(Debug, Clone)]
pub struct StrategistConfig {
    pub prompt: String,
    pub tickers: Option<Vec<String>>,
    pub start: i32,
    pub end: i32,
    pub period: usize,
    pub history: usize,
    pub memory: usize,
    pub news_days: usize,
    pub aliases: BTreeMap<String, Vec<String>>,
    pub llm: LlmSettings,
}

impl StrategistConfig {
    pub fn from_params(p: &Params) -> StageResult<Self> {
        let (start, end) = (to_days(p.date("start")?), to_days(p.date("end")?));
        if start > end {
            return Err(StageError::param("start", "must be on or before end"));
        }
        let positive = |n: &str| -> StageResult<usize> {
            let v = p.usize(n)?;
            if v == 0 {
                Err(StageError::param(n, "must be at least 1"))
            } else {
                Ok(v)
            }
        };
        Ok(StrategistConfig {
            prompt: prompt_param(p, "P0")?,
            tickers: util::ticker_filter(p)?,
            start,
            end,
            period: positive("period")?,
            history: positive("history")?,
            memory: p.usize("memory")?,
            news_days: positive("news_days")?,
            aliases: util::aliases(p)?,
            // The answer is one JSON object: generation stops where it closes.
            llm: LlmSettings::from_params(p, Vec::new())?.stopping_at_json(PREFILL),
        })
    }
}

/// One decision: where it applies and what came out.
#[derive(Debug, Clone)]
pub struct Decision {
    pub ticker: usize,
    pub row: usize,
    /// Last row the strategy applies to.
    pub valid_to: usize,
    pub outcome: Outcome<Strategy>,
    pub signal: SignalValues,
}

/// Decision rows, every `period`-th trading day of each ticker within [start, end], in
/// batches: batch i holds the i-th decision of every ticker that has one. A ticker's
/// decisions stay in order (its memory needs that) and no prompt reads another ticker, so a
/// ticker whose calendar is a day off the others' (a missing day, a later listing) still
/// shares their batch instead of running alone. Entries: (ticker index, row, last row it
/// applies to).
pub fn plan(
    series: &[Series],
    start: i32,
    end: i32,
    period: usize,
) -> Vec<Vec<(usize, usize, usize)>> {
    let mut out: Vec<Vec<(usize, usize, usize)>> = Vec::new();
    for (k, s) in series.iter().enumerate() {
        let r = s.range(start, end);
        for (i, row) in r.clone().step_by(period).enumerate() {
            let valid_to = (row + period).min(r.end) - 1;
            if out.len() <= i {
                out.push(Vec::new());
            }
            out[i].push((k, row, valid_to));
        }
    }
    out
}

/// The anonymised user prompt of one decision.
pub fn build_prompt(
    template: &str,
    file: &str,
    anon: &Anonymiser,
    input: &BlockInput,
) -> StageResult<String> {
    Ok(anon.apply(&render(template, file, &blocks(input))?))
}

/// Everything `decide` needs besides the model.
pub struct Inputs<'a> {
    pub cfg: &'a StrategistConfig,
    pub template: &'a str,
    pub retry: &'a str,
    pub series: &'a [Series],
    /// Per ticker index: (row, factors), sorted by row.
    pub news: &'a [Vec<(usize, Vec<String>)>],
}

/// Runs the decisions batch by batch (see [`plan`]; memory makes each ticker's sequential).
pub fn decide(
    inp: &Inputs,
    backend: &dyn LlmBackend,
    progress: &dyn Fn(u64, u64, &str),
) -> StageResult<Vec<Decision>> {
    let cfg = inp.cfg;
    let file = prompt_path("strategist", &cfg.prompt);
    let retry_file = prompt_path("strategist", "retry");
    let anons: Vec<Anonymiser> = inp
        .series
        .iter()
        .map(|s| Anonymiser::new(&s.ticker, &cfg.aliases))
        .collect();
    // A copy of the prompt's format example is not a strategy for the data shown.
    let examples = template_examples(inp.template, parse_strategy);
    let mut memory: Vec<Vec<Decided>> = vec![Vec::new(); inp.series.len()];
    let plan = plan(inp.series, cfg.start, cfg.end, cfg.period);
    let mut out = Vec::new();
    let total: u64 = plan.iter().map(|items| items.len() as u64).sum();
    for items in &plan {
        progress(out.len() as u64, total, "decisions");
        let prefill = cfg.llm.answer_prefill(PREFILL);
        let requests = items
            .iter()
            .map(|&(k, row, _)| {
                let input = BlockInput {
                    series: &inp.series[k],
                    row,
                    history: cfg.history,
                    period: cfg.period,
                    memory: &memory[k],
                    max_memory: cfg.memory,
                    news: &inp.news[k],
                    news_days: cfg.news_days,
                };
                Ok(LlmRequest::text(
                    build_prompt(inp.template, &file, &anons[k], &input)?,
                    prefill,
                ))
            })
            .collect::<StageResult<Vec<_>>>()?;
        let outcomes = run_with_retries(
            backend,
            &cfg.llm,
            (&retry_file, inp.retry),
            &requests,
            |a| parse_strategy(a).and_then(|s| reject_copied_strategy(s, &examples)),
        )?;
        for (&(k, row, valid_to), o) in items.iter().zip(outcomes) {
            let signal = match &o.value {
                Some(s) => {
                    memory[k].push(Decided {
                        row,
                        direction: s.direction,
                        confidence: s.confidence,
                        features: s.features.clone(),
                        explanation: s.explanation.clone(),
                    });
                    strategy_signal(backend, s, prefill.len(), &o.generation)?
                }
                None => SignalValues::neutral(&o.generation),
            };
            out.push(Decision {
                ticker: k,
                row,
                valid_to,
                outcome: o,
                signal,
            });
        }
    }
    progress(total, total, "decisions");
    out.sort_by_key(|d| (d.ticker, d.row));
    Ok(out)
}

/// (index of the trading day, factors) for one ticker.
pub type DayFactors = (usize, Vec<String>);

/// News factors per series (by ticker index): each factor row placed on the first trading
/// day on or after its trading_date. Failed analyst rows carry no factors and are skipped.
pub fn read_factors(batch: &RecordBatch, series: &[Series]) -> StageResult<Vec<Vec<DayFactors>>> {
    let ticker = column::<StringArray>(batch, "factors", "ticker", "utf8")?;
    let date = column::<Date32Array>(batch, "factors", "trading_date", "date32")?;
    let list = batch
        .column_by_name("factors")
        .and_then(|c| {
            c.as_any()
                .downcast_ref::<flag_core::arrow::array::ListArray>()
        })
        .ok_or_else(|| StageError::Input {
            input: "factors".into(),
            message: "column 'factors' is missing or not list<utf8>".into(),
        })?;
    let index: BTreeMap<&str, usize> = series
        .iter()
        .enumerate()
        .map(|(k, s)| (s.ticker.as_str(), k))
        .collect();
    let mut out = vec![Vec::new(); series.len()];
    for i in 0..batch.num_rows() {
        if ticker.is_null(i) || date.is_null(i) {
            return Err(util::null_err("factors", i, "ticker"));
        }
        let Some(&k) = index.get(ticker.value(i)) else {
            continue;
        };
        let s = &series[k];
        let row = s.dates.partition_point(|&d| d < date.value(i));
        if row >= s.dates.len() || list.is_null(i) {
            continue;
        }
        let values = list.value(i);
        let strings = values
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| StageError::Input {
                input: "factors".into(),
                message: "column 'factors' is not list<utf8>".into(),
            })?;
        let fs: Vec<String> = (0..strings.len())
            .filter(|&j| !strings.is_null(j))
            .map(|j| strings.value(j).to_string())
            .collect();
        if !fs.is_empty() {
            out[k].push((row, fs));
        }
    }
    for v in &mut out {
        v.sort_by_key(|x| x.0);
    }
    Ok(out)
}

/// The `llm_signal` rows: each decision repeated on every day it applies to.
pub fn signal_batch(
    series: &[Series],
    decisions: &[Decision],
    prompt: &str,
) -> StageResult<RecordBatch> {
    let rows: Vec<(&Decision, usize)> = decisions
        .iter()
        .flat_map(|d| (d.row..=d.valid_to).map(move |r| (d, r)))
        .collect();
    let s = |k: usize| &series[k];
    let features = |d: &Decision| {
        d.outcome.value.as_ref().map(|v| {
            let parts: Vec<String> = v
                .features
                .iter()
                .map(|(n, w)| format!("{}:{}", Value::String(n.clone()), json!(w)))
                .collect();
            format!("{{{}}}", parts.join(","))
        })
    };
    schema("llm_signal")?.batch(vec![
        util::utf8(rows.iter().map(|(d, _)| s(d.ticker).ticker.as_str())),
        util::date32(rows.iter().map(|(d, r)| s(d.ticker).dates[*r]).collect()),
        util::float64(rows.iter().map(|(d, _)| d.signal.direction).collect()),
        util::float64(rows.iter().map(|(d, _)| d.signal.strength).collect()),
        util::float64(rows.iter().map(|(d, _)| d.signal.interaction).collect()),
        util::date32(rows.iter().map(|(d, _)| s(d.ticker).dates[d.row]).collect()),
        util::date32(rows.iter().map(|(d, _)| s(d.ticker).dates[d.row]).collect()),
        util::date32(
            rows.iter()
                .map(|(d, _)| s(d.ticker).dates[d.valid_to])
                .collect(),
        ),
        util::opt_int64(
            rows.iter()
                .map(|(d, _)| d.outcome.value.as_ref().map(|v| i64::from(v.confidence)))
                .collect(),
        ),
        util::opt_float64(rows.iter().map(|(d, _)| d.signal.certainty).collect()),
        util::float64(rows.iter().map(|(d, _)| d.signal.entropy).collect()),
        util::float64(rows.iter().map(|(d, _)| d.signal.perplexity).collect()),
        util::opt_utf8(
            rows.iter()
                .map(|(d, _)| d.outcome.value.as_ref().map(|v| v.explanation.clone()))
                .collect(),
        ),
        util::opt_utf8(rows.iter().map(|(d, _)| features(d)).collect()),
        util::utf8(std::iter::repeat_n(prompt, rows.len())),
        util::int64(
            rows.iter()
                .map(|(d, _)| d.outcome.attempts as i64)
                .collect(),
        ),
        util::boolean(
            rows.iter()
                .map(|(d, _)| d.outcome.value.is_none())
                .collect(),
        ),
        util::opt_utf8(rows.iter().map(|(d, _)| d.outcome.error.clone()).collect()),
        util::utf8(rows.iter().map(|(d, _)| d.outcome.raw_text.as_str())),
    ])
}

/// Reads the `table` input, keeps the asked tickers (each must be present).
pub fn load_series(batch: &RecordBatch, tickers: Option<&[String]>) -> StageResult<Vec<Series>> {
    let all = read_series(batch, "table", COLUMNS)?;
    let Some(want) = tickers else { return Ok(all) };
    for t in want {
        if !all.iter().any(|s| &s.ticker == t) {
            return Err(StageError::param(
                "tickers",
                format!("ticker '{t}' is not in the table input"),
            ));
        }
    }
    Ok(all
        .into_iter()
        .filter(|s| want.contains(&s.ticker))
        .collect())
}

impl Stage for Strategist {
    fn kind(&self) -> &'static str {
        "strategist"
    }

    fn check_params(&self, p: &Params, _bound: &[&str]) -> StageResult<()> {
        StrategistConfig::from_params(p).map(drop)
    }

    fn spec(&self) -> StageSpec {
        let mut params = vec![
            ParamSpec::with_default(
                "prompt",
                ParamKind::Str,
                json!("P0"),
                "Prompt version: prompts/strategist/<prompt>.txt (P0..P4)",
            ),
            ParamSpec::with_default(
                "tickers",
                ParamKind::List,
                Value::Null,
                "Tickers to run (default: all in the table)",
            ),
            ParamSpec::required(
                "start",
                ParamKind::Date,
                "First day of the signal (the first decision is the first trading day on or after it)",
            ),
            ParamSpec::required("end", ParamKind::Date, "Last day of the signal"),
            ParamSpec::with_default(
                "period",
                ParamKind::Int,
                json!(20),
                "Trading days between decisions",
            ),
            ParamSpec::with_default(
                "history",
                ParamKind::Int,
                json!(10),
                "Daily closes shown in {{market}}",
            ),
            ParamSpec::with_default(
                "memory",
                ParamKind::Int,
                json!(3),
                "Previous strategies shown in {{memory}}",
            ),
            ParamSpec::with_default(
                "news_days",
                ParamKind::Int,
                json!(5),
                "Trading days of news factors shown in {{news}}",
            ),
            ParamSpec::with_default(
                "aliases",
                ParamKind::Any,
                json!({}),
                "Extra names to anonymise per ticker, e.g. {XOM: [Exxon]}",
            ),
        ];
        // Room for the longest answer the schemas allow in practice: a 200-character
        // explanation and all ten P3 features with their weights (about 170 tokens).
        params.extend(llm_param_specs(256));
        StageSpec {
            doc: "LLM strategist (LLM-guided RL): every `period` trading days per ticker, an anonymised prompt \
                  (prompts/strategist/<prompt>.txt) -> strict JSON strategy -> daily signal with \
                  interaction = direction * sqrt(confidence / 3 * certainty).",
            inputs: vec![
                InputSpec {
                    name: "table",
                    // Read by column name: ticker, date, close and the indicator columns of
                    // strategist::blocks::COLUMNS (schema `indicators`).
                    schema: None,
                    required: true,
                    many: false,
                    doc: "Indicators table",
                },
                InputSpec::many(
                    "factors",
                    "news_factors",
                    "Analyst news factors, one or more artifacts (e.g. one per news source); \
                     needed by prompts using {{news}}, e.g. P4",
                )
                .optional(),
            ],
            outputs: vec![OutputSpec::parquet(
                "signals",
                "llm_signal",
                "Daily signal per ticker, with each strategy",
            )],
            params,
        }
    }

    fn fingerprint(&self, params: &Params) -> Fingerprint {
        let mut f = Fingerprint::new(VERSION);
        f.files = prompt_files("strategist", params, "P0");
        f
    }

    fn external_files(&self, params: &Params) -> StageResult<Vec<std::path::PathBuf>> {
        model_files(params)
    }

    fn environment(&self, params: &Params) -> Vec<(String, String)> {
        device_env(params)
    }

    fn numerics(&self, params: &Params) -> flag_core::Numerics {
        backend_numerics(params)
    }
}

impl flag_core::RunStage for Strategist {
    fn run(&self, ctx: &mut StageContext) -> StageResult<()> {
        let cfg = StrategistConfig::from_params(&ctx.params)?;
        let files = read_prompts(ctx, "strategist", &cfg.prompt)?;
        let (template, retry) = (files.template, files.retry);
        let cfg = StrategistConfig {
            llm: cfg.llm.constrained_by(files.schema),
            ..cfg
        };
        let series = load_series(&ctx.read_input("table")?, cfg.tickers.as_deref())?;
        let news = if placeholders(&template).contains(&"news") {
            if !ctx.has_input("factors") {
                return Err(StageError::Input {
                    input: "factors".into(),
                    message: format!(
                        "prompt {} uses {{{{news}}}}: bind the analyst's factors",
                        cfg.prompt
                    ),
                });
            }
            // Several analyst artifacts (one per news source) merge per ticker and day.
            let mut merged = vec![Vec::new(); series.len()];
            for (_, batch) in ctx.read_inputs("factors")? {
                for (all, more) in merged.iter_mut().zip(read_factors(&batch, &series)?) {
                    all.extend(more);
                }
            }
            for v in &mut merged {
                v.sort_by_key(|(row, _): &DayFactors| *row);
            }
            merged
        } else {
            vec![Vec::new(); series.len()]
        };
        let backend = cfg.llm.load_backend()?;
        ctx.log(format!(
            "model {}, device {}, prompt {}, answers {}",
            backend.name(),
            cfg.llm.device_name,
            cfg.prompt,
            if cfg.llm.opts.constraint.is_some() {
                "constrained by the prompt's schema"
            } else {
                "validated after generation"
            }
        ));
        let inputs = Inputs {
            cfg: &cfg,
            template: &template,
            retry: &retry,
            series: &series,
            news: &news,
        };
        let progress = |d: u64, t: u64, m: &str| ctx.progress(d, t, m);
        let decisions = decide(&inputs, backend.as_ref(), &progress)?;
        let failed = decisions
            .iter()
            .filter(|d| d.outcome.value.is_none())
            .count();
        let retried = decisions.iter().filter(|d| d.outcome.attempts > 1).count();
        ctx.log(format!(
            "{} decisions, {failed} failed, {retried} needed a retry",
            decisions.len()
        ));
        let batch = signal_batch(&series, &decisions, &cfg.prompt)?;
        ctx.write_parquet("signals", &[batch])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(ticker: &str, dates: Vec<i32>) -> Series {
        Series {
            ticker: ticker.into(),
            close: vec![100.0; dates.len()],
            dates,
            cols: BTreeMap::new(),
        }
    }

    /// Regression: batches were decision dates, so a ticker missing one day (or listed later)
    /// decided alone on its own dates, prefilling its whole prompt at batch 1 (in flag.yaml
    /// 96 of 197 model calls). Now batch i is every ticker's i-th decision.
    #[test]
    fn a_ticker_a_day_off_the_others_shares_their_batches() {
        let full: Vec<i32> = (0..10).collect();
        let missing_day: Vec<i32> = (0..10).filter(|&d| d != 1).collect();
        let later: Vec<i32> = (4..10).collect();
        let s = [
            series("A", full),
            series("B", missing_day),
            series("C", later),
        ];
        let p = plan(&s, 0, 9, 3);
        assert_eq!(
            p,
            vec![
                vec![(0, 0, 2), (1, 0, 2), (2, 0, 2)],
                vec![(0, 3, 5), (1, 3, 5), (2, 3, 5)],
                vec![(0, 6, 8), (1, 6, 8)],
                vec![(0, 9, 9)],
            ]
        );
        // Each ticker's rows stay in order across batches.
        for k in 0..3 {
            let rows: Vec<usize> = p
                .iter()
                .flatten()
                .filter(|e| e.0 == k)
                .map(|e| e.1)
                .collect();
            assert!(rows.windows(2).all(|w| w[0] < w[1]), "{rows:?}");
        }
    }
}
