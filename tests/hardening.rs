//! Hardening (issue 15): user-given names never become paths outside the store, and
//! `flag show --sql` is read-only.
mod common;

use std::path::{Path, PathBuf};

use common::*;

/// A project root with a store that already holds a run of `ohlcv`, so "unchanged" means
/// something.
struct Fixture {
    root: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let root = tempfile::tempdir().unwrap();
        copy_project(root.path());
        let f = Fixture { root };
        let mut c = flag(f.root(), &f.store());
        c.args([
            "run",
            "pipelines/test-small.yaml",
            "--only",
            "ohlcv",
            "--set",
        ])
        .arg(format!("data_dir={}", data_dir().display()));
        run_ok(&mut c);
        f
    }
    fn root(&self) -> &Path {
        self.root.path()
    }
    fn store(&self) -> PathBuf {
        self.root.path().join("store")
    }
}

/// The `ohlcv` stage of test-small.yaml under another pipeline name.
fn pipeline_named(name: &str) -> String {
    let text = std::fs::read_to_string(repo_root().join("pipelines/test-small.yaml")).unwrap();
    assert!(text.contains("\nname: test-small\n"));
    text.replace("\nname: test-small\n", &format!("\nname: {name}\n"))
}

#[test]
fn pipeline_names_that_are_paths_are_refused() {
    let f = Fixture::new();
    let outside = tempfile::tempdir().unwrap();
    // An existing folder the run must not write into.
    let victim = outside.path().join("victim");
    std::fs::create_dir_all(&victim).unwrap();
    std::fs::write(victim.join("ohlcv"), "precious").unwrap();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "absolute",
            victim.display().to_string(),
            "may not contain '/'",
        ),
        (
            "dotdot",
            "../../../../../../../../..".to_string()
                + &outside.path().join("x").display().to_string(),
            "may not contain '.'",
        ),
        ("reserved", "LAST".into(), "'LAST' is reserved by the store"),
        ("empty", "\"\"".into(), "'' is empty"),
        ("dot", "\".\"".into(), "may not contain '.'"),
        ("space", "\"a b\"".into(), "may not contain ' '"),
    ];
    for (case, name, want) in cases {
        let file = f.root().join("pipelines").join(format!("{case}.yaml"));
        std::fs::write(&file, pipeline_named(&name)).unwrap();
        let before = snapshot(&f.store());
        let mut c = flag(f.root(), &f.store());
        c.arg("run")
            .arg(&file)
            .arg("--set")
            .arg(format!("data_dir={}", data_dir().display()));
        let out = c.output().unwrap();
        let msg = format!("{}{}", stdout(&out), stderr(&out));
        assert!(!out.status.success(), "{case}: expected failure\n{msg}");
        // The name is on line 2 of the file.
        assert!(
            msg.contains(&format!("{}:2", file.display())),
            "{case}: no file:line in\n{msg}"
        );
        assert!(msg.contains("pipeline name"), "{case}: {msg}");
        assert!(msg.contains(want), "{case}: expected '{want}' in\n{msg}");
        assert_eq!(before, snapshot(&f.store()), "{case}: the store changed");
        assert_eq!(
            std::fs::read_to_string(victim.join("ohlcv")).unwrap(),
            "precious",
            "{case}: wrote outside the store"
        );
        assert_eq!(
            std::fs::read_dir(outside.path()).unwrap().count(),
            1,
            "{case}: created something next to the victim"
        );
        assert!(f.store().join("refs/LAST").is_file(), "{case}");
    }
    // The store still works for a well-named pipeline afterwards.
    let mut c = flag(f.root(), &f.store());
    c.args([
        "run",
        "pipelines/test-small.yaml",
        "--only",
        "ohlcv",
        "--set",
    ])
    .arg(format!("data_dir={}", data_dir().display()));
    run_ok(&mut c);
}

#[test]
fn a_file_name_that_is_not_a_name_needs_name() {
    let f = Fixture::new();
    let text = pipeline_named("x");
    let text = text.replace("\nname: x\n", "\n");
    let file = f.root().join("pipelines").join("my pipeline.yaml");
    std::fs::write(&file, text).unwrap();
    let before = snapshot(&f.store());
    let out = flag(f.root(), &f.store())
        .arg("run")
        .arg(&file)
        .output()
        .unwrap();
    let msg = format!("{}{}", stdout(&out), stderr(&out));
    assert!(!out.status.success(), "{msg}");
    assert!(msg.contains("taken from the file name"), "{msg}");
    assert!(msg.contains(&format!("{}:1", file.display())), "{msg}");
    assert_eq!(before, snapshot(&f.store()));
}

#[test]
fn stage_names_that_are_paths_are_refused() {
    let f = Fixture::new();
    let text = pipeline_named("stagenames").replace("  ohlcv:\n", "  \"oh lcv\":\n");
    let file = f.root().join("pipelines").join("stagenames.yaml");
    std::fs::write(&file, text).unwrap();
    let before = snapshot(&f.store());
    let out = flag(f.root(), &f.store())
        .arg("run")
        .arg(&file)
        .output()
        .unwrap();
    let msg = format!("{}{}", stdout(&out), stderr(&out));
    assert!(!out.status.success(), "{msg}");
    assert!(msg.contains("stage name 'oh lcv'"), "{msg}");
    assert_eq!(before, snapshot(&f.store()));
}

#[test]
fn show_sql_is_read_only() {
    let f = Fixture::new();
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("x.csv");
    let object = f.store().join("objects");
    let cases = [
        (
            "copy",
            format!("COPY (SELECT 1) TO '{}'", target.display()),
            "COPY",
        ),
        (
            "copy_object",
            format!(
                "COPY (SELECT 1 AS a) TO '{}/ab/evil.csv' STORED AS CSV",
                object.display()
            ),
            "COPY",
        ),
        (
            "explain_analyze_copy",
            format!("EXPLAIN ANALYZE COPY (SELECT 1) TO '{}'", target.display()),
            "COPY",
        ),
        (
            "create",
            "CREATE TABLE u AS SELECT * FROM t".into(),
            "CREATE",
        ),
        (
            "external",
            format!(
                "CREATE EXTERNAL TABLE e STORED AS CSV LOCATION '{}'",
                target.display()
            ),
            "CREATE EXTERNAL TABLE",
        ),
        ("insert", "INSERT INTO t VALUES (1)".into(), "INSERT"),
        ("drop", "DROP TABLE t".into(), "DROP"),
        (
            "set",
            "SET datafusion.execution.batch_size = 1".into(),
            "SET",
        ),
        (
            "two",
            format!("SELECT 1; COPY (SELECT 1) TO '{}'", target.display()),
            "single query statement, got 2",
        ),
        ("select_into", "SELECT * INTO u FROM t".into(), ""),
    ];
    for (case, sql, want) in cases {
        let before = snapshot(&f.store());
        let out = flag(f.root(), &f.store())
            .args(["show", "ohlcv.bars", "--sql", &sql])
            .output()
            .unwrap();
        let msg = format!("{}{}", stdout(&out), stderr(&out));
        assert!(!out.status.success(), "{case}: expected refusal\n{msg}");
        assert!(msg.contains(want), "{case}: expected '{want}' in\n{msg}");
        if case != "select_into" {
            assert!(msg.contains("read-only"), "{case}: {msg}");
        }
        assert!(!target.exists(), "{case}: wrote {}", target.display());
        assert_eq!(before, snapshot(&f.store()), "{case}: the store changed");
    }
    // Plain queries still work.
    for sql in [
        "SELECT count(*) AS n FROM t",
        "WITH a AS (SELECT * FROM t) SELECT count(*) AS n FROM a",
        "EXPLAIN SELECT count(*) FROM ohlcv_bars",
    ] {
        let out = run_ok(flag(f.root(), &f.store()).args(["show", "ohlcv.bars", "--sql", sql]));
        assert!(!stdout(&out).trim().is_empty(), "{sql}");
    }
}
