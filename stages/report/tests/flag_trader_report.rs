//! The `flag_trader_report` stage on small Parquet inputs written here: the Table 2 cells
//! equal the metrics artifact's log_* values (mean and sample std over runs computed here by
//! hand), the paper's row and its source appear, missing Buy & Hold or paper entries print
//! as "—", and the PPO training charts are drawn from the ppo_log input.
mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::{artifact, run_stage_of};
use flag_core::arrow::array::{ArrayRef, Date32Array, Float64Array, Int64Array, StringArray};
use flag_core::{InputArtifact, schema};
use serde_json::json;

/// (strategy, ticker, log_cr, log_sr, log_av, log_mdd); log_* None = null.
type Row = (&'static str, &'static str, [Option<f64>; 4]);

fn rows() -> Vec<Row> {
    let s = |x: [f64; 4]| x.map(Some);
    vec![
        (
            "buy_and_hold",
            "MSFT",
            s([25.1234, 1.5678, 22.9876, 10.4321]),
        ),
        ("flag_trader#0", "MSFT", s([18.2, 1.21, 24.5, 9.7])),
        ("flag_trader#1", "MSFT", s([21.7, 1.43, 25.1, 8.9])),
        ("flag_trader#2", "MSFT", s([15.3, 0.98, 23.8, 11.2])),
        ("flag_trader#3", "MSFT", s([24.9, 1.77, 26.0, 7.5])),
        ("flag_trader#4", "MSFT", s([19.4, 1.35, 24.9, 10.1])),
        // JNJ: no Buy & Hold row and no paper entry; run 1 has a null SR.
        ("flag_trader#0", "JNJ", s([30.0, 3.1, 17.0, 9.0])),
        (
            "flag_trader#1",
            "JNJ",
            [Some(28.5), None, Some(18.5), Some(9.9)],
        ),
        ("flag_trader#2", "JNJ", s([35.25, 3.5, 16.25, 8.75])),
        // Another strategy and the train split must not leak into the tables.
        ("tdqn#0", "MSFT", s([99.0, 9.9, 99.0, 99.0])),
    ]
}

fn metrics_batch(rows: &[Row], split: &str) -> flag_core::arrow::array::RecordBatch {
    let n = rows.len();
    let s = |v: Vec<&str>| -> ArrayRef { Arc::new(StringArray::from(v)) };
    let f = |v: Vec<f64>| -> ArrayRef { Arc::new(Float64Array::from(v)) };
    let i = |v: Vec<i64>| -> ArrayRef { Arc::new(Int64Array::from(v)) };
    let d = |v: Vec<i32>| -> ArrayRef { Arc::new(Date32Array::from(v)) };
    let log = |k: usize| -> ArrayRef {
        Arc::new(Float64Array::from(
            rows.iter().map(|r| r.2[k]).collect::<Vec<_>>(),
        ))
    };
    schema::schema("metrics")
        .unwrap()
        .batch(vec![
            s(rows.iter().map(|r| r.0).collect()),
            s(vec!["finagent"; n]),
            s(rows.iter().map(|r| r.1).collect()),
            s(vec![split; n]),
            d(vec![18536; n]), // 2020-10-01
            d(vec![18752; n]), // 2021-05-05
            i(vec![149; n]),
            i(vec![252; n]),
            // The FinAgent columns hold other numbers: the report must not read them.
            f(vec![-1.0; n]),
            f(vec![-2.0; n]),
            f(vec![-3.0; n]),
            f(vec![-4.0; n]),
            f(vec![-5.0; n]),
            f(vec![-6.0; n]),
            f(vec![-7.0; n]),
            f(vec![-8.0; n]),
            i(vec![3; n]),
            log(0),
            log(1),
            log(2),
            log(3),
        ])
        .unwrap()
}

/// PPO log of MSFT: 3 runs x 4 iterations of 10 steps; reward = run + iteration / 10,
/// entropy = 1 - iteration / 10, episode return only on even iterations.
fn ppo_log_batch() -> flag_core::arrow::array::RecordBatch {
    let (mut run, mut it) = (Vec::new(), Vec::new());
    for r in 0..3i64 {
        for k in 1..=4i64 {
            run.push(r);
            it.push(k);
        }
    }
    let n = run.len();
    let s = |v: Vec<&str>| -> ArrayRef { Arc::new(StringArray::from(v)) };
    let f = |v: Vec<f64>| -> ArrayRef { Arc::new(Float64Array::from(v)) };
    let i = |v: Vec<i64>| -> ArrayRef { Arc::new(Int64Array::from(v)) };
    let reward: Vec<f64> = run
        .iter()
        .zip(&it)
        .map(|(r, k)| *r as f64 + *k as f64 / 10.0)
        .collect();
    let ret: Vec<Option<f64>> = it
        .iter()
        .zip(&reward)
        .map(|(k, x)| (k % 2 == 0).then_some(x * 10.0))
        .collect();
    schema::schema("ppo_log")
        .unwrap()
        .batch(vec![
            s(vec!["flag_trader"; n]),
            s(vec!["MSFT"; n]),
            i(run.clone()),
            i(run.clone()),
            i(it.clone()),
            i(it.iter().map(|k| k * 10).collect()),
            f(vec![5e-5; n]),
            f(vec![0.01; n]),
            f(vec![0.5; n]),
            f(it.iter().map(|k| 1.0 - *k as f64 / 10.0).collect()),
            f(vec![0.001; n]),
            f(vec![0.002; n]),
            f(vec![0.1; n]),
            Arc::new(Float64Array::from(vec![None::<f64>; n])),
            f(vec![1.0; n]),
            f(reward),
            Arc::new(Float64Array::from(ret)),
        ])
        .unwrap()
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len() as f64
}

fn sd(x: &[f64]) -> f64 {
    let m = mean(x);
    (x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (x.len() - 1) as f64).sqrt()
}

/// Cells of the row starting with `label` in the table under the `### ticker` heading.
fn row(md: &str, ticker: &str, label: &str) -> Vec<String> {
    let at = md
        .find(&format!("### {ticker}\n"))
        .unwrap_or_else(|| panic!("no table for {ticker} in\n{md}"));
    let body = &md[at..];
    let end = body[4..].find("\n### ").map_or(body.len(), |e| e + 4);
    body[..end]
        .lines()
        .find(|l| l.starts_with(&format!("| {label}")))
        .unwrap_or_else(|| panic!("no row '{label}' for {ticker} in\n{}", &body[..end]))
        .trim_matches('|')
        .split(" | ")
        .map(|c| c.trim().to_string())
        .collect()
}

fn paper() -> serde_json::Value {
    json!({"MSFT": {"cr": 20.106, "sr": 1.373, "av": 24.932, "mdd": 9.428},
           "TSLA": {"cr": 50.394, "sr": 1.362, "av": 64.004}})
}

const SOURCE: &str = "Xiong et al. 2025, FLAG-Trader, Table 2";

fn run(with_log: bool) -> (tempfile::TempDir, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut inputs: BTreeMap<String, Vec<InputArtifact>> = BTreeMap::new();
    inputs.insert(
        "metrics".into(),
        vec![
            artifact(
                dir.path(),
                "metrics.metrics",
                &metrics_batch(&rows(), "test"),
                Some("metrics"),
            ),
            artifact(
                dir.path(),
                "train.metrics",
                &metrics_batch(&rows()[..2], "train"),
                Some("metrics"),
            ),
        ],
    );
    if with_log {
        inputs.insert(
            "curves".into(),
            vec![artifact(
                dir.path(),
                "flag_stocks.log",
                &ppo_log_batch(),
                Some("ppo_log"),
            )],
        );
    }
    let staging = dir.path().join("staging");
    run_stage_of(
        &flag_report::flag_trader::FlagTraderReport,
        &inputs,
        &[("paper", paper()), ("paper_source", json!(SOURCE))],
        &staging,
    )
    .unwrap();
    let md = std::fs::read_to_string(staging.join("report/report.md")).unwrap();
    let html = std::fs::read_to_string(staging.join("report/report.html")).unwrap();
    (dir, md, html)
}

fn col(ticker: &str, k: usize) -> Vec<f64> {
    rows()
        .iter()
        .filter(|r| r.1 == ticker && r.0.starts_with("flag_trader#"))
        .filter_map(|r| r.2[k])
        .collect()
}

#[test]
fn table_cells_equal_the_metrics_and_paper() {
    let (_dir, md, html) = run(true);
    // Buy & Hold: the log_* values as they are.
    assert_eq!(
        row(&md, "MSFT", "Buy & Hold")[1..],
        ["25.123", "1.568", "22.988", "10.432"]
    );
    // Ours: mean (sample std) over the five runs.
    let ours = row(&md, "MSFT", "FLAG-Trader (ours), mean (std), n = 5 runs");
    for k in 0..4 {
        let x = col("MSFT", k);
        assert_eq!(x.len(), 5);
        assert_eq!(
            ours[k + 1],
            format!("{:.3} ({:.3})", mean(&x), sd(&x)),
            "column {k}"
        );
    }
    // The median-SR run (SR 0.98 1.21 1.35 1.43 1.77 -> run #4), labelled as selected on test.
    assert_eq!(
        row(
            &md,
            "MSFT",
            "FLAG-Trader (ours), median-SR run #4 (selected on test)"
        )[1..],
        ["19.400", "1.350", "24.900", "10.100"]
    );
    assert_eq!(
        row(&md, "MSFT", "FLAG-Trader (paper)")[1..],
        ["20.106", "1.373", "24.932", "9.428"]
    );
    assert!(md.contains(SOURCE), "paper source missing:\n{md}");
    assert!(html.contains(SOURCE));
    assert!(md.contains("`metrics.metrics`"));
    // Neither the other strategy nor the train split nor the FinAgent columns leak in.
    assert!(!md.contains("99.000") && !md.contains("-1.000"), "{md}");

    // JNJ: no Buy & Hold, no paper entry; the null SR run leaves 2 SR values of 3 runs.
    assert_eq!(row(&md, "JNJ", "Buy & Hold")[1..], ["—", "—", "—", "—"]);
    assert_eq!(
        row(&md, "JNJ", "FLAG-Trader (paper)")[1..],
        ["—", "—", "—", "—"]
    );
    let ours = row(&md, "JNJ", "FLAG-Trader (ours), mean (std), n = 3 runs");
    let sr = col("JNJ", 1);
    assert_eq!(sr, [3.1, 3.5]);
    assert_eq!(
        ours[2],
        format!("{:.3} ({:.3}) [n = 2]", mean(&sr), sd(&sr))
    );
    let cr = col("JNJ", 0);
    assert_eq!(ours[1], format!("{:.3} ({:.3})", mean(&cr), sd(&cr)));
    assert!(md.contains("`params.paper` (no entry for JNJ)"));

    // TSLA: only in the paper, whose entry has no MDD.
    assert_eq!(row(&md, "TSLA", "Buy & Hold")[1..], ["—", "—", "—", "—"]);
    assert_eq!(
        row(&md, "TSLA", "FLAG-Trader (ours), mean (std), n = 0 runs")[1..],
        ["—", "—", "—", "—"]
    );
    assert_eq!(
        row(&md, "TSLA", "FLAG-Trader (paper)")[1..],
        ["50.394", "1.362", "64.004", "—"]
    );
}

#[test]
fn training_curves_are_drawn_from_the_ppo_log() {
    let (dir, md, html) = run(true);
    let charts = dir.path().join("staging/report/charts");
    for name in ["reward", "episode_return", "entropy"] {
        let file = format!("ppo_{name}_flag_trader_MSFT.svg");
        let svg = std::fs::read_to_string(charts.join(&file)).unwrap();
        assert!(svg.contains("<svg"), "{file}");
        assert!(svg.contains("mean over 3 runs (band: min..max)"), "{file}");
        assert!(md.contains(&format!("charts/{file}")), "{md}");
    }
    assert!(md.contains("`flag_stocks.log`"));
    assert!(html.contains("<svg"));

    // Without the optional log the tables are unchanged and the section says so.
    let (_d2, md2, _) = run(false);
    assert!(md2.contains("No PPO training logs in the inputs."));
    let tables = |m: &str| m[..m.find("## PPO training curves").unwrap()].to_string();
    assert_eq!(tables(&md), tables(&md2));
}

#[test]
fn bad_paper_param_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut inputs: BTreeMap<String, Vec<InputArtifact>> = BTreeMap::new();
    inputs.insert(
        "metrics".into(),
        vec![artifact(
            dir.path(),
            "metrics.metrics",
            &metrics_batch(&rows(), "test"),
            Some("metrics"),
        )],
    );
    let err = run_stage_of(
        &flag_report::flag_trader::FlagTraderReport,
        &inputs,
        &[("paper", json!({"MSFT": {"cr": "high"}}))],
        &dir.path().join("staging"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("MSFT.cr"), "{err}");
}
