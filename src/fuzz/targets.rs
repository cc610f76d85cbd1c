//! The fuzz targets: the pipeline loader, the ingest formats, the model-answer parsers and
//! the constrained-decoding checker. Each names the properties it checks.
use std::path::{Path, PathBuf};

use arbitrary::Unstructured;
use flag_agents::finagent::answer::{
    self, Action, Decision, HighReflection, Horizon, IntelAnswer, ItemAnalysis, Queries, Sentiment,
    Verdict,
};
use flag_agents::parse::{self, Direction};
use flag_core::StageError;
use flag_llm::constrain::{Constraint, TextChecker};
use flag_market::ingest::news_formats;
use flag_market::ingest::ohlcv_formats::{self, Format, ParsedFile};

use super::{Outcome, Target, signature};
use crate::error::EngineError;
use crate::pipeline;
use crate::registry::Registry;

/// Every target, in the order `just fuzz` runs them.
pub const NAMES: &[&str] = &[
    "pipeline",
    "ohlcv_tdqn",
    "ohlcv_yfinance",
    "ohlcv_yahoo",
    "ohlcv_coingecko",
    "ohlcv_investorbench",
    "ohlcv_roundtrip",
    "news_stocknewsapi",
    "news_gnews",
    "news_cryptotrade",
    "answers",
    "answers_roundtrip",
    "constrain",
    "constraint_schema",
];

pub fn target(name: &str) -> Option<Target> {
    let name: &'static str = NAMES.iter().find(|n| **n == name)?;
    Some(match name {
        "pipeline" => pipeline_target(),
        "ohlcv_tdqn" => ohlcv(name, Format::Tdqn),
        "ohlcv_yfinance" => ohlcv(name, Format::Yfinance),
        "ohlcv_yahoo" => ohlcv(name, Format::Yahoo),
        "ohlcv_coingecko" => ohlcv(name, Format::Coingecko),
        "ohlcv_investorbench" => ohlcv(name, Format::Investorbench),
        "ohlcv_roundtrip" => ohlcv_roundtrip(),
        "news_stocknewsapi" | "news_gnews" | "news_cryptotrade" => news(name),
        "answers" => answers(),
        "answers_roundtrip" => answers_roundtrip(),
        "constrain" => constrain(),
        "constraint_schema" => constraint_schema(),
        _ => return None,
    })
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn data_dir() -> PathBuf {
    std::env::var_os("FLAG_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("../shared/data"))
}

/// A fresh folder for the files a target writes: in memory where the machine has /dev/shm.
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(d) = tempfile::tempdir_in(shm)
    {
        return d;
    }
    tempfile::tempdir().expect("a temporary folder")
}

fn toks(t: &[&str]) -> Vec<Vec<u8>> {
    t.iter().map(|s| s.as_bytes().to_vec()).collect()
}

/// The first `n` lines of a file (a seed need not be a whole file).
fn head(path: &Path, n: usize) -> Option<Vec<u8>> {
    let b = std::fs::read(path).ok()?;
    let end = b
        .iter()
        .enumerate()
        .filter(|(_, c)| **c == b'\n')
        .nth(n.saturating_sub(1))
        .map_or(b.len(), |(i, _)| i + 1);
    Some(b[..end].to_vec())
}

/// Error messages must name the input: `file` for every variant that can say where.
fn names_file(e: &EngineError, file: &Path) -> bool {
    match e {
        EngineError::Pipeline { file: f, .. } => f == file,
        EngineError::Many(list) => !list.is_empty() && list.iter().all(|e| names_file(e, file)),
        other => other.to_string().contains(&file.display().to_string()),
    }
}

// ---------------------------------------------------------------------------------------
// pipeline: YAML text -> validated pipeline.
// Properties: no panic; an error names the file (and so its line); a pipeline that loads
// has valid, unique stage names, every input bound to a stage listed before it (dependency
// order), and loads the same after a trailing comment line.
fn pipeline_target() -> Target {
    let registry = Registry::builtin();
    let root = root();
    let mut seeds: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(root.join("pipelines"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
                .filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b)))
                .collect()
        })
        .unwrap_or_default();
    seeds.sort();
    let mut dict = toks(&[
        "name: ",
        "description: ",
        "params:\n",
        "stages:\n",
        "  uses: ",
        "  inputs:\n",
        "  outputs:\n",
        "  params:\n",
        "${data_dir}",
        "${",
        "}",
        "${{",
        ": ",
        "- ",
        "&a ",
        "*a",
        "<<: *a\n",
        "!!binary ",
        "!!str ",
        "!!int ",
        "!!map ",
        "---\n",
        "...\n",
        "? ",
        "[",
        "]",
        "{",
        "}",
        "\t",
        "\u{feff}",
        "~",
        "null",
        "true",
        ".nan",
        ".inf",
        "|\n",
        ">-\n",
        "LAST",
        "..",
        "/tmp/x",
        "'",
        "\"",
        "\n    ",
        ".table",
        ".bars",
    ]);
    dict.extend(registry.kinds().map(|k| k.as_bytes().to_vec()));
    let file = PathBuf::from("pipelines/fuzz-case.yaml");
    Target {
        name: "pipeline",
        seeds: seeds.into_iter().map(|(_, b)| b).collect(),
        dict,
        max_len: 64 * 1024,
        run: Box::new(move |b| {
            let text = String::from_utf8_lossy(b);
            match pipeline::load_text(&file, &text, Some(&root), &[], &registry) {
                Ok(p) => {
                    if let Err(e) = pipeline::check_name(&p.name, true) {
                        return Outcome::Violation(format!("loaded with pipeline name {e}"));
                    }
                    for (i, s) in p.stages.iter().enumerate() {
                        if let Err(e) = pipeline::check_name(&s.name, false) {
                            return Outcome::Violation(format!("loaded with stage name {e}"));
                        }
                        if p.stages[..i].iter().any(|x| x.name == s.name) {
                            return Outcome::Violation(format!("stage '{}' twice", s.name));
                        }
                        for r in s.inputs.values().flatten() {
                            if !p.stages[..i].iter().any(|x| x.name == r.stage) {
                                return Outcome::Violation(format!(
                                    "stage '{}' reads {r}, which is not a stage before it",
                                    s.name
                                ));
                            }
                        }
                    }
                    let again = format!("{text}\n# a comment\n");
                    match pipeline::load_text(&file, &again, Some(&root), &[], &registry) {
                        Ok(q) => {
                            let names = |p: &pipeline::Pipeline| {
                                p.stages
                                    .iter()
                                    .map(|s| (s.name.clone(), s.kind.clone()))
                                    .collect::<Vec<_>>()
                            };
                            if names(&p) != names(&q) || p.name != q.name {
                                return Outcome::Violation(
                                    "a trailing comment changed the pipeline".into(),
                                );
                            }
                        }
                        Err(e) => {
                            return Outcome::Violation(format!(
                                "loads, but not after a trailing comment line: {e}"
                            ));
                        }
                    }
                    Outcome::Pass(format!("ok {} stages", p.stages.len()))
                }
                Err(e) => {
                    if names_file(&e, &file) {
                        let m = e.to_string().replace(&file.display().to_string(), "FILE");
                        Outcome::Pass(signature(&m))
                    } else {
                        Outcome::Violation(format!("error does not name {}: {e}", file.display()))
                    }
                }
            }
        }),
    }
}

// ---------------------------------------------------------------------------------------
// Ingest files: bytes written to a file, read by the format's reader.
// Properties: no panic; an error names the file, and a line error a line >= 1; rows read
// carry finite prices > 0 and a line >= 1, in file order.

/// A target over a reader of one file named `file_name` in a fresh folder.
fn file_target(
    name: &'static str,
    file_name: &str,
    seeds: Vec<Vec<u8>>,
    dict: Vec<Vec<u8>>,
    read: impl Fn(&Path) -> Result<Result<String, String>, StageError> + 'static,
) -> Target {
    let dir = scratch();
    let path = dir.path().join(file_name);
    let shown = path.display().to_string();
    Target {
        name,
        seeds,
        dict,
        max_len: 64 * 1024,
        run: Box::new(move |b| {
            let _keep = &dir;
            if let Err(e) = std::fs::write(&path, b) {
                return Outcome::Violation(format!("writing the input: {e}"));
            }
            match read(&path) {
                Ok(Ok(sig)) => Outcome::Pass(sig),
                Ok(Err(v)) => Outcome::Violation(v),
                Err(e) => {
                    let m = e.to_string();
                    if !m.contains(&shown) {
                        return Outcome::Violation(format!("error does not name the file: {m}"));
                    }
                    if let StageError::Data { line: 0, .. } = e {
                        return Outcome::Violation(format!("error at line 0: {m}"));
                    }
                    Outcome::Pass(signature(&m.replace(&shown, "FILE")))
                }
            }
        }),
    }
}

fn check_rows(p: &ParsedFile, text_lines: u64) -> Result<String, String> {
    let mut last = 0;
    for r in &p.rows {
        for v in r.values().into_iter().flatten() {
            if !v.is_finite() || v < 0.0 {
                return Err(format!("line {}: value {v} was accepted", r.line));
            }
        }
        if r.close.is_nan() || r.close <= 0.0 {
            return Err(format!("line {}: close {} was accepted", r.line, r.close));
        }
        if r.line == 0 || r.line < last || r.line > text_lines + 1 {
            return Err(format!(
                "row of {} has line {} (previous {last}, file has {text_lines} lines)",
                r.date, r.line
            ));
        }
        last = r.line;
    }
    if p.rows.len() as u64 > p.rows_read {
        return Err(format!("{} rows from {} read", p.rows.len(), p.rows_read));
    }
    Ok(format!("ok rows {}", p.rows.len().min(3)))
}

fn ohlcv(name: &'static str, format: Format) -> Target {
    let data = data_dir();
    let ticker = "AAPL";
    let mut seeds = Vec::new();
    let (file_name, dict) = match format {
        Format::Tdqn => {
            for t in [
                "AAPL_2012-1-1_2018-1-1.csv",
                "0700.HK_2018-1-1_2020-1-1.csv",
            ] {
                seeds.extend(head(&data.join("tdqn").join(t), 40));
            }
            ("AAPL_2012-1-1_2018-1-1.csv", vec![])
        }
        Format::Yfinance => {
            seeds.extend(head(
                &data.join("stocks-2020-2023/AAPL_historical_data.csv"),
                40,
            ));
            seeds.push(
                b"Price,Adj Close,Close,High,Low,Open,Volume\nTicker,AAPL,AAPL,AAPL,AAPL,AAPL,AAPL\nDate,,,,,,\n2020-01-02,72.5,75.0,75.1,73.8,74.0,135480400\n".to_vec(),
            );
            (
                "AAPL_historical_data.csv",
                toks(&["Ticker", "Price", "AAPL", "Adj Close"]),
            )
        }
        Format::Yahoo => {
            // No Yahoo file in the shared data: the TDQN rows in Yahoo's layout, with a
            // holiday row of nulls.
            let mut s = b"Date,Open,High,Low,Close,Adj Close,Volume\n".to_vec();
            if let Some(h) = head(&data.join("tdqn/AAPL_2012-1-1_2018-1-1.csv"), 30) {
                for l in String::from_utf8_lossy(&h).lines().skip(1) {
                    let f: Vec<&str> = l.split(',').collect();
                    if f.len() == 6 {
                        s.extend(
                            format!(
                                "{},{},{},{},{},{},{}\n",
                                f[0], f[1], f[2], f[3], f[4], f[4], f[5]
                            )
                            .as_bytes(),
                        );
                    }
                }
            }
            s.extend(b"2012-02-20,null,null,null,null,null,null\n");
            seeds.push(s);
            ("AAPL.csv", toks(&["null", "Adj Close"]))
        }
        Format::Coingecko => {
            seeds.extend(head(&data.join("crypto/eth_daily.csv"), 40));
            (
                "eth_daily.csv",
                toks(&[" 00:00:00 UTC", " 12:00:00 UTC", "UTC"]),
            )
        }
        Format::Investorbench => {
            if let Some(s) = investorbench_seed(&data.join("investorbench/eth.json")) {
                seeds.push(s);
            }
            (
                "eth.json",
                toks(&[
                    "\"prices\": ",
                    "\"news\": ",
                    "\"2022-11-30\": ",
                    "null",
                    "[]",
                    "{}",
                ]),
            )
        }
    };
    let mut dict = dict;
    dict.extend(toks(&[
        ",",
        "\"",
        "\r\n",
        "\n\n",
        "2020-02-30",
        "2012-01-03",
        "1e400",
        "-1",
        "0",
        "1e-320",
        "1e300",
        "NaN",
        "inf",
        "\u{feff}",
        "Timestamp",
        "Open",
        "High",
        "Low",
        "Close",
        "Volume",
    ]));
    file_target(name, file_name, seeds, dict, move |path| {
        let p = ohlcv_formats::read_file(format, path, ticker)?;
        let lines = std::fs::read(path)
            .map(|b| b.iter().filter(|&&c| c == b'\n').count() as u64 + 1)
            .unwrap_or(0);
        Ok(check_rows(&p, lines))
    })
}

/// The first dates of an InvestorBench file, each with at most two news items.
fn investorbench_seed(path: &Path) -> Option<Vec<u8>> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    let mut out = serde_json::Map::new();
    for (k, mut day) in v.as_object()?.clone().into_iter().take(12) {
        if let Some(news) = day.get_mut("news").and_then(|n| n.as_array_mut()) {
            news.truncate(2);
        }
        out.insert(k, day);
    }
    serde_json::to_vec_pretty(&serde_json::Value::Object(out)).ok()
}

fn news(name: &'static str) -> Target {
    let data = data_dir();
    let common = toks(&[
        ",",
        "\"",
        "\r\n",
        "'",
        "[",
        "]",
        "positive",
        "negative",
        "neutral",
        "Positive",
        "2021-01-22",
        "Sat, 15 Oct 2022 12:06:00 -0400",
        "Sun, 01 Jan 2023 08:00:00 GMT",
        "\u{feff}",
        "null",
    ]);
    match name {
        "news_stocknewsapi" => {
            let seeds = head(
                &data.join("news/stocknewsapi/AAPL_news_10162021_10152022.csv"),
                12,
            )
            .into_iter()
            .collect();
            file_target(name, "AAPL_news.csv", seeds, common, |p| {
                news_formats::read_stocknewsapi(p, "AAPL")
                    .map(|v| Ok(format!("ok {}", v.len().min(3))))
            })
        }
        "news_gnews" => {
            let seeds = head(&data.join("news/gnews-2021-2023/Financial_News.csv"), 20)
                .into_iter()
                .collect();
            file_target(name, "Financial_News.csv", seeds, common, |p| {
                news_formats::read_gnews(p).map(|v| Ok(format!("ok {}", v.len().min(3))))
            })
        }
        _ => {
            let seeds = ["2023-01-01.json", "2023-06-20.json"]
                .iter()
                .filter_map(|f| std::fs::read(data.join("crypto/eth-gnews").join(f)).ok())
                .collect();
            let mut dict = common;
            dict.extend(toks(&[
                "\"id\": ",
                "\"time\": ",
                "\"title\": ",
                "\"content\": ",
                "{}",
            ]));
            file_target(name, "2023-01-01.json", seeds, dict, |p| {
                news_formats::read_cryptotrade(p, "ETH")
                    .map(|v| Ok(format!("ok {}", v.len().min(3))))
            })
        }
    }
}

// ---------------------------------------------------------------------------------------
// OHLCV round trip: bars generated from the input bytes, written in each CSV layout and as
// InvestorBench JSON, read back: the same dates and prices, in order.
fn gen_price(u: &mut Unstructured) -> arbitrary::Result<f64> {
    // 1e-4 ..= 1e9: inside the sane price range, halved for a low.
    let m = f64::from(u.int_in_range(10u32..=9_999_999)?);
    let e = u.int_in_range(-5i32..=2)?;
    Ok(m * 10f64.powi(e))
}

fn ohlcv_roundtrip() -> Target {
    let dir = scratch();
    Target {
        name: "ohlcv_roundtrip",
        seeds: (0u8..8).map(|i| vec![i; 64]).collect(),
        dict: vec![],
        max_len: 4096,
        run: Box::new(move |b| {
            let mut u = Unstructured::new(b);
            let Ok(bars) = gen_bars(&mut u) else {
                return Outcome::Pass("short input".into());
            };
            for format in [
                Format::Tdqn,
                Format::Yahoo,
                Format::Yfinance,
                Format::Coingecko,
                Format::Investorbench,
            ] {
                let text = render_bars(format, &bars);
                let path = dir.path().join(format!("rt.{}", format.name()));
                if let Err(e) = std::fs::write(&path, &text) {
                    return Outcome::Violation(format!("writing the input: {e}"));
                }
                let got = match ohlcv_formats::read_file(format, &path, "AAPL") {
                    Ok(p) => p,
                    Err(e) => {
                        return Outcome::Violation(format!(
                            "{}: generated bars rejected: {e}\n{text}",
                            format.name()
                        ));
                    }
                };
                let want: Vec<(chrono::NaiveDate, f64)> = bars
                    .iter()
                    .map(|b| {
                        (
                            b.0,
                            if format == Format::Coingecko {
                                b.1
                            } else {
                                b.4
                            },
                        )
                    })
                    .collect();
                let have: Vec<(chrono::NaiveDate, f64)> =
                    got.rows.iter().map(|r| (r.date, r.close)).collect();
                if want != have {
                    return Outcome::Violation(format!(
                        "{}: read {have:?}, wrote {want:?}",
                        format.name()
                    ));
                }
            }
            Outcome::Pass(format!("ok {}", bars.len().min(3)))
        }),
    }
}

/// (date, open, high, low, close, volume), dates increasing, low <= open, close <= high.
type Bar = (chrono::NaiveDate, f64, f64, f64, f64, f64);

fn gen_bars(u: &mut Unstructured) -> arbitrary::Result<Vec<Bar>> {
    let n = u.int_in_range(1usize..=20)?;
    let mut d = chrono::NaiveDate::from_ymd_opt(2000, 1, 3).expect("a date")
        + chrono::Duration::days(u.int_in_range(0i64..=9000)?);
    let mut out = Vec::new();
    for _ in 0..n {
        let (a, c) = (gen_price(u)?, gen_price(u)?);
        let high = a.max(c) + gen_price(u)? * f64::from(u.int_in_range(0u8..=1)?);
        let low = a.min(c) / f64::from(u.int_in_range(1u8..=2)?);
        let vol = f64::from(u.int_in_range(0u32..=u32::MAX)?);
        out.push((d, a, high, low, c, vol));
        d += chrono::Duration::days(u.int_in_range(1i64..=5)?);
    }
    Ok(out)
}

fn render_bars(format: Format, bars: &[Bar]) -> String {
    let mut s = String::new();
    match format {
        Format::Tdqn => {
            s.push_str("Timestamp,Open,High,Low,Close,Volume\n");
            for (d, o, h, l, c, v) in bars {
                s.push_str(&format!("{d},{o},{h},{l},{c},{v}\n"));
            }
        }
        Format::Yahoo => {
            s.push_str("Date,Open,High,Low,Close,Adj Close,Volume\n");
            for (d, o, h, l, c, v) in bars {
                s.push_str(&format!("{d},{o},{h},{l},{c},{c},{v}\n"));
            }
        }
        Format::Yfinance => {
            s.push_str("Date,Close,High,Low,Open,Volume\n,AAPL,AAPL,AAPL,AAPL,AAPL\n");
            for (d, o, h, l, c, v) in bars {
                s.push_str(&format!("{d},{c},{h},{l},{o},{v}\n"));
            }
        }
        Format::Coingecko => {
            s.push_str("snapped_at,open,market_cap,total_volume\n");
            for (d, o, _, _, _, v) in bars {
                s.push_str(&format!("{d} 00:00:00 UTC,{o},0,{v}\n"));
            }
        }
        Format::Investorbench => {
            s.push_str("{\n");
            for (i, (d, _, _, _, c, _)) in bars.iter().enumerate() {
                let comma = if i + 1 < bars.len() { "," } else { "" };
                s.push_str(&format!(
                    "  \"{d}\": {{\"prices\": {c}, \"news\": []}}{comma}\n"
                ));
            }
            s.push_str("}\n");
        }
    }
    s
}

// ---------------------------------------------------------------------------------------
// Model answers: every parser on the same text.
// Properties: no panic; a rejection has a message; an accepted strategy has direction
// LONG/SHORT, confidence 1..3, 1..12 features with weights in [0, 1], and its
// direction_offset points at the JSON string of the direction in the answer; accepted
// factors are 2..5, distinct, non-empty; accepted FinAgent answers have the counts asked for.
const STRATEGY: &str = r#"{"direction": "LONG", "confidence": 2, "explanation": "Uptrend above SMA50 and rising.", "features": {"sma": 0.6, "rsi": 0.4}}"#;
const FACTORS: &str = r#"{"factors": ["Strong iPhone demand", "Services growth"]}"#;
const DECISION: &str =
    r#"{"analysis": "Momentum is up.", "action": "BUY", "reasoning": "Trend and news agree."}"#;
const HIGH: &str = r#"{"verdicts": ["RIGHT", "WRONG"], "improvement": "Sell earlier.", "summary": "Mixed record.", "query": "late exits"}"#;
const INTEL: &str = r#"{"analysis": [{"duration": "SHORT-TERM", "sentiment": "POSITIVE"}, {"duration": "LONG-TERM", "sentiment": "NEUTRAL"}], "summary": "Demand is strong.", "queries": {"short_term": "earnings beat", "medium_term": "product cycle", "long_term": "market share"}}"#;
const PAST: &str = r#"{"analysis": [{"duration": "SHORT-TERM", "sentiment": "POSITIVE"}], "summary": "Demand is strong."}"#;
const LOW: &str = r#"{"short_term": "Up 2% today.", "medium_term": "Above MA5.", "long_term": "Uptrend since May.", "query": "breakout above band"}"#;

fn answer_seeds() -> Vec<Vec<u8>> {
    let mut s: Vec<Vec<u8>> = [STRATEGY, FACTORS, DECISION, HIGH, INTEL, PAST, LOW]
        .iter()
        .map(|a| a.as_bytes().to_vec())
        .collect();
    s.push(format!("```json\n{STRATEGY}\n```\nThat is my answer.").into_bytes());
    s.push(
        br#"{"direction": "short", "confidence": 3, "explanation": " x \u00e9 \" } {", "features": {"macd": 1, "kdj": 0e0}}"#
            .to_vec(),
    );
    s
}

fn answer_dict() -> Vec<Vec<u8>> {
    toks(&[
        "\"direction\": ",
        "\"confidence\": ",
        "\"explanation\": ",
        "\"features\": ",
        "\"factors\": ",
        "\"analysis\": ",
        "\"action\": ",
        "\"reasoning\": ",
        "\"verdicts\": ",
        "\"summary\": ",
        "\"query\": ",
        "\"queries\": ",
        "\"duration\": ",
        "\"sentiment\": ",
        "\"LONG\"",
        "\"SHORT\"",
        "\"BUY\"",
        "\"HOLD\"",
        "\"RIGHT\"",
        "\"SHORT-TERM\"",
        "\"POSITIVE\"",
        "```json\n",
        "```",
        "\\u0022",
        "\\u004c",
        "\\\"",
        "\\\\",
        "\\",
        "{",
        "}",
        "[",
        "]",
        ", ",
        ": ",
        "\"",
        "1e400",
        "-0.0",
        "1.0000000000000002",
        "null",
    ])
}

/// The byte range of the JSON string (quotes included) that opens at `at` (a quote).
fn json_string_at(s: &str, at: usize) -> Option<&str> {
    let b = s.as_bytes();
    if b.get(at) != Some(&b'"') {
        return None;
    }
    let mut i = at + 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return s.get(at..=i),
            _ => i += 1,
        }
    }
    None
}

fn check_strategy(answer: &str, s: &parse::Strategy) -> Result<(), String> {
    if !(1..=3).contains(&s.confidence) {
        return Err(format!("confidence {} accepted", s.confidence));
    }
    if s.features.is_empty() || s.features.len() > parse::MAX_FEATURES {
        return Err(format!("{} features accepted", s.features.len()));
    }
    if let Some((n, w)) = s.features.iter().find(|(_, w)| !(0.0..=1.0).contains(w)) {
        return Err(format!("feature {n:?} weight {w} accepted"));
    }
    if s.explanation.trim().is_empty() {
        return Err("empty explanation accepted".into());
    }
    // The certainty reads the decision token at direction_offset: it must be the value.
    let raw = s
        .direction_offset
        .checked_sub(1)
        .and_then(|q| json_string_at(answer, q))
        .ok_or_else(|| {
            format!(
                "direction_offset {} is not inside a JSON string",
                s.direction_offset
            )
        })?;
    let value: String = serde_json::from_str(raw).map_err(|e| format!("{raw}: {e}"))?;
    if !value.eq_ignore_ascii_case(s.direction.as_str()) {
        return Err(format!(
            "direction_offset {} points at {raw}, the direction is {}",
            s.direction_offset,
            s.direction.as_str()
        ));
    }
    Ok(())
}

/// The length of the list `key` of the answer's object (framed as the parsers frame it).
fn list_len(text: &str, key: &str) -> Option<usize> {
    parse::parse_object::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v.get(key).and_then(|a| a.as_array()).map(Vec::len))
}

fn all_parsers(text: &str) -> Result<String, String> {
    let mut sig = String::new();
    let mut note = |r: Result<(), parse::ParseError>| match r {
        Ok(()) => {
            sig.push_str("ok;");
            Ok(())
        }
        Err(e) => {
            let m = e.to_string();
            if m.trim().is_empty() {
                return Err(format!("empty message for {e:?}"));
            }
            sig.extend(signature(&m).chars().take(30));
            sig.push(';');
            Ok(())
        }
    };
    match parse::parse_strategy(text) {
        Ok(s) => {
            check_strategy(text, &s)?;
            note(Ok(()))?;
        }
        Err(e) => note(Err(e))?,
    }
    match parse::parse_factors(text) {
        Ok(f) => {
            if !(parse::MIN_FACTORS..=parse::MAX_FACTORS).contains(&f.len())
                || f.iter().any(|x| x.trim().is_empty())
                || f.iter().enumerate().any(|(i, x)| f[..i].contains(x))
            {
                return Err(format!("factors {f:?} accepted"));
            }
            note(Ok(()))?;
        }
        Err(e) => note(Err(e))?,
    }
    // The count asked for: the one the answer has, and one more (must be refused).
    let items = list_len(text, "analysis").unwrap_or(1);
    let verdicts = list_len(text, "verdicts").unwrap_or(1);
    match answer::parse_intel(text, items) {
        Ok(a) if a.analysis.len() != items => return Err("intel count not checked".into()),
        r => note(r.map(|_| ()))?,
    }
    if answer::parse_intel(text, items + 1).is_ok() {
        return Err(format!(
            "intel with {items} items accepted for {}",
            items + 1
        ));
    }
    note(answer::parse_past_intel(text, items).map(|_| ()))?;
    note(answer::parse_low_reflection(text).map(|_| ()))?;
    match answer::parse_high_reflection(text, verdicts) {
        Ok(h) if h.verdicts.len() != verdicts => return Err("verdict count not checked".into()),
        r => note(r.map(|_| ()))?,
    }
    note(answer::parse_decision(text).map(|_| ()))?;
    Ok(sig)
}

fn answers() -> Target {
    Target {
        name: "answers",
        seeds: answer_seeds(),
        dict: answer_dict(),
        max_len: 16 * 1024,
        run: Box::new(|b| match all_parsers(&String::from_utf8_lossy(b)) {
            Ok(sig) => Outcome::Pass(sig),
            Err(v) => Outcome::Violation(v),
        }),
    }
}

// ---------------------------------------------------------------------------------------
// Answer round trip: a valid answer generated from the input bytes, written as JSON (pretty
// or compact, fenced or not, with trailing prose), parses back to what was generated.

/// Text of 1..=max characters, no control characters; `nonblank` so it survives trimming.
fn gen_text(u: &mut Unstructured, max: usize) -> arbitrary::Result<String> {
    const ALPH: &[char] = &[
        'a', 'Z', ' ', '.', '%', '"', '\\', '{', '}', '/', 'é', '€', '😀', '\u{a0}', '\u{3000}',
    ];
    let n = u.int_in_range(1..=max)?;
    let mut s = String::new();
    for _ in 0..n {
        s.push(*u.choose(ALPH)?);
    }
    Ok(s)
}

fn norm(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn frame(u: &mut Unstructured, json: String) -> arbitrary::Result<String> {
    Ok(match u.int_in_range(0u8..=3)? {
        0 => json,
        1 => format!("```json\n{json}\n```"),
        2 => format!("  \n{json}\nThat is my answer."),
        _ => format!("```\n{json}\n```\nDone."),
    })
}

fn roundtrip_once(u: &mut Unstructured) -> arbitrary::Result<Result<String, String>> {
    let pretty = u.arbitrary::<bool>()?;
    let to_json = |v: &serde_json::Value| {
        if pretty {
            serde_json::to_string_pretty(v).expect("json")
        } else {
            serde_json::to_string(v).expect("json")
        }
    };
    Ok(match u.int_in_range(0u8..=4)? {
        0 => {
            let direction = if u.arbitrary()? {
                Direction::Long
            } else {
                Direction::Short
            };
            let confidence = u.int_in_range(1u8..=3)?;
            let mut explanation = gen_text(u, 300)?;
            if explanation.trim().is_empty() {
                explanation.push('x');
            }
            let n = u.int_in_range(1..=parse::MAX_FEATURES)?;
            let mut features: Vec<(String, f64)> = Vec::with_capacity(n);
            for i in 0..n {
                let name = format!("{}{i}", gen_text(u, 20)?.trim());
                let w = f64::from(u.int_in_range(0u32..=1_000_000)?) / 1e6;
                features.push((name, w));
            }
            let mut obj = serde_json::Map::new();
            let dir = if u.arbitrary()? {
                direction.as_str().to_string()
            } else {
                direction.as_str().to_lowercase()
            };
            obj.insert("direction".into(), dir.into());
            obj.insert("confidence".into(), confidence.into());
            obj.insert("explanation".into(), explanation.clone().into());
            let f: serde_json::Map<String, serde_json::Value> = features
                .iter()
                .map(|(n, w)| (n.clone(), (*w).into()))
                .collect();
            obj.insert("features".into(), f.into());
            // serde_json's Map sorts keys; the parser keeps the answer's order.
            features.sort_by(|a, b| a.0.cmp(&b.0));
            let text = frame(u, to_json(&serde_json::Value::Object(obj)))?;
            match parse::parse_strategy(&text) {
                Ok(s) => {
                    let mut got = s.features.clone();
                    got.sort_by(|a, b| a.0.cmp(&b.0));
                    if (s.direction, s.confidence, s.explanation.as_str(), &got)
                        != (direction, confidence, explanation.trim(), &features)
                    {
                        Err(format!("parsed {s:?} from {text}"))
                    } else {
                        check_strategy(&text, &s).map(|_| "strategy".into())
                    }
                }
                Err(e) => Err(format!("valid strategy rejected: {e}\n{text}")),
            }
        }
        1 => {
            let n = u.int_in_range(2..=parse::MAX_FACTORS)?;
            let factors: Vec<String> = (0..n)
                .map(|i| gen_text(u, 60).map(|t| format!("{i} {t}")))
                .collect::<arbitrary::Result<_>>()?;
            let text = frame(u, to_json(&serde_json::json!({ "factors": factors })))?;
            let want: Vec<String> = factors.iter().map(|f| norm(f)).collect();
            match parse::parse_factors(&text) {
                Ok(f) if f == want => Ok("factors".into()),
                Ok(f) => Err(format!("parsed {f:?}, wrote {want:?}")),
                Err(e) => Err(format!("valid factors rejected: {e}\n{text}")),
            }
        }
        2 => {
            let d = Decision {
                analysis: format!("a{}", gen_text(u, answer::MAX_REASON_CHARS - 3)?) + "z",
                action: *u.choose(&[Action::Buy, Action::Sell, Action::Hold])?,
                reasoning: format!("r{}", gen_text(u, answer::MAX_REASON_CHARS - 3)?) + "z",
            };
            let text = frame(u, to_json(&serde_json::to_value(&d).expect("json")))?;
            let want = Decision {
                analysis: norm(&d.analysis),
                reasoning: norm(&d.reasoning),
                ..d
            };
            match answer::parse_decision(&text) {
                Ok(got) if got == want => Ok("decision".into()),
                Ok(got) => Err(format!("parsed {got:?}, wrote {want:?}")),
                Err(e) => Err(format!("valid decision rejected: {e}\n{text}")),
            }
        }
        3 => {
            let n = u.int_in_range(1usize..=14)?;
            let h = HighReflection {
                verdicts: (0..n)
                    .map(|_| u.choose(&[Verdict::Right, Verdict::Wrong]).copied())
                    .collect::<arbitrary::Result<_>>()?,
                improvement: format!("i{}z", gen_text(u, answer::MAX_REASON_CHARS - 3)?),
                summary: format!("s{}z", gen_text(u, answer::MAX_REASON_CHARS - 3)?),
                query: format!("q{}z", gen_text(u, answer::MAX_QUERY_CHARS - 3)?),
            };
            let text = frame(u, to_json(&serde_json::to_value(&h).expect("json")))?;
            let want = HighReflection {
                improvement: norm(&h.improvement),
                summary: norm(&h.summary),
                query: norm(&h.query),
                verdicts: h.verdicts.clone(),
            };
            match answer::parse_high_reflection(&text, n) {
                Ok(got) if got == want => Ok("high".into()),
                Ok(got) => Err(format!("parsed {got:?}, wrote {want:?}")),
                Err(e) => Err(format!("valid reflection rejected: {e}\n{text}")),
            }
        }
        _ => {
            let n = u.int_in_range(1usize..=20)?;
            let analysis: Vec<ItemAnalysis> = (0..n)
                .map(|_| {
                    Ok(ItemAnalysis {
                        duration: *u.choose(&Horizon::ALL)?,
                        sentiment: *u.choose(&[
                            Sentiment::Positive,
                            Sentiment::Negative,
                            Sentiment::Neutral,
                        ])?,
                    })
                })
                .collect::<arbitrary::Result<_>>()?;
            let q = |u: &mut Unstructured| {
                gen_text(u, answer::MAX_QUERY_CHARS - 3).map(|t| format!("q{t}z"))
            };
            let a = IntelAnswer {
                analysis,
                summary: format!("s{}z", gen_text(u, answer::MAX_SUMMARY_CHARS - 3)?),
                queries: Queries {
                    short_term: q(u)?,
                    medium_term: q(u)?,
                    long_term: q(u)?,
                },
            };
            let text = frame(u, to_json(&serde_json::to_value(&a).expect("json")))?;
            let want = IntelAnswer {
                summary: norm(&a.summary),
                queries: Queries {
                    short_term: norm(&a.queries.short_term),
                    medium_term: norm(&a.queries.medium_term),
                    long_term: norm(&a.queries.long_term),
                },
                analysis: a.analysis.clone(),
            };
            match answer::parse_intel(&text, n) {
                Ok(got) if got == want => Ok("intel".into()),
                Ok(got) => Err(format!("parsed {got:?}, wrote {want:?}")),
                Err(e) => Err(format!("valid intel rejected: {e}\n{text}")),
            }
        }
    })
}

fn answers_roundtrip() -> Target {
    Target {
        name: "answers_roundtrip",
        seeds: (0u8..10).map(|i| vec![i; 512]).collect(),
        dict: vec![],
        max_len: 8192,
        run: Box::new(|b| {
            let mut u = Unstructured::new(b);
            match roundtrip_once(&mut u) {
                Err(_) => Outcome::Pass("short input".into()),
                Ok(Ok(sig)) => Outcome::Pass(sig),
                Ok(Err(v)) => Outcome::Violation(v),
            }
        }),
    }
}

// ---------------------------------------------------------------------------------------
// Constrained decoding: an answer checked byte by byte against a prompt's JSON Schema, the
// way an HTTP backend's answer is validated. Input: the schema's name on the first line,
// the answer after it.
// Properties: no panic; `allows` and `feed` agree; an answer the grammar accepts as complete
// is accepted by the strict parser of that answer kind (the grammar is the tighter of the
// two, except that it cannot see distinct factors).
const SCHEMAS: &[(&str, &str)] = &[
    ("P0", "strategist/P0.schema.json"),
    ("P1", "strategist/P1.schema.json"),
    ("P2", "strategist/P2.schema.json"),
    ("P3", "strategist/P3.schema.json"),
    ("P4", "strategist/P4.schema.json"),
    ("A0", "analyst/A0.schema.json"),
    ("decision", "finagent/decision.schema.json"),
    ("high_reflection", "finagent/high_reflection.schema.json"),
    ("intel", "finagent/intel.schema.json"),
    ("low_reflection", "finagent/low_reflection.schema.json"),
    ("past_intel", "finagent/past_intel.schema.json"),
];

fn example(kind: &str) -> &'static str {
    match kind {
        "A0" => FACTORS,
        "decision" => DECISION,
        "high_reflection" => HIGH,
        "intel" => INTEL,
        "low_reflection" => LOW,
        "past_intel" => PAST,
        _ => STRATEGY,
    }
}

/// Whether the strict parser of `kind` accepts `text` (Ok) or why not.
fn strict_parse(kind: &str, text: &str) -> Result<(), String> {
    let count = |key: &str| list_len(text, key).unwrap_or(0);
    let r = match kind {
        "A0" => match parse::parse_factors(text) {
            // The grammar cannot require distinct factors; the parser drops repeats.
            Err(parse::ParseError::Factors(m)) if m.contains("distinct") => Ok(()),
            r => r.map(|_| ()),
        },
        "decision" => answer::parse_decision(text).map(|_| ()),
        "high_reflection" => answer::parse_high_reflection(text, count("verdicts")).map(|_| ()),
        "intel" => answer::parse_intel(text, count("analysis")).map(|_| ()),
        "low_reflection" => answer::parse_low_reflection(text).map(|_| ()),
        "past_intel" => answer::parse_past_intel(text, count("analysis")).map(|_| ()),
        _ => parse::parse_strategy(text).map(|_| ()),
    };
    r.map_err(|e| e.to_string())
}

fn constrain() -> Target {
    let checkers: Vec<(&'static str, TextChecker)> = SCHEMAS
        .iter()
        .map(|(k, f)| {
            let c = Constraint::from_file(&root().join("prompts").join(f))
                .unwrap_or_else(|e| panic!("{f}: {e}"));
            (
                *k,
                TextChecker::new(&c).unwrap_or_else(|e| panic!("{f}: {e}")),
            )
        })
        .collect();
    let seeds = SCHEMAS
        .iter()
        .map(|(k, _)| format!("{k}\n{}", example(k)).into_bytes())
        .collect();
    let mut dict = answer_dict();
    dict.extend(SCHEMAS.iter().map(|(k, _)| format!("{k}\n").into_bytes()));
    Target {
        name: "constrain",
        seeds,
        dict,
        max_len: 4096,
        run: Box::new(move |b| {
            let (head, answer) = match b.iter().position(|&c| c == b'\n') {
                Some(i) => (&b[..i], &b[i + 1..]),
                None => (b, &b[b.len()..]),
            };
            let head = String::from_utf8_lossy(head);
            let i = checkers
                .iter()
                .position(|(k, _)| *k == head)
                .unwrap_or(head.len() % checkers.len());
            let (kind, base) = &checkers[i];
            let mut a = base.clone();
            let allowed = a.allows(answer);
            let mut f = base.clone();
            let fed = f.feed(answer);
            if allowed != fed.is_ok() {
                return Outcome::Violation(format!(
                    "{kind}: allows says {allowed}, feed says {fed:?}"
                ));
            }
            if let Err(m) = &fed {
                if m.trim().is_empty() {
                    return Outcome::Violation("feed error without a message".into());
                }
                return Outcome::Pass(format!("{kind} rejected"));
            }
            if f.consumed() != answer.len() {
                return Outcome::Violation(format!(
                    "{kind}: fed {} bytes, consumed {}",
                    answer.len(),
                    f.consumed()
                ));
            }
            if !f.is_complete() {
                return Outcome::Pass(format!("{kind} prefix"));
            }
            let Ok(text) = std::str::from_utf8(answer) else {
                return Outcome::Violation(format!("{kind}: grammar accepted invalid UTF-8"));
            };
            match strict_parse(kind, text) {
                Ok(()) => Outcome::Pass(format!("{kind} complete")),
                Err(e) => Outcome::Violation(format!(
                    "{kind}: the grammar accepts an answer the parser rejects ({e}): {text}"
                )),
            }
        }),
    }
}

// Schema files themselves, mutated: read, compiled, and checked against an example.
// Properties: no panic; a read or JSON error names the file.
fn constraint_schema() -> Target {
    let seeds = SCHEMAS
        .iter()
        .filter_map(|(_, f)| std::fs::read(root().join("prompts").join(f)).ok())
        .collect();
    let dir = scratch();
    let path = dir.path().join("fuzz-case.schema.json");
    let shown = path.display().to_string();
    Target {
        name: "constraint_schema",
        seeds,
        dict: toks(&[
            "\"type\": ",
            "\"string\"",
            "\"object\"",
            "\"array\"",
            "\"number\"",
            "\"enum\": ",
            "\"pattern\": ",
            "\"minLength\": ",
            "\"maxLength\": ",
            "\"minItems\": ",
            "\"maxItems\": ",
            "\"$ref\": \"#\"",
            "\"$ref\": \"#/properties/x\"",
            "\"anyOf\": ",
            "\"required\": ",
            "\"properties\": ",
            "\"additionalProperties\": ",
            "1000000",
            "\"(a+)+$\"",
            "\"[^\\\\n]{1,99999}\"",
            "\"x-guidance\": ",
            "{}",
            "[]",
            "true",
        ]),
        max_len: 16 * 1024,
        run: Box::new(move |b| {
            let _keep = &dir;
            if let Err(e) = std::fs::write(&path, b) {
                return Outcome::Violation(format!("writing the input: {e}"));
            }
            let c = match Constraint::from_file(&path) {
                Ok(c) => c,
                Err(e) => {
                    let m = e.to_string();
                    return if m.contains(&shown) {
                        Outcome::Pass(signature(&m.replace(&shown, "FILE")))
                    } else {
                        Outcome::Violation(format!("error does not name the file: {m}"))
                    };
                }
            };
            match TextChecker::new(&c) {
                Ok(mut t) => {
                    let _ = t.feed(STRATEGY.as_bytes());
                    Outcome::Pass(format!("compiled {}", t.is_complete()))
                }
                Err(e) => Outcome::Pass(signature(&e.to_string())),
            }
        }),
    }
}
