//! Market intelligence, FinAgent's module M, as two whole-window batch stages (neither depends
//! on the agent's decisions, so every ablation shares them through the cache):
//!
//! * `finagent_intel`: each decision day's own news (at most `max_items`, the latest
//!   published; see [`super::data::todays_items`]) with the asset description and today's
//!   prices -> per-item duration and sentiment, a summary, and three retrieval queries
//!   (written as a `memory_queries` table for `memory_search`).
//! * `finagent_past_intel`: the items `memory_search` kept for the day (strictly earlier
//!   trading dates, oldest first) -> the same analysis and a summary.
use std::collections::BTreeMap;

use flag_core::arrow::array::RecordBatch;
use flag_core::schema::schema;
use flag_core::{
    Fingerprint, InputSpec, OutputSpec, ParamKind, ParamSpec, Stage, StageContext, StageResult,
    StageSpec,
};
use flag_llm::backend::LlmBackend;
use flag_trading::series::from_days;
use serde_json::json;

use super::answer::{Horizon, ItemAnalysis, parse_intel, parse_past_intel};
use super::config::{ModuleConfig, module_files, module_param_specs, positive};
use super::data::{NewsItem, read_bars, read_items, read_kept_hits, todays_items};
use super::module::{Call, ModuleForm, run_module};
use super::text::todays_prices;
use super::usage::{UsageRow, usage_batch, usage_output};
use crate::prompt::{prompt_path, render};
use crate::runner::{CallUsage, Outcome};
use crate::util;

const VERSION: &str = concat!(
    env!("CARGO_PKG_NAME"),
    "@",
    env!("CARGO_PKG_VERSION"),
    "/finagent-intel-1"
);

/// One (ticker, day) of either module.
#[derive(Debug, Clone)]
pub struct IntelRow {
    pub ticker: String,
    pub date: i32,
    pub item_ids: Vec<String>,
    pub prompt: Option<String>,
    pub analysis: Vec<ItemAnalysis>,
    pub summary: Option<String>,
    /// (short, medium, long) queries of the latest module.
    pub queries: Option<[String; 3]>,
    pub attempts: usize,
    pub failed: bool,
    pub error: Option<String>,
    pub raw_text: Option<String>,
    /// The call's cost (None when the model was not asked).
    pub usage: Option<CallUsage>,
}

impl IntelRow {
    fn empty(ticker: &str, date: i32) -> Self {
        IntelRow {
            ticker: ticker.to_string(),
            date,
            item_ids: Vec::new(),
            prompt: None,
            analysis: Vec::new(),
            summary: None,
            queries: None,
            attempts: 0,
            failed: false,
            error: None,
            raw_text: None,
            usage: None,
        }
    }

    fn fill<T>(&mut self, o: Outcome<T>, f: impl FnOnce(&mut Self, T)) {
        self.attempts = o.attempts;
        self.usage = Some(o.usage);
        self.error = o.error;
        self.raw_text = Some(o.raw_text);
        match o.value {
            Some(v) => f(self, v),
            None => self.failed = true,
        }
    }
}

pub fn intel_batch(module: &str, rows: &[IntelRow]) -> StageResult<RecordBatch> {
    let list = |f: &dyn Fn(&ItemAnalysis) -> &'static str| {
        rows.iter()
            .map(|r| r.analysis.iter().map(|a| f(a).to_string()).collect())
            .collect::<Vec<Vec<String>>>()
    };
    let query = |k: usize| {
        util::opt_utf8(
            rows.iter()
                .map(|r| r.queries.as_ref().map(|q| q[k].clone()))
                .collect(),
        )
    };
    schema("finagent_intel")?.batch(vec![
        util::utf8(rows.iter().map(|r| r.ticker.as_str())),
        util::date32(rows.iter().map(|r| r.date).collect()),
        util::utf8(std::iter::repeat_n(module, rows.len())),
        util::boolean(rows.iter().map(|r| r.prompt.is_some()).collect()),
        util::list_utf8(&rows.iter().map(|r| r.item_ids.clone()).collect::<Vec<_>>()),
        util::list_utf8(&list(&|a| a.duration.as_str())),
        util::list_utf8(&list(&|a| a.sentiment.as_str())),
        util::opt_utf8(rows.iter().map(|r| r.summary.clone()).collect()),
        query(0),
        query(1),
        query(2),
        util::opt_utf8(rows.iter().map(|r| r.prompt.clone()).collect()),
        util::int64(rows.iter().map(|r| r.attempts as i64).collect()),
        util::boolean(rows.iter().map(|r| r.failed).collect()),
        util::opt_utf8(rows.iter().map(|r| r.error.clone()).collect()),
        util::opt_utf8(rows.iter().map(|r| r.raw_text.clone()).collect()),
    ])
}

/// The `usage` rows of the days the model was asked about.
pub fn intel_usage(module: &'static str, rows: &[IntelRow]) -> StageResult<RecordBatch> {
    usage_batch(
        rows.iter()
            .filter_map(|r| {
                r.usage.map(|usage| UsageRow {
                    ticker: r.ticker.clone(),
                    date: r.date,
                    module,
                    attempts: r.attempts,
                    usage,
                })
            })
            .collect(),
    )
}

/// The `memory_queries` rows of the latest module: three per answered day.
pub fn queries_batch(rows: &[IntelRow]) -> StageResult<RecordBatch> {
    let mut q: Vec<(&str, i32, &str, &str)> = Vec::new();
    for r in rows {
        if let Some(qs) = &r.queries {
            for (k, h) in Horizon::ALL.into_iter().enumerate() {
                q.push((r.ticker.as_str(), r.date, h.query_type(), qs[k].as_str()));
            }
        }
    }
    schema("memory_queries")?.batch(vec![
        util::utf8(q.iter().map(|x| x.0)),
        util::date32(q.iter().map(|x| x.1).collect()),
        util::utf8(q.iter().map(|x| x.2)),
        util::utf8(q.iter().map(|x| x.3)),
    ])
}

fn numbered(items: &[&NewsItem], dated: bool) -> String {
    items
        .iter()
        .enumerate()
        .map(|(k, it)| {
            if dated {
                format!("{}. [{}] {}", k + 1, from_days(it.date), it.text)
            } else {
                format!("{}. {}", k + 1, it.text)
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn common_params(default_prompt: &str, max_tokens: u64) -> Vec<ParamSpec> {
    let mut v = module_param_specs(default_prompt, max_tokens);
    v.push(ParamSpec::with_default(
        "max_items",
        ParamKind::Int,
        json!(5),
        "Most news items one prompt shows (latest: the day's latest published)",
    ));
    v
}

fn run_intel_module(
    ctx: &mut StageContext,
    default_prompt: &str,
    past: bool,
) -> StageResult<Vec<IntelRow>> {
    let cfg = ModuleConfig::from_params(&ctx.params, default_prompt)?;
    let max_items = positive(&ctx.params, "max_items")?;
    let (template, schema, retry) = cfg.read_prompts(ctx)?;
    let file = prompt_path(super::config::AGENT, &cfg.prompt);
    let retry_file = prompt_path(super::config::AGENT, "retry");
    let items = read_items(&ctx.read_input("items")?, "items")?;
    let bars = read_bars(&ctx.read_input("bars")?, "bars")?;
    let hits = if past {
        read_kept_hits(&ctx.read_input("hits")?, "hits")?
    } else {
        BTreeMap::new()
    };
    let no_items: Vec<NewsItem> = Vec::new();
    let mut rows = Vec::new();
    let mut calls = Vec::new();
    let mut called = Vec::new();
    for (ticker, s) in bars.iter().filter(|(t, _)| cfg.wants(t)) {
        let its = items.get(ticker).unwrap_or(&no_items);
        let by_id: BTreeMap<&str, &NewsItem> = its.iter().map(|x| (x.id.as_str(), x)).collect();
        for i in cfg.days(s) {
            let date = s.dates[i];
            let shown: Vec<&NewsItem> = if past {
                let kept = hits
                    .get(&(ticker.clone(), date))
                    .map_or(&[][..], Vec::as_slice);
                let mut v = Vec::new();
                for (_, id) in kept {
                    let it =
                        by_id
                            .get(id.as_str())
                            .ok_or_else(|| flag_core::StageError::Input {
                                input: "hits".into(),
                                message: format!(
                                    "item {id} ({ticker}, {}) is not in the items input",
                                    from_days(date)
                                ),
                            })?;
                    v.push(*it);
                }
                let n = v.len();
                v.into_iter().skip(n.saturating_sub(max_items)).collect()
            } else {
                todays_items(its, date, max_items)
            };
            let mut row = IntelRow::empty(ticker, date);
            if !shown.is_empty() {
                let vars: BTreeMap<&str, String> = [
                    ("asset", ticker.clone()),
                    ("description", cfg.description(ticker).to_string()),
                    ("date", from_days(date).to_string()),
                    ("prices", todays_prices(s, i)),
                    ("n_items", shown.len().to_string()),
                    ("news", numbered(&shown, past)),
                ]
                .into_iter()
                .collect();
                let prompt = render(&template, &file, &vars)?;
                row.item_ids = shown.iter().map(|x| x.id.clone()).collect();
                row.prompt = Some(prompt.clone());
                calls.push(Call {
                    prompt,
                    list_len: shown.len(),
                    images: Vec::new(),
                });
                called.push(rows.len());
            }
            rows.push(row);
        }
    }
    if calls.is_empty() {
        ctx.log(format!("{} days, none with items to read", rows.len()));
        return Ok(rows);
    }
    let backend = cfg.llm.load_backend()?;
    ctx.log(format!(
        "model {}, device {}, {} days, {} with items",
        backend.name(),
        cfg.llm.device_name,
        rows.len(),
        calls.len()
    ));
    let form = ModuleForm {
        schema: &schema,
        list_property: Some("analysis"),
        retry: (&retry_file, &retry),
    };
    let total = calls.len() as u64;
    let progress = |d: u64| ctx.progress(d, total, "days");
    let b: &dyn LlmBackend = backend.as_ref();
    if past {
        let out = run_module(
            b,
            &cfg.llm,
            &form,
            &calls,
            cfg.batch_size,
            parse_past_intel,
            &progress,
        )?;
        for (k, o) in called.iter().zip(out) {
            rows[*k].fill(o, |r, a| {
                r.analysis = a.analysis;
                r.summary = Some(a.summary);
            });
        }
    } else {
        let out = run_module(
            b,
            &cfg.llm,
            &form,
            &calls,
            cfg.batch_size,
            parse_intel,
            &progress,
        )?;
        for (k, o) in called.iter().zip(out) {
            rows[*k].fill(o, |r, a| {
                r.analysis = a.analysis;
                r.summary = Some(a.summary);
                let q = a.queries;
                r.queries = Some([q.short_term, q.medium_term, q.long_term]);
            });
        }
    }
    let failed = rows.iter().filter(|r| r.failed).count();
    ctx.log(format!("{} calls, {failed} failed", calls.len()));
    Ok(rows)
}

fn fingerprint(p: &flag_core::Params, default_prompt: &str) -> Fingerprint {
    let mut f = Fingerprint::new(VERSION);
    f.files = module_files(p, default_prompt);
    f
}

pub struct LatestIntel;

impl Stage for LatestIntel {
    fn kind(&self) -> &'static str {
        "finagent_intel"
    }

    fn check_params(&self, p: &flag_core::Params, _bound: &[&str]) -> StageResult<()> {
        ModuleConfig::from_params(p, "intel").map(drop)
    }

    fn spec(&self) -> StageSpec {
        StageSpec {
            doc: "FinAgent latest market intelligence: per ticker and decision day, the day's news -> per-item \
                  duration and sentiment, a summary and three retrieval queries (strict JSON, bounded retries).",
            inputs: vec![
                InputSpec::one("items", "news_items", "Embedded news items (news_embed)"),
                InputSpec::one(
                    "bars",
                    "ohlcv",
                    "Daily bars: the decision days and today's prices",
                ),
            ],
            outputs: vec![
                OutputSpec::parquet("intel", "finagent_intel", "One row per ticker and day"),
                OutputSpec::parquet(
                    "queries",
                    "memory_queries",
                    "Three queries per answered day",
                ),
                usage_output(),
            ],
            // The longest answer the schema allows at one token per character: a 300-character
            // summary, three 80-character queries, ~15 tokens per item analysis, JSON.
            params: common_params("intel", 704),
        }
    }

    fn fingerprint(&self, params: &flag_core::Params) -> Fingerprint {
        fingerprint(params, "intel")
    }

    super::config::llm_stage_environment!();
}

impl flag_core::RunStage for LatestIntel {
    fn run(&self, ctx: &mut StageContext) -> StageResult<()> {
        let rows = run_intel_module(ctx, "intel", false)?;
        let batch = intel_batch("latest", &rows)?;
        ctx.write_parquet("intel", &[batch])?;
        let q = queries_batch(&rows)?;
        ctx.write_parquet("queries", &[q])?;
        ctx.write_parquet("usage", &[intel_usage("latest_intel", &rows)?])?;
        Ok(())
    }
}

pub struct PastIntel;

impl Stage for PastIntel {
    fn kind(&self) -> &'static str {
        "finagent_past_intel"
    }

    fn check_params(&self, p: &flag_core::Params, _bound: &[&str]) -> StageResult<()> {
        ModuleConfig::from_params(p, "past_intel").map(drop)
    }

    fn spec(&self) -> StageSpec {
        StageSpec {
            doc: "FinAgent past market intelligence: per ticker and decision day, the earlier news items that \
                  diversified retrieval kept -> per-item duration and sentiment and a summary.",
            inputs: vec![
                InputSpec::one("items", "news_items", "Embedded news items (news_embed)"),
                InputSpec::one(
                    "hits",
                    "memory_hits",
                    "Retrieval results of the latest module's queries",
                ),
                InputSpec::one("bars", "ohlcv", "Daily bars: the decision days"),
            ],
            outputs: vec![
                OutputSpec::parquet(
                    "intel",
                    "finagent_intel",
                    "One row per ticker and day (module past)",
                ),
                usage_output(),
            ],
            // A 300-character summary and up to 9 item analyses at one token per character.
            params: common_params("past_intel", 512),
        }
    }

    fn fingerprint(&self, params: &flag_core::Params) -> Fingerprint {
        fingerprint(params, "past_intel")
    }

    super::config::llm_stage_environment!();
}

impl flag_core::RunStage for PastIntel {
    fn run(&self, ctx: &mut StageContext) -> StageResult<()> {
        let rows = run_intel_module(ctx, "past_intel", true)?;
        let batch = intel_batch("past", &rows)?;
        ctx.write_parquet("intel", &[batch])?;
        ctx.write_parquet("usage", &[intel_usage("past_intel", &rows)?])?;
        Ok(())
    }
}
