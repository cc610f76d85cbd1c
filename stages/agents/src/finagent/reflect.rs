//! `finagent_low_reflection`: FinAgent's low-level reflection (module L) as a whole-window
//! batch stage. Per ticker and decision day: the latest and past intelligence summaries, the
//! Kline chart of the last 14 trading days as text and the 1/7/14-day moves -> reasoning per
//! horizon and a query for earlier reflections. It reads no decision, so every ablation
//! shares it; retrieving earlier reflections happens in the agent stage, which embeds them.
use std::collections::BTreeMap;

use super::chart_png::kline_png;
use super::usage::{UsageRow, usage_batch, usage_output};
use crate::runner::CallUsage;
use flag_core::arrow::array::RecordBatch;
use flag_core::schema::schema;
use flag_core::{Fingerprint, InputSpec, OutputSpec, Stage, StageContext, StageResult, StageSpec};
use flag_trading::series::from_days;

use super::answer::{LowReflection, parse_low_reflection};
use super::config::{AGENT, ModuleConfig, chart_images_param, module_files, module_param_specs};
use super::data::{ModuleRow, read_bars, read_module_rows};
use super::module::{Call, ModuleForm, run_module};
use super::text::{kline_text, price_moves};
use crate::prompt::{prompt_path, render};
use crate::util;

const VERSION: &str = concat!(
    env!("CARGO_PKG_NAME"),
    "@",
    env!("CARGO_PKG_VERSION"),
    "/finagent-low-1"
);

/// What a later prompt shows of an intelligence row.
pub fn intel_text(row: Option<&ModuleRow>, none: &str) -> String {
    match row {
        Some(ModuleRow { text: Some(t), .. }) => t.clone(),
        Some(ModuleRow { failed: true, .. }) => "(the analysis failed today)".to_string(),
        _ => none.to_string(),
    }
}

/// The reflection as later prompts show it.
pub fn reflection_text(r: &LowReflection) -> String {
    format!(
        "Short term: {} Medium term: {} Long term: {}",
        r.short_term, r.medium_term, r.long_term
    )
}

pub struct LowRow {
    pub ticker: String,
    pub date: i32,
    pub prompt: String,
    pub value: Option<LowReflection>,
    pub attempts: usize,
    pub error: Option<String>,
    pub raw_text: String,
    pub usage: CallUsage,
}

pub fn low_batch(rows: &[LowRow]) -> StageResult<RecordBatch> {
    let field = |f: &dyn Fn(&LowReflection) -> String| {
        util::opt_utf8(rows.iter().map(|r| r.value.as_ref().map(f)).collect())
    };
    schema("finagent_low_reflection")?.batch(vec![
        util::utf8(rows.iter().map(|r| r.ticker.as_str())),
        util::date32(rows.iter().map(|r| r.date).collect()),
        field(&|v| v.short_term.clone()),
        field(&|v| v.medium_term.clone()),
        field(&|v| v.long_term.clone()),
        field(&|v| v.query.clone()),
        field(&reflection_text),
        util::utf8(rows.iter().map(|r| r.prompt.as_str())),
        util::int64(rows.iter().map(|r| r.attempts as i64).collect()),
        util::boolean(rows.iter().map(|r| r.value.is_none()).collect()),
        util::opt_utf8(rows.iter().map(|r| r.error.clone()).collect()),
        util::utf8(rows.iter().map(|r| r.raw_text.as_str())),
    ])
}

pub struct LowLevelReflection;

impl Stage for LowLevelReflection {
    fn kind(&self) -> &'static str {
        "finagent_low_reflection"
    }

    fn check_params(&self, p: &flag_core::Params, _bound: &[&str]) -> StageResult<()> {
        ModuleConfig::from_params(p, "low_reflection").map(drop)
    }

    fn spec(&self) -> StageSpec {
        StageSpec {
            doc: "FinAgent low-level reflection: per ticker and decision day, market intelligence + the 14-day \
                  Kline chart as text + 1/7/14-day moves -> reasoning per horizon and a query.",
            inputs: vec![
                InputSpec::one("bars", "ohlcv", "Daily bars"),
                InputSpec::one("latest", "finagent_intel", "Latest market intelligence"),
                InputSpec::one("past", "finagent_intel", "Past market intelligence"),
            ],
            outputs: vec![
                OutputSpec::parquet(
                    "reflections",
                    "finagent_low_reflection",
                    "One row per ticker and day",
                ),
                usage_output(),
            ],
            // Three 200-character texts and an 80-character query at one token per character.
            params: {
                let mut v = module_param_specs("low_reflection", 768);
                v.push(chart_images_param());
                v
            },
        }
    }

    fn fingerprint(&self, params: &flag_core::Params) -> Fingerprint {
        let mut f = Fingerprint::new(VERSION);
        f.files = module_files(params, "low_reflection");
        f
    }

    super::config::llm_stage_environment!();
}

impl flag_core::RunStage for LowLevelReflection {
    fn run(&self, ctx: &mut StageContext) -> StageResult<()> {
        let cfg = ModuleConfig::from_params(&ctx.params, "low_reflection")?;
        let (template, schema, retry) = cfg.read_prompts(ctx)?;
        let file = prompt_path(AGENT, &cfg.prompt);
        let retry_file = prompt_path(AGENT, "retry");
        let bars = read_bars(&ctx.read_input("bars")?, "bars")?;
        let latest = read_module_rows(&ctx.read_input("latest")?, "latest", "summary")?;
        let past = read_module_rows(&ctx.read_input("past")?, "past", "summary")?;
        let mut rows = Vec::new();
        let mut calls = Vec::new();
        for (ticker, s) in bars.iter().filter(|(t, _)| cfg.wants(t)) {
            for i in cfg.days(s) {
                let key = (ticker.clone(), s.dates[i]);
                let vars: BTreeMap<&str, String> = [
                    ("asset", ticker.clone()),
                    ("date", from_days(s.dates[i]).to_string()),
                    ("latest", intel_text(latest.get(&key), "no news today.")),
                    (
                        "past",
                        intel_text(past.get(&key), "nothing relevant in memory."),
                    ),
                    ("kline", kline_text(s, i)),
                    ("moves", price_moves(s, i)),
                ]
                .into_iter()
                .collect();
                let prompt = render(&template, &file, &vars)?;
                calls.push(Call {
                    prompt: prompt.clone(),
                    list_len: 0,
                    images: if cfg.chart_images {
                        vec![kline_png(s, i)?]
                    } else {
                        Vec::new()
                    },
                });
                rows.push((key, prompt));
            }
        }
        let mut out = Vec::new();
        if !calls.is_empty() {
            let backend = cfg.llm.load_backend()?;
            ctx.log(format!(
                "model {}, device {}, {} days",
                backend.name(),
                cfg.llm.device_name,
                calls.len()
            ));
            let form = ModuleForm {
                schema: &schema,
                list_property: None,
                retry: (&retry_file, &retry),
            };
            let total = calls.len() as u64;
            let progress = |d: u64| ctx.progress(d, total, "days");
            let outcomes = run_module(
                backend.as_ref(),
                &cfg.llm,
                &form,
                &calls,
                cfg.batch_size,
                |a, _| parse_low_reflection(a),
                &progress,
            )?;
            for (((ticker, date), prompt), o) in rows.into_iter().zip(outcomes) {
                out.push(LowRow {
                    ticker,
                    date,
                    prompt,
                    value: o.value,
                    attempts: o.attempts,
                    error: o.error,
                    raw_text: o.raw_text,
                    usage: o.usage,
                });
            }
        }
        let failed = out.iter().filter(|r| r.value.is_none()).count();
        ctx.log(format!("{} days, {failed} failed", out.len()));
        let batch = low_batch(&out)?;
        ctx.write_parquet("reflections", &[batch])?;
        let usage = out
            .iter()
            .map(|r| UsageRow {
                ticker: r.ticker.clone(),
                date: r.date,
                module: "low_reflection",
                attempts: r.attempts,
                usage: r.usage,
            })
            .collect();
        ctx.write_parquet("usage", &[usage_batch(usage)?])?;
        Ok(())
    }
}
