//! Stages run in worker processes: a worker killed, aborted or orphaned never leaves partial
//! output, its failure is reported with the log tail, progress still reaches a terminal, the
//! coordinator never loads libtorch, and an all-cached re-run starts no worker.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// ingest -> indicators -> one short DDQN run (about a second of work in its worker).
const PIPELINE: &str = r#"name: workers
params:
  data_dir: ../shared/data
  episodes: 1
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
  rl:
    uses: ddqn
    inputs:
      table: indicators.table
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

fn project() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    copy_project(root.path());
    std::fs::write(root.path().join("pipelines/workers.yaml"), PIPELINE).unwrap();
    root
}

fn run_cmd(root: &Path, store: &Path) -> Command {
    let mut c = flag(root, store);
    c.args(["run", "pipelines/workers.yaml", "--json", "--set"])
        .arg(format!("data_dir={}", data_dir().display()));
    c
}

/// The pid of the process named `name` that `parent` started to run a stage job, once it
/// appears.
fn child_named(parent: u32, name: &str, within: Duration) -> Option<u32> {
    let until = Instant::now() + within;
    while Instant::now() < until {
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // pid (comm) state ppid ...
            let Some((comm, rest)) = stat.split_once(") ") else {
                continue;
            };
            let ppid = rest.split(' ').nth(1).and_then(|p| p.parse::<u32>().ok());
            // The worker that runs a stage (`flag-worker exec JOB`), not one asked to
            // describe the kinds.
            let runs_a_job = std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"exec"));
            if ppid == Some(parent) && comm.ends_with(&format!("({name}")) && runs_a_job {
                return Some(pid);
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.split(") ").nth(1).unwrap_or("").starts_with('Z'))
}

fn spawn(root: &Path, store: &Path) -> Child {
    run_cmd(root, store)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn staging_entries(store: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(store.join("tmp"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

#[test]
fn kill_9_of_the_worker_at_20_random_points_never_commits_partial_output() {
    let root = project();
    let reference_store = root.path().join("reference");
    let reference = run_ok(&mut run_cmd(root.path(), &reference_store));
    let rl_seconds = records(&reference)["rl"]["seconds"].as_f64().unwrap();
    let reference = output_hashes(&reference);

    let store = root.path().join("store");
    // Upstream stages cached first; then every run forces only the DDQN stage, so every kill
    // lands in its worker (or just after it finished).
    let mut warm = run_cmd(root.path(), &store);
    warm.args(["--only", "indicators"]);
    run_ok(&mut warm);

    // A fixed LCG: the kill points are the same on every machine, spread over the run.
    let mut state: u64 = 0x5eed_1234;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as f64 / (1u64 << 31) as f64
    };
    let manifests = |store: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(store.join("manifests"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let mut landed = 0;
    let mut attempts = 0;
    while landed < 20 {
        attempts += 1;
        assert!(
            attempts <= 40,
            "only {landed} of {attempts} kills landed in a running worker"
        );
        let before = manifests(&store);
        let child = run_cmd(root.path(), &store)
            .args(["--only", "rl", "--force"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let worker = child_named(child.id(), "flag-worker", Duration::from_secs(60))
            .expect("the ddqn stage runs in a flag-worker process");
        let delay = rl_seconds * 0.9 * next();
        std::thread::sleep(Duration::from_secs_f64(delay));
        let killed = alive(worker);
        if killed {
            signal(worker, "KILL");
        }
        let out = child.wait_with_output().unwrap();
        let rec = records(&out);
        if !killed || rec["rl"]["status"] == "ran" {
            // The worker had finished: its output is the reference's.
            assert_eq!(output_hashes(&out)["rl"], reference["rl"]);
            continue;
        }
        landed += 1;
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert_eq!(rec["rl"]["status"], "failed", "{:?}", rec["rl"]);
        let err = rec["rl"]["error"].as_str().unwrap();
        assert!(
            err.contains("signal 9") && err.contains("nothing was committed"),
            "kill at {delay:.3}s: {err}"
        );
        // Nothing of the stage reached the store: no manifest added, no staging left, and
        // verify finds every stored object intact.
        assert_eq!(manifests(&store), before, "kill {landed} at {delay:.3}s");
        assert!(
            staging_entries(&store).is_empty(),
            "{:?}",
            staging_entries(&store)
        );
        let mut v = flag(root.path(), &store);
        v.args(["verify", "--report-only"]);
        let vo = v.output().unwrap();
        assert!(vo.status.success(), "verify: {}", stdout(&vo));
    }
    let resumed = run_ok(&mut run_cmd(root.path(), &store));
    assert_eq!(output_hashes(&resumed), reference);
}

#[test]
fn an_aborted_worker_is_reported_with_its_log_tail() {
    let root = project();
    let store = root.path().join("store");
    let child = spawn(root.path(), &store);
    let worker = child_named(child.id(), "flag-worker", Duration::from_secs(60)).unwrap();
    // Once it has written its log header, abort it as a failed assertion in C++ would.
    let t = Instant::now();
    // (A running stage's log is in its staging folder until the run ends.)
    let header_written = || {
        staging_entries(&store).iter().any(|d| {
            std::fs::read_to_string(d.join(".flag-run.log"))
                .is_ok_and(|l| l.contains("stage rl (ddqn)") && l.contains("worker: pid"))
        })
    };
    while !header_written() && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(5));
    }
    signal(worker, "ABRT");
    let out = child.wait_with_output().unwrap();
    let rec = &records(&out)["rl"];
    assert_eq!(rec["status"], "failed");
    let err = rec["error"].as_str().unwrap();
    assert!(err.contains("signal 6 (SIGABRT"), "{err}");
    assert!(err.contains("last lines of its log"), "{err}");
    assert!(
        err.contains("stage rl (ddqn) key"),
        "the tail quotes the log: {err}"
    );
    let log = std::fs::read_to_string(rec["log"].as_str().unwrap()).unwrap();
    assert!(
        log.contains("FAILED: the stage worker was ended by signal 6"),
        "{log}"
    );
    assert!(staging_entries(&store).is_empty());
}

#[test]
fn a_worker_whose_coordinator_is_killed_stops_and_the_next_run_completes() {
    let root = project();
    let store = root.path().join("store");
    let mut child = spawn(root.path(), &store);
    let worker = child_named(child.id(), "flag-worker", Duration::from_secs(60)).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let t = Instant::now();
    while alive(worker) && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(worker), "the orphaned worker still runs after 10 s");
    let out = run_ok(&mut run_cmd(root.path(), &store));
    assert_eq!(statuses(&out)["rl"], "ran");
}

#[test]
fn sigint_or_sigterm_stops_the_run_stores_nothing_unfinished_and_the_next_run_completes() {
    let root = project();
    let reference = output_hashes(&run_ok(&mut run_cmd(
        root.path(),
        &root.path().join("reference"),
    )));
    let store = root.path().join("store");
    let mut warm = run_cmd(root.path(), &store);
    warm.args(["--only", "indicators"]);
    run_ok(&mut warm);
    let manifests = || {
        snapshot(&store)
            .into_keys()
            .filter(|k| k.starts_with("manifests/"))
    };
    let before: Vec<String> = manifests().collect();
    // Signals sent to `flag` alone (as `kill` does; a terminal's Ctrl-C also reaches the
    // worker, which dies of it by itself).
    for (sig, code) in [("INT", 130), ("TERM", 143)] {
        let child = run_cmd(root.path(), &store)
            .args(["--only", "rl", "--force"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let worker = child_named(child.id(), "flag-worker", Duration::from_secs(60))
            .expect("the ddqn stage runs in a flag-worker process");
        signal(child.id(), sig);
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(code), "SIG{sig}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("interrupted: stopped 1 stage worker(s)"),
            "SIG{sig}: {}",
            stderr(&out)
        );
        // The worker is gone with its coordinator (reaped, not orphaned), nothing of the
        // stage is stored and nothing is left staged.
        assert!(!alive(worker), "SIG{sig}: the worker {worker} still runs");
        assert_eq!(manifests().collect::<Vec<_>>(), before, "SIG{sig}");
        assert!(
            staging_entries(&store).is_empty(),
            "SIG{sig}: {:?}",
            staging_entries(&store)
        );
        let vo = flag(root.path(), &store)
            .args(["verify", "--report-only"])
            .output()
            .unwrap();
        assert!(vo.status.success(), "SIG{sig}: verify: {}", stdout(&vo));
    }
    // The lock was given back: the next run does not wait, and completes as the reference.
    let mut again = run_cmd(root.path(), &store);
    again.arg("--no-wait");
    let out = run_ok(&mut again);
    assert_eq!(statuses(&out)["rl"], "ran");
    assert_eq!(output_hashes(&out), reference);
}

#[test]
fn worker_progress_reaches_the_terminal() {
    let root = project();
    let store = root.path().join("store");
    let cmd = format!(
        "{} run pipelines/workers.yaml --set episodes=4 --set data_dir={}",
        flag_bin().display(),
        data_dir().display()
    );
    // `script` gives the run a pseudo-terminal, where the progress bars are drawn.
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .current_dir(root.path())
        .env("FLAG_STORE", &store)
        .env("FLAG_ROOT", root.path())
        .env("COLUMNS", "160")
        // A terminal type: without TERM (a bare CI environment) nothing is drawn at all.
        .env("TERM", "xterm")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stdout(&out));
    let screen = stdout(&out);
    assert!(
        screen.contains("episodes (AAPL run 0)"),
        "the DDQN worker's progress message is not on the terminal:\n{screen}"
    );
}

fn needed_libraries(binary: &Path) -> String {
    let out = Command::new("readelf")
        .arg("-d")
        .arg(binary)
        .output()
        .unwrap();
    assert!(out.status.success());
    stdout(&out)
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn only_the_worker_links_libtorch() {
    let coordinator = needed_libraries(&flag_bin());
    assert!(
        !coordinator.contains("libtorch") && !coordinator.contains("libc10"),
        "{coordinator}"
    );
    let worker = flag_bin().with_file_name("flag-worker");
    let w = needed_libraries(&worker);
    assert!(w.contains("libtorch_cpu") && w.contains("libc10"), "{w}");
}

/// Regression: `cargo test` builds `flag` but not the `flag-worker` binary beside it (another
/// package's binary), so after a source change the suite ran stage jobs in a stale worker, or
/// on a fresh machine in none. `just build`/`just test` now build every binary; this checks that
/// the worker is newer than each workspace source cargo's dep-info says it was built from.
#[test]
fn the_worker_beside_flag_is_built_from_the_current_sources() {
    let worker = flag_bin().with_file_name("flag-worker");
    let dep_info = worker.with_file_name("flag-worker.d");
    let built = std::fs::metadata(&worker)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e} (run `just build`)", worker.display()));
    let text = std::fs::read_to_string(&dep_info)
        .unwrap_or_else(|e| panic!("{}: {e} (run `just build`)", dep_info.display()));
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let (_, deps) = text
        .lines()
        .next()
        .and_then(|l| l.split_once(": "))
        .expect("dep-info starts with `target: deps`");
    let sources: Vec<PathBuf> = deps
        .replace("\\ ", "\0")
        .split_whitespace()
        .map(|p| PathBuf::from(p.replace('\0', " ")))
        .filter(|p| p.starts_with(&root))
        .collect();
    assert!(
        sources.len() > 50,
        "dep-info lists {} workspace sources",
        sources.len()
    );
    for src in sources {
        let changed = std::fs::metadata(&src).and_then(|m| m.modified());
        let stale = match &changed {
            Ok(t) => *t > built,
            Err(_) => true,
        };
        assert!(
            !stale,
            "{} is older than {} ({changed:?}): build it with `just build`",
            worker.display(),
            src.display()
        );
    }
}

#[test]
fn an_all_cached_rerun_starts_no_worker() {
    let root = project();
    let store = root.path().join("store");
    // A wrapper in front of the real worker logs every start.
    let calls = root.path().join("worker-calls.txt");
    let wrapper = root.path().join("worker.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"$1\" >> {}\nexec {} \"$@\"\n",
            calls.display(),
            flag_bin().with_file_name("flag-worker").display()
        ),
    )
    .unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(&wrapper)
        .status()
        .unwrap();
    let cache = root.path().join("cache");
    let with_wrapper = |c: &mut Command| {
        c.env("FLAG_WORKER", &wrapper).env("FLAG_CACHE", &cache);
    };
    let mut first = run_cmd(root.path(), &store);
    with_wrapper(&mut first);
    run_ok(&mut first);
    let log = std::fs::read_to_string(&calls).unwrap();
    assert!(
        log.contains("catalogue") && log.contains("describe") && log.contains("exec"),
        "{log}"
    );

    std::fs::write(&calls, "").unwrap();
    let mut again = run_cmd(root.path(), &store);
    with_wrapper(&mut again);
    let out = run_ok(&mut again);
    assert!(statuses(&out).values().all(|s| s == "cached"));
    assert_eq!(
        std::fs::read_to_string(&calls).unwrap(),
        "",
        "a worker was started"
    );
}

#[test]
fn two_libtorch_workers_do_not_share_the_cores_at_once() {
    // Two DDQN stages become ready together; each keeps every core busy, so with --jobs 2 the
    // second waits for the first instead of both spinning on the same cores.
    let root = project();
    let second = PIPELINE.replace("  rl:\n", "  rl2:\n    uses: ddqn\n    inputs:\n      table: indicators.table\n    params:\n      strategy: tdqn\n      runs: 1\n      episodes: 1\n      seed: 8\n      train_start: \"2012-01-01\"\n      train_end: \"2014-12-31\"\n      test_start: \"2015-01-01\"\n      test_end: \"2015-12-31\"\n  rl:\n");
    std::fs::write(root.path().join("pipelines/workers.yaml"), second).unwrap();
    let store = root.path().join("store");
    let out = run_ok(run_cmd(root.path(), &store).args(["--jobs", "2"]));
    let rec = records(&out);
    let waited: Vec<&str> = ["rl", "rl2"]
        .into_iter()
        .filter(|s| {
            let log = std::fs::read_to_string(rec[*s]["log"].as_str().unwrap()).unwrap();
            log.contains("CPU(s) held by other stages of this run")
        })
        .collect();
    assert_eq!(waited.len(), 1, "exactly one of the two waited: {waited:?}");
}
