//! The `ddqn` stage end to end through a StageContext: inputs by column name, parallel runs,
//! output schemas, order and naming, the LLM-guided variant, and input errors.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flag_core::RunStage as _;
use flag_core::arrow::array::{
    Array, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray,
};
use flag_core::arrow::datatypes::{DataType, Field, Schema};
use flag_core::parquet_io::{read_parquet_file, write_parquet_file};
use flag_core::{InputArtifact, Params, Stage, StageContext};
use flag_rl::stage::Ddqn;
use serde_json::json;

/// 2020-01-01 as date32.
const DAY0: i32 = 18_262;
const DAYS: usize = 120;

fn table(path: &Path, tickers: &[&str], bad_close_row: Option<usize>) {
    let mut t = Vec::new();
    let mut d = Vec::new();
    let (mut h, mut l, mut c, mut v) = (vec![], vec![], vec![], vec![]);
    for (k, name) in tickers.iter().enumerate() {
        for i in 0..DAYS {
            let p =
                50.0 * (1.0 + k as f64) * (0.004 * i as f64 + 0.02 * (i as f64 / 4.0).sin()).exp();
            t.push(name.to_string());
            d.push(DAY0 + i as i32);
            h.push(p * 1.01);
            l.push(p * 0.985);
            c.push(if bad_close_row == Some(t.len()) {
                -1.0
            } else {
                p
            });
            v.push(1e5 + (i % 9) as f64 * 1e4);
        }
    }
    let fields =
        ["high", "low", "close", "volume"].map(|n| Field::new(n, DataType::Float64, false));
    let schema = Arc::new(Schema::new(
        [
            Field::new("ticker", DataType::Utf8, false),
            Field::new("date", DataType::Date32, false),
        ]
        .into_iter()
        .chain(fields)
        .collect::<Vec<_>>(),
    ));
    let cols: Vec<Arc<dyn Array>> = vec![
        Arc::new(StringArray::from(t)),
        Arc::new(Date32Array::from(d)),
        Arc::new(Float64Array::from(h)),
        Arc::new(Float64Array::from(l)),
        Arc::new(Float64Array::from(c)),
        Arc::new(Float64Array::from(v)),
    ];
    let batch = RecordBatch::try_new(schema.clone(), cols).unwrap();
    write_parquet_file(path, schema, &[batch]).unwrap();
}

fn signals(path: &Path) {
    let n = DAYS;
    let dir: Vec<f64> = (0..n)
        .map(|i| if i % 3 == 0 { -1.0 } else { 1.0 })
        .collect();
    let strength: Vec<f64> = (0..n).map(|i| (i % 5) as f64 / 4.0).collect();
    let inter: Vec<f64> = dir.iter().zip(&strength).map(|(a, b)| a * b).collect();
    // Only the columns the stage reads (by name): the strategist's full llm_signal schema
    // carries more, which the agent ignores.
    let fields = vec![
        Field::new("ticker", DataType::Utf8, false),
        Field::new("date", DataType::Date32, false),
        Field::new("direction", DataType::Float64, false),
        Field::new("strength", DataType::Float64, false),
        Field::new("interaction", DataType::Float64, false),
    ];
    let schema = Arc::new(Schema::new(fields));
    let cols: Vec<Arc<dyn Array>> = vec![
        Arc::new(StringArray::from(vec!["AAA"; n])),
        Arc::new(Date32Array::from(
            (0..n as i32).map(|i| DAY0 + i).collect::<Vec<_>>(),
        )),
        Arc::new(Float64Array::from(dir)),
        Arc::new(Float64Array::from(strength)),
        Arc::new(Float64Array::from(inter)),
    ];
    let batch = RecordBatch::try_new(schema.clone(), cols).unwrap();
    write_parquet_file(path, schema, &[batch]).unwrap();
}

fn params(extra: serde_json::Value) -> Params {
    let mut p: BTreeMap<String, serde_json::Value> = Ddqn
        .spec()
        .params
        .iter()
        .filter_map(|s| s.default.clone().map(|d| (s.name.to_string(), d)))
        .collect();
    for (k, v) in [
        ("train_start", "2020-01-01"),
        ("train_end", "2020-03-31"),
        ("test_start", "2020-04-01"),
        ("test_end", "2020-12-31"),
    ] {
        p.insert(k.into(), json!(v));
    }
    p.insert("episodes".into(), json!(1));
    p.insert("device".into(), json!("cpu"));
    if let serde_json::Value::Object(m) = extra {
        p.extend(m);
    }
    Params::new(p)
}

fn run(
    dir: &Path,
    table_file: PathBuf,
    signal_file: Option<PathBuf>,
    p: Params,
) -> flag_core::StageResult<()> {
    let mut inputs = BTreeMap::new();
    inputs.insert(
        "table".to_string(),
        vec![InputArtifact {
            reference: "bars.table".into(),
            files: vec![table_file],
            schema: None,
        }],
    );
    if let Some(f) = signal_file {
        inputs.insert(
            "signals".to_string(),
            vec![InputArtifact {
                reference: "llm.signals".into(),
                files: vec![f],
                schema: None,
            }],
        );
    }
    let mut ctx = StageContext::new(
        "ddqn",
        p,
        inputs,
        Ddqn.spec().outputs,
        dir.to_path_buf(),
        BTreeMap::new(),
        None,
        None,
    );
    Ddqn.run(&mut ctx)
}

fn strings(b: &RecordBatch, name: &str) -> Vec<String> {
    let a = b
        .column_by_name(name)
        .unwrap()
        .as_any()
        .downcast_ref::<StringArray>()
        .unwrap();
    (0..a.len()).map(|i| a.value(i).to_string()).collect()
}

#[test]
fn writes_every_run_in_schema_order() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("bars.parquet");
    table(&input, &["AAA", "BBB"], None);
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    run(
        &out,
        input,
        None,
        params(json!({"runs": 2, "threads": 2, "tickers": ["BBB", "AAA"]})),
    )
    .unwrap();
    let (_, eq) = read_parquet_file(&out.join("equity.parquet")).unwrap();
    let eq = &eq[0];
    // 91 train days (Jan-Mar 2020 as consecutive calendar days) + 29 test days, per run.
    assert_eq!(eq.num_rows(), 2 * 2 * DAYS);
    let key: Vec<(String, String, String)> = strings(eq, "strategy")
        .into_iter()
        .zip(strings(eq, "ticker"))
        .zip(strings(eq, "split"))
        .map(|((a, b), c)| (a, b, c))
        .collect();
    assert!(
        key.windows(2).all(|w| w[0] <= w[1]),
        "equity must be sorted by strategy, ticker, split"
    );
    let mut names = strings(eq, "strategy");
    names.dedup();
    assert_eq!(names, vec!["tdqn#0", "tdqn#1"]);
    let actions = strings(eq, "action");
    assert!(
        actions.iter().any(|a| a == "HOLD"),
        "no decision before a full window"
    );
    assert!(actions.iter().any(|a| a == "LONG" || a == "SHORT"));
    let (_, curve) = read_parquet_file(&out.join("curve.parquet")).unwrap();
    assert_eq!(curve[0].num_rows(), 4);
    let runs = curve[0]
        .column_by_name("run")
        .unwrap()
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap();
    assert_eq!(runs.values().to_vec(), vec![0, 1, 0, 1]);
    let (_, trades) = read_parquet_file(&out.join("trades.parquet")).unwrap();
    assert!(trades[0].num_rows() > 0);

    // Same params, same bytes: what lets the engine's cache stop early.
    let again = dir.path().join("again");
    std::fs::create_dir_all(&again).unwrap();
    let input = dir.path().join("bars.parquet");
    run(
        &again,
        input,
        None,
        params(json!({"runs": 2, "threads": 1, "tickers": ["AAA", "BBB"]})),
    )
    .unwrap();
    for f in ["equity.parquet", "trades.parquet", "curve.parquet"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(again.join(f)).unwrap(),
            "{f} differs"
        );
    }
}

#[test]
fn signals_make_the_llm_guided_variant() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("bars.parquet");
    let sig = dir.path().join("signals.parquet");
    table(&input, &["AAA"], None);
    signals(&sig);
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    run(&out, input, Some(sig), params(json!({}))).unwrap();
    let (_, eq) = read_parquet_file(&out.join("equity.parquet")).unwrap();
    assert_eq!(strings(&eq[0], "strategy")[0], "llm_guided_ddqn#0");
    let (_, curve) = read_parquet_file(&out.join("curve.parquet")).unwrap();
    assert_eq!(strings(&curve[0], "strategy")[0], "llm_guided_ddqn");
}

#[test]
fn bad_input_names_row_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("bars.parquet");
    table(&input, &["AAA"], Some(5));
    let err = run(dir.path(), input.clone(), None, params(json!({})))
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "{}:5: column 'close': AAA on 2020-01-05 is Some(-1.0), expected a finite number > 0",
            input.display()
        )
    );
    let good = dir.path().join("good.parquet");
    table(&good, &["AAA"], None);
    let err = run(dir.path(), good, None, params(json!({"tickers": ["ZZZ"]})))
        .unwrap_err()
        .to_string();
    assert_eq!(err, "param 'tickers': ticker 'ZZZ' is not in the table");
}
