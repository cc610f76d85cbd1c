//! Caching behaviour with the real binary on real data: all-cached second run, a param change
//! reruns exactly the stage and its dependants, early cutoff, and SQL edits invalidate.
mod common;

use common::*;

fn run_json(
    root: &std::path::Path,
    store: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
    let data = data_dir();
    let mut c = flag(root, store);
    c.args(["run", "pipelines/test-small.yaml", "--json", "--set"])
        .arg(format!("data_dir={}", data.display()))
        .args(extra);
    run_ok(&mut c)
}

#[test]
fn second_run_is_all_cached_and_a_param_change_reruns_exactly_its_dependants() {
    let root = tempfile::tempdir().unwrap();
    copy_project(root.path());
    let store = root.path().join("store");

    let first = statuses(&run_json(root.path(), &store, &[]));
    assert!(first.values().all(|s| s == "ran"), "{first:?}");
    assert_eq!(first.len(), 5);

    let second = statuses(&run_json(root.path(), &store, &[]));
    assert!(second.values().all(|s| s == "cached"), "{second:?}");

    // A baselines param: baselines, metrics and report rerun; ohlcv and indicators do not.
    let third = run_json(root.path(), &store, &["--set", "baselines.cost=0.002"]);
    let st = statuses(&third);
    assert_eq!(st["ohlcv"], "cached");
    assert_eq!(st["indicators"], "cached");
    assert_eq!(st["baselines"], "ran");
    assert_eq!(st["metrics"], "ran");
    assert_eq!(st["report"], "ran");
    let reason = records(&third)["baselines"]["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        reason.contains("param cost: 0.001 -> 0.002"),
        "reason: {reason}"
    );

    // Back to the original value: every stage is a cache hit again.
    let fourth = statuses(&run_json(root.path(), &store, &[]));
    assert!(fourth.values().all(|s| s == "cached"), "{fourth:?}");
}

#[test]
fn identical_upstream_bytes_stop_the_rerun_there() {
    let root = tempfile::tempdir().unwrap();
    copy_project(root.path());
    let store = root.path().join("store");
    let first = run_json(root.path(), &store, &[]);
    // An end date past the data changes ingest's params (so it reruns) but not its output.
    let second = run_json(root.path(), &store, &["--set", "ohlcv.end=2030-01-01"]);
    let st = statuses(&second);
    assert_eq!(st["ohlcv"], "ran", "{st:?}");
    assert_eq!(
        output_hashes(&first)["ohlcv"],
        output_hashes(&second)["ohlcv"]
    );
    for s in ["indicators", "baselines", "metrics", "report"] {
        assert_eq!(st[s], "cached", "{s} should be cut off: {st:?}");
    }
}

#[test]
fn editing_a_stage_sql_file_invalidates_that_stage() {
    let root = tempfile::tempdir().unwrap();
    copy_project(root.path());
    let store = root.path().join("store");
    run_json(root.path(), &store, &[]);
    let sql_dir = root.path().join("stages/market/sql");
    let sql = std::fs::read_dir(&sql_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "sql"))
        .expect("an indicators SQL file");
    let mut text = std::fs::read_to_string(&sql).unwrap();
    text.push_str("\n-- a comment: the bytes changed, so the key must change\n");
    std::fs::write(&sql, text).unwrap();
    let out = run_json(root.path(), &store, &[]);
    let st = statuses(&out);
    assert_eq!(st["ohlcv"], "cached");
    assert_eq!(st["indicators"], "ran", "{st:?}");
    let reason = records(&out)["indicators"]["reason"]
        .as_str()
        .unwrap()
        .to_string();
    let name = sql.file_name().unwrap().to_string_lossy().to_string();
    assert!(
        reason.contains(&name) && reason.contains("changed"),
        "reason: {reason}"
    );
    // The output is the same (a comment), so downstream stops early.
    assert_eq!(st["baselines"], "cached", "{st:?}");
}

#[test]
fn dry_run_and_status_explain_without_running() {
    let root = tempfile::tempdir().unwrap();
    copy_project(root.path());
    let store = root.path().join("store");
    let data = data_dir();
    let mut c = flag(root.path(), &store);
    c.args(["run", "pipelines/test-small.yaml", "--dry-run", "--set"])
        .arg(format!("data_dir={}", data.display()));
    let out = stdout(&run_ok(&mut c));
    assert!(
        out.contains("stale") && out.contains("new: no earlier run"),
        "{out}"
    );
    assert!(out.contains("upstream stage 'ohlcv' will run"), "{out}");
    assert!(snapshot(&store).is_empty(), "a dry run wrote to the store");

    run_json(root.path(), &store, &[]);
    let mut c = flag(root.path(), &store);
    c.args([
        "status",
        "pipelines/test-small.yaml",
        "--set",
        "baselines.cost=0.003",
        "--set",
    ])
    .arg(format!("data_dir={}", data.display()));
    let out = stdout(&run_ok(&mut c));
    assert!(
        out.lines()
            .any(|l| l.starts_with("cached") && l.contains("indicators")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("stale") && l.contains("baselines") && l.contains("param cost")),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l.starts_with("stale")
            && l.contains("metrics")
            && l.contains("upstream stage 'baselines' will run")),
        "{out}"
    );
}

#[test]
fn show_and_path_open_artifacts_with_standard_tools() {
    let root = tempfile::tempdir().unwrap();
    copy_project(root.path());
    let store = root.path().join("store");
    run_json(root.path(), &store, &[]);
    let mut c = flag(root.path(), &store);
    c.args([
        "show",
        "ohlcv.bars",
        "--sql",
        "SELECT ticker, COUNT(*) AS n FROM t GROUP BY ticker ORDER BY ticker",
    ]);
    let out = stdout(&run_ok(&mut c));
    assert!(
        out.contains("AAPL") && out.contains("MSFT") && out.contains("| n "),
        "{out}"
    );
    let mut c = flag(root.path(), &store);
    c.args(["path", "indicators.table"]);
    let out = stdout(&run_ok(&mut c));
    let p = std::path::PathBuf::from(out.trim());
    assert!(p.is_file() && p.extension().unwrap() == "parquet", "{out}");
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!(&bytes[..4], b"PAR1");
    // Regression: `--pipeline` with the name of a pipeline run in this store (not a file)
    // failed with "reading test-small: No such file".
    let mut c = flag(root.path(), &store);
    c.args(["path", "indicators.table", "--pipeline", "test-small"]);
    assert_eq!(stdout(&run_ok(&mut c)), out);
    let mut c = flag(root.path(), &store);
    c.args(["path", "indicators.table", "--pipeline", "never-ran"]);
    let o = c.output().unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("the name of one that has run"),
        "{}",
        stderr(&o)
    );
}

/// Regression: with a relative store path (the default `./artifacts` from the project root)
/// the links under out/ pointed at `./artifacts/objects/...` relative to their own
/// directory, so they dangled.
#[test]
fn published_links_resolve_with_a_relative_store_path() {
    let root = tempfile::tempdir().unwrap();
    copy_project(root.path());
    let data = data_dir();
    let mut c = flag(root.path(), std::path::Path::new("rel-store"));
    c.args(["run", "pipelines/test-small.yaml", "--set"])
        .arg(format!("data_dir={}", data.display()));
    run_ok(&mut c);
    let out = root.path().join("rel-store/out/test-small");
    let md = std::fs::read_to_string(out.join("report/report/report.md")).unwrap();
    assert!(md.starts_with("# Test pipeline"), "{md}");
    let bars = std::fs::read(out.join("ohlcv/bars.parquet")).unwrap();
    assert_eq!(&bars[..4], b"PAR1");
}
