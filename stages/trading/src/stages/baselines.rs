//! `baselines`: runs the rule-based strategies of [`crate::strategy`] on every ticker of the
//! `indicators` table, on a train and a test split, each from fresh capital.
use flag_core::{
    Fingerprint, InputSpec, OutputSpec, ParamKind, ParamSpec, Params, Stage, StageContext,
    StageError, StageResult, StageSpec,
};
use serde_json::json;

use super::{PeriodsPerYear, VERSION, boolean, date32, float64, int64, utf8};
use crate::backtest::{self, EnvKind, EnvSettings, GridChoice, window_pairs};
use crate::env::StepOutcome;
use crate::series::{Series, read_series, to_days};
use crate::strategy::{CloseSums, Strategy};

pub struct Baselines;

const DEFAULT_MA_WINDOWS: [u64; 11] = [2, 3, 5, 10, 15, 20, 30, 50, 100, 150, 200];

/// Everything the stage reads from its params, validated.
#[derive(Debug, Clone)]
pub struct BaselineConfig {
    pub env: EnvSettings,
    pub strategies: Vec<Strategy>,
    /// (split name, first day, last day) as date32 days; train first.
    pub splits: [(&'static str, i32, i32); 2],
    pub ma_windows: Vec<usize>,
    pub periods: PeriodsPerYear,
}

impl BaselineConfig {
    pub fn from_params(p: &Params) -> StageResult<Self> {
        let env_name = p.str("env")?;
        let kind = EnvKind::parse(&env_name).ok_or_else(|| {
            StageError::param("env", format!("'{env_name}' is not one of tdqn, finagent"))
        })?;
        let mut strategies = Vec::new();
        for name in p.str_list("strategies")? {
            let s = Strategy::parse(&name).ok_or_else(|| {
                let all: Vec<_> = Strategy::ALL.iter().map(|s| s.name()).collect();
                StageError::param(
                    "strategies",
                    format!("unknown strategy '{name}' (known: {})", all.join(", ")),
                )
            })?;
            if !strategies.contains(&s) {
                strategies.push(s);
            }
        }
        let date = |n: &str| p.date(n).map(to_days);
        let (train_start, train_end) = (date("train_start")?, date("train_end")?);
        let (test_start, test_end) = (date("test_start")?, date("test_end")?);
        if train_start > train_end || test_start > test_end {
            return Err(StageError::param(
                "train_start",
                "each split must start on or before its end",
            ));
        }
        if train_end >= test_start {
            return Err(StageError::param(
                "test_start",
                "the test split must start after the train split ends (no overlap)",
            ));
        }
        let env = super::env_settings(p, kind)?;
        let ma_windows = p.usize_list("ma_windows")?;
        if strategies.iter().any(|s| s.uses_ma_windows()) && window_pairs(&ma_windows).is_empty() {
            return Err(StageError::param(
                "ma_windows",
                "needs at least two distinct windows > 0",
            ));
        }
        Ok(BaselineConfig {
            env,
            strategies,
            splits: [
                ("train", train_start, train_end),
                ("test", test_start, test_end),
            ],
            ma_windows,
            periods: PeriodsPerYear::from_params(p, "periods_per_year")?,
        })
    }

    fn needed_columns(&self) -> Vec<&'static str> {
        let mut cols: Vec<&'static str> = self
            .strategies
            .iter()
            .flat_map(|s| s.columns().iter().copied())
            .collect();
        cols.sort_unstable();
        cols.dedup();
        cols
    }
}

/// One strategy's path on one ticker and split.
pub struct Path {
    pub strategy: Strategy,
    pub ticker: String,
    pub split: &'static str,
    pub dates: Vec<i32>,
    pub prices: Vec<f64>,
    pub steps: Vec<StepOutcome>,
}

/// One ticker's paths (both splits) and its grid-search choices.
pub type TickerRuns = (Vec<Path>, Vec<(Strategy, GridChoice)>);

/// Runs every configured strategy on one ticker: paths for both splits, and the grid
/// search's choices.
pub fn run_ticker(cfg: &BaselineConfig, s: &Series) -> StageResult<TickerRuns> {
    let sums = CloseSums::new(&s.close);
    let ranges = cfg.splits.map(|(name, a, b)| (name, s.range(a, b)));
    for (name, r) in &ranges {
        if r.is_empty() {
            return Err(StageError::Invalid(format!(
                "ticker {}: no rows in the {name} split; choose dates the data covers",
                s.ticker
            )));
        }
    }
    let pairs = window_pairs(&cfg.ma_windows);
    let periods = cfg.periods.for_ticker(&s.ticker) as f64;
    let mut paths = Vec::new();
    let mut choices = Vec::new();
    for &strategy in &cfg.strategies {
        let windows = if strategy.uses_ma_windows() {
            let choice = backtest::grid_search(
                &cfg.env,
                strategy,
                s,
                &sums,
                &pairs,
                ranges[0].1.clone(),
                periods,
            )
            .ok_or_else(|| StageError::param("ma_windows", "no window pair to search"))?;
            choices.push((strategy, choice));
            Some(choice.windows)
        } else {
            None
        };
        for (split, range) in &ranges {
            paths.push(Path {
                strategy,
                ticker: s.ticker.clone(),
                split,
                dates: s.dates[range.clone()].to_vec(),
                prices: s.close[range.clone()].to_vec(),
                steps: backtest::run(&cfg.env, strategy, s, &sums, windows, range.clone()),
            });
        }
    }
    Ok((paths, choices))
}

impl Stage for Baselines {
    fn kind(&self) -> &'static str {
        "baselines"
    }

    fn check_params(&self, p: &Params, _bound: &[&str]) -> StageResult<()> {
        BaselineConfig::from_params(p).map(drop)
    }

    fn spec(&self) -> StageSpec {
        let all: Vec<_> = Strategy::ALL.iter().map(|s| s.name()).collect();
        StageSpec {
            doc: "Rule-based baselines (Buy&Hold, Sell&Hold, TDQN moving averages, MACD, KDJ+RSI, \
                  z-score, stochastic Bollinger) in the TDQN or FinAgent environment, on a train \
                  and a test split. Rules: stages/trading/src/strategy.rs.",
            inputs: vec![InputSpec {
                name: "table",
                // Read by column name: ticker, date, close and the indicator columns the
                // chosen strategies use (schema `indicators`).
                schema: None,
                required: true,
                many: false,
                doc: "Indicators table: ticker, date, close and indicator columns",
            }],
            outputs: vec![
                OutputSpec::parquet(
                    "equity",
                    "equity",
                    "Daily portfolio path per strategy, ticker and split",
                ),
                OutputSpec::parquet("trades", "trades", "Executed trades"),
                OutputSpec::parquet(
                    "strategy_params",
                    "strategy_params",
                    "Grid-searched windows",
                ),
            ],
            params: [
                vec![
                    ParamSpec::required("env", ParamKind::Str, "Environment rules: tdqn or finagent"),
                    ParamSpec::with_default(
                        "strategies",
                        ParamKind::List,
                        json!(all),
                        "Strategies to run",
                    ),
                ],
                super::split_date_params().to_vec(),
                super::env_params().to_vec(),
                vec![
                    ParamSpec::with_default(
                        "ma_windows",
                        ParamKind::List,
                        json!(DEFAULT_MA_WINDOWS),
                        "Moving-average windows; every pair short < long is tried on the train split",
                    ),
                    ParamSpec::with_default(
                        "periods_per_year",
                        ParamKind::Any,
                        json!(252),
                        "Annualisation of the train Sharpe ratio: a number or {default: 252, ETH: 365}",
                    ),
                ],
            ]
            .concat(),
        }
    }

    fn fingerprint(&self, _params: &Params) -> Fingerprint {
        Fingerprint::new(format!("{VERSION}/baselines-1"))
    }
}

impl flag_core::RunStage for Baselines {
    fn run(&self, ctx: &mut StageContext) -> StageResult<()> {
        let cfg = BaselineConfig::from_params(&ctx.params)?;
        let batch = ctx.read_input("table")?;
        let series = read_series(&batch, "table", &cfg.needed_columns())?;
        let mut paths = Vec::new();
        let mut choices = Vec::new();
        for (i, s) in series.iter().enumerate() {
            ctx.progress(i as u64, series.len() as u64, &s.ticker);
            let (p, c) = run_ticker(&cfg, s)?;
            paths.extend(p);
            choices.extend(c.into_iter().map(|(st, ch)| (st, s.ticker.clone(), ch)));
        }
        ctx.progress(series.len() as u64, series.len() as u64, "done");
        // Tickers arrive sorted; order paths by (strategy name, ticker, split) for the schema.
        paths.sort_by(|a, b| {
            (a.strategy.name(), &a.ticker, a.split).cmp(&(b.strategy.name(), &b.ticker, b.split))
        });
        choices.sort_by(|a, b| (a.0.name(), &a.1).cmp(&(b.0.name(), &b.1)));
        let env = cfg.env.kind.name();
        let (equity, trades) = (equity_batch(env, &paths)?, trades_batch(env, &paths)?);
        ctx.log(format!(
            "{} tickers, {} paths, {} equity rows, {} trades",
            series.len(),
            paths.len(),
            equity.num_rows(),
            trades.num_rows()
        ));
        ctx.write_parquet("equity", &[equity])?;
        ctx.write_parquet("trades", &[trades])?;
        let params = params_batch(env, cfg.splits[0], &choices)?;
        ctx.write_parquet("strategy_params", &[params])?;
        Ok(())
    }
}

fn equity_batch(env: &str, paths: &[Path]) -> StageResult<flag_core::arrow::array::RecordBatch> {
    let rows = || {
        paths
            .iter()
            .flat_map(|p| p.steps.iter().map(move |s| (p, s)))
    };
    let n = rows().count();
    flag_core::schema::schema("equity")?.batch(vec![
        utf8(rows().map(|(p, _)| p.strategy.name())),
        utf8(std::iter::repeat_n(env, n)),
        utf8(rows().map(|(p, _)| p.ticker.as_str())),
        utf8(rows().map(|(p, _)| p.split)),
        date32(paths.iter().flat_map(|p| p.dates.iter().copied()).collect()),
        float64(
            paths
                .iter()
                .flat_map(|p| p.prices.iter().copied())
                .collect(),
        ),
        utf8(rows().map(|(_, s)| s.action)),
        float64(rows().map(|(_, s)| s.position).collect()),
        float64(rows().map(|(_, s)| s.cash).collect()),
        float64(rows().map(|(_, s)| s.value).collect()),
        float64(rows().map(|(_, s)| s.daily_return).collect()),
        boolean(rows().map(|(_, s)| s.fill.is_some()).collect()),
    ])
}

fn trades_batch(env: &str, paths: &[Path]) -> StageResult<flag_core::arrow::array::RecordBatch> {
    let rows: Vec<_> = paths
        .iter()
        .flat_map(|p| {
            p.steps
                .iter()
                .zip(&p.dates)
                .filter_map(move |(s, &d)| s.fill.map(|f| (p, d, f)))
        })
        .collect();
    flag_core::schema::schema("trades")?.batch(vec![
        utf8(rows.iter().map(|(p, _, _)| p.strategy.name())),
        utf8(std::iter::repeat_n(env, rows.len())),
        utf8(rows.iter().map(|(p, _, _)| p.ticker.as_str())),
        utf8(rows.iter().map(|(p, _, _)| p.split)),
        date32(rows.iter().map(|r| r.1).collect()),
        utf8(rows.iter().map(|r| r.2.side.as_str())),
        float64(rows.iter().map(|r| r.2.shares).collect()),
        float64(rows.iter().map(|r| r.2.price).collect()),
        float64(rows.iter().map(|r| r.2.cost).collect()),
    ])
}

fn params_batch(
    env: &str,
    train: (&str, i32, i32),
    choices: &[(Strategy, String, GridChoice)],
) -> StageResult<flag_core::arrow::array::RecordBatch> {
    let n = choices.len();
    flag_core::schema::schema("strategy_params")?.batch(vec![
        utf8(choices.iter().map(|c| c.0.name())),
        utf8(std::iter::repeat_n(env, n)),
        utf8(choices.iter().map(|c| c.1.as_str())),
        int64(choices.iter().map(|c| c.2.windows.short as i64).collect()),
        int64(choices.iter().map(|c| c.2.windows.long as i64).collect()),
        date32(vec![train.1; n]),
        date32(vec![train.2; n]),
        float64(choices.iter().map(|c| c.2.train_sharpe).collect()),
        int64(choices.iter().map(|c| c.2.candidates as i64).collect()),
    ])
}
