//! Statistics over independent runs: mean, sample standard deviation, and two-sided
//! t-tests (Student's t distribution from statrs).
use statrs::distribution::{ContinuousCDF, StudentsT};

/// Mean and sample standard deviation (n - 1 in the denominator; NaN for one value).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeanStd {
    pub n: usize,
    pub mean: f64,
    pub std: f64,
}

pub fn mean_std(xs: &[f64]) -> MeanStd {
    let n = xs.len();
    if n == 0 {
        return MeanStd {
            n,
            mean: f64::NAN,
            std: f64::NAN,
        };
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    let std = if n > 1 {
        (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
    } else {
        f64::NAN
    };
    MeanStd { n, mean, std }
}

/// Result of a two-sided t-test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TTest {
    /// Number of pairs (or values).
    pub n: usize,
    pub t: f64,
    pub p: f64,
}

/// Two-sided one-sample t-test of `mean(xs) == mu`. None with fewer than 2 values. When all
/// values are equal the statistic is infinite (p = 0) unless they equal `mu` (t = 0, p = 1).
pub fn one_sample_t_test(xs: &[f64], mu: f64) -> Option<TTest> {
    let n = xs.len();
    if n < 2 || xs.iter().any(|x| !x.is_finite()) || !mu.is_finite() {
        return None;
    }
    let ms = mean_std(xs);
    let diff = ms.mean - mu;
    if ms.std == 0.0 {
        return Some(if diff == 0.0 {
            TTest { n, t: 0.0, p: 1.0 }
        } else {
            TTest {
                n,
                t: diff.signum() * f64::INFINITY,
                p: 0.0,
            }
        });
    }
    let t = diff / (ms.std / (n as f64).sqrt());
    let dist = StudentsT::new(0.0, 1.0, (n - 1) as f64).ok()?;
    let p = (2.0 * (1.0 - dist.cdf(t.abs()))).clamp(0.0, 1.0);
    Some(TTest { n, t, p })
}

/// Two-sided paired t-test of `a[i]` against `b[i]` (the test of the differences' mean
/// against 0, as `scipy.stats.ttest_rel`). None when the lengths differ or n < 2.
pub fn paired_t_test(a: &[f64], b: &[f64]) -> Option<TTest> {
    if a.len() != b.len() {
        return None;
    }
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    one_sample_t_test(&d, 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_std() {
        let m = mean_std(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
        assert_eq!(m.mean, 5.0);
        // Sample std (n - 1): sqrt(32 / 7).
        assert!((m.std - (32.0f64 / 7.0).sqrt()).abs() < 1e-12);
        assert!(mean_std(&[1.0]).std.is_nan());
    }

    #[test]
    fn paired_t_test_matches_a_hand_computation() {
        // Differences [0.3, 0.1, 0.8, -0.1, 0.2]: mean 0.26, sample std 0.336155, so
        // t = 1.7294942736; with 4 degrees of freedom the t CDF has the closed form
        // 1/2 + 3/8 a (1 - t^2 / (12 (1 + t^2/4))), a = t / sqrt(1 + t^2/4), giving the
        // two-sided p = 0.1587764521 (also got by integrating the density numerically).
        let r = paired_t_test(&[1.2, 0.8, 1.9, 1.4, 0.3], &[0.9, 0.7, 1.1, 1.5, 0.1]).unwrap();
        assert_eq!(r.n, 5);
        assert!((r.t - 1.729_494_273_618_122_5).abs() < 1e-9, "t = {}", r.t);
        assert!((r.p - 0.158_776_452_1).abs() < 1e-8, "p = {}", r.p);
        // Symmetric in sign, same p.
        let s = paired_t_test(&[0.9, 0.7, 1.1, 1.5, 0.1], &[1.2, 0.8, 1.9, 1.4, 0.3]).unwrap();
        assert!((s.t + r.t).abs() < 1e-12 && (s.p - r.p).abs() < 1e-12);
    }

    #[test]
    fn degenerate_cases() {
        assert!(paired_t_test(&[1.0], &[2.0]).is_none());
        assert!(paired_t_test(&[1.0, 2.0], &[2.0]).is_none());
        assert_eq!(paired_t_test(&[1.0, 2.0], &[1.0, 2.0]).unwrap().p, 1.0);
        assert_eq!(paired_t_test(&[2.0, 3.0], &[1.0, 2.0]).unwrap().p, 0.0);
        assert!(one_sample_t_test(&[1.0, f64::NAN], 0.0).is_none());
    }
}
