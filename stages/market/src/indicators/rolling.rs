//! Rolling-window kernels over the last `n` rows (current included) of one ticker's series,
//! evaluated over a whole partition at once (`ta_sma`, `ta_sum`, `ta_stddev`,
//! `ta_stddev_samp`, `ta_max`, `ta_min`, `ta_zscore` in the SQL; see [`super::udwf`]).
//!
//! A row's value is NULL unless all `n` rows of its window are present (non-NULL): the
//! warm-up rows and the `n - 1` rows after a NULL. That is what the SQL used to spell with
//! `CASE WHEN rn >= n` / `CASE WHEN COUNT(x) OVER (...) = n` around DataFusion's sliding
//! aggregates, whose per-row accumulator calls took two thirds of the stage's time.
//!
//! Sums follow TA-Lib's `TA_SMA` operation order (add the new value, emit, subtract the
//! trailing one), restarted after a NULL; standard deviations are two-pass over the window
//! (mean, then mean squared deviation), as numpy computes the reference fixtures. Every
//! value depends on the current and earlier rows only.
use datafusion::arrow::array::{Array, Float64Array};
use datafusion::arrow::buffer::NullBuffer;

/// What a window reduces to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stat {
    /// Mean (TA-Lib `SMA`).
    Mean,
    Sum,
    /// Population standard deviation (TA-Lib `STDDEV`, nbdev 1).
    StdPop,
    /// Sample standard deviation (ddof 1).
    StdSamp,
    Max,
    Min,
    /// `(x - mean) / std_pop`, NULL where the std is exactly 0.
    ZScore,
}

/// Sum of a short slice with four independent accumulators (no dependency chain).
fn lane_sum(w: &[f64], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0.0f64; 4];
    let mut chunks = w.chunks_exact(4);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    let mut tail = 0.0;
    for &v in chunks.remainder() {
        tail += f(v);
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// Mean and mean squared deviation of a window, two-pass.
fn mean_m2(w: &[f64]) -> (f64, f64) {
    let n = w.len() as f64;
    let mean = lane_sum(w, |v| v) / n;
    (mean, lane_sum(w, |v| (v - mean) * (v - mean)))
}

/// `stat` over the last `n` rows of `x` at every row (module doc for NULLs).
pub fn rolling(x: &Float64Array, n: usize, stat: Stat) -> Float64Array {
    let v = x.values();
    let len = v.len();
    let mut out = vec![0.0f64; len];
    let mut valid = vec![false; len];
    let nulls = x.nulls().filter(|b| b.null_count() > 0);
    let present = |i: usize| nulls.is_none_or(|b| b.is_valid(i));
    let nf = n as f64;
    // Present values in a row ending at i; the running sum of the current run (Mean, Sum).
    let mut run = 0usize;
    let mut sum = 0.0;
    for i in 0..len {
        if !present(i) {
            run = 0;
            sum = 0.0;
            continue;
        }
        run += 1;
        if matches!(stat, Stat::Mean | Stat::Sum) {
            sum += v[i];
        }
        if run < n {
            continue;
        }
        let w = &v[i + 1 - n..=i];
        let value = match stat {
            Stat::Mean | Stat::Sum => {
                let total = sum;
                sum -= v[i + 1 - n];
                Some(if stat == Stat::Mean {
                    total / nf
                } else {
                    total
                })
            }
            Stat::StdPop => Some((mean_m2(w).1 / nf).sqrt()),
            Stat::StdSamp => Some((mean_m2(w).1 / (nf - 1.0)).sqrt()),
            Stat::Max => Some(w.iter().copied().fold(f64::NEG_INFINITY, f64::max)),
            Stat::Min => Some(w.iter().copied().fold(f64::INFINITY, f64::min)),
            Stat::ZScore => {
                let (mean, m2) = mean_m2(w);
                let sd = (m2 / nf).sqrt();
                (sd != 0.0).then(|| (v[i] - mean) / sd)
            }
        };
        if let Some(value) = value {
            out[i] = value;
            valid[i] = true;
        }
    }
    Float64Array::new(out.into(), Some(NullBuffer::from(valid)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(a: &Float64Array) -> Vec<Option<f64>> {
        a.iter().collect()
    }

    #[test]
    fn null_until_the_window_is_full_and_after_a_gap() {
        let x = Float64Array::from(vec![
            Some(1.0),
            Some(2.0),
            Some(3.0),
            None,
            Some(5.0),
            Some(6.0),
        ]);
        assert_eq!(
            get(&rolling(&x, 2, Stat::Sum)),
            vec![None, Some(3.0), Some(5.0), None, None, Some(11.0)]
        );
        assert_eq!(
            get(&rolling(&x, 2, Stat::Max)),
            vec![None, Some(2.0), Some(3.0), None, None, Some(6.0)]
        );
        assert_eq!(
            get(&rolling(&x, 3, Stat::Mean)),
            vec![None, None, Some(2.0), None, None, None]
        );
    }

    #[test]
    fn std_and_zscore_match_the_definitions() {
        let x = Float64Array::from(vec![2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
        let sd = get(&rolling(&x, 8, Stat::StdPop));
        assert_eq!(sd[7], Some(2.0));
        let s = get(&rolling(&x, 8, Stat::StdSamp))[7].unwrap();
        assert!((s - (32.0f64 / 7.0).sqrt()).abs() < 1e-12);
        assert_eq!(
            get(&rolling(&x, 8, Stat::ZScore))[7],
            Some((9.0 - 5.0) / 2.0)
        );
        let flat = Float64Array::from(vec![3.0; 4]);
        assert_eq!(get(&rolling(&flat, 2, Stat::ZScore)), vec![None; 4]);
    }
}
