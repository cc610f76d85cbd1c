//! Readers for the news formats. Each returns items with a UTC publication instant; the
//! trading-date rule is applied in `news.rs`.
//!
//! Google News only knows the day of most items: it stamps them at 00:00 America/Los_Angeles
//! (07:00 or 08:00 GMT; all but 11 of the 1,970 CryptoTrade items, and the gnews CSV keeps only
//! the date of such stamps). Such an item may have appeared any time that Pacific day, so it
//! is stamped at the last instant of that day: the latest time it may have been published,
//! which is what keeps the trading-date rule free of look-ahead.
use std::path::Path;

use chrono::{DateTime, Days, NaiveDate, TimeZone, Timelike, Utc};
use chrono_tz::America::Los_Angeles;
use flag_core::{StageError, StageResult};
use serde::Deserialize;

use super::util::{
    CsvRecords, check_width, csv_header, cut_message, expect_header, parse_py_list, parse_ymd,
    quote, read_text,
};

#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// The name the vendor uses (e.g. GOOG); mapped to the output ticker by the stage.
    pub vendor_ticker: String,
    pub published_at: DateTime<Utc>,
    /// The vendor gave only a day; `published_at` is the end of that day (module doc).
    pub date_only: bool,
    pub title: String,
    pub summary: Option<String>,
    pub source: String,
    pub sentiment: Option<String>,
    pub sentiment_score: Option<f64>,
    pub url: Option<String>,
    pub line: u64,
}

fn opt(s: &str) -> Option<String> {
    let t = s.trim();
    (!t.is_empty()).then(|| t.to_string())
}

fn required(file: &Path, line: u64, column: &str, s: &str) -> StageResult<String> {
    opt(s).ok_or_else(|| StageError::data(file, line, column, "empty value"))
}

/// Vendor labels, normalised to Positive/Negative/Neutral; anything else is an error.
fn sentiment_label(file: &Path, line: u64, column: &str, s: &str) -> StageResult<Option<String>> {
    let t = s.trim();
    match t.to_ascii_lowercase().as_str() {
        "" => Ok(None),
        "positive" => Ok(Some("Positive".into())),
        "negative" => Ok(Some("Negative".into())),
        "neutral" => Ok(Some("Neutral".into())),
        _ => Err(StageError::data(
            file,
            line,
            column,
            format!(
                "'{}' is not a sentiment label (positive, negative, neutral)",
                quote(t)
            ),
        )),
    }
}

/// The last microsecond of `day` in America/Los_Angeles, in UTC.
pub fn end_of_pacific_day(day: NaiveDate) -> DateTime<Utc> {
    let next = day + Days::new(1);
    let midnight = next.and_hms_opt(0, 0, 0).expect("midnight exists");
    // Pacific DST switches at 02:00, so midnight is never skipped or repeated.
    let start_next = Los_Angeles
        .from_local_datetime(&midnight)
        .earliest()
        .expect("Pacific midnight is unambiguous");
    start_next.with_timezone(&Utc) - chrono::Duration::microseconds(1)
}

/// A Google News stamp at exactly 00:00 Pacific means "this day, time unknown".
fn google_stamp(t: DateTime<Utc>) -> (DateTime<Utc>, bool) {
    let local = t.with_timezone(&Los_Angeles);
    if local.num_seconds_from_midnight() == 0 && local.nanosecond() == 0 {
        (end_of_pacific_day(local.date_naive()), true)
    } else {
        (t, false)
    }
}

fn rfc2822(file: &Path, line: u64, column: &str, s: &str) -> StageResult<DateTime<Utc>> {
    DateTime::parse_from_rfc2822(s.trim())
        .map(|d| d.with_timezone(&Utc))
        .map_err(|e| {
            StageError::data(
                file,
                line,
                column,
                format!(
                    "'{}' is not an RFC 2822 date with offset: {e}",
                    quote(s.trim())
                ),
            )
        })
}

const STOCKNEWSAPI: [&str; 10] = [
    "news_url",
    "image_url",
    "title",
    "text",
    "source_name",
    "date",
    "topics",
    "sentiment",
    "type",
    "tickers",
];

/// One stocknewsapi CSV (`<TICKER>_news_<from>_<to>.csv`): RFC 2822 dates in New York time,
/// quoted fields with commas, Python-list strings for topics and tickers.
pub fn read_stocknewsapi(file: &Path, vendor_ticker: &str) -> StageResult<Vec<Item>> {
    let mut recs = CsvRecords::open(file)?;
    let (hline, header) = csv_header(file, &mut recs)?;
    expect_header(file, hline, &header, &STOCKNEWSAPI)?;
    let mut out = Vec::new();
    for r in recs {
        let (line, r) = r?;
        check_width(file, line, &header, &r)?;
        // Validated so a shifted or truncated row cannot pass as a good one; not output.
        parse_py_list(file, line, "topics", &r[6])?;
        parse_py_list(file, line, "tickers", &r[9])?;
        out.push(Item {
            vendor_ticker: vendor_ticker.to_string(),
            published_at: rfc2822(file, line, "date", &r[5])?,
            date_only: false,
            title: required(file, line, "title", &r[2])?,
            summary: opt(&r[3]),
            source: required(file, line, "source_name", &r[4])?,
            sentiment: sentiment_label(file, line, "sentiment", &r[7])?,
            sentiment_score: None,
            url: opt(&r[0]),
            line,
        });
    }
    if out.is_empty() {
        return Err(StageError::file(file, "file has a header but no data rows"));
    }
    Ok(out)
}

const GNEWS: [&str; 6] = [
    "published date",
    "company",
    "title",
    "publisher",
    "sentiment_score",
    "url",
];

/// The gnews CSV (`Financial_News.csv`), all companies. `published date` is the date part of
/// Google News' GMT pubDate (the source repo's `dataextraction.py` uses the GNews library);
/// the time is lost, so every item is date-only (module doc). Known recurring defect: the
/// column named `sentiment_score` holds labels (positive/negative/neutral), not scores; they
/// go to `sentiment`, and a number there would go to `sentiment_score`.
pub fn read_gnews(file: &Path) -> StageResult<Vec<Item>> {
    let mut recs = CsvRecords::open(file)?;
    let (hline, header) = csv_header(file, &mut recs)?;
    expect_header(file, hline, &header, &GNEWS)?;
    let mut out = Vec::new();
    for r in recs {
        let (line, r) = r?;
        check_width(file, line, &header, &r)?;
        let day = parse_ymd(file, line, "published date", &r[0])?;
        let raw = r[4].trim();
        let (sentiment, sentiment_score) = match raw.parse::<f64>() {
            Ok(x) if x.is_finite() => (None, Some(x)),
            _ => (sentiment_label(file, line, "sentiment_score", raw)?, None),
        };
        out.push(Item {
            vendor_ticker: required(file, line, "company", &r[1])?,
            published_at: end_of_pacific_day(day),
            date_only: true,
            title: required(file, line, "title", &r[2])?,
            summary: None,
            source: required(file, line, "publisher", &r[3])?,
            sentiment,
            sentiment_score,
            url: opt(&r[5]),
            line,
        });
    }
    if out.is_empty() {
        return Err(StageError::file(file, "file has a header but no data rows"));
    }
    Ok(out)
}

#[derive(Deserialize)]
struct CryptoItem {
    url: String,
    time: String,
    title: String,
    content: Option<String>,
}

/// 1-based line of the first occurrence of `needle` at or after byte `from` (for errors on
/// values inside a JSON array, which serde does not locate once parsed).
fn line_of(text: &str, needle: &str, from: usize) -> (u64, usize) {
    let at = text[from..].find(needle).map_or(from, |i| from + i);
    (
        text[..at].matches('\n').count() as u64 + 1,
        at + needle.len(),
    )
}

/// One CryptoTrade gnews file (`YYYY-MM-DD.json`): a list of `{id,url,time,title,content}`.
/// One day's items: read whole, so capped at `util::MAX_WHOLE_FILE_BYTES`.
/// The publisher is the suffix Google News appends to titles (" - Yahoo Finance").
pub fn read_cryptotrade(file: &Path, vendor_ticker: &str) -> StageResult<Vec<Item>> {
    let text = read_text(file)?;
    let items: Vec<CryptoItem> = serde_json::from_str(&text).map_err(|e| {
        StageError::data(
            file,
            e.line() as u64,
            "(json)",
            format!("malformed JSON: {}", cut_message(&e.to_string())),
        )
    })?;
    let mut out = Vec::with_capacity(items.len());
    let mut cursor = 0;
    for it in items {
        let needle = serde_json::to_string(&it.time).unwrap_or_default();
        let (line, next) = line_of(&text, &needle, cursor);
        cursor = next;
        let t = rfc2822(file, line, "time", &it.time)?;
        let (published_at, date_only) = google_stamp(t);
        let title = required(file, line, "title", &it.title)?;
        let source = title
            .rsplit_once(" - ")
            .map(|(_, s)| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "Google News".into());
        out.push(Item {
            vendor_ticker: vendor_ticker.to_string(),
            published_at,
            date_only,
            title,
            summary: it.content.as_deref().and_then(opt),
            source,
            sentiment: None,
            sentiment_score: None,
            url: opt(&it.url),
            line,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacific_day_end() {
        let d = NaiveDate::from_ymd_opt(2023, 1, 1).unwrap();
        assert_eq!(
            end_of_pacific_day(d).to_rfc3339(),
            "2023-01-02T07:59:59.999999+00:00"
        );
        let s = NaiveDate::from_ymd_opt(2023, 7, 4).unwrap();
        assert_eq!(
            end_of_pacific_day(s).to_rfc3339(),
            "2023-07-05T06:59:59.999999+00:00"
        );
        let t = Utc.with_ymd_and_hms(2023, 1, 1, 8, 0, 0).unwrap();
        assert_eq!(google_stamp(t), (end_of_pacific_day(d), true));
        let u = Utc.with_ymd_and_hms(2023, 1, 1, 18, 7, 16).unwrap();
        assert_eq!(google_stamp(u), (u, false));
    }
}
