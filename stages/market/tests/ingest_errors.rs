//! A corpus of bad inputs, each written to a temp file; every error must name the file, the
//! 1-based line and the column, with the exact message a user will read.
mod ingest_util;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use flag_core::{InputArtifact, Params};
use flag_market::ingest::{IngestNews, IngestOhlcv, news, ohlcv};
use ingest_util::*;

const TDQN_HEADER: &str = "Timestamp,Open,High,Low,Close,Volume\n";

/// Writes `content` to `dir/name` and runs `ingest_ohlcv` on that one file.
fn ohlcv_err(format: &str, name: &str, content: &str) -> (PathBuf, String) {
    let dir = tempfile::tempdir().unwrap().keep();
    let p = dir.join(name);
    fs::write(&p, content).unwrap();
    let e = run_stage(
        &IngestOhlcv,
        ohlcv::params(&p, format, &["AAPL"]),
        BTreeMap::new(),
    )
    .err()
    .expect("must fail");
    (p, e.to_string())
}

fn tdqn(rows: &str) -> (PathBuf, String) {
    ohlcv_err("tdqn", "AAPL.csv", &format!("{TDQN_HEADER}{rows}"))
}

fn d(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn malformed_row_missing_field() {
    let (p, e) = tdqn("2012-01-03,1,2,0.5,1.5,10\n2012-01-04,1,2,0.5\n");
    assert_eq!(
        e,
        format!(
            "{}:3: column 'Close': missing field: 4 fields, header has 6",
            d(&p)
        )
    );
}

#[test]
fn malformed_row_extra_field() {
    let (p, e) = tdqn("2012-01-03,1,2,0.5,1.5,10,7\n");
    assert_eq!(
        e,
        format!(
            "{}:2: column 'field 7': extra field: 7 fields, header has 6",
            d(&p)
        )
    );
}

#[test]
fn wrong_type() {
    let (p, e) = tdqn("2012-01-03,abc,2,0.5,1.5,10\n");
    assert_eq!(
        e,
        format!("{}:2: column 'Open': 'abc' is not a number", d(&p))
    );
}

#[test]
fn empty_file_and_header_only() {
    let (p, e) = tdqn_raw("");
    assert_eq!(e, format!("{}: file is empty", d(&p)));
    let (p, e) = tdqn_raw(TDQN_HEADER);
    assert_eq!(e, format!("{}: file has a header but no data rows", d(&p)));
}

fn tdqn_raw(content: &str) -> (PathBuf, String) {
    ohlcv_err("tdqn", "AAPL.csv", content)
}

#[test]
fn nan_and_infinity() {
    let (p, e) = tdqn("2012-01-03,1,2,0.5,1.5,10\n2012-01-04,1,2,0.5,NaN,10\n");
    assert_eq!(
        e,
        format!("{}:3: column 'Close': 'NaN' is not a finite number", d(&p))
    );
    let (p, e) = tdqn("2012-01-03,1,inf,0.5,1.5,10\n");
    assert_eq!(
        e,
        format!("{}:2: column 'High': 'inf' is not a finite number", d(&p))
    );
}

#[test]
fn non_positive_price_and_negative_volume() {
    let (p, e) = tdqn("2012-01-03,1,2,-0.5,1.5,10\n");
    assert_eq!(
        e,
        format!("{}:2: column 'Low': price must be > 0, got -0.5", d(&p))
    );
    let (p, e) = tdqn("2012-01-03,0,2,0.5,1.5,10\n");
    assert_eq!(
        e,
        format!("{}:2: column 'Open': price must be > 0, got 0", d(&p))
    );
    let (p, e) = tdqn("2012-01-03,1,2,0.5,1.5,-10\n");
    assert_eq!(
        e,
        format!("{}:2: column 'Volume': volume must be >= 0, got -10", d(&p))
    );
}

#[test]
fn conflicting_duplicate_dates() {
    let (p, e) =
        tdqn("2012-01-03,1,2,0.5,1.5,10\n2012-01-04,1,2,0.5,1.5,10\n2012-01-03,1,2,0.5,1.6,10\n");
    assert_eq!(
        e,
        format!(
            "{0}:4: column 'Close': conflicting duplicate date 2012-01-03: 1.6 here, 1.5 at {0}:2",
            d(&p)
        )
    );
}

#[test]
fn bad_date() {
    let (p, e) = tdqn("2012-13-01,1,2,0.5,1.5,10\n");
    assert_eq!(
        e,
        format!(
            "{}:2: column 'Timestamp': '2012-13-01' is not a YYYY-MM-DD date",
            d(&p)
        )
    );
}

#[test]
fn missing_column_and_wrong_header() {
    let (p, e) = tdqn_raw("Timestamp,Open,High,Low,Close\n2012-01-03,1,2,0.5,1.5\n");
    assert_eq!(
        e,
        format!(
            "{}:1: column 'Volume': missing column (header is [\"Timestamp\", \"Open\", \"High\", \"Low\", \"Close\"])",
            d(&p)
        )
    );
    let (p, e) = tdqn_raw("Timestamp,High,Open,Low,Close,Volume\n2012-01-03,1,2,0.5,1.5,10\n");
    assert_eq!(
        e,
        format!(
            "{}:1: column 'Open': header column 2 is 'High', expected 'Open'",
            d(&p)
        )
    );
}

#[test]
fn yahoo_partly_empty_row() {
    let (p, e) = ohlcv_err(
        "yahoo",
        "AAPL.csv",
        "Date,Open,High,Low,Close,Adj Close,Volume\n2019-01-03,46,,46,46,41,100\n",
    );
    assert_eq!(e, format!("{}:2: column 'High': empty value", d(&p)));
}

#[test]
fn yfinance_ticker_row_names_another_ticker() {
    let (p, e) = ohlcv_err(
        "yfinance",
        "AAPL_historical_data.csv",
        "Date,Close,High,Low,Open,Volume\n,MSFT,MSFT,MSFT,MSFT,MSFT\n2020-01-02,1,1,1,1,1\n",
    );
    assert_eq!(
        e,
        format!(
            "{}:2: column 'Close': ticker row says 'MSFT', expected 'AAPL'",
            d(&p)
        )
    );
}

#[test]
fn coingecko_bad_timestamp() {
    let (p, e) = ohlcv_err(
        "coingecko",
        "eth_daily.csv",
        "snapped_at,open,market_cap,total_volume\n2015-08-07 00:00:00,2.8,0,90622\n",
    );
    assert_eq!(
        e,
        format!(
            "{}:2: column 'snapped_at': '2015-08-07 00:00:00' is not a 'YYYY-MM-DD HH:MM:SS UTC' time",
            d(&p)
        )
    );
}

#[test]
fn missing_ticker_file() {
    let dir = tempfile::tempdir().unwrap();
    let e = run_stage(
        &IngestOhlcv,
        ohlcv::params(dir.path(), "yfinance", &["MSFT"]),
        BTreeMap::new(),
    )
    .err()
    .unwrap();
    assert_eq!(
        e.to_string(),
        format!(
            "{}: missing yfinance file for ticker 'MSFT'",
            d(&dir.path().join("MSFT_historical_data.csv"))
        )
    );
}

/// A one-ticker trading calendar (2022-10-14, 2022-10-17) as a bars artifact.
fn calendar(run_dir: &Path) -> (ingest_util::Run, InputArtifact) {
    let p = run_dir.join("AAPL.csv");
    fs::write(
        &p,
        "Date,Open,High,Low,Close,Adj Close,Volume\n2022-10-14,1,1,1,1,1,1\n2022-10-17,1,1,1,1,1,1\n",
    )
    .unwrap();
    let run = run_stage(
        &IngestOhlcv,
        ohlcv::params(&p, "yahoo", &["AAPL"]),
        BTreeMap::new(),
    )
    .unwrap();
    let art = run.artifact("bars", "ohlcv");
    (run, art)
}

fn news_err(format: &str, name: &str, content: &str, with_bars: bool) -> (PathBuf, String) {
    let dir = tempfile::tempdir().unwrap().keep();
    let p = dir.join(name);
    fs::write(&p, content).unwrap();
    let (_keep, art) = calendar(&dir);
    let mut inputs = BTreeMap::new();
    if with_bars {
        inputs.insert("bars".to_string(), vec![art]);
    }
    let params: Params = news::params(&p, format, &["AAPL"]);
    let e = run_stage(&IngestNews, params, inputs)
        .err()
        .expect("must fail");
    (p, e.to_string())
}

const SNAPI_HEADER: &str =
    "news_url,image_url,title,text,source_name,date,topics,sentiment,type,tickers\n";

fn snapi(row: &str) -> (PathBuf, String) {
    news_err(
        "stocknewsapi",
        "AAPL_news_1.csv",
        &format!("{SNAPI_HEADER}{row}\n"),
        true,
    )
}

#[test]
fn news_bad_rfc2822_date() {
    let (p, e) = snapi("u,i,Title,Text,Barrons,\"2022-10-15 12:06\",[],Negative,Article,['AAPL']");
    assert_eq!(
        e,
        format!(
            "{}:2: column 'date': '2022-10-15 12:06' is not an RFC 2822 date with offset: input contains invalid characters",
            d(&p)
        )
    );
}

#[test]
fn news_malformed_python_list_and_label() {
    let (p, e) = snapi(
        "u,i,Title,Text,Barrons,\"Sat, 15 Oct 2022 12:06:00 -0400\",[],Negative,Article,AAPL",
    );
    assert_eq!(
        e,
        format!(
            "{}:2: column 'tickers': not a [...] list in list 'AAPL'",
            d(&p)
        )
    );
    let (p, e) =
        snapi("u,i,Title,Text,Barrons,\"Sat, 15 Oct 2022 12:06:00 -0400\",[],Bullish,Article,[]");
    assert_eq!(
        e,
        format!(
            "{}:2: column 'sentiment': 'Bullish' is not a sentiment label (positive, negative, neutral)",
            d(&p)
        )
    );
}

#[test]
fn news_quoted_comma_row_cut_short() {
    let (p, e) = snapi(
        "u,i,\"Apple, Inc. rises\",Text,Barrons,\"Sat, 15 Oct 2022 12:06:00 -0400\",[],Neutral",
    );
    assert_eq!(
        e,
        format!(
            "{}:2: column 'type': missing field: 8 fields, header has 10",
            d(&p)
        )
    );
}

#[test]
fn stock_news_needs_a_calendar() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("AAPL_news_1.csv");
    fs::write(
        &p,
        format!(
            "{SNAPI_HEADER}u,i,T,X,B,\"Sat, 15 Oct 2022 12:06:00 -0400\",[],Neutral,Article,[]\n"
        ),
    )
    .unwrap();
    let e = run_stage(
        &IngestNews,
        news::params(&p, "stocknewsapi", &["AAPL"]),
        BTreeMap::new(),
    )
    .err()
    .unwrap();
    assert_eq!(
        e.to_string(),
        "input 'bars': stock news needs the trading calendar: bind it to an ohlcv output"
    );
}

#[test]
fn gnews_bad_date() {
    let (p, e) = news_err(
        "gnews",
        "Financial_News.csv",
        "published date,company,title,publisher,sentiment_score,url\n2021-01-22,AAPL,T,P,neutral,u\n2021/01/23,AAPL,T2,P,neutral,u2\n",
        true,
    );
    assert_eq!(
        e,
        format!(
            "{}:3: column 'published date': '2021/01/23' is not a YYYY-MM-DD date",
            d(&p)
        )
    );
}

#[test]
fn cryptotrade_malformed_json_and_bad_time() {
    let (p, e) = news_err(
        "cryptotrade",
        "2023-01-01.json",
        "[\n  {\"id\": 0, \"url\": \"u\",\n  \"time\" \"x\"}\n]\n",
        false,
    );
    assert_eq!(
        e,
        format!(
            "{}:3: column '(json)': malformed JSON: expected `:` at line 3 column 10",
            d(&p)
        )
    );
    let json = "[\n {\"id\": 0, \"url\": \"u\", \"time\": \"Sun, 01 Jan 2023 08:00:00 GMT\", \"title\": \"a\", \"content\": \"c\"},\n {\"id\": 1, \"url\": \"v\",\n  \"time\": \"yesterday\", \"title\": \"b\", \"content\": \"c\"}\n]\n";
    let (p, e) = news_err("cryptotrade", "2023-01-02.json", json, false);
    assert_eq!(
        e,
        format!(
            "{}:4: column 'time': 'yesterday' is not an RFC 2822 date with offset: input contains invalid characters",
            d(&p)
        )
    );
}

/// Runs `ingest_ohlcv` on one investorbench JSON text.
fn ib(content: &str) -> (PathBuf, String) {
    ohlcv_err("investorbench", "aapl.json", content)
}

#[test]
fn investorbench_top_level_not_an_object() {
    let (p, e) = ib("[{\"prices\": 1}]\n");
    assert_eq!(
        e,
        format!(
            "{}:1: column '(json)': invalid type: sequence, expected a JSON object keyed by YYYY-MM-DD dates at line 1 column 0",
            d(&p)
        )
    );
    let (p, e) = ib("{}");
    assert_eq!(e, format!("{}: the JSON object has no dates", d(&p)));
}

#[test]
fn investorbench_day_not_an_object() {
    let (p, e) = ib("{\n\"2020-03-12\": {\"prices\": 1},\n\"2020-03-13\": 133.6\n}");
    assert_eq!(
        e,
        format!(
            "{}:3: column '(json)': date 2020-03-13: invalid type: floating point `133.6`, expected an object with a 'prices' number at line 3 column 19",
            d(&p)
        )
    );
}

#[test]
fn investorbench_missing_or_repeated_prices() {
    let (p, e) = ib("{\n\"2020-03-12\": {\"prices\": 1},\n\"2020-03-13\": {\"news\": []}\n}");
    assert_eq!(
        e,
        format!("{}:3: column 'prices': date 2020-03-13: missing", d(&p))
    );
    let (p, e) = ib("{\"2020-03-12\": {\"prices\": 1, \"prices\": 2}}");
    assert_eq!(
        e,
        format!(
            "{}:1: column 'prices': date 2020-03-12: appears 2 times in one day",
            d(&p)
        )
    );
}

#[test]
fn investorbench_non_numeric_prices() {
    let (p, e) = ib("{\n\"2020-03-12\": {\"prices\": \"133.6\"}\n}");
    assert_eq!(
        e,
        format!(
            "{}:2: column 'prices': date 2020-03-12: expected a number, found the string \"133.6\"",
            d(&p)
        )
    );
    let (p, e) = ib("{\n\"2020-03-12\": {\"prices\": null, \"news\": []}\n}");
    assert_eq!(
        e,
        format!(
            "{}:2: column 'prices': date 2020-03-12: expected a number, found null",
            d(&p)
        )
    );
}

#[test]
fn investorbench_non_finite_prices() {
    // JSON has no NaN or infinity: serde_json rejects them while parsing, at the field.
    let (p, e) = ib("{\n\"2020-03-12\": {\"prices\": 1e999}\n}");
    assert_eq!(
        e,
        format!(
            "{}:2: column 'prices': date 2020-03-12: not a finite number: number out of range at line 2 column 30",
            d(&p)
        )
    );
    let (p, e) = ib("{\n\"2020-03-12\": {\"prices\": NaN}\n}");
    assert_eq!(
        e,
        format!(
            "{}:2: column 'prices': date 2020-03-12: malformed JSON: expected value at line 2 column 26",
            d(&p)
        )
    );
}

#[test]
fn investorbench_non_positive_prices() {
    let (p, e) = ib("{\n\"2020-03-12\": {\"prices\": 0}\n}");
    assert_eq!(
        e,
        format!(
            "{}:2: column 'prices': date 2020-03-12: price must be > 0, got 0",
            d(&p)
        )
    );
    let (p, e) = ib("{\n\"2020-03-12\": {\"prices\": -3.5}\n}");
    assert_eq!(
        e,
        format!(
            "{}:2: column 'prices': date 2020-03-12: price must be > 0, got -3.5",
            d(&p)
        )
    );
}

#[test]
fn investorbench_key_not_a_date() {
    for key in ["2020-3-12", "2020-02-30", "12/03/2020", " 2020-03-12"] {
        let (p, e) = ib(&format!("{{\n\"{key}\": {{\"prices\": 1}}\n}}"));
        assert_eq!(
            e,
            format!(
                "{}:2: column 'date': key '{key}' is not a YYYY-MM-DD date",
                d(&p)
            )
        );
    }
}

#[test]
fn investorbench_unknown_field_and_malformed_json() {
    let (p, e) = ib("{\n\"2020-03-12\": {\"prices\": 1, \"price\": 2}\n}");
    assert_eq!(
        e,
        format!(
            "{}:2: column 'price': date 2020-03-12: unknown field (a day has prices, news, 10k, 10q)",
            d(&p)
        )
    );
    let (p, e) = ib("{\n\"2020-03-12\": {\"prices\": 1,\n");
    assert_eq!(
        e,
        format!(
            "{}:3: column '(json)': date 2020-03-12: malformed JSON: EOF while parsing a value at line 3 column 0",
            d(&p)
        )
    );
    let (p, e) = ib("{\"2020-03-12\": {\"prices\": 1}} x");
    assert_eq!(
        e,
        format!(
            "{}:1: column '(json)': malformed JSON: trailing characters at line 1 column 31",
            d(&p)
        )
    );
}

#[test]
fn investorbench_conflicting_duplicate_date() {
    // serde_json would keep the last copy silently; both are read and compared.
    let (p, e) = ib(
        "{\n\"2020-03-12\": {\"prices\": 1.5},\n\"2020-03-13\": {\"prices\": 2},\n\
         \"2020-03-12\": {\"prices\": 1.6}\n}",
    );
    assert_eq!(
        e,
        format!(
            "{0}:4: column 'prices': conflicting duplicate date 2020-03-12: 1.6 here, 1.5 at {0}:2",
            d(&p)
        )
    );
}
