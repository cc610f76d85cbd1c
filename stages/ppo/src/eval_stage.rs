//! `ppo_eval`: trades a trained FLAG-Trader checkpoint greedily over a period, from fresh
//! capital. Its `checkpoint` input is a `ppo` stage's checkpoint directory (an input edge like
//! any other): every `<ticker>-run<r>.json` config found there is paired with its weights by
//! the blake3 it names (store objects are named by content), rebuilt around the base GGUF
//! (whose hash must match) and run with the prompt it was trained with (whose hash must
//! match too). Outputs equity, trades and decisions in the `ppo` stage's schemas.

use std::path::PathBuf;
use std::sync::Arc;

use flag_core::{
    Fingerprint, InputSpec, OutputSpec, ParamKind, ParamSpec, Params, Stage, StageContext,
    StageError, StageResult, StageSpec,
};
use flag_trading::series::to_days;
use serde_json::{Value, json};

use crate::checkpoint::{self, file_blake3};
use crate::env::{FlagMarketEnv, MarketEnvConfig};
use crate::outputs;
use crate::prompt::prompt_path;
use crate::settings::{DeviceChoice, valid_prompt_name};
use crate::stage::{
    RunResult, prompt_fingerprint, read_closes, read_template, resolved_threads, stage_environment,
};
use crate::train::greedy_path;

const VERSION: &str = concat!(
    env!("CARGO_PKG_NAME"),
    "@",
    env!("CARGO_PKG_VERSION"),
    "/ppo_eval-2"
);

pub struct PpoEval;

fn spec(name: &'static str, kind: ParamKind, default: Value, doc: &'static str) -> ParamSpec {
    ParamSpec::with_default(name, kind, default, doc)
}

/// The checkpoint configs among `files`, each with the weights file it names (each weights
/// file is hashed once).
fn pair_checkpoints(files: &[PathBuf]) -> StageResult<Vec<(PathBuf, PathBuf)>> {
    let mut by_hash = std::collections::BTreeMap::new();
    for w in files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
    {
        by_hash.insert(file_blake3(w).map_err(StageError::Invalid)?, w.clone());
    }
    let mut out = Vec::new();
    for json in files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
    {
        let cfg = checkpoint::read_config_file(json).map_err(StageError::Invalid)?;
        let weights = by_hash.get(&cfg.weights_blake3).ok_or_else(|| {
            StageError::file(
                json,
                format!(
                    "names weights with blake3 {}, which are not in the checkpoint input",
                    cfg.weights_blake3
                ),
            )
        })?;
        out.push((json.clone(), weights.clone()));
    }
    if out.is_empty() {
        return Err(StageError::Invalid(
            "the checkpoint input holds no checkpoint config (.json)".into(),
        ));
    }
    Ok(out)
}

impl Stage for PpoEval {
    fn kind(&self) -> &'static str {
        "ppo_eval"
    }

    fn spec(&self) -> StageSpec {
        StageSpec {
            doc: "Trades every checkpoint of a `ppo` stage greedily over [start, end] from fresh \
                  capital (FLAG-Trader evaluation on another period or asset data).",
            inputs: vec![
                InputSpec {
                    name: "table",
                    schema: None,
                    required: true,
                    many: false,
                    doc: "Daily bars (ohlcv or indicators): ticker, date, close",
                },
                InputSpec {
                    name: "checkpoint",
                    schema: None,
                    required: true,
                    many: false,
                    doc: "A ppo stage's checkpoint directory",
                },
            ],
            outputs: vec![
                OutputSpec::parquet("equity", "equity", "Greedy path of each checkpoint"),
                OutputSpec::parquet("trades", "trades", "Executed trades of those paths"),
                OutputSpec::parquet(
                    "decisions",
                    "ppo_decisions",
                    "Every decision with its probabilities, value and reward",
                ),
            ],
            params: vec![
                ParamSpec::required("start", ParamKind::Date, "First day of the period"),
                ParamSpec::required("end", ParamKind::Date, "Last day of the period"),
                spec(
                    "tickers",
                    ParamKind::List,
                    Value::Null,
                    "Only the checkpoints of these tickers (default: all)",
                ),
                spec(
                    "split",
                    ParamKind::Str,
                    json!("test"),
                    "Split label of the rows: train or test",
                ),
                spec(
                    "strategy",
                    ParamKind::Str,
                    json!("flag_trader"),
                    "Strategy name ('#<run>' appended)",
                ),
                spec(
                    "prompt",
                    ParamKind::Str,
                    json!("state"),
                    "The prompt the checkpoints were trained with (its blake3 is checked)",
                ),
                spec(
                    "model",
                    ParamKind::Path,
                    Value::Null,
                    "Base GGUF (its blake3 is checked)",
                ),
                spec("device", ParamKind::Str, json!("cpu"), "cpu, cuda, or auto"),
                spec(
                    "threads",
                    ParamKind::Int,
                    json!(0),
                    "libtorch CPU threads (0: all cores)",
                ),
                spec(
                    "initial_capital",
                    ParamKind::Float,
                    json!(100000.0),
                    "Capital at the start of the period",
                ),
                spec(
                    "cost",
                    ParamKind::Float,
                    json!(0.0),
                    "Transaction cost rate",
                ),
            ],
        }
    }

    fn fingerprint(&self, params: &Params) -> Fingerprint {
        prompt_fingerprint(VERSION, params)
    }

    fn external_files(&self, params: &Params) -> StageResult<Vec<PathBuf>> {
        Ok(vec![flag_llm::backend::model_path(params)?])
    }

    fn environment(&self, params: &Params) -> Vec<(String, String)> {
        stage_environment(params)
    }

    fn numerics(&self, _params: &Params) -> flag_core::Numerics {
        flag_core::Numerics::KernelPath
    }
}

impl flag_core::RunStage for PpoEval {
    fn run(&self, ctx: &mut StageContext) -> StageResult<()> {
        let p = &ctx.params;
        DeviceChoice::from_params(p)?.ensure_available()?;
        let (start, end) = (to_days(p.date("start")?), to_days(p.date("end")?));
        if start >= end {
            return Err(StageError::param("end", "must be after start"));
        }
        let split: &'static str = match p.str("split")?.as_str() {
            "train" => "train",
            "test" => "test",
            other => {
                return Err(StageError::param(
                    "split",
                    format!("'{other}' is not train or test"),
                ));
            }
        };
        let strategy = p.str("strategy")?;
        let tickers = p
            .get("tickers")
            .map(|_| p.str_list("tickers"))
            .transpose()?;
        let prompt = p.str("prompt")?;
        if !valid_prompt_name(&prompt) {
            return Err(StageError::param(
                "prompt",
                format!("'{prompt}' is not a prompt name"),
            ));
        }
        let device = DeviceChoice::from_params(p)?.device();
        let market = MarketEnvConfig {
            initial_capital: p.capital("initial_capital")?,
            cost: p.f64("cost")?,
            window: 1,
            history: 0,
            max_episode_steps: usize::MAX,
        };
        let gguf = flag_llm::backend::model_path(p)?;
        let gguf_hash = file_blake3(&gguf).map_err(StageError::Invalid)?;
        let prompt_file = prompt_path(&prompt);
        let (template, bytes) = read_template(ctx, &prompt)?;
        let prompt_hash = blake3::hash(&bytes).to_hex().to_string();
        let table_file = ctx
            .input("table")?
            .files
            .first()
            .cloned()
            .unwrap_or_default();
        let all = read_closes(&ctx.read_input("table")?, &table_file)?;
        let pairs = pair_checkpoints(&ctx.input("checkpoint")?.files)?;
        let previous_threads = tch::get_num_threads();
        tch::set_num_threads(resolved_threads(&ctx.params) as i32);
        let result = (|| {
            let mut results = Vec::new();
            for (i, (json, weights)) in pairs.iter().enumerate() {
                let ticker = checkpoint::read_config_file(json)
                    .map_err(StageError::Invalid)?
                    .ticker;
                if tickers.as_ref().is_some_and(|t| !t.contains(&ticker)) {
                    continue;
                }
                let (policy, _vs, cfg) =
                    checkpoint::load_files(json, weights, &gguf, &gguf_hash, device)
                        .map_err(StageError::Invalid)?;
                if cfg.prompt_blake3 != prompt_hash {
                    return Err(StageError::file(
                        json,
                        format!(
                            "was trained with a prompt of blake3 {}, but {prompt_file} hashes to {prompt_hash}",
                            cfg.prompt_blake3
                        ),
                    ));
                }
                let mut data = all
                    .iter()
                    .find(|c| c.ticker == cfg.ticker)
                    .cloned()
                    .ok_or_else(|| {
                        StageError::file(json, format!("ticker {} is not in the table", cfg.ticker))
                    })?;
                let keep = data.dates.partition_point(|&d| d <= end);
                data.dates.truncate(keep);
                data.closes.truncate(keep);
                let days = data.dates.partition_point(|&d| d < start)..keep;
                let env_cfg = MarketEnvConfig {
                    window: cfg.window,
                    history: cfg.history,
                    ..market.clone()
                };
                let mut env = FlagMarketEnv::new(Arc::new(data), template.clone(), env_cfg, days)
                    .map_err(StageError::Invalid)?;
                let path = greedy_path(&policy, &mut env).map_err(StageError::Invalid)?;
                ctx.progress(i as u64 + 1, pairs.len() as u64, "checkpoints");
                results.push(RunResult {
                    ticker: cfg.ticker.clone(),
                    run: cfg.run,
                    seed: cfg.seed,
                    log: Vec::new(),
                    steps: Vec::new(),
                    paths: vec![(split, path)],
                });
            }
            if results.is_empty() {
                return Err(StageError::param(
                    "tickers",
                    "no checkpoint of these tickers in the input",
                ));
            }
            Ok(results)
        })();
        tch::set_num_threads(previous_threads);
        let results = result?;
        ctx.write_parquet("equity", &[outputs::equity_batch(&strategy, &results)?])?;
        ctx.write_parquet("trades", &[outputs::trades_batch(&strategy, &results)?])?;
        ctx.write_parquet(
            "decisions",
            &[outputs::decisions_batch(&strategy, &results)?],
        )?;
        Ok(())
    }
}
