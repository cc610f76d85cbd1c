//! Behaviour of the TDQN agent: observation size and causality on real AAPL data,
//! bit-for-bit reproducibility, and learning a trivially learnable series.
use std::path::PathBuf;

use flag_rl::agent::{Agent, Backend};
use flag_rl::config::DdqnConfig;
use flag_rl::data::read_tdqn_csv;
use flag_rl::features::Bars;
use flag_rl::mlp::kernels::Level;
use flag_rl::net::QNet;
use flag_rl::train::{TickerData, train_run, train_run_on};
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
    let (wa, wb, wc) = (a.agent.snapshot(), b.agent.snapshot(), c.agent.snapshot());
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

/// Seeds and episodes of the learning check. With libtorch's kernels (before the CPU network
/// of `flag_rl::mlp`), at 12 episodes 13 of 15 (seed, ATen level) runs held LONG on 100 % of
/// test days and the other two on 85 %; at 8 episodes one seed held 47 %. The CPU network
/// gives the same bytes on every machine, and all three seeds hold LONG on every test day
/// (test return 0.4071 against buy-and-hold's 0.4153). The verdict stays a statistic over
/// seeds with a wide margin.
const LEARNING_SEEDS: u64 = 3;
const LEARNING_EPISODES: usize = 12;

/// Paper settings (network, replay, target, exploration), except the learning rate: 1e-3
/// instead of 1e-4, because at 1e-4 the initial Q-values (about 1.4 standard deviation from
/// Xavier init) take tens of thousands of steps to shrink to the reward scale (about 0.006
/// here), which the paper's 50 episodes provide and a test does not. Passes when the median
/// seed holds LONG on >= 90 % of test days and the seeds' mean test return is at least half of
/// buy-and-hold's.
#[test]
fn learns_a_trivial_uptrend() {
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
    assert!(
        median >= 0.9 && mean_return >= 0.5 * buy_and_hold,
        "did not learn to hold the up-trend: median LONG share {median:.3}, mean return \
         {mean_return:.4} (buy and hold {buy_and_hold:.4})"
    );
}

/// A whole training run (two episodes, a target copy, both greedy paths) gives the same bytes
/// at every kernel level of the CPU network this machine runs, including the plain code that
/// CPUs without AVX2 and FMA get. A narrower network keeps the plain level quick; its shapes
/// leave edges in every tile.
#[test]
fn a_run_gives_the_same_bytes_at_every_kernel_level() {
    let cfg = DdqnConfig {
        hidden: 40,
        hidden_layers: 2,
        batch_size: 12,
        target_update: 50,
        ..small_config(2)
    };
    let bars = uptrend(200);
    let data = TickerData::new("UP", bars, 0..150, 150..200, &cfg, None).unwrap();
    let levels = Level::all_here();
    let hashes: Vec<(u64, u64, u64)> = levels
        .iter()
        .map(|l| run_hash(&cfg, &data, 3, Backend::Cpu(*l)))
        .collect();
    eprintln!("{levels:?}: {hashes:?}");
    assert!(hashes[0].2 > 100, "the run takes gradient steps");
    assert!(
        hashes.iter().all(|h| *h == hashes[0]),
        "{levels:?}: {hashes:?}"
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
fn run_hash(cfg: &DdqnConfig, data: &TickerData, seed: u64, backend: Backend) -> (u64, u64, u64) {
    let out = train_run_on(cfg, data, seed, backend, 252.0, &|_, _| {}).unwrap();
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for (name, v) in out.agent.snapshot() {
        fnv(&mut h, name.as_bytes());
        for x in v {
            fnv(&mut h, &x.to_bits().to_le_bytes());
        }
    }
    fnv(&mut h, format!("{:?}{:?}", out.curve, out.paths).as_bytes());
    (h, out.agent.iterations, out.agent.learn_steps)
}

/// Output hashes of two AAPL runs: the TDQN configuration at seed 0 for 3 episodes (909
/// actions: no target copy yet), and the same with a target copy every 100 actions (so the
/// copies and the target network's values are pinned too). Any change to the agent's
/// arithmetic, random-number use or batching shows here. The CPU network's arithmetic is
/// fixed by its source (`flag_rl::mlp`), so these hold on every machine and at every kernel
/// level; they were recorded when it replaced libtorch on the CPU (issue 14), whose pins held
/// only on the machine that recorded them.
const PINNED: [(u64, u64, u64); 2] = [
    (9_579_650_719_499_294_555, 909, 894),
    (12_700_838_931_793_650_285, 909, 894),
];

#[test]
fn aapl_run_matches_the_pinned_output() {
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
    // The plain level is left to the run above: at full width it takes minutes.
    for level in Level::all_here()
        .into_iter()
        .filter(|l| *l != Level::Generic)
    {
        let got: Vec<(u64, u64, u64)> = cfgs
            .iter()
            .map(|c| run_hash(c, &data, 0, Backend::Cpu(level)))
            .collect();
        eprintln!("{}: {got:?}", level.name());
        assert!(got[1].1 > 800, "the second run copies the target network");
        assert_eq!(
            got,
            PINNED,
            "the ddqn output changed at seed 0 ({})",
            level.name()
        );
    }
}
