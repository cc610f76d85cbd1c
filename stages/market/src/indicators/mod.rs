//! The `indicators` stage: technical indicators per ticker, written in DataFusion SQL
//! (`stages/market/sql/indicators.sql`) with the recursive ones (EMA, MACD, Wilder's RSI and
//! ATR, the KDJ smoothing) as user-defined window functions that follow TA-Lib's seeding.
//!
//! The column set and every warm-up is documented in `schemas/indicators.yaml`. The SQL is
//! read at run time through the stage fingerprint, so editing it reruns exactly this stage.
//! Library entry points ([`IndicatorRunner`], [`compute_parquet`]) take the SQL text as an
//! argument so tests and the benchmark run the very same code path on the file's contents.

mod engine;
mod rolling;
mod runner;
mod talib;
mod udwf;

pub use engine::{DEFAULT_CHUNK_ROWS, INPUT_TABLE, Options, RunStats, compute_parquet};
pub use runner::IndicatorRunner;

use std::time::Instant;

use flag_core::{
    Fingerprint, InputSpec, OutputSpec, ParamKind, ParamSpec, Params, Stage, StageContext,
    StageError, StageResult, StageSpec,
};

/// Root-relative path of the SQL the stage runs (hashed into its key).
pub const SQL_FILE: &str = "stages/market/sql/indicators.sql";

/// Bump when the Rust side (UDWFs, grouping, writer) changes behaviour.
const REVISION: &str = "indicators-4";

flag_core::stage_kinds!(Indicators);

fn chunk_rows(p: &Params) -> StageResult<usize> {
    let n = p.usize("chunk_rows")?;
    if n == 0 {
        return Err(StageError::param("chunk_rows", "must be at least 1"));
    }
    Ok(n)
}

/// `uses: indicators` — bars (ohlcv) in, `table` (indicators) out.
pub struct Indicators;

impl Stage for Indicators {
    fn kind(&self) -> &'static str {
        "indicators"
    }

    fn spec(&self) -> StageSpec {
        StageSpec {
            doc: "Technical indicators per ticker (SMA, EMA, RSI, MACD, ATR, Bollinger, KDJ, \
                  z-scores, VWAP, returns, volatility, slopes) matching TA-Lib's conventions; \
                  NULL during warm-up; no look-ahead.",
            inputs: vec![InputSpec::one(
                "bars",
                "ohlcv",
                "Daily bars, sorted by ticker then date, one row per (ticker, date)",
            )],
            outputs: vec![OutputSpec::parquet(
                "table",
                "indicators",
                "The bars with their indicators, sorted by ticker then date",
            )],
            params: vec![ParamSpec::with_default(
                "chunk_rows",
                ParamKind::Int,
                serde_json::json!(DEFAULT_CHUNK_ROWS),
                "Rows per group of whole tickers computed and written at once (memory bound; \
                 also sets the output's row groups)",
            )],
        }
    }

    fn fingerprint(&self, _params: &Params) -> Fingerprint {
        Fingerprint::new(format!(
            "{}@{}/{REVISION}",
            env!("CARGO_PKG_NAME"),
            env!("CARGO_PKG_VERSION")
        ))
        .file(SQL_FILE)
    }

    fn check_params(&self, p: &Params, _bound: &[&str]) -> StageResult<()> {
        chunk_rows(p).map(drop)
    }
}

impl flag_core::RunStage for Indicators {
    fn run(&self, ctx: &mut StageContext) -> StageResult<()> {
        let chunk_rows = chunk_rows(&ctx.params)?;
        let sql = ctx.resource_str(SQL_FILE)?.to_string();
        let inputs = ctx.input("bars")?.files.clone();
        let output = ctx.output_file("table")?;
        let opts = Options {
            chunk_rows,
            threads: 0,
        };
        let started = Instant::now();
        let ctx_ref: &StageContext = ctx;
        let progress = |done: u64, total: u64| ctx_ref.progress(done, total, "indicators");
        // DataFusion runs on its own runtime; a fresh thread keeps it clear of the caller's.
        let stats = std::thread::scope(|s| {
            s.spawn(|| compute_parquet(&sql, &inputs, &output, &opts, &progress))
                .join()
                .map_err(|_| StageError::Invalid("indicators: the worker thread panicked".into()))
        })??;
        ctx.log(format!(
            "indicators: {} rows in {} groups of tickers, {:.2}s",
            stats.rows,
            stats.groups,
            started.elapsed().as_secs_f64()
        ));
        Ok(())
    }
}
