//! Decoder and generation on the real SmolLM2 GGUF (CPU, f32): batched generation with left
//! padding equals one-by-one greedy generation, the KV-cache path equals full recomputation,
//! scores are consistent with each other, sampling is seeded, and stop strings / EOS end rows.
//! One engine per test binary (loading dequantises ~135M weights); token budgets are small.

use std::sync::{Mutex, MutexGuard, OnceLock};

use flag_llm::generate::{Engine, FinishReason, GenerateOptions, top_k_entropy};
use tch::Device;

fn engine() -> MutexGuard<'static, Engine> {
    static ENGINE: OnceLock<Mutex<Engine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            // One intra-op thread: CI's 2 cores also run other test binaries and builds, and
            // OpenMP threads that wait on each other under contention are several times slower.
            flag_llm::generate::set_threads(1);
            let path =
                flag_llm::models::smollm2_gguf(None).expect("SmolLM2 GGUF must be installed");
            let t0 = std::time::Instant::now();
            let e = Engine::load(path, Device::Cpu).unwrap();
            eprintln!("engine load: {:?}", t0.elapsed());
            Mutex::new(e)
        })
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens: n,
        ..GenerateOptions::default()
    }
}

#[test]
fn batched_generation_equals_unbatched_for_different_lengths() {
    let e = engine();
    let prompts: Vec<String> = [
        "The capital of France is",
        "Q: What is 12 + 30?\nA:",
        "Once upon a time, in a small village far away, there lived an old fisherman who",
        "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let opts = greedy(12);
    let batched = e.generate(&prompts, &opts).unwrap();
    assert_eq!(batched.len(), prompts.len());
    let lens: Vec<usize> = prompts
        .iter()
        .map(|p| e.tokenizer().encode(p, true).unwrap().len())
        .collect();
    assert!(
        lens.iter().max() > lens.iter().min(),
        "prompts must differ in length: {lens:?}"
    );
    for (p, b) in prompts.iter().zip(&batched) {
        let single = e
            .generate(std::slice::from_ref(p), &opts)
            .unwrap()
            .remove(0);
        assert_eq!(
            b.ids, single.ids,
            "prompt {p:?}: batched {:?} vs single {:?}",
            b.text, single.text
        );
        assert_eq!(b.text, single.text);
        assert_eq!(b.finish_reason, single.finish_reason);
        for (x, y) in b.logprobs.iter().zip(&single.logprobs) {
            assert!((x - y).abs() < 1e-3, "logprob {x} vs {y} for {p:?}");
        }
    }
    assert!(batched[0].text.contains("Paris"), "{:?}", batched[0].text);
}

#[test]
fn cached_decode_matches_full_recompute_and_scores_agree() {
    let e = engine();
    let prompt = "The stock market today";
    let g = e
        .generate(&[prompt.to_string()], &greedy(6))
        .unwrap()
        .remove(0);
    assert_eq!(g.ids.len(), 6);
    // Each generated token is the argmax of a full (cache-free) forward over the prefix, and
    // its logprob matches that forward's log-softmax.
    let mut prefix = e.tokenizer().encode_prompt(prompt).unwrap();
    for (&id, &lp) in g.ids.iter().zip(&g.logprobs) {
        let logits = e.next_token_logits_ids(&prefix).unwrap();
        assert_eq!(logits.len(), 49152);
        let (arg, max) = logits
            .iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |a, (i, &l)| if l > a.1 { (i, l) } else { a },
            );
        assert_eq!(arg as u32, id);
        let lse = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
        assert!(
            (logits[arg] - lse - lp).abs() < 1e-3,
            "{} vs {lp}",
            logits[arg] - lse
        );
        prefix.push(id);
    }
    // Scores: logprobs <= 0, entropies in [0, 1], perplexity = exp(-mean logprob).
    assert!(g.logprobs.iter().all(|&l| l <= 0.0));
    assert!(g.entropies.iter().all(|&h| (0.0..=1.0).contains(&h)));
    let mean = g.logprobs.iter().map(|&l| f64::from(l)).sum::<f64>() / 6.0;
    assert!((g.perplexity - (-mean).exp()).abs() < 1e-9);
    let mean_h = g.entropies.iter().map(|&h| f64::from(h)).sum::<f64>() / 6.0;
    assert!((g.entropy - mean_h).abs() < 1e-9);
    // score_continuations of the generated text equals the sum of its logprobs when the
    // text re-tokenises to the same ids.
    let cont = e.tokenizer().decode(&g.ids, false).unwrap();
    if e.tokenizer().encode(&cont, true).unwrap() == g.ids {
        let s = e.score_continuations(prompt, &[cont]).unwrap()[0];
        let sum: f64 = g.logprobs.iter().map(|&l| f64::from(l)).sum();
        assert!((s - sum).abs() < 1e-2, "score {s} vs sum of logprobs {sum}");
    }
}

#[test]
fn candidate_scores_rank_the_obvious_answer_first() {
    let e = engine();
    let prompt = "Question: What is the capital of France?\nAnswer:";
    let cands: Vec<String> = [" Paris", " Banana", " The number seven"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let s = e.score_continuations(prompt, &cands).unwrap();
    assert_eq!(s.len(), 3);
    assert!(s.iter().all(|&x| x < 0.0 && x.is_finite()), "{s:?}");
    assert!(s[0] > s[1] && s[0] > s[2], "{s:?}");
    // Batched scoring (different candidate lengths, left padded) equals scoring one by one.
    for (c, &batched) in cands.iter().zip(&s) {
        let one = e
            .score_continuations(prompt, std::slice::from_ref(c))
            .unwrap()[0];
        assert!((one - batched).abs() < 1e-3, "{c:?}: {one} vs {batched}");
    }
    assert!(e.score_continuations(prompt, &[String::new()]).is_err());
}

#[test]
fn sampling_is_seeded_and_stops_end_rows() {
    let e = engine();
    let prompt = vec!["Write a word:".to_string()];
    let opts = GenerateOptions {
        max_tokens: 8,
        temperature: 1.0,
        top_p: 0.95,
        seed: 7,
        ..GenerateOptions::default()
    };
    let a = e.generate(&prompt, &opts).unwrap();
    let b = e.generate(&prompt, &opts).unwrap();
    assert_eq!(a, b, "same seed, same output");
    let differs = (8..14).any(|seed| {
        let o = GenerateOptions {
            seed,
            ..opts.clone()
        };
        e.generate(&prompt, &o).unwrap()[0].ids != a[0].ids
    });
    assert!(differs, "other seeds should give other samples");

    // A stop string ends generation and is cut from the text.
    let g = &e
        .generate(
            &["Count: 1, 2, 3,".to_string()],
            &GenerateOptions {
                stop: vec!["6".into()],
                ..greedy(20)
            },
        )
        .unwrap()[0];
    assert_eq!(g.finish_reason, FinishReason::Stop, "{:?}", g.text);
    assert!(
        !g.text.contains('6') && g.text.contains('5'),
        "{:?}",
        g.text
    );

    // Chat mode: the assistant turn ends with <|im_end|> (EOS) well within the budget.
    let g = &e
        .generate(
            &["Say only the word yes.".to_string()],
            &GenerateOptions {
                chat: true,
                ..greedy(40)
            },
        )
        .unwrap()[0];
    assert_eq!(g.finish_reason, FinishReason::Eos, "{:?}", g.text);
    assert_eq!(g.ids.last(), Some(&2));
    assert!(!g.text.contains("<|im_end|>"));

    // Bad options are errors.
    assert!(e.generate(&prompt, &greedy(0)).is_err());
    assert!(
        e.generate(
            &prompt,
            &GenerateOptions {
                top_p: 0.0,
                ..greedy(2)
            }
        )
        .is_err()
    );
    assert!(e.generate(&["".to_string()], &greedy(2)).is_err());
}

#[test]
fn top_k_entropy_formula() {
    // All mass on one token: no uncertainty.
    assert_eq!(top_k_entropy(&[1.0, 0.0, 0.0]), 0.0);
    // k + 1 equally likely outcomes (k observed + remainder): maximal, 1.
    let k = 4;
    let p = vec![0.2; k];
    assert!((top_k_entropy(&p) - 1.0).abs() < 1e-12);
    // Uniform over the k observed tokens, nothing left over: ln k / ln(k + 1).
    let p = vec![0.25; 4];
    assert!((top_k_entropy(&p) - 4f64.ln() / 5f64.ln()).abs() < 1e-12);
    // Hand-computed: p = (0.5, 0.3), r = 0.2.
    let h = -(0.5f64 * 0.5f64.ln() + 0.3 * 0.3f64.ln() + 0.2 * 0.2f64.ln()) / 3f64.ln();
    assert!((top_k_entropy(&[0.5, 0.3]) - h).abs() < 1e-12);
}

#[test]
fn top_logprobs_per_step_agree_with_the_scores() {
    let e = engine();
    let prompts: Vec<Vec<u32>> = ["Name a colour.", "What is 2 + 2? Answer briefly."]
        .iter()
        .map(|p| e.prompt_ids(p, true).unwrap())
        .collect();
    let opts = GenerateOptions {
        top_k_entropy: 5,
        chat: true,
        ..greedy(8)
    };
    let plain = e.generate_ids(&prompts, &opts).unwrap();
    let with = e.generate_ids_with_top(&prompts, &opts, 5).unwrap();
    assert_eq!(with.len(), 2);
    for ((g, top), p) in with.iter().zip(&plain) {
        // Recording the top tokens changes nothing else.
        assert_eq!(g, p);
        assert_eq!(top.len(), g.ids.len());
        for (t, row) in top.iter().enumerate() {
            assert_eq!(row.len(), 5);
            // Greedy: the chosen token is the most likely one, with the same logprob.
            assert_eq!(row[0], (g.ids[t], g.logprobs[t]));
            assert!(row.windows(2).all(|w| w[0].1 >= w[1].1), "{row:?}");
            // The top-5 entropy recomputed from them is the recorded one.
            let probs: Vec<f64> = row.iter().map(|&(_, l)| f64::from(l).exp()).collect();
            let h = top_k_entropy(&probs) as f32;
            assert!(
                (h - g.entropies[t]).abs() < 1e-5,
                "{h} vs {}",
                g.entropies[t]
            );
        }
    }
    // top_n = 0 records nothing.
    let none = e.generate_ids_with_top(&prompts[..1], &opts, 0).unwrap();
    assert!(none[0].1.is_empty());
}
