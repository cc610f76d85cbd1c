//! One training run of the TDQN agent on one ticker, and greedy evaluation on a split.
//!
//! Timing follows this project's environments: the action decided with data up to day `t`
//! executes at the close of day `t`. Its reward is the portfolio return from just before
//! that trade (old position valued at `p_t`) to the close of `t + 1` (new position valued at
//! `p_{t+1}`, including any forced short cover there), so it contains the trade's cost and
//! the next day's move of the chosen position, and nothing the decision could not affect.
//! Both actions are simulated from the same state (the environment is cloned) and both
//! transitions are stored: the TDQN trick, exact here because an action does not move prices.
use std::ops::Range;

use flag_trading::env::tdqn::TdqnConfig;
use flag_trading::env::{StepOutcome, TdqnAction, TdqnEnv};
use flag_trading::metrics;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::Device;

use crate::agent::{Agent, Backend, Transition};
use crate::config::DdqnConfig;
use crate::features::{Bars, Coefficients, FeatureMatrix};

/// One ticker prepared for training: raw bars (executions), filtered bars (training
/// environment) and the feature matrix, with the split ranges as row indices.
#[derive(Debug, Clone)]
pub struct TickerData {
    pub ticker: String,
    pub bars: Bars,
    pub filtered: Bars,
    pub features: FeatureMatrix,
    pub train: Range<usize>,
    pub test: Range<usize>,
}

impl TickerData {
    /// `bars` may start before the train split (earlier rows feed the first windows) and
    /// must not extend past what the caller allows the agent to see. `extra[t]` holds the
    /// per-day extra features (same length for every row) or is None.
    pub fn new(
        ticker: &str,
        bars: Bars,
        train: Range<usize>,
        test: Range<usize>,
        cfg: &DdqnConfig,
        extra: Option<&[Vec<f64>]>,
    ) -> Result<TickerData, String> {
        let filtered = bars.low_pass(cfg.filter_order);
        let coef = Coefficients::fit(&filtered, train.clone());
        let features = FeatureMatrix::build(&filtered, &coef, cfg.window, extra);
        let lo = train.start.max(features.first_valid);
        if train.end < lo + 2 {
            return Err(format!(
                "ticker {ticker}: the train split has {} rows from row {}; the agent needs a {}-day \
                 window plus at least 2 trading days",
                train.len(),
                train.start + 1,
                cfg.window
            ));
        }
        Ok(TickerData {
            ticker: ticker.to_string(),
            bars,
            filtered,
            features,
            train,
            test,
        })
    }
}

/// One row of the training curve.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CurvePoint {
    pub episode: usize,
    /// Environment steps in this episode.
    pub steps: usize,
    /// Gradient steps since the start of the run.
    pub learn_steps: u64,
    pub epsilon: f64,
    /// Mean Huber loss over the episode's gradient steps (NaN when none).
    pub mean_loss: f64,
    pub train_return: f64,
    pub train_sharpe: f64,
    pub test_return: f64,
    pub test_sharpe: f64,
}

/// The greedy policy's path on one split: one outcome per day of the split.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitPath {
    pub split: &'static str,
    pub dates: Vec<i32>,
    pub prices: Vec<f64>,
    pub steps: Vec<StepOutcome>,
}

impl SplitPath {
    pub fn total_return(&self, initial: f64) -> f64 {
        self.steps.last().map_or(0.0, |s| s.value / initial - 1.0)
    }

    pub fn sharpe(&self, periods_per_year: f64) -> f64 {
        let r: Vec<f64> = self.steps.iter().map(|s| s.daily_return).collect();
        metrics::sharpe(&r, periods_per_year)
    }
}

/// Everything a run produces.
pub struct RunOutput {
    pub agent: Agent,
    pub curve: Vec<CurvePoint>,
    /// Train then test path of the final policy.
    pub paths: [SplitPath; 2],
}

fn env_config(cfg: &DdqnConfig) -> TdqnConfig {
    TdqnConfig {
        initial_capital: cfg.initial_capital,
        cost: cfg.cost,
        epsilon: cfg.short_epsilon,
    }
}

fn tdqn_action(a: u8) -> TdqnAction {
    if a == 1 {
        TdqnAction::Long
    } else {
        TdqnAction::Short
    }
}

fn position_of(a: u8) -> f32 {
    if a == 1 { 1.0 } else { -1.0 }
}

/// Trains a fresh agent for `cfg.episodes` episodes; after each episode the greedy policy is
/// evaluated on both splits for the curve. `on_episode(done, total)` reports progress.
pub fn train_run(
    cfg: &DdqnConfig,
    data: &TickerData,
    seed: u64,
    device: Device,
    periods_per_year: f64,
    on_episode: &dyn Fn(usize, usize),
) -> Result<RunOutput, tch::TchError> {
    let backend = Backend::for_device(device);
    train_run_on(cfg, data, seed, backend, periods_per_year, on_episode)
}

/// [`train_run`] on a chosen backend (tests compare the CPU network's levels).
pub fn train_run_on(
    cfg: &DdqnConfig,
    data: &TickerData,
    seed: u64,
    backend: Backend,
    periods_per_year: f64,
    on_episode: &dyn Fn(usize, usize),
) -> Result<RunOutput, tch::TchError> {
    let rng = ChaCha8Rng::seed_from_u64(seed);
    let mut agent = Agent::on(*cfg, &data.features, backend, rng)?;
    let mut curve = Vec::with_capacity(cfg.episodes);
    let mut last = None;
    for episode in 0..cfg.episodes {
        let (steps, mean_loss) = train_episode(&mut agent, data);
        let paths = [
            evaluate(&agent, data, "train"),
            evaluate(&agent, data, "test"),
        ];
        curve.push(CurvePoint {
            episode: episode + 1,
            steps,
            learn_steps: agent.learn_steps,
            epsilon: cfg.epsilon_at(agent.iterations),
            mean_loss,
            train_return: paths[0].total_return(cfg.initial_capital),
            train_sharpe: paths[0].sharpe(periods_per_year),
            test_return: paths[1].total_return(cfg.initial_capital),
            test_sharpe: paths[1].sharpe(periods_per_year),
        });
        last = Some(paths);
        on_episode(episode + 1, cfg.episodes);
    }
    let paths = last.unwrap_or_else(|| {
        [
            evaluate(&agent, data, "train"),
            evaluate(&agent, data, "test"),
        ]
    });
    Ok(RunOutput {
        agent,
        curve,
        paths,
    })
}

/// One episode on the filtered training data from a random start; returns the number of
/// environment steps and the mean loss.
pub fn train_episode(agent: &mut Agent, data: &TickerData) -> (usize, f64) {
    let cfg = agent.cfg;
    let lo = data.train.start.max(data.features.first_valid);
    let hi = data.train.end - 1;
    let start = agent.rng.random_range(lo..hi);
    let close = &data.filtered.close;
    let mut env = TdqnEnv::new(env_config(&cfg));
    let mut value_cash_pos = (cfg.initial_capital, 0.0);
    let (mut position, mut previous) = (0f32, 0u8);
    let (mut loss_sum, mut losses) = (0.0, 0usize);
    for (k, t) in (start..hi).enumerate() {
        let action = agent.act(t, position, previous);
        let (p, p1) = (close[t], close[t + 1]);
        let pre = value_cash_pos.0 + value_cash_pos.1 * p;
        let done = t + 1 == hi;
        let mut after = None;
        for a in [action, 1 - action] {
            let mut e = env.clone();
            let o1 = e.step(p, Some(tdqn_action(a)));
            let mut next = e.clone();
            let o2 = next.step(p1, None);
            let reward = if pre > 0.0 { o2.value / pre - 1.0 } else { 0.0 };
            agent.replay.push(Transition {
                t: t as u32,
                position,
                action: a,
                reward: reward.clamp(-cfg.reward_clip, cfg.reward_clip) as f32,
                next_position: position_of(a),
                done,
            });
            if after.is_none() {
                after = Some((e, o1.cash, o1.position));
            }
        }
        if let Some((e, cash, pos)) = after {
            env = e;
            value_cash_pos = (cash, pos);
        }
        if (k as u64 + 1).is_multiple_of(cfg.learning_update_period)
            && let Some(l) = agent.learn()
        {
            loss_sum += l;
            losses += 1;
        }
        position = position_of(action);
        previous = action;
    }
    let mean = if losses > 0 {
        loss_sum / losses as f64
    } else {
        f64::NAN
    };
    (hi - start, mean)
}

/// The greedy policy on split `split` ("train" or "test"), trading the raw closes from fresh
/// capital; days without a full observation window keep the agent flat (HOLD).
pub fn evaluate(agent: &Agent, data: &TickerData, split: &'static str) -> SplitPath {
    let range = if split == "train" {
        data.train.clone()
    } else {
        data.test.clone()
    };
    let first = range.start.max(data.features.first_valid);
    // Q-values for the first decision (flat) and for every later day from both positions,
    // in one batched pass: evaluation mode makes each row independent of the others.
    let mut ts = Vec::new();
    let mut pos = Vec::new();
    if first < range.end {
        ts.push(first as i64);
        pos.push(0.0);
        for t in first + 1..range.end {
            ts.extend([t as i64, t as i64]);
            pos.extend([-1.0, 1.0]);
        }
    }
    let mut q = Vec::with_capacity(ts.len());
    for (a, b) in ts.chunks(4096).zip(pos.chunks(4096)) {
        q.extend(agent.q_values(a, b));
    }
    let mut env = TdqnEnv::new(env_config(&agent.cfg));
    let mut side = None;
    let mut steps = Vec::with_capacity(range.len());
    for t in range.clone() {
        let action = if t < first {
            None
        } else {
            let qi = if t == first {
                0
            } else {
                1 + 2 * (t - first - 1) + usize::from(side == Some(1))
            };
            Some(Agent::greedy(q[qi]))
        };
        steps.push(env.step(data.bars.close[t], action.map(tdqn_action)));
        if action.is_some() {
            side = action;
        }
    }
    SplitPath {
        split,
        dates: data.bars.dates[range.clone()].to_vec(),
        prices: data.bars.close[range].to_vec(),
        steps,
    }
}
