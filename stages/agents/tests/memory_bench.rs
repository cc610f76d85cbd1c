//! Benchmark of FinAgent's memory (ignored in `just test`; run by `.ci/bench-retrieval.sh`):
//! embedding throughput of the real all-MiniLM-L6-v2 on real news texts (CPU, 2 libtorch
//! threads), and [`ExactIndex`] latency per query at 10k, 100k and 1M random unit vectors of
//! 384 dims in one ticker with no date cut (every item a candidate), k = 3, one thread.
//! Writes `$FLAG_BENCH_OUT/retrieval.json` (default `$FLAG_CACHE/bench/`, else the target
//! directory) and prints it.
mod common;

use std::path::PathBuf;
use std::time::Instant;

use flag_agents::memory::{
    EmbedSettings, Entry, ExactIndex, Filter, VectorIndex, embed_by_length, embed_param_specs,
    item_text,
};
use flag_core::arrow::array::{Array, StringArray};
use serde_json::{Value, json};

const DIM: usize = 384;

/// splitmix64: a fixed, seedable stream, so every run indexes the same vectors.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// A unit vector (uniform components in [-1, 1), normalised).
    fn unit(&mut self) -> Vec<f32> {
        let v: Vec<f32> = (0..DIM)
            .map(|_| (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
            .collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / n).collect()
    }
}

fn out_path() -> PathBuf {
    let dir = std::env::var_os("FLAG_BENCH_OUT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("FLAG_CACHE").map(|c| PathBuf::from(c).join("bench")))
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench"));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("retrieval.json")
}

fn embedding_throughput() -> Value {
    let threads = 2;
    tch::set_num_threads(threads);
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("memory-bench");
    let slice = common::slice(
        &root,
        &["AAPL"],
        Some((&["AAPL"], "2022-01-03", "2022-03-31")),
    );
    let news = common::read(&slice.news.unwrap());
    let col = |n: &str| {
        news.column_by_name(n)
            .unwrap()
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap()
            .clone()
    };
    let (title, summary) = (col("title"), col("summary"));
    let n = news.num_rows().min(640);
    let texts: Vec<String> = (0..n)
        .map(|i| {
            let s = (!summary.is_null(i)).then(|| summary.value(i));
            item_text(title.value(i), s, 1000)
        })
        .collect();
    let dir = flag_llm::models::minilm_dir(None).expect("MiniLM installed (just setup)");
    let emb = flag_llm::embed::MiniLmEmbedder::load(&dir, tch::Device::Cpu).unwrap();
    emb.embed(&texts[..32]).unwrap(); // warm-up
    let words: usize = texts.iter().map(|t| emb.token_ids(t).unwrap().len()).sum();
    let t = Instant::now();
    for chunk in texts.chunks(64) {
        emb.embed(chunk).unwrap();
    }
    let input_order_s = t.elapsed().as_secs_f64();
    // As the stages embed: shortest first, 64 a call (less padding).
    let p = flag_core::Params::new(
        embed_param_specs()
            .into_iter()
            .filter_map(|s| s.default.map(|d| (s.name.to_string(), d)))
            .collect(),
    );
    let stage_embedder = EmbedSettings::from_params(&p).unwrap().load().unwrap();
    let t = Instant::now();
    embed_by_length(&stage_embedder, &texts, 64, "texts", &|_, _, _| {}).unwrap();
    let sorted_s = t.elapsed().as_secs_f64();
    json!({
        "model": "all-MiniLM-L6-v2",
        "device": "cpu",
        "threads": threads,
        "texts": n,
        "mean_word_pieces": words as f64 / n as f64,
        "batch": 64,
        "input_order": {"seconds": input_order_s, "items_per_s": n as f64 / input_order_s},
        "by_length": {"seconds": sorted_s, "items_per_s": n as f64 / sorted_s},
    })
}

fn retrieval_latency(n: usize, queries: usize) -> Value {
    let mut rng = Rng(n as u64);
    let t = Instant::now();
    let entries: Vec<Entry> = (0..n)
        .map(|i| Entry {
            item_id: format!("{i:016x}"),
            group: "AAPL".into(),
            date: 18_000 + (i / 20) as i32,
            vector: rng.unit(),
        })
        .collect();
    let gen_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let index = ExactIndex::build(Some(DIM), entries).unwrap();
    let build_s = t.elapsed().as_secs_f64();
    let filter = Filter::memory("AAPL", i32::MAX);
    let qs: Vec<Vec<f32>> = (0..queries).map(|_| rng.unit()).collect();
    index.search(&qs[0], 3, &filter); // warm-up (pages in the vectors)
    let mut ms: Vec<f64> = qs
        .iter()
        .map(|q| {
            let t = Instant::now();
            let hits = index.search(q, 3, &filter);
            assert_eq!(hits.len(), 3);
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    let mean = ms.iter().sum::<f64>() / ms.len() as f64;
    json!({
        "items": n,
        "dim": DIM,
        "k": 3,
        "queries": queries,
        "vector_mib": (n * DIM * 4) as f64 / (1u64 << 20) as f64,
        "generate_s": gen_s,
        "build_s": build_s,
        "median_ms": ms[ms.len() / 2],
        "mean_ms": mean,
        "min_ms": ms[0],
        "max_ms": ms[ms.len() - 1],
        "items_per_ms": n as f64 / ms[ms.len() / 2],
    })
}

#[test]
#[ignore = "benchmark: .ci/bench-retrieval.sh"]
fn bench_memory() {
    let sizes: Vec<usize> = std::env::var("FLAG_BENCH_RETRIEVAL_SIZES")
        .ok()
        .map(|s| s.split(',').map(|x| x.trim().parse().unwrap()).collect())
        .unwrap_or_else(|| vec![10_000, 100_000, 1_000_000]);
    let embedding = embedding_throughput();
    eprintln!("embedding: {embedding}");
    let mut retrieval = Vec::new();
    for &n in &sizes {
        let r = retrieval_latency(n, if n >= 1_000_000 { 10 } else { 30 });
        eprintln!("retrieval: {r}");
        retrieval.push(r);
    }
    let report = json!({
        "index": "ExactIndex (brute force, f64 sums of f32 products, 1 thread)",
        "cpu_threads_available": std::thread::available_parallelism().map_or(0, |n| n.get()),
        // Other jobs on the machine slow both measures down: the 1-minute load at the end.
        "load_average": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "embedding": embedding,
        "retrieval": retrieval,
    });
    let path = out_path();
    std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
    eprintln!("wrote {}", path.display());
}
