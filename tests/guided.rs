//! `pipelines/guided.yaml` end to end through the real binary, on real TDQN data and the
//! real embedded model, shrunk by `--set` so it runs in CI: two tickers, a short window,
//! one strategist decision every 60 days, 2 runs of 1 episode per RL agent. Checks that the
//! strategist's signal reaches the guided agent, that every agent is scored per run, and
//! that the report's numbers are those of the metrics artifact.
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use flag_core::arrow::array::{Array, BooleanArray, Date32Array, Float64Array, StringArray};
use flag_core::parquet_io::read_parquet_file;

fn files(root: &Path, store: &Path, artifact: &str) -> Vec<PathBuf> {
    let out =
        run_ok(flag(root, store).args(["path", artifact, "--pipeline", "pipelines/guided.yaml"]));
    stdout(&out).lines().map(PathBuf::from).collect()
}

/// strategy -> ticker -> SR on the test split.
fn test_sharpes(file: &Path) -> BTreeMap<String, BTreeMap<String, f64>> {
    let (_, batches) = read_parquet_file(file).unwrap();
    let mut out: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    for b in batches {
        let col = |n: &str| b.column_by_name(n).unwrap().clone();
        let (s, t, sp) = (col("strategy"), col("ticker"), col("split"));
        let sr = col("sr");
        let s = s.as_any().downcast_ref::<StringArray>().unwrap();
        let t = t.as_any().downcast_ref::<StringArray>().unwrap();
        let sp = sp.as_any().downcast_ref::<StringArray>().unwrap();
        let sr = sr.as_any().downcast_ref::<Float64Array>().unwrap();
        for i in 0..b.num_rows() {
            if sp.value(i) == "test" {
                out.entry(s.value(i).to_string())
                    .or_default()
                    .insert(t.value(i).to_string(), sr.value(i));
            }
        }
    }
    out
}

/// (distinct explanations, valid decisions, LONG decisions) of `ticker`'s strategist
/// decisions dated in [from, to] (days since 1970), from the signals artifact.
fn answer_variety(file: &Path, ticker: &str, from: i32, to: i32) -> (usize, usize, usize) {
    let (_, batches) = read_parquet_file(file).unwrap();
    let mut decisions: BTreeMap<i32, (String, f64)> = BTreeMap::new();
    for b in batches {
        let col = |n: &str| b.column_by_name(n).unwrap().clone();
        let (t, date, failed) = (col("ticker"), col("decision_date"), col("failed"));
        let (expl, dir) = (col("explanation"), col("direction"));
        let t = t.as_any().downcast_ref::<StringArray>().unwrap();
        let date = date.as_any().downcast_ref::<Date32Array>().unwrap();
        let failed = failed.as_any().downcast_ref::<BooleanArray>().unwrap();
        let expl = expl.as_any().downcast_ref::<StringArray>().unwrap();
        let dir = dir.as_any().downcast_ref::<Float64Array>().unwrap();
        for i in 0..b.num_rows() {
            let d = date.value(i);
            if t.value(i) == ticker && !failed.value(i) && (from..=to).contains(&d) {
                decisions.insert(d, (expl.value(i).to_string(), dir.value(i)));
            }
        }
    }
    let distinct: std::collections::BTreeSet<&String> =
        decisions.values().map(|(e, _)| e).collect();
    let long = decisions.values().filter(|(_, d)| *d > 0.0).count();
    (distinct.len(), decisions.len(), long)
}

#[test]
fn guided_pipeline_runs_end_to_end_and_reports_its_artifacts() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("project");
    copy_project(&root);
    let store = tmp.path().join("store");
    let data = data_dir();
    let sets = [
        format!("data_dir={}", data.display()),
        "tickers=[AAPL, MSFT]".into(),
        "runs=2".into(),
        "episodes=1".into(),
        "train_start=2017-01-01".into(),
        "test_end=2018-06-29".into(),
        "strategist.period=60".into(),
    ];
    let mut cmd = flag(&root, &store);
    cmd.args(["run", "pipelines/guided.yaml", "--json"]);
    for s in &sets {
        cmd.args(["--set", s]);
    }
    let out = run_ok(&mut cmd);
    let recs = records(&out);
    for stage in [
        "strategist",
        "llm_only",
        "rl_only",
        "guided",
        "metrics",
        "report",
    ] {
        assert_eq!(recs[stage]["status"], "ran", "{stage}: {:?}", recs[stage]);
    }

    let metrics = files(&root, &store, "metrics.metrics");
    let sr = test_sharpes(&metrics[0]);
    for agent in ["tdqn", "llm_guided_ddqn"] {
        for run in 0..2 {
            let s = format!("{agent}#{run}");
            assert_eq!(sr[&s].len(), 2, "{s} scored on both tickers");
        }
    }
    assert_eq!(sr["llm_only_P3"].len(), 2);

    // A directory output is published under its file names in out/<pipeline>/<stage>/.
    let report_dir = store.join("out/guided/report/report");
    let md = std::fs::read_to_string(report_dir.join("report.md")).unwrap();
    // The comparison row of AAPL: the mean (std) of the two runs, read back from metrics.
    let aapl: Vec<f64> = (0..2)
        .map(|r| sr[&format!("llm_guided_ddqn#{r}")]["AAPL"])
        .collect();
    let mean = (aapl[0] + aapl[1]) / 2.0;
    let std = ((aapl[0] - mean).powi(2) + (aapl[1] - mean).powi(2)).sqrt();
    let want = format!("{mean:.2} ({std:.2})");
    let row = md
        .lines()
        .find(|l| l.starts_with("| AAPL |"))
        .expect("an AAPL row");
    assert!(row.contains(&want), "{row} should hold {want}");
    assert!(
        row.contains(&format!("{:.2}", sr["llm_only_P3"]["AAPL"])),
        "{row}"
    );
    // The published TDQN figure comes from the pipeline's params.
    assert!(md.contains("| AAPL | 1.424 |"), "{md}");
    // Failure counts of the strategist are in the report.
    assert!(md.contains("Strategist failures"), "{md}");
    // So is the answer variety: distinct explanations / valid decisions of the test split
    // (2018-01-01 = day 17532 .. 2018-06-29 = day 17711), recounted from the signals.
    let signals = files(&root, &store, "strategist.signals");
    let (distinct, valid, long) = answer_variety(&signals[0], "AAPL", 17532, 17711);
    // SmolLM2-135M often copies the prompt's example, which is rejected: valid may be 0.
    let share = if valid == 0 {
        "-".to_string()
    } else {
        format!("{:.0}% LONG", 100.0 * long as f64 / valid as f64)
    };
    let want = format!("{distinct}/{valid}, {share}");
    let variety = &md[md.find("Answer variety").expect("an answer-variety table")..];
    let row = variety
        .lines()
        .find(|l| l.starts_with("| AAPL |"))
        .expect("an AAPL variety row");
    assert!(row.contains(&want), "{row} should hold {want}");
    for chart in [
        "charts/signals_AAPL.svg",
        "charts/episodes_AAPL_test.svg",
        "charts/episodes_MSFT_train.svg",
    ] {
        assert!(report_dir.join(chart).exists(), "{chart}");
    }

    // Only the guided agent reads the signal: a changed prompt reruns the strategist and
    // everything downstream of it, but the RL-only agent stays cached.
    let mut cmd = flag(&root, &store);
    cmd.args(["run", "pipelines/guided.yaml", "--json", "--dry-run"]);
    for s in &sets {
        cmd.args(["--set", s]);
    }
    cmd.args(["--set", "prompt=P2"]);
    let recs = records(&run_ok(&mut cmd));
    assert_eq!(recs["rl_only"]["status"], "cached", "{:?}", recs["rl_only"]);
    for stage in ["strategist", "guided", "llm_only"] {
        assert_ne!(recs[stage]["status"], "cached", "{stage}");
    }
}
