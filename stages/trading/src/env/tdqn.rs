//! The TDQN trading environment of Théate & Ernst (2021), "An application of deep
//! reinforcement learning to algorithmic trading", Expert Systems with Applications 173,
//! §3.3 (action space) and the authors' reference `tradingEnv.py` (`step`,
//! `computeLowerBound`), which fixes the details the text leaves open.
//!
//! Rules, with `p` the close of day t, `c` the transaction cost rate, `cash` the cash before
//! the action:
//! * **LONG** when not long: buy back any short position (`m` shares at `p(1 + c)` each),
//!   then buy `n = floor(cash / (p (1 + c)))` shares at `p(1 + c)` each.
//! * **SHORT** when not short: sell any long position (`m` shares at `p(1 - c)` each), then
//!   short-sell `n = floor(cash / (p (1 + c)))` shares, receiving `p(1 - c)` each.
//! * The same action again keeps the position, except for the short-exposure constraint.
//! * **Short-exposure constraint** (the paper's lower bound `Q_t^-` on the number of shares
//!   traded): a short position must stay coverable after a relative price move of `epsilon`.
//!   With `v^c` the cash and `p'` the close of the previous step (both before today's
//!   action, as in `computeLowerBound(cash[t-1], -n, close[t-1])`),
//!   `Δ = -v^c + m p' (1 + ε)(1 + c)`; if `Δ >= 0` the bound is `Δ / (p' ε (1 + c))` and
//!   `min(floor(bound), m)` shares are bought back at `p(1 + c)` (a partial or total forced
//!   cover). If `Δ < 0` the bound is negative and nothing is forced. The constraint is
//!   checked on every day the position stays short (SHORT repeated, or no decision).
//! * Reward = daily portfolio return `v_t / v_{t-1} - 1`, with `v = cash + position * p`.
//!   (The reference code swaps in `(p_{t-1} - p_t) / p_{t-1}` as the reward on forced-cover
//!   days; we keep the portfolio return, as this project defines the reward, and flag those
//!   days with [`StepOutcome::forced_cover`].)
//!
//! Before the first decision the agent is flat (all cash), as the reference starts.
use super::{Fill, StepOutcome, TradeSide, simple_return};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TdqnAction {
    Long,
    Short,
}

impl TdqnAction {
    pub fn as_str(self) -> &'static str {
        match self {
            TdqnAction::Long => "LONG",
            TdqnAction::Short => "SHORT",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TdqnConfig {
    pub initial_capital: f64,
    /// Proportional transaction cost `c` (0.001 = 0.1 %).
    pub cost: f64,
    /// Relative price move a short position must survive (the paper's ε = 0.1).
    pub epsilon: f64,
}

impl Default for TdqnConfig {
    fn default() -> Self {
        TdqnConfig {
            initial_capital: 100_000.0,
            cost: 0.001,
            epsilon: 0.1,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TdqnEnv {
    cfg: TdqnConfig,
    cash: f64,
    /// Signed whole number of shares (negative = short).
    position: f64,
    side: Option<TdqnAction>,
    prev_price: Option<f64>,
    value: f64,
}

impl TdqnEnv {
    pub fn new(cfg: TdqnConfig) -> Self {
        TdqnEnv {
            cfg,
            cash: cfg.initial_capital,
            position: 0.0,
            side: None,
            prev_price: None,
            value: cfg.initial_capital,
        }
    }

    pub fn config(&self) -> &TdqnConfig {
        &self.cfg
    }

    /// Current side: None until the first decision.
    pub fn side(&self) -> Option<TdqnAction> {
        self.side
    }

    /// The paper's lower bound `Q_t^-` on today's trade for a short of `m` shares, from the
    /// cash and price before today's action.
    pub fn lower_bound(&self, cash: f64, short_shares: f64, prev_price: f64) -> f64 {
        let (c, eps) = (self.cfg.cost, self.cfg.epsilon);
        let delta = -cash + short_shares * prev_price * (1.0 + eps) * (1.0 + c);
        if delta < 0.0 {
            delta / (prev_price * (2.0 * c + eps * (1.0 + c)))
        } else {
            delta / (prev_price * eps * (1.0 + c))
        }
    }

    /// Executes `action` at the close `price` (`None`: no new decision, the position is kept).
    /// `price` must be finite and > 0 (the caller validates its data).
    pub fn step(&mut self, price: f64, action: Option<TdqnAction>) -> StepOutcome {
        let c = self.cfg.cost;
        let action = action.or(self.side);
        let mut bought = 0.0;
        let mut sold = 0.0;
        let mut forced_cover = false;
        match (self.side, action) {
            (_, None) => {}
            (Some(TdqnAction::Long), Some(TdqnAction::Long)) => {}
            (prev, Some(TdqnAction::Long)) => {
                if prev == Some(TdqnAction::Short) {
                    let m = -self.position;
                    self.cash -= m * price * (1.0 + c);
                    bought += m;
                }
                let n = (self.cash / (price * (1.0 + c))).floor().max(0.0);
                self.cash -= n * price * (1.0 + c);
                bought += n;
                self.position = n;
            }
            (Some(TdqnAction::Short), Some(TdqnAction::Short)) => {
                let m = -self.position;
                let prev_price = self.prev_price.unwrap_or(price);
                let bound = self.lower_bound(self.cash, m, prev_price);
                if bound > 0.0 {
                    let k = bound.floor().min(m);
                    if k > 0.0 {
                        self.cash -= k * price * (1.0 + c);
                        self.position += k;
                        bought += k;
                        forced_cover = true;
                    }
                }
            }
            (prev, Some(TdqnAction::Short)) => {
                if prev == Some(TdqnAction::Long) {
                    let m = self.position;
                    self.cash += m * price * (1.0 - c);
                    sold += m;
                }
                let n = (self.cash / (price * (1.0 + c))).floor().max(0.0);
                self.cash += n * price * (1.0 - c);
                sold += n;
                self.position = -n;
            }
        }
        self.side = action;
        self.prev_price = Some(price);
        let value = self.cash + self.position * price;
        let daily_return = simple_return(self.value, value);
        self.value = value;
        let shares = bought + sold;
        let fill = (shares > 0.0).then_some(Fill {
            side: if bought > 0.0 {
                TradeSide::Buy
            } else {
                TradeSide::Sell
            },
            shares,
            price,
            cost: shares * price * c,
        });
        StepOutcome {
            action: action.map_or("HOLD", TdqnAction::as_str),
            position: self.position,
            cash: self.cash,
            value,
            daily_return,
            fill,
            forced_cover,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> TdqnEnv {
        TdqnEnv::new(TdqnConfig {
            initial_capital: 1000.0,
            cost: 0.001,
            epsilon: 0.1,
        })
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn long_then_reverse_to_short() {
        let mut e = env();
        // floor(1000 / 10.01) = 99 shares; cash 1000 - 99 * 10.01 = 9.01.
        let s = e.step(10.0, Some(TdqnAction::Long));
        assert_eq!(s.action, "LONG");
        assert_eq!(s.position, 99.0);
        assert!(close(s.cash, 9.01));
        assert!(close(s.value, 999.01));
        assert!(close(s.daily_return, -0.00099));
        let f = s.fill.unwrap();
        assert_eq!((f.side, f.shares, f.price), (TradeSide::Buy, 99.0, 10.0));
        assert!(close(f.cost, 0.99));
        // Holding: no trade, value 9.01 + 99 * 11.
        let s = e.step(11.0, None);
        assert_eq!((s.action, s.fill), ("LONG", None));
        assert!(close(s.value, 1098.01));
        // Reverse at 12: sell 99 (cash 9.01 + 1186.812 = 1195.822), short floor(1195.822 /
        // 12.012) = 99 more (cash + 1186.812 = 2382.634); value 2382.634 - 99 * 12.
        let s = e.step(12.0, Some(TdqnAction::Short));
        assert_eq!(s.position, -99.0);
        assert!(close(s.cash, 2382.634));
        assert!(close(s.value, 1194.634));
        assert!(close(s.daily_return, 1194.634 / 1098.01 - 1.0));
        let f = s.fill.unwrap();
        assert_eq!((f.side, f.shares), (TradeSide::Sell, 198.0));
        assert!(close(f.cost, 2.376));
        // Back to long at 12: buy back 99 (cash 2382.634 - 1189.188 = 1193.446), then
        // floor(1193.446 / 12.012) = 99 shares (cash 4.258).
        let s = e.step(12.0, Some(TdqnAction::Long));
        assert_eq!(s.position, 99.0);
        assert!(close(s.cash, 4.258));
        assert_eq!(s.fill.unwrap().shares, 198.0);
    }

    #[test]
    fn short_exposure_constraint_forces_partial_cover() {
        let mut e = env();
        // Short from flat: 99 shares, cash 1000 + 99 * 9.99 = 1989.01.
        let s = e.step(10.0, Some(TdqnAction::Short));
        assert_eq!(s.position, -99.0);
        assert!(close(s.cash, 1989.01));
        // Bound from (cash 1989.01, p' = 10): Δ = -1989.01 + 99 * 10 * 1.1 * 1.001 < 0.
        let s = e.step(19.0, Some(TdqnAction::Short));
        assert!(!s.forced_cover);
        assert_eq!(s.position, -99.0);
        assert!(close(s.value, 1989.01 - 99.0 * 19.0));
        // From (1989.01, p' = 19): Δ = -1989.01 + 1881 * 1.1011 = 82.1591;
        // bound = 82.1591 / (19 * 0.1 * 1.001) = 43.198 -> buy back 43 at 20 * 1.001.
        assert!(close(e.lower_bound(1989.01, 99.0, 19.0), 82.1591 / 1.9019));
        let s = e.step(20.0, None);
        assert!(s.forced_cover);
        assert_eq!(s.action, "SHORT");
        assert_eq!(s.position, -56.0);
        assert!(close(s.cash, 1989.01 - 860.86));
        assert!(close(s.value, 1128.15 - 56.0 * 20.0));
        let f = s.fill.unwrap();
        assert_eq!((f.side, f.shares), (TradeSide::Buy, 43.0));
    }

    #[test]
    fn lower_bound_negative_branch_uses_two_costs() {
        let e = env();
        // Δ = -1000 + 10 * 10 * 1.1 * 1.001 = -889.89; / (10 * (0.002 + 0.1001)).
        assert!(close(e.lower_bound(1000.0, 10.0, 10.0), -889.89 / 1.021));
    }

    #[test]
    fn flat_until_first_decision() {
        let mut e = env();
        let s = e.step(10.0, None);
        assert_eq!(
            (s.action, s.position, s.value, s.fill),
            ("HOLD", 0.0, 1000.0, None)
        );
        assert_eq!(s.daily_return, 0.0);
    }
}
