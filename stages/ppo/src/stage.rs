//! `ppo`: FLAG-Trader. For each ticker and run, fine-tunes SmolLM2 (top M blocks, policy
//! and value heads) with PPO on the train split (the paper's warm-up period), then runs the
//! greedy policy from fresh capital over the train and the test split. Nothing is learned
//! on the test split.
//!
//! Outputs: the greedy paths as `equity` / `trades` (strategy `<strategy>#<run>`, env
//! `finagent`: the dynamics are FinAgent's all-in / all-out long-only trades at the close),
//! the per-iteration training log, every decision (sampled in training, greedy on the
//! paths) and a checkpoint directory with `<ticker>-run<r>.safetensors` + `.json` per run.
//!
//! The train split's episodes start on its first day with the initial capital; the prompt's
//! closes may reach back before it (the window needs history). Runs execute one after the
//! other on all `threads` (the model, not the runs, is what parallelises).

use std::path::Path;
use std::sync::Arc;

use flag_core::arrow::array::RecordBatch;
use flag_core::{
    Fingerprint, InputSpec, OutputSpec, Params, Stage, StageContext, StageError, StageResult,
    StageSpec,
};
use flag_trading::series::read_series;
use tch::nn;

use crate::checkpoint::{self, CheckpointConfig};
use crate::env::{ACTION_NAMES, Closes, FlagMarketEnv};
use crate::outputs;
use crate::policy::LlmPolicy;
use crate::prompt::{StateTemplate, prompt_path};
use crate::settings::{DeviceChoice, PpoSettings, param_specs};
use crate::train::{EvalDay, StepRecord, TrainOutput, UpdateLog, greedy_path, train};

const VERSION: &str = concat!(
    env!("CARGO_PKG_NAME"),
    "@",
    env!("CARGO_PKG_VERSION"),
    "/ppo-2"
);

pub struct Ppo;

/// Everything one (ticker, run) produced.
pub struct RunResult {
    pub ticker: String,
    pub run: usize,
    pub seed: u64,
    pub log: Vec<UpdateLog>,
    pub steps: Vec<StepRecord>,
    /// (split, path) for train and test.
    pub paths: Vec<(&'static str, Vec<EvalDay>)>,
}

/// Reads ticker, date, close of a bars table (indicators or ohlcv), per ticker by date,
/// with the validation every trading stage applies ([`read_series`]: a null or non-positive
/// close or a duplicate date is an error naming the row); `file` names the input in errors.
pub fn read_closes(batch: &RecordBatch, file: &Path) -> StageResult<Vec<Closes>> {
    let series =
        read_series(batch, "table", &[]).map_err(|e| StageError::file(file, e.to_string()))?;
    Ok(series
        .into_iter()
        .map(|s| Closes {
            ticker: s.ticker,
            dates: s.dates,
            closes: s.close,
        })
        .collect())
}

/// The (train, test) day ranges of one ticker.
fn split_ranges(
    c: &Closes,
    dates: [i32; 4],
) -> StageResult<(std::ops::Range<usize>, std::ops::Range<usize>)> {
    let at = |d: i32| c.dates.partition_point(|&x| x < d);
    let upto = |d: i32| c.dates.partition_point(|&x| x <= d);
    let train = at(dates[0])..upto(dates[1]);
    let test = at(dates[2])..upto(dates[3]);
    for (name, r) in [("train", &train), ("test", &test)] {
        if r.len() < 2 {
            return Err(StageError::Invalid(format!(
                "ticker {}: {} day(s) in the {name} split, at least 2 are needed",
                c.ticker,
                r.len()
            )));
        }
    }
    Ok((train, test))
}

impl PpoSettings {
    fn checkpoint_config(
        &self,
        policy: &LlmPolicy,
        template: &StateTemplate,
        prompt_bytes: &[u8],
        model_hash: &str,
        ticker: &str,
        run: usize,
    ) -> CheckpointConfig {
        CheckpointConfig {
            format: checkpoint::FORMAT.into(),
            base_model_file: self
                .model
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            base_model_blake3: model_hash.into(),
            n_layer: policy.net.n_layer(),
            trainable_blocks: self.policy.trainable_blocks,
            value_hidden: self.policy.value_hidden,
            head_init: self.policy.head_start.name().into(),
            max_prompt_tokens: self.policy.max_prompt_tokens,
            action_names: ACTION_NAMES.iter().map(|s| s.to_string()).collect(),
            action_tokens: policy.action_token_ids().to_vec(),
            prompt_file: prompt_path(&self.prompt),
            prompt_blake3: blake3::hash(prompt_bytes).to_hex().to_string(),
            answer_prefix: template.answer_prefix().into(),
            window: self.market.window,
            history: self.market.history,
            ticker: ticker.into(),
            run,
            seed: self.seed + run as u64,
            tensors: Vec::new(),
            weights_blake3: String::new(),
        }
    }
}

/// Trains and evaluates one (ticker, run); writes its checkpoint into `ckpt_dir`.
#[allow(clippy::too_many_arguments)]
pub fn run_one(
    s: &PpoSettings,
    data: &Arc<Closes>,
    template: &Arc<StateTemplate>,
    prompt_bytes: &[u8],
    model_hash: &str,
    run: usize,
    ckpt_dir: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> StageResult<RunResult> {
    let seed = s.seed + run as u64;
    let (train_days, test_days) = split_ranges(data, s.dates)?;
    let fail = |e: String| StageError::external("ppo", format!("{} run {run}: {e}", data.ticker));
    tch::manual_seed(seed as i64);
    let vs = nn::VarStore::new(s.device.device());
    let policy_cfg = crate::policy::PolicyConfig {
        init_seed: seed,
        ..s.policy
    };
    let mut env = FlagMarketEnv::new(
        data.clone(),
        template.clone(),
        s.market.clone(),
        train_days.clone(),
    )
    .map_err(fail)?;
    // head_init action_scores calibrates on the first training prompt (train resets again).
    let calibration = match policy_cfg.head_start {
        crate::policy::HeadStart::ActionScores => {
            Some(crate::env::PromptEnv::reset(&mut env).map_err(fail)?.prompt)
        }
        _ => None,
    };
    let policy = LlmPolicy::load_calibrated(
        &s.model,
        policy_cfg,
        template.answer_prefix(),
        &vs.root(),
        calibration.as_ref(),
    )
    .map_err(fail)?;
    let TrainOutput { log, steps } =
        train(&policy, &vs, &mut env, &s.ppo, seed, progress).map_err(fail)?;
    let mut paths = Vec::new();
    for (split, days) in [("train", train_days), ("test", test_days)] {
        let mut e = FlagMarketEnv::new(data.clone(), template.clone(), s.market.clone(), days)
            .map_err(fail)?;
        paths.push((split, greedy_path(&policy, &mut e).map_err(fail)?));
    }
    let cfg = s.checkpoint_config(
        &policy,
        template,
        prompt_bytes,
        model_hash,
        &data.ticker,
        run,
    );
    checkpoint::save(ckpt_dir, &checkpoint_name(&data.ticker, run), &vs, cfg).map_err(fail)?;
    Ok(RunResult {
        ticker: data.ticker.clone(),
        run,
        seed,
        log,
        steps,
        paths,
    })
}

/// File stem of a run's checkpoint.
pub fn checkpoint_name(ticker: &str, run: usize) -> String {
    format!("{ticker}-run{run}")
}

impl Stage for Ppo {
    fn kind(&self) -> &'static str {
        "ppo"
    }

    fn check_params(&self, p: &Params, _bound: &[&str]) -> StageResult<()> {
        PpoSettings::from_params(p).map(drop)
    }

    fn spec(&self) -> StageSpec {
        StageSpec {
            doc: "FLAG-Trader (Xiong et al. 2025): PPO fine-tuning of SmolLM2-135M (bottom blocks \
                  frozen, top `trainable_blocks` trained, policy head over Sell/Hold/Buy and a \
                  value MLP on the last prompt token) on the train split; greedy paths on train \
                  and test, training log, every decision, and a checkpoint per run.",
            inputs: vec![InputSpec {
                name: "table",
                // Read by column name: ticker, date, close (close-only bars are enough).
                schema: None,
                required: true,
                many: false,
                doc: "Daily bars (ohlcv or indicators): ticker, date, close",
            }],
            outputs: vec![
                OutputSpec::parquet(
                    "equity",
                    "equity",
                    "Greedy paths of each run, train and test",
                ),
                OutputSpec::parquet("trades", "trades", "Executed trades of those paths"),
                OutputSpec::parquet("log", "ppo_log", "Per-iteration PPO training log"),
                OutputSpec::measured_parquet(
                    "timing",
                    "ppo_timing",
                    "Per-iteration wall-clock throughput (measured: not compared by verify \
                     --recompute)",
                ),
                OutputSpec::parquet(
                    "decisions",
                    "ppo_decisions",
                    "Every decision: sampled in training, greedy on the paths",
                ),
                OutputSpec::dir(
                    "checkpoint",
                    "Per run: <ticker>-run<r>.safetensors (trainable tensors only) and .json \
                     (config, base GGUF blake3)",
                ),
            ],
            params: param_specs(),
        }
    }

    fn fingerprint(&self, params: &Params) -> Fingerprint {
        prompt_fingerprint(VERSION, params)
    }

    fn external_files(&self, params: &Params) -> StageResult<Vec<std::path::PathBuf>> {
        Ok(vec![flag_llm::backend::model_path(params)?])
    }

    fn environment(&self, params: &Params) -> Vec<(String, String)> {
        stage_environment(params)
    }

    fn numerics(&self, _params: &Params) -> flag_core::Numerics {
        flag_core::Numerics::KernelPath
    }
}

impl flag_core::RunStage for Ppo {
    fn run(&self, ctx: &mut StageContext) -> StageResult<()> {
        let s = PpoSettings::from_params(&ctx.params)?;
        s.device.ensure_available()?;
        let (template, prompt_bytes) = read_template(ctx, &s.prompt)?;
        let table_file = ctx
            .input("table")?
            .files
            .first()
            .cloned()
            .unwrap_or_default();
        let all = read_closes(&ctx.read_input("table")?, &table_file)?;
        let mut selected = Vec::new();
        if let Some(wanted) = &s.tickers {
            for t in wanted {
                match all.iter().find(|c| &c.ticker == t) {
                    Some(c) => selected.push(c.clone()),
                    None => {
                        return Err(StageError::param(
                            "tickers",
                            format!("ticker '{t}' is not in the table"),
                        ));
                    }
                }
            }
        } else {
            selected = all;
        }
        if selected.is_empty() {
            return Err(StageError::Invalid("no ticker to train on".into()));
        }
        let previous_threads = tch::get_num_threads();
        tch::set_num_threads(resolved_threads(&ctx.params) as i32);
        let model_hash = checkpoint::file_blake3(&s.model).map_err(StageError::Invalid)?;
        let ckpt_dir = ctx.output_dir("checkpoint")?;
        let total = (selected.len() * s.runs * s.ppo.iterations()) as u64;
        let mut done = 0u64;
        let mut results = Vec::new();
        for mut c in selected {
            let keep = c.dates.partition_point(|&d| d <= s.dates[3]);
            c.dates.truncate(keep);
            c.closes.truncate(keep);
            let data = Arc::new(c);
            for run in 0..s.runs {
                ctx.log(format!("{} run {run}: training", data.ticker));
                let label = format!("iterations ({} run {run})", data.ticker);
                let progress_ctx = &*ctx;
                let mut progress = |_: usize, _: usize| {
                    done += 1;
                    progress_ctx.progress(done, total, &label);
                };
                let r = run_one(
                    &s,
                    &data,
                    &template,
                    &prompt_bytes,
                    &model_hash,
                    run,
                    &ckpt_dir,
                    &mut progress,
                );
                let r = match r {
                    Ok(r) => r,
                    Err(e) => {
                        tch::set_num_threads(previous_threads);
                        return Err(e);
                    }
                };
                results.push(r);
            }
        }
        tch::set_num_threads(previous_threads);
        let strategy = s.strategy.clone();
        ctx.write_parquet("equity", &[outputs::equity_batch(&strategy, &results)?])?;
        ctx.write_parquet("trades", &[outputs::trades_batch(&strategy, &results)?])?;
        ctx.write_parquet("log", &[outputs::log_batch(&strategy, &results)?])?;
        ctx.write_parquet("timing", &[outputs::timing_batch(&strategy, &results)?])?;
        ctx.write_parquet(
            "decisions",
            &[outputs::decisions_batch(&strategy, &results)?],
        )?;
        Ok(())
    }
}

/// The libtorch threads a run uses: param `threads`, 0 = all cores.
pub fn resolved_threads(p: &Params) -> usize {
    match p.usize("threads").unwrap_or(0) {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// What a PPO stage's bytes depend on beyond its params: the device it resolves to and, on
/// the CPU, the thread count.
pub fn stage_environment(params: &Params) -> Vec<(String, String)> {
    let dev = params
        .opt_str("device")
        .ok()
        .flatten()
        .unwrap_or_else(|| "cpu".into());
    let dev = DeviceChoice::parse(&dev).map_or("invalid", DeviceChoice::resolved_name);
    let mut env = vec![("device".to_string(), dev.to_string())];
    if dev == "cpu" {
        env.push(("threads".into(), resolved_threads(params).to_string()));
    }
    env
}

/// A PPO stage's fingerprint: its version and the prompt file its params name.
pub fn prompt_fingerprint(version: &str, params: &Params) -> Fingerprint {
    let mut f = Fingerprint::new(version);
    let name = params
        .opt_str("prompt")
        .ok()
        .flatten()
        .unwrap_or_else(|| "state".into());
    if crate::settings::valid_prompt_name(&name) {
        f.files.push(prompt_path(&name));
    }
    f
}

/// The state template `prompt` as the engine hashed it: (parsed template, its bytes).
pub fn read_template(
    ctx: &StageContext,
    prompt: &str,
) -> StageResult<(Arc<StateTemplate>, Vec<u8>)> {
    let file = prompt_path(prompt);
    let bytes = ctx.resource(&file)?.to_vec();
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| StageError::file(Path::new(&file), "is not UTF-8"))?;
    let template = StateTemplate::parse(text, &file).map_err(StageError::Invalid)?;
    Ok((Arc::new(template), bytes))
}
