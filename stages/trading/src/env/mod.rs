//! Trading environments: the rules that turn a daily action into fills, cash and value.
//!
//! The environments trade one asset at the close (FLAG-Trader's is FinAgent's with action
//! masks and a Sharpe-change reward): an action decided at the close of day t
//! (from data dated <= t) executes at the close price of day t. Each [`StepOutcome`] is the
//! state after that execution, valued at the same close.

pub mod finagent;
pub mod flag_trader;
pub mod tdqn;

pub use finagent::{FinAgentAction, FinAgentEnv};
pub use flag_trader::{FLAG_ACTIONS, FlagTraderEnv};
pub use tdqn::{TdqnAction, TdqnEnv};

/// Direction of an executed order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TradeSide {
    Buy,
    Sell,
}

impl TradeSide {
    pub fn as_str(self) -> &'static str {
        match self {
            TradeSide::Buy => "BUY",
            TradeSide::Sell => "SELL",
        }
    }
}

/// One executed order (all legs of one day's order are merged: shares > 0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fill {
    pub side: TradeSide,
    pub shares: f64,
    pub price: f64,
    /// Transaction cost paid, in currency units.
    pub cost: f64,
}

/// The portfolio after one day's action.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutcome {
    /// The action in effect this day (LONG/SHORT/HOLD for TDQN, BUY/SELL/HOLD for FinAgent).
    pub action: &'static str,
    /// Shares held after the action (negative = short).
    pub position: f64,
    pub cash: f64,
    /// cash + position * price.
    pub value: f64,
    /// value / previous value - 1; the first step compares with the initial capital.
    /// This is the RL reward of both environments.
    pub daily_return: f64,
    pub fill: Option<Fill>,
    /// TDQN only: part of a short position was bought back by the cash constraint.
    pub forced_cover: bool,
}

/// Return from `prev` to `value`; 0 when `prev` is 0 (a ruined portfolio earns nothing).
pub(crate) fn simple_return(prev: f64, value: f64) -> f64 {
    if prev == 0.0 { 0.0 } else { value / prev - 1.0 }
}
