//! The `finagent` decision loop with a recording backend: ablation switches change exactly
//! their prompt blocks and calls; nothing after a day reaches that day's prompts; the same
//! inputs give the same run.
mod common;

use std::collections::BTreeMap;
use std::sync::Mutex;

use flag_agents::finagent::agent::{AgentPrompts, FinAgentStage, Upstream, run_agent};
use flag_agents::finagent::agent_config::AgentConfig;
use flag_agents::finagent::agent_state::AgentState;
use flag_agents::finagent::data::ModuleRow;
use flag_agents::finagent::tools::ToolBoard;
use flag_core::StageResult;
use flag_llm::backend::{LlmBackend, LlmRequest};
use flag_llm::generate::{FinishReason, GenerateOptions, Generation};
use flag_trading::series::Series;
use serde_json::{Value, json};

/// Answers every module validly; the action depends only on the asset and day in the prompt,
/// so every ablation takes the same actions (and its prompts differ only by their blocks).
#[derive(Default)]
struct Recorder {
    prompts: Mutex<Vec<String>>,
    /// Per request: (a high-level reflection?, its images).
    images: Mutex<Vec<(bool, Vec<Vec<u8>>)>>,
}

fn field<'a>(prompt: &'a str, after: &str, until: char) -> &'a str {
    let s = &prompt[prompt.find(after).expect(after) + after.len()..];
    &s[..s.find(until).unwrap_or(s.len())]
}

fn hash(s: &str) -> u64 {
    s.bytes().fold(1469598103934665603u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(1099511628211)
    })
}

impl LlmBackend for Recorder {
    fn name(&self) -> String {
        "recorder".into()
    }
    fn generate(&self, reqs: &[LlmRequest], _: &GenerateOptions) -> StageResult<Vec<Generation>> {
        let mut out = Vec::new();
        for r in reqs {
            self.prompts.lock().unwrap().push(r.user.clone());
            self.images.lock().unwrap().push((
                r.user.starts_with("You are a trading coach"),
                r.images.clone(),
            ));
            let text = if r.user.starts_with("You are a trading coach") {
                let n: usize = field(&r.user, "The last ", ' ').parse().unwrap();
                let v: Vec<&str> = (0..n)
                    .map(|k| if k % 2 == 0 { "RIGHT" } else { "WRONG" })
                    .collect();
                json!({"verdicts": v, "improvement": "Wait for confirmation.",
                       "summary": "Entries were early.", "query": "early entries"})
                .to_string()
            } else {
                let key = format!(
                    "{}{}",
                    field(&r.user, "Asset: ", '.'),
                    field(&r.user, "Today is ", '.')
                );
                let action = ["BUY", "SELL", "HOLD"][(hash(&key) % 3) as usize];
                json!({"analysis": "Prices moved.", "action": action, "reasoning": "Following the data."})
                    .to_string()
            };
            out.push(Generation {
                text: text[r.prefill.len()..].to_string(),
                ids: vec![],
                logprobs: vec![],
                entropies: vec![],
                entropy: 0.0,
                perplexity: 1.0,
                finish_reason: FinishReason::Stop,
                constrained: None,
                error: None,
                prompt_tokens: None,
            });
        }
        Ok(out)
    }
    fn decode(&self, _: &[u32]) -> StageResult<String> {
        Ok(String::new())
    }
    fn embed(&self, texts: &[String]) -> StageResult<Vec<Vec<f32>>> {
        Ok(texts
            .iter()
            .map(|t| {
                let v: Vec<f32> = (0..8u64)
                    .map(|k| ((hash(t) >> (k * 8)) & 0xff) as f32 + 1.0)
                    .collect();
                let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                v.into_iter().map(|x| x / n).collect()
            })
            .collect())
    }
}

const T0: i32 = 19_500;
const DAYS: i32 = 30;

fn bars(scale_after: Option<(i32, f64)>) -> BTreeMap<String, Series> {
    ["AAA", "BBB"]
        .iter()
        .enumerate()
        .map(|(k, t)| {
            let dates: Vec<i32> = (0..DAYS).map(|d| T0 + d).collect();
            let close = dates
                .iter()
                .map(|&d| {
                    let base = 100.0 + k as f64 * 10.0 + f64::from((d * 7 + k as i32 * 3) % 11);
                    match scale_after {
                        Some((day, f)) if d > day => base * f,
                        _ => base,
                    }
                })
                .collect();
            let s = Series {
                ticker: t.to_string(),
                dates,
                close,
                cols: BTreeMap::new(),
            };
            (t.to_string(), s)
        })
        .collect()
}

fn row(text: &str) -> ModuleRow {
    ModuleRow {
        text: Some(text.to_string()),
        failed: false,
    }
}

/// Upstream tables whose texts name their day; after `changed_after` they say "CHANGED".
fn upstream(backend: &Recorder, changed_after: i32) -> Upstream {
    let mut up = Upstream::default();
    let mut board_signals = BTreeMap::new();
    for t in ["AAA", "BBB"] {
        for d in T0..T0 + DAYS {
            let tag = if d > changed_after {
                "CHANGED"
            } else {
                "as of"
            };
            let key = (t.to_string(), d);
            up.latest
                .insert(key.clone(), row(&format!("latest {tag} {d}")));
            up.past.insert(key.clone(), row(&format!("past {tag} {d}")));
            up.low.insert(key.clone(), row(&format!("low {tag} {d}")));
            let q = format!("query {tag} {d} {t}");
            let v = backend.embed(std::slice::from_ref(&q)).unwrap().remove(0);
            up.low_memory.add(
                t,
                d,
                format!("L:{t}:{d}"),
                format!("low {tag} {d}"),
                v.clone(),
            );
            up.low_queries.insert(key.clone(), (q, v));
            board_signals.insert(key, vec![("macd".to_string(), format!("BUY {tag} {d}"))]);
        }
    }
    up.low_memory.build().unwrap();
    up.tools = Some(ToolBoard::from_parts(board_signals, BTreeMap::new()));
    up
}

fn config(modules: &str) -> AgentConfig {
    config_window(modules, "2023-05-20", "2023-06-08")
}

fn config_window(modules: &str, start: &str, end: &str) -> AgentConfig {
    let p = common::params(
        &FinAgentStage,
        json!({"modules": modules, "start": start, "end": end, "history": 4, "top_k": 2}),
    );
    AgentConfig::from_params(&p).unwrap()
}

fn prompts_dir() -> std::path::PathBuf {
    common::repo().join("prompts/finagent")
}

fn read(name: &str) -> String {
    std::fs::read_to_string(prompts_dir().join(name)).unwrap()
}

/// The agent's prompt files as the stage reads them.
struct PromptFiles {
    decision: String,
    high: String,
    retry: String,
    decision_schema: Value,
    high_schema: Value,
}

impl PromptFiles {
    fn read() -> Self {
        let schema = |f: &str| serde_json::from_str(&read(f)).unwrap();
        PromptFiles {
            decision: read("decision.txt"),
            high: read("high_reflection.txt"),
            retry: read("retry.txt"),
            decision_schema: schema("decision.schema.json"),
            high_schema: schema("high_reflection.schema.json"),
        }
    }

    fn prompts(&self) -> AgentPrompts<'_> {
        AgentPrompts {
            decision: (&self.decision, &self.decision_schema),
            high: (&self.high, &self.high_schema),
            retry: &self.retry,
        }
    }
}

/// (ticker, date, decision prompt, high prompt) of a run.
fn run(
    modules: &str,
    scale_after: Option<(i32, f64)>,
    changed_after: i32,
) -> Vec<(String, i32, String, Option<String>)> {
    let backend = Recorder::default();
    let up = upstream(&backend, changed_after);
    let files = PromptFiles::read();
    let prompts = files.prompts();
    let out = run_agent(
        &config(modules),
        &bars(scale_after),
        &up,
        &backend,
        &prompts,
        None,
        &|_, _| {},
    )
    .unwrap();
    assert_eq!(out.failures(), 0);
    out.prompts()
}

/// The decision prompt without the blocks of the modules that are on.
fn strip_blocks(p: &str) -> String {
    let markers = [
        "\nLatest market intelligence:",
        "\nPrice reflection today:",
        "\nReflection on your recent decisions:",
        "\nRule-strategy tools",
    ];
    // Each block is a paragraph that starts with its marker and ends with a blank line.
    let mut s = p.to_string();
    for m in markers {
        if let Some(a) = s.find(m) {
            let a = a + 1;
            let end = a + s[a..].find("\n\n").expect("a block ends with a blank line") + 2;
            s.replace_range(a..end, "");
        }
    }
    s
}

#[test]
fn ablations_change_exactly_their_blocks_and_calls() {
    let full = run("MLHT", None, i32::MAX);
    assert!(full.len() >= 2 * 12, "{} decisions", full.len());
    for (modules, m, l, h, t) in [
        ("T", false, false, false, true),
        ("M", true, false, false, false),
        ("ML", true, true, false, false),
        ("MLH", true, true, true, false),
        ("MLHT", true, true, true, true),
    ] {
        let run = run(modules, None, i32::MAX);
        assert_eq!(run.len(), full.len(), "{modules}");
        for ((tk, d, p, hp), (_, _, fp, _)) in run.iter().zip(&full) {
            assert_eq!(
                p.contains("Latest market intelligence:"),
                m,
                "{modules} {tk} {d}"
            );
            assert_eq!(p.contains("Price reflection today:"), l, "{modules}");
            assert_eq!(
                p.contains("Reflection on your recent decisions:"),
                h,
                "{modules}"
            );
            assert_eq!(p.contains("Rule-strategy tools"), t, "{modules}");
            // A high-level reflection is asked exactly when H is on and there is history.
            assert_eq!(
                hp.is_some(),
                h && *d > run.iter().map(|r| r.1).min().unwrap(),
                "{modules} {d}"
            );
            // Everything outside the blocks is the same text in every ablation.
            assert_eq!(strip_blocks(p), strip_blocks(fp), "{modules} {tk} {d}");
        }
    }
    // Earlier reflections are retrieved (L memory has entries before the first day).
    assert!(
        full.iter()
            .any(|r| r.2.contains("Earlier price reflections:\n- ["))
    );
    // And more than one distinct action is taken.
    let actions: std::collections::BTreeSet<&str> =
        full.iter().map(|r| field(&r.2, "You hold ", ',')).collect();
    assert!(actions.len() > 1, "{actions:?}");
}

#[test]
fn later_prices_and_texts_do_not_reach_earlier_prompts() {
    let cut = T0 + 22;
    let base = run("MLHT", None, i32::MAX);
    let changed = run("MLHT", Some((cut, 3.0)), cut);
    assert_eq!(base.len(), changed.len());
    let mut compared = 0;
    for (a, b) in base.iter().zip(&changed) {
        if a.1 <= cut {
            assert_eq!(a, b, "{} {}", a.0, a.1);
            compared += 1;
        } else {
            assert_ne!(a.2, b.2, "a change after the cut shows after it");
        }
    }
    assert!(compared > 10);
    // Same inputs, same run.
    assert_eq!(base, run("MLHT", None, i32::MAX));
}

#[test]
fn chained_segments_equal_one_run() {
    let backend = Recorder::default();
    let up = upstream(&backend, i32::MAX);
    let files = PromptFiles::read();
    let prompts = files.prompts();
    let bars = bars(None);
    let go = |start: &str, end: &str, resume: Option<&AgentState>| {
        run_agent(
            &config_window("MLHT", start, end),
            &bars,
            &up,
            &backend,
            &prompts,
            resume,
            &|_, _| {},
        )
    };
    let whole = go("2023-05-20", "2023-06-08", None).unwrap();
    let first = go("2023-05-20", "2023-05-31", None).unwrap();
    // The state goes through its JSON file, as between two stage runs.
    let bytes = serde_json::to_vec_pretty(&first.state).unwrap();
    let state = AgentState::parse(&bytes, "state.json").unwrap();
    assert_eq!(state, first.state);
    let second = go("2023-06-01", "2023-06-08", Some(&state)).unwrap();
    let mut chained = first.prompts();
    chained.extend(second.prompts());
    chained.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    assert_eq!(chained, whole.prompts());
    for ((a, b), w) in first.paths.iter().zip(&second.paths).zip(&whole.paths) {
        assert_eq!(a.0, w.0);
        let dates: Vec<i32> = a.1.iter().chain(&b.1).copied().collect();
        assert_eq!(dates, w.1);
        let steps: Vec<_> = a.3.iter().chain(&b.3).cloned().collect();
        assert_eq!(steps, w.3, "{}: equity path", a.0);
    }
    assert_eq!(second.state, whole.state);

    // A gap, another configuration or another ticker set is refused, naming the input.
    let gap = go("2023-06-02", "2023-06-08", Some(&state))
        .err()
        .unwrap()
        .to_string();
    assert!(
        gap.contains("resume") && gap.contains("contiguous"),
        "{gap}"
    );
    let other = run_agent(
        &config_window("MLH", "2023-06-01", "2023-06-08"),
        &bars,
        &up,
        &backend,
        &prompts,
        Some(&state),
        &|_, _| {},
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        other.contains("resume") && other.contains("not the same run"),
        "{other}"
    );
    let bad = AgentState::parse(b"{\"format\": 1}", "s.json")
        .unwrap_err()
        .to_string();
    assert!(bad.contains("s.json"), "{bad}");
}

/// `chart_images` sends the trading chart as one PNG with each high-level reflection (and
/// nothing with the decisions); the embedded backend cannot take it.
#[test]
fn chart_images_go_with_high_level_reflections_only() {
    let window = json!({"modules": "MLHT", "start": "2023-05-20", "end": "2023-06-08",
                        "history": 4, "top_k": 2, "chart_images": true});
    let p = common::params(&FinAgentStage, window.clone());
    let Err(err) = AgentConfig::from_params(&p) else {
        panic!("chart_images on the embedded backend must be refused");
    };
    assert!(err.to_string().contains("chart_images"), "{err}");

    let mut http = window;
    http["backend"] = json!("openai");
    http["base_url"] = json!("http://127.0.0.1:9/v1");
    http["api_model"] = json!("a-vision-model");
    let cfg = AgentConfig::from_params(&common::params(&FinAgentStage, http)).unwrap();
    let backend = Recorder::default();
    let up = upstream(&backend, i32::MAX);
    backend.images.lock().unwrap().clear();
    let files = PromptFiles::read();
    let out = run_agent(
        &cfg,
        &bars(None),
        &up,
        &backend,
        &files.prompts(),
        None,
        &|_, _| {},
    )
    .unwrap();
    assert_eq!(out.failures(), 0);
    let seen = backend.images.lock().unwrap();
    let highs: Vec<&Vec<Vec<u8>>> = seen.iter().filter(|x| x.0).map(|x| &x.1).collect();
    assert!(!highs.is_empty());
    for imgs in &highs {
        assert_eq!(imgs.len(), 1);
        assert_eq!(&imgs[0][..8], b"\x89PNG\r\n\x1a\n");
    }
    assert!(seen.iter().filter(|x| !x.0).all(|x| x.1.is_empty()));
    // The charts differ as the decisions accumulate.
    assert_ne!(highs.first(), highs.last());
}
