//! The environment seam of the PPO loop, and FLAG-Trader's market environment.
//!
//! A [`PromptEnv`] shows the policy a text prompt and an action mask and answers an action
//! with a reward. Episodes auto-reset (as CleanRL's vector envs do): the step that ends one
//! returns `done` and the first observation of the next.
//!
//! [`FlagMarketEnv`] walks a range of trading days of one ticker: at each decision day t the
//! prompt shows the last `window` closes up to t, the portfolio and the last `history`
//! rewards, net values and actions; the action executes at the close of t and is rewarded
//! at the close of t+1 ([`FlagTraderEnv`]: change of the Sharpe ratio of the per-decision
//! P&L). An episode starts with the initial capital on the range's first day and ends after
//! the decision on the range's second-to-last day (whose reward needs the last close) or
//! after `max_episode_steps` decisions.

use std::ops::Range;
use std::sync::Arc;

use flag_trading::env::{FLAG_ACTIONS, FinAgentAction, FlagTraderEnv, StepOutcome};

use crate::prompt::{PromptText, StateTemplate, StateView};

/// Legible action names in policy order (0 Sell, 1 Hold, 2 Buy).
pub const ACTION_NAMES: [&str; 3] = ["Sell", "Hold", "Buy"];

/// What the policy sees.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub prompt: PromptText,
    /// Valid actions in policy order.
    pub mask: Vec<bool>,
    /// The decision day (date32), when the environment has dates.
    pub date: Option<i32>,
}

/// The answer to one action.
#[derive(Debug, Clone)]
pub struct Transition {
    pub reward: f64,
    /// The episode ended with this step; `next` is then the first observation of a new one.
    pub done: bool,
    pub next: Observation,
}

pub trait PromptEnv {
    fn n_actions(&self) -> usize;
    /// Starts a new episode.
    fn reset(&mut self) -> Result<Observation, String>;
    /// Applies `action` (an index into the policy's actions); an invalid one is an error.
    fn step(&mut self, action: usize) -> Result<Transition, String>;
}

/// One ticker's daily closes (ascending dates, all > 0).
#[derive(Debug, Clone)]
pub struct Closes {
    pub ticker: String,
    pub dates: Vec<i32>,
    pub closes: Vec<f64>,
}

/// Settings of the market environment.
#[derive(Debug, Clone, PartialEq)]
pub struct MarketEnvConfig {
    pub initial_capital: f64,
    /// Proportional cost per trade (the paper has none: default 0).
    pub cost: f64,
    /// Closes shown in the prompt (today's included).
    pub window: usize,
    /// Past rewards / net values / actions shown.
    pub history: usize,
    pub max_episode_steps: usize,
}

/// One day of a path: the decision, its outcome, and its reward (None on the last day,
/// which has no next close).
#[derive(Debug, Clone)]
pub struct PathDay {
    pub date: i32,
    pub price: f64,
    pub action: usize,
    pub outcome: StepOutcome,
    pub reward: Option<f64>,
}

pub struct FlagMarketEnv {
    data: Arc<Closes>,
    template: Arc<StateTemplate>,
    cfg: MarketEnvConfig,
    days: Range<usize>,
    t: usize,
    steps: usize,
    env: FlagTraderEnv,
    rewards: Vec<f64>,
    net_values: Vec<f64>,
    actions: Vec<&'static str>,
}

impl FlagMarketEnv {
    /// `days`: indices into `data` of the episode's days (at least two: one decision and the
    /// close that rewards it).
    pub fn new(
        data: Arc<Closes>,
        template: Arc<StateTemplate>,
        cfg: MarketEnvConfig,
        days: Range<usize>,
    ) -> Result<Self, String> {
        if days.len() < 2 || days.end > data.closes.len() {
            return Err(format!(
                "{}: the episode needs at least two days within the {} loaded, got {days:?}",
                data.ticker,
                data.closes.len()
            ));
        }
        if cfg.window == 0 || cfg.max_episode_steps == 0 {
            return Err("window and max_episode_steps must be at least 1".into());
        }
        if cfg.initial_capital.is_nan()
            || cfg.initial_capital <= 0.0
            || !(0.0..1.0).contains(&cfg.cost)
        {
            return Err("initial_capital must be > 0 and cost in [0, 1)".into());
        }
        let env = FlagTraderEnv::new(cfg.initial_capital, cfg.cost);
        Ok(FlagMarketEnv {
            t: days.start,
            data,
            template,
            cfg,
            days,
            steps: 0,
            env,
            rewards: Vec::new(),
            net_values: Vec::new(),
            actions: Vec::new(),
        })
    }

    fn tail<T>(v: &[T], n: usize) -> &[T] {
        &v[v.len().saturating_sub(n)..]
    }

    pub fn observe(&self) -> Observation {
        let mask = self.env.mask();
        let allowed: Vec<&str> = ACTION_NAMES
            .iter()
            .zip(mask)
            .filter(|(_, ok)| *ok)
            .map(|(n, _)| *n)
            .collect();
        let from = (self.t + 1).saturating_sub(self.cfg.window);
        let price = self.data.closes[self.t];
        let view = StateView {
            ticker: &self.data.ticker,
            closes: &self.data.closes[from..=self.t],
            cash: self.env.cash(),
            shares: self.env.shares(),
            total_value: self.env.cash() + self.env.shares() * price,
            last_rewards: Self::tail(&self.rewards, self.cfg.history),
            last_net_values: Self::tail(&self.net_values, self.cfg.history),
            last_actions: Self::tail(&self.actions, self.cfg.history),
            allowed: &allowed,
        };
        Observation {
            prompt: self.template.render(&view),
            mask: mask.to_vec(),
            date: Some(self.data.dates[self.t]),
        }
    }

    fn restart(&mut self) {
        self.t = self.days.start;
        self.steps = 0;
        self.env = FlagTraderEnv::new(self.cfg.initial_capital, self.cfg.cost);
        self.rewards.clear();
        self.net_values.clear();
        self.actions.clear();
    }

    /// Whether the current day is the range's last (no next close: [`Self::finish`] only).
    pub fn at_last_day(&self) -> bool {
        self.t + 1 == self.days.end
    }

    /// Executes `action` today and moves to the next day; returns the day and its reward.
    fn advance(&mut self, action: usize) -> Result<PathDay, String> {
        let a = *FLAG_ACTIONS
            .get(action)
            .ok_or_else(|| format!("action {action} is not one of 0..3"))?;
        let price = self.data.closes[self.t];
        let next = self.data.closes[self.t + 1];
        let (outcome, reward) = self.env.step(price, a, next)?;
        self.rewards.push(reward);
        self.net_values.push(outcome.value);
        self.actions.push(ACTION_NAMES[action]);
        let day = PathDay {
            date: self.data.dates[self.t],
            price,
            action,
            outcome,
            reward: Some(reward),
        };
        self.t += 1;
        self.steps += 1;
        Ok(day)
    }

    /// On the last day: executes `action` without a reward (an evaluation path's end).
    pub fn finish(&mut self, action: usize) -> Result<PathDay, String> {
        let a: FinAgentAction = *FLAG_ACTIONS
            .get(action)
            .ok_or_else(|| format!("action {action} is not one of 0..3"))?;
        let price = self.data.closes[self.t];
        let outcome = self.env.trade(price, a)?;
        Ok(PathDay {
            date: self.data.dates[self.t],
            price,
            action,
            outcome,
            reward: None,
        })
    }

    /// Steps without auto-reset (evaluation): the day taken, with its reward.
    pub fn step_path(&mut self, action: usize) -> Result<PathDay, String> {
        if self.at_last_day() {
            return Err("the path is at its last day; call finish".into());
        }
        self.advance(action)
    }
}

impl PromptEnv for FlagMarketEnv {
    fn n_actions(&self) -> usize {
        3
    }

    fn reset(&mut self) -> Result<Observation, String> {
        self.restart();
        Ok(self.observe())
    }

    fn step(&mut self, action: usize) -> Result<Transition, String> {
        let day = self.advance(action)?;
        let done = self.at_last_day() || self.steps >= self.cfg.max_episode_steps;
        if done {
            self.restart();
        }
        Ok(Transition {
            reward: day.reward.unwrap_or(0.0),
            done,
            next: self.observe(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(max_steps: usize) -> FlagMarketEnv {
        let data = Arc::new(Closes {
            ticker: "T".into(),
            dates: (0..6).collect(),
            closes: vec![10.0, 10.0, 11.0, 12.0, 9.0, 9.0],
        });
        let tpl = Arc::new(
            StateTemplate::parse("{{allowed}} {{state}}\n---assistant---\n>", "t").unwrap(),
        );
        let cfg = MarketEnvConfig {
            initial_capital: 1000.0,
            cost: 0.0,
            window: 2,
            history: 2,
            max_episode_steps: max_steps,
        };
        FlagMarketEnv::new(data, tpl, cfg, 1..6).unwrap()
    }

    #[test]
    fn walks_the_days_with_masks_rewards_and_auto_reset() {
        let mut e = env(65);
        let o = e.reset().unwrap();
        assert_eq!(o.mask, vec![false, true, true]);
        assert_eq!(o.date, Some(1));
        assert!(
            o.prompt
                .user
                .starts_with("\"Hold\", \"Buy\" {\"closes\":[10.0,10.0],\"cash\":1000.0")
        );
        assert!(e.step(0).is_err(), "SELL with no shares is invalid");
        // Buy at 10 (next 11): P&L +100; hold (11 -> 12): +100, no variation yet so SR 0;
        // hold (12 -> 9): -300; sell at 9: 0, and 9 is the last close.
        let t = e.step(2).unwrap();
        assert_eq!((t.reward, t.done), (0.0, false));
        assert_eq!(t.next.mask, vec![true, true, false]);
        assert!(t.next.prompt.user.contains("\"last_actions\":[\"Buy\"]"));
        let t = e.step(1).unwrap();
        assert_eq!(t.reward, 0.0);
        let t = e.step(1).unwrap();
        // SR of [100, 100, -300] = -33.33 / 230.94.
        assert!(
            (t.reward - -0.144_337_567_297_406_4).abs() < 1e-12,
            "{}",
            t.reward
        );
        assert!(!t.done);
        assert!(
            t.next
                .prompt
                .user
                .contains("\"last_actions\":[\"Hold\",\"Hold\"]")
        );
        let t = e.step(0).unwrap();
        assert!(
            t.done,
            "the decision before the last close ends the episode"
        );
        assert_eq!(t.next.date, Some(1), "auto-reset to the first day");
        assert_eq!(t.next.mask, vec![false, true, true]);
    }

    #[test]
    fn episodes_are_cut_at_max_episode_steps_and_paths_end_with_a_trade() {
        let mut e = env(2);
        e.reset().unwrap();
        assert!(!e.step(1).unwrap().done);
        assert!(e.step(1).unwrap().done);
        let mut p = env(65);
        p.reset().unwrap();
        let mut days = Vec::new();
        while !p.at_last_day() {
            days.push(
                p.step_path(2.min(if days.is_empty() { 2 } else { 1 }))
                    .unwrap(),
            );
        }
        days.push(p.finish(0).unwrap());
        assert_eq!(days.len(), 5);
        assert!(days.last().unwrap().reward.is_none());
        assert!(
            days.last().unwrap().outcome.fill.is_some(),
            "sold on the last day"
        );
        assert_eq!(days.last().unwrap().outcome.value, 900.0);
    }
}
