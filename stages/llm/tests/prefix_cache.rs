//! Prefix caching on the real SmolLM2 GGUF (CPU, f32): a batch of chat prompts that share a
//! long head (chat template + the strategist's P3 instructions) and end in market data of
//! different lengths generates the same tokens with prefix caching as with every prompt
//! prefilled in full, free and constrained by the strategist's schema; per-token logprobs and
//! entropies agree within 1e-3 (the tolerance decoder_batch.rs uses for batched vs single);
//! later calls reuse stored heads (several kept at once); turning the cache off prefills
//! everything.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};

use flag_llm::constrain::Constraint;
use flag_llm::generate::{Engine, GenerateOptions, Generation, MIN_PREFIX, PrefixStore};
use tch::Device;

const TOL: f32 = 1e-3;

fn engine() -> MutexGuard<'static, Engine> {
    static ENGINE: OnceLock<Mutex<Engine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            flag_llm::generate::set_threads(1);
            let path =
                flag_llm::models::smollm2_gguf(None).expect("SmolLM2 GGUF must be installed");
            Mutex::new(Engine::load(path, Device::Cpu).unwrap())
        })
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The P3 instructions first, then each stock's data: a long shared head, suffixes of
/// different lengths.
fn prompts() -> Vec<String> {
    let p3 = std::fs::read_to_string(repo().join("prompts/strategist/P3.txt")).unwrap();
    let at = p3
        .find("Weigh the feature groups")
        .expect("P3 instructions");
    let end = p3.find("Market data (").expect("P3 data blocks");
    let head = &p3[at..end];
    let days = [
        "day t: close 100.0, volume 1.2M",
        "day t-1: close 98.7, volume 1.5M",
        "day t-2: close 97.9, volume 0.9M",
        "day t-3: close 99.4, volume 1.1M",
        "day t-4: close 101.2, volume 2.0M",
    ];
    [1, 5, 3, 2]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            format!(
                "{head}\nMarket data for stock {}:\n{}\nRSI(14): {}",
                i + 1,
                days[..n].join("\n"),
                40 + 7 * i
            )
        })
        .collect()
}

fn free() -> GenerateOptions {
    GenerateOptions {
        max_tokens: 16,
        chat: true,
        ..GenerateOptions::default()
    }
}

fn constrained() -> GenerateOptions {
    GenerateOptions {
        max_tokens: 24,
        chat: true,
        constraint: Some(
            Constraint::from_file(&repo().join("prompts/strategist/P3.schema.json")).unwrap(),
        ),
        ..GenerateOptions::default()
    }
}

/// Same tokens, text and finish; scores within TOL. Returns the largest score difference.
fn assert_same(what: &str, with: &[Generation], without: &[Generation]) -> f32 {
    assert_eq!(with.len(), without.len());
    let mut worst = 0f32;
    for (i, (a, b)) in with.iter().zip(without).enumerate() {
        assert_eq!(
            a.ids,
            b.ids,
            "{what}, prompt {}: with prefix cache {:?}, without {:?}",
            i + 1,
            a.text,
            b.text
        );
        assert_eq!(a.text, b.text, "{what}, prompt {}", i + 1);
        assert_eq!(a.finish_reason, b.finish_reason, "{what}, prompt {}", i + 1);
        let mut pairs: Vec<(f32, f32)> = a
            .logprobs
            .iter()
            .zip(&b.logprobs)
            .chain(a.entropies.iter().zip(&b.entropies))
            .map(|(x, y)| (*x, *y))
            .collect();
        if let (Some(ca), Some(cb)) = (&a.constrained, &b.constrained) {
            assert_eq!(ca.allowed, cb.allowed, "{what}, prompt {}", i + 1);
            pairs.extend(ca.logprobs.iter().zip(&cb.logprobs).map(|(x, y)| (*x, *y)));
        }
        for (x, y) in pairs {
            assert!(
                (x - y).abs() < TOL,
                "{what}, prompt {}: score {x} with prefix cache vs {y} without",
                i + 1
            );
            worst = worst.max((x - y).abs());
        }
    }
    worst
}

/// Length of the token head all prompts share (as generation sees them).
fn shared_head(e: &Engine, prompts: &[String]) -> (usize, Vec<usize>) {
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| e.prompt_ids(p, true).unwrap())
        .collect();
    let lcp = ids[1..].iter().fold(ids[0].len(), |n, p| {
        n.min(ids[0].iter().zip(p).take_while(|(x, y)| x == y).count())
    });
    (lcp, ids.iter().map(Vec::len).collect())
}

#[test]
fn prefix_caching_equals_full_prefill_free_and_constrained() {
    let e = engine();
    let prompts = prompts();
    let (head, lens) = shared_head(&e, &prompts);
    assert!(head >= 4 * MIN_PREFIX, "shared head of {head} tokens");
    let suffixes: Vec<usize> = lens.iter().map(|l| l - head).collect();
    assert!(
        suffixes.iter().max() > suffixes.iter().min(),
        "suffixes must differ in length: {suffixes:?}"
    );
    let total: usize = lens.iter().sum();

    e.set_prefix_cache(false);
    e.reset_prefix_stats();
    let off_free = e.generate(&prompts, &free()).unwrap();
    let off_con = e.generate(&prompts, &constrained()).unwrap();
    let s = e.prefix_stats();
    assert_eq!(s.with_prefix, 0, "{s:?}");
    assert_eq!(s.computed_tokens, 2 * total as u64, "{s:?}");

    e.set_prefix_cache(true);
    e.set_prefix_store(PrefixStore::Any);
    e.reset_prefix_stats();
    let on_free = e.generate(&prompts, &free()).unwrap();
    let s = e.prefix_stats();
    // The head ran once, each suffix once.
    assert_eq!(s.with_prefix, 1, "{s:?}");
    assert_eq!(s.prompt_tokens, total as u64);
    assert_eq!(s.computed_tokens, (total - 3 * head) as u64, "{s:?}");
    assert_eq!(s.reused_tokens, 0);
    let on_con = e.generate(&prompts, &constrained()).unwrap();
    let s = e.prefix_stats();
    // The second call takes the whole head from the store.
    assert_eq!(s.with_prefix, 2, "{s:?}");
    assert_eq!(s.reused_tokens, head as u64, "{s:?}");
    assert_eq!(
        s.computed_tokens,
        2 * (total - 4 * head) as u64 + head as u64
    );

    let d1 = assert_same("free", &on_free, &off_free);
    let d2 = assert_same("constrained", &on_con, &off_con);
    eprintln!(
        "head {head} tokens of {lens:?}; largest score difference: free {d1:e}, constrained {d2:e}"
    );
    assert!(on_con.iter().all(|g| g.text.starts_with("{\"direction\"")));
}

#[test]
fn single_prompts_reuse_the_stored_head_and_match() {
    let e = engine();
    let prompts = prompts();
    let (head, _) = shared_head(&e, &prompts);
    let opts = free();

    e.set_prefix_cache(false);
    let off: Vec<Generation> = prompts[..2]
        .iter()
        .map(|p| {
            e.generate(std::slice::from_ref(p), &opts)
                .unwrap()
                .remove(0)
        })
        .collect();
    let other = "Name three fruits that are red and three that are yellow, then say which of \
                 them keeps longest at room temperature."
        .to_string();
    let off_other = e.generate(std::slice::from_ref(&other), &opts).unwrap();

    e.set_prefix_cache(true);
    e.set_prefix_store(PrefixStore::Any);
    e.generate(&prompts[2..], &opts).unwrap();
    e.reset_prefix_stats();
    let on: Vec<Generation> = prompts[..2]
        .iter()
        .map(|p| {
            e.generate(std::slice::from_ref(p), &opts)
                .unwrap()
                .remove(0)
        })
        .collect();
    let s = e.prefix_stats();
    assert_eq!(s.with_prefix, 2, "{s:?}");
    assert!(s.reused_tokens >= 2 * head as u64, "{s:?}");
    assert_same("single after a batch", &on, &off);

    // A prompt that shares nothing long with the stored head is prefilled in full.
    e.reset_prefix_stats();
    let on_other = e.generate(std::slice::from_ref(&other), &opts).unwrap();
    let s = e.prefix_stats();
    assert_eq!((s.with_prefix, s.reused_tokens), (0, 0), "{s:?}");
    assert_eq!(s.computed_tokens, s.prompt_tokens);
    assert_same("unrelated single", &on_other, &off_other);

    // Several heads are kept: the unrelated prompt's head did not push out the P3 one.
    e.reset_prefix_stats();
    let again = e
        .generate(std::slice::from_ref(&prompts[0]), &opts)
        .unwrap();
    let s = e.prefix_stats();
    assert_eq!(s.with_prefix, 1, "{s:?}");
    assert!(s.reused_tokens >= head as u64, "{s:?}");
    assert_same("single after an unrelated one", &again, &off[..1]);
    let s0 = e.prefix_stats();
    e.generate(std::slice::from_ref(&other), &opts).unwrap();
    let s = e.prefix_stats();
    assert!(s.reused_tokens > s0.reused_tokens, "{s:?}");
}

/// With the default store (exact heads, what stages use), a call's numbers depend on its own
/// prompts only: a batch that reuses its kept head after other calls gives the bits it gives
/// with nothing kept, and a single prompt is prefilled in full.
#[test]
fn exact_heads_are_reused_without_changing_a_bit() {
    let e = engine();
    let prompts = prompts();
    let opts = free();
    // The engine is shared by this file's tests: start from nothing kept.
    e.set_prefix_cache(true);
    e.set_prefix_store(PrefixStore::Off);
    let alone = e.generate(&prompts[..2], &opts).unwrap();

    e.set_prefix_store(PrefixStore::Exact);
    e.reset_prefix_stats();
    let first = e.generate(&prompts[..2], &opts).unwrap();
    let s = e.prefix_stats();
    assert_eq!((s.with_prefix, s.reused_tokens), (1, 0), "{s:?}");
    e.generate(&prompts[1..], &opts).unwrap();
    e.generate(std::slice::from_ref(&prompts[0]), &opts)
        .unwrap();
    e.reset_prefix_stats();
    let again = e.generate(&prompts[..2], &opts).unwrap();
    let s = e.prefix_stats();
    let (head, _) = shared_head(&e, &prompts[..2]);
    assert_eq!(
        (s.with_prefix, s.reused_tokens),
        (1, head as u64),
        "the head is taken whole from the store: {s:?}"
    );
    for run in [&first, &again] {
        for (a, b) in alone.iter().zip(run) {
            assert_eq!(a.ids, b.ids);
            assert_eq!(a.logprobs, b.logprobs, "bit-identical scores");
            assert_eq!(a.entropies, b.entropies, "bit-identical entropies");
        }
    }
    e.reset_prefix_stats();
    e.generate(std::slice::from_ref(&prompts[0]), &opts)
        .unwrap();
    let s = e.prefix_stats();
    assert_eq!(
        (s.with_prefix, s.computed_tokens),
        (0, s.prompt_tokens),
        "{s:?}"
    );

    // A batch whose head only starts like a kept one computes its own.
    let longer: Vec<String> = prompts[..2]
        .iter()
        .map(|p| format!("{p}\nNote: none."))
        .collect();
    let other_head = vec![prompts[0].clone(), format!("{} Volume: n/a.", prompts[0])];
    e.reset_prefix_stats();
    e.generate(&longer, &opts).unwrap();
    let s = e.prefix_stats();
    assert_eq!(
        s.reused_tokens, head as u64,
        "same head, longer rows: {s:?}"
    );
    e.reset_prefix_stats();
    e.generate(&other_head, &opts).unwrap();
    let s = e.prefix_stats();
    assert_eq!((s.with_prefix, s.reused_tokens), (1, 0), "{s:?}");
    assert!(s.computed_tokens > s.prompt_tokens / 2, "{s:?}");
}
