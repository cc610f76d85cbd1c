//! `pipelines/flag.yaml`'s FinAgent path through the real binary: real MSFT bars and
//! stocknewsapi news, the real MiniLM and SmolLM2, shrunk by `--set` to a few test days and a
//! one-month news memory so it runs in CI. Checks that every module answered validly, that
//! the tables agree with each other and with the data (no look-ahead in retrieval), and that
//! an ablation reuses every upstream stage from the cache.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use common::*;
use flag_core::arrow::array::{
    Array, BooleanArray, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray,
};
use flag_core::parquet_io::read_parquet_file;

const PIPELINE: &str = "pipelines/flag.yaml";

fn small_args(extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "run",
        PIPELINE,
        "--json",
        "--jobs",
        "1",
        "--set",
        "fa_test_start=2023-06-01",
        "--set",
        "fa_test_end=2023-06-07",
        "--set",
        "fa_items.start=2023-05-01",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn artifact(root: &Path, store: &Path, name: &str) -> PathBuf {
    let out = run_ok(flag(root, store).args(["path", name, "--pipeline", PIPELINE]));
    PathBuf::from(stdout(&out).lines().next().unwrap())
}

fn table(root: &Path, store: &Path, name: &str) -> RecordBatch {
    let (schema, batches) = read_parquet_file(&artifact(root, store, name)).unwrap();
    flag_core::arrow::compute::concat_batches(&schema, &batches).unwrap()
}

fn col<'a, T: 'static>(b: &'a RecordBatch, n: &str) -> &'a T {
    b.column_by_name(n)
        .unwrap_or_else(|| panic!("column {n}"))
        .as_any()
        .downcast_ref::<T>()
        .unwrap()
}

fn strs(b: &RecordBatch, n: &str) -> Vec<Option<String>> {
    let a = col::<StringArray>(b, n);
    (0..a.len())
        .map(|i| (!a.is_null(i)).then(|| a.value(i).to_string()))
        .collect()
}

fn bools(b: &RecordBatch, n: &str) -> Vec<bool> {
    let a = col::<BooleanArray>(b, n);
    (0..a.len()).map(|i| a.value(i)).collect()
}

fn dates(b: &RecordBatch, n: &str) -> Vec<i32> {
    let a = col::<Date32Array>(b, n);
    (0..a.len()).map(|i| a.value(i)).collect()
}

#[test]
fn finagent_path_answers_validly_and_ablations_share_the_cache() {
    let root = repo_root();
    let store = tempfile::tempdir().unwrap();
    let out = run_ok(flag(&root, store.path()).args(small_args(&["--only", "finagent_report"])));
    let st = statuses(&out);
    for s in [
        "fa_items",
        "fa_intel",
        "fa_hits",
        "fa_past",
        "fa_low",
        "fa_tools",
        "finagent",
        "fa_buy_and_hold",
        "fa_metrics",
        "finagent_report",
    ] {
        assert_eq!(st[s], "ran", "{s}");
    }
    // The report renders the paper's tables for this run (objects keep the extension).
    let listed = run_ok(flag(&root, store.path()).args([
        "path",
        "finagent_report.report",
        "--pipeline",
        PIPELINE,
    ]));
    let report = stdout(&listed)
        .lines()
        .map(PathBuf::from)
        .find(|p| p.extension().is_some_and(|e| e == "md"))
        .expect("the report directory holds report.md");
    let md = std::fs::read_to_string(&report).unwrap();
    for part in [
        "## Table 4 layout",
        "finagent_MLHT",
        "## Retrieval",
        "## One day traced",
        "prompt tokens / call",
    ] {
        assert!(md.contains(part), "report lacks {part}");
    }
    // Five trading days, 2023-06-01..07; every module answered every call validly.
    let intel = table(&root, store.path(), "fa_intel.intel");
    assert_eq!(intel.num_rows(), 5);
    let past = table(&root, store.path(), "fa_past.intel");
    let low = table(&root, store.path(), "fa_low.reflections");
    let dec = table(&root, store.path(), "finagent.decisions");
    for (name, t) in [
        ("intel", &intel),
        ("past", &past),
        ("low", &low),
        ("decisions", &dec),
    ] {
        let failed = bools(t, "failed").iter().filter(|f| **f).count();
        assert_eq!(failed, 0, "{name}: invalid answers after retries");
    }
    assert!(
        bools(&intel, "called").iter().all(|c| *c),
        "MSFT has news every day"
    );
    // Usage: one row per call of each module, with counted tokens and a positive time.
    for (name, module, calls) in [
        ("fa_intel.usage", "latest_intel", 5),
        (
            "fa_past.usage",
            "past_intel",
            bools(&past, "called").iter().filter(|c| **c).count(),
        ),
        ("fa_low.usage", "low_reflection", low.num_rows()),
    ] {
        let u = table(&root, store.path(), name);
        assert_eq!(u.num_rows(), calls, "{name}");
        assert!(
            strs(&u, "module")
                .iter()
                .all(|m| m.as_deref() == Some(module))
        );
        let prompt = col::<Int64Array>(&u, "prompt_tokens");
        let answer = col::<Int64Array>(&u, "completion_tokens");
        assert!((0..u.num_rows()).all(|i| prompt.is_valid(i) && prompt.value(i) > 100));
        assert!((0..u.num_rows()).all(|i| answer.value(i) > 0));
        let ms = col::<Float64Array>(&u, "ms");
        assert!((0..u.num_rows()).all(|i| ms.value(i) > 0.0));
    }
    let u = table(&root, store.path(), "finagent.usage");
    let modules = strs(&u, "module");
    let n = |m: &str| modules.iter().filter(|x| x.as_deref() == Some(m)).count();
    assert_eq!(n("decision"), dec.num_rows());
    assert_eq!(
        n("high_reflection"),
        bools(&dec, "high_called").iter().filter(|c| **c).count()
    );
    let high_failed = bools(&dec, "high_failed").iter().filter(|f| **f).count();
    assert_eq!(high_failed, 0, "high-level reflection failures");
    // The first decision has no history to reflect on; every later one does.
    assert_eq!(
        bools(&dec, "high_called"),
        vec![false, true, true, true, true]
    );
    // Per-item analyses cover exactly the items shown.
    let ids = col::<flag_core::arrow::array::ListArray>(&intel, "item_ids");
    let sent = col::<flag_core::arrow::array::ListArray>(&intel, "sentiments");
    for i in 0..intel.num_rows() {
        assert_eq!(ids.value(i).len(), sent.value(i).len());
        assert!((1..=3).contains(&ids.value(i).len()), "max_items 3");
    }
    // Retrieval: three queries per answered day, hits strictly before the decision day.
    let hits = table(&root, store.path(), "fa_hits.hits");
    assert!(hits.num_rows() > 0);
    let (hd, hi) = (dates(&hits, "date"), dates(&hits, "item_date"));
    assert!(
        hd.iter().zip(&hi).all(|(d, i)| i < d),
        "memory is strictly earlier"
    );
    let kept_days: BTreeSet<i32> = hd
        .iter()
        .zip(bools(&hits, "kept"))
        .filter(|(_, k)| *k)
        .map(|(d, _)| *d)
        .collect();
    let past_called: BTreeSet<i32> = dates(&past, "date")
        .into_iter()
        .zip(bools(&past, "called"))
        .filter(|(_, c)| *c)
        .map(|(d, _)| d)
        .collect();
    assert_eq!(
        kept_days, past_called,
        "past intelligence runs on the days with kept hits"
    );
    // Equity: one row per decision day, decisions' traded flags match the trades.
    let eq = table(&root, store.path(), "finagent.equity");
    assert_eq!(eq.num_rows(), 5);
    assert!(
        strs(&eq, "strategy")
            .iter()
            .all(|s| s.as_deref() == Some("finagent_MLHT"))
    );
    let trades = table(&root, store.path(), "finagent.trades");
    let traded = bools(&dec, "traded").iter().filter(|t| **t).count();
    assert_eq!(trades.num_rows(), traded);
    let actions: Vec<String> = strs(&dec, "action").into_iter().flatten().collect();
    assert!(
        actions
            .iter()
            .all(|a| ["BUY", "SELL", "HOLD"].contains(&a.as_str()))
    );
    let attempts = col::<Int64Array>(&dec, "attempts");
    assert!((0..attempts.len()).all(|i| attempts.value(i) >= 1));
    // Prompts of a day show nothing dated after it.
    let prompts: Vec<String> = strs(&dec, "prompt").into_iter().flatten().collect();
    for (p, d) in prompts.iter().zip(dates(&dec, "date")) {
        let day = flag_trading::series::from_days(d).to_string();
        assert!(p.contains(&format!("Today is {day}.")));
        for later in dates(&dec, "date").into_iter().filter(|x| *x > d) {
            let l = flag_trading::series::from_days(later).to_string();
            assert!(!p.contains(&l), "{day}'s prompt mentions {l}");
        }
    }

    // An ablation: only the agent runs again; every upstream stage comes from the cache.
    let abl = run_ok(flag(&root, store.path()).args(small_args(&[
        "--only",
        "finagent",
        "--set",
        "finagent.modules=T",
    ])));
    let st: BTreeMap<String, String> = statuses(&abl);
    assert_eq!(st["finagent"], "ran");
    for s in [
        "fa_items", "fa_intel", "fa_hits", "fa_past", "fa_low", "fa_tools",
    ] {
        assert_eq!(st[s], "cached", "{s}");
    }
    let t_only = table(&root, store.path(), "finagent.decisions");
    let p: Vec<String> = strs(&t_only, "prompt").into_iter().flatten().collect();
    assert!(
        p.iter()
            .all(|p| p.contains("Rule-strategy tools") && !p.contains("market intelligence"))
    );
    assert!(bools(&t_only, "high_called").iter().all(|c| !c));
}
