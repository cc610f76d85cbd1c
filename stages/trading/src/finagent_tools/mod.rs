//! FinAgent's four rule-strategy "tools" (Zhang et al., KDD 2024, "A Multimodal Foundation
//! Agent for Financial Trading"), as the authors' released code defines them
//! (github.com/DVampire/FinAgent @ 17248a0): `finagent/tools/strategy_agents.py` (the rules),
//! `finagent/environment/trading.py` (how a signal trades), `finagent/metrics/metrics.py`
//! (ARR, SR, MDD), `finagent/prompt/helper.py::prepared_tools_params` (what the decision
//! module is shown) and the records in `res/strategy_record/trading/<asset>/<n>/exp001/`.
//! Written from those definitions, not translated from their code.
//!
//! # What the rule sees
//!
//! FinAgent calls a rule once per trading day `t` on the environment's state: the bars of
//! days `t-14..=t` (`look_back_days = 14`, so 15 rows; fewer at the start of the data), and
//! uses the signal of the last row. Every indicator is recomputed on that window (the EMAs
//! start at its first close), so a signal on day `t` depends on the 15 bars up to `t` only.
//! (The state also holds the next 14 days, for the reflection modules; `prepared_tools_params`
//! drops them before calling the rules, so the tools do not look ahead.)
//!
//! # The rules (all on the window; "cross" compares the last two rows of the window)
//!
//! | tool | indicators | BUY | SELL | warm-up (HOLD) |
//! |---|---|---|---|---|
//! | `macd` | `MACD = EMA_s(close) - EMA_14(close)`, `signal = EMA_9(MACD)`, pandas `ewm(span, adjust=False)`; `s = short_window` (code default 7) | `MACD_t > sig_t` and `MACD_{t-1} < sig_{t-1}` | `MACD_t < sig_t` and `MACD_{t-1} > sig_{t-1}` | first row |
//! | `kdj_rsi` | `RSV = (close - LLV_il(low)) / (HHV_il(high) - LLV_il(low)) * 100`, `K = SMA_is(RSV)`, `D = SMA_is(K)`, `J = 3K - 2D`; RSI(14) of the `ta` package (Wilder, `ewm(alpha=1/14, adjust=False, min_periods=14)`); `il = ilong` 9, `is = isig` 3 | `J_t > D_t`, `J_{t-1} < D_{t-1}` and `RSI_t < rsiOversold` (40) | `J_t < D_t`, `J_{t-1} > D_{t-1}` and `RSI_t > rsiOverbought` (60) | rows `< max(il, is, 14)` |
//! | `stochastic_bollinger` | `%K = 100 (close - LLV_14(low)) / (HHV_14(high) - LLV_14(low))`; bands `SMA_14(close) ± std_dev * STD_14(close)` (sample std) | `%K < oversold` (20) and `close < lower` | `%K > overbought` (80) and `close > upper` | rows `< 14` |
//! | `mean_reversion` | `z = (close - SMA_14(close)) / STD_14(close)` (sample std) | `z < -z_score_threshold` (1.0) | `z > z_score_threshold` | rows `< 14` |
//!
//! Every comparison involving an undefined value (NaN: division by a zero range, a short
//! window) is false, so the rule says HOLD, as in pandas. The fixed windows (MACD 14/9, RSI
//! 14, stochastic and Bollinger 14, z-score 14) are constants of the code; the tunable
//! parameters keep FinAgent's names (`short_window`, `ilong`, `isig`, `rsiOverbought`,
//! `rsiOversold`, `std_dev`, `overbought`, `oversold`, `z_score_threshold`) so the released
//! `best_params.json` files can be given as they are. KDJ & RSI and Stochastic + Bollinger
//! read `high` and `low`; MACD and mean reversion read `close` only.
//!
//! # Running a rule (the position rule)
//!
//! The environment starts with cash (FinAgent: 10,000) and no shares. On each day `t` of the
//! window it executes that day's signal at the price `p_t`, the adjusted close where the bars
//! have one and the close otherwise (FinAgent's rules read `close`, `high`, `low`, its
//! environment trades `adj_close`; for auto-adjusted sources such as our yfinance files the
//! two are the same series): BUY spends the cash on
//! `floor(cash / p / (1 + c))` *whole* shares paying cost `c` (0.1 %) on the notional, SELL
//! sells every share for `(1 - c)` of the notional, HOLD does nothing (long-only, all-in, a
//! BUY while invested or a SELL while flat changes nothing). The day's return is
//! `r_t = V_t / V_{t-1} - 1`, `V = cash + shares * p_t`, `V_{-1}` the initial capital, so
//! `r_0` carries the first trade's cost. Buy-and-hold is BUY on the first day, HOLD after.
//! The whole shares differ from this crate's FinAgent environment (`env::finagent`,
//! fractional shares); they are what FinAgent's records were computed with.
//!
//! FinAgent's environment runs from the first day `>= start_date` to the day before the last
//! day `<= end_date` (the bar at `end_date` is the terminal state, never traded): its
//! train run `2022-06-01`..`2023-06-01` trades the 251 days 2022-06-01..2023-05-31, which is
//! this module's inclusive window `train_start..=train_end` = 2022-06-01..=2023-05-31.
//!
//! # The record (FinAgent's `metrics.py`; fractions, as FinAgent stores them)
//!
//! On the `N` daily returns of the window:
//!
//! * `ARR = (prod(1 + r_t) - 1) / N * C`, `C = 252` (a simple, not compounded,
//!   annualisation; FinAgent uses 252 for ETH as well, this stage's `periods_per_year`).
//! * `SR = mean(r) * sqrt(N) / std(r)`, `std` the population std: annualised with `sqrt(N)`,
//!   the number of days in the window, not `sqrt(C)` (the same for a 252-day window; a
//!   365-day crypto window gets `sqrt(365)`). 0 when `std` is 0.
//! * `MDD = max_t (P_t - W_t) / P_t`, `W_t = prod_{s<=t}(1 + r_s)`, `P_t = max_{s<=t} W_s`
//!   with the peak starting at `W_0` (after the first day), not at 1.
//! * `VOL = std(r)` (per day), kept because it pins the return series down.
//!
//! Code vs paper: this crate's `metrics` module has the paper's definitions (§5.2, as the
//! rest of the project reports them: `SR = E[r] / σ[r] × sqrt(C)`, MDD from the initial
//! capital). FinAgent's code differs in three ways: ARR is the simple `total / N × 252`,
//! SR scales by `sqrt(N)` instead of `sqrt(C)`, and the MDD peak starts after the first day.
//! The records here follow the code, since they are what its decision prompt shows.
//!
//! # What FinAgent shows, and which parameters
//!
//! The decision prompt shows each tool's last signal and the tool's record next to
//! buy-and-hold's. In the released code, `prepared_tools_params` reads the records from
//! `.../trained/best_result.json` (computed with `trained/best_params.json`, per asset) but
//! then recomputes the signal with the code defaults (a second `wrapper(n, data)` call
//! overwrites the tuned one). The `.../default/best_result.json` records correspond to the
//! code defaults for KDJ & RSI, Stochastic + Bollinger and mean reversion, and to MACD with
//! `short_window = 5` (not the code's 7).
//!
//! # Prices
//!
//! FinAgent's rules read FMP's `close`, `high`, `low` (split-adjusted, not dividend-adjusted)
//! while its environment trades `adj_close`; [`Bars`] keeps the two apart (`close` for the
//! rules, `adj_close` for the trades). It matters: on dividend-adjusted closes a dividend
//! step inside the 15-bar window moves near-ties, and AAPL's MACD and mean-reversion and
//! MSFT's tuned KDJ & RSI records miss FinAgent's by 1.5 to 2.7 pp of ARR; on un-adjusted
//! closes AAPL's match and MSFT's comes within 0.55 pp (`tests/finagent_tools.rs`: 48 of
//! the 50 stock records within 0.5 pp). Auto-adjusted bars (the `yfinance` ingest, whose
//! `adj_close` is null) give the rules dividend-adjusted closes: a known, small deviation
//! for dividend payers.

pub mod params;
pub mod record;
pub mod rules;

pub use params::{ParamOverrides, ToolParams};
pub use record::{Record, Step};
pub use rules::Window;

/// FinAgent's `look_back_days`: the window is this many days before `t`, plus `t`.
pub const LOOK_BACK_DAYS: usize = 14;

/// One of FinAgent's four rule strategies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tool {
    Macd,
    KdjRsi,
    StochasticBollinger,
    MeanReversion,
}

impl Tool {
    /// In FinAgent's numbering (strategies 1..4).
    pub const ALL: [Tool; 4] = [
        Tool::Macd,
        Tool::KdjRsi,
        Tool::StochasticBollinger,
        Tool::MeanReversion,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Tool::Macd => "macd",
            Tool::KdjRsi => "kdj_rsi",
            Tool::StochasticBollinger => "stochastic_bollinger",
            Tool::MeanReversion => "mean_reversion",
        }
    }

    pub fn parse(s: &str) -> Option<Tool> {
        Tool::ALL.into_iter().find(|t| t.name() == s)
    }

    /// Whether the rule reads `high` and `low`.
    pub fn needs_high_low(self) -> bool {
        matches!(self, Tool::KdjRsi | Tool::StochasticBollinger)
    }

    /// FinAgent's strategy number (1..4; buy-and-hold is 0).
    pub fn number(self) -> usize {
        match self {
            Tool::Macd => 1,
            Tool::KdjRsi => 2,
            Tool::StochasticBollinger => 3,
            Tool::MeanReversion => 4,
        }
    }
}

/// A rule's output for one day, as FinAgent spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolSignal {
    Buy,
    Sell,
    Hold,
}

impl ToolSignal {
    pub fn as_str(self) -> &'static str {
        match self {
            ToolSignal::Buy => "BUY",
            ToolSignal::Sell => "SELL",
            ToolSignal::Hold => "HOLD",
        }
    }
}

/// The indicator values a rule used on one day (None: not used by the rule, or undefined).
/// `*_prev` are the previous row of the same window (what a cross compares with).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Indicators {
    pub close: Option<f64>,
    pub macd: Option<f64>,
    pub macd_signal: Option<f64>,
    pub macd_prev: Option<f64>,
    pub macd_signal_prev: Option<f64>,
    pub k: Option<f64>,
    pub d: Option<f64>,
    pub j: Option<f64>,
    pub d_prev: Option<f64>,
    pub j_prev: Option<f64>,
    pub rsi: Option<f64>,
    pub stochastic: Option<f64>,
    pub bb_lower: Option<f64>,
    pub bb_upper: Option<f64>,
    pub z_score: Option<f64>,
}

impl Indicators {
    /// Turns NaN and infinities into None.
    pub fn finite(self) -> Self {
        let f = |x: Option<f64>| x.filter(|v| v.is_finite());
        Indicators {
            close: f(self.close),
            macd: f(self.macd),
            macd_signal: f(self.macd_signal),
            macd_prev: f(self.macd_prev),
            macd_signal_prev: f(self.macd_signal_prev),
            k: f(self.k),
            d: f(self.d),
            j: f(self.j),
            d_prev: f(self.d_prev),
            j_prev: f(self.j_prev),
            rsi: f(self.rsi),
            stochastic: f(self.stochastic),
            bb_lower: f(self.bb_lower),
            bb_upper: f(self.bb_upper),
            z_score: f(self.z_score),
        }
    }

    /// (column name, value) in the `finagent_tool_signals` schema's order.
    pub fn columns(&self) -> [(&'static str, Option<f64>); 14] {
        [
            ("macd", self.macd),
            ("macd_signal", self.macd_signal),
            ("macd_prev", self.macd_prev),
            ("macd_signal_prev", self.macd_signal_prev),
            ("k", self.k),
            ("d", self.d),
            ("j", self.j),
            ("d_prev", self.d_prev),
            ("j_prev", self.j_prev),
            ("rsi", self.rsi),
            ("stochastic", self.stochastic),
            ("bb_lower", self.bb_lower),
            ("bb_upper", self.bb_upper),
            ("z_score", self.z_score),
        ]
    }
}

/// One ticker's daily bars, oldest first. `high`/`low` may hold None (close-only sources);
/// a rule that reads one on a day it is None fails with [`MissingBar`]. `adj_close` (may be
/// empty or hold None) is the price the environment trades at where present.
#[derive(Debug, Clone, Default)]
pub struct Bars {
    pub close: Vec<f64>,
    pub high: Vec<Option<f64>>,
    pub low: Vec<Option<f64>>,
    pub adj_close: Vec<Option<f64>>,
}

impl Bars {
    /// The prices trades execute at on the rows `rows`: `adj_close` where the row has a
    /// finite, positive one, else `close` (FinAgent's rules read `close`; its environment
    /// values and trades at `adj_close`).
    pub fn trade_prices(&self, rows: std::ops::Range<usize>) -> Vec<f64> {
        rows.map(|r| {
            self.adj_close
                .get(r)
                .copied()
                .flatten()
                .filter(|p| p.is_finite() && *p > 0.0)
                .unwrap_or(self.close[r])
        })
        .collect()
    }
}

/// A rule needed `column` on row `row` (0-based, of [`Bars`]) and it was null.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissingBar {
    pub column: &'static str,
    pub row: usize,
}

/// The rows `t` sees: `t - look_back ..= t`.
pub fn window_rows(t: usize, look_back: usize) -> std::ops::Range<usize> {
    t.saturating_sub(look_back)..t + 1
}

/// `tool`'s signal and indicators on day `t`, from the bars `t - look_back ..= t` only.
pub fn signal_on(
    tool: Tool,
    p: &ToolParams,
    bars: &Bars,
    t: usize,
    look_back: usize,
) -> Result<(ToolSignal, Indicators), MissingBar> {
    let rows = window_rows(t, look_back);
    let close = &bars.close[rows.clone()];
    let (mut high, mut low) = (Vec::new(), Vec::new());
    if tool.needs_high_low() {
        for (column, src, dst) in [
            ("high", &bars.high, &mut high),
            ("low", &bars.low, &mut low),
        ] {
            for r in rows.clone() {
                match src.get(r).copied().flatten() {
                    Some(x) => dst.push(x),
                    None => return Err(MissingBar { column, row: r }),
                }
            }
        }
    }
    Ok(rules::evaluate(
        tool,
        p,
        &Window {
            close,
            high: &high,
            low: &low,
        },
    ))
}

/// `tool`'s signals on the days `days` (each from its own window).
pub fn signals(
    tool: Tool,
    p: &ToolParams,
    bars: &Bars,
    days: std::ops::Range<usize>,
    look_back: usize,
) -> Result<Vec<(ToolSignal, Indicators)>, MissingBar> {
    days.map(|t| signal_on(tool, p, bars, t, look_back))
        .collect()
}

/// A tool's (or buy-and-hold's, `tool = None`) path and record over the days `days`.
#[derive(Debug, Clone)]
pub struct ToolRun {
    pub tool: Option<Tool>,
    pub steps: Vec<Step>,
    pub record: Record,
}

/// Settings of a run: FinAgent's environment and annualisation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunSettings {
    pub initial_capital: f64,
    pub cost: f64,
    pub periods_per_year: f64,
    pub look_back: usize,
}

impl Default for RunSettings {
    /// FinAgent's: 10,000 cash, 0.1 % cost, 252, 14 days back.
    fn default() -> Self {
        RunSettings {
            initial_capital: 10_000.0,
            cost: 0.001,
            periods_per_year: 252.0,
            look_back: LOOK_BACK_DAYS,
        }
    }
}

/// Runs `tool` (None: buy-and-hold) on the days `days` from fresh capital, trading at
/// [`Bars::trade_prices`], and computes its record.
pub fn run_tool(
    tool: Option<Tool>,
    p: &ToolParams,
    bars: &Bars,
    days: std::ops::Range<usize>,
    s: &RunSettings,
) -> Result<ToolRun, MissingBar> {
    let sig: Vec<ToolSignal> = match tool {
        Some(t) => signals(t, p, bars, days.clone(), s.look_back)?
            .into_iter()
            .map(|x| x.0)
            .collect(),
        None => record::buy_and_hold(days.len()),
    };
    let steps = record::run(&bars.trade_prices(days), &sig, s.initial_capital, s.cost);
    let returns: Vec<f64> = steps.iter().map(|x| x.ret).collect();
    Ok(ToolRun {
        tool,
        record: record::record(&returns, s.periods_per_year),
        steps,
    })
}
