//! Stage `ingest_ohlcv`: daily bars from the raw vendor files, plus a report of every defect
//! found. Defects that leave a bar usable (close outside [low, high], zero volume, gaps,
//! identical duplicates) are counted and surfaced, never silently fixed; anything that makes a
//! value unknowable (unparsable, NaN, non-positive price, conflicting duplicate) is fatal.
//!
//! CoinGecko has one price a day (the 00:00 UTC snapshot), so its bar is derived without
//! look-ahead: open(d) = snapshot at 00:00 of d; close(d) = snapshot at 00:00 of d+1, the end
//! of day d, which is exactly what is known at the decision time "close of d";
//! high/low = max/min(open, close), only a lower bound of the true range; volume(d) =
//! total_volume of the d+1 snapshot (CoinGecko's trailing 24h volume, i.e. day d's volume).
//! A day whose next snapshot is missing (the last day, or before a hole) has no close and is
//! dropped and counted.
//!
//! InvestorBench files have only a close: open, high, low and volume are written as nulls
//! (schema `ohlcv` allows it), never invented, and the range and zero-volume checks do not
//! apply to such bars (their counts stay 0). The format holds stocks and crypto alike, so the
//! gap rule is chosen per ticker: tickers in the `crypto_tickers` param (default BTC, ETH;
//! case-insensitive) trade every calendar day and any missing day is a gap; the others use the
//! stock rule. CoinGecko is crypto whatever the param says.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::NaiveDate;
use flag_core::arrow::array::{ArrayRef, Date32Array, Float64Array, Int64Array, StringArray};
use flag_core::schema::schema;
use flag_core::{
    Fingerprint, OutputSpec, ParamKind, ParamSpec, Params, Stage, StageContext, StageError,
    StageResult, StageSpec,
};
use serde_json::{Value, json};

use super::ohlcv_formats::{Format, RawRow, read_file};
use super::util::{date32, display_name};

pub struct IngestOhlcv;

const VERSION: &str = concat!(
    env!("CARGO_PKG_NAME"),
    "@",
    env!("CARGO_PKG_VERSION"),
    "/ingest_ohlcv.2"
);

/// A calendar gap longer than this between two stock bars is reported (a long weekend plus a
/// holiday is 4 days).
const STOCK_GAP_DAYS: i64 = 4;

/// Default of the `crypto_tickers` param.
const CRYPTO_TICKERS: [&str; 2] = ["BTC", "ETH"];

struct Config {
    source: PathBuf,
    format: Format,
    tickers: Vec<String>,
    start: Option<NaiveDate>,
    end: Option<NaiveDate>,
    /// Upper-cased tickers that trade every calendar day.
    crypto_tickers: Vec<String>,
}

impl Config {
    /// Crypto (every calendar day) or stock calendar for the gap rule.
    fn is_crypto(&self, ticker: &str) -> bool {
        self.format.is_crypto() || self.crypto_tickers.contains(&ticker.to_uppercase())
    }
}

fn config(p: &Params) -> StageResult<Config> {
    let mut tickers = p.str_list("tickers")?;
    super::util::check_tickers("tickers", &tickers)?;
    tickers.sort();
    tickers.dedup();
    if tickers.is_empty() {
        return Err(StageError::param(
            "tickers",
            "must name at least one ticker",
        ));
    }
    let start = p.get("start").map(|_| p.date("start")).transpose()?;
    let end = p.get("end").map(|_| p.date("end")).transpose()?;
    if let (Some(s), Some(e)) = (start, end)
        && s > e
    {
        return Err(StageError::param("end", format!("{e} is before start {s}")));
    }
    let crypto_tickers = match p.get("crypto_tickers") {
        Some(v) if !v.is_null() => p.str_list("crypto_tickers")?,
        _ => CRYPTO_TICKERS.iter().map(|t| t.to_string()).collect(),
    };
    Ok(Config {
        source: p.path("source")?,
        format: Format::parse(&p.str("format")?)?,
        tickers,
        start,
        end,
        crypto_tickers: crypto_tickers.iter().map(|t| t.to_uppercase()).collect(),
    })
}

/// The files read for each ticker, in concatenation order. A missing file is fatal.
fn ticker_files(cfg: &Config) -> StageResult<Vec<(String, Vec<PathBuf>)>> {
    if cfg.source.is_file() {
        if cfg.tickers.len() != 1 {
            return Err(StageError::param(
                "tickers",
                "a single-file source holds exactly one ticker; name one, or give a directory",
            ));
        }
        return Ok(vec![(cfg.tickers[0].clone(), vec![cfg.source.clone()])]);
    }
    if !cfg.source.is_dir() {
        return Err(StageError::param(
            "source",
            format!(
                "'{}' is neither a file nor a directory",
                cfg.source.display()
            ),
        ));
    }
    cfg.tickers
        .iter()
        .map(|t| {
            let files = cfg.format.ticker_files(&cfg.source, t);
            for f in &files {
                if !f.is_file() {
                    return Err(StageError::file(
                        f,
                        format!("missing {} file for ticker '{t}'", cfg.format.name()),
                    ));
                }
            }
            Ok((t.clone(), files))
        })
        .collect()
}

impl Stage for IngestOhlcv {
    fn kind(&self) -> &'static str {
        "ingest_ohlcv"
    }

    fn check_params(&self, p: &Params, _bound: &[&str]) -> StageResult<()> {
        config(p).map(drop)
    }

    fn spec(&self) -> StageSpec {
        StageSpec {
            doc: "Reads daily OHLCV files (tdqn, yfinance, yahoo, coingecko; investorbench: close only, \
                  open/high/low/volume null) into one sorted bars table and a per-file defect report",
            inputs: vec![],
            outputs: vec![
                OutputSpec::parquet("bars", "ohlcv", "Daily bars, sorted by ticker then date"),
                OutputSpec::parquet(
                    "report",
                    "ingest_report",
                    "Rows, dates and defect counts per ticker and source file",
                ),
            ],
            params: vec![
                ParamSpec::required(
                    "source",
                    ParamKind::Path,
                    "Directory of per-ticker files, or one file",
                ),
                ParamSpec::required(
                    "format",
                    ParamKind::Str,
                    "tdqn | yfinance | yahoo | coingecko | investorbench",
                ),
                ParamSpec::required(
                    "tickers",
                    ParamKind::List,
                    "Tickers to read (file names derive from them)",
                ),
                ParamSpec::with_default(
                    "start",
                    ParamKind::Date,
                    Value::Null,
                    "First date kept (inclusive)",
                ),
                ParamSpec::with_default(
                    "end",
                    ParamKind::Date,
                    Value::Null,
                    "Last date kept (inclusive)",
                ),
                ParamSpec::with_default(
                    "crypto_tickers",
                    ParamKind::List,
                    json!(CRYPTO_TICKERS),
                    "Tickers trading every calendar day (case-insensitive): any missing day is a \
                     gap; other tickers use the stock rule (> 4 days). CoinGecko is always crypto",
                ),
            ],
        }
    }

    fn fingerprint(&self, _params: &Params) -> Fingerprint {
        Fingerprint::new(VERSION)
    }

    fn external_files(&self, params: &Params) -> StageResult<Vec<PathBuf>> {
        let cfg = config(params)?;
        Ok(ticker_files(&cfg)?
            .into_iter()
            .flat_map(|(_, f)| f)
            .collect())
    }
}

impl flag_core::RunStage for IngestOhlcv {
    fn run(&self, ctx: &mut StageContext) -> StageResult<()> {
        let cfg = config(&ctx.params)?;
        let plan = ticker_files(&cfg)?;
        let mut bars = Vec::new();
        let mut reports = Vec::new();
        for (i, (ticker, files)) in plan.iter().enumerate() {
            ctx.progress(i as u64, plan.len() as u64, ticker);
            let (b, r) = ingest_ticker(&cfg, ticker, files)?;
            for rep in &r {
                ctx.log(format!(
                    "{ticker} {}: {} rows read, {} kept, {} duplicates dropped, {} empty, \
                     {} close>high, {} close<low, {} gaps",
                    rep.file,
                    rep.rows_read,
                    rep.rows_kept,
                    rep.duplicates_dropped,
                    rep.empty_rows,
                    rep.close_above_high,
                    rep.close_below_low,
                    rep.gaps
                ));
            }
            bars.extend(b);
            reports.extend(r);
        }
        ctx.progress(plan.len() as u64, plan.len() as u64, "done");
        let bars_batch = bars_batch(&bars)?;
        let report_batch = report_batch(&reports)?;
        ctx.write_parquet("bars", &[bars_batch])?;
        ctx.write_parquet("report", &[report_batch])?;
        Ok(())
    }
}

/// One output bar with the file it came from.
pub(crate) struct Bar {
    pub ticker: String,
    pub row: RawRow,
}

/// One row of the ingest report.
#[derive(Debug, Default, Clone)]
pub(crate) struct FileReport {
    pub ticker: String,
    pub file: String,
    pub format: &'static str,
    pub rows_read: u64,
    pub empty_rows: u64,
    pub duplicates_dropped: u64,
    pub filtered_out: u64,
    pub no_next_snapshot: u64,
    pub off_midnight_snapshots: u64,
    pub rows_kept: u64,
    pub first_date: Option<NaiveDate>,
    pub last_date: Option<NaiveDate>,
    pub close_above_high: u64,
    pub close_below_low: u64,
    pub open_outside_range: u64,
    pub high_below_low: u64,
    pub zero_volume: u64,
    pub gaps: u64,
    pub max_gap_days: u64,
    pub note: &'static str,
}

fn note(format: Format) -> &'static str {
    match format {
        Format::Tdqn => {
            "Close is the split- and dividend-adjusted close, Open/High/Low only split-adjusted: \
             close outside [low, high] is a property of the source, kept as is; adj_close is null"
        }
        Format::Yfinance => {
            "auto-adjusted prices (consistent bars); adj_close from 'Adj Close' when present"
        }
        Format::Yahoo => "raw Open/High/Low/Close; adj_close from 'Adj Close'",
        Format::Coingecko => {
            "one 00:00 UTC snapshot a day: open(d) = snapshot d, close(d) = snapshot d+1, \
             high/low = max/min(open, close) (a lower bound of the true range), volume(d) = \
             total_volume of snapshot d+1; days without a next snapshot dropped"
        }
        Format::Investorbench => {
            "close only ('prices'): open/high/low/volume are null, never invented, so the \
             close/open range and zero-volume checks do not apply (counts 0); news/10-K/10-Q \
             are not read here; gaps by calendar day for crypto_tickers (default BTC, ETH), \
             else the stock rule"
        }
    }
}

/// Reads, merges, checks and derives the bars of one ticker.
fn ingest_ticker(
    cfg: &Config,
    ticker: &str,
    files: &[PathBuf],
) -> StageResult<(Vec<Bar>, Vec<FileReport>)> {
    let mut reports: Vec<FileReport> = files
        .iter()
        .map(|f| FileReport {
            ticker: ticker.to_string(),
            file: display_name(&cfg.source, f),
            format: cfg.format.name(),
            note: note(cfg.format),
            ..FileReport::default()
        })
        .collect();
    let mut rows: Vec<(usize, RawRow)> = Vec::new();
    for (fi, f) in files.iter().enumerate() {
        let parsed = read_file(cfg.format, f, ticker)?;
        reports[fi].rows_read = parsed.rows_read;
        reports[fi].empty_rows = parsed.empty_rows;
        rows.extend(parsed.rows.into_iter().map(|r| (fi, r)));
    }
    // Stable order: date, then file order, then line, so "the later copy" is well defined.
    rows.sort_by_key(|a| (a.1.date, a.0, a.1.line));
    let rows = dedupe(cfg.format, files, rows, &mut reports)?;
    for (fi, r) in &rows {
        reports[*fi].off_midnight_snapshots += u64::from(r.off_midnight);
    }
    let rows = if cfg.format == Format::Coingecko {
        derive_snapshot_bars(rows, &mut reports)
    } else {
        rows
    };

    let max_gap = if cfg.is_crypto(ticker) {
        1
    } else {
        STOCK_GAP_DAYS
    };
    let mut out = Vec::new();
    let mut prev: Option<NaiveDate> = None;
    for (fi, r) in rows {
        let rep = &mut reports[fi];
        if cfg.start.is_some_and(|s| r.date < s) || cfg.end.is_some_and(|e| r.date > e) {
            rep.filtered_out += 1;
            continue;
        }
        rep.rows_kept += 1;
        rep.first_date = Some(rep.first_date.map_or(r.date, |d| d.min(r.date)));
        rep.last_date = Some(rep.last_date.map_or(r.date, |d| d.max(r.date)));
        // Close-only bars (None) have nothing to check.
        if let (Some(h), Some(l)) = (r.high, r.low) {
            rep.close_above_high += u64::from(r.close > h);
            rep.close_below_low += u64::from(r.close < l);
            rep.open_outside_range += u64::from(r.open.is_some_and(|o| o > h || o < l));
            rep.high_below_low += u64::from(h < l);
        }
        rep.zero_volume += u64::from(r.volume == Some(0.0));
        if let Some(p) = prev {
            let days = (r.date - p).num_days();
            if days > max_gap {
                rep.gaps += 1;
                rep.max_gap_days = rep.max_gap_days.max(days as u64);
            }
        }
        prev = Some(r.date);
        out.push(Bar {
            ticker: ticker.to_string(),
            row: r,
        });
    }
    Ok((out, reports))
}

/// Drops rows identical to an earlier row of the same date (counted on the later row's file);
/// the same date with different values is fatal, naming both places.
fn dedupe(
    format: Format,
    files: &[PathBuf],
    rows: Vec<(usize, RawRow)>,
    reports: &mut [FileReport],
) -> StageResult<Vec<(usize, RawRow)>> {
    let mut out: Vec<(usize, RawRow)> = Vec::with_capacity(rows.len());
    for (fi, r) in rows {
        if let Some((pfi, p)) = out.last()
            && p.date == r.date
        {
            let (a, b) = (p.values(), r.values());
            if let Some(k) = (0..6).find(|&k| a[k] != b[k]) {
                return Err(StageError::data(
                    &files[fi],
                    r.line,
                    format.columns()[k],
                    format!(
                        "conflicting duplicate date {}: {} here, {} at {}:{}",
                        r.date,
                        fmt_opt(b[k]),
                        fmt_opt(a[k]),
                        files[*pfi].display(),
                        p.line
                    ),
                ));
            }
            reports[fi].duplicates_dropped += 1;
            continue;
        }
        out.push((fi, r));
    }
    Ok(out)
}

fn fmt_opt(x: Option<f64>) -> String {
    x.map_or_else(|| "empty".to_string(), |v| v.to_string())
}

/// CoinGecko: turns one-price-a-day snapshots into bars (see the module doc).
fn derive_snapshot_bars(
    snaps: Vec<(usize, RawRow)>,
    reports: &mut [FileReport],
) -> Vec<(usize, RawRow)> {
    let mut out = Vec::with_capacity(snaps.len());
    for (i, (fi, s)) in snaps.iter().enumerate() {
        let next = snaps.get(i + 1).map(|(_, n)| n);
        match next {
            Some(n) if (n.date - s.date).num_days() == 1 => {
                // A snapshot row holds its price in every price field.
                let (open, close) = (s.close, n.close);
                out.push((
                    *fi,
                    RawRow {
                        open: Some(open),
                        high: Some(open.max(close)),
                        low: Some(open.min(close)),
                        close,
                        volume: n.volume,
                        ..s.clone()
                    },
                ));
            }
            _ => reports[*fi].no_next_snapshot += 1,
        }
    }
    out
}

fn bars_batch(bars: &[Bar]) -> StageResult<flag_core::arrow::array::RecordBatch> {
    let f = |g: fn(&RawRow) -> Option<f64>| -> ArrayRef {
        Arc::new(Float64Array::from_iter(bars.iter().map(|b| g(&b.row))))
    };
    schema("ohlcv")?.batch(vec![
        Arc::new(StringArray::from_iter_values(
            bars.iter().map(|b| b.ticker.as_str()),
        )),
        Arc::new(Date32Array::from_iter_values(
            bars.iter().map(|b| date32(b.row.date)),
        )),
        f(|r| r.open),
        f(|r| r.high),
        f(|r| r.low),
        f(|r| Some(r.close)),
        f(|r| r.volume),
        f(|r| r.adj_close),
    ])
}

fn report_batch(reps: &[FileReport]) -> StageResult<flag_core::arrow::array::RecordBatch> {
    let n = |g: fn(&FileReport) -> u64| -> ArrayRef {
        Arc::new(Int64Array::from_iter_values(
            reps.iter().map(|r| g(r) as i64),
        ))
    };
    let s = |g: fn(&FileReport) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(reps.iter().map(g)))
    };
    let d = |g: fn(&FileReport) -> Option<NaiveDate>| -> ArrayRef {
        Arc::new(Date32Array::from_iter(
            reps.iter().map(|r| g(r).map(date32)),
        ))
    };
    schema("ingest_report")?.batch(vec![
        s(|r| &r.ticker),
        s(|r| &r.file),
        s(|r| r.format),
        n(|r| r.rows_read),
        n(|r| r.rows_kept),
        d(|r| r.first_date),
        d(|r| r.last_date),
        n(|r| r.empty_rows),
        n(|r| r.duplicates_dropped),
        n(|r| r.filtered_out),
        n(|r| r.no_next_snapshot),
        n(|r| r.off_midnight_snapshots),
        n(|r| r.close_above_high),
        n(|r| r.close_below_low),
        n(|r| r.open_outside_range),
        n(|r| r.high_below_low),
        n(|r| r.zero_volume),
        n(|r| r.gaps),
        n(|r| r.max_gap_days),
        s(|r| r.note),
    ])
}

/// Params for a run, as a pipeline would give them (used by tests and examples).
pub fn params(source: &Path, format: &str, tickers: &[&str]) -> Params {
    let mut m = std::collections::BTreeMap::new();
    m.insert("source".into(), json!(source.to_string_lossy()));
    m.insert("format".into(), json!(format));
    m.insert("tickers".into(), json!(tickers));
    Params::new(m)
}
