//! Readers for the OHLCV file formats. Each turns one file into rows with their line numbers;
//! validation that needs every file of a ticker (duplicates, gaps) is in `ohlcv.rs`.
use std::io::Read;
use std::iter::Peekable;
use std::path::{Path, PathBuf};

use chrono::{NaiveDate, NaiveDateTime, Timelike};
use flag_core::{StageError, StageResult};

use super::util::{
    CsvRecords, check_width, column_index, csv_header, expect_header, is_blank, parse_price,
    parse_volume, parse_ymd, quote,
};

/// The OHLCV formats `ingest_ohlcv` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// TDQN benchmark CSV `Timestamp,Open,High,Low,Close,Volume` (Close adjusted, O/H/L not).
    Tdqn,
    /// yfinance export: `Date|Price,Close,High,Low,Open,Volume`, a ticker row, maybe a `Date,,,` row.
    Yfinance,
    /// Classic Yahoo download `Date,Open,High,Low,Close,Adj Close,Volume`.
    Yahoo,
    /// CoinGecko daily snapshot `snapped_at,open,market_cap,total_volume` (one price a day).
    Coingecko,
    /// InvestorBench / FLAG-Trader JSON `{"YYYY-MM-DD": {"prices": close, "news": [...], ...}}`:
    /// close only (open/high/low/volume are null), stocks and crypto alike.
    Investorbench,
}

impl Format {
    pub fn parse(s: &str) -> StageResult<Format> {
        match s {
            "tdqn" => Ok(Format::Tdqn),
            "yfinance" => Ok(Format::Yfinance),
            "yahoo" => Ok(Format::Yahoo),
            "coingecko" => Ok(Format::Coingecko),
            "investorbench" => Ok(Format::Investorbench),
            other => Err(StageError::param(
                "format",
                format!("'{other}' is not one of tdqn, yfinance, yahoo, coingecko, investorbench"),
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Tdqn => "tdqn",
            Format::Yfinance => "yfinance",
            Format::Yahoo => "yahoo",
            Format::Coingecko => "coingecko",
            Format::Investorbench => "investorbench",
        }
    }

    /// The format holds only crypto, which trades every calendar day (stock calendars have
    /// weekends and holidays). Formats that may hold either decide per ticker (the
    /// `crypto_tickers` param of `ingest_ohlcv`).
    pub fn is_crypto(self) -> bool {
        self == Format::Coingecko
    }

    /// Bars carry only a close: open, high, low and volume are null.
    pub fn is_close_only(self) -> bool {
        self == Format::Investorbench
    }

    /// The files holding `ticker` when `source` is a directory, in concatenation order.
    pub fn ticker_files(self, source: &Path, ticker: &str) -> Vec<PathBuf> {
        match self {
            Format::Tdqn => vec![
                source.join(format!("{ticker}_2012-1-1_2018-1-1.csv")),
                source.join(format!("{ticker}_2018-1-1_2020-1-1.csv")),
            ],
            Format::Yfinance => vec![source.join(format!("{ticker}_historical_data.csv"))],
            Format::Yahoo => vec![source.join(format!("{ticker}.csv"))],
            Format::Coingecko => {
                vec![source.join(format!("{}_daily.csv", ticker.to_lowercase()))]
            }
            Format::Investorbench => vec![source.join(format!("{}.json", ticker.to_lowercase()))],
        }
    }

    /// Source column names for (open, high, low, close, volume, adj_close), for messages.
    pub fn columns(self) -> [&'static str; 6] {
        match self {
            Format::Tdqn => ["Open", "High", "Low", "Close", "Volume", "-"],
            Format::Yfinance => ["Open", "High", "Low", "Close", "Volume", "Adj Close"],
            Format::Yahoo => ["Open", "High", "Low", "Close", "Volume", "Adj Close"],
            Format::Coingecko => ["open", "open", "open", "open", "total_volume", "-"],
            Format::Investorbench => ["-", "-", "-", "prices", "-", "-"],
        }
    }
}

/// One data row of a file. For CoinGecko it is one snapshot: open = high = low = close = the
/// snapshot price, and `close` is derived later from the next day's snapshot. Open, high, low
/// and volume are `None` only for close-only formats (InvestorBench), never invented.
#[derive(Debug, Clone, PartialEq)]
pub struct RawRow {
    pub date: NaiveDate,
    pub open: Option<f64>,
    pub high: Option<f64>,
    pub low: Option<f64>,
    pub close: f64,
    pub volume: Option<f64>,
    pub adj_close: Option<f64>,
    /// 1-based line of the row (InvestorBench: of its date key).
    pub line: u64,
    /// CoinGecko only: the snapshot is not at exactly 00:00:00 UTC.
    pub off_midnight: bool,
}

impl RawRow {
    pub fn values(&self) -> [Option<f64>; 6] {
        [
            self.open,
            self.high,
            self.low,
            Some(self.close),
            self.volume,
            self.adj_close,
        ]
    }
}

/// A parsed file: its rows in file order and what was skipped.
#[derive(Debug, Default)]
pub struct ParsedFile {
    pub rows: Vec<RawRow>,
    /// Data rows in the file (header lines excluded).
    pub rows_read: u64,
    /// Rows whose price fields are all empty (`""` or `null`, Yahoo's holiday rows): dropped.
    pub empty_rows: u64,
}

/// Reads one file, streamed (see `util`): memory is bounded by the rows kept, not the file.
pub fn read_file(format: Format, file: &Path, ticker: &str) -> StageResult<ParsedFile> {
    match format {
        Format::Investorbench => super::investorbench::read_file(file),
        _ => read_csv(format, file, CsvRecords::open(file)?, ticker),
    }
}

fn read_csv<R: Read>(
    format: Format,
    file: &Path,
    mut recs: CsvRecords<R>,
    ticker: &str,
) -> StageResult<ParsedFile> {
    let (hline, header) = csv_header(file, &mut recs)?;
    let body = recs.peekable();
    let parsed = match format {
        Format::Tdqn => {
            let want = ["Timestamp", "Open", "High", "Low", "Close", "Volume"];
            expect_header(file, hline, &header, &want)?;
            price_rows(file, &header, body, [0, 1, 2, 3, 4, 5], None)?
        }
        Format::Yahoo => {
            let want = [
                "Date",
                "Open",
                "High",
                "Low",
                "Close",
                "Adj Close",
                "Volume",
            ];
            expect_header(file, hline, &header, &want)?;
            price_rows(file, &header, body, [0, 1, 2, 3, 4, 6], Some(5))?
        }
        Format::Yfinance => yfinance(file, ticker, hline, &header, body)?,
        Format::Coingecko => {
            let want = ["snapped_at", "open", "market_cap", "total_volume"];
            expect_header(file, hline, &header, &want)?;
            snapshots(file, &header, body)?
        }
        Format::Investorbench => {
            return Err(StageError::file(
                file,
                "investorbench files are JSON, not CSV",
            ));
        }
    };
    if parsed.rows_read == 0 {
        return Err(StageError::file(file, "file has a header but no data rows"));
    }
    Ok(parsed)
}

/// The data records after a header, streamed.
type Body<R> = Peekable<CsvRecords<R>>;

/// yfinance writes `Date,Close,...` (or `Price,Close,...`), then a row naming the ticker in
/// every price column, then (newer versions) a `Date,,,,,` row. Columns are found by name.
fn yfinance<R: Read>(
    file: &Path,
    ticker: &str,
    hline: u64,
    header: &[String],
    mut body: Body<R>,
) -> StageResult<ParsedFile> {
    let first = header.first().map(|s| s.trim()).unwrap_or("");
    if first != "Date" && first != "Price" {
        return Err(StageError::data(
            file,
            hline,
            "Date",
            format!(
                "header column 1 is '{}', expected 'Date' or 'Price'",
                quote(first)
            ),
        ));
    }
    let idx = column_index(
        file,
        hline,
        header,
        &["Open", "High", "Low", "Close", "Volume"],
    )?;
    let adj = header.iter().position(|h| h.trim() == "Adj Close");
    let Some((tline, trow)) = body.next().transpose()? else {
        return Err(StageError::file(
            file,
            "file has a header but no ticker row",
        ));
    };
    check_width(file, tline, header, &trow)?;
    if !(trow[0].trim().is_empty() || trow[0].trim() == "Ticker") {
        return Err(StageError::data(
            file,
            tline,
            quote(&header[0]),
            format!(
                "expected the ticker row (',{ticker},...'), found '{}'",
                quote(&trow[0])
            ),
        ));
    }
    for (i, cell) in trow.iter().enumerate().skip(1) {
        if cell.trim() != ticker {
            return Err(StageError::data(
                file,
                tline,
                quote(&header[i]),
                format!(
                    "ticker row says '{}', expected '{ticker}'",
                    quote(cell.trim())
                ),
            ));
        }
    }
    if let Some(Ok((_, r))) = body.peek()
        && r.first().is_some_and(|c| c.trim() == "Date")
        && r.iter().skip(1).all(|c| c.trim().is_empty())
    {
        body.next();
    }
    price_rows(
        file,
        header,
        body,
        [0, idx[0], idx[1], idx[2], idx[3], idx[4]],
        adj,
    )
}

/// Rows of a stock CSV; `idx` = positions of (date, open, high, low, close, volume).
fn price_rows<R: Read>(
    file: &Path,
    header: &[String],
    body: Body<R>,
    idx: [usize; 6],
    adj: Option<usize>,
) -> StageResult<ParsedFile> {
    let mut out = ParsedFile::default();
    let name = |i: usize| quote(header[i].trim());
    for rec in body {
        let (line, rec) = rec?;
        out.rows_read += 1;
        check_width(file, line, header, &rec)?;
        let date = parse_ymd(file, line, &name(idx[0]), &rec[idx[0]])?;
        let mut price_cols: Vec<usize> = idx[1..5].to_vec();
        price_cols.extend(adj);
        // Yahoo writes holidays as rows of `null`; they carry no bar, so they are dropped and
        // counted. A row with only some prices missing is a broken row: fatal below.
        if price_cols.iter().all(|&i| is_blank(&rec[i])) {
            out.empty_rows += 1;
            continue;
        }
        let p = |i: usize| parse_price(file, line, &name(i), &rec[i]);
        out.rows.push(RawRow {
            date,
            open: Some(p(idx[1])?),
            high: Some(p(idx[2])?),
            low: Some(p(idx[3])?),
            close: p(idx[4])?,
            volume: Some(parse_volume(file, line, &name(idx[5]), &rec[idx[5]])?),
            adj_close: adj.map(p).transpose()?,
            line,
            off_midnight: false,
        });
    }
    Ok(out)
}

/// CoinGecko snapshots. `market_cap` is not read: it is not part of a bar (and the real file
/// has one empty and one zero market cap, which would otherwise reject good prices).
fn snapshots<R: Read>(file: &Path, header: &[String], body: Body<R>) -> StageResult<ParsedFile> {
    let mut out = ParsedFile::default();
    for rec in body {
        let (line, rec) = rec?;
        out.rows_read += 1;
        check_width(file, line, header, &rec)?;
        let raw = rec[0].trim();
        let ts = NaiveDateTime::parse_from_str(raw, "%Y-%m-%d %H:%M:%S UTC").map_err(|_| {
            StageError::data(
                file,
                line,
                "snapped_at",
                format!("'{}' is not a 'YYYY-MM-DD HH:MM:SS UTC' time", quote(raw)),
            )
        })?;
        let price = parse_price(file, line, "open", &rec[1])?;
        out.rows.push(RawRow {
            date: ts.date(),
            open: Some(price),
            high: Some(price),
            low: Some(price),
            close: price,
            volume: Some(parse_volume(file, line, "total_volume", &rec[3])?),
            adj_close: None,
            line,
            off_midnight: ts.num_seconds_from_midnight() != 0,
        });
    }
    Ok(out)
}
