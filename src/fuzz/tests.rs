//! The fuzz targets in `just test` (fixed seed, fixed iteration counts: deterministic), the
//! long run behind `just fuzz`, and regression tests for what fuzzing found.
#![cfg(test)]
use std::path::PathBuf;
use std::time::Duration;

use super::targets::{self, NAMES};
use super::{Config, Outcome, Target, fuzz, replay};

/// The seed of `just test`'s runs (any fixed value: the runs must be reproducible).
const TEST_SEED: u64 = 0x0F1A_6F22;

fn artifacts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("artifacts/fuzz")
}

/// `iters` executions of target `name` (its seeds first); any finding fails the test with
/// the saved input's path.
fn smoke(name: &str, iters: u64) {
    let mut t = targets::target(name).expect("a known target");
    let cfg = Config {
        seed: TEST_SEED,
        iters: Some(iters),
        time: None,
        hang_secs: 60,
        // Not a verdict: how long a run takes depends on the machine.
        slow_ms: u64::MAX,
        artifacts: Some(artifacts()),
    };
    let r = fuzz(&mut t, &cfg);
    eprintln!("{r}");
    assert_eq!(r.execs, iters);
    assert!(r.findings.is_empty(), "{r}");
}

#[test]
fn fuzz_pipeline() {
    smoke("pipeline", 5000);
}

#[test]
fn fuzz_ohlcv_tdqn() {
    smoke("ohlcv_tdqn", 10000);
}

#[test]
fn fuzz_ohlcv_yfinance() {
    smoke("ohlcv_yfinance", 10000);
}

#[test]
fn fuzz_ohlcv_yahoo() {
    smoke("ohlcv_yahoo", 10000);
}

#[test]
fn fuzz_ohlcv_coingecko() {
    smoke("ohlcv_coingecko", 10000);
}

#[test]
fn fuzz_ohlcv_investorbench() {
    smoke("ohlcv_investorbench", 10000);
}

#[test]
fn fuzz_ohlcv_roundtrip() {
    smoke("ohlcv_roundtrip", 4000);
}

#[test]
fn fuzz_news() {
    smoke("news_stocknewsapi", 5000);
    smoke("news_gnews", 5000);
    smoke("news_cryptotrade", 5000);
}

#[test]
fn fuzz_answers() {
    smoke("answers", 60000);
}

#[test]
fn fuzz_answers_roundtrip() {
    smoke("answers_roundtrip", 20000);
}

#[test]
fn fuzz_constrain() {
    smoke("constrain", 10000);
}

#[test]
fn fuzz_constraint_schema() {
    smoke("constraint_schema", 500);
}

/// The harness finds what it is meant to: a panic two edits away from a seed, and a
/// property violation, each saved with its input.
#[test]
fn harness_finds_a_planted_panic_and_violation() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Target {
        name: "planted",
        seeds: vec![b"{\"a\": [1, 2]}".to_vec()],
        dict: vec![b"boom".to_vec()],
        max_len: 256,
        run: Box::new(|b| {
            let s = String::from_utf8_lossy(b);
            if s.contains("boom") && s.contains('{') {
                panic!("planted panic");
            }
            if s.contains("[1, 2]]") {
                return Outcome::Violation("planted violation".into());
            }
            Outcome::Pass(format!("len {}", b.len().min(4)))
        }),
    };
    let cfg = Config {
        seed: 7,
        iters: Some(20_000),
        time: None,
        hang_secs: 60,
        slow_ms: u64::MAX,
        artifacts: Some(dir.path().to_path_buf()),
    };
    let r = fuzz(&mut t, &cfg);
    let panic = r
        .findings
        .iter()
        .find(|f| f.kind == "panic")
        .expect("the panic");
    assert!(panic.message.contains("planted panic"), "{}", panic.message);
    assert!(
        panic.message.contains("src/fuzz/tests.rs"),
        "{}",
        panic.message
    );
    let saved = panic.saved.as_ref().expect("saved");
    assert!(saved.starts_with(dir.path().join("planted")));
    assert_eq!(std::fs::read(saved).unwrap(), panic.input);
    assert!(replay(&mut t, &panic.input).contains("planted panic"));
    assert!(r.findings.iter().any(|f| f.message == "planted violation"));
    // Same seed, same iterations: the same run.
    let again = fuzz(&mut t, &cfg);
    let inputs = |r: &super::Report| {
        r.findings
            .iter()
            .map(|f| f.input.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(inputs(&r), inputs(&again));
}

/// `just fuzz`: every target (or those in FLAG_FUZZ_TARGETS) for FLAG_FUZZ_SECS seconds in
/// all, with FLAG_FUZZ_SEED or a fresh seed (printed: the same seed and FLAG_FUZZ_ITERS
/// replay a run exactly). FLAG_FUZZ_REPLAY=<saved .bin> runs one saved input instead.
#[test]
#[ignore = "long: run by `just fuzz`"]
fn fuzz_long() {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    if let Some(file) = env("FLAG_FUZZ_REPLAY") {
        let file = PathBuf::from(file);
        let name = file
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().to_string())
            .expect("FLAG_FUZZ_REPLAY=artifacts/fuzz/<target>/<file>.bin");
        let mut t = targets::target(&name).unwrap_or_else(|| panic!("no target '{name}'"));
        let input = std::fs::read(&file).expect("the saved input");
        println!(
            "replay {} on {name}: {}",
            file.display(),
            replay(&mut t, &input)
        );
        return;
    }
    let names: Vec<String> = match env("FLAG_FUZZ_TARGETS") {
        Some(t) => t
            .split([',', ' '])
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        None => NAMES.iter().map(|s| s.to_string()).collect(),
    };
    let secs: f64 = env("FLAG_FUZZ_SECS").map_or(120.0, |s| s.parse().expect("FLAG_FUZZ_SECS"));
    let seed: u64 = env("FLAG_FUZZ_SEED").map_or_else(
        || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        },
        |s| s.parse().expect("FLAG_FUZZ_SEED"),
    );
    let iters: Option<u64> = env("FLAG_FUZZ_ITERS").map(|s| s.parse().expect("FLAG_FUZZ_ITERS"));
    println!(
        "fuzz: seed {seed}, {secs} s over {} targets; findings under {}",
        names.len(),
        artifacts().display()
    );
    let per = Duration::from_secs_f64(secs / names.len() as f64);
    let (mut execs, mut findings) = (0, 0);
    for n in &names {
        let mut t = targets::target(n)
            .unwrap_or_else(|| panic!("no target '{n}' (targets: {})", NAMES.join(", ")));
        let cfg = Config {
            seed,
            iters,
            time: if iters.is_some() { None } else { Some(per) },
            hang_secs: 20,
            slow_ms: 1000,
            artifacts: Some(artifacts()),
        };
        let r = fuzz(&mut t, &cfg);
        println!("{r}");
        execs += r.execs;
        findings += r.findings.len();
    }
    println!("fuzz: seed {seed}: {execs} executions, {findings} findings");
    assert_eq!(findings, 0, "findings (seed {seed}) are listed above");
}
