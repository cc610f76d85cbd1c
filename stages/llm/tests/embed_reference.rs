//! MiniLM embedder vs sentence-transformers (tests/fixtures/reference_embed.json, made by
//! scripts/make_reference.py): same word pieces, cosine >= 0.9999, batched == unbatched.

use std::path::PathBuf;

use flag_llm::embed::MiniLmEmbedder;
use flag_llm::models;
use serde::Deserialize;
use tch::Device;

#[derive(Deserialize)]
struct Fixture {
    meta: Meta,
    cases: Vec<Case>,
}
#[derive(Deserialize)]
struct Meta {
    dim: usize,
    max_seq_length: usize,
}
#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    embedding: Vec<f32>,
}

fn fixture() -> Fixture {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference_embed.json");
    serde_json::from_slice(&std::fs::read(&p).expect("fixture readable")).expect("fixture parses")
}

fn embedder() -> MiniLmEmbedder {
    tch::set_num_threads(2);
    let dir = models::minilm_dir(None).expect("MiniLM installed (just setup)");
    MiniLmEmbedder::load(&dir, Device::Cpu).expect("MiniLM loads")
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn minilm_matches_sentence_transformers() {
    let fx = fixture();
    let emb = embedder();
    assert_eq!(emb.dim(), fx.meta.dim);
    assert_eq!(emb.max_len(), fx.meta.max_seq_length);

    // Word pieces first: a tokenizer mismatch would otherwise show up as a vague cosine miss.
    for c in &fx.cases {
        assert_eq!(
            emb.token_ids(&c.text).unwrap(),
            c.ids,
            "word pieces of {:?}",
            c.text
        );
    }
    // The fixture must exercise truncation, or the 256 limit goes untested.
    assert!(
        fx.cases
            .iter()
            .any(|c| c.ids.len() == fx.meta.max_seq_length)
    );

    let texts: Vec<String> = fx.cases.iter().map(|c| c.text.clone()).collect();
    let batched = emb.embed(&texts).unwrap();
    assert_eq!(batched.len(), texts.len());
    let mut min_cos = f64::INFINITY;
    for (c, got) in fx.cases.iter().zip(&batched) {
        assert_eq!(got.len(), fx.meta.dim);
        let norm: f64 = got
            .iter()
            .map(|x| f64::from(*x).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "norm {norm} for {:?}", c.text);
        let cos = cosine(got, &c.embedding);
        assert!(cos >= 0.9999, "cosine {cos} < 0.9999 for {:?}", c.text);
        min_cos = min_cos.min(cos);
    }
    eprintln!("min cosine vs sentence-transformers: {min_cos:.9}");

    // Padding must not leak: each text alone gives the same vector as inside the batch.
    for (t, b) in texts.iter().zip(&batched) {
        let alone = emb.embed(std::slice::from_ref(t)).unwrap().remove(0);
        let max_diff = alone
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            max_diff < 1e-5,
            "batched vs alone differ by {max_diff} for {t:?}"
        );
    }

    // Different texts must give clearly different vectors (guards against a constant output).
    assert!(cosine(&batched[0], &batched[3]) < 0.9);
    assert!(emb.embed(&[]).unwrap().is_empty());
}

#[test]
fn missing_weights_are_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("flag-embed-missing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let err = MiniLmEmbedder::load(&dir, Device::Cpu)
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
