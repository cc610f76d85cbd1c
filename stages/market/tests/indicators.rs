//! The indicators SQL on real bars: equal to TA-Lib (fixtures written by
//! tests/fixtures/make_talib_fixtures.py), NULL during warm-up, no look-ahead, and the stage
//! itself: Parquet in/out, byte-identical reruns, typed errors on unsorted input.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::NaiveDate;
use flag_core::arrow::array::{
    ArrayRef, AsArray, Date32Array, Float64Array, RecordBatch, StringArray,
};
use flag_core::arrow::compute::concat_batches;
use flag_core::arrow::datatypes::Float64Type;
use flag_core::parquet_io::{read_parquet_file, write_parquet_file};
use flag_core::schema::schema;
use flag_core::{InputArtifact, Params, StageContext, StageError};
use flag_market::indicators::{self, IndicatorRunner, SQL_FILE};

const REL_TOL: f64 = 1e-6;
/// For values that are 0 up to rounding (a flat return, a MACD crossing).
const ABS_FLOOR: f64 = 1e-9;

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn data_dir() -> PathBuf {
    std::env::var_os("FLAG_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest().join("../../../shared/data"))
}

fn sql() -> String {
    let path = manifest().join("../..").join(SQL_FILE);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A real series: (ticker name used in the test, data file, format, fixture name).
const SERIES: [(&str, &str, Format, &str); 3] = [
    (
        "AAPL.tdqn",
        "tdqn/AAPL_2012-1-1_2018-1-1.csv",
        Format::Tdqn,
        "AAPL_tdqn_2012_2018",
    ),
    (
        "AAPL.yf",
        "stocks-2020-2023/AAPL_historical_data.csv",
        Format::Yfinance,
        "AAPL_yfinance_2020_2023",
    ),
    (
        "TSLA.tdqn",
        "tdqn/TSLA_2018-1-1_2020-1-1.csv",
        Format::Tdqn,
        "TSLA_tdqn_2018_2020",
    ),
];

#[derive(Clone, Copy)]
enum Format {
    /// Timestamp,Open,High,Low,Close,Volume
    Tdqn,
    /// Date,Close,High,Low,Open,Volume, then a row of tickers.
    Yfinance,
}

struct Bar {
    date: i32,
    open: f64,
    high: f64,
    low: f64,
    close: f64,
    volume: f64,
}

fn days(s: &str) -> i32 {
    let d = NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap_or_else(|e| panic!("{s}: {e}"));
    (d - NaiveDate::from_ymd_opt(1970, 1, 1).unwrap()).num_days() as i32
}

fn read_bars(rel: &str, format: Format) -> Vec<Bar> {
    let path = data_dir().join(rel);
    let mut rdr =
        csv::Reader::from_path(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // Column positions of open, high, low, close, volume.
    let idx = match format {
        Format::Tdqn => [1, 2, 3, 4, 5],
        Format::Yfinance => [4, 2, 3, 1, 5],
    };
    let mut out = Vec::new();
    for (i, rec) in rdr.records().enumerate() {
        let rec = rec.unwrap();
        if matches!(format, Format::Yfinance) && i == 0 {
            continue; // the ticker row
        }
        let f = |k: usize| -> f64 {
            rec[idx[k]]
                .parse()
                .unwrap_or_else(|e| panic!("{rel} row {i}: {e}"))
        };
        out.push(Bar {
            date: days(&rec[0]),
            open: f(0),
            high: f(1),
            low: f(2),
            close: f(3),
            volume: f(4),
        });
    }
    assert!(out.len() > 400, "{rel}: only {} rows", out.len());
    out
}

/// One ohlcv batch holding several tickers (given in ticker order).
fn bars_batch(series: &[(&str, &[Bar])]) -> RecordBatch {
    let mut t = Vec::new();
    let mut cols: [Vec<f64>; 5] = Default::default();
    let mut d = Vec::new();
    for (ticker, bars) in series {
        for b in *bars {
            t.push(*ticker);
            d.push(b.date);
            for (c, v) in cols
                .iter_mut()
                .zip([b.open, b.high, b.low, b.close, b.volume])
            {
                c.push(v);
            }
        }
    }
    let n = t.len();
    let mut arrays: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(t)),
        Arc::new(Date32Array::from(d)),
    ];
    for c in cols {
        arrays.push(Arc::new(Float64Array::from(c)));
    }
    arrays.push(Arc::new(Float64Array::from(vec![None::<f64>; n])));
    schema("ohlcv").unwrap().batch(arrays).unwrap()
}

/// Fixture: header, then per row the date, the close and the expected columns (empty = NULL).
struct Fixture {
    columns: Vec<String>,
    dates: Vec<i32>,
    close: Vec<f64>,
    values: Vec<Vec<Option<f64>>>,
}

fn read_fixture(name: &str) -> Fixture {
    let path = manifest().join(format!("tests/fixtures/indicators_{name}.csv"));
    let mut rdr =
        csv::Reader::from_path(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let header: Vec<String> = rdr.headers().unwrap().iter().map(String::from).collect();
    assert_eq!(&header[..2], ["date", "close"]);
    let columns = header[2..].to_vec();
    let mut fx = Fixture {
        values: vec![Vec::new(); columns.len()],
        columns,
        dates: Vec::new(),
        close: Vec::new(),
    };
    for rec in rdr.records() {
        let rec = rec.unwrap();
        fx.dates.push(days(&rec[0]));
        fx.close.push(rec[1].parse().unwrap());
        for (j, col) in fx.values.iter_mut().enumerate() {
            let s = &rec[j + 2];
            col.push(if s.is_empty() {
                None
            } else {
                Some(s.parse().unwrap())
            });
        }
    }
    fx
}

fn column(batch: &RecordBatch, name: &str) -> Vec<Option<f64>> {
    let idx = batch
        .schema()
        .index_of(name)
        .unwrap_or_else(|_| panic!("no column {name}"));
    batch
        .column(idx)
        .as_primitive::<Float64Type>()
        .iter()
        .collect()
}

fn tickers(batch: &RecordBatch) -> Vec<String> {
    let t = batch.column(0).as_string::<i32>();
    (0..batch.num_rows())
        .map(|i| t.value(i).to_string())
        .collect()
}

/// The rows of `ticker` in `batch` (they are contiguous: the output is sorted).
fn rows_of(batch: &RecordBatch, ticker: &str) -> RecordBatch {
    let t = tickers(batch);
    let start = t.iter().position(|x| x == ticker).unwrap();
    let len = t.iter().filter(|x| *x == ticker).count();
    batch.slice(start, len)
}

fn close_enough(want: f64, got: f64) -> bool {
    (want - got).abs() <= REL_TOL * want.abs().max(got.abs()) + ABS_FLOOR
}

#[test]
fn indicators_match_talib_on_real_bars() {
    let loaded: Vec<Vec<Bar>> = SERIES
        .iter()
        .map(|(_, rel, f, _)| read_bars(rel, *f))
        .collect();
    let input: Vec<(&str, &[Bar])> = SERIES
        .iter()
        .zip(&loaded)
        .map(|(s, b)| (s.0, b.as_slice()))
        .collect();
    let runner = IndicatorRunner::new(&sql()).unwrap();
    let out = runner.run_batch(bars_batch(&input)).unwrap();
    assert_eq!(out.schema(), schema("indicators").unwrap().arrow());
    assert_eq!(out.num_rows(), loaded.iter().map(Vec::len).sum::<usize>());

    let mut failures = Vec::new();
    let mut compared = 0usize;
    for ((ticker, _, _, fixture), bars) in SERIES.iter().zip(&loaded) {
        let fx = read_fixture(fixture);
        let got = rows_of(&out, ticker);
        // The fixture was made from these very rows.
        assert_eq!(
            fx.dates,
            bars.iter().map(|b| b.date).collect::<Vec<_>>(),
            "{ticker}: dates"
        );
        for (want, b) in fx.close.iter().zip(bars) {
            assert!(
                close_enough(*want, b.close),
                "{ticker}: close {want} vs {}",
                b.close
            );
        }
        let schema_cols: Vec<String> = schema("indicators").unwrap().columns[8..]
            .iter()
            .map(|c| c.name.clone())
            .collect();
        assert_eq!(
            fx.columns, schema_cols,
            "the fixture must cover every indicator column"
        );
        for (name, want) in fx.columns.iter().zip(&fx.values) {
            let got = column(&got, name);
            assert!(
                want.iter().any(Option::is_some),
                "{ticker}.{name}: fixture has no values"
            );
            for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                let ok = match (w, g) {
                    (None, None) => true,
                    (Some(w), Some(g)) => {
                        compared += 1;
                        close_enough(*w, *g)
                    }
                    _ => false,
                };
                if !ok {
                    failures.push(format!(
                        "{ticker}.{name} row {}: TA-Lib {w:?}, SQL {g:?}",
                        i + 1
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches, first: {:#?}",
        failures.len(),
        &failures[..failures.len().min(15)]
    );
    assert!(compared > 100_000, "only {compared} values compared");
}

/// Exactly the warm-up lengths documented in schemas/indicators.yaml.
#[test]
fn warm_up_rows_are_null_then_values_start() {
    let bars = read_bars(SERIES[0].1, SERIES[0].2);
    let runner = IndicatorRunner::new(&sql()).unwrap();
    let out = runner.run_batch(bars_batch(&[("AAPL", &bars)])).unwrap();
    let expect = [
        ("sma_20", 19),
        ("sma_50", 49),
        ("sma_100", 99),
        ("sma_200", 199),
        ("ema_12", 11),
        ("ema_26", 25),
        ("rsi_14", 14),
        ("macd", 33),
        ("macd_signal", 33),
        ("macd_hist", 33),
        ("atr_14", 14),
        ("bb_upper", 19),
        ("bb_middle", 19),
        ("bb_lower", 19),
        ("kdj_k", 16),
        ("kdj_d", 16),
        ("kdj_j", 16),
        ("zscore_20", 19),
        ("vwap_20", 19),
        ("ret_1d", 1),
        ("ret_5d", 5),
        ("ret_20d", 20),
        ("vol_20", 20),
        ("sma_20_slope", 20),
        ("sma_50_slope", 50),
        ("sma_200_slope", 200),
        ("ema_12_slope", 12),
        ("ema_26_slope", 26),
        ("rsi_14_slope", 15),
        ("macd_slope", 34),
        ("macd_hist_slope", 34),
        ("kdj_k_slope", 17),
        ("rsi_14_z", 33),
        ("macd_z", 52),
        ("macd_hist_z", 52),
        ("atr_14_z", 33),
        ("kdj_j_z", 35),
        ("vol_20_z", 39),
        ("volume_z", 19),
    ];
    assert_eq!(
        expect.len(),
        schema("indicators").unwrap().columns.len() - 8
    );
    for (name, warm) in expect {
        let v = column(&out, name);
        assert!(
            v[..warm].iter().all(Option::is_none),
            "{name}: a value during warm-up"
        );
        assert!(
            v[warm..].iter().all(Option::is_some),
            "{name}: a NULL after warm-up"
        );
    }
}

/// The SQL is planned once per runner and re-run on every group, and that plan neither sorts
/// nor repartitions: the input is declared sorted by (ticker, date) and runs as one partition.
#[test]
fn the_plan_has_no_sort_or_repartition() {
    let runner = IndicatorRunner::new(&sql()).unwrap();
    let plan = runner.plan_text();
    assert!(plan.contains("WindowAggExec"), "{plan}");
    for op in ["SortExec", "RepartitionExec", "CoalescePartitionsExec"] {
        assert!(!plan.contains(op), "{op} in the plan:\n{plan}");
    }
}

/// Indicators at day t computed from bars up to t equal those computed from the full series.
#[test]
fn no_look_ahead() {
    let a = read_bars(SERIES[0].1, SERIES[0].2);
    let t = read_bars(SERIES[2].1, SERIES[2].2);
    let runner = IndicatorRunner::new(&sql()).unwrap();
    let full = runner
        .run_batch(bars_batch(&[("A", &a), ("T", &t)]))
        .unwrap();
    let names: Vec<&str> = schema("indicators")
        .unwrap()
        .columns
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    for cut in [0, 13, 33, 60, 199, 200, 450, 1000, a.len() - 2] {
        // Truncate A at `cut`; T is kept whole, so a leak across tickers would show too.
        let short = runner
            .run_batch(bars_batch(&[("A", &a[..=cut]), ("T", &t)]))
            .unwrap();
        assert_eq!(short.num_rows(), cut + 1 + t.len());
        let (fa, sa) = (rows_of(&full, "A"), rows_of(&short, "A"));
        for name in &names[2..] {
            let (f, s) = (column(&fa, name), column(&sa, name));
            assert_eq!(
                f[cut].map(f64::to_bits),
                s[cut].map(f64::to_bits),
                "{name} at row {}: full {:?}, truncated {:?}",
                cut + 1,
                f[cut],
                s[cut]
            );
        }
        let (ft, st) = (rows_of(&full, "T"), rows_of(&short, "T"));
        for name in &names[2..] {
            assert_eq!(column(&ft, name), column(&st, name), "T.{name} changed");
        }
    }
}

fn stage_ctx(input: &Path, staging: &Path, chunk_rows: usize) -> StageContext {
    let stage = indicators::runners().pop().unwrap();
    let mut inputs = BTreeMap::new();
    inputs.insert(
        "bars".to_string(),
        vec![InputArtifact {
            reference: "ingest.bars".into(),
            files: vec![input.to_path_buf()],
            schema: Some("ohlcv"),
        }],
    );
    let mut resources = BTreeMap::new();
    for f in stage.fingerprint(&Params::default()).files {
        let bytes = std::fs::read(manifest().join("../..").join(&f)).unwrap();
        resources.insert(f, bytes);
    }
    let params = Params::new(BTreeMap::from([(
        "chunk_rows".to_string(),
        serde_json::json!(chunk_rows),
    )]));
    std::fs::create_dir_all(staging).unwrap();
    StageContext::new(
        "indicators",
        params,
        inputs,
        stage.spec().outputs,
        staging.to_path_buf(),
        resources,
        None,
        None,
    )
}

fn run_stage(input: &Path, staging: &Path, chunk_rows: usize) -> Result<PathBuf, StageError> {
    let stage = indicators::runners().pop().unwrap();
    assert_eq!(stage.kind(), "indicators");
    let mut ctx = stage_ctx(input, staging, chunk_rows);
    stage.run(&mut ctx)?;
    ctx.output_file("table")
}

fn all_bars() -> RecordBatch {
    let loaded: Vec<Vec<Bar>> = SERIES
        .iter()
        .map(|(_, rel, f, _)| read_bars(rel, *f))
        .collect();
    let input: Vec<(&str, &[Bar])> = SERIES
        .iter()
        .zip(&loaded)
        .map(|(s, b)| (s.0, b.as_slice()))
        .collect();
    bars_batch(&input)
}

#[test]
fn stage_writes_parquet_deterministically_whatever_the_grouping() {
    let dir = tempfile::tempdir().unwrap();
    let bars = all_bars();
    let input = dir.path().join("bars.parquet");
    // Several input batches, so grouping has batch edges to cross.
    let parts: Vec<RecordBatch> = (0..bars.num_rows())
        .step_by(700)
        .map(|s| bars.slice(s, 700.min(bars.num_rows() - s)))
        .collect();
    write_parquet_file(&input, bars.schema(), &parts).unwrap();

    let one = run_stage(&input, &dir.path().join("a"), 1_000_000).unwrap();
    let again = run_stage(&input, &dir.path().join("b"), 1_000_000).unwrap();
    assert_eq!(
        std::fs::read(&one).unwrap(),
        std::fs::read(&again).unwrap(),
        "reruns must give identical bytes"
    );
    // Groups of one ticker each (cut at the first ticker change after 10 rows).
    let small = run_stage(&input, &dir.path().join("c"), 10).unwrap();

    let (s1, b1) = read_parquet_file(&one).unwrap();
    let (s2, b2) = read_parquet_file(&small).unwrap();
    schema("indicators").unwrap().check(&s1, "output").unwrap();
    let (b1, b2) = (
        concat_batches(&s1, &b1).unwrap(),
        concat_batches(&s2, &b2).unwrap(),
    );
    let expected = IndicatorRunner::new(&sql())
        .unwrap()
        .run_batch(bars.clone())
        .unwrap();
    assert_eq!(b1.columns(), expected.columns());
    assert_eq!(
        b2.columns(),
        expected.columns(),
        "grouping must not change values"
    );
    let t = tickers(&b1);
    assert!(t.windows(2).all(|w| w[0] <= w[1]), "sorted by ticker");
}

#[test]
fn unsorted_or_repeated_bars_are_rejected_with_file_row_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let bars = all_bars();
    // Swap the first two tickers' order: "AAPL.yf" rows come before "AAPL.tdqn" rows.
    let first = rows_of(&bars, "AAPL.tdqn");
    let second = rows_of(&bars, "AAPL.yf");
    let input = dir.path().join("unsorted.parquet");
    write_parquet_file(&input, bars.schema(), &[second.clone(), first.clone()]).unwrap();
    let err = run_stage(&input, &dir.path().join("x"), 1000)
        .unwrap_err()
        .to_string();
    let row = second.num_rows() + 1;
    assert!(
        err.contains(&format!("unsorted.parquet:{row}: column 'ticker'")),
        "{err}"
    );
    assert!(err.contains("'AAPL.tdqn' after 'AAPL.yf'"), "{err}");

    // A repeated day inside a ticker.
    let dup = dir.path().join("dup.parquet");
    write_parquet_file(
        &dup,
        bars.schema(),
        &[first.slice(0, 10), first.slice(9, 5)],
    )
    .unwrap();
    let err = run_stage(&dup, &dir.path().join("y"), 1000)
        .unwrap_err()
        .to_string();
    assert!(err.contains("dup.parquet:11: column 'date'"), "{err}");
    assert!(err.contains("repeats"), "{err}");
}

#[test]
fn fingerprint_names_the_sql_file_and_the_sql_is_what_runs() {
    let stage = indicators::runners().pop().unwrap();
    let fp = stage.fingerprint(&Params::default());
    assert_eq!(fp.files, vec![SQL_FILE.to_string()]);
    // A context without the SQL resource cannot run: the stage reads the SQL only from there.
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("bars.parquet");
    let bars = all_bars();
    write_parquet_file(&input, bars.schema(), &[bars]).unwrap();
    let mut ctx = StageContext::new(
        "indicators",
        Params::new(BTreeMap::from([(
            "chunk_rows".to_string(),
            serde_json::json!(1000),
        )])),
        BTreeMap::new(),
        stage.spec().outputs,
        dir.path().to_path_buf(),
        BTreeMap::new(),
        None,
        None,
    );
    let err = stage.run(&mut ctx).unwrap_err().to_string();
    assert!(err.contains(SQL_FILE), "{err}");
}

#[test]
fn a_non_finite_price_is_refused_by_the_writer_not_stored() {
    // Ingest refuses such prices; a bars table written by anything else reaches the stage
    // with them, and the indicators table's finite columns must not store them.
    let dir = tempfile::tempdir().unwrap();
    let bars = all_bars();
    let idx = bars.schema().index_of("close").unwrap();
    let mut close = column(&bars, "close");
    close[5] = Some(f64::INFINITY);
    let mut cols = bars.columns().to_vec();
    cols[idx] = Arc::new(Float64Array::from(close));
    let bad = RecordBatch::try_new(bars.schema(), cols).unwrap();
    let input = dir.path().join("inf.parquet");
    write_parquet_file(&input, bad.schema(), &[bad]).unwrap();
    let staging = dir.path().join("x");
    let err = run_stage(&input, &staging, 1000).unwrap_err().to_string();
    assert!(
        err.contains("output 'table': column 'close' row 6")
            && err.contains("says the column is finite"),
        "{err}"
    );
}

/// `bars` with the given columns nulled at the given 0-based rows (all rows: `None`).
fn with_nulls(bars: &RecordBatch, nulls: &[(&str, Option<usize>)]) -> RecordBatch {
    let mut cols = bars.columns().to_vec();
    for (name, row) in nulls {
        let idx = bars.schema().index_of(name).unwrap();
        let mut v = column(bars, name);
        match row {
            Some(r) => v[*r] = None,
            None => v.iter_mut().for_each(|x| *x = None),
        }
        cols[idx] = Arc::new(Float64Array::from(v));
    }
    schema("ohlcv").unwrap().batch(cols).unwrap()
}

/// Close-only bars (schema `ohlcv` allows null open/high/low/volume) cannot feed the
/// indicators: a clear error before the SQL runs, never a panic or a guessed value.
#[test]
fn null_price_or_volume_is_rejected_with_file_row_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let bars = rows_of(&all_bars(), "AAPL.tdqn").slice(0, 40);
    let day = |i: usize| {
        bars.column(1)
            .as_primitive::<flag_core::arrow::datatypes::Date32Type>()
            .value_as_date(i)
            .unwrap()
    };
    let need = "is null; the indicators need open, high, low, close and volume \
                (a close-only source such as investorbench cannot feed this stage)";

    let one = with_nulls(&bars, &[("high", Some(11))]);
    let input = dir.path().join("nulls.parquet");
    write_parquet_file(&input, one.schema(), &[one.slice(0, 7), one.slice(7, 33)]).unwrap();
    let err = run_stage(&input, &dir.path().join("x"), 1000)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "{}:12: column 'high': AAPL.tdqn on {} {need}",
            input.display(),
            day(11)
        )
    );
    let err = IndicatorRunner::new(&sql())
        .unwrap()
        .run_batch(one)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!("indicators input row 12: column 'high' {need}")
    );

    // Close only, as ingest_ohlcv writes investorbench bars: the first null is row 1's open.
    let close_only = with_nulls(
        &bars,
        &[
            ("open", None),
            ("high", None),
            ("low", None),
            ("volume", None),
        ],
    );
    let input = dir.path().join("close_only.parquet");
    write_parquet_file(&input, close_only.schema(), &[close_only]).unwrap();
    let err = run_stage(&input, &dir.path().join("y"), 1000)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "{}:1: column 'open': AAPL.tdqn on {} {need}",
            input.display(),
            day(0)
        )
    );
    // A null volume alone.
    let vol = with_nulls(&bars, &[("volume", Some(39))]);
    let err = IndicatorRunner::new(&sql())
        .unwrap()
        .run_batch(vol)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!("indicators input row 40: column 'volume' {need}")
    );
}
