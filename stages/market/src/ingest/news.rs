//! Stage `ingest_news`: vendor news into one table, each item tagged with the first trading
//! date it may influence, without look-ahead.
//!
//! Stocks: an item published at or before 16:00 America/New_York on a trading day belongs to
//! that day; after the close, or on a non-trading day, to the next trading day. The trading
//! calendar is the set of dates of the ticker in the `bars` input. Items before the first or
//! after the last known trading date cannot be placed and are dropped and counted. (Early
//! closes at 13:00 are not in a daily-bars calendar; 13:00-16:00 items on those days still
//! map to that day: a known limit of the rule.)
//!
//! Crypto (24/7, decision at 00:00 UTC of d+1): trading_date = the UTC date of published_at.
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{NaiveDate, NaiveTime};
use chrono_tz::America::New_York;
use flag_core::arrow::array::{
    Array, ArrayRef, Date32Array, Float64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use flag_core::schema::schema;
use flag_core::{
    Fingerprint, InputSpec, OutputSpec, ParamKind, ParamSpec, Params, Stage, StageContext,
    StageError, StageResult, StageSpec,
};
use serde_json::{Value, json};

use super::news_formats::{Item, read_cryptotrade, read_gnews, read_stocknewsapi};
use super::util::{date32, files_with_ext, from_date32};

pub struct IngestNews;

const VERSION: &str = concat!(
    env!("CARGO_PKG_NAME"),
    "@",
    env!("CARGO_PKG_VERSION"),
    "/ingest_news.1"
);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    StockNewsApi,
    Gnews,
    CryptoTrade,
}

impl Format {
    fn parse(s: &str) -> StageResult<Format> {
        match s {
            "stocknewsapi" => Ok(Format::StockNewsApi),
            "gnews" => Ok(Format::Gnews),
            "cryptotrade" => Ok(Format::CryptoTrade),
            o => Err(StageError::param(
                "format",
                format!("'{o}' is not one of stocknewsapi, gnews, cryptotrade"),
            )),
        }
    }
    fn vendor(self) -> &'static str {
        match self {
            Format::StockNewsApi => "stocknewsapi",
            Format::Gnews => "gnews",
            Format::CryptoTrade => "cryptotrade",
        }
    }
}

struct Config {
    source: PathBuf,
    format: Format,
    tickers: Vec<String>,
    /// Vendor name -> output ticker (e.g. GOOG -> GOOGL).
    aliases: BTreeMap<String, String>,
    start: Option<NaiveDate>,
    end: Option<NaiveDate>,
}

impl Config {
    /// The name the vendor files use for an output ticker.
    fn vendor_name<'a>(&'a self, ticker: &'a str) -> &'a str {
        self.aliases
            .iter()
            .find(|(_, t)| t.as_str() == ticker)
            .map_or(ticker, |(v, _)| v.as_str())
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
    let mut aliases = BTreeMap::new();
    match p.get("aliases") {
        None => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                let v = v.as_str().ok_or_else(|| {
                    StageError::param(
                        "aliases",
                        format!("'{k}' must map to a ticker string, got {v}"),
                    )
                })?;
                aliases.insert(k.clone(), v.to_string());
            }
        }
        Some(o) => {
            return Err(StageError::param(
                "aliases",
                format!("must be a map, got {o}"),
            ));
        }
    }
    let format = Format::parse(&p.str("format")?)?;
    if format == Format::CryptoTrade && tickers.len() != 1 {
        return Err(StageError::param(
            "tickers",
            "cryptotrade news has no ticker field: name exactly one",
        ));
    }
    Ok(Config {
        source: p.path("source")?,
        format,
        tickers,
        aliases,
        start: p.get("start").map(|_| p.date("start")).transpose()?,
        end: p.get("end").map(|_| p.date("end")).transpose()?,
    })
}

/// Files read, per output ticker (gnews: one file shared by every ticker).
fn plan(cfg: &Config) -> StageResult<Vec<(String, Vec<PathBuf>)>> {
    let src = &cfg.source;
    if !src.exists() {
        return Err(StageError::param(
            "source",
            format!("'{}' does not exist", src.display()),
        ));
    }
    let all = |ext: &str| -> StageResult<Vec<PathBuf>> {
        if src.is_file() {
            Ok(vec![src.clone()])
        } else {
            files_with_ext(src, ext)
        }
    };
    cfg.tickers
        .iter()
        .map(|t| {
            let files = match cfg.format {
                Format::StockNewsApi if src.is_dir() => {
                    let prefix = format!("{}_news_", cfg.vendor_name(t));
                    let f: Vec<PathBuf> = files_with_ext(src, "csv")?
                        .into_iter()
                        .filter(|p| {
                            p.file_name()
                                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
                        })
                        .collect();
                    if f.is_empty() {
                        return Err(StageError::file(
                            src.join(format!("{prefix}*.csv")),
                            format!("missing stocknewsapi file for ticker '{t}'"),
                        ));
                    }
                    f
                }
                Format::StockNewsApi => {
                    if cfg.tickers.len() != 1 {
                        return Err(StageError::param(
                            "tickers",
                            "a single-file source holds one ticker",
                        ));
                    }
                    vec![src.clone()]
                }
                Format::Gnews => all("csv")?,
                Format::CryptoTrade => all("json")?,
            };
            if files.is_empty() {
                return Err(StageError::file(
                    src,
                    format!("no {} files", cfg.format.vendor()),
                ));
            }
            Ok((t.clone(), files))
        })
        .collect()
}

impl Stage for IngestNews {
    fn kind(&self) -> &'static str {
        "ingest_news"
    }

    fn check_params(&self, p: &Params, _bound: &[&str]) -> StageResult<()> {
        config(p).map(drop)
    }

    fn spec(&self) -> StageSpec {
        StageSpec {
            doc: "Reads vendor news (stocknewsapi, gnews, cryptotrade) and tags each item with the first trading date it may influence",
            inputs: vec![
                InputSpec::one(
                    "bars",
                    "ohlcv",
                    "Trading calendar: the dates of each ticker (required for stock news)",
                )
                .optional(),
            ],
            outputs: vec![OutputSpec::parquet(
                "news",
                "news",
                "News items, sorted by (ticker, published_at, title, url)",
            )],
            params: vec![
                ParamSpec::required(
                    "source",
                    ParamKind::Path,
                    "stocknewsapi: directory of <T>_news_*.csv; gnews: the CSV; cryptotrade: directory of day JSON files",
                ),
                ParamSpec::required(
                    "format",
                    ParamKind::Str,
                    "stocknewsapi | gnews | cryptotrade",
                ),
                ParamSpec::required("tickers", ParamKind::List, "Output tickers"),
                ParamSpec::with_default(
                    "aliases",
                    ParamKind::Any,
                    json!({}),
                    "Vendor name -> ticker, e.g. {GOOG: GOOGL}",
                ),
                ParamSpec::with_default(
                    "start",
                    ParamKind::Date,
                    Value::Null,
                    "First trading_date kept (inclusive)",
                ),
                ParamSpec::with_default(
                    "end",
                    ParamKind::Date,
                    Value::Null,
                    "Last trading_date kept (inclusive)",
                ),
            ],
        }
    }

    fn fingerprint(&self, _params: &Params) -> Fingerprint {
        Fingerprint::new(VERSION)
    }

    fn external_files(&self, params: &Params) -> StageResult<Vec<PathBuf>> {
        let cfg = config(params)?;
        let mut files: Vec<PathBuf> = plan(&cfg)?.into_iter().flat_map(|(_, f)| f).collect();
        files.sort();
        files.dedup();
        Ok(files)
    }
}

impl flag_core::RunStage for IngestNews {
    fn run(&self, ctx: &mut StageContext) -> StageResult<()> {
        let cfg = config(&ctx.params)?;
        let plan = plan(&cfg)?;
        let calendars = if ctx.has_input("bars") {
            Some(calendars(&ctx.read_input("bars")?)?)
        } else if cfg.format == Format::CryptoTrade {
            None
        } else {
            return Err(StageError::Input {
                input: "bars".into(),
                message: "stock news needs the trading calendar: bind it to an ohlcv output".into(),
            });
        };
        let mut rows: Vec<Row> = Vec::new();
        let mut gnews_cache: BTreeMap<PathBuf, Vec<Item>> = BTreeMap::new();
        for (i, (ticker, files)) in plan.iter().enumerate() {
            ctx.progress(i as u64, plan.len() as u64, ticker);
            let vendor_name = cfg.vendor_name(ticker);
            let mut items = Vec::new();
            for f in files {
                let got = match cfg.format {
                    Format::StockNewsApi => read_stocknewsapi(f, vendor_name)?,
                    Format::CryptoTrade => read_cryptotrade(f, vendor_name)?,
                    Format::Gnews => {
                        if !gnews_cache.contains_key(f) {
                            gnews_cache.insert(f.clone(), read_gnews(f)?);
                        }
                        let mine: Vec<Item> = gnews_cache[f]
                            .iter()
                            .filter(|it| it.vendor_ticker == vendor_name)
                            .cloned()
                            .collect();
                        ctx.log(format!(
                            "{}: {} of {} rows are '{vendor_name}' (sentiment_score holds labels: read as sentiment)",
                            f.display(),
                            mine.len(),
                            gnews_cache[f].len()
                        ));
                        mine
                    }
                };
                items.extend(got);
            }
            if items.is_empty() {
                return Err(StageError::file(
                    &files[0],
                    format!("no news items for '{vendor_name}' (ticker '{ticker}')"),
                ));
            }
            let cal = match &calendars {
                Some(c) => Some(c.get(ticker).ok_or_else(|| StageError::Input {
                    input: "bars".into(),
                    message: format!("has no rows for ticker '{ticker}'"),
                })?),
                None => None,
            };
            let stats = place(&cfg, ticker, cal, items, &mut rows);
            ctx.log(format!(
                "{ticker}: {} items read from {} files, {} date-only (stamped at the end of their Pacific day), \
                 {} before and {} after the known calendar dropped, {} outside start/end",
                stats.read, files.len(), stats.date_only, stats.before, stats.after, stats.filtered
            ));
        }
        ctx.progress(plan.len() as u64, plan.len() as u64, "done");
        let (rows, dups, reused) = dedupe(rows);
        ctx.log(format!(
            "{dups} duplicate items dropped (same url or same title at the same time); \
             {reused} urls reused by items at other times (kept: the vendor reuses rolling urls)"
        ));
        let batch = news_batch(&rows)?;
        ctx.write_parquet("news", &[batch])?;
        Ok(())
    }
}

/// An output row.
struct Row {
    ticker: String,
    trading_date: NaiveDate,
    item: Item,
    vendor: &'static str,
}

#[derive(Default)]
struct PlaceStats {
    read: u64,
    date_only: u64,
    before: u64,
    after: u64,
    filtered: u64,
}

/// Per ticker, its trading dates from an ohlcv batch.
fn calendars(bars: &RecordBatch) -> StageResult<BTreeMap<String, BTreeSet<NaiveDate>>> {
    let bad = |c: &str| StageError::Input {
        input: "bars".into(),
        message: format!("column '{c}' has the wrong type"),
    };
    let t = bars
        .column_by_name("ticker")
        .and_then(|a| a.as_any().downcast_ref::<StringArray>())
        .ok_or_else(|| bad("ticker"))?;
    let d = bars
        .column_by_name("date")
        .and_then(|a| a.as_any().downcast_ref::<Date32Array>())
        .ok_or_else(|| bad("date"))?;
    let mut out: BTreeMap<String, BTreeSet<NaiveDate>> = BTreeMap::new();
    for i in 0..bars.num_rows() {
        out.entry(t.value(i).to_string())
            .or_default()
            .insert(from_date32(d.value(i)));
    }
    Ok(out)
}

/// The first trading date a stock item published at `item.published_at` may influence, or
/// Err(true) if it falls before the calendar, Err(false) if after it.
pub(crate) fn stock_trading_date(
    cal: &BTreeSet<NaiveDate>,
    published_at: chrono::DateTime<chrono::Utc>,
) -> Result<NaiveDate, bool> {
    let local = published_at.with_timezone(&New_York);
    let day = local.date_naive();
    let close = NaiveTime::from_hms_opt(16, 0, 0).expect("valid time");
    let (first, last) = match (cal.first(), cal.last()) {
        (Some(f), Some(l)) => (*f, *l),
        _ => return Err(false),
    };
    if day < first {
        // The days before the calendar starts are unknown, so "the next trading day" is too.
        return Err(true);
    }
    if cal.contains(&day) && local.time() <= close {
        return Ok(day);
    }
    if day >= last {
        return Err(false);
    }
    cal.range(day.succ_opt().ok_or(false)?..)
        .next()
        .copied()
        .ok_or(false)
}

fn place(
    cfg: &Config,
    ticker: &str,
    cal: Option<&BTreeSet<NaiveDate>>,
    items: Vec<Item>,
    rows: &mut Vec<Row>,
) -> PlaceStats {
    let mut st = PlaceStats::default();
    for item in items {
        st.read += 1;
        st.date_only += u64::from(item.date_only);
        let td = if cfg.format == Format::CryptoTrade {
            let d = item.published_at.date_naive();
            match cal {
                Some(c) if c.first().is_some_and(|f| d < *f) => Err(true),
                Some(c) if c.last().is_some_and(|l| d > *l) => Err(false),
                _ => Ok(d),
            }
        } else {
            stock_trading_date(cal.expect("checked in run"), item.published_at)
        };
        let td = match td {
            Ok(d) => d,
            Err(before) => {
                if before {
                    st.before += 1
                } else {
                    st.after += 1
                }
                continue;
            }
        };
        if cfg.start.is_some_and(|s| td < s) || cfg.end.is_some_and(|e| td > e) {
            st.filtered += 1;
            continue;
        }
        rows.push(Row {
            ticker: ticker.to_string(),
            trading_date: td,
            item,
            vendor: cfg.format.vendor(),
        });
    }
    st
}

/// Sorts rows deterministically and drops duplicates: the same url, or the same title, at the
/// same instant for the same ticker. The same url at different instants is not a duplicate:
/// investors.com reuses one url for up to seven different articles weeks apart.
fn dedupe(mut rows: Vec<Row>) -> (Vec<Row>, u64, u64) {
    rows.sort_by(|a, b| {
        let ka = (
            &a.ticker,
            a.item.published_at,
            &a.item.title,
            &a.item.url,
            &a.item.summary,
            &a.item.source,
            &a.item.sentiment,
        );
        let kb = (
            &b.ticker,
            b.item.published_at,
            &b.item.title,
            &b.item.url,
            &b.item.summary,
            &b.item.source,
            &b.item.sentiment,
        );
        ka.cmp(&kb).then(
            a.item
                .sentiment_score
                .map(f64::to_bits)
                .cmp(&b.item.sentiment_score.map(f64::to_bits)),
        )
    });
    let mut by_url = HashSet::new();
    let mut by_title = HashSet::new();
    let mut urls: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut out = Vec::with_capacity(rows.len());
    let mut dups = 0;
    for r in rows {
        let t = r.item.published_at;
        let url_dup = r
            .item
            .url
            .as_ref()
            .is_some_and(|u| !by_url.insert((r.ticker.clone(), t, u.clone())));
        let title_dup = !by_title.insert((r.ticker.clone(), t, r.item.title.clone()));
        if url_dup || title_dup {
            dups += 1;
            continue;
        }
        if let Some(u) = &r.item.url {
            *urls.entry((r.ticker.clone(), u.clone())).or_default() += 1;
        }
        out.push(r);
    }
    let reused = urls.values().filter(|&&n| n > 1).map(|n| n - 1).sum();
    (out, dups, reused)
}

fn news_batch(rows: &[Row]) -> StageResult<RecordBatch> {
    let s = |g: fn(&Row) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(g)))
    };
    let o = |g: fn(&Row) -> Option<&str>| -> ArrayRef {
        Arc::new(StringArray::from_iter(rows.iter().map(g)))
    };
    schema("news")?.batch(vec![
        s(|r| &r.ticker),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(
                rows.iter().map(|r| r.item.published_at.timestamp_micros()),
            )
            .with_timezone("UTC"),
        ),
        Arc::new(Date32Array::from_iter_values(
            rows.iter().map(|r| date32(r.trading_date)),
        )),
        s(|r| &r.item.title),
        o(|r| r.item.summary.as_deref()),
        s(|r| &r.item.source),
        o(|r| r.item.sentiment.as_deref()),
        Arc::new(Float64Array::from_iter(
            rows.iter().map(|r| r.item.sentiment_score),
        )),
        o(|r| r.item.url.as_deref()),
        s(|r| r.vendor),
    ])
}

/// Params for a run (used by tests and examples).
pub fn params(source: &Path, format: &str, tickers: &[&str]) -> Params {
    let mut m = BTreeMap::new();
    m.insert("source".into(), json!(source.to_string_lossy()));
    m.insert("format".into(), json!(format));
    m.insert("tickers".into(), json!(tickers));
    Params::new(m)
}
