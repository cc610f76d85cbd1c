//! `ingest_news` on the real shared files: row counts checked by hand (Python, same rules),
//! and the no-look-ahead property checked on every item.
mod ingest_util;

use std::collections::{BTreeMap, BTreeSet};

use chrono::{NaiveTime, TimeZone};
use chrono_tz::America::New_York;
use flag_core::Params;
use flag_market::ingest::{IngestNews, IngestOhlcv, news, ohlcv};
use ingest_util::*;
use serde_json::json;

/// Bars of the six 2020-2023 stocks: the trading calendar (2020-01-02..2023-12-29).
fn stock_bars() -> Run {
    let tickers = ["AAPL", "AMZN", "GOOGL", "META", "MSFT", "TSLA"];
    let p = ohlcv::params(&data_dir().join("stocks-2020-2023"), "yfinance", &tickers);
    run_stage(&IngestOhlcv, p, BTreeMap::new()).unwrap()
}

fn calendars(bars: &Run) -> BTreeMap<String, BTreeSet<chrono::NaiveDate>> {
    let b = bars.out("bars");
    let mut out: BTreeMap<String, BTreeSet<_>> = BTreeMap::new();
    for (t, d) in str_col(b, "ticker").into_iter().zip(date_col(b, "date")) {
        out.entry(t).or_default().insert(d);
    }
    out
}

fn run_news(bars: Option<&Run>, p: Params) -> Run {
    let mut inputs = BTreeMap::new();
    if let Some(b) = bars {
        inputs.insert("bars".to_string(), vec![b.artifact("bars", "ohlcv")]);
    }
    run_stage(&IngestNews, p, inputs).unwrap()
}

/// 16:00 New York on `d`, in UTC.
fn close_of(d: chrono::NaiveDate) -> chrono::DateTime<chrono::Utc> {
    let t = d.and_time(NaiveTime::from_hms_opt(16, 0, 0).unwrap());
    New_York
        .from_local_datetime(&t)
        .single()
        .unwrap()
        .with_timezone(&chrono::Utc)
}

/// No look-ahead, and the trading date is the *first* allowed one.
fn assert_stock_rule(news: &Run, cals: &BTreeMap<String, BTreeSet<chrono::NaiveDate>>) {
    let b = news.out("news");
    let (t, p, td) = (
        str_col(b, "ticker"),
        ts_col(b, "published_at"),
        date_col(b, "trading_date"),
    );
    for i in 0..b.num_rows() {
        let cal = &cals[&t[i]];
        assert!(cal.contains(&td[i]), "row {i}: {} not a trading day", td[i]);
        assert!(
            p[i] <= close_of(td[i]),
            "row {i}: published {} after the close of {}",
            p[i],
            td[i]
        );
        assert!(
            td[i] >= p[i].with_timezone(&New_York).date_naive(),
            "row {i}"
        );
        if let Some(prev) = cal.range(..td[i]).next_back() {
            assert!(
                p[i] > close_of(*prev),
                "row {i}: {} could have used {prev}",
                td[i]
            );
        }
    }
}

fn find(b: &Run, title: &str) -> (String, chrono::DateTime<chrono::Utc>, chrono::NaiveDate) {
    let n = b.out("news");
    let titles = str_col(n, "title");
    let i = titles
        .iter()
        .position(|x| x == title)
        .unwrap_or_else(|| panic!("no item '{title}'"));
    (
        str_col(n, "ticker")[i].clone(),
        ts_col(n, "published_at")[i],
        date_col(n, "trading_date")[i],
    )
}

#[test]
fn stocknewsapi_real_files_map_to_trading_dates_without_look_ahead() {
    let bars = stock_bars();
    let mut p = news::params(
        &data_dir().join("news/stocknewsapi"),
        "stocknewsapi",
        &["AAPL", "AMZN", "GOOGL", "MSFT", "TSLA"],
    );
    p.0.insert("aliases".into(), json!({"GOOG": "GOOGL"}));
    let run = run_news(Some(&bars), p);
    let b = run.out("news");
    let t = str_col(b, "ticker");
    let count = |tk: &str| t.iter().filter(|x| *x == tk).count();
    // 14,671 AAPL items, 4,669 after 16:00 NY on 2023-12-29 (the last bar) are dropped.
    assert_eq!(
        [
            count("AAPL"),
            count("AMZN"),
            count("GOOGL"),
            count("MSFT"),
            count("TSLA")
        ],
        [10002, 10924, 7373, 7480, 11887]
    );
    assert_eq!(count("GOOG"), 0);
    assert_stock_rule(&run, &calendars(&bars));
    // Saturday 2022-10-15 12:06 -0400 -> Monday.
    let (tk, _, td) = find(
        &run,
        "Apple Store Workers Vote to Unionize in Oklahoma City",
    );
    assert_eq!((tk.as_str(), td), ("AAPL", ymd("2022-10-17")));
    // Tuesday 2023-10-10 16:38:18 -0400, after the close -> Wednesday.
    let (_, pa, td) = find(
        &run,
        "Dan Niles Expects 'Beat And Raise Quarters' From Nvidia, Google, But He's Short Apple, Tesla: Here's Why - NVIDIA (NASDAQ:NVDA)",
    );
    assert_eq!(pa.to_rfc3339(), "2023-10-10T20:38:18+00:00");
    assert_eq!(td, ymd("2023-10-11"));
    // Exactly 16:00:00 belongs to that day.
    let (_, _, td) = find(&run, "3 Top Gaming Stocks to Buy in October");
    assert_eq!(td, ymd("2023-10-06"));
    // Thanksgiving 2022-11-24 (market closed) -> 2022-11-25.
    let (tk, _, td) = find(
        &run,
        "Microsoft's pursuit of Activision Blizzard could be blocked by FTC according to Politico",
    );
    assert_eq!((tk.as_str(), td), ("MSFT", ymd("2022-11-25")));
    // Sorted by (ticker, published_at).
    let p = ts_col(b, "published_at");
    assert!((1..b.num_rows()).all(|i| (&t[i - 1], p[i - 1]) <= (&t[i], p[i])));
    let s = strs(b, "sentiment");
    assert!(
        s.iter()
            .all(|x| matches!(x.as_deref(), Some("Positive" | "Negative" | "Neutral")))
    );
    assert!(str_col(b, "vendor").iter().all(|v| v == "stocknewsapi"));
    assert!(strs(b, "summary").iter().all(Option::is_some));
    assert!(
        run.log.contains("AAPL: 14671 items read from 3 files"),
        "{}",
        run.log
    );
    assert!(
        run.log.contains("4669 after the known calendar dropped"),
        "{}",
        run.log
    );
    assert!(run.log.contains("1 duplicate items dropped"), "{}", run.log);
}

#[test]
fn gnews_real_file_is_date_only_and_maps_after_the_day() {
    let bars = stock_bars();
    let p = news::params(
        &data_dir().join("news/gnews-2021-2023/Financial_News.csv"),
        "gnews",
        &["AAPL", "AMZN", "META", "MSFT", "TSLA"],
    );
    let run = run_news(Some(&bars), p);
    let b = run.out("news");
    let t = str_col(b, "ticker");
    let count = |tk: &str| t.iter().filter(|x| *x == tk).count();
    // 4,612 rows; 4 items dated 2023-12-29 or later have no next trading day in the calendar.
    assert_eq!(
        [
            count("AAPL"),
            count("AMZN"),
            count("META"),
            count("MSFT"),
            count("TSLA")
        ],
        [731, 1089, 1158, 648, 982]
    );
    assert_stock_rule(&run, &calendars(&bars));
    let p = ts_col(b, "published_at");
    let td = date_col(b, "trading_date");
    for i in 0..b.num_rows() {
        // Stamped at the last microsecond of a Pacific day: the item's own day is over.
        assert_eq!(p[i].timestamp_subsec_micros(), 999_999);
        assert!(
            td[i]
                > p[i]
                    .with_timezone(&chrono_tz::America::Los_Angeles)
                    .date_naive()
        );
    }
    // META's first item is dated Friday 2021-01-01 (a holiday) -> Monday 2021-01-04.
    let i = t.iter().position(|x| x == "META").unwrap();
    assert_eq!(p[i].to_rfc3339(), "2021-01-02T07:59:59.999999+00:00");
    assert_eq!(td[i], ymd("2021-01-04"));
    assert!(
        strs(b, "sentiment")
            .iter()
            .all(|x| matches!(x.as_deref(), Some("Positive" | "Negative" | "Neutral")))
    );
    assert!(f64s(b, "sentiment_score").iter().all(Option::is_none));
    assert!(strs(b, "summary").iter().all(Option::is_none));
}

#[test]
fn cryptotrade_real_files_use_the_utc_date_and_drop_duplicates() {
    let p = news::params(
        &data_dir().join("crypto/eth-gnews"),
        "cryptotrade",
        &["ETH"],
    );
    let run = run_news(None, p);
    let b = run.out("news");
    // 1,970 items in 396 files, 339 of them repeated within their day's file.
    assert_eq!(b.num_rows(), 1631);
    assert!(
        run.log.contains("339 duplicate items dropped"),
        "{}",
        run.log
    );
    let p = ts_col(b, "published_at");
    let td = date_col(b, "trading_date");
    for i in 0..b.num_rows() {
        assert_eq!(td[i], p[i].date_naive());
    }
    // "Sun, 01 Jan 2023 08:00:00 GMT" is Google's 00:00 Pacific day stamp -> end of that day.
    let (tk, pa, td) = find(
        &run,
        "Markets: Bitcoin, Ethereum up, Cardano leads gains - Yahoo Finance",
    );
    assert_eq!(
        (tk.as_str(), pa.to_rfc3339(), td),
        (
            "ETH",
            "2023-01-02T07:59:59.999999+00:00".to_string(),
            ymd("2023-01-02")
        )
    );
    let n = b.num_rows();
    let src = str_col(b, "source");
    let titles = str_col(b, "title");
    let i = titles
        .iter()
        .position(|x| x.starts_with("Markets: Bitcoin, Ethereum up, Cardano"))
        .unwrap();
    assert_eq!(src[i], "Yahoo Finance");
    assert!(strs(b, "summary").iter().filter(|s| s.is_some()).count() > n / 2);
    // With the ETH bars bound, everything (2023-01-01..2024-02-01) is inside the calendar.
    let eth = run_stage(
        &IngestOhlcv,
        ohlcv::params(
            &data_dir().join("crypto/eth_daily.csv"),
            "coingecko",
            &["ETH"],
        ),
        BTreeMap::new(),
    )
    .unwrap();
    let p2 = news::params(
        &data_dir().join("crypto/eth-gnews"),
        "cryptotrade",
        &["ETH"],
    );
    let run2 = run_news(Some(&eth), p2);
    assert_eq!(run2.out("news").num_rows(), 1631);
}
