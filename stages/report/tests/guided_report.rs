//! The `guided_report` stage on Parquet inputs built from real AAPL and MSFT prices: the
//! comparison table's means, standard deviations and paired t-test p-values, the published
//! TDQN table, and the charts, each checked against values computed here independently.
mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::*;
use flag_core::arrow::array::{ArrayRef, Float64Array, Int64Array, StringArray};
use flag_core::schema;
use serde_json::json;

const RUNS: usize = 5;

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len() as f64
}

fn sd(x: &[f64]) -> f64 {
    let m = mean(x);
    (x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (x.len() - 1) as f64).sqrt()
}

/// Two-sided p of a one-sample t-test with 5 values (4 degrees of freedom), from the closed
/// form of the t CDF for 4 degrees of freedom.
fn p_df4(x: &[f64], mu: f64) -> f64 {
    assert_eq!(x.len(), 5);
    let t = ((mean(x) - mu) / (sd(x) / 5f64.sqrt())).abs();
    let a = t / (1.0 + t * t / 4.0).sqrt();
    let cdf = 0.5 + 3.0 / 8.0 * a * (1.0 - t * t / (12.0 * (1.0 + t * t / 4.0)));
    2.0 * (1.0 - cdf)
}

fn p_text(p: f64) -> String {
    if p < 0.001 {
        "<0.001".into()
    } else {
        format!("{p:.3}")
    }
}

fn row(md: &str, caption_start: &str, label: &str) -> Vec<String> {
    let at = md
        .find(caption_start)
        .unwrap_or_else(|| panic!("no table '{caption_start}' in\n{md}"));
    md[at..]
        .lines()
        .find(|l| l.starts_with(&format!("| {label} |")))
        .unwrap_or_else(|| panic!("no row {label}"))
        .trim_matches('|')
        .split(" | ")
        .map(|c| c.trim().trim_matches('*').to_string())
        .collect()
}

struct Experiment {
    dir: tempfile::TempDir,
    inputs: BTreeMap<String, Vec<flag_core::InputArtifact>>,
    /// (ticker, strategy base) -> SR per run.
    sr: BTreeMap<(String, String), Vec<f64>>,
    mdd: BTreeMap<(String, String), Vec<f64>>,
}

fn experiment() -> Experiment {
    let dir = tempfile::tempdir().unwrap();
    let mut runs = Vec::new();
    for ticker in ["AAPL", "MSFT"] {
        let bars = read_bars(&format!("{ticker}_2018-1-1_2020-1-1.csv"), usize::MAX);
        for r in 0..RUNS {
            runs.push(simulate(
                &format!("tdqn#{r}"),
                "tdqn",
                ticker,
                "test",
                &bars,
                |c| !sma_above(c, 5 + 3 * r),
            ));
            runs.push(simulate(
                &format!("llm_guided_ddqn#{r}"),
                "tdqn",
                ticker,
                "test",
                &bars,
                |c| sma_above(c, 20 + 10 * r),
            ));
        }
        runs.push(simulate(
            "llm_only_P3",
            "tdqn",
            ticker,
            "test",
            &bars,
            |c| sma_above(c, 50),
        ));
    }
    let with_metrics: Vec<(Run, [f64; 6])> = runs
        .into_iter()
        .map(|r| {
            let m = metrics(&r);
            (r, m)
        })
        .collect();
    let (mut sr, mut mdd) = (BTreeMap::new(), BTreeMap::new());
    for (r, m) in &with_metrics {
        let base = r.strategy.split('#').next().unwrap().to_string();
        let key = (r.ticker.clone(), base);
        sr.entry(key.clone()).or_insert_with(Vec::new).push(m[1]);
        mdd.entry(key).or_insert_with(Vec::new).push(m[4]);
    }
    let mb = metrics_batch(
        &with_metrics
            .iter()
            .map(|(r, m)| (r, *m))
            .collect::<Vec<_>>(),
    );
    let rs: Vec<&Run> = with_metrics.iter().map(|x| &x.0).collect();
    let mut inputs: BTreeMap<String, Vec<flag_core::InputArtifact>> = BTreeMap::new();
    let add = |inputs: &mut BTreeMap<String, Vec<_>>, name: &str, a| {
        inputs.entry(name.to_string()).or_default().push(a);
    };
    add(
        &mut inputs,
        "metrics",
        artifact(dir.path(), "m.metrics", &mb, Some("metrics")),
    );
    add(
        &mut inputs,
        "equity",
        artifact(dir.path(), "e.equity", &equity_batch(&rs), Some("equity")),
    );
    add(
        &mut inputs,
        "trades",
        artifact(
            dir.path(),
            "t.trades",
            &trades_batch(&rs, None),
            Some("trades"),
        ),
    );
    // Training curves of AAPL: 5 runs x 3 episodes per agent, Sharpe = run + episode / 10.
    let mut c: (Vec<String>, Vec<i64>, Vec<i64>, Vec<f64>) = Default::default();
    for agent in ["tdqn", "llm_guided_ddqn"] {
        for r in 0..RUNS as i64 {
            for e in 1..=3 {
                c.0.push(agent.into());
                c.1.push(r);
                c.2.push(e);
                c.3.push(r as f64 + e as f64 / 10.0);
            }
        }
    }
    let n = c.0.len();
    let s = |v: Vec<&str>| -> ArrayRef { Arc::new(StringArray::from(v)) };
    let i = |v: Vec<i64>| -> ArrayRef { Arc::new(Int64Array::from(v)) };
    let f = |v: Vec<f64>| -> ArrayRef { Arc::new(Float64Array::from(v)) };
    let curves = schema::schema("training_curve")
        .unwrap()
        .batch(vec![
            s(c.0.iter().map(String::as_str).collect()),
            s(vec!["tdqn"; n]),
            s(vec!["AAPL"; n]),
            i(c.1.clone()),
            i(c.1.clone()),
            i(c.2.clone()),
            i(vec![100; n]),
            i(vec![100; n]),
            f(vec![0.5; n]),
            f(vec![0.01; n]),
            f(vec![0.1; n]),
            f(c.3.clone()),
            f(vec![0.05; n]),
            f(c.3.iter().map(|x| -x).collect()),
        ])
        .unwrap();
    add(
        &mut inputs,
        "curves",
        artifact(dir.path(), "c.curve", &curves, Some("training_curve")),
    );
    Experiment {
        dir,
        inputs,
        sr,
        mdd,
    }
}

fn params() -> Vec<(&'static str, serde_json::Value)> {
    vec![
        ("llm_only", json!("llm_only_P3")),
        ("published", json!({"AAPL": 1.424, "MSFT": 0.987})),
        ("published_source", json!("Théate & Ernst 2021, Table 6")),
        ("chart_ticker", json!("AAPL")),
    ]
}

#[test]
fn comparison_and_published_tables_match_independent_statistics() {
    let x = experiment();
    let staging = x.dir.path().join("staging");
    run_stage_of(
        &flag_report::guided::GuidedReport,
        &x.inputs,
        &params(),
        &staging,
    )
    .unwrap();
    let out = staging.join("report");
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    let get = |m: &BTreeMap<(String, String), Vec<f64>>, t: &str, a: &str| {
        m[&(t.to_string(), a.to_string())].clone()
    };
    for ticker in ["AAPL", "MSFT"] {
        let cells = row(&md, "_test split, tdqn environment", ticker);
        assert_eq!(cells.len(), 11, "{cells:?}");
        let (g, r, l) = (
            get(&x.sr, ticker, "llm_guided_ddqn"),
            get(&x.sr, ticker, "tdqn"),
            get(&x.sr, ticker, "llm_only_P3"),
        );
        assert_eq!((g.len(), r.len(), l.len()), (RUNS, RUNS, 1));
        assert_eq!(cells[1], format!("{:.2} ({:.2})", mean(&g), sd(&g)));
        assert_eq!(cells[2], format!("{:.2} ({:.2})", mean(&r), sd(&r)));
        assert_eq!(cells[3], format!("{:.2}", l[0]));
        // Paired by run: a one-sample test of the differences against 0.
        let d: Vec<f64> = g.iter().zip(&r).map(|(a, b)| a - b).collect();
        assert_eq!(cells[4], p_text(p_df4(&d, 0.0)), "p vs RL-only, {ticker}");
        assert_eq!(cells[5], p_text(p_df4(&g, l[0])), "p vs LLM-only, {ticker}");
        let (gm, rm) = (
            get(&x.mdd, ticker, "llm_guided_ddqn"),
            get(&x.mdd, ticker, "tdqn"),
        );
        assert_eq!(cells[6], format!("{:.2} ({:.2})", mean(&gm), sd(&gm)));
        let dm: Vec<f64> = gm.iter().zip(&rm).map(|(a, b)| a - b).collect();
        assert_eq!(cells[9], p_text(p_df4(&dm, 0.0)));
    }
    let all = row(&md, "_test split, tdqn environment", "all tickers");
    let pooled: Vec<f64> = ["AAPL", "MSFT"]
        .iter()
        .flat_map(|t| get(&x.sr, t, "llm_guided_ddqn"))
        .collect();
    assert_eq!(all[1], format!("{:.2} ({:.2})", mean(&pooled), sd(&pooled)));

    let published = row(&md, "_TDQN test Sharpe ratio", "AAPL");
    let ours = get(&x.sr, "AAPL", "tdqn");
    assert_eq!(published[1], "1.424");
    assert_eq!(
        published[2],
        format!("{:.2} ({:.2})", mean(&ours), sd(&ours))
    );
    assert_eq!(published[3], "5");
    assert_eq!(published[4], format!("{:.2}", mean(&ours) - 1.424));
    assert_eq!(published[5], p_text(p_df4(&ours, 1.424)));
    assert!(
        md.contains("AAPL: ours "),
        "a sentence per ticker on the gap"
    );

    let svg = std::fs::read_to_string(out.join("charts/signals_AAPL.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("llm_guided_ddqn#0"));
    for split in ["train", "test"] {
        let svg =
            std::fs::read_to_string(out.join(format!("charts/episodes_AAPL_{split}.svg"))).unwrap();
        assert!(svg.contains("5 runs"), "{split}");
        assert!(
            svg.contains("<polygon"),
            "the band over runs is drawn ({split})"
        );
    }
    assert!(!out.join("charts/episodes_MSFT_train.svg").exists());
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("TDQN: published vs ours"));
}

#[test]
fn unknown_chart_ticker_is_a_param_error() {
    let x = experiment();
    let mut p = params();
    p.retain(|(k, _)| *k != "chart_ticker");
    p.push(("chart_ticker", json!("NFLX")));
    let err = run_stage_of(
        &flag_report::guided::GuidedReport,
        &x.inputs,
        &p,
        &x.dir.path().join("s2"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("chart_ticker") && err.contains("NFLX"),
        "{err}"
    );
    let bad = vec![("published", json!({"AAPL": "high"}))];
    let err = run_stage_of(
        &flag_report::guided::GuidedReport,
        &x.inputs,
        &bad,
        &x.dir.path().join("s3"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("published") && err.contains("AAPL"), "{err}");
}

/// Strategist decisions of AAPL / P3 as `llm_signal` rows (one row per decision):
/// (decision date as days since 1970, direction, explanation; None = failed).
fn signals(decisions: &[(i32, f64, Option<&str>)]) -> flag_core::arrow::array::RecordBatch {
    use flag_core::arrow::array::{BooleanArray, Date32Array};
    let n = decisions.len();
    let s = |v: Vec<Option<&str>>| -> ArrayRef { Arc::new(StringArray::from(v)) };
    let f = |v: Vec<Option<f64>>| -> ArrayRef { Arc::new(Float64Array::from(v)) };
    let d = |v: Vec<i32>| -> ArrayRef { Arc::new(Date32Array::from(v)) };
    let dates: Vec<i32> = decisions.iter().map(|x| x.0).collect();
    let ok = |x: &(i32, f64, Option<&str>)| x.2.is_some();
    schema::schema("llm_signal")
        .unwrap()
        .batch(vec![
            s(vec![Some("AAPL"); n]),
            d(dates.clone()),
            f(decisions.iter().map(|x| Some(x.1)).collect()),
            f(decisions.iter().map(|x| Some(x.1.abs() * 0.5)).collect()),
            f(decisions.iter().map(|x| Some(x.1 * 0.5)).collect()),
            d(dates.clone()),
            d(dates.clone()),
            d(dates),
            Arc::new(Int64Array::from(
                decisions
                    .iter()
                    .map(|x| ok(x).then_some(2))
                    .collect::<Vec<_>>(),
            )),
            f(decisions.iter().map(|x| ok(x).then_some(0.7)).collect()),
            f(vec![Some(0.3); n]),
            f(vec![Some(1.2); n]),
            s(decisions.iter().map(|x| x.2).collect()),
            s(decisions
                .iter()
                .map(|x| ok(x).then_some("{\"sma\":1.0}"))
                .collect()),
            s(vec![Some("P3"); n]),
            Arc::new(Int64Array::from(
                decisions
                    .iter()
                    .map(|x| if ok(x) { 1 } else { 3 })
                    .collect::<Vec<_>>(),
            )),
            Arc::new(BooleanArray::from(
                decisions.iter().map(|x| !ok(x)).collect::<Vec<_>>(),
            )),
            s(decisions
                .iter()
                .map(|x| (!ok(x)).then_some("the explanation repeats the format example"))
                .collect()),
            s(vec![Some("{...}"); n]),
        ])
        .unwrap()
}

#[test]
fn prompt_tables_count_failures_and_answer_variety_in_the_split() {
    let mut x = experiment();
    // 2018-02-01, 03-01, 04-02, 05-01 (test split) and 2015-06-01 (outside it).
    let batch = signals(&[
        (17563, 1.0, Some("Trend up.")),
        (17591, 1.0, Some("Trend up.")),
        (17623, -1.0, Some("RSI overbought.")),
        (17652, 0.0, None),
        (16587, -1.0, Some("Outside the split.")),
    ]);
    x.inputs.insert(
        "signals".into(),
        vec![artifact(
            x.dir.path(),
            "s.signals",
            &batch,
            Some("llm_signal"),
        )],
    );
    let mut p = params();
    p.push(("prompts", json!(["P3"])));
    let staging = x.dir.path().join("staging");
    run_stage_of(&flag_report::guided::GuidedReport, &x.inputs, &p, &staging).unwrap();
    let md = std::fs::read_to_string(staging.join("report/report.md")).unwrap();
    // A failed decision's explanation is null: counted as a failure, not as an answer.
    assert_eq!(row(&md, "Strategist failures", "AAPL")[1], "1/4 (1)");
    assert_eq!(row(&md, "Answer variety", "AAPL")[1], "2/3, 67% LONG");
    // What the model decided over the split's valid decisions (confidence 2, certainty 0.7).
    assert_eq!(
        row(&md, "What the model decided", "AAPL")[1],
        "L 2 / S 1; c 0/3/0; cert 0.70 [0.70, 0.70]"
    );
    assert_eq!(
        row(&md, "Sharpe ratio of the LLM-only strategy", "AAPL")[1],
        format!(
            "{:.2}",
            x.sr[&("AAPL".to_string(), "llm_only_P3".to_string())][0]
        )
    );
}
