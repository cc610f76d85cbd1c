//! `pipelines/flag-trader.yaml`'s `flag_stocks` stage through the real binary, on the real
//! investorbench MSFT closes and the real SmolLM2, shrunk by `--set` so it runs in CI (two PPO
//! iterations of 8 steps, one trainable block, a short test period). Checks the outputs
//! against each other and the data, that the checkpoint names the base GGUF's hash, that a
//! forced rerun gives the same bytes (CPU, same seed), and that a bad param is named.
mod common;

use std::path::{Path, PathBuf};

use common::*;
use flag_core::arrow::array::{
    Array, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray,
};
use flag_core::parquet_io::read_parquet_file;

const PIPELINE: &str = "pipelines/flag-trader.yaml";

fn small_args() -> Vec<String> {
    [
        "--only",
        "flag_stocks",
        "--set",
        "flag_stocks.tickers=[MSFT]",
        "--set",
        "flag_stocks.test_end=2020-10-30",
        "--set",
        "flag_stocks.total_timesteps=16",
        "--set",
        "flag_stocks.num_steps=8",
        "--set",
        "flag_stocks.minibatch_size=8",
        "--set",
        "flag_stocks.grad_accum_steps=2",
        "--set",
        "flag_stocks.trainable_blocks=1",
        "--set",
        "flag_stocks.window=5",
        "--set",
        "flag_stocks.history=3",
        "--set",
        "flag_stocks.runs=1",
        "--set",
        "flag_stocks.device=cpu",
        "--set",
        "flag_stocks.threads=2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run(root: &Path, store: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["run".to_string(), PIPELINE.into(), "--json".into()];
    args.extend(small_args());
    args.extend(extra.iter().map(|s| s.to_string()));
    run_ok(flag(root, store).args(&args))
}

fn artifact(root: &Path, store: &Path, name: &str) -> Vec<PathBuf> {
    let out = run_ok(flag(root, store).args(["path", name, "--pipeline", PIPELINE]));
    stdout(&out).lines().map(PathBuf::from).collect()
}

fn table(file: &Path) -> RecordBatch {
    let (schema, batches) = read_parquet_file(file).unwrap();
    flag_core::arrow::compute::concat_batches(&schema, &batches).unwrap()
}

fn strs(b: &RecordBatch, n: &str) -> Vec<String> {
    let c = b.column_by_name(n).unwrap();
    let a = c.as_any().downcast_ref::<StringArray>().unwrap();
    (0..a.len()).map(|i| a.value(i).to_string()).collect()
}

fn f64s(b: &RecordBatch, n: &str) -> Vec<Option<f64>> {
    let c = b.column_by_name(n).unwrap();
    let a = c.as_any().downcast_ref::<Float64Array>().unwrap();
    (0..a.len())
        .map(|i| (!a.is_null(i)).then(|| a.value(i)))
        .collect()
}

#[test]
fn ppo_stage_trains_checkpoints_and_reruns_identically() {
    let root = repo_root();
    let store = tempfile::tempdir().unwrap();
    let first = run(&root, store.path(), &[]);
    assert_eq!(statuses(&first)["flag_stocks"], "ran");

    // Equity: MSFT greedy paths, train 2020-07-01..09-30 and test 2020-10-01..10-30.
    let eq = table(&artifact(&root, store.path(), "flag_stocks.equity")[0]);
    assert!(strs(&eq, "strategy").iter().all(|s| s == "flag_trader#0"));
    assert!(strs(&eq, "env").iter().all(|s| s == "finagent"));
    let splits = strs(&eq, "split");
    let n_train = splits.iter().filter(|s| *s == "train").count();
    let n_test = splits.iter().filter(|s| *s == "test").count();
    assert_eq!(
        (n_train, n_test),
        (64, 22),
        "trading days in the two periods"
    );
    let dates = eq.column_by_name("date").unwrap();
    let dates = dates.as_any().downcast_ref::<Date32Array>().unwrap();
    let first_test = (0..eq.num_rows()).find(|&i| splits[i] == "test").unwrap();
    assert_eq!(
        dates.value_as_date(first_test).unwrap().to_string(),
        "2020-10-01"
    );

    // Log: two iterations with finite losses.
    let log = table(&artifact(&root, store.path(), "flag_stocks.log")[0]);
    assert_eq!(log.num_rows(), 2);
    for n in [
        "policy_loss",
        "value_loss",
        "entropy",
        "grad_norm",
        "learning_rate",
    ] {
        assert!(
            f64s(&log, n).iter().all(|x| x.is_some_and(f64::is_finite)),
            "{n}"
        );
    }
    let lr = f64s(&log, "learning_rate");
    assert_eq!((lr[0], lr[1]), (Some(5e-4), Some(2.5e-4)), "linear anneal");

    // Decisions: 16 sampled + one per path day; probabilities sum to 1; the first decision
    // of each path holds no shares, so Sell is masked (probability exactly 0).
    let dec = table(&artifact(&root, store.path(), "flag_stocks.decisions")[0]);
    let phase = strs(&dec, "phase");
    assert_eq!(phase.iter().filter(|p| *p == "rollout").count(), 16);
    assert_eq!(phase.iter().filter(|p| *p == "train").count(), 64);
    assert_eq!(phase.iter().filter(|p| *p == "test").count(), 22);
    let (ps, ph, pb) = (
        f64s(&dec, "p_sell"),
        f64s(&dec, "p_hold"),
        f64s(&dec, "p_buy"),
    );
    for i in 0..dec.num_rows() {
        let sum = ps[i].unwrap() + ph[i].unwrap() + pb[i].unwrap();
        assert!(
            (sum - 1.0).abs() < 1e-9,
            "row {i}: probabilities sum to {sum}"
        );
    }
    let step = dec.column_by_name("step").unwrap();
    let step = step.as_any().downcast_ref::<Int64Array>().unwrap();
    for i in 0..dec.num_rows() {
        if step.value(i) == 1 {
            assert_eq!(
                ps[i],
                Some(0.0),
                "row {i} ({}): Sell with no shares",
                phase[i]
            );
        }
    }
    let rewards = f64s(&dec, "reward");
    assert_eq!(
        rewards.iter().filter(|r| r.is_none()).count(),
        2,
        "only the last day of each path has no reward"
    );

    // Checkpoint: per run a config naming the base model's hash and the weights' hash (in
    // the store objects are named by content), and only the trainable tensors.
    let ckpt = artifact(&root, store.path(), "flag_stocks.checkpoint");
    assert_eq!(ckpt.len(), 2, "{ckpt:?}");
    let json = ckpt
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    let gguf = flag_llm::models::smollm2_gguf(None).unwrap();
    let hash = blake3::hash(&std::fs::read(&gguf).unwrap())
        .to_hex()
        .to_string();
    assert_eq!(cfg["base_model_blake3"], hash.as_str());
    assert_eq!(
        (cfg["ticker"].as_str(), cfg["run"].as_u64()),
        (Some("MSFT"), Some(0))
    );
    assert_eq!(cfg["trainable_blocks"], 1);
    assert_eq!(cfg["tensors"].as_array().unwrap().len(), 6 + 1 + 2 + 4);
    let weights = ckpt
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .unwrap();
    let w_hash = blake3::hash(&std::fs::read(weights).unwrap())
        .to_hex()
        .to_string();
    assert_eq!(cfg["weights_blake3"], w_hash.as_str());
    let stored = safetensors::SafeTensors::deserialize(&std::fs::read(weights).unwrap())
        .unwrap()
        .names()
        .len();
    assert_eq!(
        stored,
        6 + 1 + 2 + 4,
        "only the trainable tensors are stored"
    );

    // Cached the second time; a forced rerun gives the same bytes.
    let again = run(&root, store.path(), &[]);
    assert_eq!(statuses(&again)["flag_stocks"], "cached");
    // Recomputed from the stored run's inputs: every output but the wall-clock timing (a
    // measured output) is the same bytes, so the verdict is "reproduced".
    let mut verify = flag(&root, store.path());
    verify.args([
        "verify",
        "--recompute",
        "flag_stocks",
        "--pipeline",
        PIPELINE,
    ]);
    for a in small_args().iter().skip(2) {
        verify.arg(a);
    }
    let out = run_ok(&mut verify);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("timing: measured (wall-clock), not compared"),
        "{text}"
    );
    assert!(
        text.contains("reproduced: 5 of 5 outputs byte-identical (1 measured output not compared)"),
        "same seed, same CPU: identical artifacts\n{text}"
    );
    assert!(!text.contains("DIFFERENT"), "{text}");

    // The checkpoint as an input edge: `ppo_eval` trades it after the paper's test period.
    let eval = run(
        &root,
        store.path(),
        &[
            "--only",
            "flag_msft_later",
            "--set",
            "flag_msft_later.end=2021-05-28",
            "--set",
            "flag_msft_later.device=cpu",
            "--set",
            "flag_msft_later.threads=2",
        ],
    );
    let st = statuses(&eval);
    assert_eq!(st["flag_stocks"], "cached", "{st:?}");
    assert_eq!(st["flag_msft_later"], "ran");
    let later = table(&artifact(&root, store.path(), "flag_msft_later.equity")[0]);
    assert!(
        strs(&later, "strategy")
            .iter()
            .all(|s| s == "flag_trader#0")
    );
    let d = later.column_by_name("date").unwrap();
    let d = d.as_any().downcast_ref::<Date32Array>().unwrap();
    assert_eq!(d.value_as_date(0).unwrap().to_string(), "2021-05-07");
    assert_eq!(later.num_rows(), 16, "trading days 2021-05-07..05-28");
}

#[test]
fn a_bad_ppo_param_is_named() {
    let root = repo_root();
    let store = tempfile::tempdir().unwrap();
    let mut args = vec!["run".to_string(), PIPELINE.into()];
    args.extend(small_args());
    args.extend(["--set".into(), "flag_stocks.gamma=1.5".into()]);
    let out = flag(&root, store.path()).args(&args).output().unwrap();
    assert!(!out.status.success());
    let err = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        err.contains("param 'gamma'") && err.contains("[0, 1]"),
        "{err}"
    );
}
