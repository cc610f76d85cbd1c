//! `flag llm bench`: throughput of the decoder as the strategist uses it. For each batch size,
//! prefill a prompt of exactly P tokens into a fresh KV cache, then decode N greedy steps for
//! every row; report tokens/s (prefill: B*P / time, decode: aggregate B*N / time), load time
//! and peak RSS. .ci/bench-llm.sh runs llama.cpp on the same GGUF and prompt beside it.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use flag_llm::constrain::Constraint;
use flag_llm::generate::{Engine, GenerateOptions, PrefixStore};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use super::Common;

/// Built-in prompt (repeated, then cut to --prompt-tokens): the kind of text the strategist reads.
const PROMPT: &str = "Date: 2024-03-15\nTicker: AAPL\nClose: 172.62 (+1.13%)  Volume: 121,664,700\n\
RSI(14): 58.3   MACD: 0.42 / signal 0.37\n\
News: Apple unveils new AI features; analysts raise price targets. Supply chain checks \
point to stronger iPhone demand in China, while regulators in Europe open a new inquiry.\n";

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Prompt length in tokens (the prompt text is repeated, then cut)
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Greedy decode steps per sequence
    #[arg(long, default_value_t = 32)]
    pub decode_tokens: usize,
    /// Batch sizes, comma separated
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub batches: Vec<usize>,
    /// Timed rounds per batch size (the median is reported; one untimed warm-up first)
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Prompt text file [default: a built-in market prompt]
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// Also time whole generations (`generate_ids`, up to --decode-tokens each) of the same
    /// prompts free and constrained by this JSON Schema / .lark / .regex file: the cost of
    /// the grammar mask
    #[arg(long)]
    pub schema: Option<PathBuf>,
    /// Also time the prompt prefill (whole `generate_ids` calls of one token) of a batch whose
    /// rows share their first N tokens and differ after them, with prefix caching off, on
    /// (within the batch), and on with the head kept from the previous call
    #[arg(long)]
    pub shared_prefix: Option<usize>,
    #[command(flatten)]
    pub common: Common,
}

pub fn run(mut a: BenchArgs) -> anyhow::Result<()> {
    if a.shared_prefix.is_some_and(|n| n >= a.prompt_tokens) {
        bail!("--shared-prefix must be below --prompt-tokens");
    }
    if a.prompt_tokens == 0 || a.decode_tokens == 0 || a.repeats == 0 || a.batches.contains(&0) {
        bail!("--prompt-tokens, --decode-tokens, --repeats and every batch size must be >= 1");
    }
    // The benchmark's contract is 2 CPU threads unless told otherwise.
    a.common.threads.get_or_insert(2);
    let device = a.common.setup()?;
    let path = a.common.gguf()?;
    let text = match &a.prompt_file {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        None => PROMPT.to_string(),
    };

    let t0 = Instant::now();
    let engine =
        Engine::load(&path, device).with_context(|| format!("loading {}", path.display()))?;
    sync(device);
    let load_s = t0.elapsed().as_secs_f64();
    let rss_after_load = peak_rss_mib();

    let mut ids = engine.tokenizer().encode(&text, true)?;
    if ids.is_empty() {
        bail!("the bench prompt tokenizes to nothing");
    }
    while ids.len() < a.prompt_tokens {
        ids.extend(ids.clone());
    }
    ids.truncate(a.prompt_tokens);

    let constraint = a.schema.as_deref().map(Constraint::from_file).transpose()?;

    // Untimed warm-up: first calls allocate and pick kernels.
    tch::no_grad(|| round(&engine, &ids, 1, a.decode_tokens.min(4)))?;

    let mut results = Vec::new();
    let mut greedy_text = String::new();
    for &b in &a.batches {
        let mut pre = Vec::new();
        let mut dec = Vec::new();
        for _ in 0..a.repeats {
            let r = tch::no_grad(|| round(&engine, &ids, b, a.decode_tokens))?;
            pre.push((b * a.prompt_tokens) as f64 / r.prefill_s);
            dec.push((b * a.decode_tokens) as f64 / r.decode_s);
            if b == 1 {
                greedy_text = engine.tokenizer().decode(&r.first_row, false)?;
            }
        }
        let (p, d) = (median(&mut pre), median(&mut dec));
        eprintln!("batch {b:>3}: prefill {p:>9.1} tok/s   decode {d:>8.1} tok/s (aggregate)");
        let mask = match &constraint {
            Some(c) => Some(mask_cost(&engine, &ids, b, a.decode_tokens, a.repeats, c)?),
            None => None,
        };
        let prefix = match a.shared_prefix {
            Some(n) => Some(prefix_cost(&engine, &ids, b, n, a.repeats)?),
            None => None,
        };
        results.push(json!({
            "shared_prefix": prefix,
            "constrained_vs_free": mask,
            "batch": b,
            "prefill_tok_s": round2(p),
            "decode_tok_s": round2(d),
            "decode_tok_s_per_seq": round2(d / b as f64),
            "prefill_tok_s_all": pre.iter().map(|x| round2(*x)).collect::<Vec<_>>(),
            "decode_tok_s_all": dec.iter().map(|x| round2(*x)).collect::<Vec<_>>(),
        }));
    }

    let out = json!({
        "engine": "flag",
        "gguf": path.file_name().map(|f| f.to_string_lossy().into_owned()),
        "device": format!("{device:?}"),
        "kind": format!("{:?}", engine.model().kind()),
        "weights": engine.model().weight_format().name(),
        "threads": tch::get_num_threads(),
        "prompt_tokens": a.prompt_tokens,
        "decode_tokens": a.decode_tokens,
        "repeats": a.repeats,
        "load_s": round4(load_s),
        "peak_rss_after_load_mib": rss_after_load.map(round2),
        "peak_rss_mib": peak_rss_mib().map(round2),
        "results": results,
        "greedy_text": greedy_text,
    });
    if a.common.json {
        println!("{out}");
    } else {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

/// Whole generations of `b` copies of the prompt, free and constrained (greedy, no stop
/// strings, at most `n` tokens each): tokens per second over the tokens each produced, and
/// the constrained run's slowdown per token (the grammar mask's cost; the goal is <= 10%).
fn mask_cost(
    engine: &Engine,
    ids: &[u32],
    b: usize,
    n: usize,
    repeats: usize,
    c: &Constraint,
) -> anyhow::Result<serde_json::Value> {
    let prompts = vec![ids.to_vec(); b];
    let free = GenerateOptions {
        max_tokens: n,
        temperature: 0.0,
        top_k_entropy: 10,
        chat: false,
        ..GenerateOptions::default()
    };
    let constrained = GenerateOptions {
        constraint: Some(c.clone()),
        ..free.clone()
    };
    // Compile once untimed: the trie is built on first use, once per engine.
    engine.compile(c)?;
    let mut rates = [Vec::new(), Vec::new()];
    let mut tokens = [0usize; 2];
    for _ in 0..repeats {
        for (k, o) in [&free, &constrained].into_iter().enumerate() {
            let t = Instant::now();
            let out = engine.generate_ids(&prompts, o)?;
            let secs = t.elapsed().as_secs_f64();
            tokens[k] = out.iter().map(|g| g.ids.len()).sum();
            rates[k].push(tokens[k] as f64 / secs);
        }
    }
    let (f, c) = (median(&mut rates[0]), median(&mut rates[1]));
    let overhead = (f / c - 1.0) * 100.0;
    eprintln!(
        "batch {b:>3}: generate free {f:>8.1} tok/s   constrained {c:>8.1} tok/s   mask overhead {overhead:>5.1}% per token"
    );
    Ok(json!({
        "free_tok_s": round2(f),
        "constrained_tok_s": round2(c),
        "free_tokens": tokens[0],
        "constrained_tokens": tokens[1],
        "overhead_pct_per_token": round2(overhead),
    }))
}

/// Prefill of `b` prompts that share `ids[..n]` and differ from token n on (row r's token n
/// is shifted by r): median seconds per call and tokens run through the model, with prefix
/// caching off, on with an empty store (the head once per batch), and on with the head
/// stored by the previous call (the head not run at all).
fn prefix_cost(
    engine: &Engine,
    ids: &[u32],
    b: usize,
    n: usize,
    repeats: usize,
) -> anyhow::Result<serde_json::Value> {
    let vocab = engine.model().cfg.vocab as u32;
    let prompts: Vec<Vec<u32>> = (0..b as u32)
        .map(|r| {
            let mut p = ids.to_vec();
            p[n] = (p[n] + r) % vocab;
            p
        })
        .collect();
    let opts = GenerateOptions {
        max_tokens: 1,
        ..GenerateOptions::default()
    };
    let was = engine.prefix_cache();
    let mut out = serde_json::Map::new();
    let mut first: Option<Vec<u32>> = None;
    for (name, on, store) in [
        ("off", false, PrefixStore::Off),
        ("on", true, PrefixStore::Off),
        ("on_stored", true, PrefixStore::Any),
    ] {
        engine.set_prefix_cache(on);
        engine.set_prefix_store(store);
        let mut secs = Vec::new();
        let mut stats = Default::default();
        for _ in 0..repeats {
            engine.reset_prefix_stats();
            let t = Instant::now();
            let g = engine.generate_ids(&prompts, &opts)?;
            secs.push(t.elapsed().as_secs_f64());
            stats = engine.prefix_stats();
            // The first token must not depend on the prefill path.
            let tokens: Vec<u32> = g.iter().map(|g| g.ids[0]).collect();
            match &first {
                None => first = Some(tokens),
                Some(f) if *f != tokens => {
                    bail!("prefix caching {name} changed the first tokens: {tokens:?} vs {f:?}")
                }
                Some(_) => {}
            }
        }
        let s = median(&mut secs);
        eprintln!(
            "batch {b:>3}: prefill with a {n}-token shared head, prefix cache {name:<9}: {s:>8.4} s, {} of {} prompt tokens run",
            stats.computed_tokens, stats.prompt_tokens
        );
        out.insert(
            name.into(),
            json!({
                "seconds": round4(s),
                "seconds_all": secs.iter().map(|x| round4(*x)).collect::<Vec<_>>(),
                "prompt_tokens": stats.prompt_tokens,
                "computed_tokens": stats.computed_tokens,
            }),
        );
    }
    engine.set_prefix_cache(was);
    engine.set_prefix_store(PrefixStore::Exact);
    out.insert("shared_tokens".into(), json!(n));
    Ok(serde_json::Value::Object(out))
}

struct Round {
    prefill_s: f64,
    decode_s: f64,
    first_row: Vec<u32>,
}

/// One prefill of `b` copies of `ids` plus `n` greedy decode steps, timed separately.
fn round(engine: &Engine, ids: &[u32], b: usize, n: usize) -> anyhow::Result<Round> {
    let model = engine.model();
    let device = model.device();
    let p = ids.len() as i64;
    let row: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
    let prompt = Tensor::from_slice(&row)
        .view([1, p])
        .repeat([b as i64, 1])
        .to(device);
    let valid = Tensor::ones([b as i64, p], (Kind::Bool, device));
    let step_valid = Tensor::ones([b as i64, 1], (Kind::Bool, device));
    let mut cache = model.new_cache(b, ids.len() + n)?;

    sync(device);
    let t = Instant::now();
    let hidden = model.forward_cached(&prompt, &valid, &mut cache)?;
    let mut next = model.logits(&hidden.narrow(1, p - 1, 1)).argmax(-1, false);
    sync(device);
    let prefill_s = t.elapsed().as_secs_f64();

    let mut generated = vec![next.shallow_clone()];
    let t = Instant::now();
    for _ in 0..n {
        let h = model.forward_cached(&next, &step_valid, &mut cache)?;
        next = model.logits(&h).argmax(-1, false);
        generated.push(next.shallow_clone());
    }
    sync(device);
    let decode_s = t.elapsed().as_secs_f64();

    // Row 0's greedy tokens, so the report shows the model produced sensible text.
    let first = Tensor::cat(&generated[..n], 1).get(0).to(Device::Cpu);
    let first_row = Vec::<i64>::try_from(&first)?
        .into_iter()
        .map(|x| x as u32)
        .collect();
    Ok(Round {
        prefill_s,
        decode_s,
        first_row,
    })
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Peak resident set (VmHWM) of this process, Linux only.
fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}
