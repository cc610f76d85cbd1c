//! DDQN training throughput for the TDQN configuration (117 inputs, 5 x 512 network, batch
//! 32, one gradient step per environment step) on CPU (the Rust network of `flag_rl::mlp`,
//! one thread), on real AAPL data (TDQN benchmark files: 2012-2017 train, 2018-2019 test).
//!
//! Reports environment (= gradient) steps per second, episodes per second (including the
//! per-episode greedy evaluation on both splits that feeds the training curve), and the time
//! of one evaluation, as JSON in `$FLAG_BENCH_OUT/ddqn.json` (default `<repo>/artifacts/bench/`).
//! `FLAG_BENCH_EPISODES` (default 3) sets the episodes; `FLAG_BENCH_SEED` (default 0) the seed;
//! `FLAG_DATA_DIR` the data;
//! `FLAG_BENCH_DEVICE=cuda` runs the networks on the GPU (default cpu).
use std::path::PathBuf;
use std::time::Instant;

use flag_rl::agent::Backend;
use flag_rl::config::DdqnConfig;
use flag_rl::data::read_tdqn_csv;
use flag_rl::train::{TickerData, evaluate, train_episode};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::Device;

fn main() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let data_dir = std::env::var_os("FLAG_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("../shared/data"));
    let episodes: usize = std::env::var("FLAG_BENCH_EPISODES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let seed: u64 = std::env::var("FLAG_BENCH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    tch::set_num_threads(1);
    let device = match std::env::var("FLAG_BENCH_DEVICE").as_deref() {
        Ok("cuda") => {
            assert!(
                tch::Cuda::is_available(),
                "FLAG_BENCH_DEVICE=cuda but no CUDA device"
            );
            Device::Cuda(0)
        }
        _ => Device::Cpu,
    };
    let dir = data_dir.join("tdqn");
    let mut bars = read_tdqn_csv(&dir.join("AAPL_2012-1-1_2018-1-1.csv")).expect("AAPL train file");
    let test = read_tdqn_csv(&dir.join("AAPL_2018-1-1_2020-1-1.csv")).expect("AAPL test file");
    let n = bars.len();
    bars.dates.extend(&test.dates);
    bars.high.extend(&test.high);
    bars.low.extend(&test.low);
    bars.close.extend(&test.close);
    bars.volume.extend(&test.volume);
    let total = bars.len();
    let cfg = DdqnConfig {
        episodes,
        ..DdqnConfig::default()
    };
    let data = TickerData::new("AAPL", bars, 0..n, n..total, &cfg, None).expect("prepare AAPL");
    let mut agent =
        flag_rl::agent::Agent::new(cfg, &data.features, device, ChaCha8Rng::seed_from_u64(seed))
            .expect("agent");

    let mut steps = 0usize;
    let (mut train_s, mut eval_s) = (0.0, 0.0);
    let mut per_episode = Vec::new();
    for _ in 0..episodes {
        let t0 = Instant::now();
        let (s, loss) = train_episode(&mut agent, &data);
        let dt = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let paths = [
            evaluate(&agent, &data, "train"),
            evaluate(&agent, &data, "test"),
        ];
        let de = t1.elapsed().as_secs_f64();
        steps += s;
        train_s += dt;
        eval_s += de;
        per_episode.push(serde_json::json!({
            "steps": s, "train_s": dt, "eval_s": de, "mean_loss": loss,
            "test_return": paths[1].total_return(cfg.initial_capital),
        }));
    }
    let report = serde_json::json!({
        "bench": "ddqn",
        "device": if device == Device::Cpu { "cpu" } else { "cuda" },
        "backend": match agent.backend {
            Backend::Cpu(level) => format!("rust mlp, {}", level.here().name()),
            Backend::Torch(_) => "libtorch".to_string(),
        },
        "torch_threads": tch::get_num_threads(),
        "ticker": "AAPL",
        "train_days": n,
        "test_days": total - n,
        "observation_size": agent.inputs(),
        "episodes": episodes,
        "seed": seed,
        "env_steps": steps,
        "gradient_steps": agent.learn_steps,
        "train_s": train_s,
        "eval_s": eval_s,
        "steps_per_s": steps as f64 / train_s,
        "episodes_per_s": episodes as f64 / (train_s + eval_s),
        "mean_episode_steps": steps as f64 / episodes.max(1) as f64,
        "eval_s_per_episode": eval_s / episodes.max(1) as f64,
        "full_run_estimate_s": (train_s + eval_s) / episodes.max(1) as f64 * DdqnConfig::default().episodes as f64,
        "per_episode": per_episode,
    });
    let out_dir = std::env::var_os("FLAG_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("artifacts/bench"));
    std::fs::create_dir_all(&out_dir).expect("create bench output dir");
    let text = serde_json::to_string_pretty(&report).expect("json");
    std::fs::write(out_dir.join("ddqn.json"), format!("{text}\n")).expect("write ddqn.json");
    println!("{text}");
}
