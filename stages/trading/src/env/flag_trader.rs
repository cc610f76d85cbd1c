//! The FLAG-Trader environment (Xiong et al. 2025): the FinAgent dynamics (one asset, all-in
//! BUY / all-out SELL / HOLD at the close, long only, proportional cost; the paper has no
//! cost, so its default here is 0) with
//!
//! * **action masks**: SELL is invalid with no shares, BUY with no cash (all in already);
//!   HOLD is always valid. The policy only samples valid actions.
//! * **reward** = SR_t - SR_{t-1}: the change of the Sharpe ratio of the daily P&L so far,
//!   SR_t = mean(pnl_1..t) / std(pnl_1..t) with the sample std, 0 while undefined (fewer
//!   than two days, or no variation). pnl_t = v_t - v_{t-1}, v_0 the initial capital.
//!   Not annualised: a constant factor would only scale the rewards.
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

    /// Executes `action` at the close `price`; returns the day's outcome and reward. An
    /// invalid action is an error (the caller masks), never a silent HOLD.
    pub fn step(
        &mut self,
        price: f64,
        action: FinAgentAction,
    ) -> Result<(StepOutcome, f64), String> {
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
        self.pnl.push(out.value - self.value);
        self.cash = out.cash;
        self.shares = out.position;
        self.value = out.value;
        let sharpe = running_sharpe(&self.pnl);
        let reward = sharpe - self.sharpe;
        self.sharpe = sharpe;
        Ok((out, reward))
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
        // Buy 100 shares at 10; P&L 0 on day one: SR undefined, reward 0.
        let (o, r) = e.step(10.0, FinAgentAction::Buy).unwrap();
        assert_eq!((o.position, o.cash, r), (100.0, 0.0, 0.0));
        assert_eq!(e.mask(), [true, true, false]);
        assert!(
            e.step(10.0, FinAgentAction::Buy).is_err(),
            "no cash left to buy with"
        );
        // P&L 0, 100: SR = 50 / 70.71; then 0, 100, 100; then a sale at 9 (P&L -300).
        let want = [
            (11.0, FinAgentAction::Hold, 0.7071067811865475),
            (12.0, FinAgentAction::Hold, 0.4475937571927042),
            (9.0, FinAgentAction::Sell, -1.2867681743280952),
        ];
        for (price, action, reward) in want {
            let (_, r) = e.step(price, action).unwrap();
            close(r, reward);
        }
        close(e.sharpe(), -0.13206763594884358);
        assert_eq!((e.value(), e.shares()), (900.0, 0.0));
        assert_eq!(e.mask(), [false, true, true]);
        assert!(
            e.step(9.0, FinAgentAction::Sell).is_err(),
            "no shares to sell"
        );
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
        let (o, _) = e.step(10.0, FinAgentAction::Buy).unwrap();
        close(o.position, 100.0);
        close(o.value, 1000.0);
    }
}
