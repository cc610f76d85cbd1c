//! Runs real stages on real data the way the engine does: defaults filled from the spec,
//! fingerprinted files read from the repository root, outputs in a staging directory.
#![allow(dead_code)]
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use chrono::NaiveDate;
use flag_core::arrow::array::{
    ArrayRef, Date32Array, Float64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use flag_core::parquet_io::read_parquet_file;
use flag_core::{InputArtifact, OutputKind, Params, Stage, StageContext};
use serde_json::Value;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn data_dir() -> PathBuf {
    std::env::var_os("FLAG_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"))
}

/// Spec defaults overlaid with `given`.
pub fn params(stage: &dyn Stage, given: Value) -> Params {
    let mut map = BTreeMap::new();
    for p in stage.spec().params {
        if let Some(d) = p.default {
            map.insert(p.name.to_string(), d);
        }
    }
    if let Value::Object(o) = given {
        map.extend(o);
    }
    Params::new(map)
}

/// Runs `stage` into `dir` (created) and returns the directory. `inputs`: name -> files.
pub fn run(
    stage: &dyn flag_core::RunStage,
    given: Value,
    inputs: &[(&str, PathBuf)],
    dir: &Path,
) -> flag_core::StageResult<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    let params = params(stage, given);
    let spec = stage.spec();
    let mut resources = BTreeMap::new();
    for f in stage.fingerprint(&params).files {
        let bytes = std::fs::read(repo().join(&f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        resources.insert(f, bytes);
    }
    let mut bound = BTreeMap::new();
    for (name, file) in inputs {
        let schema = spec
            .inputs
            .iter()
            .find(|i| i.name == *name)
            .unwrap_or_else(|| panic!("no input {name}"))
            .schema;
        bound.insert(
            name.to_string(),
            vec![InputArtifact {
                reference: format!("test.{name}"),
                files: vec![file.clone()],
                schema,
            }],
        );
    }
    let mut ctx = StageContext::new(
        stage.kind(),
        params,
        bound,
        spec.outputs,
        dir.to_path_buf(),
        resources,
        None,
        None,
    );
    stage.run(&mut ctx)?;
    Ok(dir.to_path_buf())
}

pub fn output(dir: &Path, stage: &dyn Stage, name: &str) -> PathBuf {
    let spec = stage.spec();
    let o = spec.outputs.iter().find(|o| o.name == name).unwrap();
    assert!(matches!(o.kind, OutputKind::Parquet { .. }));
    dir.join(format!("{name}.parquet"))
}

pub fn read(path: &Path) -> RecordBatch {
    let (schema, batches) = read_parquet_file(path).unwrap();
    flag_core::arrow::compute::concat_batches(&schema, &batches).unwrap()
}

/// Real tables from /work/shared/data: bars of `tickers` from stocks-2020-2023 with the
/// indicator columns the strategist reads (SMAs, RSI and returns computed here; the others
/// null, shown as "n/a"), and stocknewsapi news for `news_tickers` between two trading dates.
pub struct Slice {
    pub table: PathBuf,
    pub news: Option<PathBuf>,
}

fn days(d: NaiveDate) -> i32 {
    flag_trading::series::to_days(d)
}

/// (dates, closes) of one yfinance export (Date,Close,High,Low,Open,Volume, a ticker row).
fn read_closes(ticker: &str) -> (Vec<i32>, Vec<f64>) {
    let path = data_dir().join(format!("stocks-2020-2023/{ticker}_historical_data.csv"));
    let mut rdr =
        csv::Reader::from_path(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (mut dates, mut closes) = (Vec::new(), Vec::new());
    for rec in rdr.records().skip(1) {
        let rec = rec.unwrap();
        dates.push(days(
            NaiveDate::parse_from_str(&rec[0], "%Y-%m-%d").unwrap(),
        ));
        closes.push(rec[1].parse::<f64>().unwrap());
    }
    (dates, closes)
}

fn sma(c: &[f64], n: usize) -> Vec<Option<f64>> {
    (0..c.len())
        .map(|i| (i + 1 >= n).then(|| c[i + 1 - n..=i].iter().sum::<f64>() / n as f64))
        .collect()
}

fn ret(c: &[f64], n: usize) -> Vec<Option<f64>> {
    (0..c.len())
        .map(|i| (i >= n).then(|| c[i] / c[i - n] - 1.0))
        .collect()
}

/// Wilder RSI(14) seeded with the mean of the first 14 changes.
fn rsi(c: &[f64]) -> Vec<Option<f64>> {
    let mut out = vec![None; c.len()];
    let (mut g, mut l) = (0.0, 0.0);
    for i in 1..c.len() {
        let d = c[i] - c[i - 1];
        let (up, down) = (d.max(0.0), (-d).max(0.0));
        if i <= 14 {
            g += up / 14.0;
            l += down / 14.0;
        } else {
            g = (g * 13.0 + up) / 14.0;
            l = (l * 13.0 + down) / 14.0;
        }
        if i >= 14 {
            out[i] = Some(if l == 0.0 {
                100.0
            } else {
                100.0 - 100.0 / (1.0 + g / l)
            });
        }
    }
    out
}

fn write(path: &Path, batch: RecordBatch) {
    flag_core::parquet_io::write_parquet_file(path, batch.schema(), &[batch]).unwrap();
}

pub fn slice(root: &Path, tickers: &[&str], news: Option<(&[&str], &str, &str)>) -> Slice {
    std::fs::create_dir_all(root).unwrap();
    let mut cols: Vec<(String, ArrayRef)> = Vec::new();
    let (mut t, mut d, mut c) = (Vec::new(), Vec::new(), Vec::new());
    let mut ind: BTreeMap<&str, Vec<Option<f64>>> = BTreeMap::new();
    let mut calendars = BTreeMap::new();
    for &tk in tickers {
        let (dates, closes) = read_closes(tk);
        let computed: BTreeMap<&str, Vec<Option<f64>>> = [
            ("sma_20", sma(&closes, 20)),
            ("sma_50", sma(&closes, 50)),
            ("sma_200", sma(&closes, 200)),
            ("rsi_14", rsi(&closes)),
            ("ret_1d", ret(&closes, 1)),
            ("ret_5d", ret(&closes, 5)),
            ("ret_20d", ret(&closes, 20)),
        ]
        .into_iter()
        .collect();
        for &name in flag_agents::strategist::blocks::COLUMNS {
            let v = computed
                .get(name)
                .cloned()
                .unwrap_or_else(|| vec![None; closes.len()]);
            ind.entry(name).or_default().extend(v);
        }
        t.extend(std::iter::repeat_n(tk.to_string(), dates.len()));
        d.extend(dates.iter().copied());
        c.extend(closes);
        calendars.insert(tk.to_string(), dates);
    }
    cols.push(("ticker".into(), Arc::new(StringArray::from(t))));
    cols.push(("date".into(), Arc::new(Date32Array::from(d))));
    cols.push(("close".into(), Arc::new(Float64Array::from(c))));
    for (name, v) in ind {
        cols.push((name.to_string(), Arc::new(Float64Array::from(v))));
    }
    let table = root.join("table.parquet");
    write(&table, RecordBatch::try_from_iter(cols).unwrap());
    let news = news.map(|(nt, start, end)| {
        let path = root.join("news.parquet");
        let (s, e) = (
            days(NaiveDate::parse_from_str(start, "%Y-%m-%d").unwrap()),
            days(NaiveDate::parse_from_str(end, "%Y-%m-%d").unwrap()),
        );
        write(&path, news_batch(nt, &calendars, s, e));
        path
    });
    Slice { table, news }
}

/// stocknewsapi items -> `news` rows. Trading date as the ingest stage defines it: published
/// at or before 16:00 New York time on a trading day -> that day, else the next trading day
/// (the vendor's offset is New York's).
/// One news item as the news schema's columns, in order.
type NewsRow = (String, i64, i32, String, String, String, String, String);

fn news_batch(
    tickers: &[&str],
    calendars: &BTreeMap<String, Vec<i32>>,
    start: i32,
    end: i32,
) -> RecordBatch {
    let mut rows: Vec<NewsRow> = Vec::new();
    for &tk in tickers {
        let cal = &calendars[tk];
        let dir = data_dir().join("news/stocknewsapi");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(&format!("{tk}_news_"))
            })
            .collect();
        files.sort();
        for f in files {
            let mut rdr = csv::Reader::from_path(&f).unwrap();
            for rec in rdr.records() {
                let rec = rec.unwrap();
                let at = chrono::DateTime::parse_from_rfc2822(&rec[5]).unwrap();
                let local = at.naive_local();
                let mut day = days(local.date());
                if local.time() > chrono::NaiveTime::from_hms_opt(16, 0, 0).unwrap() {
                    day += 1;
                }
                let k = cal.partition_point(|&x| x < day);
                let Some(&td) = cal.get(k) else { continue };
                if td < start || td > end {
                    continue;
                }
                rows.push((
                    tk.into(),
                    at.timestamp_micros(),
                    td,
                    rec[2].into(),
                    rec[3].into(),
                    rec[4].into(),
                    rec[7].into(),
                    rec[0].into(),
                ));
            }
        }
    }
    rows.sort_by(|a, b| (&a.0, a.1, &a.3, &a.7).cmp(&(&b.0, b.1, &b.3, &b.7)));
    rows.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1 && (a.3 == b.3 || a.7 == b.7));
    let n = rows.len();
    flag_core::schema::schema("news")
        .unwrap()
        .batch(vec![
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.0.as_str()),
            )),
            Arc::new(
                TimestampMicrosecondArray::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())
                    .with_timezone("UTC"),
            ),
            Arc::new(Date32Array::from(
                rows.iter().map(|r| r.2).collect::<Vec<_>>(),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.3.as_str()),
            )),
            Arc::new(StringArray::from(
                rows.iter().map(|r| Some(r.4.as_str())).collect::<Vec<_>>(),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.5.as_str()),
            )),
            Arc::new(StringArray::from(
                rows.iter().map(|r| Some(r.6.as_str())).collect::<Vec<_>>(),
            )),
            Arc::new(Float64Array::from(vec![None; n])),
            Arc::new(StringArray::from(
                rows.iter().map(|r| Some(r.7.as_str())).collect::<Vec<_>>(),
            )),
            Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
                "stocknewsapi",
                n,
            ))),
        ])
        .unwrap()
}
