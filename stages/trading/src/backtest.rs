//! Runs a strategy's signals through an environment, and the train-split grid search of
//! the moving-average windows.
use std::ops::Range;

use crate::env::finagent::FinAgentConfig;
use crate::env::tdqn::TdqnConfig;
use crate::env::{FinAgentAction, FinAgentEnv, StepOutcome, TdqnAction, TdqnEnv};
use crate::metrics;
use crate::series::Series;
use crate::strategy::{CloseSums, MaWindows, Signal, Strategy, signals};

/// Which environment's rules to trade under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvKind {
    Tdqn,
    FinAgent,
}

impl EnvKind {
    pub fn name(self) -> &'static str {
        match self {
            EnvKind::Tdqn => "tdqn",
            EnvKind::FinAgent => "finagent",
        }
    }

    pub fn parse(s: &str) -> Option<EnvKind> {
        match s {
            "tdqn" => Some(EnvKind::Tdqn),
            "finagent" => Some(EnvKind::FinAgent),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EnvSettings {
    pub kind: EnvKind,
    pub initial_capital: f64,
    pub cost: f64,
    /// TDQN short-exposure ε (unused by FinAgent).
    pub epsilon: f64,
}

/// Trades `signals` at `prices` from fresh capital; one outcome per day.
pub fn simulate(env: &EnvSettings, prices: &[f64], signals: &[Signal]) -> Vec<StepOutcome> {
    match env.kind {
        EnvKind::Tdqn => {
            let mut e = TdqnEnv::new(TdqnConfig {
                initial_capital: env.initial_capital,
                cost: env.cost,
                epsilon: env.epsilon,
            });
            prices
                .iter()
                .zip(signals)
                .map(|(&p, s)| {
                    let a = match s {
                        Signal::Long => Some(TdqnAction::Long),
                        Signal::Short => Some(TdqnAction::Short),
                        Signal::Keep => None,
                    };
                    e.step(p, a)
                })
                .collect()
        }
        EnvKind::FinAgent => {
            let mut e = FinAgentEnv::new(FinAgentConfig {
                initial_capital: env.initial_capital,
                cost: env.cost,
            });
            prices
                .iter()
                .zip(signals)
                .map(|(&p, s)| {
                    let a = match s {
                        Signal::Long => FinAgentAction::Buy,
                        Signal::Short => FinAgentAction::Sell,
                        Signal::Keep => FinAgentAction::Hold,
                    };
                    e.step(p, a)
                })
                .collect()
        }
    }
}

/// Runs `strategy` on the rows `range` of `s`.
pub fn run(
    env: &EnvSettings,
    strategy: Strategy,
    s: &Series,
    sums: &CloseSums,
    windows: Option<MaWindows>,
    range: Range<usize>,
) -> Vec<StepOutcome> {
    let sig = signals(strategy, s, sums, windows, range.clone());
    simulate(env, &s.close[range], &sig)
}

/// The grid search's choice.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GridChoice {
    pub windows: MaWindows,
    /// Annualised Sharpe ratio of the chosen windows on the train split.
    pub train_sharpe: f64,
    /// Number of (short, long) pairs evaluated.
    pub candidates: usize,
}

/// Every pair `short < long` from `windows`, in ascending (short, long) order.
pub fn window_pairs(windows: &[usize]) -> Vec<MaWindows> {
    let mut w: Vec<usize> = windows.iter().copied().filter(|&x| x > 0).collect();
    w.sort_unstable();
    w.dedup();
    let mut out = Vec::new();
    for (i, &short) in w.iter().enumerate() {
        for &long in &w[i + 1..] {
            out.push(MaWindows { short, long });
        }
    }
    out
}

/// Picks the pair with the best Sharpe ratio on the train rows `train` (strictly better
/// replaces, so ties keep the first pair in order). None when there is no pair.
pub fn grid_search(
    env: &EnvSettings,
    strategy: Strategy,
    s: &Series,
    sums: &CloseSums,
    pairs: &[MaWindows],
    train: Range<usize>,
    periods_per_year: f64,
) -> Option<GridChoice> {
    let mut best: Option<GridChoice> = None;
    for &w in pairs {
        let out = run(env, strategy, s, sums, Some(w), train.clone());
        let returns: Vec<f64> = out.iter().map(|o| o.daily_return).collect();
        let sr = metrics::sharpe(&returns, periods_per_year);
        if best.is_none_or(|b| sr > b.train_sharpe) {
            best = Some(GridChoice {
                windows: w,
                train_sharpe: sr,
                candidates: pairs.len(),
            });
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_ordered_and_unique() {
        let p = window_pairs(&[10, 5, 5, 20, 0]);
        let got: Vec<(usize, usize)> = p.iter().map(|w| (w.short, w.long)).collect();
        assert_eq!(got, vec![(5, 10), (5, 20), (10, 20)]);
    }

    #[test]
    fn grid_search_prefers_the_profitable_pair() {
        // A rising then falling path: trend following with (1, 2) follows each turn one day
        // late; it must score at least as well as any other pair it is compared with, and
        // the choice must be reproducible.
        let close: Vec<f64> = (0..60)
            .map(|i| {
                if i < 30 {
                    100.0 + i as f64
                } else {
                    160.0 - i as f64
                }
            })
            .collect();
        let s = Series {
            ticker: "T".into(),
            dates: (0..60).collect(),
            close: close.clone(),
            cols: Default::default(),
        };
        let sums = CloseSums::new(&close);
        let env = EnvSettings {
            kind: EnvKind::Tdqn,
            initial_capital: 100_000.0,
            cost: 0.001,
            epsilon: 0.1,
        };
        let pairs = window_pairs(&[1, 2, 5, 10]);
        let a = grid_search(
            &env,
            Strategy::MaTrendFollowing,
            &s,
            &sums,
            &pairs,
            0..60,
            252.0,
        )
        .unwrap();
        let b = grid_search(
            &env,
            Strategy::MaTrendFollowing,
            &s,
            &sums,
            &pairs,
            0..60,
            252.0,
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.candidates, 6);
        for &w in &pairs {
            let out = run(&env, Strategy::MaTrendFollowing, &s, &sums, Some(w), 0..60);
            let r: Vec<f64> = out.iter().map(|o| o.daily_return).collect();
            assert!(metrics::sharpe(&r, 252.0) <= a.train_sharpe);
        }
        assert!(a.train_sharpe > 0.0);
    }
}
