//! Running a rule's signals through FinAgent's trading environment, and the record (ARR, SR,
//! MDD, VOL) as FinAgent's code computes it. Formulas: module doc of [`super`].

use super::ToolSignal;

/// The portfolio at the close of one day, after that day's signal was executed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    pub signal: ToolSignal,
    /// Whole shares held after the trade.
    pub shares: f64,
    pub cash: f64,
    /// `cash + shares * price`.
    pub value: f64,
    /// `value_t / value_{t-1} - 1`, the first day against the initial capital.
    pub ret: f64,
    /// Shares changed hands today.
    pub traded: bool,
}

/// Executes `signals[t]` at `prices[t]` from `initial` cash, as FinAgent's
/// `EnvironmentTrading.step` does: BUY spends the cash on `floor(cash / p / (1 + c))` whole
/// shares paying `c` on the notional; SELL sells every share receiving `(1 - c)` of the
/// notional; HOLD (and a BUY that affords no share, or a SELL with none) changes nothing.
/// Prices must be finite and > 0 (the caller validates its data).
pub fn run(prices: &[f64], signals: &[ToolSignal], initial: f64, cost: f64) -> Vec<Step> {
    let (mut cash, mut shares, mut value) = (initial, 0.0_f64, initial);
    prices
        .iter()
        .zip(signals)
        .map(|(&p, &signal)| {
            let pre = value;
            let mut traded = false;
            match signal {
                ToolSignal::Buy => {
                    let n = (cash / p / (1.0 + cost)).floor();
                    if n > 0.0 {
                        cash -= n * p * (1.0 + cost);
                        shares += n;
                        traded = true;
                    }
                }
                ToolSignal::Sell => {
                    if shares > 0.0 {
                        cash += shares * p * (1.0 - cost);
                        shares = 0.0;
                        traded = true;
                    }
                }
                ToolSignal::Hold => {}
            }
            value = cash + shares * p;
            Step {
                signal,
                shares,
                cash,
                value,
                ret: if pre == 0.0 { 0.0 } else { (value - pre) / pre },
                traded,
            }
        })
        .collect()
}

/// Buy-and-hold's signals: BUY on the first day, HOLD after.
pub fn buy_and_hold(days: usize) -> Vec<ToolSignal> {
    (0..days)
        .map(|i| {
            if i == 0 {
                ToolSignal::Buy
            } else {
                ToolSignal::Hold
            }
        })
        .collect()
}

/// A rule's record over `N` daily returns, with FinAgent's formulas (fractions, not %).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Record {
    /// `N`.
    pub days: usize,
    /// `(prod(1 + r) - 1) / N * C`.
    pub arr: f64,
    /// `mean(r) * sqrt(N) / std(r)` (population std; 0 when std is 0).
    pub sr: f64,
    /// Running-peak drawdown of `prod_{s<=t}(1 + r_s)`, the peak starting at the first day's
    /// value (not at 1).
    pub mdd: f64,
    /// `std(r)` (population, per day: not annualised).
    pub vol: f64,
    /// `prod(1 + r) - 1`.
    pub total_return: f64,
}

/// The record of `returns` (FinAgent's `finagent/metrics/metrics.py`); `periods_per_year` is
/// `C` in ARR (FinAgent: 252 for every asset, crypto included).
pub fn record(returns: &[f64], periods_per_year: f64) -> Record {
    let n = returns.len();
    if n == 0 {
        return Record {
            days: 0,
            arr: 0.0,
            sr: 0.0,
            mdd: 0.0,
            vol: 0.0,
            total_return: 0.0,
        };
    }
    let nf = n as f64;
    let mut wealth = Vec::with_capacity(n);
    let mut w = 1.0_f64;
    for r in returns {
        w *= 1.0 + r;
        wealth.push(w);
    }
    let total = w - 1.0;
    let mean = returns.iter().sum::<f64>() / nf;
    let vol = (returns.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / nf).sqrt();
    let sr = if vol > 0.0 && vol.is_finite() {
        mean * nf.sqrt() / vol
    } else {
        0.0
    };
    let mut peak = wealth[0];
    let mut mdd = 0.0_f64;
    for &v in &wealth {
        peak = peak.max(v);
        if peak > 0.0 {
            mdd = mdd.max((peak - v) / peak);
        }
    }
    Record {
        days: n,
        arr: total / nf * periods_per_year,
        sr,
        mdd,
        vol,
        total_return: total,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ToolSignal::{Buy, Hold, Sell};

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn whole_shares_costs_and_returns() {
        // 1000 / 30 / 1.001 = 33.30 -> 33 shares, cash 1000 - 33 * 30 * 1.001 = 9.01.
        let s = run(
            &[30.0, 33.0, 33.0, 30.0, 30.0],
            &[Buy, Buy, Sell, Sell, Hold],
            1000.0,
            0.001,
        );
        assert!(close(s[0].shares, 33.0) && close(s[0].cash, 9.01) && s[0].traded);
        assert!(close(s[0].value, 999.01) && close(s[0].ret, -0.00099));
        // 9.01 buys no share at 33: nothing happens, the value follows the price.
        assert!(!s[1].traded && close(s[1].value, 9.01 + 33.0 * 33.0));
        // SELL all at 33: 9.01 + 1089 * 0.999 = 1096.921.
        assert!(s[2].traded && close(s[2].shares, 0.0) && close(s[2].cash, 1096.921));
        // No shares left: SELL and HOLD change nothing, return 0.
        assert!(!s[3].traded && s[3].ret == 0.0 && s[4].ret == 0.0);
        assert_eq!(buy_and_hold(3), vec![Buy, Hold, Hold]);
    }

    #[test]
    fn record_by_hand() {
        // r = 0.1, -0.1, 0.2: wealth 1.1, 0.99, 1.188; total 0.188; ARR 0.188 / 3 * 252.
        // mean 0.0666..., population std sqrt(((1/30)^2 + (1/6)^2 + (2/15)^2) / 3).
        // MDD from the first day's 1.1 to 0.99 = 0.1.
        let r = record(&[0.1, -0.1, 0.2], 252.0);
        assert_eq!(r.days, 3);
        assert!(close(r.total_return, 0.188));
        assert!(close(r.arr, 0.188 / 3.0 * 252.0));
        let sd = (((1.0f64 / 30.0).powi(2) + (1.0f64 / 6.0).powi(2) + (2.0f64 / 15.0).powi(2))
            / 3.0)
            .sqrt();
        assert!(close(r.vol, sd));
        assert!(close(r.sr, (0.2 / 3.0) * 3f64.sqrt() / sd));
        assert!(close(r.mdd, 0.1));
        // The peak starts at the first day's wealth, not at 1: a first-day loss is no
        // drawdown.
        let r = record(&[-0.5, 0.1], 252.0);
        assert!(close(r.mdd, 0.0));
        // No variation: SR 0 (numpy would give nan).
        assert_eq!(record(&[0.0, 0.0], 365.0).sr, 0.0);
        assert_eq!(record(&[], 252.0).days, 0);
    }
}
