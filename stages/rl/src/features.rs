//! The TDQN observation: a window of normalised daily features, built once per ticker.
//!
//! For a window of `w` days ending on day `t` (rows `t-w+1..=t`), the reference
//! `TDQN.processState` turns the 4 raw series (close, low, high, volume) into `w - 1` values
//! each, laid out feature after feature:
//! 1. close returns `(c_i - c_{i-1}) / c_{i-1}`, divided by the largest absolute return,
//! 2. bar ranges `|h_i - l_i|`, divided by the largest range,
//! 3. close position in the bar `|c_i - l_i| / |h_i - l_i|` (0.5 for a zero range; not
//!    clipped, as in the reference: the TDQN data's adjusted close can lie outside the bar),
//! 4. volumes, min-max scaled,
//!
//! for `i = t-w+2..=t`. With `w = 30`: 4 x 29 = 116 market inputs; the agent appends the
//! optional per-day extra features of day `t`, then its current position (-1, 0 or 1), so
//! the TDQN observation has 116 + 1 = 117 inputs.
//!
//! The normalisation coefficients come from the training rows only (`Coefficients::fit`),
//! and the low-pass filter is causal, so the row of day `t` uses no data dated after `t`.

/// One ticker's daily bars in date order.
#[derive(Debug, Clone, PartialEq)]
pub struct Bars {
    pub dates: Vec<i32>,
    pub high: Vec<f64>,
    pub low: Vec<f64>,
    pub close: Vec<f64>,
    pub volume: Vec<f64>,
}

impl Bars {
    pub fn len(&self) -> usize {
        self.dates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.dates.is_empty()
    }

    /// The TDQN data augmentation `lowPassFilter(order)`: each series becomes its trailing
    /// moving average over `order` days; the first `order` rows keep their raw values (as the
    /// reference overwrites them). Causal: row `t` depends on rows `t-order+1..=t` only.
    pub fn low_pass(&self, order: usize) -> Bars {
        Bars {
            dates: self.dates.clone(),
            high: moving_average(&self.high, order),
            low: moving_average(&self.low, order),
            close: moving_average(&self.close, order),
            volume: moving_average(&self.volume, order),
        }
    }
}

fn moving_average(x: &[f64], order: usize) -> Vec<f64> {
    if order <= 1 {
        return x.to_vec();
    }
    (0..x.len())
        .map(|t| {
            if t < order {
                x[t]
            } else {
                x[t + 1 - order..=t].iter().sum::<f64>() / order as f64
            }
        })
        .collect()
}

/// Normalisation coefficients (`getNormalizationCoefficients`), fitted on training rows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Coefficients {
    pub max_abs_return: f64,
    pub max_range: f64,
    pub min_volume: f64,
    pub max_volume: f64,
}

impl Coefficients {
    /// Fits on rows `rows` of `bars` (returns use the previous row inside `rows` only).
    pub fn fit(bars: &Bars, rows: std::ops::Range<usize>) -> Coefficients {
        let mut c = Coefficients {
            max_abs_return: 0.0,
            max_range: 0.0,
            min_volume: f64::INFINITY,
            max_volume: f64::NEG_INFINITY,
        };
        for i in rows.clone() {
            if i > rows.start {
                let r = ((bars.close[i] - bars.close[i - 1]) / bars.close[i - 1]).abs();
                c.max_abs_return = c.max_abs_return.max(r);
            }
            c.max_range = c.max_range.max((bars.high[i] - bars.low[i]).abs());
            c.min_volume = c.min_volume.min(bars.volume[i]);
            c.max_volume = c.max_volume.max(bars.volume[i]);
        }
        if rows.is_empty() {
            c.min_volume = 0.0;
            c.max_volume = 0.0;
        }
        c
    }
}

/// Scales `x` by `(x - lo) / (hi - lo)`, or gives `flat` when the coefficients coincide.
fn scale(x: f64, lo: f64, hi: f64, flat: f64) -> f64 {
    if hi != lo { (x - lo) / (hi - lo) } else { flat }
}

/// Per-row feature vectors of one ticker: row `t` is the market window ending on `t`
/// followed by the extra features of day `t`. Rows before `first_valid` (no full window)
/// are zeros and never used.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureMatrix {
    pub rows: usize,
    /// Market inputs plus extra features (the position is appended by the agent).
    pub width: usize,
    pub market_width: usize,
    pub first_valid: usize,
    pub data: Vec<f32>,
}

impl FeatureMatrix {
    /// Builds the matrix from (usually low-pass filtered) `bars`, coefficients fitted on the
    /// training rows, and `extra[t]` (same length per row) appended to row `t`.
    pub fn build(
        bars: &Bars,
        coef: &Coefficients,
        window: usize,
        extra: Option<&[Vec<f64>]>,
    ) -> FeatureMatrix {
        let n = bars.len();
        let per = window - 1;
        let market_width = 4 * per;
        let extra_width = extra.and_then(|e| e.first()).map_or(0, Vec::len);
        let width = market_width + extra_width;
        let mut data = vec![0f32; n * width];
        let first_valid = window - 1;
        for t in first_valid..n {
            let row = &mut data[t * width..(t + 1) * width];
            for (k, i) in (t + 1 - per..=t).enumerate() {
                let (c, h, l) = (bars.close[i], bars.high[i], bars.low[i]);
                let ret = (c - bars.close[i - 1]) / bars.close[i - 1];
                let range = (h - l).abs();
                let pos = if range != 0.0 {
                    (c - l).abs() / range
                } else {
                    0.5
                };
                row[k] = scale(ret, 0.0, coef.max_abs_return, 0.0) as f32;
                row[per + k] = scale(range, 0.0, coef.max_range, 0.0) as f32;
                row[2 * per + k] = pos as f32;
                row[3 * per + k] =
                    scale(bars.volume[i], coef.min_volume, coef.max_volume, 0.0) as f32;
            }
            if let Some(extra) = extra {
                for (dst, &x) in row[market_width..].iter_mut().zip(&extra[t]) {
                    *dst = x as f32;
                }
            }
        }
        FeatureMatrix {
            rows: n,
            width,
            market_width,
            first_valid: first_valid.min(n),
            data,
        }
    }

    /// Feature vector of day `t`.
    pub fn row(&self, t: usize) -> &[f32] {
        &self.data[t * self.width..(t + 1) * self.width]
    }

    /// The full observation of day `t` with the agent's current position.
    pub fn observation(&self, t: usize, position: f32) -> Vec<f32> {
        let mut v = vec![0f32; self.width + 1];
        self.observations_into(&[t as i64], &[position], &mut v);
        v
    }

    /// Observations of days `ts` with positions `pos`, row after row into `out`
    /// (`[ts.len(), width + 1]`).
    pub fn observations_into(&self, ts: &[i64], pos: &[f32], out: &mut [f32]) {
        for ((&t, &p), row) in ts.iter().zip(pos).zip(out.chunks_exact_mut(self.width + 1)) {
            row[..self.width].copy_from_slice(self.row(t as usize));
            row[self.width] = p;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bars(n: usize) -> Bars {
        Bars {
            dates: (0..n as i32).collect(),
            high: (0..n).map(|i| 11.0 + i as f64).collect(),
            low: (0..n).map(|i| 9.0 + i as f64).collect(),
            close: (0..n).map(|i| 10.0 + i as f64).collect(),
            volume: (0..n).map(|i| 100.0 + (i % 7) as f64).collect(),
        }
    }

    #[test]
    fn low_pass_keeps_first_rows_and_averages_after() {
        let f = moving_average(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], 3);
        assert_eq!(f, vec![1.0, 2.0, 3.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(moving_average(&[1.0, 5.0], 1), vec![1.0, 5.0]);
    }

    #[test]
    fn coefficients_and_row_layout() {
        let b = bars(40);
        let c = Coefficients::fit(&b, 0..40);
        assert_eq!(c.max_abs_return, 0.1); // 10 -> 11
        assert_eq!(
            (c.max_range, c.min_volume, c.max_volume),
            (2.0, 100.0, 106.0)
        );
        let m = FeatureMatrix::build(&b, &c, 30, None);
        assert_eq!((m.width, m.first_valid), (116, 29));
        let r = m.row(29);
        // Day 1's return 1/10 scaled by 0.1 is 1; ranges are all 2 -> 1; close mid-bar.
        assert_eq!(r[0], 1.0);
        assert_eq!(r[29], 1.0);
        assert_eq!(r[58], 0.5);
        assert_eq!(r[87], (1.0 / 6.0) as f32); // day 1 volume 1 of 0..6
        assert_eq!(m.observation(29, -1.0).len(), 117);
    }
}
