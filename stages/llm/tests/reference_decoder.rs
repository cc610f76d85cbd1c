//! Decoder vs transformers on the same GGUF (tests/fixtures/reference_{logits,greedy}.json,
//! made by scripts/make_reference.py in f32 on CPU): next-token top-10 ids identical and logits
//! within 1e-3 relative; greedy 24-token continuations identical, alone and batched.
//! The fixtures' token ids are fed directly, so a tokenizer bug cannot hide a decoder bug (the
//! tokenizer is checked separately, here too, on the same texts).

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use flag_llm::generate::{Engine, GenerateOptions};
use flag_llm::models;
use flag_llm::tokenizer::ChatMessage;
use serde::Deserialize;
use tch::Device;

const REL_TOL: f64 = 1e-3;

#[derive(Deserialize)]
struct LogitsFixture {
    top_k: usize,
    cases: Vec<LogitsCase>,
}
#[derive(Deserialize)]
struct LogitsCase {
    name: String,
    text: String,
    ids: Vec<u32>,
    top_ids: Vec<usize>,
    top_logits: Vec<f64>,
    logsumexp: f64,
}

#[derive(Deserialize)]
struct GreedyFixture {
    max_tokens: usize,
    chat_messages: Vec<Msg>,
    cases: Vec<GreedyCase>,
}
#[derive(Deserialize)]
struct Msg {
    role: String,
    content: String,
}
#[derive(Deserialize)]
struct GreedyCase {
    name: String,
    text: String,
    ids: Vec<u32>,
    continuation: Continuation,
}
#[derive(Deserialize)]
struct Continuation {
    ids: Vec<u32>,
    text: String,
}

fn read<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_slice(&std::fs::read(&p).expect("fixture readable")).expect("fixture parses")
}

/// One engine for the file; a lock keeps the two tests from running libtorch concurrently on
/// a 2-core machine (each already uses both threads).
fn engine() -> std::sync::MutexGuard<'static, Engine> {
    static ENGINE: OnceLock<Mutex<Engine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            tch::set_num_threads(2);
            let path = models::smollm2_gguf(None).expect("SmolLM2 GGUF installed (just setup)");
            Mutex::new(Engine::load(&path, Device::Cpu).expect("engine loads"))
        })
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

fn log_sum_exp(v: &[f32]) -> f64 {
    let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    m + v
        .iter()
        .map(|&x| (f64::from(x) - m).exp())
        .sum::<f64>()
        .ln()
}

/// Relative closeness; the floor of 1 keeps logits near zero from demanding absolute 1e-7.
fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= REL_TOL * want.abs().max(1.0)
}

#[test]
fn next_token_logits_match_transformers() {
    let fx: LogitsFixture = read("reference_logits.json");
    let engine = engine();
    let mut failures = Vec::new();
    let mut worst = 0f64;
    for c in &fx.cases {
        assert_eq!(
            engine.tokenizer().encode(&c.text, true).unwrap(),
            c.ids,
            "{} tokens",
            c.name
        );
        let logits = engine.next_token_logits_ids(&c.ids).unwrap();
        assert_eq!(
            logits.len(),
            49152,
            "{}: one logit per vocabulary entry",
            c.name
        );
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        let top: Vec<usize> = order[..fx.top_k].to_vec();
        if top != c.top_ids {
            failures.push(format!(
                "{}: top-{} ids {top:?}, expected {:?}",
                c.name, fx.top_k, c.top_ids
            ));
        }
        for (&id, &want) in c.top_ids.iter().zip(&c.top_logits) {
            let got = f64::from(logits[id]);
            worst = worst.max((got - want).abs() / want.abs().max(1.0));
            if !close(got, want) {
                failures.push(format!(
                    "{}: logit of {id} is {got}, expected {want}",
                    c.name
                ));
            }
        }
        let lse = log_sum_exp(&logits);
        if !close(lse, c.logsumexp) {
            failures.push(format!(
                "{}: logsumexp {lse}, expected {}",
                c.name, c.logsumexp
            ));
        }
    }
    eprintln!("largest relative logit error vs transformers: {worst:.3e}");
    assert!(
        failures.is_empty(),
        "decoder differs from transformers:\n{}",
        failures.join("\n")
    );

    // The text path (tokenize, no BOS, forward) gives the very same logits as the id path.
    let c = &fx.cases[0];
    let by_text = engine.next_token_logits(&c.text).unwrap();
    assert_eq!(by_text, engine.next_token_logits_ids(&c.ids).unwrap());
}

#[test]
fn greedy_continuations_match_transformers() {
    let fx: GreedyFixture = read("reference_greedy.json");
    let engine = engine();
    let opts = GenerateOptions {
        max_tokens: fx.max_tokens,
        temperature: 0.0,
        ..Default::default()
    };
    assert!(
        fx.cases
            .iter()
            .all(|c| c.continuation.ids.len() == fx.max_tokens)
    );

    let mut failures = Vec::new();
    for c in &fx.cases {
        assert_eq!(
            engine.tokenizer().encode(&c.text, true).unwrap(),
            c.ids,
            "{} tokens",
            c.name
        );
        let g = engine
            .generate_ids(std::slice::from_ref(&c.ids), &opts)
            .unwrap()
            .remove(0);
        if g.ids != c.continuation.ids {
            failures.push(format!(
                "{} alone:\n  got      {:?} {:?}\n  expected {:?} {:?}",
                c.name, g.ids, g.text, c.continuation.ids, c.continuation.text
            ));
        } else {
            assert_eq!(g.text, c.continuation.text, "{}", c.name);
        }
    }
    // All prompts in one left-padded batch (lengths differ) must give the same tokens.
    let prompts: Vec<Vec<u32>> = fx.cases.iter().map(|c| c.ids.clone()).collect();
    assert!(
        prompts.iter().any(|p| p.len() != prompts[0].len()),
        "fixture needs unequal lengths"
    );
    for (c, g) in fx
        .cases
        .iter()
        .zip(engine.generate_ids(&prompts, &opts).unwrap())
    {
        if g.ids != c.continuation.ids {
            failures.push(format!(
                "{} batched: got {:?}, expected {:?}",
                c.name, g.ids, c.continuation.ids
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "greedy decoding differs from transformers:\n{}",
        failures.join("\n")
    );

    // The chat case through the public text API: the template renders exactly what
    // transformers' apply_chat_template rendered, and generation gives the same tokens.
    let chat = fx
        .cases
        .iter()
        .find(|c| c.name == "chat")
        .expect("fixture has a chat case");
    let msgs: Vec<ChatMessage> = fx
        .chat_messages
        .iter()
        .map(|m| ChatMessage::new(m.role.clone(), m.content.clone()))
        .collect();
    assert_eq!(
        engine.tokenizer().apply_chat_template(&msgs, true).unwrap(),
        chat.text
    );
    let user = &fx.chat_messages[0].content;
    let g = engine
        .generate(
            std::slice::from_ref(user),
            &GenerateOptions {
                chat: true,
                ..opts.clone()
            },
        )
        .unwrap()
        .remove(0);
    assert_eq!(g.ids, chat.continuation.ids);
}
