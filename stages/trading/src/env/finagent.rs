//! The FinAgent trading environment (Zhang et al. 2024): one asset, actions BUY / SELL /
//! HOLD, all-in and long-only.
//!
//! * **BUY** converts all cash into shares at the close `p`: `cash / (p (1 + c))` shares
//!   (fractional), paying `c` on the traded notional. A BUY with no cash does nothing.
//! * **SELL** converts all shares into cash: `shares * p (1 - c)`. A SELL with no shares does
//!   nothing (there is no shorting).
//! * **HOLD** changes nothing.
//! * Reward = daily portfolio return `v_t / v_{t-1} - 1`, `v = cash + shares * p`.
use super::{Fill, StepOutcome, TradeSide, simple_return};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinAgentAction {
    Buy,
    Sell,
    Hold,
}

impl FinAgentAction {
    pub fn as_str(self) -> &'static str {
        match self {
            FinAgentAction::Buy => "BUY",
            FinAgentAction::Sell => "SELL",
            FinAgentAction::Hold => "HOLD",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FinAgentConfig {
    pub initial_capital: f64,
    /// Proportional transaction cost (0.001 = 0.1 %).
    pub cost: f64,
}

impl Default for FinAgentConfig {
    fn default() -> Self {
        FinAgentConfig {
            initial_capital: 100_000.0,
            cost: 0.001,
        }
    }
}

#[derive(Debug, Clone)]
pub struct FinAgentEnv {
    cfg: FinAgentConfig,
    cash: f64,
    shares: f64,
    value: f64,
}

impl FinAgentEnv {
    pub fn new(cfg: FinAgentConfig) -> Self {
        FinAgentEnv {
            cfg,
            cash: cfg.initial_capital,
            shares: 0.0,
            value: cfg.initial_capital,
        }
    }

    /// An environment continuing from `(cash, shares, value)`: the state an earlier segment of
    /// the same run ended in (so chained segments equal one run).
    pub fn resume(cfg: FinAgentConfig, cash: f64, shares: f64, value: f64) -> Self {
        FinAgentEnv {
            cfg,
            cash,
            shares,
            value,
        }
    }

    /// (cash, shares, value at the last close).
    pub fn state(&self) -> (f64, f64, f64) {
        (self.cash, self.shares, self.value)
    }

    /// Executes `action` at the close `price` (finite, > 0: the caller validates its data).
    pub fn step(&mut self, price: f64, action: FinAgentAction) -> StepOutcome {
        let c = self.cfg.cost;
        let fill = match action {
            FinAgentAction::Buy if self.cash > 0.0 => {
                let n = self.cash / (price * (1.0 + c));
                self.shares += n;
                self.cash = 0.0;
                Some(Fill {
                    side: TradeSide::Buy,
                    shares: n,
                    price,
                    cost: n * price * c,
                })
            }
            FinAgentAction::Sell if self.shares > 0.0 => {
                let n = self.shares;
                self.cash += n * price * (1.0 - c);
                self.shares = 0.0;
                Some(Fill {
                    side: TradeSide::Sell,
                    shares: n,
                    price,
                    cost: n * price * c,
                })
            }
            _ => None,
        };
        let value = self.cash + self.shares * price;
        let daily_return = simple_return(self.value, value);
        self.value = value;
        StepOutcome {
            action: action.as_str(),
            position: self.shares,
            cash: self.cash,
            value,
            daily_return,
            fill,
            forced_cover: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn all_in_buy_hold_sell() {
        let mut e = FinAgentEnv::new(FinAgentConfig {
            initial_capital: 1001.0,
            cost: 0.001,
        });
        // 1001 / (10 * 1.001) = 100 shares, cost 100 * 10 * 0.001 = 1.
        let s = e.step(10.0, FinAgentAction::Buy);
        assert!(close(s.position, 100.0) && close(s.cash, 0.0) && close(s.value, 1000.0));
        assert!(close(s.daily_return, 1000.0 / 1001.0 - 1.0));
        assert!(close(s.fill.unwrap().cost, 1.0));
        // A second BUY has no cash to spend.
        let s = e.step(12.0, FinAgentAction::Buy);
        assert_eq!(s.fill, None);
        assert!(close(s.value, 1200.0) && close(s.daily_return, 0.2));
        let s = e.step(12.0, FinAgentAction::Hold);
        assert_eq!((s.action, s.fill), ("HOLD", None));
        // SELL 100 at 11: cash 1100 * 0.999 = 1098.9.
        let s = e.step(11.0, FinAgentAction::Sell);
        let f = s.fill.unwrap();
        assert_eq!(f.side, TradeSide::Sell);
        assert!(close(f.shares, 100.0) && close(f.cost, 1.1));
        assert!(close(s.cash, 1098.9) && close(s.position, 0.0) && close(s.value, 1098.9));
        // No shorting: SELL with no shares is a no-op.
        let s = e.step(5.0, FinAgentAction::Sell);
        assert_eq!(s.fill, None);
        assert!(close(s.value, 1098.9) && s.daily_return == 0.0);
    }
}
