//! The agent stages on a tiny real slice (AAPL and MSFT, spring 2022): anonymisation of every
//! prompt, the decision loop with a scripted backend, and the strategist, analyst and
//! llm_only stages with the real SmolLM2 model on CPU.
mod common;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use chrono::NaiveDate;
use flag_agents::analyst::{self, Analyst, AnalystConfig};
use flag_agents::llm_only::LlmOnly;
use flag_agents::strategist::{self, Inputs, Strategist, StrategistConfig};
use flag_core::arrow::array::{
    Array, BooleanArray, Date32Array, Float64Array, Int64Array, ListArray, StringArray,
};
use flag_core::{Stage, StageResult};
use flag_llm::backend::{LlmBackend, LlmRequest};
use flag_llm::generate::{FinishReason, GenerateOptions, Generation};
use flag_trading::series::from_days;
use serde_json::json;

/// Answers every request with `answer(user prompt)`, one character per token, and records
/// the prompts it saw.
struct Scripted<F: Fn(&str) -> String + Send + Sync> {
    answer: F,
    seen: Mutex<Vec<String>>,
}

impl<F: Fn(&str) -> String + Send + Sync> LlmBackend for Scripted<F> {
    fn name(&self) -> String {
        "scripted".into()
    }
    fn generate(
        &self,
        requests: &[LlmRequest],
        _: &GenerateOptions,
    ) -> StageResult<Vec<Generation>> {
        Ok(requests
            .iter()
            .map(|r| {
                self.seen.lock().unwrap().push(r.user.clone());
                let text = (self.answer)(&r.user);
                let n = text.len();
                Generation {
                    ids: (0..n as u32).collect(),
                    logprobs: vec![-0.5; n],
                    // The first token (the decision token) has entropy 0.25, the rest 0.
                    entropies: (0..n).map(|i| if i == 0 { 0.25 } else { 0.0 }).collect(),
                    entropy: 0.25 / n as f64,
                    perplexity: 0.5f64.exp(),
                    finish_reason: FinishReason::Eos,
                    constrained: None,
                    error: None,
                    text,
                    prompt_tokens: None,
                }
            })
            .collect())
    }
    fn decode(&self, ids: &[u32]) -> StageResult<String> {
        // Only called on answers of this backend, whose ids are 0..n: the text prefix.
        Ok("x".repeat(ids.len()))
    }
}

fn cfg_params(stage: &dyn Stage, given: serde_json::Value) -> flag_core::Params {
    common::params(stage, given)
}

fn has_word(hay: &str, needle: &str) -> bool {
    let h = hay.to_ascii_lowercase();
    let n = needle.to_ascii_lowercase();
    h.match_indices(&n).any(|(i, _)| {
        let before = h[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !c.is_ascii_alphanumeric());
        let after = h[i + n.len()..]
            .chars()
            .next()
            .is_none_or(|c| !c.is_ascii_alphanumeric());
        before && after
    })
}

/// Forms of every input date (and year) that must not reach a prompt.
fn forbidden_dates(days: &[i32]) -> Vec<String> {
    let mut out = Vec::new();
    for &d in days {
        let d: NaiveDate = from_days(d);
        for f in [
            "%Y-%m-%d",
            "%B %-d, %Y",
            "%b %-d, %Y",
            "%m/%d/%Y",
            "%B %-d",
            "%b. %-d",
        ] {
            out.push(d.format(f).to_string());
        }
    }
    out.extend(["2020", "2021", "2022", "2023"].map(String::from));
    out.sort();
    out.dedup();
    out
}

fn assert_anonymous(prompt: &str, dates: &[String]) {
    for name in [
        "AAPL",
        "MSFT",
        "Apple",
        "Microsoft",
        "iPhone",
        "Tim Cook",
        "Nadella",
        "GOOGL",
        "Google",
    ] {
        assert!(!has_word(prompt, name), "'{name}' in prompt:\n{prompt}");
    }
    for d in dates {
        assert!(!has_word(prompt, d), "date '{d}' in prompt:\n{prompt}");
    }
}

#[test]
fn prompts_are_anonymised_and_memory_is_sequential() {
    let tmp = tempfile::tempdir().unwrap();
    let slice = common::slice(
        tmp.path(),
        &["AAPL", "MSFT"],
        Some((&["AAPL", "MSFT"], "2022-02-01", "2022-04-29")),
    );
    let news = common::read(slice.news.as_ref().unwrap());
    assert!(news.num_rows() > 100, "real news rows: {}", news.num_rows());

    // Analyst prompts from the real items.
    let acfg = AnalystConfig::from_params(&cfg_params(
        &Analyst,
        json!({"start": "2022-03-01", "end": "2022-04-29"}),
    ))
    .unwrap();
    let days = analyst::group_news(&news, &acfg).unwrap();
    let all_days: Vec<i32> = days.iter().map(|d| d.date).collect();
    let dates = forbidden_dates(&all_days);
    let template = std::fs::read_to_string(common::repo().join("prompts/analyst/A0.txt")).unwrap();
    let raw_text: String = days
        .iter()
        .flat_map(|d| d.items.clone())
        .collect::<Vec<_>>()
        .join("\n");
    // The raw items do name the companies and dates: the test would catch a leak.
    assert!(has_word(&raw_text, "Apple") && has_word(&raw_text, "Microsoft"));
    for d in &days {
        let a = flag_agents::anon::Anonymiser::new(&d.ticker, &BTreeMap::new());
        let p = analyst::build_prompt(&template, "prompts/analyst/A0.txt", &a, d).unwrap();
        assert_anonymous(&p, &dates);
    }

    // Strategist P4 prompts, with raw (not anonymised) headlines posing as factors, through
    // the real decision loop. The first attempt of each decision is rejected, so retries and
    // the in-context memory of later decisions are exercised too.
    let p = cfg_params(
        &Strategist,
        json!({"prompt": "P4", "start": "2022-03-01", "end": "2022-04-29", "retries": 1}),
    );
    let cfg = StrategistConfig::from_params(&p).unwrap();
    let series = strategist::load_series(&common::read(&slice.table), None).unwrap();
    let mut factors = vec![Vec::new(); series.len()];
    for d in &days {
        let k = series.iter().position(|s| s.ticker == d.ticker).unwrap();
        let row = series[k].dates.binary_search(&d.date).unwrap();
        factors[k].push((row, d.items.iter().take(3).cloned().collect::<Vec<_>>()));
    }
    let template =
        std::fs::read_to_string(common::repo().join("prompts/strategist/P4.txt")).unwrap();
    let retry =
        std::fs::read_to_string(common::repo().join("prompts/strategist/retry.txt")).unwrap();
    let backend = Scripted {
        answer: |user: &str| {
            if user.contains("was rejected") {
                r#"LONG", "confidence": 2, "explanation": "Trend up.", "features": {"sma": 1}}"#
                    .to_string()
            } else {
                "BUY 100x\"}".to_string()
            }
        },
        seen: Mutex::new(Vec::new()),
    };
    let inputs = Inputs {
        cfg: &cfg,
        template: &template,
        retry: &retry,
        series: &series,
        news: &factors,
    };
    let decisions = strategist::decide(&inputs, &backend, &|_, _, _| {}).unwrap();
    // 2022-03-01..04-29 has 43 trading days: decisions on rows 0, 20, 40 of each ticker.
    assert_eq!(decisions.len(), 6);
    let seen = backend.seen.lock().unwrap();
    assert_eq!(
        seen.len(),
        12,
        "one rejected and one accepted attempt per decision"
    );
    let mut dates_seen: Vec<i32> = series.iter().flat_map(|s| s.dates.clone()).collect();
    dates_seen.retain(|d| from_days(*d).format("%Y").to_string() == "2022");
    let dates = forbidden_dates(&dates_seen);
    for p in seen.iter() {
        assert_anonymous(p, &dates);
        assert!(p.contains("Closing prices, rebased so that the close of day t = 100"));
    }
    // The first decision has no memory; the second remembers the first (20 days back).
    assert!(seen[0].contains("No previous strategies."));
    let second = seen
        .iter()
        .rev()
        .find(|p| p.contains("day t-20: LONG (confidence 2)"))
        .expect("memory shown");
    assert!(second.contains("rationale: Trend up."));
    // Headline factors reached the prompt, anonymised.
    assert!(seen.iter().any(|p| p.contains("the Company")));
    for d in &decisions {
        assert_eq!(d.outcome.attempts, 2);
        assert!(d.outcome.value.is_some());
        // Decision token entropy 0.25: certainty 0.750025, strength sqrt(2/3 * 0.750025).
        assert!((d.signal.strength - (0.750025f64 * 2.0 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(d.signal.direction, 1.0);
    }
}

#[test]
fn malformed_answers_become_recorded_neutral_failures() {
    let tmp = tempfile::tempdir().unwrap();
    let slice = common::slice(tmp.path(), &["AAPL"], None);
    let p = cfg_params(
        &Strategist,
        json!({"prompt": "P1", "start": "2022-03-01", "end": "2022-03-31", "retries": 2}),
    );
    let cfg = StrategistConfig::from_params(&p).unwrap();
    let series = strategist::load_series(&common::read(&slice.table), None).unwrap();
    let template =
        std::fs::read_to_string(common::repo().join("prompts/strategist/P1.txt")).unwrap();
    let retry =
        std::fs::read_to_string(common::repo().join("prompts/strategist/retry.txt")).unwrap();
    let backend = Scripted {
        answer: |_: &str| {
            r#"SELL EVERYTHING", "confidence": 3, "explanation": "x", "features": {"a": 1}}"#
                .to_string()
        },
        seen: Mutex::new(Vec::new()),
    };
    let news = vec![Vec::new(); series.len()];
    let inputs = Inputs {
        cfg: &cfg,
        template: &template,
        retry: &retry,
        series: &series,
        news: &news,
    };
    let decisions = strategist::decide(&inputs, &backend, &|_, _, _| {}).unwrap();
    let batch = strategist::signal_batch(&series, &decisions, "P1").unwrap();
    // 23 trading days in March 2022: decisions on rows 0 and 20.
    assert_eq!((decisions.len(), batch.num_rows()), (2, 23));
    let col = |n: &str| batch.column_by_name(n).unwrap().clone();
    let failed = col("failed");
    let failed = failed.as_any().downcast_ref::<BooleanArray>().unwrap();
    let dir = col("direction");
    let dir = dir.as_any().downcast_ref::<Float64Array>().unwrap();
    let attempts = col("attempts");
    let attempts = attempts.as_any().downcast_ref::<Int64Array>().unwrap();
    let raw = col("raw_text");
    let raw = raw.as_any().downcast_ref::<StringArray>().unwrap();
    let err = col("error");
    let err = err.as_any().downcast_ref::<StringArray>().unwrap();
    for i in 0..batch.num_rows() {
        assert!(failed.value(i));
        assert_eq!(dir.value(i), 0.0);
        assert_eq!(attempts.value(i), 3);
        assert_eq!(
            err.value(i),
            "direction \"SELL EVERYTHING\" is not \"LONG\" or \"SHORT\""
        );
        assert!(
            raw.value(i)
                .starts_with("--- attempt 1 ---\n{\"direction\": \"SELL EVERYTHING\"")
        );
        assert!(raw.value(i).contains("--- attempt 3 ---"));
    }
    for n in ["strength", "interaction"] {
        let c = col(n);
        let c = c.as_any().downcast_ref::<Float64Array>().unwrap();
        assert!(c.iter().all(|v| v == Some(0.0)), "{n}");
    }
    assert_eq!(col("confidence").null_count(), 23);
}

fn f64s(b: &flag_core::arrow::array::RecordBatch, n: &str) -> Vec<f64> {
    let c = b
        .column_by_name(n)
        .unwrap()
        .as_any()
        .downcast_ref::<Float64Array>()
        .unwrap();
    (0..c.len())
        .map(|i| if c.is_null(i) { f64::NAN } else { c.value(i) })
        .collect()
}

#[test]
fn real_model_analyst_strategist_and_llm_only() {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let slice = common::slice(
        tmp.path(),
        &["AAPL", "MSFT"],
        Some((&["AAPL", "MSFT"], "2022-03-30", "2022-03-31")),
    );
    let llm = json!({"max_tokens": 48, "retries": 1});
    let mut ap = json!({"max_items": 4, "max_chars": 160});
    ap.as_object_mut()
        .unwrap()
        .extend(llm.as_object().unwrap().clone());

    let t = Instant::now();
    let d = common::run(
        &Analyst,
        ap.clone(),
        &[("news", slice.news.clone().unwrap())],
        &tmp.path().join("analyst"),
    )
    .unwrap();
    let factors_path = common::output(&d, &Analyst, "factors");
    let analyst_s = t.elapsed().as_secs_f64();
    let f = common::read(&factors_path);
    // Two tickers x two trading dates, sorted.
    assert_eq!(f.num_rows(), 4);
    let tick = f
        .column_by_name("ticker")
        .unwrap()
        .as_any()
        .downcast_ref::<StringArray>()
        .unwrap();
    let date = f
        .column_by_name("trading_date")
        .unwrap()
        .as_any()
        .downcast_ref::<Date32Array>()
        .unwrap();
    let keys: Vec<(String, String)> = (0..4)
        .map(|i| {
            (
                tick.value(i).to_string(),
                from_days(date.value(i)).to_string(),
            )
        })
        .collect();
    assert_eq!(
        keys,
        [
            ("AAPL", "2022-03-30"),
            ("AAPL", "2022-03-31"),
            ("MSFT", "2022-03-30"),
            ("MSFT", "2022-03-31")
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    let lists = f
        .column_by_name("factors")
        .unwrap()
        .as_any()
        .downcast_ref::<ListArray>()
        .unwrap();
    let failed = f
        .column_by_name("failed")
        .unwrap()
        .as_any()
        .downcast_ref::<BooleanArray>()
        .unwrap();
    for i in 0..4 {
        let n = lists.value(i).len();
        if failed.value(i) {
            assert_eq!(n, 0);
        } else {
            assert!((2..=5).contains(&n), "row {i}: {n} factors");
        }
    }
    for e in f64s(&f, "entropy") {
        assert!((0.0..=1.0).contains(&e));
    }
    // Same inputs, same bytes (greedy decoding on CPU).
    let d2 = common::run(
        &Analyst,
        ap,
        &[("news", slice.news.clone().unwrap())],
        &tmp.path().join("analyst2"),
    )
    .unwrap();
    assert_eq!(
        std::fs::read(&factors_path).unwrap(),
        std::fs::read(common::output(&d2, &Analyst, "factors")).unwrap()
    );

    // Strategist P4 over two decision dates, reading the analyst's factors.
    let t = Instant::now();
    let mut sp = json!({"prompt": "P4", "start": "2022-03-31", "end": "2022-04-29", "max_tokens": 64, "retries": 1});
    sp.as_object_mut()
        .unwrap()
        .insert("history".into(), json!(5));
    let d = common::run(
        &Strategist,
        sp,
        &[("table", slice.table.clone()), ("factors", factors_path)],
        &tmp.path().join("strategist"),
    )
    .unwrap();
    let strategist_s = t.elapsed().as_secs_f64();
    let signals_path = common::output(&d, &Strategist, "signals");
    let s = common::read(&signals_path);
    // 2022-03-31..04-29: 21 trading days per ticker; decisions on 03-31 and 04-29.
    assert_eq!(s.num_rows(), 42);
    let dec = s
        .column_by_name("decision_date")
        .unwrap()
        .as_any()
        .downcast_ref::<Date32Array>()
        .unwrap();
    let mut decision_dates: Vec<String> = (0..42)
        .map(|i| from_days(dec.value(i)).to_string())
        .collect();
    decision_dates.dedup();
    assert_eq!(
        decision_dates,
        ["2022-03-31", "2022-04-29", "2022-03-31", "2022-04-29"]
    );
    let (dir, strength, inter, cert, ent, ppl) = (
        f64s(&s, "direction"),
        f64s(&s, "strength"),
        f64s(&s, "interaction"),
        f64s(&s, "certainty"),
        f64s(&s, "entropy"),
        f64s(&s, "perplexity"),
    );
    let conf = s
        .column_by_name("confidence")
        .unwrap()
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap();
    let failed = s
        .column_by_name("failed")
        .unwrap()
        .as_any()
        .downcast_ref::<BooleanArray>()
        .unwrap();
    let raw = s
        .column_by_name("raw_text")
        .unwrap()
        .as_any()
        .downcast_ref::<StringArray>()
        .unwrap();
    let mut n_failed = 0;
    for i in 0..42 {
        assert!(!raw.value(i).is_empty());
        assert!(ppl[i] >= 1.0 && (0.0..=1.0).contains(&ent[i]));
        if failed.value(i) {
            n_failed += 1;
            assert_eq!((dir[i], strength[i], inter[i]), (0.0, 0.0, 0.0));
            assert!(conf.is_null(i) && cert[i].is_nan());
        } else {
            assert!(dir[i] == 1.0 || dir[i] == -1.0);
            let c = conf.value(i);
            assert!((1..=3).contains(&c));
            assert!((cert[i] - (1e-4 + (1.0 - 1e-4) * (1.0 - ent[i]))).abs() < 1e-12);
            assert!((strength[i] - (c as f64 / 3.0 * cert[i]).sqrt()).abs() < 1e-12);
            assert_eq!(inter[i], dir[i] * strength[i]);
        }
    }

    // LLM-only: the directions traded in the TDQN environment.
    let d = common::run(
        &LlmOnly,
        json!({}),
        &[("signals", signals_path), ("table", slice.table.clone())],
        &tmp.path().join("llm_only"),
    )
    .unwrap();
    let eq = common::read(&common::output(&d, &LlmOnly, "equity"));
    assert_eq!(eq.num_rows(), 42);
    let pos = f64s(&eq, "position");
    for i in 0..42 {
        // A failed decision keeps the previous position (flat at the start).
        match dir[i] {
            x if x > 0.0 => assert!(pos[i] > 0.0),
            x if x < 0.0 => assert!(pos[i] < 0.0),
            _ => {}
        }
    }
    eprintln!(
        "real model: analyst {analyst_s:.1} s (4 prompts), strategist {strategist_s:.1} s (4 decisions, {} failed rows of 42), total {:.1} s",
        n_failed,
        t0.elapsed().as_secs_f64()
    );
}
