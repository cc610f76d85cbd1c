//! The Slurm executor against a real one-node Slurm (`.ci/slurm/up.sh`: slurm-wlm + munge,
//! started by hand). Skipped, saying why, where Slurm is not installed or cannot be started
//! (`.ci/setup` installs it); CI installs it, so there it runs.
mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// ingest -> indicators -> baselines, and a DDQN stage long enough to cancel (seconds).
const PIPELINE: &str = r#"name: on-slurm
params:
  data_dir: ../shared/data
  episodes: 1
resources:
  partition: debug
  mem: 500M
  time: "10"
stages:
  ohlcv:
    uses: ingest_ohlcv
    params:
      source: ${data_dir}/tdqn
      format: tdqn
      tickers: [AAPL]
  indicators:
    uses: indicators
    inputs:
      bars: ohlcv.bars
  baselines:
    uses: baselines
    inputs:
      table: indicators.table
    params:
      env: tdqn
      train_start: "2012-01-01"
      train_end: "2014-12-31"
      test_start: "2015-01-01"
      test_end: "2015-12-31"
  rl:
    uses: ddqn
    inputs:
      table: indicators.table
    resources:
      cpus: 1
    params:
      strategy: tdqn
      runs: 1
      episodes: ${episodes}
      seed: 7
      train_start: "2012-01-01"
      train_end: "2014-12-31"
      test_start: "2015-01-01"
      test_end: "2015-12-31"
"#;

/// SLURM_CONF of a running cluster, starting it if needed; None (and why) when unavailable.
fn slurm() -> Option<String> {
    let have = |c: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {c}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !(have("sbatch") && have("slurmctld") && have("munged")) {
        eprintln!("SKIPPED: Slurm is not installed here (.ci/setup installs slurm-wlm, munge)");
        return None;
    }
    let out = Command::new("bash")
        .arg(repo_root().join(".ci/slurm/up.sh"))
        .output()
        .unwrap();
    if !out.status.success() {
        eprintln!(
            "SKIPPED: .ci/slurm/up.sh could not start Slurm:\n{}",
            stderr(&out)
        );
        return None;
    }
    stdout(&out)
        .lines()
        .find_map(|l| l.strip_prefix("export SLURM_CONF="))
        .map(|v| v.trim_matches(['\'', '"']).to_string())
}

fn project() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    copy_project(root.path());
    std::fs::write(root.path().join("pipelines/on-slurm.yaml"), PIPELINE).unwrap();
    root
}

fn run_cmd(root: &Path, store: &Path, conf: &str, executor: &str) -> Command {
    let mut c = flag(root, store);
    c.env("SLURM_CONF", conf)
        .args([
            "run",
            "pipelines/on-slurm.yaml",
            "--json",
            "--executor",
            executor,
            "--set",
        ])
        .arg(format!("data_dir={}", data_dir().display()));
    c
}

/// The running job of this test's project (its working directory) whose name starts so.
fn job_named(conf: &str, root: &Path, prefix: &str, within: Duration) -> Option<String> {
    let until = Instant::now() + within;
    while Instant::now() < until {
        let out = Command::new("squeue")
            .env("SLURM_CONF", conf)
            .args(["-h", "-t", "RUNNING", "-o", "%i %j %Z"])
            .output()
            .unwrap();
        if let Some(id) = stdout(&out).lines().find_map(|l| {
            let mut w = l.split_whitespace();
            let (id, name, dir) = (w.next()?, w.next()?, w.next()?);
            (name.starts_with(prefix) && Path::new(dir) == root).then(|| id.to_string())
        }) {
            return Some(id);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn manifests(store: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(store.join("manifests"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_pipeline_run_through_slurm_gives_the_bytes_of_a_local_run() {
    let Some(conf) = slurm() else { return };
    let root = project();
    let local = run_ok(&mut run_cmd(
        root.path(),
        &root.path().join("local"),
        &conf,
        "local",
    ));
    let store = root.path().join("slurm");
    let on_slurm = run_ok(&mut run_cmd(root.path(), &store, &conf, "slurm"));
    assert!(statuses(&on_slurm).values().all(|s| s == "ran"));
    assert_eq!(output_hashes(&on_slurm), output_hashes(&local));
    // Each stage was a batch job with the pipeline's and the stage's resources.
    let rec = &records(&on_slurm)["rl"];
    let log = std::fs::read_to_string(rec["log"].as_str().unwrap()).unwrap();
    assert!(log.contains("submitted as slurm job"), "{log}");
    assert!(
        log.contains("--partition=debug --cpus-per-task=1 --mem=500M --time=10"),
        "{log}"
    );
    // gc keeps what the runs use, Slurm's own logs included.
    let mut gc = flag(root.path(), &store);
    gc.arg("gc");
    let out = run_ok(&mut gc);
    assert!(stdout(&out).contains("removed 0 runs"), "{}", stdout(&out));
    assert!(!stdout(&out).contains("left"), "{}", stdout(&out));
}

#[test]
fn a_job_cancelled_with_scancel_fails_its_stage_cleanly_and_the_next_run_completes() {
    let Some(conf) = slurm() else { return };
    let root = project();
    let store = root.path().join("store");
    let child = run_cmd(root.path(), &store, &conf, "slurm")
        .args(["--set", "episodes=6"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let id = job_named(&conf, root.path(), "flag-rl-", Duration::from_secs(120))
        .expect("the rl job runs");
    // Let the worker start computing, then cancel the job as a user would.
    std::thread::sleep(Duration::from_millis(1500));
    let ok = Command::new("scancel")
        .env("SLURM_CONF", &conf)
        .arg(&id)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let rec = &records(&out)["rl"];
    assert_eq!(rec["status"], "failed");
    let err = rec["error"].as_str().unwrap();
    assert!(
        err.contains(&format!("slurm job {id} ended CANCELLED"))
            && err.contains("nothing was committed"),
        "{err}"
    );
    // (Other stages may still commit while rl is cancelled: only rl is checked.)
    assert!(
        !committed_stages(&store).contains("rl"),
        "a cancelled job committed something"
    );
    let tmp: Vec<_> = std::fs::read_dir(store.join("tmp"))
        .unwrap()
        .flatten()
        .collect();
    assert!(tmp.is_empty(), "staging left: {tmp:?}");
    let again = run_ok(&mut run_cmd(root.path(), &store, &conf, "slurm"));
    assert_eq!(statuses(&again)["rl"], "ran");
}

#[test]
fn ctrl_c_cancels_the_submitted_jobs() {
    let Some(conf) = slurm() else { return };
    let root = project();
    let store = root.path().join("store");
    let child = run_cmd(root.path(), &store, &conf, "slurm")
        .args(["--set", "episodes=20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let id = job_named(&conf, root.path(), "flag-rl-", Duration::from_secs(120))
        .expect("the rl job runs");
    let ok = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    // rl and whatever else was running (baselines may be): all of them cancelled.
    assert!(
        stderr(&out).contains("interrupted: cancelled "),
        "{}",
        stderr(&out)
    );
    let state = Command::new("scontrol")
        .env("SLURM_CONF", &conf)
        .args(["show", "-o", "job", &id])
        .output()
        .unwrap();
    let t = stdout(&state);
    assert!(
        t.contains("JobState=CANCELLED") || t.contains("JobState=COMPLETING"),
        "{t}"
    );
    let t = Instant::now();
    while job_named(&conf, root.path(), "flag-", Duration::from_millis(1)).is_some() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "a job of the run is still running"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_coordinator_killed_with_minus_9_stops_its_batch_jobs_by_their_heartbeat() {
    let Some(conf) = slurm() else { return };
    let root = project();
    let store = root.path().join("store");
    let mut child = run_cmd(root.path(), &store, &conf, "slurm")
        .args(["--set", "episodes=20"])
        .env("FLAG_HEARTBEAT_SECS", "3")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let id = job_named(&conf, root.path(), "flag-rl-", Duration::from_secs(120))
        .expect("the rl job runs");
    child.kill().unwrap();
    child.wait().unwrap();
    // Nobody cancelled it: the worker saw the heartbeat go still and exited.
    let t = Instant::now();
    while job_named(&conf, root.path(), "flag-rl-", Duration::from_millis(1)).is_some() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "job {id} still runs without its coordinator"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "it ended before the heartbeat limit"
    );
    // The stderr of every job left in staging (rl's among them).
    let logs: Vec<String> = std::fs::read_dir(store.join("tmp"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join(".flag-stderr"))
        .filter(|p| p.is_file())
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    assert!(
        logs.iter()
            .any(|l| l.contains("the coordinator stopped: no heartbeat")),
        "{logs:?}"
    );
    assert!(!committed_stages(&store).contains("rl"));
    // The next run cleans the staging folder up and computes the stage.
    let again = run_ok(&mut run_cmd(root.path(), &store, &conf, "slurm"));
    assert_eq!(statuses(&again)["rl"], "ran");
}

/// The stages that have a committed run in the store (from their manifests).
fn committed_stages(store: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for dir in manifests(store) {
        for f in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if let Ok(text) = std::fs::read_to_string(f.path())
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
                && let Some(stage) = v["stage"].as_str()
            {
                out.insert(stage.to_string());
            }
        }
    }
    out
}
