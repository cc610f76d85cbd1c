//! Behaviour of the TDQN agent: observation size and causality on real AAPL data,
//! bit-for-bit reproducibility, and learning a trivially learnable series.
use std::path::PathBuf;

use flag_rl::agent::Agent;
use flag_rl::config::DdqnConfig;
use flag_rl::data::read_tdqn_csv;
use flag_rl::features::Bars;
use flag_rl::net::QNet;
use flag_rl::train::{TickerData, train_run};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Tensor};

fn data_dir() -> PathBuf {
    std::env::var_os("FLAG_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"))
}

/// AAPL from the TDQN benchmark: 2012-2017 train, 2018-2019 test, one series.
fn aapl() -> (Bars, std::ops::Range<usize>, std::ops::Range<usize>) {
    let dir = data_dir().join("tdqn");
    let mut b = read_tdqn_csv(&dir.join("AAPL_2012-1-1_2018-1-1.csv")).unwrap();
    let test = read_tdqn_csv(&dir.join("AAPL_2018-1-1_2020-1-1.csv")).unwrap();
    let n = b.len();
    b.dates.extend(&test.dates);
    b.high.extend(&test.high);
    b.low.extend(&test.low);
    b.close.extend(&test.close);
    b.volume.extend(&test.volume);
    let total = b.len();
    (b, 0..n, n..total)
}

/// A deterministic up-trend (about +0.6 % a day) with a small wiggle so features vary. The
/// bar range is constant in price units so the range feature stays inside its training
/// scale on the test days (a range proportional to price would leave it).
fn uptrend(n: usize) -> Bars {
    let close: Vec<f64> = (0..n)
        .map(|t| 100.0 * (0.006 * t as f64 + 0.01 * (t as f64 / 3.0).sin()).exp())
        .collect();
    Bars {
        dates: (0..n as i32).collect(),
        high: close
            .iter()
            .enumerate()
            .map(|(t, c)| c + 0.5 + 0.1 * (t as f64 / 2.0).cos())
            .collect(),
        low: close.iter().map(|c| c - 0.5).collect(),
        volume: (0..n)
            .map(|t| 1e6 * (1.0 + 0.3 * (t as f64 / 5.0).sin()))
            .collect(),
        close,
    }
}

#[test]
fn tdqn_observation_has_117_inputs() {
    tch::set_num_threads(1);
    let cfg = DdqnConfig::default();
    assert_eq!(cfg.observation_size(0), 117);
    assert_eq!(cfg.observation_size(2), 119);
    let (bars, train, test) = aapl();
    assert_eq!((train.len(), test.len()), (1509, 503));
    let data = TickerData::new("AAPL", bars, train, test, &cfg, None).unwrap();
    assert_eq!(data.features.width, 116);
    let agent = Agent::new(
        cfg,
        &data.features,
        Device::Cpu,
        ChaCha8Rng::seed_from_u64(0),
    )
    .unwrap();
    assert_eq!(agent.inputs(), 117);
    let obs = data.features.observation(data.test.start, 1.0);
    assert_eq!(obs.len(), 117);
    let net = QNet::new(
        &cfg,
        117,
        Device::Cpu,
        Some(&mut ChaCha8Rng::seed_from_u64(0)),
    );
    let q = net.forward(&Tensor::from_slice(&obs).view([1, 117]), false, None);
    assert_eq!(q.size(), vec![1, 2]);
}

#[test]
fn observation_at_t_uses_no_later_data() {
    let cfg = DdqnConfig::default();
    let (bars, train, test) = aapl();
    let base = TickerData::new(
        "AAPL",
        bars.clone(),
        train.clone(),
        test.clone(),
        &cfg,
        None,
    )
    .unwrap();
    for t in [test.start, test.start + 137, test.end - 2] {
        let mut changed = bars.clone();
        for i in t + 1..changed.len() {
            changed.close[i] *= 1.5 + (i % 3) as f64;
            changed.high[i] *= 2.0;
            changed.low[i] *= 0.5;
            changed.volume[i] = 7.0 + i as f64;
        }
        let other = TickerData::new(
            "AAPL",
            changed.clone(),
            train.clone(),
            test.clone(),
            &cfg,
            None,
        )
        .unwrap();
        let (a, b) = (base.features.row(t), other.features.row(t));
        assert!(
            a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "row {t} changed"
        );
        assert_ne!(
            base.features.row(t + 1),
            other.features.row(t + 1),
            "the change is visible at t + 1"
        );
        // Changing day t itself must change the observation (the check can fail).
        changed.close[t] *= 1.01;
        let third =
            TickerData::new("AAPL", changed, train.clone(), test.clone(), &cfg, None).unwrap();
        assert_ne!(base.features.row(t), third.features.row(t));
    }
}

fn small_config(episodes: usize) -> DdqnConfig {
    DdqnConfig {
        episodes,
        ..DdqnConfig::default()
    }
}

#[test]
fn same_seed_gives_bit_identical_training() {
    tch::set_num_threads(1);
    let cfg = small_config(2);
    let bars = uptrend(160);
    let data = TickerData::new("UP", bars, 0..120, 120..160, &cfg, None).unwrap();
    let run = |seed| train_run(&cfg, &data, seed, Device::Cpu, 252.0, &|_, _| {}).unwrap();
    let (a, b, c) = (run(7), run(7), run(8));
    assert!(a.agent.learn_steps > 0);
    let (wa, wb, wc) = (
        a.agent.policy.snapshot(),
        b.agent.policy.snapshot(),
        c.agent.policy.snapshot(),
    );
    let bits = |w: &Vec<(String, Vec<f32>)>| -> Vec<u32> {
        w.iter()
            .flat_map(|(_, v)| v.iter().map(|x| x.to_bits()))
            .collect()
    };
    assert_eq!(bits(&wa), bits(&wb));
    assert_ne!(bits(&wa), bits(&wc), "another seed must give other weights");
    assert_eq!(a.paths, b.paths);
    assert_eq!(a.curve.len(), 2);
    for (x, y) in a.curve.iter().zip(&b.curve) {
        assert_eq!(x.mean_loss.to_bits(), y.mean_loss.to_bits());
        assert_eq!(x.test_return.to_bits(), y.test_return.to_bits());
    }
}

/// (test LONG share, test return, buy-and-hold return) of seed `seed` on the up-trend.
fn uptrend_outcome(cfg: &DdqnConfig, seed: u64) -> (f64, f64, f64) {
    let (train, test) = (0..500, 500..560);
    let bars = uptrend(test.end);
    let buy_and_hold = bars.close[test.end - 1] / bars.close[test.start] - 1.0;
    let data = TickerData::new("UP", bars, train, test, cfg, None).unwrap();
    let out = train_run(cfg, &data, seed, Device::Cpu, 252.0, &|_, _| {}).unwrap();
    let test = &out.paths[1];
    let long =
        test.steps.iter().filter(|s| s.action == "LONG").count() as f64 / test.steps.len() as f64;
    (long, test.total_return(cfg.initial_capital), buy_and_hold)
}

/// Seeds and episodes of the learning check. Measured on this machine class (AMD EPYC,
/// AVX-512) at 12 episodes: 13 of 15 (seed, level) runs hold LONG on 100 % of test days, the
/// other two on 85 %; at 8 episodes one seed held 47 %. So the verdict is a statistic over
/// seeds with a wide margin, not a per-seed threshold that kernel rounding can tip.
const LEARNING_SEEDS: u64 = 3;
const LEARNING_EPISODES: usize = 12;

/// The learning check in one process, under whatever ATEN_CPU_CAPABILITY it was started with.
/// Paper settings (network, replay, target, exploration), except the learning rate: 1e-3
/// instead of 1e-4, because at 1e-4 the initial Q-values (about 1.4 standard deviation from
/// Xavier init) take tens of thousands of steps to shrink to the reward scale (about 0.006
/// here), which the paper's 50 episodes provide and a test does not. Passes when the median
/// seed holds LONG on >= 90 % of test days and the seeds' mean test return is at least half of
/// buy-and-hold's.
#[test]
#[ignore = "run once per ATEN_CPU_CAPABILITY level by learns_a_trivial_uptrend_under_every_cpu_capability"]
fn uptrend_learning_check() {
    tch::set_num_threads(1);
    let cfg = DdqnConfig {
        learning_rate: 1e-3,
        ..small_config(LEARNING_EPISODES)
    };
    let mut longs = Vec::new();
    let mut returns = Vec::new();
    let mut buy_and_hold = 0.0;
    for seed in 0..LEARNING_SEEDS {
        let (long, ret, bh) = uptrend_outcome(&cfg, seed);
        eprintln!(
            "seed {seed}: test LONG share {long:.3}, test return {ret:.4} (buy and hold {bh:.4})"
        );
        longs.push(long);
        returns.push(ret);
        buy_and_hold = bh;
    }
    longs.sort_by(f64::total_cmp);
    let median = longs[longs.len() / 2];
    let mean_return = returns.iter().sum::<f64>() / returns.len() as f64;
    eprintln!(
        "capability {}: median LONG share {median:.3}, mean test return {mean_return:.4}",
        flag_core::numerics::cpu_capability()
    );
    assert!(
        median >= 0.9 && mean_return >= 0.5 * buy_and_hold,
        "did not learn to hold the up-trend: median LONG share {median:.3}, mean return \
         {mean_return:.4} (buy and hold {buy_and_hold:.4})"
    );
}

/// Runs `uptrend_learning_check` in a child process under every dispatch level this CPU
/// supports (ATen reads ATEN_CPU_CAPABILITY once, at start-up), all at once.
#[test]
fn learns_a_trivial_uptrend_under_every_cpu_capability() {
    let exe = std::env::current_exe().unwrap();
    let levels = flag_core::numerics::supported_cpu_capabilities();
    let children: Vec<_> = levels
        .iter()
        .map(|level| {
            let child = std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "uptrend_learning_check",
                    "--ignored",
                    "--nocapture",
                ])
                .env("ATEN_CPU_CAPABILITY", level)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            (level, child)
        })
        .collect();
    let mut failed = Vec::new();
    for (level, child) in children {
        let out = child.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("--- ATEN_CPU_CAPABILITY={level}\n{text}");
        assert!(
            text.contains(&format!("capability {level}:")),
            "the child did not run the check under {level}"
        );
        if !out.status.success() {
            failed.push(*level);
        }
    }
    assert!(
        failed.is_empty(),
        "the learning check failed under {failed:?}"
    );
}

/// FNV-1a over bytes: enough to pin a run's output, no dependency.
fn fnv(hash: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *hash ^= u64::from(*b);
        *hash = hash.wrapping_mul(0x100_0000_01b3);
    }
}

/// Hash of everything a training run produces: every network variable bit for bit, the
/// curve, and both greedy paths (Debug of f64 is its shortest exact round-trip text).
fn run_hash(cfg: &DdqnConfig, data: &TickerData, seed: u64) -> (u64, u64, u64) {
    let out = train_run(cfg, data, seed, Device::Cpu, 252.0, &|_, _| {}).unwrap();
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for (name, v) in out.agent.policy.snapshot() {
        fnv(&mut h, name.as_bytes());
        for x in v {
            fnv(&mut h, &x.to_bits().to_le_bytes());
        }
    }
    fnv(&mut h, format!("{:?}{:?}", out.curve, out.paths).as_bytes());
    (h, out.agent.iterations, out.agent.learn_steps)
}

/// Output hashes of two AAPL runs, recorded before the ddqn speed-up (issue 14) on the
/// machine whose kernel path is `PINNED_ON`: the TDQN configuration at seed 0 for 3 episodes
/// (338 actions: no target copy yet), and the same with a target copy every 100 actions (so
/// the copies and the target network's values are pinned too). Any change to the agent's
/// arithmetic, random-number use or batching shows here. On another kernel path (CPU, ATen
/// dispatch level, MKL branch) the values legitimately differ: there the test checks that two
/// runs agree and says that no pin exists for it.
const PINNED_ON: &str = "AMD EPYC | avx512 | mkl auto AuthenticAMD avx512";
const PINNED: [(u64, u64, u64); 2] = [
    (3_855_994_367_947_961_784, 338, 323),
    (13_437_887_510_257_192_915, 338, 323),
];

#[test]
fn aapl_run_matches_the_pinned_output() {
    tch::set_num_threads(1);
    let (bars, train, test) = aapl();
    let base = small_config(3);
    let data = TickerData::new("AAPL", bars, train, test, &base, None).unwrap();
    let cfgs = [
        base,
        DdqnConfig {
            target_update: 100,
            ..base
        },
    ];
    let got: Vec<(u64, u64, u64)> = cfgs.iter().map(|c| run_hash(c, &data, 0)).collect();
    let path = flag_core::numerics::kernel_path("");
    let key = format!(
        "{} | {} | {}",
        flag_core::numerics::machine()["cpu"],
        path["cpu_capability"],
        path["blas"]
    );
    eprintln!("kernel path '{key}': {got:?}");
    assert!(got[1].1 > 300, "the second run copies the target network");
    if key == PINNED_ON {
        assert_eq!(got, PINNED, "the ddqn output changed at seed 0 on {key}");
    } else {
        eprintln!("no pinned output for '{key}' (pinned on '{PINNED_ON}'): checking determinism");
        assert_eq!(got[0], run_hash(&cfgs[0], &data, 0));
    }
}
