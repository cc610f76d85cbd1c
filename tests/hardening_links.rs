//! Hardening (issue 15, hostile re-run): entries planted inside the store (symlinks under
//! `logs/` and `out/`) never make a run write outside it, and a failed rerun never replaces
//! the log of the complete run stored under the same key.
mod common;

use std::path::Path;

use common::*;

fn ohlcv_key(store: &Path) -> String {
    std::fs::read_to_string(store.join("refs/test-small/ohlcv"))
        .unwrap()
        .trim()
        .to_string()
}

fn run_ohlcv(f: &ProjectStore, force: bool) -> std::process::Command {
    let mut c = flag(f.root(), &f.store());
    c.args([
        "run",
        "pipelines/test-small.yaml",
        "--json",
        "--only",
        "ohlcv",
    ]);
    if force {
        c.arg("--force");
    }
    c.arg("--set")
        .arg(format!("data_dir={}", data_dir().display()));
    c
}

fn both(out: &std::process::Output) -> String {
    format!("{}{}", stdout(out), stderr(out))
}

fn is_regular_file(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_file())
}

/// `flag run --only ohlcv` (forced or not) with the files its processes may write capped
/// at 20 KB (`ulimit -f`): the stage's Parquet output is larger, so the stage worker is
/// killed (SIGXFSZ) and the stage fails, with its key unchanged (a limit is part of no key).
/// `flag` itself must not write a larger file: its cache of the worker's declarations must
/// be warm.
fn run_ohlcv_capped(root: &Path, store: &Path, force: bool) -> std::process::Output {
    let mut c = std::process::Command::new("sh");
    c.current_dir(root)
        .env("FLAG_STORE", store)
        .env("FLAG_ROOT", root)
        .env_remove("FLAG_DATA_DIR")
        .args(["-c", "ulimit -f 40 && exec \"$0\" \"$@\""])
        .arg(flag_bin())
        .args([
            "run",
            "pipelines/test-small.yaml",
            "--json",
            "--only",
            "ohlcv",
        ]);
    if force {
        c.arg("--force");
    }
    c.arg("--set")
        .arg(format!("data_dir={}", data_dir().display()));
    c.output().unwrap()
}

#[test]
fn a_symlink_at_a_stage_log_is_replaced_not_written_through() {
    let f = ProjectStore::new("ohlcv");
    let key = ohlcv_key(&f.store());
    let log = f.store().join("logs").join(format!("{key}.log"));
    assert!(is_regular_file(&log));
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim.txt");
    std::fs::write(&victim, "precious").unwrap();
    std::fs::remove_file(&log).unwrap();
    std::os::unix::fs::symlink(&victim, &log).unwrap();

    let out = run_ok(&mut run_ohlcv(&f, true));
    assert_eq!(statuses(&out)["ohlcv"], "ran", "{}", both(&out));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 1);
    assert!(is_regular_file(&log), "the log is still a symlink");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("stage ohlcv") && text.contains("finished in"),
        "{text}"
    );
    // The new run's manifest names that log, and the store is intact.
    let out = run_ok(flag(f.root(), &f.store()).arg("verify"));
    assert!(stdout(&out).contains("all intact"), "{}", stdout(&out));
}

#[test]
fn a_failed_rerun_keeps_the_stored_runs_log() {
    let f = ProjectStore::new("ohlcv");
    let key = ohlcv_key(&f.store());
    let log = f.store().join("logs").join(format!("{key}.log"));
    let kept = std::fs::read(&log).unwrap();
    let before = snapshot(&f.store());

    let out = run_ohlcv_capped(f.root(), &f.store(), true);
    let msg = both(&out);
    assert!(!out.status.success(), "{msg}");
    let rec = &records(&out)["ohlcv"];
    assert_eq!(rec["status"], "failed", "{msg}");
    assert_eq!(rec["key"], key.as_str(), "the failing run had another key");
    // The complete run's log is untouched; the failure's log sits beside it and the report
    // names it.
    assert_eq!(
        std::fs::read(&log).unwrap(),
        kept,
        "the stored run's log changed"
    );
    let failed_log = f.store().join("logs").join(format!("{key}.failed.log"));
    assert_eq!(rec["log"], failed_log.to_string_lossy().as_ref(), "{msg}");
    let text = std::fs::read_to_string(&failed_log).unwrap();
    assert!(
        text.contains("stage ohlcv") && text.contains("FAILED"),
        "{text}"
    );
    // Nothing else changed: the manifest, ref and objects are the stored run's.
    let mut after = snapshot(&f.store());
    after.retain(|k, _| !k.ends_with(".failed.log"));
    assert_eq!(before, after, "the failed rerun changed the store");

    // The stored run is still the stage's result, and gc keeps both logs (its key is kept).
    let out = run_ok(&mut run_ohlcv(&f, false));
    assert_eq!(statuses(&out)["ohlcv"], "cached", "{}", both(&out));
    run_ok(flag(f.root(), &f.store()).arg("gc"));
    assert!(log.is_file() && failed_log.is_file());
    // A successful rerun writes the key's log again (the failed one stays until gc drops
    // the key).
    let out = run_ok(&mut run_ohlcv(&f, true));
    assert_eq!(statuses(&out)["ohlcv"], "ran");
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("finished in")
    );
}

#[test]
fn a_failed_first_run_keeps_its_log_at_the_keys_name() {
    let root = tempfile::tempdir().unwrap();
    copy_project(root.path());
    let store = root.path().join("store");
    // Uncapped first: `flag` caches what the stage worker declares (a file over the cap)
    // when that cache is cold, as after a build.
    let mut dry = flag(root.path(), &store);
    dry.args([
        "run",
        "pipelines/test-small.yaml",
        "--dry-run",
        "--only",
        "ohlcv",
    ])
    .arg("--set")
    .arg(format!("data_dir={}", data_dir().display()));
    run_ok(&mut dry);
    let out = run_ohlcv_capped(root.path(), &store, false);
    assert!(!out.status.success());
    let recs = records(&out);
    let rec = recs
        .get("ohlcv")
        .unwrap_or_else(|| panic!("no record ({:?}): {}", out.status, both(&out)));
    let key = rec["key"].as_str().unwrap();
    let log = store.join("logs").join(format!("{key}.log"));
    assert_eq!(rec["log"], log.to_string_lossy().as_ref());
    assert!(std::fs::read_to_string(&log).unwrap().contains("FAILED"));
    // No staging folder is left behind.
    assert_eq!(std::fs::read_dir(store.join("tmp")).unwrap().count(), 0);
    // gc keeps the failure's log (it is what the user reads); --prune removes it.
    let out = run_ok(flag(root.path(), &store).arg("gc"));
    assert!(
        stderr(&out).contains("kept 1 logs of failed or dropped runs"),
        "{}",
        stderr(&out)
    );
    assert!(log.is_file());
    run_ok(flag(root.path(), &store).args(["gc", "--prune"]));
    assert!(!log.exists());
}

#[test]
fn a_symlinked_published_folder_is_refused_and_left_alone() {
    let f = ProjectStore::new("ohlcv");
    let published = f.store().join("out/test-small");
    assert!(published.join("ohlcv/bars.parquet").exists());
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("ohlcv");
    std::fs::create_dir_all(&victim).unwrap();
    std::fs::write(victim.join("bars.parquet"), "precious").unwrap();
    std::fs::write(victim.join("mine.txt"), "mine").unwrap();
    std::fs::remove_dir_all(&published).unwrap();
    std::os::unix::fs::symlink(outside.path(), &published).unwrap();

    let out = run_ohlcv(&f, true).output().unwrap();
    let msg = both(&out);
    assert!(!out.status.success(), "{msg}");
    assert!(
        msg.contains(&published.display().to_string()) && msg.contains("is a symlink"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read_to_string(victim.join("bars.parquet")).unwrap(),
        "precious"
    );
    assert_eq!(
        std::fs::read_to_string(victim.join("mine.txt")).unwrap(),
        "mine"
    );
    assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 2);
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 1);
    assert!(
        std::fs::symlink_metadata(&published)
            .unwrap()
            .file_type()
            .is_symlink()
    );

    // With the symlink gone the run publishes again, into the store.
    std::fs::remove_file(&published).unwrap();
    run_ok(&mut run_ohlcv(&f, false));
    assert!(
        std::fs::symlink_metadata(&published)
            .unwrap()
            .file_type()
            .is_dir()
    );
    assert!(published.join("ohlcv/bars.parquet").exists());
}
