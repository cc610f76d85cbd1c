//! Durability with real processes: kill -9 mid-run, corrupted objects, concurrent runs.
mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

fn run_cmd(root: &Path, store: &Path) -> std::process::Command {
    let mut c = flag(root, store);
    c.args(["run", "pipelines/test-small.yaml", "--json", "--set"])
        .arg(format!("data_dir={}", data_dir().display()));
    c
}

#[test]
fn kill_9_at_many_points_then_rerun_matches_an_uninterrupted_run() {
    let root = tempfile::tempdir().unwrap();
    copy_project(root.path());

    // Reference: one uninterrupted run, timed to place the kills inside it.
    let reference_store = root.path().join("reference");
    let t = Instant::now();
    let reference = output_hashes(&run_ok(&mut run_cmd(root.path(), &reference_store)));
    let full = t.elapsed();

    let store = root.path().join("store");
    // Kill points spread over the whole run, several times on the same store, so later kills
    // land on a store holding partial state from earlier ones.
    let fractions = [0.02, 0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 0.95];
    let mut killed = 0;
    for f in fractions {
        let mut child = run_cmd(root.path(), &store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(full.mul_f64(f));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            killed += 1;
        }
        child.wait().unwrap();
        // Whatever is committed is complete: verify finds nothing corrupted or half-written.
        if store.join("manifests").exists() {
            let mut v = flag(root.path(), &store);
            v.args(["verify", "--report-only"]);
            let out = v.output().unwrap();
            assert!(
                out.status.success(),
                "verify after kill at {f}: {}",
                stdout(&out)
            );
        }
    }
    assert!(
        killed >= fractions.len() / 2,
        "only {killed} runs were killed mid-run"
    );

    let resumed = run_ok(&mut run_cmd(root.path(), &store));
    assert_eq!(
        output_hashes(&resumed),
        reference,
        "results differ from an uninterrupted run"
    );
    // And nothing half-written is left for a later run to trip on.
    let again = statuses(&run_ok(&mut run_cmd(root.path(), &store)));
    assert!(again.values().all(|s| s == "cached"), "{again:?}");
}

#[test]
fn a_flipped_byte_in_a_stored_object_is_detected_and_recomputed() {
    let root = tempfile::tempdir().unwrap();
    copy_project(root.path());
    let store = root.path().join("store");
    let first = run_ok(&mut run_cmd(root.path(), &store));
    let before = output_hashes(&first);
    let rec = &records(&first)["indicators"];
    let path = rec["outputs"]["table"]["path"]
        .as_str()
        .unwrap()
        .to_string();
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    // Objects are read-only (0444): a user who damages one makes it writable first.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&path, &bytes).unwrap();

    // flag verify reports it without dropping it.
    let mut v = flag(root.path(), &store);
    v.args(["verify", "--report-only"]);
    let out = v.output().unwrap();
    assert!(!out.status.success());
    assert!(
        stdout(&out).contains("CORRUPT indicators.table") && stdout(&out).contains("is corrupted"),
        "{}",
        stdout(&out)
    );

    // The next run does not use it: it recomputes the stage, with the reason.
    let second = run_ok(&mut run_cmd(root.path(), &store));
    let st = statuses(&second);
    assert_eq!(st["indicators"], "ran", "{st:?}");
    let reason = records(&second)["indicators"]["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(reason.contains("corrupted"), "{reason}");
    assert!(
        stderr(&second).contains("failed verification"),
        "{}",
        stderr(&second)
    );
    assert_eq!(output_hashes(&second)["indicators"], before["indicators"]);
    // Recomputed bytes are identical, so downstream stays cached.
    assert_eq!(st["baselines"], "cached");
    let mut v = flag(root.path(), &store);
    v.args(["verify"]);
    run_ok(&mut v);
}

#[test]
fn two_concurrent_runs_on_one_store_do_not_corrupt_it() {
    let root = tempfile::tempdir().unwrap();
    copy_project(root.path());
    let reference_store = root.path().join("reference");
    let reference = output_hashes(&run_ok(&mut run_cmd(root.path(), &reference_store)));

    let store = root.path().join("store");
    let a = run_cmd(root.path(), &store)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let b = run_cmd(root.path(), &store)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(
        a.status.success() && b.status.success(),
        "{}\n{}",
        stderr(&a),
        stderr(&b)
    );
    assert_eq!(output_hashes(&a), reference);
    assert_eq!(output_hashes(&b), reference);
    // One of them waited for the other and then found everything cached.
    let (sa, sb) = (statuses(&a), statuses(&b));
    assert!(
        sa.values().all(|s| s == "cached") || sb.values().all(|s| s == "cached"),
        "{sa:?} {sb:?}"
    );
    assert!(
        stderr(&a).contains("waiting for another flag run")
            || stderr(&b).contains("waiting for another flag run")
    );
    let mut v = flag(root.path(), &store);
    v.args(["verify"]);
    run_ok(&mut v);
}

#[test]
fn a_lock_held_by_a_killed_process_does_not_block_the_next_run() {
    let root = tempfile::tempdir().unwrap();
    copy_project(root.path());
    let store = root.path().join("store");
    let mut child = run_cmd(root.path(), &store)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let _ = child.kill();
    child.wait().unwrap();
    let t = Instant::now();
    let mut c = run_cmd(root.path(), &store);
    c.arg("--no-wait");
    run_ok(&mut c);
    assert!(t.elapsed() < Duration::from_secs(120));
}
