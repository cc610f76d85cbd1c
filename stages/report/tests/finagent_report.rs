//! The `finagent_report` stage on small Parquet inputs written here with the schema
//! registry: strategies simulated on real MSFT closes (common::simulate), their metrics,
//! and hand-made decisions, intel, low-level reflections, memory hits and tool records.
//! Checks: Table 4 and Table 5 cells equal the metrics values as printed, the published
//! row, retrieval overlap and ages against a hand computation, module counts, the traced
//! day shows exactly that day's prompts, optional inputs leave their section out, and bad
//! params are errors naming the param.
mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use common::{
    Run, artifact, equity_batch, metrics, metrics_batch, read_bars, run_stage_of, simulate,
    sma_above, trades_batch,
};
use flag_core::arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Float64Array, Int64Array, ListBuilder, RecordBatch,
    StringArray, StringBuilder,
};
use flag_core::{InputArtifact, schema};
use flag_report::tables::fmt_num;
use serde_json::{Value, json};

fn s(v: Vec<&str>) -> ArrayRef {
    Arc::new(StringArray::from(v))
}
fn os(v: Vec<Option<&str>>) -> ArrayRef {
    Arc::new(StringArray::from(v))
}
fn f(v: Vec<f64>) -> ArrayRef {
    Arc::new(Float64Array::from(v))
}
fn i(v: Vec<i64>) -> ArrayRef {
    Arc::new(Int64Array::from(v))
}
fn d(v: Vec<i32>) -> ArrayRef {
    Arc::new(Date32Array::from(v))
}
fn b(v: Vec<bool>) -> ArrayRef {
    Arc::new(BooleanArray::from(v))
}
fn lists(n: usize) -> ArrayRef {
    let mut l = ListBuilder::new(StringBuilder::new());
    for _ in 0..n {
        l.append(true);
    }
    Arc::new(l.finish())
}

/// (strategy, modules, day index, action, failed, high_called)
type Dec = (&'static str, &'static str, usize, &'static str, bool, bool);

const DECISIONS: [Dec; 5] = [
    ("finagent_MLHT", "MLHT", 0, "BUY", false, false),
    ("finagent_MLHT", "MLHT", 1, "HOLD", true, true),
    ("finagent_MLHT", "MLHT", 2, "SELL", false, true),
    ("finagent_T", "T", 0, "HOLD", false, false),
    ("finagent_T", "T", 1, "BUY", false, false),
];

fn decisions_batch(days: &[i32]) -> RecordBatch {
    let n = DECISIONS.len();
    let prompt: Vec<String> = DECISIONS
        .iter()
        .map(|x| format!("decision prompt of {} day {}", x.0, x.2))
        .collect();
    let raw: Vec<String> = DECISIONS
        .iter()
        .map(|x| format!("decision answer of {} day {}", x.0, x.2))
        .collect();
    let hp: Vec<Option<String>> = DECISIONS
        .iter()
        .map(|x| {
            x.5.then(|| format!("high prompt of {} day {} <&>", x.0, x.2))
        })
        .collect();
    let hr: Vec<Option<String>> = DECISIONS
        .iter()
        .map(|x| x.5.then(|| format!("high answer of {} day {}", x.0, x.2)))
        .collect();
    let reasoning: Vec<Option<&str>> = DECISIONS
        .iter()
        .map(|x| (!x.4).then_some(if x.3 == "HOLD" { "wait" } else { "trend" }))
        .collect();
    schema::schema("finagent_decisions")
        .unwrap()
        .batch(vec![
            s(DECISIONS.iter().map(|x| x.0).collect()),
            s(DECISIONS.iter().map(|x| x.1).collect()),
            s(vec!["MSFT"; n]),
            d(DECISIONS.iter().map(|x| days[x.2]).collect()),
            s(DECISIONS.iter().map(|x| x.3).collect()),
            b(DECISIONS.iter().map(|x| x.3 != "HOLD").collect()),
            os(vec![Some("analysis"); n]),
            os(reasoning),
            s(prompt.iter().map(String::as_str).collect()),
            i(DECISIONS.iter().map(|x| if x.4 { 3 } else { 1 }).collect()),
            b(DECISIONS.iter().map(|x| x.4).collect()),
            os(DECISIONS
                .iter()
                .map(|x| x.4.then_some("bad json"))
                .collect()),
            s(raw.iter().map(String::as_str).collect()),
            b(DECISIONS.iter().map(|x| x.5).collect()),
            lists(n),
            os(DECISIONS.iter().map(|x| x.5.then_some("lesson")).collect()),
            os(DECISIONS.iter().map(|x| x.5.then_some("better")).collect()),
            os(hp.iter().map(Option::as_deref).collect()),
            i(DECISIONS.iter().map(|x| x.5 as i64).collect()),
            b(vec![false; n]),
            os(hr.iter().map(Option::as_deref).collect()),
        ])
        .unwrap()
}

/// Latest intel on days 0..3 (day 1 failed after 2 attempts), past intel on days 0..3 (day
/// 0 not called: nothing in memory yet).
fn intel_batch(days: &[i32], module: &str) -> RecordBatch {
    let latest = module == "latest";
    let rows: Vec<usize> = (0..3).collect();
    let called: Vec<bool> = rows.iter().map(|k| latest || *k > 0).collect();
    let failed: Vec<bool> = rows.iter().map(|k| latest && *k == 1).collect();
    let prompt: Vec<Option<String>> = rows
        .iter()
        .map(|k| called[*k].then(|| format!("{module} intel prompt day {k}")))
        .collect();
    let raw: Vec<Option<String>> = rows
        .iter()
        .map(|k| called[*k].then(|| format!("{module} intel answer day {k}")))
        .collect();
    let summary: Vec<Option<&str>> = rows
        .iter()
        .map(|k| (called[*k] && !failed[*k]).then_some("same summary"))
        .collect();
    let q = |t: &'static str| -> ArrayRef {
        os(rows
            .iter()
            .map(|k| (latest && !failed[*k]).then_some(t))
            .collect())
    };
    let n = rows.len();
    schema::schema("finagent_intel")
        .unwrap()
        .batch(vec![
            s(vec!["MSFT"; n]),
            d(rows.iter().map(|k| days[*k]).collect()),
            s(vec![module; n]),
            b(called.clone()),
            lists(n),
            lists(n),
            lists(n),
            os(summary),
            q("short q"),
            q("medium q"),
            q("long q"),
            os(prompt.iter().map(Option::as_deref).collect()),
            i(rows
                .iter()
                .map(|k| {
                    if !called[*k] {
                        0
                    } else if failed[*k] {
                        2
                    } else {
                        1
                    }
                })
                .collect()),
            b(failed),
            os(vec![None; n]),
            os(raw.iter().map(Option::as_deref).collect()),
        ])
        .unwrap()
}

fn low_batch(days: &[i32]) -> RecordBatch {
    let n = 3;
    let prompt: Vec<String> = (0..n).map(|k| format!("low prompt day {k}")).collect();
    let raw: Vec<String> = (0..n).map(|k| format!("low answer day {k}")).collect();
    let refl: Vec<String> = (0..n).map(|k| format!("reflection {k}")).collect();
    let o = || os(vec![Some("x"); n]);
    schema::schema("finagent_low_reflection")
        .unwrap()
        .batch(vec![
            s(vec!["MSFT"; n]),
            d(days[..n].to_vec()),
            o(),
            o(),
            o(),
            o(),
            os(refl.iter().map(|x| Some(x.as_str())).collect()),
            s(prompt.iter().map(String::as_str).collect()),
            i(vec![1; n]),
            b(vec![false; n]),
            os(vec![None; n]),
            s(raw.iter().map(String::as_str).collect()),
        ])
        .unwrap()
}

/// (day index, query type, rank, item, item day offset from the decision day, score)
type HitRow = (usize, &'static str, i64, &'static str, i32, f64);

/// Day 1: item a by short and long (shared), b by medium, c by short. Day 2: a by short
/// only. Ages (days): short 2, 5, 1; medium 9; long 2. Day 0 has no hits: its three
/// queries found no memory.
const HITS: [HitRow; 5] = [
    (1, "short", 1, "a", 2, 0.9),
    (1, "short", 2, "c", 5, 0.5),
    (1, "medium", 1, "b", 9, 0.7),
    (1, "long", 1, "a", 2, 0.4),
    (2, "short", 1, "a", 1, 0.3),
];

fn hits_batch(days: &[i32]) -> RecordBatch {
    let n = HITS.len();
    schema::schema("memory_hits")
        .unwrap()
        .batch(vec![
            s(vec!["MSFT"; n]),
            d(HITS.iter().map(|h| days[h.0]).collect()),
            s(HITS.iter().map(|h| h.1).collect()),
            s(vec!["q"; n]),
            i(HITS.iter().map(|h| h.2).collect()),
            s(HITS.iter().map(|h| h.3).collect()),
            d(HITS.iter().map(|h| days[h.0] - h.4).collect()),
            f(HITS.iter().map(|h| h.5).collect()),
            b(vec![true; n]),
        ])
        .unwrap()
}

/// (tool, arr, sr, mdd)
const TOOLS: [(&str, f64, f64, f64); 3] = [
    ("buy_and_hold", 0.123456, 1.5, 0.2),
    ("macd", -0.05, -0.3, 0.25),
    ("mean_reversion", 0.2, 1.9, 0.1),
];

fn tools_batch() -> RecordBatch {
    let n = TOOLS.len();
    schema::schema("finagent_tool_records")
        .unwrap()
        .batch(vec![
            s(vec!["MSFT"; n]),
            s(TOOLS.iter().map(|t| t.0).collect()),
            s(vec!["{}"; n]),
            d(vec![19144; n]),
            d(vec![19508; n]),
            i(vec![251; n]),
            i(vec![252; n]),
            f(TOOLS.iter().map(|t| t.1).collect()),
            f(TOOLS.iter().map(|t| t.2).collect()),
            f(TOOLS.iter().map(|t| t.3).collect()),
            f(vec![0.01; n]),
            f(vec![0.1; n]),
            i(vec![2; n]),
        ])
        .unwrap()
}

struct Fx {
    dir: tempfile::TempDir,
    runs: Vec<(Run, [f64; 6])>,
    days: Vec<i32>,
    inputs: BTreeMap<String, Vec<InputArtifact>>,
}

/// Buy & hold, MACD-like trend and three configurations on 40 real MSFT closes.
fn fixture() -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let bars = read_bars("MSFT_2018-1-1_2020-1-1.csv", 40);
    let days: Vec<i32> = bars.iter().map(|x| x.0).collect();
    let sim = |name: &str, n: usize, up: bool| {
        simulate(name, "finagent", "MSFT", "test", &bars, move |c| {
            sma_above(c, n) == up
        })
    };
    let runs: Vec<(Run, [f64; 6])> = vec![
        simulate("buy_and_hold", "finagent", "MSFT", "test", &bars, |_| true),
        sim("macd", 10, true),
        sim("finagent_MLHT", 5, true),
        sim("finagent_T", 10, false),
        sim("finagent_M", 3, true),
        // A baseline over another window (from day 5): not comparable, left out of Table 4.
        simulate("sma_late", "finagent", "MSFT", "test", &bars[5..], |c| {
            sma_above(c, 3)
        }),
    ]
    .into_iter()
    .map(|r| {
        let m = metrics(&r);
        (r, m)
    })
    .collect();
    let path = dir.path();
    let mut inputs: BTreeMap<String, Vec<InputArtifact>> = BTreeMap::new();
    let mut add = |name: &str, reference: &str, batch: RecordBatch, schema: &'static str| {
        inputs.entry(name.into()).or_default().push(artifact(
            path,
            reference,
            &batch,
            Some(schema),
        ));
    };
    let rs: Vec<&Run> = runs.iter().map(|x| &x.0).collect();
    add(
        "metrics",
        "metrics.metrics",
        metrics_batch(&runs.iter().map(|x| (&x.0, x.1)).collect::<Vec<_>>()),
        "metrics",
    );
    add("equity", "all.equity", equity_batch(&rs), "equity");
    add("trades", "all.trades", trades_batch(&rs, None), "trades");
    add(
        "decisions",
        "finagent.decisions",
        decisions_batch(&days),
        "finagent_decisions",
    );
    add(
        "intel",
        "fa_intel.intel",
        intel_batch(&days, "latest"),
        "finagent_intel",
    );
    add(
        "intel",
        "fa_past.intel",
        intel_batch(&days, "past"),
        "finagent_intel",
    );
    add(
        "low",
        "fa_low.reflections",
        low_batch(&days),
        "finagent_low_reflection",
    );
    add("hits", "fa_hits.hits", hits_batch(&days), "memory_hits");
    add(
        "tool_records",
        "fa_tools.records",
        tools_batch(),
        "finagent_tool_records",
    );
    Fx {
        dir,
        runs,
        days,
        inputs,
    }
}

fn run(
    fx: &Fx,
    inputs: &BTreeMap<String, Vec<InputArtifact>>,
    params: &[(&str, Value)],
) -> flag_core::StageResult<(String, String, PathBuf)> {
    let staging = fx.dir.path().join(format!("out{}", rand_dir()));
    run_stage_of(
        &flag_report::finagent::FinAgentReport,
        inputs,
        params,
        &staging,
    )?;
    let dir = staging.join("report");
    Ok((
        std::fs::read_to_string(dir.join("report.md")).unwrap(),
        std::fs::read_to_string(dir.join("report.html")).unwrap(),
        dir,
    ))
}

/// A fresh staging name per call within one fixture.
fn rand_dir() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

/// The cells of the first Markdown table row labelled `label` after `heading`, bold
/// marks removed.
fn row(md: &str, heading: &str, label: &str) -> Vec<String> {
    let at = md.find(heading).unwrap_or_else(|| panic!("no '{heading}'"));
    let line = md[at..]
        .lines()
        .find(|l| l.starts_with(&format!("| {label} |")))
        .unwrap_or_else(|| panic!("no row '{label}' after '{heading}'"));
    line.split('|')
        .map(|c| c.trim().replace("**", ""))
        .filter(|c| !c.is_empty())
        .skip(1)
        .collect()
}

fn metric_of(fx: &Fx, strategy: &str) -> [f64; 6] {
    fx.runs.iter().find(|r| r.0.strategy == strategy).unwrap().1
}

#[test]
fn finagent_report_table4_and_ablation_cells_equal_the_metrics() {
    let fx = fixture();
    let (md, html, dir) = run(&fx, &fx.inputs, &[]).unwrap();
    for (label, strategy) in [
        ("finagent_MLHT (ours, MLHT)", "finagent_MLHT"),
        ("finagent_T (ours, T)", "finagent_T"),
        ("buy_and_hold", "buy_and_hold"),
        ("macd", "macd"),
    ] {
        let want: Vec<String> = metric_of(&fx, strategy)
            .iter()
            .map(|v| fmt_num(*v, 2))
            .collect();
        assert_eq!(row(&md, "## Table 4 layout", label), want, "{label}");
    }
    assert_eq!(
        row(&md, "## Table 4 layout", "FinAgent (published)"),
        ["44.74", "1.79", "—", "—", "5.57", "—"]
    );
    assert!(md.contains("Zhang et al., KDD 2024, Table 4 (FinAgent row)"));
    let t4 = &md[..md.find("## Table 5 layout").unwrap()];
    assert!(!t4.contains("| sma_late |"));
    assert!(t4.contains(&format!(
        "Left out, evaluated over another period than the configurations: sma_late ({} to",
        flag_report::data::fmt_date(fx.days[5])
    )));
    assert!(md.contains("Published figures without a configuration of ours in the inputs: AAPL, AMZN, ETH, GOOGL, TSLA."));
    // Table 5: rows in the paper's order, ARR and SR.
    let abl = &md[md.find("## Table 5 layout").unwrap()..md.find("## Returns").unwrap()];
    let labels: Vec<&str> = abl
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| Modules"))
        .map(|l| l.split('|').nth(1).unwrap().trim())
        .collect();
    assert_eq!(
        labels,
        ["T (finagent_T)", "M (finagent_M)", "MLHT (finagent_MLHT)"]
    );
    assert!(abl.contains("Not run: ML, MLH."));
    let m = metric_of(&fx, "finagent_M");
    assert_eq!(
        row(&md, "## Table 5 layout", "M (finagent_M)"),
        [fmt_num(m[0], 2), fmt_num(m[1], 2)]
    );
    // Charts: return curves and the full configuration's trades.
    for c in ["finagent_returns_MSFT.svg", "finagent_trades_MSFT.svg"] {
        let svg = std::fs::read_to_string(dir.join("charts").join(c)).unwrap();
        assert!(svg.contains("<svg"), "{c}");
        assert!(html.contains(&format!("charts/{c}")), "{c}");
    }
    let returns = std::fs::read_to_string(dir.join("charts/finagent_returns_MSFT.svg")).unwrap();
    for s in ["finagent_T", "finagent_M", "finagent_MLHT", "buy_and_hold"] {
        assert!(returns.contains(&format!("\n{s}\n")), "legend lacks {s}");
    }
    // Another window's baseline is not drawn.
    assert!(!returns.contains("sma_late") && !returns.contains("macd"));
    let trades = fx
        .runs
        .iter()
        .find(|r| r.0.strategy == "finagent_MLHT")
        .unwrap();
    assert!(md.contains(&format!(
        "trades of finagent_MLHT (MLHT, {} trades)",
        trades.0.trades.len()
    )));
    // Tool records, fractions with 4 decimals, buy-and-hold first.
    assert_eq!(
        row(&md, "## Rule tools", "buy_and_hold"),
        ["0.1235", "1.5000", "0.2000"]
    );
    assert_eq!(
        row(&md, "## Rule tools", "macd"),
        ["-0.0500", "-0.3000", "0.2500"]
    );
    assert!(md.contains("reproduction of FinAgent's released tool records"));
}

#[test]
fn finagent_report_module_counts_and_action_mix() {
    let fx = fixture();
    let (md, _, _) = run(&fx, &fx.inputs, &[]).unwrap();
    let h = "## Modules";
    // rows, calls, failed, failed %, retried, distinct, distinct / calls %
    assert_eq!(
        row(&md, h, "latest market intelligence"),
        ["3", "3", "1", "33.3", "1", "1", "33.3"]
    );
    assert_eq!(
        row(&md, h, "past market intelligence"),
        ["3", "2", "0", "0.0", "0", "1", "50.0"]
    );
    assert_eq!(
        row(&md, h, "low-level reflection"),
        ["3", "3", "0", "0.0", "0", "3", "100.0"]
    );
    assert_eq!(
        row(&md, h, "high-level reflection, finagent_MLHT"),
        ["3", "2", "0", "0.0", "0", "1", "50.0"]
    );
    assert_eq!(
        row(&md, h, "decision, finagent_MLHT"),
        ["3", "3", "1", "33.3", "1", "1", "33.3"]
    );
    assert_eq!(
        row(&md, h, "decision, finagent_T"),
        ["2", "2", "0", "0.0", "0", "2", "100.0"]
    );
    assert!(md.contains("Tokens and time per module: no `usage` input is bound"));
    assert!(md.contains(
        "Source: `finagent.decisions` (module rows); `fa_intel.intel` (module rows); \
         `fa_past.intel` (module rows); `fa_low.reflections` (module rows)."
    ));
    // decisions, BUY, SELL, HOLD, failed, traded, distinct actions
    assert_eq!(
        row(&md, h, "finagent_MLHT (MLHT)"),
        ["3", "1 (33.3 %)", "1 (33.3 %)", "1 (33.3 %)", "1", "2", "3"]
    );
    assert_eq!(
        row(&md, h, "finagent_T (T)"),
        ["2", "1 (50.0 %)", "0 (0.0 %)", "1 (50.0 %)", "0", "1", "2"]
    );
}

fn usage_batch(module: &str, days: &[i32], rows: &[(i64, Option<i64>, i64, f64)]) -> RecordBatch {
    let n = rows.len();
    schema::schema("llm_usage")
        .unwrap()
        .batch(vec![
            s(vec!["MSFT"; n]),
            d(days[..n].to_vec()),
            s(vec![module; n]),
            i(rows.iter().map(|r| r.0).collect()),
            Arc::new(Int64Array::from(
                rows.iter().map(|r| r.1).collect::<Vec<_>>(),
            )),
            i(rows.iter().map(|r| r.2).collect()),
            f(rows.iter().map(|r| r.3).collect()),
        ])
        .unwrap()
}

#[test]
fn finagent_report_usage_per_module_by_hand() {
    let fx = fixture();
    let mut inputs = fx.inputs.clone();
    let dir = fx.dir.path();
    // (attempts, prompt tokens, answer tokens, ms); the decisions came over HTTP (uncounted).
    let latest = usage_batch(
        "latest_intel",
        &fx.days,
        &[
            (1, Some(100), 10, 1000.0),
            (2, Some(200), 20, 2000.0),
            (1, Some(300), 30, 3000.0),
        ],
    );
    let decision = usage_batch(
        "decision",
        &fx.days,
        &[(1, None, 5, 500.0), (1, None, 7, 1500.0)],
    );
    for (reference, batch) in [("finagent.usage", decision), ("fa_intel.usage", latest)] {
        inputs.entry("usage".into()).or_default().push(artifact(
            dir,
            reference,
            &batch,
            Some("llm_usage"),
        ));
    }
    let (md, _, _) = run(&fx, &inputs, &[]).unwrap();
    let h = "## Modules";
    // calls, attempts, prompt tokens / call, answer tokens / call, time s, ms / call, time %
    assert_eq!(
        row(&md, h, "latest_intel"),
        ["3", "4", "200", "20", "6.0", "2000", "75.0"]
    );
    assert_eq!(
        row(&md, h, "decision"),
        ["2", "2", "-", "6", "2.0", "1000", "25.0"]
    );
    // Pipeline order, whatever the binding order.
    assert!(md.find("| latest_intel").unwrap() < md.find("| decision |").unwrap());
    assert!(md.contains("Source: `finagent.usage` (usage rows); `fa_intel.usage` (usage rows)."));
}

#[test]
fn finagent_report_retrieval_overlap_and_ages_by_hand() {
    let fx = fixture();
    let (md, _, _) = run(&fx, &fx.inputs, &[]).unwrap();
    let h = "## Retrieval";
    // short: queries (day 1, day 2) = 2, hits 3, kept 3; scores 0.3, 0.5, 0.9 ->
    // min 0.3, p25 0.4, median 0.5, p75 0.7, max 0.9, mean 0.5666...; ages 1, 2, 5 ->
    // min 1, p25 1.5, median 2, p75 3.5, max 5; shared: a on day 1 (long too) = 1 of 3.
    assert_eq!(
        row(&md, h, "short"),
        [
            "2",
            "3",
            "3",
            "0.300",
            "0.400",
            "0.500",
            "0.700",
            "0.900",
            "0.567",
            "1.0",
            "1.5",
            "2.0",
            "3.5",
            "5.0",
            "1 (33.3 %)"
        ]
    );
    assert_eq!(
        row(&md, h, "medium"),
        [
            "1",
            "1",
            "1",
            "0.700",
            "0.700",
            "0.700",
            "0.700",
            "0.700",
            "0.700",
            "9.0",
            "9.0",
            "9.0",
            "9.0",
            "9.0",
            "0 (0.0 %)"
        ]
    );
    assert_eq!(row(&md, h, "long")[14], "1 (100.0 %)");
    // Distinct (day, item): day 1 a, b, c; day 2 a = 4, of which 1 by two types.
    assert!(
        md.contains("Overlap: 1 of 4 (ticker, day, item) were retrieved by two query types or more (25.00 %)."),
        "{md}"
    );
    // Latest intel asked 3 queries on days 0 and 2 (day 1 failed: no queries); day 0 has
    // no hits, day 2 only short: short 1 of 2 empty, medium and long 2 of 2.
    let empty = &md[md.find("News queries with empty memory").unwrap()..];
    assert_eq!(row(empty, "", "short"), ["2", "1", "50.0"]);
    assert_eq!(row(empty, "", "medium"), ["2", "2", "100.0"]);
    assert_eq!(row(empty, "", "long"), ["2", "2", "100.0"]);
}

#[test]
fn finagent_report_traces_exactly_the_requested_day() {
    let fx = fixture();
    let date = flag_report::data::fmt_date(fx.days[1]);
    let trace = json!({"strategy": "finagent_MLHT", "ticker": "MSFT", "date": date});
    let (md, html, _) = run(&fx, &fx.inputs, &[("trace", trace)]).unwrap();
    let t = &md[md.find("## One day traced").unwrap()..md.find("## Inputs").unwrap()];
    assert!(t.contains(&format!("### MSFT on {date}, finagent_MLHT")));
    let want = [
        "latest intel prompt day 1",
        "latest intel answer day 1",
        "past intel prompt day 1",
        "past intel answer day 1",
        "low prompt day 1",
        "low answer day 1",
        "high prompt of finagent_MLHT day 1 <&>",
        "high answer of finagent_MLHT day 1",
        "decision prompt of finagent_MLHT day 1",
        "decision answer of finagent_MLHT day 1",
    ];
    // In the method's order, each once.
    let mut at = 0;
    for w in want {
        let pos = t[at..]
            .find(w)
            .unwrap_or_else(|| panic!("'{w}' missing or out of order"));
        at += pos + w.len();
        assert_eq!(t.matches(w).count(), 1, "{w}");
    }
    for other in ["day 0", "day 2", "finagent_T day"] {
        assert!(!t.contains(other), "trace shows '{other}'");
    }
    assert!(t.contains("called, 2 attempts, failed (no valid answer)"));
    assert!(t.contains("```text\nlow prompt day 1\n```"));
    // HTML: collapsible blocks, text escaped.
    assert_eq!(html.matches("<details>").count(), 10);
    assert!(html.contains("high prompt of finagent_MLHT day 1 &lt;&amp;&gt;"));
    assert!(!html.contains("\u{1}") && !md.contains("\u{1}"));

    // Default: the first decision of the first strategy (finagent_MLHT, day 0); the past
    // intel was not called that day and the high-level reflection did not run.
    let (md, _, _) = run(&fx, &fx.inputs, &[]).unwrap();
    let t = &md[md.find("## One day traced").unwrap()..];
    let day0 = flag_report::data::fmt_date(fx.days[0]);
    assert!(t.contains(&format!("### MSFT on {day0}, finagent_MLHT")));
    assert!(t.contains("latest intel prompt day 0") && !t.contains("past intel prompt"));
    assert!(t.contains("**2. Past market intelligence**: not called (nothing to read that day)."));
    assert!(t.contains("**4. High-level reflection**: not called"));
}

#[test]
fn finagent_report_without_optional_inputs_leaves_their_sections_out() {
    let fx = fixture();
    let mut inputs = fx.inputs.clone();
    for k in ["intel", "low", "hits", "tool_records"] {
        inputs.remove(k);
    }
    let (md, html, _) = run(&fx, &inputs, &[]).unwrap();
    assert!(md.contains("## Table 4 layout") && md.contains("## Modules"));
    assert!(!md.contains("## Retrieval") && !md.contains("## Rule tools"));
    assert!(!md.contains("market intelligence |") && !md.contains("low-level reflection |"));
    assert!(md.contains("**1. Latest market intelligence**: no intel input bound."));
    assert!(md.contains("**3. Low-level reflection**: no low input bound."));
    assert!(md.contains("decision prompt of finagent_MLHT day 0"));
    assert!(html.contains("<details>"));
    // Hits without intel: retrieval shown, empty memory not derivable.
    let mut inputs = fx.inputs.clone();
    inputs.remove("intel");
    let (md, _, _) = run(&fx, &inputs, &[]).unwrap();
    assert!(md.contains("## Retrieval"));
    assert!(md.contains("Queries with empty memory: not derivable without the intel input"));
}

#[test]
fn finagent_report_bad_params_name_the_param() {
    let fx = fixture();
    let date = flag_report::data::fmt_date(fx.days[0]);
    let cases = [
        (
            "trace",
            json!({"strategy": "finagent_X", "ticker": "MSFT", "date": date}),
            "finagent_X",
        ),
        (
            "trace",
            json!({"strategy": "finagent_T", "ticker": "MSFT", "date": "2001-01-01"}),
            "2001-01-01",
        ),
        (
            "trace",
            json!({"strategy": "finagent_T", "ticker": "MSFT"}),
            "date",
        ),
        ("published", json!({"MSFT": {"arr": "high"}}), "MSFT.arr"),
        ("published", json!({"MSFT": {"cr": 1.0}}), "cr"),
    ];
    for (name, value, needle) in cases {
        let err = run(&fx, &fx.inputs, &[(name, value.clone())])
            .err()
            .unwrap_or_else(|| panic!("{name} = {value} was accepted"))
            .to_string();
        assert!(err.contains(name) && err.contains(needle), "{err}");
    }
}
