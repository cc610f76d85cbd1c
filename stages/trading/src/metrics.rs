//! Performance metrics, as FinAgent (Zhang et al. 2024, §5.2) defines them, with a risk-free
//! rate of 0. This module is the one place the formulas live.
//!
//! Inputs: the initial capital `V_0`, the portfolio values at the close of each of the `T`
//! evaluated days `V_1..V_T`, and `C` periods per year (252 for stocks, 365 for crypto).
//! Daily returns are `r_t = V_t / V_{t-1} - 1` for `t = 1..T` (so the first day's return
//! includes the cost of the first trade). `E[r]` is the mean of the `T` returns and `σ[r]`
//! their population standard deviation (divisor `T`).
//!
//! | metric | formula | unit |
//! |---|---|---|
//! | total return | `(V_T - V_0) / V_0` | % |
//! | P&L | `V_T - V_0` | currency |
//! | ARR (annual rate of return) | `(V_T - V_0) / V_0 × C / T` | % |
//! | SR (Sharpe ratio) | `E[r] / σ[r] × √C` | — |
//! | VOL (volatility) | `σ[r] × √C` | % |
//! | MDD (maximum drawdown) | `max_t (P_t - V_t) / P_t`, `P_t = max_{s<=t} V_s` (s from 0) | % |
//! | CR (Calmar ratio) | `ARR / MDD` | — |
//! | SoR (Sortino ratio) | `E[r] / DD × √C`, `DD = sqrt(1/T Σ_t min(r_t, 0)^2)` | — |
//!
//! `DD` is the downside deviation below a target return of 0. A ratio whose denominator is 0
//! (no variation, no losing day, no drawdown) is reported as 0, so tables stay numeric.

/// The metrics of one equity path.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Metrics {
    pub days: usize,
    pub arr: f64,
    pub sr: f64,
    pub cr: f64,
    pub sor: f64,
    pub mdd: f64,
    pub vol: f64,
    pub total_return: f64,
    pub pnl: f64,
}

/// Daily returns of `values` starting from `initial` (see the module doc).
pub fn daily_returns(initial: f64, values: &[f64]) -> Vec<f64> {
    let mut prev = initial;
    values
        .iter()
        .map(|&v| {
            let r = if prev == 0.0 { 0.0 } else { v / prev - 1.0 };
            prev = v;
            r
        })
        .collect()
}

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

fn ratio(num: f64, den: f64) -> f64 {
    if den == 0.0 || !den.is_finite() {
        0.0
    } else {
        num / den
    }
}

/// Population standard deviation.
pub fn std_dev(xs: &[f64]) -> f64 {
    let m = mean(xs);
    mean(&xs.iter().map(|x| (x - m).powi(2)).collect::<Vec<_>>()).sqrt()
}

/// Annualised Sharpe ratio of daily returns, `E[r] / σ[r] × √C` (0 when σ is 0).
pub fn sharpe(returns: &[f64], periods_per_year: f64) -> f64 {
    ratio(mean(returns), std_dev(returns)) * periods_per_year.sqrt()
}

/// Downside deviation below 0: `sqrt(1/T Σ min(r, 0)^2)`.
pub fn downside_deviation(returns: &[f64]) -> f64 {
    mean(
        &returns
            .iter()
            .map(|r| r.min(0.0).powi(2))
            .collect::<Vec<_>>(),
    )
    .sqrt()
}

/// Maximum drawdown as a fraction, the running peak starting at `initial`.
pub fn max_drawdown(initial: f64, values: &[f64]) -> f64 {
    let mut peak = initial;
    let mut mdd = 0.0_f64;
    for &v in values {
        peak = peak.max(v);
        if peak > 0.0 {
            mdd = mdd.max((peak - v) / peak);
        }
    }
    mdd
}

/// All metrics of one path (see the module doc for the formulas and units).
pub fn compute(initial: f64, values: &[f64], periods_per_year: f64) -> Metrics {
    let t = values.len();
    let returns = daily_returns(initial, values);
    let last = values.last().copied().unwrap_or(initial);
    let total = ratio(last - initial, initial);
    let arr = if t == 0 {
        0.0
    } else {
        total * periods_per_year / t as f64 * 100.0
    };
    let mdd = max_drawdown(initial, values) * 100.0;
    let sqrt_c = periods_per_year.sqrt();
    Metrics {
        days: t,
        arr,
        sr: sharpe(&returns, periods_per_year),
        cr: ratio(arr, mdd),
        sor: ratio(mean(&returns), downside_deviation(&returns)) * sqrt_c,
        mdd,
        vol: std_dev(&returns) * sqrt_c * 100.0,
        total_return: total * 100.0,
        pnl: last - initial,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() < tol
    }

    #[test]
    fn hand_computed_path() {
        // V_0 = 100, V = 110, 99, 121: r = 0.1, -0.1, 0.2222...; E[r] = 0.0740741,
        // σ = 0.1328179 (population), DD = sqrt(0.01 / 3) = 0.0577350, MDD = 10 %.
        let m = compute(100.0, &[110.0, 99.0, 121.0], 252.0);
        assert_eq!(m.days, 3);
        assert!(close(m.total_return, 21.0, 1e-9));
        assert!(close(m.pnl, 21.0, 1e-9));
        assert!(close(m.arr, 21.0 * 84.0, 1e-9)); // 21 % × 252 / 3
        assert!(close(m.mdd, 10.0, 1e-9));
        assert!(close(m.cr, 176.4, 1e-9));
        assert!(close(m.sr, 0.0740741 / 0.1328179 * 252f64.sqrt(), 1e-4)); // 8.8534
        assert!(close(m.sr, 8.8534, 1e-3));
        assert!(close(m.vol, 0.1328179 * 252f64.sqrt() * 100.0, 1e-3)); // 210.843 %
        assert!(close(m.sor, 0.0740741 / 0.0577350 * 252f64.sqrt(), 1e-3)); // 20.367
        assert!(close(m.sor, 20.367, 1e-3));
    }

    #[test]
    fn crypto_annualisation_and_degenerate_cases() {
        // Constant path: no variation, no drawdown -> ratios are 0.
        let m = compute(100.0, &[100.0, 100.0], 365.0);
        assert_eq!(
            (m.sr, m.sor, m.cr, m.mdd, m.vol, m.arr),
            (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        );
        // +10 % over 5 days at 365 periods: ARR = 10 × 365 / 5 = 730 %.
        let m = compute(100.0, &[102.0, 104.0, 106.0, 108.0, 110.0], 365.0);
        assert!(close(m.arr, 730.0, 1e-9));
        assert_eq!(m.sor, 0.0); // no losing day
        // Drawdown measured from the initial capital: 100 -> 90 is 10 %.
        assert!(close(max_drawdown(100.0, &[90.0, 95.0]), 0.1, 1e-12));
    }
}
