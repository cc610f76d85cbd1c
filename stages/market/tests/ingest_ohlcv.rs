//! `ingest_ohlcv` on the real shared files, plus the classic Yahoo format on a written file.
//! Expected numbers were checked by hand against the raw CSVs (Python csv module).
mod ingest_util;

use std::collections::BTreeMap;
use std::fs;

use flag_core::Stage;
use flag_market::ingest::IngestOhlcv;
use flag_market::ingest::ohlcv::params;
use ingest_util::*;
use serde_json::json;

/// Report rows as (file, column) -> value, for one ticker.
fn report_counts(run: &Run, ticker: &str, file: &str, col: &str) -> i64 {
    let r = run.out("report");
    let t = str_col(r, "ticker");
    let f = str_col(r, "file");
    let v = i64_col(r, col);
    (0..r.num_rows())
        .find(|&i| t[i] == ticker && f[i] == file)
        .map(|i| v[i])
        .unwrap_or_else(|| panic!("no report row for {ticker} {file}"))
}

#[test]
fn yfinance_real_files_have_1006_clean_rows_each() {
    let tickers = ["TSLA", "AAPL", "AMZN", "GOOGL", "META", "MSFT"];
    let p = params(&data_dir().join("stocks-2020-2023"), "yfinance", &tickers);
    let run = run_stage(&IngestOhlcv, p, BTreeMap::new()).unwrap();
    let bars = run.out("bars");
    assert_eq!(bars.num_rows(), 6 * 1006);
    let t = str_col(bars, "ticker");
    let d = date_col(bars, "date");
    let mut sorted: Vec<_> = t.iter().cloned().zip(d.iter().cloned()).collect();
    sorted.sort();
    assert_eq!(
        sorted,
        t.iter().cloned().zip(d.iter().cloned()).collect::<Vec<_>>()
    );
    assert_eq!(t[0], "AAPL");
    for tk in ["AAPL", "AMZN", "GOOGL", "META", "MSFT", "TSLA"] {
        let idx: Vec<usize> = (0..t.len()).filter(|&i| t[i] == tk).collect();
        assert_eq!(idx.len(), 1006, "{tk}");
        assert_eq!(d[idx[0]], ymd("2020-01-02"));
        assert_eq!(d[*idx.last().unwrap()], ymd("2023-12-29"));
    }
    // First AAPL row, exactly as in the file (columns are Close,High,Low,Open there).
    assert_eq!(f64_col(bars, "close")[0], 72.53849792480469);
    assert_eq!(f64_col(bars, "open")[0], 71.54587474672552);
    assert_eq!(f64_col(bars, "volume")[0], 135480400.0);
    assert!(f64s(bars, "adj_close").iter().all(Option::is_none));
    let rep = run.out("report");
    assert_eq!(rep.num_rows(), 6);
    for col in [
        "close_above_high",
        "close_below_low",
        "open_outside_range",
        "zero_volume",
        "gaps",
        "duplicates_dropped",
    ] {
        assert!(i64_col(rep, col).iter().all(|&x| x == 0), "{col}");
    }
    assert_eq!(
        report_counts(&run, "META", "META_historical_data.csv", "rows_read"),
        1006
    );
}

#[test]
fn yfinance_date_filter_is_inclusive() {
    let mut p = params(&data_dir().join("stocks-2020-2023"), "yfinance", &["AAPL"]);
    p.0.insert("start".into(), json!("2021-01-04"));
    p.0.insert("end".into(), json!("2021-12-31"));
    let run = run_stage(&IngestOhlcv, p, BTreeMap::new()).unwrap();
    let d = date_col(run.out("bars"), "date");
    assert_eq!(d.len(), 252);
    assert_eq!((d[0], d[251]), (ymd("2021-01-04"), ymd("2021-12-31")));
    assert_eq!(
        report_counts(&run, "AAPL", "AAPL_historical_data.csv", "filtered_out"),
        1006 - 252
    );
}

#[test]
fn tdqn_real_files_count_close_outside_range_without_fixing_it() {
    let p = params(
        &data_dir().join("tdqn"),
        "tdqn",
        &["AAPL", "AMZN", "0700.HK"],
    );
    let run = run_stage(&IngestOhlcv, p, BTreeMap::new()).unwrap();
    let bars = run.out("bars");
    let t = str_col(bars, "ticker");
    let count = |tk: &str| t.iter().filter(|x| *x == tk).count();
    assert_eq!(count("AAPL"), 1509 + 503);
    assert_eq!(count("AMZN"), 1509 + 503);
    // The two 0700.HK files both hold 2018-01-02, identically: one copy is dropped.
    assert_eq!(count("0700.HK"), 1478 + 493 - 1);
    let (a12, a18) = ("AAPL_2012-1-1_2018-1-1.csv", "AAPL_2018-1-1_2020-1-1.csv");
    assert_eq!(report_counts(&run, "AAPL", a12, "close_below_low"), 1508);
    assert_eq!(report_counts(&run, "AAPL", a18, "close_below_low"), 418);
    assert_eq!(report_counts(&run, "AAPL", a12, "close_above_high"), 0);
    assert_eq!(
        report_counts(
            &run,
            "AMZN",
            "AMZN_2012-1-1_2018-1-1.csv",
            "close_below_low"
        ),
        0
    );
    let (h12, h18) = (
        "0700.HK_2012-1-1_2018-1-1.csv",
        "0700.HK_2018-1-1_2020-1-1.csv",
    );
    assert_eq!(report_counts(&run, "0700.HK", h12, "close_below_low"), 1111);
    assert_eq!(report_counts(&run, "0700.HK", h12, "open_outside_range"), 1);
    assert_eq!(report_counts(&run, "0700.HK", h12, "zero_volume"), 6);
    assert_eq!(report_counts(&run, "0700.HK", h12, "gaps"), 18);
    assert_eq!(report_counts(&run, "0700.HK", h12, "max_gap_days"), 6);
    assert_eq!(report_counts(&run, "0700.HK", h18, "duplicates_dropped"), 1);
    assert_eq!(report_counts(&run, "0700.HK", h18, "rows_kept"), 492);
    assert_eq!(report_counts(&run, "0700.HK", h18, "close_below_low"), 135);
    // Not fixed: AAPL's first bar keeps the adjusted close below the unadjusted low.
    let i = t.iter().position(|x| x == "AAPL").unwrap();
    assert_eq!(date_col(bars, "date")[i], ymd("2012-01-03"));
    assert_eq!(f64_col(bars, "close")[i], 12.691425323486328);
    assert_eq!(f64_col(bars, "low")[i], 14.607142448425293);
    let last = t.iter().rposition(|x| x == "AAPL").unwrap();
    assert_eq!(date_col(bars, "date")[last], ymd("2019-12-31"));
}

#[test]
fn coingecko_eth_close_is_next_days_snapshot() {
    let p = params(
        &data_dir().join("crypto/eth_daily.csv"),
        "coingecko",
        &["ETH"],
    );
    let run = run_stage(&IngestOhlcv, p, BTreeMap::new()).unwrap();
    let bars = run.out("bars");
    // 3,121 snapshots; 2015-08-08 has no 2015-08-09 snapshot and 2024-02-22 is the last.
    assert_eq!(bars.num_rows(), 3119);
    let d = date_col(bars, "date");
    let (o, h, l, c, v) = (
        f64_col(bars, "open"),
        f64_col(bars, "high"),
        f64_col(bars, "low"),
        f64_col(bars, "close"),
        f64_col(bars, "volume"),
    );
    // Real rows: 2015-08-07 2.83162 / 90622, 2015-08-08 1.33075 / 368070.
    assert_eq!(
        (d[0], o[0], c[0], h[0], l[0], v[0]),
        (
            ymd("2015-08-07"),
            2.83162,
            1.33075,
            2.83162,
            1.33075,
            368070.0
        )
    );
    assert_eq!(d[1], ymd("2015-08-10"));
    assert_eq!((o[1], c[1]), (0.687585709, 1.067378879));
    let n = d.len() - 1;
    assert_eq!(
        (d[n], o[n], c[n], v[n]),
        (ymd("2024-02-21"), 3015.438952, 2977.082017, 20964306605.0)
    );
    for i in 0..n {
        assert!(h[i] >= o[i].max(c[i]) && l[i] <= o[i].min(c[i]));
        if (d[i + 1] - d[i]).num_days() == 1 {
            assert_eq!(c[i], o[i + 1], "close({}) must be the next snapshot", d[i]);
        }
    }
    let rep = run.out("report");
    assert_eq!(i64_col(rep, "rows_read"), vec![3121]);
    assert_eq!(i64_col(rep, "no_next_snapshot"), vec![2]);
    assert_eq!(i64_col(rep, "off_midnight_snapshots"), vec![2]);
    assert_eq!(i64_col(rep, "gaps"), vec![1]);
    assert_eq!(i64_col(rep, "max_gap_days"), vec![3]);
    assert_eq!(str_col(rep, "file"), vec!["eth_daily.csv"]);
}

#[test]
fn classic_yahoo_fills_adj_close_and_counts_holiday_and_duplicate_rows() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("KO.csv"),
        "Date,Open,High,Low,Close,Adj Close,Volume\n\
         2019-01-02,46.5,46.9,46.1,46.8,41.2,100\n\
         2019-01-02,46.5,46.9,46.1,46.8,41.2,100\n\
         2019-01-03,null,null,null,null,null,null\n\
         2019-01-04,46.0,47.5,45.9,47.4,41.7,0\n\
         2019-01-14,47.0,47.2,46.0,47.3,41.6,300\n",
    )
    .unwrap();
    let run = run_stage(
        &IngestOhlcv,
        params(dir.path(), "yahoo", &["KO"]),
        BTreeMap::new(),
    )
    .unwrap();
    let bars = run.out("bars");
    assert_eq!(
        date_col(bars, "date"),
        vec![ymd("2019-01-02"), ymd("2019-01-04"), ymd("2019-01-14")]
    );
    assert_eq!(
        f64s(bars, "adj_close"),
        vec![Some(41.2), Some(41.7), Some(41.6)]
    );
    assert_eq!(f64_col(bars, "close"), vec![46.8, 47.4, 47.3]);
    for (col, want) in [
        ("rows_read", 5),
        ("rows_kept", 3),
        ("empty_rows", 1),
        ("duplicates_dropped", 1),
        ("zero_volume", 1),
        ("gaps", 1),
        ("max_gap_days", 10),
    ] {
        assert_eq!(report_counts(&run, "KO", "KO.csv", col), want, "{col}");
    }
}

#[test]
fn same_input_gives_identical_bytes_and_external_files_are_exact() {
    let src = data_dir().join("tdqn");
    let p = params(&src, "tdqn", &["KO", "AAPL"]);
    let a = run_stage(&IngestOhlcv, p.clone(), BTreeMap::new()).unwrap();
    let b = run_stage(&IngestOhlcv, p.clone(), BTreeMap::new()).unwrap();
    for o in ["bars", "report"] {
        assert_eq!(
            fs::read(&a.files[o]).unwrap(),
            fs::read(&b.files[o]).unwrap(),
            "{o}"
        );
    }
    assert_eq!(
        IngestOhlcv.external_files(&p).unwrap(),
        vec![
            src.join("AAPL_2012-1-1_2018-1-1.csv"),
            src.join("AAPL_2018-1-1_2020-1-1.csv"),
            src.join("KO_2012-1-1_2018-1-1.csv"),
            src.join("KO_2018-1-1_2020-1-1.csv"),
        ]
    );
    assert!(
        a.log
            .contains("AAPL AAPL_2012-1-1_2018-1-1.csv: 1509 rows read"),
        "{}",
        a.log
    );
}

const INVESTORBENCH: [&str; 7] = ["MSFT", "JNJ", "UVV", "HON", "NFLX", "BTC", "ETH"];

#[test]
fn investorbench_real_files_are_close_only_with_per_ticker_gap_rules() {
    let p = params(
        &data_dir().join("investorbench"),
        "investorbench",
        &INVESTORBENCH,
    );
    let run = run_stage(&IngestOhlcv, p, BTreeMap::new()).unwrap();
    let bars = run.out("bars");
    let t = str_col(bars, "ticker");
    let d = date_col(bars, "date");
    let close = f64_col(bars, "close");
    let rows = |tk: &str| -> Vec<usize> { (0..t.len()).filter(|&i| t[i] == tk).collect() };
    // Row counts and ranges checked with Python's json module on the raw files.
    for (tk, n, first, last) in [
        ("MSFT", 291, "2020-03-12", "2021-05-06"),
        ("JNJ", 291, "2020-03-12", "2021-05-06"),
        ("UVV", 291, "2020-03-12", "2021-05-06"),
        ("HON", 291, "2020-03-12", "2021-05-06"),
        ("NFLX", 234, "2020-03-12", "2021-05-06"),
        ("BTC", 386, "2022-11-29", "2023-12-19"),
        ("ETH", 318, "2022-12-02", "2023-12-19"),
    ] {
        let r = rows(tk);
        assert_eq!(r.len(), n, "{tk}");
        assert_eq!(
            (d[r[0]], d[*r.last().unwrap()]),
            (ymd(first), ymd(last)),
            "{tk}"
        );
    }
    assert_eq!(bars.num_rows(), 4 * 291 + 234 + 386 + 318);
    // Close only: every open/high/low/volume (and adj_close) is null, never invented.
    for col in ["open", "high", "low", "volume", "adj_close"] {
        assert!(f64s(bars, col).iter().all(Option::is_none), "{col}");
    }
    // Known closes, exactly as in the files ("prices").
    let at = |tk: &str, day: &str| {
        close[(0..t.len())
            .find(|&i| t[i] == tk && d[i] == ymd(day))
            .unwrap()]
    };
    assert_eq!(at("MSFT", "2020-03-12"), 133.63912963867188);
    assert_eq!(at("MSFT", "2020-10-01"), 205.24142456054688);
    assert_eq!(at("MSFT", "2021-05-05"), 239.26904296875);
    assert_eq!(at("ETH", "2022-12-02"), 1294.3033770767);
    assert_eq!(at("ETH", "2023-12-19"), 2177.8726106679);

    let rep = run.out("report");
    assert_eq!(rep.num_rows(), 7);
    assert!(str_col(rep, "format").iter().all(|f| f == "investorbench"));
    assert!(
        str_col(rep, "note")
            .iter()
            .all(|n| n.starts_with("close only"))
    );
    for col in [
        "close_above_high",
        "close_below_low",
        "open_outside_range",
        "high_below_low",
        "zero_volume",
        "duplicates_dropped",
        "empty_rows",
    ] {
        assert!(i64_col(rep, col).iter().all(|&x| x == 0), "{col}");
    }
    // ETH misses 65 of 383 calendar days, in 47 holes of 1 to 3 days: crypto counts each;
    // BTC has every day. Stocks: weekends and holidays are no gap, NFLX's longer holes are.
    for (tk, file, gaps, max_gap) in [
        ("ETH", "eth.json", 47, 4),
        ("BTC", "btc.json", 0, 0),
        ("MSFT", "msft.json", 0, 0),
        ("NFLX", "nflx.json", 7, 9),
    ] {
        assert_eq!(report_counts(&run, tk, file, "gaps"), gaps, "{tk}");
        assert_eq!(
            report_counts(&run, tk, file, "max_gap_days"),
            max_gap,
            "{tk}"
        );
    }
    assert_eq!(report_counts(&run, "MSFT", "msft.json", "rows_read"), 291);
}

#[test]
fn investorbench_crypto_tickers_param_chooses_the_gap_rule() {
    let mut p = params(
        &data_dir().join("investorbench"),
        "investorbench",
        &["ETH", "MSFT"],
    );
    // MSFT as a calendar-day series: every weekend is a gap; ETH under the stock rule: none.
    p.0.insert("crypto_tickers".into(), json!(["msft"]));
    let run = run_stage(&IngestOhlcv, p, BTreeMap::new()).unwrap();
    assert_eq!(report_counts(&run, "MSFT", "msft.json", "gaps"), 61);
    assert_eq!(report_counts(&run, "MSFT", "msft.json", "max_gap_days"), 4);
    assert_eq!(report_counts(&run, "ETH", "eth.json", "gaps"), 0);
}

#[test]
fn investorbench_identical_duplicate_date_is_dropped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("ko.json"),
        "{\n  \"2019-01-03\": {\"prices\": 46.5, \"news\": [\"b\"]},\n  \
         \"2019-01-02\": {\"prices\": 46.0, \"news\": [], \"10k\": [], \"10q\": []},\n  \
         \"2019-01-03\": {\"prices\": 46.5, \"news\": []}\n}\n",
    )
    .unwrap();
    let mut p = params(dir.path(), "investorbench", &["KO"]);
    p.0.insert("start".into(), json!("2019-01-03"));
    let run = run_stage(&IngestOhlcv, p, BTreeMap::new()).unwrap();
    let bars = run.out("bars");
    assert_eq!(date_col(bars, "date"), vec![ymd("2019-01-03")]);
    assert_eq!(f64_col(bars, "close"), vec![46.5]);
    for (col, want) in [
        ("rows_read", 3),
        ("duplicates_dropped", 1),
        ("filtered_out", 1),
        ("rows_kept", 1),
    ] {
        assert_eq!(report_counts(&run, "KO", "ko.json", col), want, "{col}");
    }
}
