//! Grammar-constrained decoding with the real SmolLM2 vocabulary: the token trie round-trips
//! every vocabulary entry; over random logit vectors and every shipped schema, greedy and
//! sampled choices never pick a disallowed token and finished walks are valid answers; with
//! the real model, batched constrained generation equals one-at-a-time generation.
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use flag_llm::constrain::{Constraint, ConstraintCompiler, MatchState, SequenceMatcher};
use flag_llm::generate::{
    Engine, FinishReason, GenerateOptions, MAX_ALTERNATIVES, choose_tokens, restrict,
};
use flag_llm::gguf::GgufFile;
use flag_llm::tokenizer::{LlmTokenizer, char_of_byte};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Tensor};

fn tokenizer() -> &'static LlmTokenizer {
    static TOK: OnceLock<LlmTokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = flag_llm::models::smollm2_gguf(None).expect("SmolLM2 GGUF must be installed");
        LlmTokenizer::from_gguf(&GgufFile::open(path).unwrap()).unwrap()
    })
}

fn compiler() -> &'static ConstraintCompiler {
    static C: OnceLock<ConstraintCompiler> = OnceLock::new();
    C.get_or_init(|| {
        let tok = tokenizer();
        let eos = tok.eos_id().expect("SmolLM2 has an EOS token");
        ConstraintCompiler::new(tok, tok.vocab_size(), eos).unwrap()
    })
}

fn engine() -> MutexGuard<'static, Engine> {
    static ENGINE: OnceLock<Mutex<Engine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            flag_llm::generate::set_threads(1);
            let path = flag_llm::models::smollm2_gguf(None).unwrap();
            Mutex::new(Engine::load(path, Device::Cpu).unwrap())
        })
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every `*.schema.json` under `prompts/`, with its path.
fn shipped_schemas() -> Vec<(PathBuf, Constraint)> {
    let mut out = Vec::new();
    for dir in std::fs::read_dir(repo().join("prompts")).unwrap() {
        let dir = dir.unwrap().path();
        for f in std::fs::read_dir(&dir).unwrap() {
            let f = f.unwrap().path();
            if f.to_string_lossy().ends_with(".schema.json") {
                out.push((f.clone(), Constraint::from_file(&f).unwrap()));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(
        out.len() >= 6,
        "strategist P0-P4 and analyst schemas: {out:?}"
    );
    out
}

#[test]
fn trie_round_trips_every_vocabulary_token() {
    let tok = tokenizer();
    let c = compiler();
    let (mut specials, mut checked_decode) = (0, 0);
    for id in 0..tok.vocab_size() as u32 {
        let entry = tok.token(id).unwrap();
        let bytes = tok
            .token_bytes(id)
            .unwrap_or_else(|| panic!("token {id} {entry:?}"));
        let in_trie = c.token_bytes(id);
        if tok.special_ids().contains(&id) {
            specials += 1;
            assert_eq!(in_trie[0], 0xFF, "control token {id} {entry:?} is marked");
            assert_eq!(&in_trie[1..], entry.as_bytes());
            continue;
        }
        assert_eq!(in_trie, bytes, "token {id} {entry:?}");
        if tok.is_added(id) {
            assert_eq!(bytes, entry.as_bytes());
            continue;
        }
        // Bytes back to the byte-level alphabet give the vocabulary entry exactly.
        let back: String = bytes.iter().map(|&b| char_of_byte(b)).collect();
        assert_eq!(back, entry, "token {id}");
        // And agree with the tokenizers crate's decoder wherever the bytes are whole UTF-8.
        if let Ok(text) = std::str::from_utf8(&bytes) {
            assert_eq!(tok.decode(&[id], false).unwrap(), text, "token {id}");
            checked_decode += 1;
        }
    }
    assert!(specials > 0, "SmolLM2 has control tokens");
    assert!(checked_decode > 40_000, "{checked_decode} tokens decoded");
}

/// Walks one constrained answer choosing from random logits; returns (steps, final text if
/// the grammar completed). Asserts at every step that the chosen token was allowed.
fn random_walk(
    c: &Constraint,
    rng: &mut ChaCha8Rng,
    temperature: f64,
    max_steps: usize,
) -> (usize, Option<String>) {
    let tok = tokenizer();
    let compiled = compiler().compile(c).unwrap();
    let mut m = compiled.matcher();
    let vocab = tok.vocab_size();
    let eos = compiler().eos();
    let mut ids = Vec::new();
    for step in 0..max_steps {
        let mask = m.mask().unwrap();
        if SequenceMatcher::only_end_allowed(&mask, eos) {
            return (step, Some(tok.decode(&ids, true).unwrap()));
        }
        let mut allowed = vec![false; vocab];
        flag_llm::constrain::mask_to_bools(&mask, &mut allowed);
        // Logits that favour disallowed tokens: the mask, not luck, must keep them out.
        let logits: Vec<f32> = (0..vocab)
            .map(|i| {
                let x = rng.random::<f32>() * 8.0;
                if allowed[i] { x } else { x + 20.0 }
            })
            .collect();
        let logits = Tensor::from_slice(&logits).view([1, vocab as i64]);
        let allowed_t = Tensor::from_slice(&allowed).view([1, vocab as i64]);
        let restricted = restrict(&logits, &allowed_t);
        let mut row_rng = ChaCha8Rng::seed_from_u64(rng.random());
        let next = choose_tokens(&restricted, temperature, 1.0, &mut [&mut row_rng]).unwrap()[0];
        assert!(
            allowed[next as usize],
            "step {step}: token {next} chosen but not allowed"
        );
        if next as u32 == eos {
            return (step + 1, Some(tok.decode(&ids, true).unwrap()));
        }
        ids.push(next as u32);
        if m.advance(next as u32).unwrap() == MatchState::Complete {
            return (step + 1, Some(tok.decode(&ids, true).unwrap()));
        }
    }
    (max_steps, None)
}

#[test]
fn masked_choices_never_pick_a_disallowed_token() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut vectors = 0;
    let mut completed = 0;
    for (path, schema) in shipped_schemas() {
        let Constraint::JsonSchema(s) = &schema else {
            unreachable!()
        };
        let required: Vec<String> = s["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap().to_string())
            .collect();
        for temperature in [0.0, 1.0] {
            for _ in 0..2 {
                let (steps, text) = random_walk(&schema, &mut rng, temperature, 120);
                vectors += steps;
                if let Some(text) = text {
                    completed += 1;
                    let v: serde_json::Value = serde_json::from_str(&text)
                        .unwrap_or_else(|e| panic!("{}: {text:?}: {e}", path.display()));
                    for k in &required {
                        assert!(
                            v.get(k).is_some(),
                            "{}: {k} missing in {text}",
                            path.display()
                        );
                    }
                }
            }
        }
    }
    // A regex and a Lark grammar through the same path.
    for c in [
        Constraint::Regex("(LONG|SHORT) [1-3]".into()),
        Constraint::Lark(
            "start: (\"BUY\" | \"SELL\" | \"HOLD\") \" because \" /[a-z ]{3,20}/".into(),
        ),
    ] {
        for temperature in [0.0, 1.0] {
            let (steps, text) = random_walk(&c, &mut rng, temperature, 60);
            vectors += steps;
            let text = text.expect("short grammars complete");
            completed += 1;
            assert!(
                [
                    "LONG ",
                    "SHORT ",
                    "BUY because ",
                    "SELL because ",
                    "HOLD because "
                ]
                .iter()
                .any(|p| text.starts_with(p)),
                "{text:?}"
            );
        }
    }
    assert!(vectors >= 1000, "{vectors} logit vectors checked");
    assert!(completed >= 10, "{completed} walks completed");
}

#[test]
fn invalid_constraints_are_errors_not_panics() {
    let c = compiler();
    let bad = Constraint::JsonSchema(serde_json::json!({"type": "no-such-type"}));
    assert!(c.compile(&bad).is_err());
    assert!(c.compile(&Constraint::Regex("(unclosed".into())).is_err());
    assert!(
        c.compile(&Constraint::Lark("start: undefined_rule".into()))
            .is_err()
    );
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.json");
    std::fs::write(&f, "{\n  \"type\": \n").unwrap();
    let e = Constraint::from_file(&f).unwrap_err().to_string();
    assert!(e.contains("bad.json:3:"), "{e}");
    let e = Constraint::from_file(&dir.path().join("x.txt"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("x.txt"), "{e}");
}

fn strategist_schema() -> Constraint {
    Constraint::from_file(&repo().join("prompts/strategist/P3.schema.json")).unwrap()
}

#[test]
fn batched_constrained_generation_equals_one_at_a_time() {
    let e = engine();
    let prompts: Vec<String> = [
        "The stock rose 5% this week on strong earnings. Give your position.",
        "Shares fell for ten days in a row.",
        "Decide.",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let opts = GenerateOptions {
        max_tokens: 96,
        chat: true,
        constraint: Some(strategist_schema()),
        ..GenerateOptions::default()
    };
    let batched = e.generate(&prompts, &opts).unwrap();
    for (p, b) in prompts.iter().zip(&batched) {
        let single = e.generate(std::slice::from_ref(p), &opts).unwrap();
        assert_eq!(single[0].ids, b.ids, "prompt {p:?}");
        assert_eq!(single[0].text, b.text);
        // Every answer is one JSON object of the schema's form, or ran out of tokens.
        if b.finish_reason != FinishReason::Length {
            let v: serde_json::Value = serde_json::from_str(&b.text).unwrap();
            assert!(matches!(v["direction"].as_str(), Some("LONG" | "SHORT")));
            assert!(matches!(v["confidence"].as_i64(), Some(1..=3)));
        }
        let c = b.constrained.as_ref().expect("constrained scores");
        assert_eq!(c.logprobs.len(), b.ids.len());
        assert_eq!(c.allowed.len(), b.ids.len());
        // Restricting can only raise a chosen token's probability.
        for (raw, con) in b.logprobs.iter().zip(&c.logprobs) {
            assert!(con + 1e-4 >= *raw, "{con} < {raw}");
        }
        // The direction step offers only tokens that begin LONG or SHORT (after any quote or
        // separator bytes), both words among them; its alternatives are renormalised.
        let word = |id: u32| {
            let t = e.tokenizer().decode(&[id], false).unwrap();
            t.trim_start_matches([':', ' ', '"']).to_string()
        };
        let step = c
            .alternatives
            .iter()
            .position(|alts| {
                let words: Vec<String> = alts.iter().map(|(id, _)| word(*id)).collect();
                words.iter().any(|w| w.starts_with('L'))
                    && words.iter().any(|w| w.starts_with('S'))
                    && words.iter().all(|w| {
                        !w.is_empty()
                            && ("LONG".starts_with(w.as_str()) || "SHORT".starts_with(w.as_str()))
                    })
            })
            .expect("a LONG/SHORT decision step");
        let mass: f64 = c.alternatives[step]
            .iter()
            .map(|(_, lp)| f64::from(*lp).exp())
            .sum();
        assert!((mass - 1.0).abs() < 1e-3, "{mass}");
        assert!(c.alternatives[step].len() <= MAX_ALTERNATIVES);
    }
}

#[test]
fn a_grammar_the_model_cannot_finish_in_budget_ends_by_length() {
    let e = engine();
    let opts = GenerateOptions {
        max_tokens: 4,
        chat: true,
        constraint: Some(strategist_schema()),
        ..GenerateOptions::default()
    };
    let g = e.generate(&["Decide.".to_string()], &opts).unwrap();
    assert_eq!(g[0].finish_reason, FinishReason::Length);
    assert_eq!(g[0].ids.len(), 4);
    assert!(
        g[0].text.starts_with("{\"direction\": \""),
        "{:?}",
        g[0].text
    );
    // The scores stay finite under the mask.
    let c = g[0].constrained.as_ref().unwrap();
    assert!(c.logprobs.iter().chain(&c.entropies).all(|x| x.is_finite()));
}
