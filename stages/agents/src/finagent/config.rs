//! Params shared by FinAgent's batch module stages, declared once.
use std::collections::BTreeMap;

use flag_core::{ParamKind, ParamSpec, Params, StageContext, StageError, StageResult};
use flag_llm::backend::{LlmSettings, llm_param_specs};
use flag_trading::series::Series;
use serde_json::{Value, json};

use crate::prompt::{prompt_param, prompt_path, read_prompts, schema_path};
use crate::util;

pub const AGENT: &str = "finagent";

/// The `Stage` methods every model-calling FinAgent stage shares: the model files it hashes,
/// the device environment and the numerics it declares (all from the backend params).
macro_rules! llm_stage_environment {
    () => {
        fn external_files(
            &self,
            params: &flag_core::Params,
        ) -> flag_core::StageResult<Vec<std::path::PathBuf>> {
            flag_llm::backend::model_files(params)
        }

        fn environment(&self, params: &flag_core::Params) -> Vec<(String, String)> {
            flag_llm::backend::device_env(params)
        }

        fn numerics(&self, params: &flag_core::Params) -> flag_core::Numerics {
            flag_llm::backend::backend_numerics(params)
        }
    };
}
pub(crate) use llm_stage_environment;

/// What every module stage reads from its params.
#[derive(Debug, Clone)]
pub struct ModuleConfig {
    pub prompt: String,
    pub tickers: Option<Vec<String>>,
    pub start: Option<i32>,
    pub end: Option<i32>,
    pub batch_size: usize,
    pub descriptions: BTreeMap<String, String>,
    pub llm: LlmSettings,
    /// Send the module's charts as PNG images too (stages that declare `chart_images`).
    pub chart_images: bool,
}

pub fn positive(p: &Params, name: &str) -> StageResult<usize> {
    let v = p.usize(name)?;
    if v == 0 {
        return Err(StageError::param(name, "must be at least 1"));
    }
    Ok(v)
}

impl ModuleConfig {
    pub fn from_params(p: &Params, default_prompt: &str) -> StageResult<Self> {
        let mut descriptions = BTreeMap::new();
        if let Some(v) = p.get("descriptions") {
            let obj = v.as_object().ok_or_else(|| {
                StageError::param(
                    "descriptions",
                    format!("must be a map ticker -> text, got {v}"),
                )
            })?;
            for (t, d) in obj {
                let d = d.as_str().ok_or_else(|| {
                    StageError::param("descriptions", format!("{t}: must be a string, got {d}"))
                })?;
                descriptions.insert(
                    t.clone(),
                    d.split_whitespace().collect::<Vec<_>>().join(" "),
                );
            }
        }
        Ok(ModuleConfig {
            prompt: prompt_param(p, default_prompt)?,
            tickers: util::ticker_filter(p)?,
            start: util::opt_date(p, "start")?,
            end: util::opt_date(p, "end")?,
            batch_size: positive(p, "batch_size")?,
            descriptions,
            // Without constraints the answer is generated after a "{" prefill and ends
            // where that object closes.
            llm: LlmSettings::from_params(p, Vec::new())?.stopping_at_json("{"),
            chart_images: chart_images(p)?,
        })
    }

    pub fn description(&self, ticker: &str) -> &str {
        self.descriptions.get(ticker).map_or("", String::as_str)
    }

    /// Whether `ticker` is analysed.
    pub fn wants(&self, ticker: &str) -> bool {
        self.tickers
            .as_ref()
            .is_none_or(|w| w.iter().any(|x| x == ticker))
    }

    /// The indices of `s`'s trading days inside [start, end].
    pub fn days(&self, s: &Series) -> std::ops::Range<usize> {
        s.range(self.start.unwrap_or(i32::MIN), self.end.unwrap_or(i32::MAX))
    }

    /// The prompt template, its answer schema and the retry note.
    pub fn read_prompts(&self, ctx: &StageContext) -> StageResult<(String, Value, String)> {
        read_module_prompts(ctx, &self.prompt)
    }
}

/// Prompt `name` of `prompts/finagent/`: its template, its answer schema as JSON and the
/// retry note.
pub fn read_module_prompts(ctx: &StageContext, name: &str) -> StageResult<(String, Value, String)> {
    let files = read_prompts(ctx, AGENT, name)?;
    let flag_llm::constrain::Constraint::JsonSchema(schema) = files.schema else {
        return Err(StageError::Invalid(format!(
            "prompts/finagent/{name}.schema.json is not a JSON Schema"
        )));
    };
    Ok((files.template, schema, files.retry))
}

/// The params of a module stage (`default_prompt` under `prompts/finagent/`).
pub fn module_param_specs(default_prompt: &str, max_tokens: u64) -> Vec<ParamSpec> {
    let mut v = vec![
        ParamSpec::with_default(
            "prompt",
            ParamKind::Str,
            json!(default_prompt),
            "Prompt version: prompts/finagent/<prompt>.txt and its .schema.json",
        ),
        ParamSpec::with_default(
            "tickers",
            ParamKind::List,
            Value::Null,
            "Tickers to run (default: every ticker of the bars)",
        ),
        ParamSpec::with_default("start", ParamKind::Date, Value::Null, "First decision day"),
        ParamSpec::with_default("end", ParamKind::Date, Value::Null, "Last decision day"),
        ParamSpec::with_default(
            "batch_size",
            ParamKind::Int,
            json!(8),
            "Prompts per model batch",
        ),
        ParamSpec::with_default(
            "descriptions",
            ParamKind::Any,
            json!({}),
            "Map ticker -> one-paragraph asset description shown in the prompts",
        ),
    ];
    v.extend(llm_param_specs(max_tokens));
    v
}

/// The `chart_images` param of the stages that draw charts (low-level reflection: the Kline
/// chart; the agent's high-level reflection: the trading chart).
pub fn chart_images_param() -> ParamSpec {
    ParamSpec::with_default(
        "chart_images",
        ParamKind::Bool,
        json!(false),
        "Also send the charts as PNG images (needs backend openai with a vision model); the text \
         table of the same series stays in the prompt",
    )
}

fn chart_images(p: &Params) -> StageResult<bool> {
    if p.get("chart_images").is_none() {
        return Ok(false);
    }
    let on = p.bool("chart_images")?;
    if on && flag_llm::backend::backend_name(p)? != "openai" {
        return Err(StageError::param(
            "chart_images",
            "needs backend openai with a vision model (the embedded SmolLM2 reads text only)",
        ));
    }
    Ok(on)
}

/// The prompt files whose bytes key a module stage: its prompt, schema and the retry note.
pub fn module_files(p: &Params, default_prompt: &str) -> Vec<String> {
    let mut files = Vec::new();
    if let Ok(name) = prompt_param(p, default_prompt) {
        files.push(prompt_path(AGENT, &name));
        files.push(schema_path(AGENT, &name));
    }
    files.push(prompt_path(AGENT, "retry"));
    files
}
