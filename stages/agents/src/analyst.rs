//! `analyst`: per ticker and trading date with news, the LLM condenses the day's items into
//! 2-5 short factors (LLMFactor style). Items, and the factors that come back, are anonymised
//! (companies, people, dates), so the strategist's P4 prompt can show them safely.
use std::collections::BTreeMap;

use flag_core::arrow::array::{Array, Date32Array, RecordBatch, StringArray};
use flag_core::schema::schema;
use flag_core::{
    Fingerprint, InputSpec, OutputSpec, ParamKind, ParamSpec, Params, Stage, StageContext,
    StageError, StageResult, StageSpec,
};
use serde_json::{Value, json};

use crate::anon::Anonymiser;
use crate::parse::{parse_factors, reject_copied_factors, template_examples};
use crate::prompt::{prompt_files, prompt_param, prompt_path, read_prompts, render};
use crate::runner::{Outcome, run_with_retries};
use crate::util::{self, column};
use flag_llm::backend::{
    LlmBackend, LlmRequest, LlmSettings, backend_numerics, device_env, llm_param_specs, model_files,
};

pub const PREFILL: &str = "{\"factors\": [\"";
const VERSION: &str = concat!(
    env!("CARGO_PKG_NAME"),
    "@",
    env!("CARGO_PKG_VERSION"),
    "/analyst-5"
);

pub struct Analyst;

#[derive(Debug, Clone)]
pub struct AnalystConfig {
    pub prompt: String,
    pub tickers: Option<Vec<String>>,
    pub start: Option<i32>,
    pub end: Option<i32>,
    pub max_items: usize,
    pub max_chars: usize,
    pub batch_size: usize,
    pub aliases: BTreeMap<String, Vec<String>>,
    pub llm: LlmSettings,
}

impl AnalystConfig {
    pub fn from_params(p: &Params) -> StageResult<Self> {
        let positive = |n: &str| -> StageResult<usize> {
            let v = p.usize(n)?;
            if v == 0 {
                Err(StageError::param(n, "must be at least 1"))
            } else {
                Ok(v)
            }
        };
        Ok(AnalystConfig {
            prompt: prompt_param(p, "A0")?,
            tickers: util::ticker_filter(p)?,
            start: util::opt_date(p, "start")?,
            end: util::opt_date(p, "end")?,
            max_items: positive("max_items")?,
            max_chars: positive("max_chars")?,
            batch_size: positive("batch_size")?,
            aliases: util::aliases(p)?,
            // The answer is one JSON object: generation stops where it closes.
            llm: LlmSettings::from_params(p, Vec::new())?.stopping_at_json(PREFILL),
        })
    }
}

/// One (ticker, trading date) with its news items as shown: "title: summary".
#[derive(Debug, Clone, PartialEq)]
pub struct Day {
    pub ticker: String,
    pub date: i32,
    pub items: Vec<String>,
}

/// Groups the news input by (ticker, trading_date), keeping the first `max_items` items of
/// each day in input order (the schema sorts them by publication time).
pub fn group_news(batch: &RecordBatch, cfg: &AnalystConfig) -> StageResult<Vec<Day>> {
    let ticker = column::<StringArray>(batch, "news", "ticker", "utf8")?;
    let date = column::<Date32Array>(batch, "news", "trading_date", "date32")?;
    let title = column::<StringArray>(batch, "news", "title", "utf8")?;
    let summary = column::<StringArray>(batch, "news", "summary", "utf8")?;
    let mut days: BTreeMap<(String, i32), Vec<String>> = BTreeMap::new();
    for i in 0..batch.num_rows() {
        for (arr, name) in [(ticker, "ticker"), (title, "title")] {
            if arr.is_null(i) {
                return Err(util::null_err("news", i, name));
            }
        }
        if date.is_null(i) {
            return Err(util::null_err("news", i, "trading_date"));
        }
        let (t, d) = (ticker.value(i), date.value(i));
        if cfg
            .tickers
            .as_ref()
            .is_some_and(|w| !w.iter().any(|x| x == t))
            || cfg.start.is_some_and(|s| d < s)
            || cfg.end.is_some_and(|e| d > e)
        {
            continue;
        }
        let items = days.entry((t.to_string(), d)).or_default();
        if items.len() >= cfg.max_items {
            continue;
        }
        let mut text = title.value(i).trim().to_string();
        if !summary.is_null(i) && !summary.value(i).trim().is_empty() {
            text = format!("{text}: {}", summary.value(i).trim());
        }
        let text: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
        items.push(truncate(&text, cfg.max_chars));
    }
    Ok(days
        .into_iter()
        .map(|((ticker, date), items)| Day {
            ticker,
            date,
            items,
        })
        .collect())
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut t: String = s.chars().take(max).collect();
    t.push_str("...");
    t
}

/// The anonymised prompt of one day.
pub fn build_prompt(
    template: &str,
    file: &str,
    anon: &Anonymiser,
    day: &Day,
) -> StageResult<String> {
    let news = day
        .items
        .iter()
        .enumerate()
        .map(|(k, it)| format!("{}. {it}", k + 1))
        .collect::<Vec<_>>()
        .join("\n");
    let vars: BTreeMap<&str, String> = [("news", news), ("n_items", day.items.len().to_string())]
        .into_iter()
        .collect();
    Ok(anon.apply(&render(template, file, &vars)?))
}

/// Runs every day through the model, `batch_size` prompts at a time in (date, ticker) order
/// (so one date's tickers share a batch). Returns outcomes in `days` order, factors
/// anonymised again (the model may reintroduce a name it guessed).
pub fn analyse(
    cfg: &AnalystConfig,
    template: &str,
    retry: &str,
    days: &[Day],
    backend: &dyn LlmBackend,
    progress: &dyn Fn(u64, u64, &str),
) -> StageResult<Vec<Outcome<Vec<String>>>> {
    let file = prompt_path("analyst", &cfg.prompt);
    let retry_file = prompt_path("analyst", "retry");
    let mut anons: BTreeMap<&str, Anonymiser> = BTreeMap::new();
    for d in days {
        anons
            .entry(d.ticker.as_str())
            .or_insert_with(|| Anonymiser::new(&d.ticker, &cfg.aliases));
    }
    // A copy of the prompt's example factors is not an analysis of the day's news.
    let examples = template_examples(template, parse_factors);
    let mut order: Vec<usize> = (0..days.len()).collect();
    order.sort_by_key(|&i| (days[i].date, days[i].ticker.clone()));
    let mut out: Vec<Option<Outcome<Vec<String>>>> = vec![None; days.len()];
    for (n, chunk) in order.chunks(cfg.batch_size).enumerate() {
        progress((n * cfg.batch_size) as u64, days.len() as u64, "news days");
        let prefill = cfg.llm.answer_prefill(PREFILL);
        let requests = chunk
            .iter()
            .map(|&i| {
                Ok(LlmRequest::text(
                    build_prompt(template, &file, &anons[days[i].ticker.as_str()], &days[i])?,
                    prefill,
                ))
            })
            .collect::<StageResult<Vec<_>>>()?;
        let outcomes = run_with_retries(backend, &cfg.llm, (&retry_file, retry), &requests, |a| {
            parse_factors(a).and_then(|f| reject_copied_factors(f, &examples))
        })?;
        for (&i, mut o) in chunk.iter().zip(outcomes) {
            let anon = &anons[days[i].ticker.as_str()];
            if let Some(fs) = o.value.as_mut() {
                *fs = fs.iter().map(|f| anon.apply(f)).collect();
            }
            out[i] = Some(o);
        }
    }
    progress(days.len() as u64, days.len() as u64, "news days");
    out.into_iter()
        .map(|o| {
            o.ok_or_else(|| StageError::Invalid("a news day was left without an outcome".into()))
        })
        .collect()
}

pub fn factors_batch(
    days: &[Day],
    outcomes: &[Outcome<Vec<String>>],
    prompt: &str,
) -> StageResult<RecordBatch> {
    let n = days.len();
    let factors: Vec<Vec<String>> = outcomes
        .iter()
        .map(|o| o.value.clone().unwrap_or_default())
        .collect();
    schema("news_factors")?.batch(vec![
        util::utf8(days.iter().map(|d| d.ticker.as_str())),
        util::date32(days.iter().map(|d| d.date).collect()),
        util::int64(days.iter().map(|d| d.items.len() as i64).collect()),
        util::list_utf8(&factors),
        util::utf8(std::iter::repeat_n(prompt, n)),
        util::int64(outcomes.iter().map(|o| o.attempts as i64).collect()),
        util::boolean(outcomes.iter().map(|o| o.value.is_none()).collect()),
        util::opt_utf8(outcomes.iter().map(|o| o.error.clone()).collect()),
        util::float64(outcomes.iter().map(|o| o.generation.entropy).collect()),
        util::float64(outcomes.iter().map(|o| o.generation.perplexity).collect()),
        util::utf8(outcomes.iter().map(|o| o.raw_text.as_str())),
    ])
}

impl Stage for Analyst {
    fn kind(&self) -> &'static str {
        "analyst"
    }

    fn check_params(&self, p: &Params, _bound: &[&str]) -> StageResult<()> {
        AnalystConfig::from_params(p).map(drop)
    }

    fn spec(&self) -> StageSpec {
        let mut params = vec![
            ParamSpec::with_default(
                "prompt",
                ParamKind::Str,
                json!("A0"),
                "Prompt version: prompts/analyst/<prompt>.txt",
            ),
            ParamSpec::with_default(
                "tickers",
                ParamKind::List,
                Value::Null,
                "Tickers to analyse (default: all in the news)",
            ),
            ParamSpec::with_default(
                "start",
                ParamKind::Date,
                Value::Null,
                "First trading_date analysed",
            ),
            ParamSpec::with_default(
                "end",
                ParamKind::Date,
                Value::Null,
                "Last trading_date analysed",
            ),
            ParamSpec::with_default(
                "max_items",
                ParamKind::Int,
                json!(8),
                "News items per day shown (the earliest)",
            ),
            ParamSpec::with_default(
                "max_chars",
                ParamKind::Int,
                json!(300),
                "Characters per item (title: summary), longer ones cut",
            ),
            ParamSpec::with_default(
                "batch_size",
                ParamKind::Int,
                json!(8),
                "Prompts per model batch",
            ),
            ParamSpec::with_default(
                "aliases",
                ParamKind::Any,
                json!({}),
                "Extra names to anonymise per ticker",
            ),
        ];
        // The longest answer the schema allows: 5 factors of 60 characters, which a looping
        // small model spells one token per character ("1.1.1..."), with the JSON around them.
        params.extend(llm_param_specs(320));
        StageSpec {
            doc: "LLM news analyst: per ticker and trading date, 2-5 anonymised factors from the day's news \
                  (prompts/analyst/<prompt>.txt), strict JSON, bounded retries, failures recorded.",
            inputs: vec![InputSpec::one(
                "news",
                "news",
                "News items with their trading date",
            )],
            outputs: vec![OutputSpec::parquet(
                "factors",
                "news_factors",
                "Factors per ticker and trading date",
            )],
            params,
        }
    }

    fn fingerprint(&self, params: &Params) -> Fingerprint {
        let mut f = Fingerprint::new(VERSION);
        f.files = prompt_files("analyst", params, "A0");
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

impl flag_core::RunStage for Analyst {
    fn run(&self, ctx: &mut StageContext) -> StageResult<()> {
        let cfg = AnalystConfig::from_params(&ctx.params)?;
        let files = read_prompts(ctx, "analyst", &cfg.prompt)?;
        let (template, retry) = (files.template, files.retry);
        let cfg = AnalystConfig {
            llm: cfg.llm.constrained_by(files.schema),
            ..cfg
        };
        let days = group_news(&ctx.read_input("news")?, &cfg)?;
        let backend = cfg.llm.load_backend()?;
        ctx.log(format!(
            "model {}, device {}, {} news days",
            backend.name(),
            cfg.llm.device_name,
            days.len()
        ));
        let progress = |d: u64, t: u64, m: &str| ctx.progress(d, t, m);
        let outcomes = analyse(&cfg, &template, &retry, &days, backend.as_ref(), &progress)?;
        let failed = outcomes.iter().filter(|o| o.value.is_none()).count();
        ctx.log(format!("{} days, {failed} failed", days.len()));
        let batch = factors_batch(&days, &outcomes, &cfg.prompt)?;
        ctx.write_parquet("factors", &[batch])?;
        Ok(())
    }
}
