//! The four rules and their indicators, evaluated on one window of bars (module doc of
//! [`super`] for the definitions). Undefined values are NaN and every comparison with NaN is
//! false, as in the pandas code the rules come from: a rule whose indicator is undefined
//! says HOLD.

use super::{Indicators, Tool, ToolParams, ToolSignal};

/// MACD's long EMA span and signal-line span (fixed in FinAgent's code).
pub const MACD_LONG_WINDOW: usize = 14;
pub const MACD_SIGNAL_WINDOW: usize = 9;
/// RSI period of the KDJ & RSI rule (fixed).
pub const RSI_PERIOD: usize = 14;
/// Stochastic look-back and Bollinger SMA period (fixed).
pub const STOCH_LOOKBACK: usize = 14;
pub const BB_PERIOD: usize = 14;
/// Mean-reversion look-back (fixed).
pub const Z_LOOKBACK: usize = 14;

/// One window of bars, oldest first; the rule speaks for the last row. `high`/`low` are only
/// read by the rules that need them (the caller checks they are present).
#[derive(Debug, Clone, Copy)]
pub struct Window<'a> {
    pub close: &'a [f64],
    pub high: &'a [f64],
    pub low: &'a [f64],
}

/// pandas `ewm(com=com, adjust=False).mean()` on data without NaN, with pandas' float steps:
/// `a = 1 / (1 + com)`, `y_0 = x_0`, `y_t = ((1 - a) y_{t-1} + a x_t) / ((1 - a) + a)`, and
/// `y_t = y_{t-1}` exactly when `x_t == y_{t-1}` (so a flat series has no rounding noise and
/// no spurious MACD crossings).
fn ewm(xs: &[f64], com: f64) -> Vec<f64> {
    let alpha = 1.0 / (1.0 + com);
    let old = 1.0 - alpha;
    let mut out: Vec<f64> = Vec::with_capacity(xs.len());
    for &x in xs {
        let y = match out.last() {
            None => x,
            Some(&w) if w != x => (old * w + alpha * x) / (old + alpha),
            Some(&w) => w,
        };
        out.push(y);
    }
    out
}

/// pandas' centre of mass for `span`: `(span - 1) / 2`.
fn span_com(span: usize) -> f64 {
    (span as f64 - 1.0) / 2.0
}

/// pandas' centre of mass for `alpha`: `(1 - alpha) / alpha`.
fn alpha_com(alpha: f64) -> f64 {
    (1.0 - alpha) / alpha
}

/// pandas `rolling(n).mean()` at row `i` (NaN before the window fills or when it holds NaN).
fn rolling_mean(xs: &[f64], n: usize, i: usize) -> f64 {
    if n == 0 || i + 1 < n {
        return f64::NAN;
    }
    xs[i + 1 - n..=i].iter().sum::<f64>() / n as f64
}

/// pandas `rolling(n).std()` at row `i`: the sample standard deviation (divisor `n - 1`).
fn rolling_std(xs: &[f64], n: usize, i: usize) -> f64 {
    if n < 2 || i + 1 < n {
        return f64::NAN;
    }
    let w = &xs[i + 1 - n..=i];
    let m = w.iter().sum::<f64>() / n as f64;
    (w.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
}

fn rolling_max(xs: &[f64], n: usize, i: usize) -> f64 {
    if n == 0 || i + 1 < n {
        return f64::NAN;
    }
    xs[i + 1 - n..=i].iter().copied().fold(f64::MIN, f64::max)
}

fn rolling_min(xs: &[f64], n: usize, i: usize) -> f64 {
    if n == 0 || i + 1 < n {
        return f64::NAN;
    }
    xs[i + 1 - n..=i].iter().copied().fold(f64::MAX, f64::min)
}

/// MACD line and signal line over the window: `EMA_short(close) - EMA_14(close)` and its
/// EMA_9, every EMA started at the window's first close.
pub fn macd(close: &[f64], short_window: usize) -> (Vec<f64>, Vec<f64>) {
    let s = ewm(close, span_com(short_window));
    let l = ewm(close, span_com(MACD_LONG_WINDOW));
    let line: Vec<f64> = s.iter().zip(&l).map(|(a, b)| a - b).collect();
    let signal = ewm(&line, span_com(MACD_SIGNAL_WINDOW));
    (line, signal)
}

/// RSI as the `ta` package computes it (Wilder smoothing, `ewm(alpha = 1/n, adjust=False,
/// min_periods = n)` of the up and down moves, the first move counted as 0; 100 when the
/// smoothed down move is 0). NaN for rows `< n - 1`.
pub fn rsi(close: &[f64], n: usize) -> Vec<f64> {
    let moves = |up: bool| -> Vec<f64> {
        close
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let d = if i == 0 { f64::NAN } else { c - close[i - 1] };
                match (up, d > 0.0, d < 0.0) {
                    (true, true, _) => d,
                    (false, _, true) => -d,
                    _ => 0.0,
                }
            })
            .collect()
    };
    let com = alpha_com(1.0 / n as f64);
    let (eu, ed) = (ewm(&moves(true), com), ewm(&moves(false), com));
    (0..close.len())
        .map(|i| {
            if i + 1 < n {
                f64::NAN
            } else if ed[i] == 0.0 {
                100.0
            } else {
                100.0 - 100.0 / (1.0 + eu[i] / ed[i])
            }
        })
        .collect()
}

/// K, D and J over the window: `RSV = (close - LLV_ilong(low)) / (HHV_ilong(high) -
/// LLV_ilong(low)) * 100`, `K = SMA_isig(RSV)`, `D = SMA_isig(K)`, `J = 3K - 2D`.
pub fn kdj(w: &Window, ilong: usize, isig: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let n = w.close.len();
    let rsv: Vec<f64> = (0..n)
        .map(|i| {
            let (lo, hi) = (rolling_min(w.low, ilong, i), rolling_max(w.high, ilong, i));
            (w.close[i] - lo) / (hi - lo) * 100.0
        })
        .collect();
    let k: Vec<f64> = (0..n).map(|i| rolling_mean(&rsv, isig, i)).collect();
    let d: Vec<f64> = (0..n).map(|i| rolling_mean(&k, isig, i)).collect();
    let j = k.iter().zip(&d).map(|(k, d)| 3.0 * k - 2.0 * d).collect();
    (k, d, j)
}

/// Evaluates `tool` on the last row of `w` (the window holds that row and the rows before
/// it that the rule may see; FinAgent passes 15).
pub fn evaluate(tool: Tool, p: &ToolParams, w: &Window) -> (ToolSignal, Indicators) {
    let n = w.close.len();
    let mut ind = Indicators {
        close: w.close.last().copied(),
        ..Indicators::default()
    };
    if n == 0 {
        return (ToolSignal::Hold, ind);
    }
    let i = n - 1;
    let c = w.close[i];
    let signal = match tool {
        Tool::Macd => {
            let (m, s) = macd(w.close, p.macd_short_window);
            ind.macd = Some(m[i]);
            ind.macd_signal = Some(s[i]);
            if i == 0 {
                ToolSignal::Hold
            } else {
                ind.macd_prev = Some(m[i - 1]);
                ind.macd_signal_prev = Some(s[i - 1]);
                if m[i] > s[i] && m[i - 1] < s[i - 1] {
                    ToolSignal::Buy
                } else if m[i] < s[i] && m[i - 1] > s[i - 1] {
                    ToolSignal::Sell
                } else {
                    ToolSignal::Hold
                }
            }
        }
        Tool::KdjRsi => {
            let (k, d, j) = kdj(w, p.kdj_ilong, p.kdj_isig);
            let r = rsi(w.close, RSI_PERIOD);
            ind.k = Some(k[i]);
            ind.d = Some(d[i]);
            ind.j = Some(j[i]);
            ind.rsi = Some(r[i]);
            if i > 0 {
                ind.d_prev = Some(d[i - 1]);
                ind.j_prev = Some(j[i - 1]);
            }
            if i < p.kdj_ilong.max(p.kdj_isig).max(RSI_PERIOD) {
                ToolSignal::Hold
            } else if j[i] > d[i] && j[i - 1] < d[i - 1] && r[i] < p.rsi_oversold {
                ToolSignal::Buy
            } else if j[i] < d[i] && j[i - 1] > d[i - 1] && r[i] > p.rsi_overbought {
                ToolSignal::Sell
            } else {
                ToolSignal::Hold
            }
        }
        Tool::StochasticBollinger => {
            let sma = rolling_mean(w.close, BB_PERIOD, i);
            let sd = rolling_std(w.close, BB_PERIOD, i);
            let (lower, upper) = (sma - p.bb_std_dev * sd, sma + p.bb_std_dev * sd);
            let lo = rolling_min(w.low, STOCH_LOOKBACK, i);
            let hi = rolling_max(w.high, STOCH_LOOKBACK, i);
            let so = 100.0 * ((c - lo) / (hi - lo));
            ind.bb_lower = Some(lower);
            ind.bb_upper = Some(upper);
            ind.stochastic = Some(so);
            if i < STOCH_LOOKBACK.max(BB_PERIOD) {
                ToolSignal::Hold
            } else if so < p.stoch_oversold && c < lower {
                ToolSignal::Buy
            } else if so > p.stoch_overbought && c > upper {
                ToolSignal::Sell
            } else {
                ToolSignal::Hold
            }
        }
        Tool::MeanReversion => {
            let z =
                (c - rolling_mean(w.close, Z_LOOKBACK, i)) / rolling_std(w.close, Z_LOOKBACK, i);
            ind.z_score = Some(z);
            if i < Z_LOOKBACK {
                ToolSignal::Hold
            } else if z < -p.z_score_threshold {
                ToolSignal::Buy
            } else if z > p.z_score_threshold {
                ToolSignal::Sell
            } else {
                ToolSignal::Hold
            }
        }
    };
    (signal, ind.finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn ewm_and_rolling_match_pandas_by_hand() {
        // ewm(span=3, adjust=False) of 1, 2, 3: a = 0.5 -> 1, 1.5, 2.25.
        assert_eq!(ewm(&[1.0, 2.0, 3.0], span_com(3)), vec![1.0, 1.5, 2.25]);
        // A value equal to the average leaves it bit-for-bit unchanged (span 14: a = 2/15,
        // where (13/15) 10 + (2/15) 10 is not exactly 10 in floating point).
        assert_eq!(ewm(&[10.0, 10.0, 10.0], span_com(14)), vec![10.0; 3]);
        assert!((alpha_com(0.5) - 1.0).abs() < 1e-15);
        let xs = [1.0, 2.0, 4.0, 8.0];
        assert!(rolling_mean(&xs, 3, 1).is_nan());
        assert!(close(rolling_mean(&xs, 3, 3), 14.0 / 3.0));
        // Sample std of 2, 4, 8: mean 14/3, squares 64/9 + 4/9 + 100/9 = 168/9, / 2.
        assert!(close(rolling_std(&xs, 3, 3), (168.0f64 / 18.0).sqrt()));
        assert_eq!((rolling_min(&xs, 2, 3), rolling_max(&xs, 2, 3)), (4.0, 8.0));
    }

    #[test]
    fn rsi_as_ta_computes_it() {
        // n = 2, a = 0.5. Moves: 0 (first), +1, -2, +1.
        // up EMA: 0, 0.5, 0.25, 0.625; down EMA: 0, 0, 1, 0.5.
        // Row 0 is warm-up (min_periods 2); row 1 has no down move -> 100;
        // row 2: RS 0.25 -> 20; row 3: RS 1.25 -> 100 - 100 / 2.25 = 55.555...
        let r = rsi(&[10.0, 11.0, 9.0, 10.0], 2);
        assert!(r[0].is_nan());
        assert_eq!(r[1], 100.0);
        assert!(close(r[2], 20.0));
        assert!(close(r[3], 100.0 - 100.0 / 2.25));
    }
}
