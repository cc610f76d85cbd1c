//! Baseline strategies: the one place their rules are written down.
//!
//! Every rule is evaluated at the close of day t from data dated <= t (indicator columns of
//! the `indicators` table, or closes for the moving averages) and yields a *target*: long,
//! short, or none (no opinion: warm-up, missing indicator, no trigger). A strategy emits a
//! [`Signal`] only when its target differs from the last one it emitted; otherwise it
//! keeps its position. The environments then read the signal: TDQN maps Long/Short to
//! LONG/SHORT and keeps its position on Keep; FinAgent maps Long/Short/Keep to
//! BUY/SELL/HOLD (so "short" means "be in cash" there).
//!
//! | name | target on day t |
//! |---|---|
//! | `buy_and_hold` | long from the first day |
//! | `sell_and_hold` | short from the first day (FinAgent: stays in cash) |
//! | `ma_trend_following` | TDQN's MATF: long if `SMA_s(close) >= SMA_l(close)`, else short |
//! | `ma_mean_reversion` | TDQN's MAMR: long if `SMA_s(close) <= SMA_l(close)`, else short |
//! | `macd_crossover` | long if `macd >= macd_signal`, else short (the sign of the crossover) |
//! | `kdj_rsi` | long on a K-over-D cross (`K_{t-1} <= D_{t-1}`, `K_t > D_t`) with `rsi_14 < 50`; short on a K-under-D cross with `rsi_14 > 50` |
//! | `zscore_mean_reversion` | long if `zscore_20 < -1`, short if `zscore_20 > 1` |
//! | `stochastic_bollinger` | long if `close < bb_lower` and `kdj_k < 20`; short if `close > bb_upper` and `kdj_k > 80` |
//!
//! The moving-average windows `s < l` are grid-searched on the train split (best train
//! Sharpe ratio, first in (s, l) order on ties) and reused unchanged on the test split.
use std::ops::Range;

use crate::series::Series;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Strategy {
    BuyAndHold,
    SellAndHold,
    MaTrendFollowing,
    MaMeanReversion,
    MacdCrossover,
    KdjRsi,
    ZscoreMeanReversion,
    StochasticBollinger,
}

/// What a strategy says on one day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Long,
    Short,
    Keep,
}

/// Moving-average windows of the TDQN MA strategies (`short < long`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaWindows {
    pub short: usize,
    pub long: usize,
}

impl Strategy {
    pub const ALL: [Strategy; 8] = [
        Strategy::BuyAndHold,
        Strategy::SellAndHold,
        Strategy::MaTrendFollowing,
        Strategy::MaMeanReversion,
        Strategy::MacdCrossover,
        Strategy::KdjRsi,
        Strategy::ZscoreMeanReversion,
        Strategy::StochasticBollinger,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::BuyAndHold => "buy_and_hold",
            Strategy::SellAndHold => "sell_and_hold",
            Strategy::MaTrendFollowing => "ma_trend_following",
            Strategy::MaMeanReversion => "ma_mean_reversion",
            Strategy::MacdCrossover => "macd_crossover",
            Strategy::KdjRsi => "kdj_rsi",
            Strategy::ZscoreMeanReversion => "zscore_mean_reversion",
            Strategy::StochasticBollinger => "stochastic_bollinger",
        }
    }

    pub fn parse(name: &str) -> Option<Strategy> {
        Strategy::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Indicator columns (besides `close`) the rule reads.
    pub fn columns(self) -> &'static [&'static str] {
        match self {
            Strategy::MacdCrossover => &["macd", "macd_signal"],
            Strategy::KdjRsi => &["kdj_k", "kdj_d", "rsi_14"],
            Strategy::ZscoreMeanReversion => &["zscore_20"],
            Strategy::StochasticBollinger => &["kdj_k", "bb_lower", "bb_upper"],
            _ => &[],
        }
    }

    /// True for the strategies whose windows are grid-searched.
    pub fn uses_ma_windows(self) -> bool {
        matches!(self, Strategy::MaTrendFollowing | Strategy::MaMeanReversion)
    }
}

/// Prefix sums of the closes, so any simple moving average is O(1).
#[derive(Debug, Clone)]
pub struct CloseSums(Vec<f64>);

impl CloseSums {
    pub fn new(close: &[f64]) -> Self {
        let mut s = Vec::with_capacity(close.len() + 1);
        s.push(0.0);
        for c in close {
            s.push(s.last().copied().unwrap_or(0.0) + c);
        }
        CloseSums(s)
    }

    /// Mean of the `w` closes ending at row `i` (None before `w` rows exist).
    pub fn sma(&self, w: usize, i: usize) -> Option<f64> {
        (w > 0 && i + 1 >= w).then(|| (self.0[i + 1] - self.0[i + 1 - w]) / w as f64)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Long,
    Short,
}

fn side(long: bool) -> Side {
    if long { Side::Long } else { Side::Short }
}

/// Target of `strategy` on row `i` of `s` (only rows <= i are read).
fn target(
    strategy: Strategy,
    s: &Series,
    sums: &CloseSums,
    windows: Option<MaWindows>,
    i: usize,
) -> Option<Side> {
    let g = |name: &str, j: usize| s.get(name, j);
    match strategy {
        Strategy::BuyAndHold => Some(Side::Long),
        Strategy::SellAndHold => Some(Side::Short),
        Strategy::MaTrendFollowing | Strategy::MaMeanReversion => {
            let w = windows?;
            let (short, long) = (sums.sma(w.short, i)?, sums.sma(w.long, i)?);
            Some(side(if strategy == Strategy::MaTrendFollowing {
                short >= long
            } else {
                short <= long
            }))
        }
        Strategy::MacdCrossover => Some(side(g("macd", i)? >= g("macd_signal", i)?)),
        Strategy::KdjRsi => {
            let j = i.checked_sub(1)?;
            let (k0, d0, k1, d1) = (
                g("kdj_k", j)?,
                g("kdj_d", j)?,
                g("kdj_k", i)?,
                g("kdj_d", i)?,
            );
            let rsi = g("rsi_14", i)?;
            if k0 <= d0 && k1 > d1 && rsi < 50.0 {
                Some(Side::Long)
            } else if k0 >= d0 && k1 < d1 && rsi > 50.0 {
                Some(Side::Short)
            } else {
                None
            }
        }
        Strategy::ZscoreMeanReversion => {
            let z = g("zscore_20", i)?;
            (z.abs() > 1.0).then(|| side(z < -1.0))
        }
        Strategy::StochasticBollinger => {
            let (c, k) = (s.close[i], g("kdj_k", i)?);
            if c < g("bb_lower", i)? && k < 20.0 {
                Some(Side::Long)
            } else if c > g("bb_upper", i)? && k > 80.0 {
                Some(Side::Short)
            } else {
                None
            }
        }
    }
}

/// Signals of `strategy` for the rows in `range` (see the module doc). Indicators on the
/// first rows of a range may use earlier rows: that is past data, not look-ahead.
pub fn signals(
    strategy: Strategy,
    s: &Series,
    sums: &CloseSums,
    windows: Option<MaWindows>,
    range: Range<usize>,
) -> Vec<Signal> {
    let mut last: Option<Side> = None;
    range
        .map(|i| match target(strategy, s, sums, windows, i) {
            Some(t) if last != Some(t) => {
                last = Some(t);
                match t {
                    Side::Long => Signal::Long,
                    Side::Short => Signal::Short,
                }
            }
            _ => Signal::Keep,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn series(close: &[f64], cols: &[(&str, Vec<Option<f64>>)]) -> Series {
        Series {
            ticker: "T".into(),
            dates: (0..close.len() as i32).collect(),
            close: close.to_vec(),
            cols: cols
                .iter()
                .map(|(n, v)| (n.to_string(), v.clone()))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    use Signal::{Keep as K, Long as L, Short as S};

    #[test]
    fn moving_average_rules_and_warm_up() {
        let close = [1.0, 2.0, 3.0, 2.0, 1.0, 1.0];
        let s = series(&close, &[]);
        let sums = CloseSums::new(&close);
        assert_eq!(sums.sma(2, 2), Some(2.5));
        assert_eq!(sums.sma(3, 1), None);
        let w = Some(MaWindows { short: 1, long: 3 });
        // SMA3 from row 2: 2, 7/3, 2, 4/3; close 3, 2, 1, 1 -> TF: L, S, S, S.
        let tf = signals(Strategy::MaTrendFollowing, &s, &sums, w, 0..6);
        assert_eq!(tf, vec![K, K, L, S, K, K]);
        let mr = signals(Strategy::MaMeanReversion, &s, &sums, w, 0..6);
        assert_eq!(mr, vec![K, K, S, L, K, K]);
        // A later range starts from its own first target, using earlier rows for the SMA.
        let tf = signals(Strategy::MaTrendFollowing, &s, &sums, w, 3..6);
        assert_eq!(tf, vec![S, K, K]);
    }

    #[test]
    fn indicator_rules() {
        let close = [10.0, 10.0, 10.0, 10.0];
        let some = |v: &[f64]| v.iter().map(|&x| Some(x)).collect::<Vec<_>>();
        let s = series(
            &close,
            &[
                ("macd", vec![None, Some(1.0), Some(-1.0), Some(2.0)]),
                ("macd_signal", some(&[0.0, 0.0, 0.0, 0.0])),
                ("kdj_k", some(&[10.0, 30.0, 90.0, 70.0])),
                ("kdj_d", some(&[20.0, 20.0, 80.0, 80.0])),
                ("rsi_14", some(&[40.0, 40.0, 60.0, 60.0])),
                ("zscore_20", vec![Some(-1.5), Some(-0.5), Some(1.2), None]),
                ("bb_lower", some(&[11.0, 11.0, 9.0, 9.0])),
                ("bb_upper", some(&[12.0, 12.0, 9.5, 9.5])),
            ],
        );
        let sums = CloseSums::new(&close);
        let run = |st| signals(st, &s, &sums, None, 0..4);
        assert_eq!(run(Strategy::MacdCrossover), vec![K, L, S, L]);
        // K crosses over D on row 1 (RSI 40 < 50); K stays above D on row 2; crosses under
        // on row 3 with RSI 60 > 50.
        assert_eq!(run(Strategy::KdjRsi), vec![K, L, K, S]);
        assert_eq!(run(Strategy::ZscoreMeanReversion), vec![L, K, S, K]);
        // close 10 < bb_lower 11 with K 10 < 20 -> long; K 30 is not oversold; close above
        // bb_upper with K 90 > 80 -> short; then K 70 is not overbought.
        assert_eq!(run(Strategy::StochasticBollinger), vec![L, K, S, K]);
        assert_eq!(run(Strategy::BuyAndHold), vec![L, K, K, K]);
        assert_eq!(run(Strategy::SellAndHold), vec![S, K, K, K]);
    }
}
