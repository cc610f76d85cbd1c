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
    // Names that would read outside refs/ are refused too.
    let evil = f.root().join("pipelines").join("evil.yaml");
    std::fs::write(&evil, "name: ../../x\nstages: {}\n").unwrap();
    for args in [
        vec![
            "show".to_string(),
            "ohlcv.bars".into(),
            "--pipeline".into(),
            evil.display().to_string(),
        ],
        vec!["path".to_string(), "x/y.bars".into()],
    ] {
        let out = flag(f.root(), &f.store()).args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr(&out).contains("name"), "{args:?}: {}", stderr(&out));
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

fn run_small(root: &Path, store: &Path) -> std::process::Output {
    let mut c = flag(root, store);
    c.args([
        "run",
        "pipelines/test-small.yaml",
        "--only",
        "ohlcv",
        "--set",
    ])
    .arg(format!("data_dir={}", data_dir().display()));
    c.output().unwrap()
}

/// Every file under `dir`, with its bytes.
fn files(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

#[test]
fn a_folder_that_is_not_a_store_is_refused_and_left_alone() {
    let root = tempfile::tempdir().unwrap();
    copy_project(root.path());
    let dir = root.path().join("mine");
    for (p, text) in [
        ("notes.txt", "mine"),
        ("tmp/draft.txt", "mine"),
        ("objects/photo.jpg", "mine"),
        ("logs/app.log", "mine"),
    ] {
        std::fs::create_dir_all(dir.join(p).parent().unwrap()).unwrap();
        std::fs::write(dir.join(p), text).unwrap();
    }
    let before = files(&dir);
    let out = run_small(root.path(), &dir);
    let msg = format!("{}{}", stdout(&out), stderr(&out));
    assert!(!out.status.success(), "{msg}");
    assert!(msg.contains("not a flag store"), "{msg}");
    assert!(msg.contains(&dir.display().to_string()), "{msg}");
    assert!(msg.contains("'notes.txt'"), "{msg}");
    for cmd in [
        &["gc", "--prune"][..],
        &["verify"],
        &["status", "pipelines/test-small.yaml"],
    ] {
        let out = flag(root.path(), &dir).args(cmd).output().unwrap();
        let msg = format!("{}{}", stdout(&out), stderr(&out));
        assert!(!out.status.success(), "{cmd:?}: {msg}");
        assert!(msg.contains("not a flag store"), "{cmd:?}: {msg}");
    }
    assert_eq!(before, files(&dir), "the folder's files changed");

    // A folder with only the store's folders' names but no objects/manifests/refs is no store.
    let dir2 = root.path().join("project");
    std::fs::create_dir_all(dir2.join("tmp")).unwrap();
    std::fs::write(dir2.join("tmp/keep.txt"), "mine").unwrap();
    let out = run_small(root.path(), &dir2);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not a flag store"),
        "{}",
        stderr(&out)
    );
    assert!(dir2.join("tmp/keep.txt").is_file());

    // A marker of another format is refused too.
    let dir3 = root.path().join("future");
    std::fs::create_dir_all(&dir3).unwrap();
    std::fs::write(dir3.join("flag-store"), "flag store\nformat 99\n").unwrap();
    let out = run_small(root.path(), &dir3);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("format 99"), "{}", stderr(&out));
}

#[test]
fn new_and_empty_folders_become_stores_and_old_stores_get_the_marker() {
    let root = tempfile::tempdir().unwrap();
    copy_project(root.path());
    // An empty folder is fine and gets the marker.
    let empty = root.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    // `just bench` writes its results into artifacts/bench/, beside the default store.
    std::fs::create_dir_all(empty.join("bench")).unwrap();
    std::fs::write(empty.join("bench/store.json"), "{}").unwrap();
    run_ok(&mut {
        let mut c = flag(root.path(), &empty);
        c.args([
            "run",
            "pipelines/test-small.yaml",
            "--only",
            "ohlcv",
            "--set",
        ])
        .arg(format!("data_dir={}", data_dir().display()));
        c
    });
    assert_eq!(
        std::fs::read_to_string(empty.join("flag-store")).unwrap(),
        "flag store\nformat 1\n"
    );
    assert_eq!(
        std::fs::read_to_string(empty.join("bench/store.json")).unwrap(),
        "{}"
    );

    // A store made before the marker: its layout and nothing else. It is taken, and marked.
    let store = root.path().join("store");
    assert!(run_small(root.path(), &store).status.success());
    std::fs::remove_file(store.join("flag-store")).unwrap();
    // Files the store did not name, inside its folders: never deleted.
    for p in [
        "objects/ab/not-an-object.txt",
        "objects/README",
        "logs/notes.txt",
        "tmp/keep.txt",
    ] {
        std::fs::create_dir_all(store.join(p).parent().unwrap()).unwrap();
        std::fs::write(store.join(p), "mine").unwrap();
    }
    // An orphan object and log the store did name: gc removes them.
    let orphan = format!("objects/ab/ab{}.parquet", "0".repeat(62));
    let orphan_log = format!("logs/{}.log", "1".repeat(64));
    std::fs::write(store.join(&orphan), "x").unwrap();
    std::fs::write(store.join(&orphan_log), "x").unwrap();
    // A staging folder a killed recompute left: the store's own, so the next run removes it.
    let stale = store.join("tmp/recompute-ab.4242.0");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("x"), "x").unwrap();
    let out = run_small(root.path(), &store);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        store.join("flag-store").is_file(),
        "the old store got no marker"
    );
    assert!(!stale.exists(), "stale staging kept");
    let out = run_ok(flag(root.path(), &store).args(["gc", "--prune"]));
    assert!(stderr(&out).contains("alone"), "{}", stderr(&out));
    for p in [
        "objects/ab/not-an-object.txt",
        "objects/README",
        "logs/notes.txt",
        "tmp/keep.txt",
    ] {
        assert_eq!(
            std::fs::read_to_string(store.join(p)).unwrap(),
            "mine",
            "{p}"
        );
    }
    assert!(!store.join(&orphan).exists(), "orphan object kept");
    assert!(!store.join(&orphan_log).exists(), "orphan log kept");
    // The store still works: verify passes and a rerun is cached.
    run_ok(flag(root.path(), &store).args(["verify"]));
    assert!(run_small(root.path(), &store).status.success());

    // An unmarked store with something else at its top is not taken.
    std::fs::remove_file(store.join("flag-store")).unwrap();
    std::fs::write(store.join("notes.txt"), "mine").unwrap();
    let snap = snapshot(&store);
    let out = run_small(root.path(), &store);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("'notes.txt'"), "{}", stderr(&out));
    assert_eq!(snap, snapshot(&store));
    assert!(store.join("tmp/keep.txt").is_file());
}
