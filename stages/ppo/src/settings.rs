//! The `ppo` stage's params: declared once (name, kind, default, doc) and read into
//! validated settings; a bad value is an error naming the param.

use std::path::PathBuf;

use flag_core::{ParamKind, ParamSpec, Params, StageError, StageResult};
use flag_trading::series::to_days;
use serde_json::{Value, json};

use crate::env::MarketEnvConfig;
use crate::policy::{HeadStart, PolicyConfig};
use crate::train::PpoConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    Cuda,
    Auto,
}

impl DeviceChoice {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cpu" => Some(DeviceChoice::Cpu),
            "cuda" => Some(DeviceChoice::Cuda),
            "auto" => Some(DeviceChoice::Auto),
            _ => None,
        }
    }

    pub fn device(self) -> tch::Device {
        match self {
            DeviceChoice::Cpu => tch::Device::Cpu,
            DeviceChoice::Cuda => tch::Device::Cuda(0),
            DeviceChoice::Auto if flag_core::numerics::cuda_present() => tch::Device::Cuda(0),
            DeviceChoice::Auto => tch::Device::Cpu,
        }
    }

    /// Param `device`, validated by name (where the stage runs, `ensure_available` checks
    /// libtorch can use it: the coordinator that loads the pipeline may have no GPU).
    pub fn from_params(p: &Params) -> StageResult<Self> {
        let dev = p.str("device")?;
        let device = DeviceChoice::parse(&dev).ok_or_else(|| {
            StageError::param("device", format!("'{dev}' is not one of cpu, cuda, auto"))
        })?;
        Ok(device)
    }

    /// Fails, naming the param, when the resolved device is CUDA and libtorch has none here.
    pub fn ensure_available(self) -> StageResult<()> {
        if self.device().is_cuda() && !tch::Cuda::is_available() {
            return Err(StageError::param(
                "device",
                "cuda was asked for (or auto found a GPU) but libtorch has no CUDA device here",
            ));
        }
        Ok(())
    }

    /// What the run computes on, for the cache key ("cpu" or "cuda").
    pub fn resolved_name(self) -> &'static str {
        if self.device().is_cuda() {
            "cuda"
        } else {
            "cpu"
        }
    }
}

/// Everything the stage reads from its params, validated.
#[derive(Debug, Clone)]
pub struct PpoSettings {
    pub ppo: PpoConfig,
    pub policy: PolicyConfig,
    pub market: MarketEnvConfig,
    pub tickers: Option<Vec<String>>,
    /// train_start, train_end, test_start, test_end (date32 days).
    pub dates: [i32; 4],
    pub runs: usize,
    pub seed: u64,
    pub device: DeviceChoice,
    pub threads: usize,
    pub model: PathBuf,
    pub prompt: String,
    pub strategy: String,
}

fn spec(name: &'static str, kind: ParamKind, default: Value, doc: &'static str) -> ParamSpec {
    ParamSpec::with_default(name, kind, default, doc)
}

/// The stage's params after the split dates (defaults: the paper's Table 3 and §5).
pub fn param_specs() -> Vec<ParamSpec> {
    use ParamKind::{Bool, Float, Int, List, Path, Str};
    let mut v = flag_trading::stages::split_date_params().to_vec();
    v.extend([
        spec(
            "tickers",
            List,
            Value::Null,
            "Tickers to train on (default: all in the table)",
        ),
        spec(
            "runs",
            Int,
            json!(1),
            "Independent runs (seeds) per ticker; run r uses seed + r",
        ),
        spec(
            "seed",
            Int,
            json!(0),
            "Base seed (action sampling, shuffling, head init)",
        ),
        spec(
            "device",
            Str,
            json!("cpu"),
            "cpu, cuda, or auto (cuda when available); CPU runs are bit-reproducible",
        ),
        spec(
            "threads",
            Int,
            json!(0),
            "libtorch CPU threads (0: all cores)",
        ),
        spec(
            "model",
            Path,
            Value::Null,
            "Base GGUF (default: SmolLM2-135M-Instruct from the venv)",
        ),
        spec(
            "prompt",
            Str,
            json!("state"),
            "State prompt under prompts/flag_trader/ (file stem)",
        ),
        spec(
            "strategy",
            Str,
            json!("flag_trader"),
            "Strategy name in equity/trades ('#<run>' appended)",
        ),
        spec(
            "trainable_blocks",
            Int,
            json!(6),
            "Top transformer blocks that train (M; the rest stay frozen)",
        ),
        spec(
            "value_hidden",
            Int,
            json!(256),
            "Hidden width of the value MLP",
        ),
        spec(
            "head_init",
            Str,
            json!("action_words"),
            "Policy head start: action_words (the action words' first-token rows: the model's own \
             preference), action_scores (those rows plus a bias scoring the rest of each \
             answer on the first training prompt) or random",
        ),
        spec(
            "max_prompt_tokens",
            Int,
            json!(1024),
            "A longer prompt is an error",
        ),
        spec(
            "window",
            Int,
            json!(10),
            "Daily closes shown in the prompt (today's included)",
        ),
        spec(
            "history",
            Int,
            json!(10),
            "Past rewards, net values and actions shown in the prompt",
        ),
        spec(
            "initial_capital",
            Float,
            json!(100000.0),
            "Capital at the start of each episode and path",
        ),
        spec(
            "cost",
            Float,
            json!(0.0),
            "Transaction cost rate (the paper has none)",
        ),
        spec(
            "max_episode_steps",
            Int,
            json!(65),
            "Decisions per training episode at most",
        ),
        spec(
            "total_timesteps",
            Int,
            json!(13860),
            "Environment steps of training",
        ),
        spec(
            "num_steps",
            Int,
            json!(40),
            "Rollout length per PPO iteration",
        ),
        spec("learning_rate", Float, json!(5e-4), "Adam learning rate"),
spec(
            "backbone_lr_scale",
            Float,
            json!(1.0),
            "The trainable blocks learn at learning_rate x this (the heads at learning_rate); 1 = the paper",
        ),
                spec(
            "anneal_lr",
            Bool,
            json!(true),
            "Anneal the learning rate linearly to 0",
        ),
        spec("gamma", Float, json!(0.95), "Discount"),
        spec("gae_lambda", Float, json!(0.98), "GAE lambda"),
        spec("update_epochs", Int, json!(1), "Passes over each rollout"),
        spec(
            "norm_adv",
            Bool,
            json!(true),
            "Normalise advantages per minibatch",
        ),
        spec("clip_coef", Float, json!(0.2), "PPO ratio clip"),
        spec("clip_vloss", Bool, json!(true), "Clip the value loss"),
        spec("ent_coef", Float, json!(0.05), "Entropy bonus"),
        spec("vf_coef", Float, json!(0.5), "Value loss weight"),
        spec(
            "kl_coef",
            Float,
            json!(0.05),
            "KL penalty to the initial policy",
        ),
        spec("max_grad_norm", Float, json!(0.5), "Gradient clipping norm"),
        spec(
            "target_kl",
            Float,
            Value::Null,
            "Stop an iteration's epochs when approx KL exceeds this (none)",
        ),
        spec(
            "minibatch_size",
            Int,
            json!(32),
            "Samples per optimizer step",
        ),
        spec(
            "grad_accum_steps",
            Int,
            json!(8),
            "Micro-batches per minibatch (gradients accumulated)",
        ),
    ]);
    v
}

impl PpoSettings {
    pub fn from_params(p: &Params) -> StageResult<Self> {
        let d = |n: &str| p.date(n).map(to_days);
        let dates = [
            d("train_start")?,
            d("train_end")?,
            d("test_start")?,
            d("test_end")?,
        ];
        if dates[0] >= dates[1] || dates[2] >= dates[3] {
            return Err(StageError::param(
                "train_start",
                "each split must start before its end",
            ));
        }
        if dates[1] >= dates[2] {
            return Err(StageError::param(
                "test_start",
                "the test split must start after the train split ends",
            ));
        }
        let ppo = PpoConfig {
            total_timesteps: p.usize("total_timesteps")?,
            num_steps: p.usize("num_steps")?,
            learning_rate: p.f64("learning_rate")?,
            backbone_lr_scale: p.f64("backbone_lr_scale")?,
            anneal_lr: p.bool("anneal_lr")?,
            gamma: p.f64("gamma")?,
            gae_lambda: p.f64("gae_lambda")?,
            update_epochs: p.usize("update_epochs")?,
            norm_adv: p.bool("norm_adv")?,
            clip_coef: p.f64("clip_coef")?,
            clip_vloss: p.bool("clip_vloss")?,
            ent_coef: p.f64("ent_coef")?,
            vf_coef: p.f64("vf_coef")?,
            kl_coef: p.f64("kl_coef")?,
            max_grad_norm: p.f64("max_grad_norm")?,
            target_kl: p.get("target_kl").map(|_| p.f64("target_kl")).transpose()?,
            minibatch_size: p.usize("minibatch_size")?,
            grad_accum_steps: p.usize("grad_accum_steps")?,
        };
        ppo.validate()
            .map_err(|(name, why)| StageError::param(name, why))?;
        let head = p.str("head_init")?;
        let policy = PolicyConfig {
            trainable_blocks: p.usize("trainable_blocks")?,
            value_hidden: p.usize("value_hidden")?,
            head_start: HeadStart::parse(&head).ok_or_else(|| {
                StageError::param(
                    "head_init",
                    format!("'{head}' is not one of action_words, action_scores, random"),
                )
            })?,
            max_prompt_tokens: p.usize("max_prompt_tokens")?,
            // Set per run (seed + run) by the stage.
            init_seed: 0,
        };
        for (name, v) in [
            ("trainable_blocks", policy.trainable_blocks),
            ("value_hidden", policy.value_hidden),
            ("max_prompt_tokens", policy.max_prompt_tokens),
        ] {
            if v == 0 {
                return Err(StageError::param(name, "must be at least 1"));
            }
        }
        let market = MarketEnvConfig {
            initial_capital: p.capital("initial_capital")?,
            cost: p.f64("cost")?,
            window: p.usize("window")?,
            history: p.usize("history")?,
            max_episode_steps: p.usize("max_episode_steps")?,
        };
        if market.initial_capital.is_nan() || market.initial_capital <= 0.0 {
            return Err(StageError::param("initial_capital", "must be > 0"));
        }
        if !(0.0..1.0).contains(&market.cost) {
            return Err(StageError::param("cost", "must be in [0, 1)"));
        }
        for (name, v) in [
            ("window", market.window),
            ("max_episode_steps", market.max_episode_steps),
        ] {
            if v == 0 {
                return Err(StageError::param(name, "must be at least 1"));
            }
        }
        let runs = p.usize("runs")?;
        if runs == 0 {
            return Err(StageError::param("runs", "must be >= 1"));
        }
        let seed =
            u64::try_from(p.i64("seed")?).map_err(|_| StageError::param("seed", "must be >= 0"))?;
        let device = DeviceChoice::from_params(p)?;
        let prompt = p.str("prompt")?;
        if !valid_prompt_name(&prompt) {
            return Err(StageError::param(
                "prompt",
                format!("'{prompt}' is not a prompt name (letters, digits, _ and - only)"),
            ));
        }
        let strategy = p.str("strategy")?;
        if strategy.is_empty() || strategy.contains('#') {
            return Err(StageError::param(
                "strategy",
                "must be non-empty and without '#' (used for the run suffix)",
            ));
        }
        Ok(PpoSettings {
            ppo,
            policy,
            market,
            tickers: p
                .get("tickers")
                .map(|_| p.str_list("tickers"))
                .transpose()?,
            dates,
            runs,
            seed,
            device,
            threads: p.usize("threads")?,
            model: flag_llm::backend::model_path(p)?,
            prompt,
            strategy,
        })
    }
}

pub fn valid_prompt_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}
