//! The reproducibility contract through the real binary, on real data: a kernel-path stage
//! (the libtorch news embedding) is keyed by ATen's CPU dispatch level, portable stages
//! (ingest, indicators, baselines, ddqn on the CPU, metrics) are not and give the same bytes
//! under every level, every manifest records the compute environment, and
//! `flag verify --recompute` tells identical from different outputs, naming the columns.
//! ATen reads ATEN_CPU_CAPABILITY once at start-up, so each level is its own `flag` process.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use flag_core::numerics::supported_cpu_capabilities;
use serde_json::Value;

const PIPELINE: &str = r#"
name: repro
params:
  data_dir: DATA
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
      train_start: "2017-01-01"
      train_end: "2017-12-31"
      test_start: "2018-01-01"
      test_end: "2018-03-31"
  ddqn:
    uses: ddqn
    inputs:
      table: indicators.table
    params:
      strategy: tdqn
      runs: 1
      episodes: 1
      seed: 3
      device: cpu
      train_start: "2017-07-01"
      train_end: "2017-12-31"
      test_start: "2018-01-01"
      test_end: "2018-03-31"
  metrics:
    uses: metrics
    inputs:
      equity: [baselines.equity, ddqn.equity]
      trades: [baselines.trades, ddqn.trades]
  fa_bars:
    uses: ingest_ohlcv
    params:
      source: ${data_dir}/stocks-2020-2023
      format: yfinance
      tickers: [MSFT]
  fa_news:
    uses: ingest_news
    inputs:
      bars: fa_bars.bars
    params:
      source: ${data_dir}/news/stocknewsapi
      format: stocknewsapi
      tickers: [MSFT]
  fa_items:
    uses: news_embed
    inputs:
      news: fa_news.news
    params:
      start: "2023-06-01"
      end: "2023-06-07"
"#;

/// glibc tunable that hides AVX2, FMA and AVX-512 from glibc's ifunc selection (not from
/// libtorch or MKL, which run cpuid themselves).
const NO_FMA: &str = "glibc.cpu.hwcaps=-AVX2,-FMA,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ";

/// Every stage of [`PIPELINE`].
const ALL: [&str; 8] = [
    "ohlcv",
    "indicators",
    "baselines",
    "ddqn",
    "metrics",
    "fa_bars",
    "fa_news",
    "fa_items",
];

fn project() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("project");
    copy_project(&root);
    std::fs::write(
        root.join("pipelines/repro.yaml"),
        PIPELINE.replace("DATA", &data_dir().display().to_string()),
    )
    .unwrap();
    let store = tmp.path().join("store");
    (tmp, root, store)
}

fn at_level(root: &Path, store: &Path, level: &str) -> Command {
    let mut c = flag(root, store);
    c.env("ATEN_CPU_CAPABILITY", level);
    c
}

/// `flag verify --recompute STAGE --pipeline pipelines/repro.yaml`.
fn recompute_cmd(root: &Path, store: &Path, stage: &str) -> Command {
    let mut c = flag(root, store);
    c.args([
        "verify",
        "--recompute",
        stage,
        "--pipeline",
        "pipelines/repro.yaml",
    ]);
    c
}

fn manifest(store: &Path, key: &str) -> Value {
    let p = store
        .join("manifests")
        .join(&key[..2])
        .join(format!("{key}.json"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn recompute(root: &Path, store: &Path, level: &str, stage: &str) -> (Output, Value) {
    let out = recompute_cmd(root, store, stage)
        .env("ATEN_CPU_CAPABILITY", level)
        .arg("--json")
        .output()
        .unwrap();
    let text = stdout(&out);
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("--json output ({e}):\n{text}\nstderr:\n{}", stderr(&out)));
    (out, v)
}

fn identical_outputs(v: &Value) -> Vec<(String, bool)> {
    v["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["output"].as_str().unwrap().to_string(),
                o["identical"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn kernel_path_stages_are_keyed_by_cpu_dispatch_and_portable_ones_are_not() {
    let levels = supported_cpu_capabilities();
    let (first, last) = (levels[0], *levels.last().unwrap());
    assert_eq!(first, "default");
    let (_tmp, root, store) = project();

    // Under `default` the ddqn network runs its plain build (ATEN_CPU_CAPABILITY caps its
    // kernels as it caps libtorch's), the news embedding libtorch's plain kernels.
    let run1 =
        run_ok(at_level(&root, &store, first).args(["run", "pipelines/repro.yaml", "--json"]));
    let recs1 = records(&run1);
    for s in ALL {
        assert_eq!(recs1[s]["status"], "ran", "{s}");
    }
    // Every manifest records the machine and kernel path; only the kernel-path stage's key
    // (the libtorch news embedding) holds it. ddqn on the CPU is portable: plain Rust.
    let key = |r: &Value| r["key"].as_str().unwrap().to_string();
    let embed1 = manifest(&store, &key(&recs1["fa_items"]));
    assert_eq!(embed1["compute"]["cpu_capability"], first);
    assert_eq!(embed1["compute"]["numerics"], "kernel-path");
    assert_eq!(embed1["parts"]["env"]["cpu_capability"], first);
    assert!(
        embed1["parts"]["env"]["libtorch"]
            .as_str()
            .unwrap()
            .starts_with("2.11.0")
    );
    assert!(
        embed1["parts"]["env"]["blas"]
            .as_str()
            .unwrap()
            .starts_with("mkl")
    );
    for s in ["baselines", "ddqn"] {
        let m = manifest(&store, &key(&recs1[s]));
        assert_eq!(m["compute"]["cpu_capability"], first, "{s}");
        assert_eq!(m["compute"]["numerics"], "portable", "{s}");
        assert!(m["parts"]["env"].get("cpu_capability").is_none(), "{s}");
    }
    let ddqn1 = manifest(&store, &key(&recs1["ddqn"]));
    assert_eq!(ddqn1["parts"]["env"]["device"], "cpu");

    // Portable stages give the same bytes when glibc's libm runs its SSE2 code instead of the
    // FMA/AVX2 variants it picks at load time (exp, log, pow...): recomputed with those CPU
    // features masked from glibc, every output is byte-identical. ddqn is recomputed here by
    // its widest kernels (no ATEN_CPU_CAPABILITY), its stored run came from the plain ones.
    for stage in ["indicators", "baselines", "ddqn", "metrics"] {
        let out = recompute_cmd(&root, &store, stage)
            .env("GLIBC_TUNABLES", NO_FMA)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{stage}: {}{}",
            stdout(&out),
            stderr(&out)
        );
        assert!(stdout(&out).contains("reproduced:"), "{}", stdout(&out));
    }

    if levels.len() == 1 {
        eprintln!("this CPU runs only ATen's default level: nothing to compare across levels");
        return;
    }
    // Same pipeline under the best level: portable stages (ddqn too) hit the cache, the news
    // embedding reruns with a reason naming the dispatch level.
    let run2 =
        run_ok(at_level(&root, &store, last).args(["run", "pipelines/repro.yaml", "--json"]));
    let recs2 = records(&run2);
    for s in ALL.into_iter().filter(|s| *s != "fa_items") {
        assert_eq!(recs2[s]["status"], "cached", "{s}: {:?}", recs2[s]);
    }
    assert_eq!(recs2["fa_items"]["status"], "ran");
    assert_ne!(
        key(&recs1["fa_items"]),
        key(&recs2["fa_items"]),
        "two levels, two keys"
    );
    let reason = recs2["fa_items"]["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("cpu_capability {first} -> {last}")),
        "{reason}"
    );

    // Portable stages recomputed under another level: byte-identical, and nothing in the
    // kernel path counts as a change. ddqn under every level between (its AVX2 build).
    let (out, v) = recompute(&root, &store, first, "baselines");
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(identical_outputs(&v).iter().all(|(_, same)| *same), "{v}");
    assert!(v["environment_changes"].as_array().unwrap().is_empty());
    for level in levels.iter().filter(|l| !["default", last].contains(l)) {
        let (out, v) = recompute(&root, &store, level, "ddqn");
        assert!(out.status.success(), "{level}: {v}");
        assert!(identical_outputs(&v).iter().all(|(_, same)| *same), "{v}");
    }

    // The news embedding recomputed on the stored run's own level: identical.
    let (out, v) = recompute(&root, &store, last, "fa_items");
    assert!(out.status.success(), "{v}");
    assert!(identical_outputs(&v).iter().all(|(_, same)| *same), "{v}");

    // Its stored run (level `last`) recomputed under `first`: that is the bytes of run 1, so
    // the verdict must match the hashes the two runs committed.
    let (out, v) = recompute(&root, &store, first, "fa_items");
    let changes: Vec<&str> = v["environment_changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(
        changes.contains(&format!("cpu_capability {last} -> {first}").as_str()),
        "{changes:?}"
    );
    let hashes = |out: &Output| output_hashes(out)["fa_items"].clone();
    let (h1, h2) = (hashes(&run1), hashes(&run2));
    let bytes_same = h1 == h2;
    for (output, same) in identical_outputs(&v) {
        assert_eq!(same, h1[&output] == h2[&output], "{output}: {v}");
    }
    assert_eq!(out.status.success(), bytes_same);
    eprintln!(
        "news embedding under {first} vs {last}: {}",
        if bytes_same {
            "identical bytes"
        } else {
            "different bytes"
        }
    );
    if !bytes_same {
        // The differing table names its columns; the embedding (a list of numbers) its largest
        // difference and where, without printing the vectors.
        let text = stdout(
            &recompute_cmd(&root, &store, "fa_items")
                .env("ATEN_CPU_CAPABILITY", first)
                .output()
                .unwrap(),
        );
        assert!(text.contains("NOT reproduced"), "{text}");
        assert!(text.contains("items: DIFFERENT"), "{text}");
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with("embedding:"))
            .unwrap_or_else(|| panic!("{text}"));
        assert!(line.contains("rows differ"), "{line}");
        assert!(line.contains("largest |diff|"), "{line}");
        assert!(line.contains(" element "), "{line}");
        assert!(line.len() < 300, "{line}");
    }
}

#[test]
fn recompute_refuses_a_stage_whose_pipeline_changed_since_its_run() {
    let (_tmp, root, store) = project();
    run_ok(flag(&root, &store).args(["run", "pipelines/repro.yaml", "--only", "baselines"]));
    let out = recompute_cmd(&root, &store, "baselines")
        .args(["--set", "baselines.cost=0.005"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("no longer matches its stored run"), "{err}");
    assert!(err.contains("param cost"), "{err}");
    let out = recompute_cmd(&root, &store, "ddqn").output().unwrap();
    assert!(
        stderr(&out).contains("has not run in pipeline 'repro'"),
        "{}",
        stderr(&out)
    );
}

/// The dispatch level recorded in manifests is the one libtorch runs: checked against
/// PyTorch's own `torch.backends.cpu.get_cpu_capability()` (same libtorch 2.11) for every
/// level and for an invalid value, which ATen ignores.
#[test]
fn recorded_cpu_capability_is_the_one_libtorch_uses() {
    let python = std::env::var_os("VIRTUAL_ENV")
        .map(|v| PathBuf::from(v).join("bin/python"))
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/flag/venv/bin/python"))
        })
        .filter(|p| p.exists())
        .expect("the project venv's python (bash .ci/setup makes it)");
    let mut levels: Vec<&str> = supported_cpu_capabilities();
    levels.push("not-a-level");
    for level in levels {
        let torch = Command::new(&python)
            .args([
                "-c",
                "import torch; print(torch.backends.cpu.get_cpu_capability().lower())",
            ])
            .env("ATEN_CPU_CAPABILITY", level)
            .output()
            .unwrap();
        assert!(torch.status.success(), "{}", stderr(&torch));
        let theirs = stdout(&torch).trim().to_string();
        let tmp = tempfile::tempdir().unwrap();
        let out = run_ok(
            flag(tmp.path(), tmp.path())
                .env("ATEN_CPU_CAPABILITY", level)
                .args(["env", "--json"]),
        );
        let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
        assert_eq!(
            v["kernel_path"]["cpu_capability"], theirs,
            "ATEN_CPU_CAPABILITY={level}"
        );
    }
}

#[test]
fn stages_catalogue_says_which_kinds_are_portable() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run_ok(flag(tmp.path(), tmp.path()).args(["stages", "--json"]));
    let all: Vec<Value> = serde_json::from_str(&stdout(&out)).unwrap();
    let numerics = |k: &str| {
        all.iter()
            .find(|s| s["kind"] == k)
            .unwrap_or_else(|| panic!("{k} listed"))["numerics"]
            .as_str()
            .unwrap()
            .to_string()
    };
    for k in [
        "ingest_ohlcv",
        "indicators",
        "baselines",
        "metrics",
        "report",
        "llm_only",
    ] {
        assert_eq!(numerics(k), "portable", "{k}");
    }
    for k in ["strategist", "analyst", "news_embed"] {
        assert_eq!(numerics(k), "kernel-path", "{k}");
    }
    // ddqn's default device is `auto`: libtorch's network on a GPU, the Rust one otherwise.
    let ddqn = if flag_core::numerics::cuda_present() {
        "kernel-path"
    } else {
        "portable"
    };
    assert_eq!(numerics("ddqn"), ddqn);
    let text = stdout(&run_ok(
        flag(tmp.path(), tmp.path()).args(["stages", "ddqn"]),
    ));
    assert!(text.contains(&format!("numerics: {ddqn}")), "{text}");
    assert!(text.contains("learning_rate"), "{text}");
    let out = flag(tmp.path(), tmp.path())
        .args(["stages", "ddqm"])
        .output()
        .unwrap();
    assert!(
        stderr(&out).contains("did you mean 'ddqn'"),
        "{}",
        stderr(&out)
    );
}
