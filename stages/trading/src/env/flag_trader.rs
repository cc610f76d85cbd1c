//! The FLAG-Trader environment (Xiong et al. 2025): the FinAgent dynamics (one asset, all-in
//! BUY / all-out SELL / HOLD at the close, long only, proportional cost; the paper has no
//! cost, so its default here is 0) with
//!
//! * **action masks**: SELL is invalid with no shares, BUY with no cash (all in already);
//!   HOLD is always valid. The policy only samples valid actions.
//! * **reward** = SR_t - SR_{t-1}: the change of the Sharpe ratio of the daily P&L so far,
//!   SR_t = mean(pnl_1..t) / std(pnl_1..t) with the sample std, 0 while undefined (fewer
//!   than two days, or no variation). Not annualised: a constant factor would only scale
//!   the rewards.
//! * **timing**: the action decided at the close of day t executes at that close, and its
//!   reward is known at the close of day t+1: pnl_t = (value at close t+1 before its own
//!   trade) - (value at close t before the trade) = shares_t (p_{t+1} - p_t) - cost_t. So each
//!   decision is credited with exactly the P&L it caused (its position's move and its own
//!   cost), and the P&L of a whole path sums to its final minus initial value.
use super::StepOutcome;
use super::finagent::{FinAgentAction, FinAgentConfig, FinAgentEnv};

/// Policy index order of the actions: 0 SELL, 1 HOLD, 2 BUY.
pub const FLAG_ACTIONS: [FinAgentAction; 3] = [
    FinAgentAction::Sell,
    FinAgentAction::Hold,
    FinAgentAction::Buy,
];

#[derive(Debug, Clone)]
pub struct FlagTraderEnv {
    inner: FinAgentEnv,
    cash: f64,
    shares: f64,
    value: f64,
    pnl: Vec<f64>,
    sharpe: f64,
}

impl FlagTraderEnv {
    pub fn new(initial_capital: f64, cost: f64) -> Self {
        FlagTraderEnv {
            inner: FinAgentEnv::new(FinAgentConfig {
                initial_capital,
                cost,
            }),
            cash: initial_capital,
            shares: 0.0,
            value: initial_capital,
            pnl: Vec::new(),
            sharpe: 0.0,
        }
    }

    /// Valid actions in [`FLAG_ACTIONS`] order: [SELL, HOLD, BUY].
    pub fn mask(&self) -> [bool; 3] {
        [self.shares > 0.0, true, self.cash > 0.0]
    }

    pub fn cash(&self) -> f64 {
        self.cash
    }

    pub fn shares(&self) -> f64 {
        self.shares
    }

    pub fn value(&self) -> f64 {
        self.value
    }

    /// The Sharpe ratio of the daily P&L so far (0 while undefined).
    pub fn sharpe(&self) -> f64 {
        self.sharpe
    }

    /// Executes `action` at the close `price` of day t and marks the portfolio at the next
    /// close `next_price`; returns the day's outcome (valued at `price`, as an equity row)
    /// and the reward. An invalid action is an error (the caller masks), never a silent HOLD.
    pub fn step(
        &mut self,
        price: f64,
        action: FinAgentAction,
        next_price: f64,
    ) -> Result<(StepOutcome, f64), String> {
        let before = self.cash + self.shares * price;
        let out = self.trade(price, action)?;
        self.pnl.push(self.cash + self.shares * next_price - before);
        let sharpe = running_sharpe(&self.pnl);
        let reward = sharpe - self.sharpe;
        self.sharpe = sharpe;
        Ok((out, reward))
    }

    /// Executes `action` at `price` with no next close to mark against (the last day of a
    /// path): no P&L is recorded and there is no reward.
    pub fn trade(&mut self, price: f64, action: FinAgentAction) -> Result<StepOutcome, String> {
        let index = FLAG_ACTIONS.iter().position(|&a| a == action).unwrap_or(1);
        if !self.mask()[index] {
            return Err(format!(
                "{} is not a valid action with cash {} and {} shares",
                action.as_str(),
                self.cash,
                self.shares
            ));
        }
        let out = self.inner.step(price, action);
        self.cash = out.cash;
        self.shares = out.position;
        self.value = out.value;
        Ok(out)
    }

    /// The per-decision P&L recorded so far.
    pub fn pnl(&self) -> &[f64] {
        &self.pnl
    }
}

/// mean / sample std of `pnl`; 0 with fewer than two values or no variation.
pub fn running_sharpe(pnl: &[f64]) -> f64 {
    let n = pnl.len();
    if n < 2 {
        return 0.0;
    }
    let mean = pnl.iter().sum::<f64>() / n as f64;
    let var = pnl.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1) as f64;
    if var <= 0.0 {
        return 0.0;
    }
    mean / var.sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }

    #[test]
    fn rewards_are_sharpe_changes_and_masks_follow_the_position() {
        let mut e = FlagTraderEnv::new(1000.0, 0.0);
        assert_eq!(e.mask(), [false, true, true]);
        // Buy 100 shares at 10, next close 10: P&L 0; one day, SR undefined, reward 0.
        let (o, r) = e.step(10.0, FinAgentAction::Buy, 10.0).unwrap();
        assert_eq!((o.position, o.cash, o.value, r), (100.0, 0.0, 1000.0, 0.0));
        assert_eq!(e.mask(), [true, true, false]);
        assert!(
            e.step(10.0, FinAgentAction::Buy, 10.0).is_err(),
            "no cash left to buy with"
        );
        // P&L 0, then +100 (10 -> 11): SR = 50 / 70.71; then +100 (11 -> 12); then a sale at
        // 12 (the P&L of a flat position is 0 whatever the next close).
        let want = [
            (10.0, FinAgentAction::Hold, 11.0, 0.7071067811865475),
            (11.0, FinAgentAction::Hold, 12.0, 0.4475937571927042),
            (12.0, FinAgentAction::Sell, 9.0, -0.288675134594813),
        ];
        for (price, action, next, reward) in want {
            let (_, r) = e.step(price, action, next).unwrap();
            close(r, reward);
        }
        assert_eq!(e.pnl(), &[0.0, 100.0, 100.0, 0.0]);
        close(e.sharpe(), 0.8660254037844387);
        assert_eq!((e.value(), e.shares()), (1200.0, 0.0));
        assert_eq!(e.mask(), [false, true, true]);
        assert!(
            e.step(9.0, FinAgentAction::Sell, 9.0).is_err(),
            "no shares to sell"
        );
        // The last day trades without a mark: no P&L, no reward.
        let o = e.trade(9.0, FinAgentAction::Buy).unwrap();
        assert!(o.fill.is_some());
        assert_eq!(e.pnl().len(), 4);
    }

    #[test]
    fn sharpe_is_zero_while_undefined() {
        assert_eq!(running_sharpe(&[]), 0.0);
        assert_eq!(running_sharpe(&[5.0]), 0.0);
        assert_eq!(running_sharpe(&[3.0, 3.0, 3.0]), 0.0);
    }

    #[test]
    fn a_cost_is_paid_on_each_trade() {
        let mut e = FlagTraderEnv::new(1001.0, 0.001);
        let (o, _) = e.step(10.0, FinAgentAction::Buy, 10.0).unwrap();
        close(o.position, 100.0);
        close(o.value, 1000.0);
        // The decision is charged its own cost: P&L = 100 * (10 - 10) - 1.
        close(e.pnl()[0], -1.0);
    }
}
