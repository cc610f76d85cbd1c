//! GGUF block weights (`FLAG_LLM_WEIGHTS=gguf`, `quant.rs`) against the dense f32 model and
//! transformers' fixtures: the weights the blocks expand to are the dense weights bit for bit
//! (so the Q/K permutation and the fused stacks are right), the next-token logits keep
//! transformers' top-10 ids within 1e-3 relative, greedy continuations are transformers'
//! alone and batched, and the weights take under a third of the dense bytes. The opt-in
//! `gguf-int8` (decode's activations rounded to 8 bits) keeps the next token, with logits
//! within the rounding's bound.

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use flag_llm::generate::{Engine, GenerateOptions};
use flag_llm::llama::{Weight, WeightFormat};
use flag_llm::models;
use serde::Deserialize;
use tch::{Device, Kind};

const REL_TOL: f64 = 1e-3;

#[derive(Deserialize)]
struct LogitsFixture {
    top_k: usize,
    cases: Vec<LogitsCase>,
}
#[derive(Deserialize)]
struct LogitsCase {
    name: String,
    ids: Vec<u32>,
    top_ids: Vec<usize>,
    top_logits: Vec<f64>,
}
#[derive(Deserialize)]
struct GreedyFixture {
    max_tokens: usize,
    cases: Vec<GreedyCase>,
}
#[derive(Deserialize)]
struct GreedyCase {
    name: String,
    ids: Vec<u32>,
    continuation: Continuation,
}
#[derive(Deserialize)]
struct Continuation {
    ids: Vec<u32>,
}

fn read<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_slice(&std::fs::read(&p).expect("fixture readable")).expect("fixture parses")
}

/// Asserts each of transformers' top logits of case `c` within `tol` (relative, at least 1
/// absolute) in `got`; returns the largest difference.
fn check_top_logits(c: &LogitsCase, got: &[f32], tol: f64) -> f64 {
    let mut worst = 0f64;
    for (&id, &want) in c.top_ids.iter().zip(&c.top_logits) {
        let rel = (f64::from(got[id]) - want).abs() / want.abs().max(1.0);
        worst = worst.max(rel);
        assert!(
            rel <= tol,
            "{}: logit of {id} {} vs {want}",
            c.name,
            got[id]
        );
    }
    worst
}

/// The greedy fixture and options that decode its continuations (temperature 0).
fn greedy_fixture() -> (GreedyFixture, GenerateOptions) {
    let fx: GreedyFixture = read("reference_greedy.json");
    let opts = GenerateOptions {
        max_tokens: fx.max_tokens,
        temperature: 0.0,
        ..Default::default()
    };
    (fx, opts)
}

/// The greedy continuation of one case, decoded alone (batch 1).
fn greedy_alone(engine: &Engine, c: &GreedyCase, opts: &GenerateOptions) -> Vec<u32> {
    engine
        .generate_ids(std::slice::from_ref(&c.ids), opts)
        .unwrap()
        .remove(0)
        .ids
}

/// Both engines, behind one lock (the tests share two cores).
fn engines() -> std::sync::MutexGuard<'static, (Engine, Engine)> {
    static E: OnceLock<Mutex<(Engine, Engine)>> = OnceLock::new();
    E.get_or_init(|| {
        tch::set_num_threads(2);
        let path = models::smollm2_gguf(None).expect("SmolLM2 GGUF installed (just setup)");
        let load = |f| Engine::load_as(&path, Device::Cpu, Kind::Float, f).expect("engine loads");
        Mutex::new((load(WeightFormat::Dense), load(WeightFormat::GgufBlocks)))
    })
    .lock()
    .unwrap_or_else(|e| e.into_inner())
}

#[test]
fn blocks_expand_to_the_dense_weights_bit_for_bit_in_a_third_of_the_bytes() {
    let g = engines();
    let (dense, blocks) = (g.0.model(), g.1.model());
    assert_eq!(blocks.weight_format(), WeightFormat::GgufBlocks);
    let pairs = dense.blocks.iter().zip(&blocks.blocks).flat_map(|(d, b)| {
        [
            (&d.wqkv, &b.wqkv),
            (&d.wo, &b.wo),
            (&d.w_gate_up, &b.w_gate_up),
            (&d.w_down, &b.w_down),
        ]
    });
    let mut n = 0;
    for (i, (d, b)) in pairs.chain([(&dense.embed, &blocks.embed)]).enumerate() {
        assert!(
            matches!(b, Weight::Blocks { .. }),
            "weight {i} kept as blocks"
        );
        assert!(
            d.to_dense().equal(&b.to_dense()),
            "weight {i}: blocks expand to other values than the dense loader's"
        );
        n += 1;
    }
    assert_eq!(n, 4 * dense.blocks.len() + 1);
    let (db, bb) = (dense.weight_bytes(), blocks.weight_bytes());
    eprintln!("weight bytes: dense {db}, gguf blocks {bb}");
    assert!(bb * 3 < db, "blocks {bb} bytes vs dense {db}");
}

#[test]
fn block_weights_keep_transformers_logits_and_greedy_text() {
    let g = engines();
    let (dense, blocks) = (&g.0, &g.1);
    let fx: LogitsFixture = read("reference_logits.json");
    let (mut worst_ref, mut worst_dense) = (0f64, 0f64);
    for c in &fx.cases {
        let got = blocks.next_token_logits_ids(&c.ids).unwrap();
        let mut order: Vec<usize> = (0..got.len()).collect();
        order.sort_by(|&a, &b| got[b].total_cmp(&got[a]).then(a.cmp(&b)));
        assert_eq!(order[..fx.top_k], c.top_ids[..], "{}: top ids", c.name);
        worst_ref = worst_ref.max(check_top_logits(c, &got, REL_TOL));
        let d = dense.next_token_logits_ids(&c.ids).unwrap();
        for (a, b) in d.iter().zip(&got) {
            worst_dense = worst_dense.max(f64::from((a - b).abs()) / f64::from(a.abs()).max(1.0));
        }
    }
    eprintln!(
        "gguf blocks: largest relative logit difference vs transformers {worst_ref:.3e}, \
         vs the dense f32 model (all 49,152 logits) {worst_dense:.3e}"
    );

    let (fx, opts) = greedy_fixture();
    for c in &fx.cases {
        assert_eq!(
            greedy_alone(blocks, c, &opts),
            c.continuation.ids,
            "{} alone",
            c.name
        );
    }
    let prompts: Vec<Vec<u32>> = fx.cases.iter().map(|c| c.ids.clone()).collect();
    for (c, g) in fx
        .cases
        .iter()
        .zip(blocks.generate_ids(&prompts, &opts).unwrap())
    {
        assert_eq!(g.ids, c.continuation.ids, "{} batched", c.name);
    }
}

#[test]
fn block_weights_on_cuda_or_in_bf16_are_refused() {
    let path = models::smollm2_gguf(None).expect("SmolLM2 GGUF installed (just setup)");
    let Err(err) = Engine::load_as(&path, Device::Cpu, Kind::BFloat16, WeightFormat::GgufBlocks)
    else {
        panic!("bf16 with blocks is refused");
    };
    assert!(err.to_string().contains("CPU in f32"), "{err}");
    assert!(WeightFormat::parse("int3").is_err());
    assert_eq!(
        WeightFormat::parse("gguf").unwrap(),
        WeightFormat::GgufBlocks
    );
    assert_eq!(
        WeightFormat::parse("gguf-int8").unwrap(),
        WeightFormat::GgufInt8
    );
    let Err(err) = Engine::load_as(&path, Device::Cpu, Kind::BFloat16, WeightFormat::GgufInt8)
    else {
        panic!("bf16 with int8 activations is refused");
    };
    assert!(err.to_string().contains("CPU in f32"), "{err}");
}

/// `gguf-int8` rounds activations to 8 bits per block of 32, so its logits move by that
/// rounding: on these cases at most 4.9e-2 relative to transformers' (top 10; "hello", whose
/// logits are near 4), where llama.cpp on the same GGUF, which rounds the same way, is 5.8e-2
/// off. The figure is chaotic: a last-bit change upstream flips some roundings, and an
/// earlier build of the kernel (two roundings per step instead of one) gave 1.2e-1. The next
/// token must not move, and the logits must stay within 0.25 (twice the largest seen).
#[test]
fn int8_activations_keep_transformers_next_tokens() {
    const INT8_REL_TOL: f64 = 0.25;
    let path = models::smollm2_gguf(None).expect("SmolLM2 GGUF installed (just setup)");
    let _lock = engines();
    let int8 = Engine::load_as(&path, Device::Cpu, Kind::Float, WeightFormat::GgufInt8)
        .expect("engine loads");
    assert_eq!(int8.model().weight_format(), WeightFormat::GgufInt8);
    let fx: LogitsFixture = read("reference_logits.json");
    let mut worst = 0f64;
    for c in &fx.cases {
        let got = int8.next_token_logits_ids(&c.ids).unwrap();
        let top = (0..got.len())
            .max_by(|&a, &b| got[a].total_cmp(&got[b]).then(b.cmp(&a)))
            .unwrap();
        assert_eq!(top, c.top_ids[0], "{}: next token", c.name);
        let case_worst = check_top_logits(c, &got, INT8_REL_TOL);
        worst = worst.max(case_worst);
        eprintln!(
            "gguf-int8 {}: largest relative logit difference {case_worst:.2e}",
            c.name
        );
    }
    eprintln!("gguf-int8: largest relative logit difference vs transformers (top 10) {worst:.3e}");
    let (fx, opts) = greedy_fixture();
    for c in &fx.cases {
        let alone = greedy_alone(&int8, c, &opts);
        assert_eq!(alone[0], c.continuation.ids[0], "{}: first token", c.name);
        let same = alone
            .iter()
            .zip(&c.continuation.ids)
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!(
            "gguf-int8 {}: greedy text follows transformers' for {same} of {} tokens",
            c.name,
            c.continuation.ids.len()
        );
    }
}
