//! The recursive indicators, written to reproduce TA-Lib (checked against 0.8.1; `TA_COMPATIBILITY_DEFAULT`, no
//! unstable period) operation by operation, so results agree to rounding.
//!
//! Each kernel takes one ticker's series in date order. Values before the first row where all
//! inputs are non-NULL are skipped (so an indicator of an indicator, e.g. the MACD signal,
//! seeds on the first values that exist). A NULL after that start ends the series: that row
//! and every later one is NULL, as TA-Lib's NaN would poison every later value.

// The loops index several series at once, as TA-Lib's C does; keeping its shape keeps the
// floating-point operations in TA-Lib's order.
#![allow(clippy::needless_range_loop)]

/// `[start, end)`: the rows from the first where every input is present up to the first gap.
fn valid_run(inputs: &[&[Option<f64>]]) -> (usize, usize) {
    let len = inputs.first().map_or(0, |x| x.len());
    let present = |i: usize| inputs.iter().all(|x| x[i].is_some());
    let start = (0..len).find(|&i| present(i)).unwrap_or(len);
    let end = (start..len).find(|&i| !present(i)).unwrap_or(len);
    (start, end)
}

/// Reads a value inside a valid run (where it is known to be present).
fn at(x: &[Option<f64>], i: usize) -> f64 {
    x[i].unwrap_or(f64::NAN)
}

/// TA-Lib's `PER_TO_K`: the EMA weight of a period.
fn per_to_k(period: usize) -> f64 {
    2.0 / ((period + 1) as f64)
}

/// TA-Lib `TA_EMA`: the first output, at the `period`-th value, is the SMA of the first
/// `period` values; then `ema = (x - ema) * k + ema` with `k = 2 / (period + 1)`.
pub fn ema(x: &[Option<f64>], period: usize) -> Vec<Option<f64>> {
    let mut out = vec![None; x.len()];
    let (s, e) = valid_run(&[x]);
    if period == 0 || e - s < period {
        return out;
    }
    let k = per_to_k(period);
    let mut sum = 0.0;
    for i in s..s + period {
        sum += at(x, i);
    }
    let mut prev = sum / period as f64;
    out[s + period - 1] = Some(prev);
    for i in s + period..e {
        prev = ((at(x, i) - prev) * k) + prev;
        out[i] = Some(prev);
    }
    out
}

/// The line of TA-Lib `TA_MACD(x, fast, slow, _)` before its signal-period trim: both EMAs
/// start at the `slow`-th value, the slow one seeded with the SMA of the first `slow` values
/// and the fast one with the SMA of the `fast` values ending there (not of the first `fast`
/// values, which is what a plain EMA would do). TA-Lib swaps the periods if `slow < fast`.
pub fn macd_line(x: &[Option<f64>], fast: usize, slow: usize) -> Vec<Option<f64>> {
    let (fast, slow) = if slow < fast {
        (slow, fast)
    } else {
        (fast, slow)
    };
    let mut out = vec![None; x.len()];
    let (s, e) = valid_run(&[x]);
    if fast == 0 || e - s < slow {
        return out;
    }
    let seed = s + slow - 1;
    let (k_fast, k_slow) = (per_to_k(fast), per_to_k(slow));
    let mut slow_sum = 0.0;
    for i in s..=seed {
        slow_sum += at(x, i);
    }
    let mut fast_sum = 0.0;
    for i in seed + 1 - fast..=seed {
        fast_sum += at(x, i);
    }
    let mut slow_ema = slow_sum / slow as f64;
    let mut fast_ema = fast_sum / fast as f64;
    out[seed] = Some(fast_ema - slow_ema);
    for i in seed + 1..e {
        let v = at(x, i);
        slow_ema = ((v - slow_ema) * k_slow) + slow_ema;
        fast_ema = ((v - fast_ema) * k_fast) + fast_ema;
        out[i] = Some(fast_ema - slow_ema);
    }
    out
}

/// TA-Lib `TA_MACD(x, fast, slow, signal)` signal: the EMA of [`macd_line`], seeded on its
/// first `signal` values.
pub fn macd_signal(x: &[Option<f64>], fast: usize, slow: usize, signal: usize) -> Vec<Option<f64>> {
    ema(&macd_line(x, fast, slow), signal)
}

/// TA-Lib `TA_STOCH(high, low, close, fastk, slowk, EMA, slowd, EMA)`: fast %K over the
/// highest high and lowest low of the last `fastk` rows (0 when that range is flat), slow %K
/// its EMA `slowk`, %D the EMA `slowd` of slow %K. Returns (%K, %D), both starting where %D
/// starts, as TA-Lib outputs them.
pub fn stoch(
    high: &[Option<f64>],
    low: &[Option<f64>],
    close: &[Option<f64>],
    fastk: usize,
    slowk: usize,
    slowd: usize,
) -> (Vec<Option<f64>>, Vec<Option<f64>>) {
    let mut fast = vec![None; close.len()];
    let (s, e) = valid_run(&[high, low, close]);
    if fastk > 0 && e - s >= fastk {
        for i in s + fastk - 1..e {
            let w = i + 1 - fastk..=i;
            let hh = w
                .clone()
                .map(|j| at(high, j))
                .fold(f64::NEG_INFINITY, f64::max);
            let ll = w.map(|j| at(low, j)).fold(f64::INFINITY, f64::min);
            let range = hh - ll;
            fast[i] = Some(if range != 0.0 {
                (at(close, i) - ll) / (range / 100.0)
            } else {
                0.0
            });
        }
    }
    let mut k = ema(&fast, slowk);
    let d = ema(&k, slowd);
    for (k, d) in k.iter_mut().zip(&d) {
        if d.is_none() {
            *k = None;
        }
    }
    (k, d)
}

/// TA-Lib's `TA_IS_ZERO`.
fn is_zero(v: f64) -> bool {
    -0.000_000_01 < v && v < 0.000_000_01
}

/// TA-Lib `TA_RSI`: Wilder's average gain and loss, seeded with the mean gain and loss of the
/// first `period` changes; `100 * gain / (gain + loss)`, or 0 when both are (near) zero.
pub fn rsi(x: &[Option<f64>], period: usize) -> Vec<Option<f64>> {
    let mut out = vec![None; x.len()];
    let (s, e) = valid_run(&[x]);
    if period == 0 || e - s <= period {
        return out;
    }
    let n = period as f64;
    let score = |gain: f64, loss: f64| {
        let total = gain + loss;
        if is_zero(total) {
            0.0
        } else {
            100.0 * (gain / total)
        }
    };
    let mut prev_value = at(x, s);
    let (mut gain, mut loss) = (0.0, 0.0);
    for i in s + 1..=s + period {
        let v = at(x, i);
        let change = v - prev_value;
        prev_value = v;
        if change < 0.0 {
            loss -= change;
        } else {
            gain += change;
        }
    }
    loss /= n;
    gain /= n;
    out[s + period] = Some(score(gain, loss));
    for i in s + period + 1..e {
        let v = at(x, i);
        let change = v - prev_value;
        prev_value = v;
        loss *= n - 1.0;
        gain *= n - 1.0;
        if change < 0.0 {
            loss -= change;
        } else {
            gain += change;
        }
        loss /= n;
        gain /= n;
        out[i] = Some(score(gain, loss));
    }
    out
}

/// TA-Lib `TA_TRANGE` at row `i` (needs the previous close).
fn true_range(h: &[Option<f64>], l: &[Option<f64>], c: &[Option<f64>], i: usize) -> f64 {
    let (high, low, prev_close) = (at(h, i), at(l, i), at(c, i - 1));
    let mut greatest = high - low;
    let v2 = (prev_close - high).abs();
    if v2 > greatest {
        greatest = v2;
    }
    let v3 = (prev_close - low).abs();
    if v3 > greatest {
        greatest = v3;
    }
    greatest
}

/// TA-Lib `TA_ATR`: the first value (row `period`, 0-based) is the mean true range of rows
/// 1..=period; then Wilder's `atr = (atr * (period - 1) + tr) / period`.
pub fn atr(
    high: &[Option<f64>],
    low: &[Option<f64>],
    close: &[Option<f64>],
    period: usize,
) -> Vec<Option<f64>> {
    let mut out = vec![None; close.len()];
    let (s, e) = valid_run(&[high, low, close]);
    if period == 0 || e - s <= period {
        return out;
    }
    let n = period as f64;
    let mut sum = 0.0;
    for i in s + 1..=s + period {
        sum += true_range(high, low, close, i);
    }
    let mut prev = sum / n;
    out[s + period] = Some(prev);
    for i in s + period + 1..e {
        prev *= n - 1.0;
        prev += true_range(high, low, close, i);
        prev /= n;
        out[i] = Some(prev);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(v: &[f64]) -> Vec<Option<f64>> {
        v.iter().copied().map(Some).collect()
    }

    #[test]
    fn ema_seeds_with_sma_and_skips_leading_nulls() {
        let mut x = vec![None, None];
        x.extend(series(&[1.0, 2.0, 3.0, 4.0]));
        let out = ema(&x, 3);
        assert_eq!(out[..4], [None, None, None, None]);
        assert_eq!(out[4], Some(2.0));
        assert_eq!(out[5], Some((4.0 - 2.0) * 0.5 + 2.0));
    }

    #[test]
    fn a_gap_after_the_start_ends_the_series() {
        let mut x = series(&[1.0, 2.0, 3.0]);
        x.push(None);
        x.push(Some(5.0));
        assert_eq!(ema(&x, 2), vec![None, Some(1.5), Some(2.5), None, None]);
    }

    #[test]
    fn rsi_is_zero_when_flat_and_100_when_only_rising() {
        let flat = series(&[5.0; 6]);
        assert_eq!(rsi(&flat, 3)[3..], [Some(0.0), Some(0.0), Some(0.0)]);
        let up = series(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(
            rsi(&up, 3),
            vec![None, None, None, Some(100.0), Some(100.0)]
        );
    }

    #[test]
    fn macd_fast_ema_is_seeded_on_the_slow_seed_row() {
        let x = series(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        // slow 4: SMA(1..4) = 2.5; fast 2: SMA(3, 4) = 3.5.
        let out = macd_line(&x, 2, 4);
        assert_eq!(out[..3], [None, None, None]);
        assert_eq!(out[3], Some(1.0));
        let (f, s) = ((5.0 - 3.5) * (2.0 / 3.0) + 3.5, (5.0 - 2.5) * 0.4 + 2.5);
        assert_eq!(out[4], Some(f - s));
    }

    #[test]
    fn atr_uses_previous_close_in_the_true_range() {
        let h = series(&[10.0, 11.0, 12.0, 20.0]);
        let l = series(&[9.0, 10.0, 11.0, 19.0]);
        let c = series(&[9.5, 10.5, 11.5, 19.5]);
        // TR: -, 1.5 (|9.5 - 11|), 1.5, 8.5 (|11.5 - 20|).
        let out = atr(&h, &l, &c, 2);
        assert_eq!(out[..2], [None, None]);
        assert_eq!(out[2], Some(1.5));
        assert_eq!(out[3], Some((1.5 + 8.5) / 2.0));
    }
}
