//! Hardening (issue 15): user-given names never become paths outside the store, and
//! `flag show --sql` is read-only.
mod common;

use std::path::{Path, PathBuf};

use common::*;

/// A project root whose store already holds a run of `ohlcv`.
type Fixture = ProjectStore;

fn fixture() -> Fixture {
    ProjectStore::new("ohlcv")
}

/// The `ohlcv` stage of test-small.yaml under another pipeline name.
fn pipeline_named(name: &str) -> String {
    let text = std::fs::read_to_string(repo_root().join("pipelines/test-small.yaml")).unwrap();
    assert!(text.contains("\nname: test-small\n"));
    text.replace("\nname: test-small\n", &format!("\nname: {name}\n"))
}

#[test]
fn pipeline_names_that_are_paths_are_refused() {
    let f = fixture();
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
    let f = fixture();
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
    let f = fixture();
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
    let f = fixture();
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
    std::fs::create_dir_all(dir2.join("objects")).unwrap();
    std::fs::write(dir2.join("objects/b"), "mine").unwrap();
    let out = run_small(root.path(), &dir2);
    assert!(!out.status.success());
    let msg = stderr(&out);
    assert!(msg.contains("not a flag store"), "{msg}");
    // It names what is missing, not what is there (the hostile re-run's case 2.7).
    assert!(msg.contains("lacks the store's manifests/, refs/"), "{msg}");
    assert!(dir2.join("tmp/keep.txt").is_file());
    assert!(dir2.join("objects/b").is_file());

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

// ---- Issue 15 items 7 and 8, and read-only objects ----

/// The manifest file of the latest run of `stage` in test-small.
fn manifest_of(store: &Path, stage: &str) -> PathBuf {
    let key = std::fs::read_to_string(store.join("refs/test-small").join(stage)).unwrap();
    let key = key.trim();
    store
        .join("manifests")
        .join(&key[..2])
        .join(format!("{key}.json"))
}

fn run_only(f: &Fixture, stages: &[&str]) -> std::process::Output {
    let mut c = flag(f.root(), &f.store());
    c.args(["run", "pipelines/test-small.yaml", "--json"]);
    for s in stages {
        c.args(["--only", s]);
    }
    c.arg("--set")
        .arg(format!("data_dir={}", data_dir().display()));
    c.output().unwrap()
}

fn both(out: &std::process::Output) -> String {
    format!("{}{}", stdout(out), stderr(out))
}

#[test]
fn verify_reports_an_unparsable_manifest_and_run_does_not_trust_it() {
    let f = fixture();
    let m = manifest_of(&f.store(), "ohlcv");
    let text = std::fs::read(&m).unwrap();
    std::fs::write(&m, &text[..text.len() / 2]).unwrap();
    let before = snapshot(&f.store());

    let out = flag(f.root(), &f.store())
        .args(["verify", "--report-only"])
        .output()
        .unwrap();
    let msg = both(&out);
    assert!(!out.status.success(), "{msg}");
    assert!(
        msg.contains(&format!("DAMAGED {}", m.display())) && msg.contains("not valid JSON"),
        "{msg}"
    );
    assert!(msg.contains("1 damaged manifests"), "{msg}");
    assert!(!msg.contains("all intact"), "{msg}");
    assert_eq!(
        before,
        snapshot(&f.store()),
        "--report-only changed the store"
    );

    // A run does not read the stage as up to date: it fails, naming the manifest.
    let out = run_only(&f, &["ohlcv"]);
    let msg = both(&out);
    assert!(!out.status.success(), "{msg}");
    assert_eq!(statuses(&out)["ohlcv"], "failed", "{msg}");
    assert!(
        msg.contains(&format!("damaged manifest {}", m.display())) && msg.contains("--force"),
        "{msg}"
    );
    assert_eq!(
        before,
        snapshot(&f.store()),
        "the failed run changed the store"
    );

    // verify drops it; the next run recomputes the stage; then all is intact.
    let out = flag(f.root(), &f.store()).arg("verify").output().unwrap();
    assert!(!out.status.success());
    assert!(stdout(&out).contains(&format!("dropped {}", m.display())));
    assert!(!m.exists());
    let out = run_only(&f, &["ohlcv"]);
    assert!(out.status.success(), "{}", both(&out));
    assert_eq!(statuses(&out)["ohlcv"], "ran");
    let out = run_ok(flag(f.root(), &f.store()).arg("verify"));
    assert!(stdout(&out).contains("all intact"), "{}", stdout(&out));
}

#[test]
fn verify_detects_a_manifest_pointed_at_another_intact_object() {
    let f = fixture();
    assert!(run_only(&f, &["indicators"]).status.success());
    let m = manifest_of(&f.store(), "ohlcv");
    let original = std::fs::read_to_string(&m).unwrap();
    let ind: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(manifest_of(&f.store(), "indicators")).unwrap(),
    )
    .unwrap();
    let other = ind["outputs"]["table"]["hash"]
        .as_str()
        .unwrap()
        .to_string();

    // (edit, expected problem): bars pointed at the indicators table, consistently (file and
    // output hash), with the digest kept, then without it; key parts edited; another stage's
    // manifest stored under this key.
    let point = |v: &mut serde_json::Value| {
        v["outputs"]["bars"]["files"][0]["hash"] = other.clone().into();
        v["outputs"]["bars"]["hash"] = other.clone().into();
    };
    type Edit<'a> = Box<dyn Fn(&mut serde_json::Value) + 'a>;
    let cases: Vec<(&str, Edit<'_>, Vec<&str>)> = vec![
        (
            "pointed",
            Box::new(point),
            vec!["do not match its digest", "output 'bars'", "has 47 columns"],
        ),
        (
            "pointed_no_digest",
            Box::new(move |v: &mut serde_json::Value| {
                point(v);
                v.as_object_mut().unwrap().remove("digest");
            }),
            vec![
                "has no 'digest'",
                "output 'bars': object",
                "the manifest records 8",
                "declared schema 'ohlcv'",
            ],
        ),
        (
            // Regression (hostile re-run): the digest line alone deleted was read as a legacy
            // manifest and passed.
            "no_digest",
            Box::new(|v: &mut serde_json::Value| {
                v.as_object_mut().unwrap().remove("digest");
            }),
            vec!["has no 'digest'"],
        ),
        (
            "parts",
            Box::new(|v: &mut serde_json::Value| {
                v["parts"]["params"]["tickers"] = serde_json::json!(["AAPL"]);
                v.as_object_mut().unwrap().remove("digest");
            }),
            vec!["its key parts hash to"],
        ),
        (
            "another_key",
            Box::new(move |v: &mut serde_json::Value| *v = ind.clone()),
            vec!["it records key", "but is stored as"],
        ),
    ];
    for (case, edit, wants) in cases {
        let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
        edit(&mut v);
        std::fs::write(&m, serde_json::to_string_pretty(&v).unwrap()).unwrap();
        let before = snapshot(&f.store());
        let out = flag(f.root(), &f.store())
            .args(["verify", "--report-only"])
            .output()
            .unwrap();
        let msg = both(&out);
        assert!(!out.status.success(), "{case}: {msg}");
        assert!(
            msg.contains(&format!("DAMAGED {}", m.display())),
            "{case}: {msg}"
        );
        for w in wants {
            assert!(msg.contains(w), "{case}: expected '{w}' in\n{msg}");
        }
        // Not up to date for a run either; nothing changes.
        let out = run_only(&f, &["ohlcv"]);
        assert_eq!(statuses(&out)["ohlcv"], "failed", "{case}: {}", both(&out));
        assert!(both(&out).contains("damaged manifest"), "{case}");
        assert_eq!(before, snapshot(&f.store()), "{case}: the store changed");
    }
    // verify drops the manifest but not the object (intact, and the indicators run's own).
    let out = flag(f.root(), &f.store()).arg("verify").output().unwrap();
    assert!(!out.status.success());
    assert!(!m.exists());
    let out = run_ok(flag(f.root(), &f.store()).arg("verify"));
    assert!(stdout(&out).contains("all intact"), "{}", stdout(&out));
    let out = run_only(&f, &["indicators"]);
    let st = statuses(&out);
    assert_eq!(
        (st["ohlcv"].as_str(), st["indicators"].as_str()),
        ("ran", "cached")
    );
}

/// A pipeline file in the fixture's project: test-small with `edit` applied.
fn variant(f: &Fixture, name: &str, edit: impl Fn(&str) -> String) -> PathBuf {
    let text = std::fs::read_to_string(repo_root().join("pipelines/test-small.yaml")).unwrap();
    let file = f.root().join("pipelines").join(format!("{name}.yaml"));
    std::fs::write(&file, edit(&text)).unwrap();
    file
}

/// Runs `flag run FILE ARGS`, expects failure with every one of `wants`, and an unchanged
/// store.
fn refused(f: &Fixture, file: &Path, args: &[&str], wants: &[&str]) {
    let before = snapshot(&f.store());
    let out = flag(f.root(), &f.store())
        .arg("run")
        .arg(file)
        .args(args)
        .arg("--set")
        .arg(format!("data_dir={}", data_dir().display()))
        .output()
        .unwrap();
    let msg = both(&out);
    assert!(!out.status.success(), "{}: {msg}", file.display());
    for w in wants {
        assert!(
            msg.contains(w),
            "{}: expected '{w}' in\n{msg}",
            file.display()
        );
    }
    assert_eq!(
        before,
        snapshot(&f.store()),
        "{}: the store changed",
        file.display()
    );
}

#[test]
fn duplicate_yaml_keys_are_refused_with_both_lines() {
    let f = fixture();
    // test-small: line 18 is `    uses: indicators`, line 14 `      source: ...`, line 10
    // `stages:`, and the file has 45 lines.
    let file = variant(&f, "dup-uses", |t| {
        t.replace(
            "    uses: indicators\n",
            "    uses: indicators\n    uses: baselines\n",
        )
    });
    let loc = format!("{}:19:", file.display());
    refused(
        &f,
        &file,
        &[],
        &[
            &loc,
            "duplicate key 'uses' in 'stages.indicators'",
            "first at line 18, again at line 19",
        ],
    );

    let file = variant(&f, "dup-param", |t| {
        t.replace(
            "      format: tdqn\n",
            "      format: tdqn\n      source: /tmp\n",
        )
    });
    refused(
        &f,
        &file,
        &[],
        &[
            "duplicate key 'source' in 'stages.ohlcv.params'",
            "first at line 14, again at line 16",
        ],
    );

    let file = variant(&f, "dup-top-params", |t| {
        format!("{t}params:\n  tickers: [AAPL]\n")
    });
    refused(
        &f,
        &file,
        &[],
        &[
            "duplicate top-level key 'params'",
            "first at line 3, again at line 46",
        ],
    );

    let file = variant(&f, "dup-stages", |t| {
        format!("{t}stages:\n  other:\n    uses: indicators\n")
    });
    refused(
        &f,
        &file,
        &[],
        &[
            "duplicate top-level key 'stages'",
            "first at line 10, again at line 46",
        ],
    );

    // Flow style too, and the same key in different maps is fine.
    let file = variant(&f, "dup-flow", |t| {
        t.replace(
            "  tickers: [AAPL, MSFT]\n",
            "  tickers: [AAPL, MSFT]\n  x: {a: 1,\n      a: 2}\n",
        )
    });
    refused(
        &f,
        &file,
        &[],
        &[
            "duplicate key 'a' in 'params.x'",
            "first at line 6, again at line 7",
        ],
    );
}

#[test]
fn a_byte_order_mark_is_accepted() {
    let f = fixture();
    let file = variant(&f, "bom", |t| format!("\u{feff}{t}"));
    let out = run_ok(
        flag(f.root(), &f.store())
            .arg("run")
            .arg(&file)
            .args(["--only", "ohlcv", "--json", "--set"])
            .arg(format!("data_dir={}", data_dir().display())),
    );
    assert_eq!(statuses(&out)["ohlcv"], "cached");
}

#[test]
fn deep_big_and_special_pipeline_files_are_refused_before_parsing() {
    let f = fixture();
    // 200 KB of nested flow collections (the YAML parser took 37 s on this).
    let file = f.root().join("pipelines/deep.yaml");
    let n = 100_000;
    std::fs::write(
        &file,
        format!(
            "name: deep\nparams:\n  x: {}{}\n",
            "[".repeat(n),
            "]".repeat(n)
        ),
    )
    .unwrap();
    refused(
        &f,
        &file,
        &[],
        &[
            &format!("{}:3:", file.display()),
            "nested more than 32 deep",
        ],
    );
    // Over the size cap.
    let file = variant(&f, "big", |t| {
        format!("{t}{}", "# padding\n".repeat(120_000))
    });
    refused(&f, &file, &[], &["larger than 1024 KB"]);
    // A directory.
    let dir = f.root().join("pipelines/adir.yaml");
    std::fs::create_dir_all(&dir).unwrap();
    refused(
        &f,
        &dir,
        &[],
        &["is a directory; a pipeline must be a regular file"],
    );
    // A FIFO: opening it for reading would block until a writer came.
    let fifo = f.root().join("pipelines/fifo.yaml");
    let st = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(st.success());
    let before = snapshot(&f.store());
    let mut child = flag(f.root(), &f.store())
        .arg("run")
        .arg(&fifo)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Not a timing assertion: only a bound on a hang.
    let mut waited = 0;
    while child.try_wait().unwrap().is_none() {
        if waited > 600 {
            child.kill().unwrap();
            panic!("flag blocked on a FIFO pipeline file");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        waited += 1;
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(
        both(&out).contains("is a FIFO (named pipe)"),
        "{}",
        both(&out)
    );
    assert_eq!(before, snapshot(&f.store()));
    // show --pipeline reads pipeline files the same way.
    let out = flag(f.root(), &f.store())
        .args(["show", "ohlcv.bars", "--pipeline"])
        .arg(&fifo)
        .output()
        .unwrap();
    assert!(both(&out).contains("is a FIFO"), "{}", both(&out));
}

#[test]
fn non_finite_params_say_so() {
    let f = fixture();
    let file = variant(&f, "nan", |t| {
        t.replace("      env: tdqn\n", "      env: tdqn\n      cost: .nan\n")
    });
    refused(
        &f,
        &file,
        &[],
        &[
            &format!("{}:27:", file.display()),
            "'stages.baselines.params.cost' is .nan, which is not a finite number",
        ],
    );
    let file = variant(&f, "inf", |t| {
        t.replace("tickers: [AAPL, MSFT]", "tickers: [AAPL, -.inf]")
    });
    refused(&f, &file, &[], &["'params.tickers.[1]' is -.inf"]);
    let plain = f.root().join("pipelines/test-small.yaml");
    refused(
        &f,
        &plain,
        &["--set", "baselines.cost=.nan"],
        &["--set baselines.cost=.nan: not a finite number"],
    );
    // A missing value says so, not "null null".
    let file = variant(&f, "null", |t| {
        t.replace("      env: tdqn\n", "      env: tdqn\n      cost:\n")
    });
    refused(
        &f,
        &file,
        &[],
        &["param 'cost' must be a number, got no value (null)"],
    );
}

#[test]
fn the_lock_wait_names_the_holder() {
    let f = fixture();
    let lock = f.store().join(".lock");
    std::fs::write(
        &lock,
        "pid 4242 on host-x, `flag run other.yaml`, since then",
    )
    .unwrap();
    let mut holder = hold_lock(&lock);
    use std::io::BufRead;
    let out = run_only_no_wait(&f);
    let msg = both(&out);
    assert!(!out.status.success(), "{msg}");
    assert!(
        msg.contains(
            "locked by another flag run (pid 4242 on host-x, `flag run other.yaml`, since then)"
        ),
        "{msg}"
    );
    // A waiting gc says who it waits for, once, and never an empty holder.
    let mut gc = flag(f.root(), &f.store())
        .arg("gc")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(gc.stderr.take().unwrap());
    let mut first = String::new();
    err.read_line(&mut first).unwrap();
    assert!(
        first.contains("waiting for another flag run (pid 4242 on host-x"),
        "{first}"
    );
    holder.kill().unwrap();
    holder.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    assert!(gc.wait().unwrap().success(), "{rest}");
    assert!(!rest.contains("()"), "{rest}");
    // An unnamed holder is said to be unknown.
    std::fs::write(&lock, "").unwrap();
    let mut holder = hold_lock(&lock);
    let out = run_only_no_wait(&f);
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert!(both(&out).contains("holder unknown"), "{}", both(&out));
}

fn run_only_no_wait(f: &Fixture) -> std::process::Output {
    flag(f.root(), &f.store())
        .args([
            "run",
            "pipelines/test-small.yaml",
            "--only",
            "ohlcv",
            "--no-wait",
            "--set",
        ])
        .arg(format!("data_dir={}", data_dir().display()))
        .output()
        .unwrap()
}

#[test]
fn gc_removes_temp_files_of_interrupted_writes_and_nothing_else() {
    let f = fixture();
    let before = snapshot(&f.store());
    let m = manifest_of(&f.store(), "ohlcv");
    let name = m.file_name().unwrap().to_string_lossy().to_string();
    let temps = [
        m.parent().unwrap().join(format!(".{name}.999999.0.tmp")),
        f.store().join("refs/test-small/.ohlcv.999999.1.tmp"),
        f.store().join("refs/.LAST.999999.2.tmp"),
        f.store().join(".flag-store.999999.3.tmp"),
    ];
    for t in &temps {
        std::fs::write(t, "half").unwrap();
    }
    // Not named like the store's temp files: left alone.
    let mine = f.store().join("refs/test-small/.notes.tmp");
    std::fs::write(&mine, "mine").unwrap();
    // verify and runs skip them.
    run_ok(flag(f.root(), &f.store()).arg("verify"));
    let out = run_ok(flag(f.root(), &f.store()).arg("gc"));
    assert!(stdout(&out).contains("4 temp files"), "{}", stdout(&out));
    for t in &temps {
        assert!(!t.exists(), "{} kept", t.display());
    }
    assert_eq!(std::fs::read_to_string(&mine).unwrap(), "mine");
    std::fs::remove_file(&mine).unwrap();
    assert_eq!(before, snapshot(&f.store()));
}

#[test]
fn gc_removes_no_object_while_a_manifest_does_not_parse() {
    let f = fixture();
    let m = manifest_of(&f.store(), "ohlcv");
    std::fs::write(&m, "{ not json").unwrap();
    let before = snapshot(&f.store());
    let out = flag(f.root(), &f.store())
        .args(["gc", "--prune"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("removed no objects: 1 manifests do not parse"),
        "{}",
        stderr(&out)
    );
    assert_eq!(before, snapshot(&f.store()));
}

#[test]
fn stored_objects_are_read_only_and_gc_still_removes_them() {
    use std::os::unix::fs::PermissionsExt;
    let f = fixture();
    let mut objects = Vec::new();
    for sub in std::fs::read_dir(f.store().join("objects"))
        .unwrap()
        .flatten()
    {
        for o in std::fs::read_dir(sub.path()).unwrap().flatten() {
            objects.push(o.path());
        }
    }
    assert!(!objects.is_empty());
    for o in &objects {
        let mode = std::fs::metadata(o).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o444, "{}", o.display());
    }
    // Another run of ohlcv replaces the ref; gc --prune removes the old, read-only objects.
    let out = flag(f.root(), &f.store())
        .args([
            "run",
            "pipelines/test-small.yaml",
            "--only",
            "ohlcv",
            "--set",
            "tickers=[AAPL]",
            "--set",
        ])
        .arg(format!("data_dir={}", data_dir().display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", both(&out));
    run_ok(flag(f.root(), &f.store()).args(["gc", "--prune"]));
    assert!(objects.iter().all(|o| !o.exists()), "old objects kept");
    run_ok(flag(f.root(), &f.store()).arg("verify"));
}

#[test]
fn os_errors_are_printed_once() {
    let f = fixture();
    let out = flag(f.root(), &f.store())
        .args(["run", "pipelines/missing.yaml"])
        .output()
        .unwrap();
    let msg = stderr(&out);
    assert!(!out.status.success());
    assert_eq!(msg.matches("No such file or directory").count(), 1, "{msg}");
    assert!(msg.contains("pipelines/missing.yaml"), "{msg}");
}

/// Holds the store lock from another process (flock(1) takes the same flock as flag) until the
/// returned child is killed; returns once it holds it.
fn hold_lock(lock: &Path) -> std::process::Child {
    use std::io::BufRead;
    let mut holder = std::process::Command::new("flock")
        // --no-fork: the lock is held by this very process (sh execs sleep), so killing it
        // releases the lock.
        .arg("--no-fork")
        .arg(lock)
        .args(["-c", "echo held; exec sleep 600"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "held");
    holder
}

/// Regression (hostile re-run): a `--set` key that is not a name was looked up as a stage
/// named '' ("no stage ''"); a ticker that is a path was joined onto the data folder. Both
/// are refused as what they are, and nothing is written.
#[test]
fn set_keys_and_tickers_that_are_paths_are_refused() {
    let f = fixture();
    let file = f.root().join("pipelines/test-small.yaml");
    for (set, want) in [
        (
            "../../x=1",
            "--set '../../x=1': '../../x' is not PARAM or STAGE.PARAM",
        ),
        ("ohlcv.=3", "--set 'ohlcv.=3': 'ohlcv.' is not PARAM"),
        ("a/b=3", "'a/b' is not PARAM or STAGE.PARAM"),
    ] {
        refused(&f, &file, &["--set", set], &[want]);
    }
    for (tickers, want) in [
        (
            "[\"../../../etc/passwd\"]",
            "ticker '../../../etc/passwd' may not contain '/'",
        ),
        ("[\"..\"]", "ticker '..' may not start with '.'"),
        ("[\"\"]", "ticker '' is empty"),
    ] {
        let set = format!("tickers={tickers}");
        refused(
            &f,
            &file,
            &["--set", &set],
            &[
                &format!("{}:16: stage 'ohlcv': param 'tickers'", file.display()),
                want,
            ],
        );
    }
    // Real symbols pass the check (and then fail only for lack of data files).
    let out = flag(f.root(), &f.store())
        .args(["run", "pipelines/test-small.yaml", "--only", "ohlcv"])
        .args(["--set", "tickers=[BRK.B, ^GSPC, EURUSD=X, BTC-USD]"])
        .arg("--set")
        .arg(format!("data_dir={}", data_dir().display()))
        .output()
        .unwrap();
    assert!(!both(&out).contains("may not"), "{}", both(&out));
    assert!(both(&out).contains("missing tdqn file"), "{}", both(&out));
}
