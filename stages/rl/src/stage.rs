//! `ddqn`: trains the TDQN agent (or, with `signals` bound, the LLM-guided DDQN: the same
//! agent with the LLM features appended to its observation) `runs` times per ticker, and
//! writes the greedy policy's equity and trades on the train and test splits, plus the
//! training curves.
//!
//! Run `r` of strategy `s` is written as strategy `s#r` in `equity` / `trades`, so the
//! metrics stage, which groups by (strategy, env, ticker, split), scores every run apart.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use flag_core::arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray,
};
use flag_core::schema::schema;
use flag_core::{
    Fingerprint, InputSpec, OutputSpec, ParamKind, ParamSpec, Params, Stage, StageContext,
    StageError, StageResult, StageSpec,
};
use flag_trading::series::to_days;
use serde_json::{Value, json};

use crate::config::{DdqnConfig, DeviceChoice};
use crate::data::{align_signals, read_bars, read_signals};
use crate::train::{CurvePoint, SplitPath, TickerData, train_run};

const VERSION: &str = concat!(env!("CARGO_PKG_NAME"), "@", env!("CARGO_PKG_VERSION"));
const ENV: &str = "tdqn";

pub struct Ddqn;

/// Everything the stage reads from its params, validated.
#[derive(Debug, Clone)]
pub struct DdqnSettings {
    pub cfg: DdqnConfig,
    pub tickers: Option<Vec<String>>,
    /// (train_start, train_end, test_start, test_end) as date32 days.
    pub dates: [i32; 4],
    pub runs: usize,
    pub seed: u64,
    pub device: DeviceChoice,
    pub strategy: String,
    pub threads: usize,
    pub periods_per_year: f64,
}

impl DdqnSettings {
    pub fn from_params(p: &Params, with_signals: bool) -> StageResult<Self> {
        let d = |n: &str| p.date(n).map(to_days);
        let dates = [
            d("train_start")?,
            d("train_end")?,
            d("test_start")?,
            d("test_end")?,
        ];
        if dates[0] > dates[1] || dates[2] > dates[3] {
            return Err(StageError::param(
                "train_start",
                "each split must start on or before its end",
            ));
        }
        if dates[1] >= dates[2] {
            return Err(StageError::param(
                "test_start",
                "the test split must start after the train split ends",
            ));
        }
        let env = flag_trading::stages::env_settings(p, flag_trading::backtest::EnvKind::Tdqn)?;
        let mut cfg = DdqnConfig {
            episodes: p.usize("episodes")?,
            initial_capital: env.initial_capital,
            cost: env.cost,
            short_epsilon: env.epsilon,
            learning_rate: p.f64("learning_rate")?,
            ..DdqnConfig::default()
        };
        if let Some(w) = p.get("window") {
            cfg.window = w.as_u64().ok_or_else(|| {
                StageError::param("window", format!("must be a whole number, got {w}"))
            })? as usize;
        }
        cfg.validate()
            .map_err(|m| StageError::Invalid(format!("ddqn configuration: {m}")))?;
        let runs = p.usize("runs")?;
        if runs == 0 {
            return Err(StageError::param("runs", "must be >= 1"));
        }
        let seed =
            u64::try_from(p.i64("seed")?).map_err(|_| StageError::param("seed", "must be >= 0"))?;
        let dev = p.str("device")?;
        let device = DeviceChoice::parse(&dev).ok_or_else(|| {
            StageError::param("device", format!("'{dev}' is not one of cpu, cuda, auto"))
        })?;
        let default_name = if with_signals {
            "llm_guided_ddqn"
        } else {
            "tdqn"
        };
        let strategy = p
            .opt_str("strategy")?
            .unwrap_or_else(|| default_name.to_string());
        if strategy.is_empty() || strategy.contains('#') {
            return Err(StageError::param(
                "strategy",
                "must be non-empty and without '#' (used for the run suffix)",
            ));
        }
        let threads = match p.usize("threads")? {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let periods_per_year = p.f64("periods_per_year")?;
        if periods_per_year <= 0.0 {
            return Err(StageError::param("periods_per_year", "must be > 0"));
        }
        Ok(DdqnSettings {
            cfg,
            tickers: p
                .get("tickers")
                .map(|_| p.str_list("tickers"))
                .transpose()?,
            dates,
            runs,
            seed,
            device,
            strategy,
            threads,
            periods_per_year,
        })
    }
}

/// One finished run.
pub struct RunRecord {
    pub ticker: String,
    pub run: usize,
    pub seed: u64,
    pub curve: Vec<CurvePoint>,
    pub paths: [SplitPath; 2],
}

/// Prepares every selected ticker: rows up to the test end, split ranges, features.
pub fn prepare(
    settings: &DdqnSettings,
    bars: Vec<(String, crate::features::Bars)>,
    signals: Option<&BTreeMap<String, BTreeMap<i32, [f64; 2]>>>,
) -> StageResult<Vec<TickerData>> {
    let [train_start, train_end, test_start, test_end] = settings.dates;
    if let Some(wanted) = &settings.tickers {
        for t in wanted {
            if !bars.iter().any(|(name, _)| name == t) {
                return Err(StageError::param(
                    "tickers",
                    format!("ticker '{t}' is not in the table"),
                ));
            }
        }
    }
    let mut out = Vec::new();
    for (ticker, mut b) in bars {
        if settings
            .tickers
            .as_ref()
            .is_some_and(|w| !w.contains(&ticker))
        {
            continue;
        }
        // Nothing after the test split reaches the agent.
        let keep = b.dates.partition_point(|&d| d <= test_end);
        for v in [&mut b.high, &mut b.low, &mut b.close, &mut b.volume] {
            v.truncate(keep);
        }
        b.dates.truncate(keep);
        let at = |d: i32| b.dates.partition_point(|&x| x < d);
        let train = at(train_start)..b.dates.partition_point(|&x| x <= train_end);
        let test = at(test_start)..b.len();
        if test.is_empty() {
            return Err(StageError::Invalid(format!(
                "ticker {ticker}: no rows in the test split"
            )));
        }
        let extra = signals.map(|s| align_signals(&b.dates, s.get(&ticker)));
        let data = TickerData::new(&ticker, b, train, test, &settings.cfg, extra.as_deref())
            .map_err(StageError::Invalid)?;
        out.push(data);
    }
    if out.is_empty() {
        return Err(StageError::Invalid("no ticker to train on".into()));
    }
    Ok(out)
}

/// Trains `runs` agents per ticker on `threads` worker threads (one thread each: the CPU
/// network is single-threaded, and libtorch is set to one intra-op thread for CUDA runs).
pub fn run_all(
    settings: &DdqnSettings,
    data: &[TickerData],
    progress: &(dyn Fn(u64, u64, &str) + Sync),
) -> StageResult<Vec<RunRecord>> {
    // One intra-op thread per run: runs, not matrix products, are spread over the cores.
    // The setting is process-wide, so the previous value is restored afterwards.
    let previous_threads = tch::get_num_threads();
    tch::set_num_threads(1);
    let jobs: Vec<(usize, usize)> = (0..data.len())
        .flat_map(|d| (0..settings.runs).map(move |r| (d, r)))
        .collect();
    let next = AtomicUsize::new(0);
    let episodes_done = AtomicU64::new(0);
    let total = (jobs.len() * settings.cfg.episodes.max(1)) as u64;
    let results: Mutex<Vec<Option<Result<RunRecord, String>>>> =
        Mutex::new((0..jobs.len()).map(|_| None).collect());
    let workers = settings.threads.clamp(1, jobs.len());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let j = next.fetch_add(1, Ordering::SeqCst);
                    let Some(&(d, run)) = jobs.get(j) else { break };
                    let td = &data[d];
                    let seed = settings.seed + run as u64;
                    let report = |_: usize, _: usize| {
                        let n = episodes_done.fetch_add(1, Ordering::SeqCst) + 1;
                        progress(n, total, &format!("episodes ({} run {run})", td.ticker));
                    };
                    let out = train_run(
                        &settings.cfg,
                        td,
                        seed,
                        settings.device.device(),
                        settings.periods_per_year,
                        &report,
                    )
                    .map(|o| RunRecord {
                        ticker: td.ticker.clone(),
                        run,
                        seed,
                        curve: o.curve,
                        paths: o.paths,
                    })
                    .map_err(|e| format!("ticker {} run {run}: {e}", td.ticker));
                    if let Ok(mut r) = results.lock() {
                        r[j] = Some(out);
                    }
                }
            });
        }
    });
    tch::set_num_threads(previous_threads);
    let results = results
        .into_inner()
        .map_err(|_| StageError::Invalid("a training thread panicked".into()))?;
    results
        .into_iter()
        .map(|r| match r {
            Some(Ok(rec)) => Ok(rec),
            Some(Err(e)) => Err(StageError::external("ddqn training", e)),
            None => Err(StageError::Invalid(
                "a training thread stopped before finishing its run".into(),
            )),
        })
        .collect()
}

fn utf8<S: AsRef<str>>(v: impl IntoIterator<Item = S>) -> ArrayRef {
    // Collected first: arrow's string builder needs an exactly sized iterator.
    let v: Vec<S> = v.into_iter().collect();
    Arc::new(StringArray::from_iter_values(v))
}
fn f64s(v: impl IntoIterator<Item = f64>) -> ArrayRef {
    Arc::new(Float64Array::from_iter_values(v))
}
fn i64s(v: impl IntoIterator<Item = i64>) -> ArrayRef {
    Arc::new(Int64Array::from_iter_values(v))
}

/// (strategy name with run suffix, record, path) in the schema's sort order.
fn sorted_paths<'a>(
    strategy: &str,
    records: &'a [RunRecord],
) -> Vec<(String, &'a RunRecord, &'a SplitPath)> {
    let mut rows: Vec<_> = records
        .iter()
        .flat_map(|r| {
            r.paths
                .iter()
                .map(move |p| (format!("{strategy}#{}", r.run), r, p))
        })
        .collect();
    rows.sort_by(|a, b| (&a.0, &a.1.ticker, a.2.split).cmp(&(&b.0, &b.1.ticker, b.2.split)));
    rows
}

pub fn equity_batch(strategy: &str, records: &[RunRecord]) -> StageResult<RecordBatch> {
    let paths = sorted_paths(strategy, records);
    let rows = || {
        paths.iter().flat_map(|(s, r, p)| {
            p.steps
                .iter()
                .enumerate()
                .map(move |(i, st)| (s, r, p, i, st))
        })
    };
    schema("equity")?.batch(vec![
        utf8(rows().map(|x| x.0.as_str())),
        utf8(rows().map(|_| ENV)),
        utf8(rows().map(|x| x.1.ticker.as_str())),
        utf8(rows().map(|x| x.2.split)),
        Arc::new(Date32Array::from_iter_values(
            rows().map(|x| x.2.dates[x.3]),
        )),
        f64s(rows().map(|x| x.2.prices[x.3])),
        utf8(rows().map(|x| x.4.action)),
        f64s(rows().map(|x| x.4.position)),
        f64s(rows().map(|x| x.4.cash)),
        f64s(rows().map(|x| x.4.value)),
        f64s(rows().map(|x| x.4.daily_return)),
        Arc::new(BooleanArray::from_iter(
            rows().map(|x| Some(x.4.fill.is_some())),
        )),
    ])
}

pub fn trades_batch(strategy: &str, records: &[RunRecord]) -> StageResult<RecordBatch> {
    let paths = sorted_paths(strategy, records);
    let rows: Vec<_> = paths
        .iter()
        .flat_map(|(s, r, p)| {
            p.steps
                .iter()
                .zip(&p.dates)
                .filter_map(move |(st, &d)| st.fill.map(|f| (s, r, p.split, d, f)))
        })
        .collect();
    schema("trades")?.batch(vec![
        utf8(rows.iter().map(|x| x.0.as_str())),
        utf8(rows.iter().map(|_| ENV)),
        utf8(rows.iter().map(|x| x.1.ticker.as_str())),
        utf8(rows.iter().map(|x| x.2)),
        Arc::new(Date32Array::from_iter_values(rows.iter().map(|x| x.3))),
        utf8(rows.iter().map(|x| x.4.side.as_str())),
        f64s(rows.iter().map(|x| x.4.shares)),
        f64s(rows.iter().map(|x| x.4.price)),
        f64s(rows.iter().map(|x| x.4.cost)),
    ])
}

pub fn curve_batch(strategy: &str, records: &[RunRecord]) -> StageResult<RecordBatch> {
    let mut recs: Vec<&RunRecord> = records.iter().collect();
    recs.sort_by(|a, b| (&a.ticker, a.run).cmp(&(&b.ticker, b.run)));
    let rows: Vec<(&RunRecord, &CurvePoint)> = recs
        .iter()
        .flat_map(|r| r.curve.iter().map(move |c| (*r, c)))
        .collect();
    schema("training_curve")?.batch(vec![
        utf8(rows.iter().map(|_| strategy)),
        utf8(rows.iter().map(|_| ENV)),
        utf8(rows.iter().map(|x| x.0.ticker.as_str())),
        i64s(rows.iter().map(|x| x.0.run as i64)),
        i64s(rows.iter().map(|x| x.0.seed as i64)),
        i64s(rows.iter().map(|x| x.1.episode as i64)),
        i64s(rows.iter().map(|x| x.1.steps as i64)),
        i64s(rows.iter().map(|x| x.1.learn_steps as i64)),
        f64s(rows.iter().map(|x| x.1.epsilon)),
        Arc::new(Float64Array::from_iter(
            rows.iter()
                .map(|x| Some(x.1.mean_loss).filter(|l| l.is_finite())),
        )),
        f64s(rows.iter().map(|x| x.1.train_return)),
        f64s(rows.iter().map(|x| x.1.train_sharpe)),
        f64s(rows.iter().map(|x| x.1.test_return)),
        f64s(rows.iter().map(|x| x.1.test_sharpe)),
    ])
}

fn device_param(p: &Params) -> String {
    p.opt_str("device")
        .ok()
        .flatten()
        .unwrap_or_else(|| "auto".into())
}

impl Stage for Ddqn {
    fn kind(&self) -> &'static str {
        "ddqn"
    }

    fn check_params(&self, p: &Params, bound: &[&str]) -> StageResult<()> {
        DdqnSettings::from_params(p, bound.contains(&"signals")).map(drop)
    }

    fn spec(&self) -> StageSpec {
        StageSpec {
            doc: "TDQN agent (Théate & Ernst 2021; double DQN, 30-day window, 117 inputs) trained \
                  `runs` times per ticker; with `signals` bound, the LLM-guided DDQN (the same \
                  agent with the LLM interaction term and direction appended). Outputs the greedy \
                  policy's train and test paths (strategy '<name>#<run>') and training curves.",
            inputs: vec![
                InputSpec {
                    name: "table",
                    // Read by column name: ticker, date, high, low, close, volume.
                    schema: None,
                    required: true,
                    many: false,
                    doc: "Daily bars (schema indicators or ohlcv): ticker, date, high, low, close, volume",
                },
                InputSpec::one(
                    "signals",
                    "llm_signal",
                    "LLM strategist guidance per ticker and day",
                )
                .optional(),
            ],
            outputs: vec![
                OutputSpec::parquet(
                    "equity",
                    "equity",
                    "Daily path of each run's final greedy policy, train and test",
                ),
                OutputSpec::parquet("trades", "trades", "Executed trades of those paths"),
                OutputSpec::parquet(
                    "curve",
                    "training_curve",
                    "Per-episode training curve of every run",
                ),
            ],
            params: [
                vec![
                ],
                flag_trading::stages::split_date_params().to_vec(),
                vec![
                    ParamSpec::with_default(
                        "tickers",
                        ParamKind::List,
                        Value::Null,
                        "Tickers to train on (default: all in the table)",
                    ),
                    ParamSpec::with_default(
                        "runs",
                        ParamKind::Int,
                        json!(1),
                        "Independent runs per ticker; run r uses seed + r",
                    ),
                    ParamSpec::with_default(
                        "episodes",
                        ParamKind::Int,
                        json!(50),
                        "Training episodes per run",
                    ),
                    ParamSpec::with_default("seed", ParamKind::Int, json!(0), "Base seed"),
                    ParamSpec::with_default(
                        "device",
                        ParamKind::Str,
                        json!("auto"),
                        "cpu, cuda, or auto (cuda when available); CPU results are the same bytes on every machine",
                    ),
                    ParamSpec::with_default(
                        "strategy",
                        ParamKind::Str,
                        Value::Null,
                        "Strategy name (default tdqn, or llm_guided_ddqn when signals are bound)",
                    ),
                    ParamSpec::with_default(
                        "threads",
                        ParamKind::Int,
                        json!(0),
                        "Runs trained in parallel (0: one per core); each uses one thread",
                    ),
                    ParamSpec::with_default(
                        "learning_rate",
                        ParamKind::Float,
                        json!(1e-4),
                        "Adam learning rate (TDQN: 1e-4)",
                    ),
                    ParamSpec::with_default(
                        "window",
                        ParamKind::Int,
                        json!(30),
                        "Observation window in days (TDQN: 30)",
                    ),
                    ParamSpec::with_default(
                        "periods_per_year",
                        ParamKind::Float,
                        json!(252.0),
                        "Annualisation of the curve's Sharpe ratios",
                    ),
                ],
                flag_trading::stages::env_params().to_vec(),
            ]
            .concat(),
        }
    }

    fn fingerprint(&self, _params: &Params) -> Fingerprint {
        Fingerprint::new(format!("{VERSION}/ddqn-2"))
    }

    fn environment(&self, params: &Params) -> Vec<(String, String)> {
        let dev = DeviceChoice::parse(&device_param(params)).map_or("invalid", DeviceChoice::name);
        vec![("device".into(), dev.into())]
    }

    /// Each run trains on one thread whatever `threads` is, so the worker count does not change
    /// the bytes. On the CPU the network is `crate::mlp`: products, BatchNorm, clipping and
    /// Adam in plain Rust in a fixed order (one fused multiply-add chain per output, whatever
    /// the tiling), its own initial draws, no libtorch or BLAS call; its bytes are the same on
    /// every machine (pinned in `tests/ddqn.rs` at every kernel level), so the stage is
    /// portable there and a store moves between machine classes without rerunning it. On CUDA
    /// the network is libtorch's and the kernel path (GPU model included) is keyed.
    fn numerics(&self, params: &Params) -> flag_core::Numerics {
        match DeviceChoice::parse(&device_param(params)) {
            Some(DeviceChoice::Cpu) => flag_core::Numerics::Portable,
            _ => flag_core::Numerics::KernelPath,
        }
    }
}

impl flag_core::RunStage for Ddqn {
    fn run(&self, ctx: &mut StageContext) -> StageResult<()> {
        let with_signals = ctx.has_input("signals");
        let settings = DdqnSettings::from_params(&ctx.params, with_signals)?;
        if settings.device == DeviceChoice::Cuda && !tch::Cuda::is_available() {
            return Err(StageError::param(
                "device",
                "cuda was asked for (or auto found a GPU) but libtorch has no CUDA device here",
            ));
        }
        let table_file = ctx
            .input("table")?
            .files
            .first()
            .cloned()
            .unwrap_or_default();
        let bars = read_bars(&ctx.read_input("table")?, &table_file)?;
        let signals = if with_signals {
            let file = ctx
                .input("signals")?
                .files
                .first()
                .cloned()
                .unwrap_or_default();
            Some(read_signals(&ctx.read_input("signals")?, &file)?)
        } else {
            None
        };
        let data = prepare(&settings, bars, signals.as_ref())?;
        // libtorch's generator is never used (init and dropout draw from each run's ChaCha);
        // seeding it anyway keeps any library-internal draw reproducible.
        tch::manual_seed(settings.seed as i64);
        let records = {
            let shared: &StageContext = ctx;
            run_all(&settings, &data, &|done, total, msg| {
                shared.progress(done, total, msg)
            })?
        };
        for r in &records {
            ctx.log(format!(
                "{} run {} seed {}: train return {:.4}, test return {:.4}",
                r.ticker,
                r.run,
                r.seed,
                r.paths[0].total_return(settings.cfg.initial_capital),
                r.paths[1].total_return(settings.cfg.initial_capital)
            ));
        }
        ctx.write_parquet("equity", &[equity_batch(&settings.strategy, &records)?])?;
        ctx.write_parquet("trades", &[trades_batch(&settings.strategy, &records)?])?;
        ctx.write_parquet("curve", &[curve_batch(&settings.strategy, &records)?])?;
        Ok(())
    }
}
