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
//!
//! # FLAG-Trader's metrics (log returns)
//!
//! FLAG-Trader (Xiong et al. 2025, §5.2) reports CR, SR, AV and MDD as the InvestorBench code
//! computes them (felis33/INVESTOR-BENCH `src/eval_pipeline.py`, `calculate_metrics`), on the
//! `n` closing values `W_1..W_n` of the path (for Buy & Hold, the `n` closes):
//! `r_t = ln(W_t / W_{t-1})` for `t = 2..n` (`n - 1` log returns), `C` periods per year.
//! [`flag_trader`] computes them; the `metrics` stage takes `W` = the path's values `V_1..V_T`
//! (`n = T`; the initial capital is not a close, so a first-day trade cost is outside these
//! four numbers, while total return, ARR and MDD above include it).
//!
//! | metric | formula | unit |
//! |---|---|---|
//! | CR (cumulative return) | `Σ_t r_t` (= `ln(W_n / W_1)`) | % |
//! | AV (annualised volatility) | `s[r] × √C`, `s` the sample std (divisor `n - 2`, i.e. count - 1) | % |
//! | SR (Sharpe ratio) | `(CR / (n / C)) / AV`, `n` the number of values (not of returns) | — |
//! | MDD (InvestorBench's) | running-peak drawdown of `U_0 = 1`, `U_t = U_{t-1} (1 + r_t)` | % |
//!
//! * SR annualises with the same `C` as AV (InvestorBench passes 252 for stocks and 365 for
//!   BTC/ETH to both); checked on MSFT/JNJ Buy & Hold 2020-10-01..2021-05-05 (149 closes):
//!   CR 15.340 / 13.895, AV 24.980 / 17.500, SR 1.039 / 1.343, as the paper's table.
//! * MDD compounds the *log* returns as if they were simple returns, so it is not the drawdown
//!   of the value path (slightly larger for falls). It is what reproduces the paper: MSFT 9.428,
//!   JNJ 9.847, where the standard running-peak drawdown of the closes (`mdd` above, on the
//!   same window) is 9.212 / 9.701, and the log-price drawdown `max ln(peak / W)` 9.664 /
//!   10.204. Kept as the paper's definition, documented, next to the standard `mdd`.
//! * Undefined cases: fewer than 3 values leave no sample std, so AV = SR = 0 (as the ratios
//!   above); a value <= 0 (or not finite) has no log, and [`flag_trader`] returns `None`.

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

/// FLAG-Trader's metrics of one path (module doc), in % except SR.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogMetrics {
    /// CR: sum of the daily log returns, %.
    pub cr: f64,
    /// SR: `(CR / (n / C)) / AV`.
    pub sr: f64,
    /// AV: sample std of the daily log returns × √C, %.
    pub av: f64,
    /// MDD as InvestorBench computes it (log returns compounded as simple returns), %.
    pub mdd: f64,
}

/// Sample standard deviation (divisor `len - 1`); 0 for fewer than two values.
pub fn sample_std(xs: &[f64]) -> f64 {
    if xs.len() < 2 {
        return 0.0;
    }
    let m = mean(xs);
    (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (xs.len() - 1) as f64).sqrt()
}

/// FLAG-Trader's CR, SR, AV and MDD of the closing values `values` (`W_1..W_n`, module doc);
/// `None` when a value is not a finite number > 0 (no log return).
pub fn flag_trader(values: &[f64], periods_per_year: f64) -> Option<LogMetrics> {
    if values.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
        return None;
    }
    let r: Vec<f64> = values.windows(2).map(|w| (w[1] / w[0]).ln()).collect();
    let cr = r.iter().sum::<f64>() * 100.0;
    let av = sample_std(&r) * periods_per_year.sqrt() * 100.0;
    let years = values.len() as f64 / periods_per_year;
    let (mut u, mut peak, mut mdd) = (1.0_f64, 1.0_f64, 0.0_f64);
    for x in &r {
        u *= 1.0 + x;
        peak = peak.max(u);
        mdd = mdd.max((peak - u) / peak);
    }
    Some(LogMetrics {
        cr,
        sr: ratio(ratio(cr, years), av),
        av,
        mdd: mdd * 100.0,
    })
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

    #[test]
    fn flag_trader_hand_computed_path() {
        // W = 100, 110, 99, 121: r = ln 1.1, ln 0.9, ln(121/99) = 0.0953102, -0.1053605,
        // 0.2006707; sum = ln 1.21 = 0.1906204; mean 0.0635401; sample std 0.1554695.
        let m = flag_trader(&[100.0, 110.0, 99.0, 121.0], 252.0).unwrap();
        assert!(close(m.cr, 19.06204, 1e-4));
        assert!(close(m.av, 0.1554695 * 252f64.sqrt() * 100.0, 1e-3)); // 246.800 %
        assert!(close(m.sr, (19.06204 / (4.0 / 252.0)) / m.av, 1e-3)); // 4.866
        assert!(close(m.sr, 4.866, 1e-3));
        // U = 1, 1.0953102, 0.9799097 (= 1.0953102 × (1 - 0.1053605)), 1.1765465 -> MDD 0.1053605.
        assert!(close(m.mdd, 10.53605, 1e-4));
        // The standard drawdown of W is 10 %: the log compounding makes it larger.
        assert!(close(
            max_drawdown(100.0, &[110.0, 99.0, 121.0]),
            0.1,
            1e-12
        ));
    }

    #[test]
    fn flag_trader_degenerate_cases() {
        // One or two values: no sample std -> AV = SR = 0; CR still the log return.
        let m = flag_trader(&[100.0], 365.0).unwrap();
        assert_eq!((m.cr, m.sr, m.av, m.mdd), (0.0, 0.0, 0.0, 0.0));
        let m = flag_trader(&[100.0, 50.0], 365.0).unwrap();
        assert!(close(m.cr, -69.31472, 1e-4));
        assert_eq!((m.sr, m.av), (0.0, 0.0));
        assert!(close(m.mdd, 69.31472, 1e-4));
        // Constant path: every number 0.
        let m = flag_trader(&[100.0, 100.0, 100.0], 252.0).unwrap();
        assert_eq!((m.cr, m.sr, m.av, m.mdd), (0.0, 0.0, 0.0, 0.0));
        // Crypto annualises AV and SR with 365: SR = CR / (n / 365) / AV.
        let m = flag_trader(&[100.0, 110.0, 99.0, 121.0], 365.0).unwrap();
        assert!(close(m.av, 0.1554695 * 365f64.sqrt() * 100.0, 1e-3));
        assert!(close(m.sr, (19.06204 / (4.0 / 365.0)) / m.av, 1e-3));
        // No log of a value <= 0.
        assert_eq!(flag_trader(&[100.0, 0.0, 50.0], 252.0), None);
        assert_eq!(flag_trader(&[100.0, -5.0], 252.0), None);
        assert_eq!(flag_trader(&[100.0, f64::NAN], 252.0), None);
    }
}
