//! The `baselines` and `metrics` stages on real AAPL data (TDQN benchmark files), driven
//! through `StageContext` exactly as the engine drives them.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flag_core::arrow::array::{
    Array, ArrayRef, BooleanArray, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray,
};
use flag_core::arrow::datatypes::{Field, Schema};
use flag_core::parquet_io::{read_parquet_file, write_parquet_file};
use flag_core::{InputArtifact, Params, Stage, StageContext};
use flag_trading::stages::baselines::Baselines;
use flag_trading::stages::metrics::MetricsStage;
use serde_json::{Value, json};

fn data_dir() -> PathBuf {
    std::env::var_os("FLAG_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"))
}

/// (date as date32 days, close) of AAPL, train file then test file.
fn aapl() -> Vec<(i32, f64)> {
    let epoch = chrono::NaiveDate::default();
    let mut rows = Vec::new();
    for f in ["AAPL_2012-1-1_2018-1-1.csv", "AAPL_2018-1-1_2020-1-1.csv"] {
        let text = std::fs::read_to_string(data_dir().join("tdqn").join(f)).unwrap();
        for line in text.lines().skip(1) {
            let cells: Vec<&str> = line.split(',').collect();
            let d = chrono::NaiveDate::parse_from_str(cells[0], "%Y-%m-%d").unwrap();
            rows.push((
                (d - epoch).num_days() as i32,
                cells[4].parse::<f64>().unwrap(),
            ));
        }
    }
    rows
}

fn ema(xs: &[f64], n: usize) -> Vec<f64> {
    let a = 2.0 / (n as f64 + 1.0);
    let mut out = Vec::with_capacity(xs.len());
    for (i, &x) in xs.iter().enumerate() {
        out.push(if i == 0 {
            x
        } else {
            a * x + (1.0 - a) * out[i - 1]
        });
    }
    out
}

/// An indicators-like table: MACD and z-score computed here (causal), the other indicator
/// columns the strategies read are NULL (those strategies then never trade).
fn indicators_batch(rows: &[(i32, f64)]) -> RecordBatch {
    let close: Vec<f64> = rows.iter().map(|r| r.1).collect();
    let macd: Vec<f64> = ema(&close, 12)
        .iter()
        .zip(ema(&close, 26))
        .map(|(a, b)| a - b)
        .collect();
    let signal = ema(&macd, 9);
    let z: Vec<Option<f64>> = (0..close.len())
        .map(|i| {
            (i >= 19).then(|| {
                let w = &close[i - 19..=i];
                let m = w.iter().sum::<f64>() / 20.0;
                let sd = (w.iter().map(|x| (x - m).powi(2)).sum::<f64>() / 20.0).sqrt();
                (close[i] - m) / sd
            })
        })
        .collect();
    let n = rows.len();
    let null = || -> ArrayRef { Arc::new(Float64Array::from(vec![None::<f64>; n])) };
    let f = |v: Vec<f64>| -> ArrayRef { Arc::new(Float64Array::from(v)) };
    let cols: Vec<(&str, ArrayRef)> = vec![
        (
            "ticker",
            Arc::new(StringArray::from(vec!["AAPL"; n])) as ArrayRef,
        ),
        (
            "date",
            Arc::new(Date32Array::from(
                rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            )) as ArrayRef,
        ),
        ("close", f(close.clone())),
        ("macd", f(macd)),
        ("macd_signal", f(signal)),
        ("zscore_20", Arc::new(Float64Array::from(z)) as ArrayRef),
        ("rsi_14", null()),
        ("kdj_k", null()),
        ("kdj_d", null()),
        ("bb_lower", null()),
        ("bb_upper", null()),
    ];
    let schema = Schema::new(
        cols.iter()
            .map(|(name, a)| {
                Field::new(
                    *name,
                    a.data_type().clone(),
                    *name != "ticker" && *name != "date",
                )
            })
            .collect::<Vec<_>>(),
    );
    RecordBatch::try_new(Arc::new(schema), cols.into_iter().map(|c| c.1).collect()).unwrap()
}

fn params(stage: &dyn Stage, set: Value) -> Params {
    let mut map: BTreeMap<String, Value> = stage
        .spec()
        .params
        .iter()
        .filter_map(|p| p.default.clone().map(|d| (p.name.to_string(), d)))
        .collect();
    for (k, v) in set.as_object().unwrap() {
        map.insert(k.clone(), v.clone());
    }
    Params::new(map)
}

fn artifact(reference: &str, file: PathBuf, schema: Option<&'static str>) -> InputArtifact {
    InputArtifact {
        reference: reference.into(),
        files: vec![file],
        schema,
    }
}

/// Runs `stage` and returns its staging directory.
fn run(
    stage: &dyn flag_core::RunStage,
    p: Params,
    inputs: Vec<(&str, Vec<InputArtifact>)>,
    dir: &Path,
) -> PathBuf {
    let staging = dir.join(format!("out-{}", stage.kind()));
    std::fs::create_dir_all(&staging).unwrap();
    let inputs = inputs
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let mut ctx = StageContext::new(
        stage.kind(),
        p,
        inputs,
        stage.spec().outputs,
        staging.clone(),
        BTreeMap::new(),
        None,
        None,
    );
    stage.run(&mut ctx).unwrap();
    staging
}

fn read(path: PathBuf) -> RecordBatch {
    let (schema, batches) = read_parquet_file(&path).unwrap();
    flag_core::arrow::compute::concat_batches(&schema, &batches).unwrap()
}

fn s<'a>(b: &'a RecordBatch, name: &str) -> &'a StringArray {
    b.column_by_name(name)
        .unwrap()
        .as_any()
        .downcast_ref()
        .unwrap()
}
fn f<'a>(b: &'a RecordBatch, name: &str) -> &'a Float64Array {
    b.column_by_name(name)
        .unwrap()
        .as_any()
        .downcast_ref()
        .unwrap()
}
fn d<'a>(b: &'a RecordBatch, name: &str) -> &'a Date32Array {
    b.column_by_name(name)
        .unwrap()
        .as_any()
        .downcast_ref()
        .unwrap()
}
fn i64c<'a>(b: &'a RecordBatch, name: &str) -> &'a Int64Array {
    b.column_by_name(name)
        .unwrap()
        .as_any()
        .downcast_ref()
        .unwrap()
}

/// Rows of `b` (a table keyed by strategy/split) for one strategy and split.
fn rows_of(b: &RecordBatch, strategy: &str, split: &str) -> Vec<usize> {
    (0..b.num_rows())
        .filter(|&i| s(b, "strategy").value(i) == strategy && s(b, "split").value(i) == split)
        .collect()
}

const SPLITS: &str = r#"{"train_start": "2012-01-01", "train_end": "2017-12-31",
                          "test_start": "2018-01-01", "test_end": "2019-12-31"}"#;

fn baseline_params(env: &str) -> Params {
    let mut v: Value = serde_json::from_str(SPLITS).unwrap();
    v["env"] = json!(env);
    params(&Baselines, v)
}

fn write_table(dir: &Path, rows: &[(i32, f64)], name: &str) -> PathBuf {
    let batch = indicators_batch(rows);
    let path = dir.join(name);
    write_parquet_file(&path, batch.schema(), &[batch]).unwrap();
    path
}

#[test]
fn tdqn_baselines_on_aapl() {
    let dir = tempfile::tempdir().unwrap();
    let rows = aapl();
    let table = write_table(dir.path(), &rows, "indicators.parquet");
    let out = run(
        &Baselines,
        baseline_params("tdqn"),
        vec![(
            "table",
            vec![artifact("indicators.table", table.clone(), None)],
        )],
        dir.path(),
    );
    let eq = read(out.join("equity.parquet"));
    let trades = read(out.join("trades.parquet"));

    // Every strategy has 1,509 train and 503 test days; rows are sorted by
    // (strategy, env, ticker, split, date).
    assert_eq!(eq.num_rows(), 8 * (1509 + 503));
    let key = |i: usize| {
        (
            s(&eq, "strategy").value(i),
            s(&eq, "split").value(i),
            d(&eq, "date").value(i),
        )
    };
    assert!((1..eq.num_rows()).all(|i| key(i - 1) < key(i)));

    // Buy&Hold on the test split: n = floor(100000 / (p0 * 1.001)) shares bought on the
    // first day, then value = cash + n * price: the price path net of one cost.
    let bh = rows_of(&eq, "buy_and_hold", "test");
    let price = |i: usize| f(&eq, "price").value(i);
    let value = |i: usize| f(&eq, "value").value(i);
    let p0 = price(bh[0]);
    assert_eq!(p0, 41.513580322265625); // AAPL close 2018-01-02
    let n = (100_000.0 / (p0 * 1.001)).floor();
    let cash = 100_000.0 - n * p0 * 1.001;
    for &i in &bh {
        assert!((value(i) - (cash + n * price(i))).abs() < 1e-6);
        assert_eq!(f(&eq, "position").value(i), n);
    }
    assert!((f(&eq, "daily_return").value(bh[0]) - (value(bh[0]) / 100_000.0 - 1.0)).abs() < 1e-12);

    // Sell&Hold mirrors it: the same n shorted, so value(B&H) + value(S&H) stays
    // 2 * 100000 - 2 * n * p0 * c every day (AAPL never rose enough in 2018-19 for the
    // short-exposure constraint to bind).
    let sh = rows_of(&eq, "sell_and_hold", "test");
    for (&a, &b) in bh.iter().zip(&sh) {
        assert_eq!(f(&eq, "position").value(b), -n);
        assert!((value(a) + value(b) - (200_000.0 - 2.0 * n * p0 * 0.001)).abs() < 1e-6);
    }

    // On the train split AAPL tripled: the constraint forces partial buy-backs, so the
    // short shrinks (never grows) and each shrink is a BUY trade of Sell&Hold.
    let sh_train = rows_of(&eq, "sell_and_hold", "train");
    let pos: Vec<f64> = sh_train
        .iter()
        .map(|&i| f(&eq, "position").value(i))
        .collect();
    assert!(pos.windows(2).all(|w| w[1] >= w[0]));
    let shrinks = pos.windows(2).filter(|w| w[1] > w[0]).count();
    let sh_buys = rows_of(&trades, "sell_and_hold", "train")
        .into_iter()
        .filter(|&i| s(&trades, "side").value(i) == "BUY")
        .count();
    assert!(shrinks > 0);
    assert_eq!(shrinks, sh_buys);
    assert!(pos.last().unwrap() > &pos[0]);

    // Grid search: one row per MA strategy; the reported train Sharpe is the Sharpe of the
    // train path written to `equity` (E[r] / σ[r] × √252 by hand here).
    let sp = read(out.join("strategy_params.parquet"));
    assert_eq!(sp.num_rows(), 2);
    for i in 0..2 {
        let name = s(&sp, "strategy").value(i);
        let (short, long) = (
            i64c(&sp, "short_window").value(i),
            i64c(&sp, "long_window").value(i),
        );
        assert!(short < long && [2, 3, 5, 10, 15, 20, 30, 50, 100, 150, 200].contains(&long));
        assert_eq!(i64c(&sp, "candidates").value(i), 55);
        let r: Vec<f64> = rows_of(&eq, name, "train")
            .iter()
            .map(|&j| f(&eq, "daily_return").value(j))
            .collect();
        let m = r.iter().sum::<f64>() / r.len() as f64;
        let sd = (r.iter().map(|x| (x - m).powi(2)).sum::<f64>() / r.len() as f64).sqrt();
        assert!((f(&sp, "train_sharpe").value(i) - m / sd * 252f64.sqrt()).abs() < 1e-9);
    }

    // Strategies whose indicators are all NULL never trade; MACD trades on real crossovers.
    assert!(rows_of(&trades, "kdj_rsi", "test").is_empty());
    assert!(rows_of(&trades, "macd_crossover", "test").len() > 10);

    // Deterministic: a second run writes byte-identical files.
    let dir2 = tempfile::tempdir().unwrap();
    let out2 = run(
        &Baselines,
        baseline_params("tdqn"),
        vec![("table", vec![artifact("indicators.table", table, None)])],
        dir2.path(),
    );
    for f in [
        "equity.parquet",
        "trades.parquet",
        "strategy_params.parquet",
    ] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(out2.join(f)).unwrap(),
            "{f}"
        );
    }

    // No look-ahead: cutting the data after 2019-06-28 changes nothing up to that day.
    let cut = rows.iter().position(|r| r.0 == 18075).unwrap(); // 2019-06-28
    let short_table = write_table(dir2.path(), &rows[..=cut], "short.parquet");
    let out3 = run(
        &Baselines,
        baseline_params("tdqn"),
        vec![(
            "table",
            vec![artifact("indicators.table", short_table, None)],
        )],
        &dir2.path().join("cut"),
    );
    let eq3 = read(out3.join("equity.parquet"));
    let mut j = 0;
    for i in 0..eq.num_rows() {
        if d(&eq, "date").value(i) > 18075 {
            continue;
        }
        assert_eq!(
            key(i),
            (
                s(&eq3, "strategy").value(j),
                s(&eq3, "split").value(j),
                d(&eq3, "date").value(j)
            )
        );
        assert_eq!(value(i), f(&eq3, "value").value(j), "row {i}");
        j += 1;
    }
    assert_eq!(j, eq3.num_rows());
}

#[test]
fn finagent_baselines_and_metrics_on_aapl() {
    let dir = tempfile::tempdir().unwrap();
    let rows = aapl();
    let table = write_table(dir.path(), &rows, "indicators.parquet");
    let out = run(
        &Baselines,
        baseline_params("finagent"),
        vec![("table", vec![artifact("indicators.table", table, None)])],
        dir.path(),
    );
    let eq = read(out.join("equity.parquet"));
    assert!((0..eq.num_rows()).all(|i| s(&eq, "env").value(i) == "finagent"));
    // All-in Buy&Hold: 100000 / (p0 * 1.001) fractional shares, value = price path net of
    // one cost; Sell&Hold cannot short, so it stays in cash with no trade.
    let bh = rows_of(&eq, "buy_and_hold", "test");
    let p0 = f(&eq, "price").value(bh[0]);
    for &i in &bh {
        let want = 100_000.0 / 1.001 * f(&eq, "price").value(i) / p0;
        assert!((f(&eq, "value").value(i) - want).abs() < 1e-6);
    }
    let (first_action, later) = (s(&eq, "action").value(bh[0]), s(&eq, "action").value(bh[1]));
    assert_eq!((first_action, later), ("BUY", "HOLD"));
    for i in rows_of(&eq, "sell_and_hold", "test") {
        assert_eq!(f(&eq, "value").value(i), 100_000.0);
    }

    // Metrics of the FinAgent equity + trades.
    let m_out = run(
        &MetricsStage,
        params(&MetricsStage, json!({})),
        vec![
            (
                "equity",
                vec![artifact(
                    "b.equity",
                    out.join("equity.parquet"),
                    Some("equity"),
                )],
            ),
            (
                "trades",
                vec![artifact(
                    "b.trades",
                    out.join("trades.parquet"),
                    Some("trades"),
                )],
            ),
        ],
        dir.path(),
    );
    let m = read(m_out.join("metrics.parquet"));
    assert_eq!(m.num_rows(), 16);
    let r = rows_of(&m, "buy_and_hold", "test")[0];
    let get = |c: &str| f(&m, c).value(r);
    // By hand from the CSV: 72.90950012207031 / 41.513580322265625 = 1.756289, less the
    // 0.1 % buy cost: 100000 / 1.001 × 1.756289 = 175453.4 -> +75.45 %, P&L 75453.4.
    let total = (72.90950012207031 / 41.513580322265625 / 1.001 - 1.0) * 100.0;
    assert!((get("total_return") - total).abs() < 1e-9);
    assert!((get("total_return") - 75.453).abs() < 0.01);
    assert!((get("pnl") - total * 1000.0).abs() < 1e-6);
    assert_eq!(i64c(&m, "days").value(r), 503);
    assert_eq!(i64c(&m, "periods_per_year").value(r), 252);
    assert!((get("arr") - total * 252.0 / 503.0).abs() < 1e-9); // 37.80 %
    assert_eq!(i64c(&m, "trades").value(r), 1);
    // MDD by hand: the running peak of the test closes (with the first-day cost).
    let closes: Vec<f64> = rows.iter().filter(|x| x.0 >= 17533).map(|x| x.1).collect();
    let (mut peak, mut mdd) = (closes[0] * 1.001, 0.0f64);
    for c in &closes {
        peak = peak.max(*c);
        mdd = mdd.max((peak - c) / peak);
    }
    assert!((get("mdd") - mdd * 100.0).abs() < 1e-9);
    assert!((35.0..40.0).contains(&get("mdd"))); // the Q4 2018 sell-off
    assert!((get("cr") - get("arr") / get("mdd")).abs() < 1e-12);
    // A strong but volatile two years: Sharpe around 1.2, volatility around 28 %.
    assert!((1.0..1.5).contains(&get("sr")), "sr {}", get("sr"));
    assert!((25.0..32.0).contains(&get("vol")), "vol {}", get("vol"));
    assert!(get("sor") > get("sr"));
    // Sell&Hold in cash: every metric 0.
    let r = rows_of(&m, "sell_and_hold", "test")[0];
    assert_eq!(
        (
            f(&m, "arr").value(r),
            f(&m, "mdd").value(r),
            i64c(&m, "trades").value(r)
        ),
        (0.0, 0.0, 0)
    );

    // Per-ticker override: AAPL at 365 periods scales ARR by 365 / 252.
    let m2 = run(
        &MetricsStage,
        params(
            &MetricsStage,
            json!({"periods_per_year": {"default": 252, "AAPL": 365}}),
        ),
        vec![(
            "equity",
            vec![artifact(
                "b.equity",
                out.join("equity.parquet"),
                Some("equity"),
            )],
        )],
        &dir.path().join("m2"),
    );
    let m2 = read(m2.join("metrics.parquet"));
    let r = rows_of(&m2, "buy_and_hold", "test")[0];
    assert!((f(&m2, "arr").value(r) - total * 365.0 / 503.0).abs() < 1e-9);
    // Without a trades input, trades are counted from the `traded` days.
    assert_eq!(i64c(&m2, "trades").value(r), 1);
    let traded: &BooleanArray = eq
        .column_by_name("traded")
        .unwrap()
        .as_any()
        .downcast_ref()
        .unwrap();
    assert!(traded.value(bh[0]) && !traded.value(bh[1]));
}
