//! `Engine::generate_ids_cancellable` on the real SmolLM2 GGUF (CPU, f32): a row given up
//! while decoding is dropped from the batch and yields no result, and the other rows' answers
//! are exactly those of the batch without it (what `flag serve` relies on when a client goes
//! away).

use std::cell::Cell;

use flag_llm::generate::{Engine, GenerateOptions};
use tch::Device;

#[test]
fn a_cancelled_row_is_dropped_and_the_others_are_unchanged() {
    flag_llm::generate::set_threads(1);
    let path = flag_llm::models::smollm2_gguf(None).expect("SmolLM2 GGUF must be installed");
    let e = Engine::load(path, Device::Cpu).unwrap();
    let prompts: Vec<Vec<u32>> = [
        "The capital of France is",
        "Count from 1 to 100: 1, 2, 3,",
        "Once upon a time, in a small village far away, there lived",
    ]
    .iter()
    .map(|p| e.tokenizer().encode(p, true).unwrap())
    .collect();
    let opts = GenerateOptions {
        max_tokens: 16,
        ..GenerateOptions::default()
    };
    let full = e.generate_ids_with_top(&prompts, &opts, 3).unwrap();
    assert!(
        full[1].0.ids.len() > 4,
        "the row to cancel must run past 4 tokens: {:?}",
        full[1].0
    );

    // Row 1 is given up after its 4th token; rows 0 and 2 are asked about at every step.
    let asked = [Cell::new(0), Cell::new(0), Cell::new(0)];
    let out = e
        .generate_ids_cancellable(&prompts, &opts, 3, &|i| {
            asked[i].set(asked[i].get() + 1);
            i == 1 && asked[1].get() >= 4
        })
        .unwrap();
    assert_eq!(out.len(), 3);
    assert!(out[1].is_none(), "the cancelled row has a result");
    assert_eq!(
        asked[1].get(),
        4,
        "row 1 was asked again after it was dropped"
    );
    for i in [0, 2] {
        let (g, top) = out[i].as_ref().unwrap();
        let (w, wtop) = &full[i];
        assert_eq!(g.text, w.text, "row {i}");
        assert_eq!(g.ids, w.ids, "row {i}");
        assert_eq!(g.finish_reason, w.finish_reason, "row {i}");
        assert_eq!(top.len(), wtop.len(), "row {i}");
        for (a, b) in g.logprobs.iter().zip(&w.logprobs) {
            assert!((a - b).abs() < 1e-4, "row {i}: logprob {a} vs {b}");
        }
        // Asked once per generated token (before the row's next step or its end).
        assert!(
            asked[i].get() >= 1 && asked[i].get() <= g.ids.len(),
            "row {i}"
        );
    }

    // Every row given up at once: no results, and the call returns.
    let out = e
        .generate_ids_cancellable(&prompts, &opts, 0, &|_| true)
        .unwrap();
    assert!(out.iter().all(Option::is_none));
}
