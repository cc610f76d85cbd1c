//! Tokenizer vs the reference (tests/fixtures/reference_tokens.json, made by
//! scripts/make_reference.py from the same GGUF): identical ids for unicode, emoji, whitespace
//! runs, numbers, ChatML with special tokens and a market prompt; decode round-trips.

use std::path::PathBuf;

use flag_llm::gguf::GgufFile;
use flag_llm::models;
use flag_llm::tokenizer::LlmTokenizer;
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    meta: Meta,
    cases: Vec<Case>,
}
#[derive(Deserialize)]
struct Meta {
    add_bos: bool,
    bos_check_ids_for_hello: Vec<u32>,
}
#[derive(Deserialize)]
struct Case {
    name: String,
    text: String,
    ids: Vec<u32>,
    ids_transformers_gguf: Vec<u32>,
    decoded: String,
}

fn fixture() -> Fixture {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference_tokens.json");
    serde_json::from_slice(&std::fs::read(&p).expect("fixture readable")).expect("fixture parses")
}

fn tokenizer() -> LlmTokenizer {
    let path = models::smollm2_gguf(None).expect("SmolLM2 GGUF installed (just setup)");
    let gguf = GgufFile::open(&path).expect("GGUF opens");
    LlmTokenizer::from_gguf(&gguf).expect("tokenizer builds")
}

#[test]
fn token_ids_match_reference() {
    let fx = fixture();
    let tok = tokenizer();
    let mut failures = Vec::new();
    for c in &fx.cases {
        let got = tok.encode(&c.text, true).unwrap();
        if got != c.ids {
            failures.push(format!(
                "{}: {:?}\n  got      {got:?}\n  expected {:?}",
                c.name, c.text, c.ids
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "token ids differ:\n{}",
        failures.join("\n")
    );
    // The fixture must contain a case where the digit-first pre-tokenizer matters, or this
    // test could not tell SmolLM2's pre-tokenizer from plain GPT-2 byte-level.
    assert!(fx.cases.iter().any(|c| c.ids != c.ids_transformers_gguf));
}

#[test]
fn decode_round_trips_reference_ids() {
    let fx = fixture();
    let tok = tokenizer();
    for c in &fx.cases {
        assert_eq!(tok.decode(&c.ids, false).unwrap(), c.decoded, "{}", c.name);
        assert_eq!(
            c.decoded, c.text,
            "{}: the reference itself round-trips",
            c.name
        );
    }
}

#[test]
fn bos_policy_matches_reference() {
    let fx = fixture();
    let tok = tokenizer();
    assert_eq!(tok.add_bos(), fx.meta.add_bos);
    assert_eq!(
        tok.encode_prompt("Hello world").unwrap(),
        fx.meta.bos_check_ids_for_hello
    );
}

#[test]
fn special_tokens_only_parsed_when_asked() {
    let tok = tokenizer();
    let parsed = tok.encode("<|im_start|>user", true).unwrap();
    assert_eq!(parsed[0], 1, "<|im_start|> is id 1");
    let plain = tok.encode("<|im_start|>user", false).unwrap();
    assert!(
        !plain.contains(&1) && plain.len() > parsed.len(),
        "{plain:?}"
    );
}
