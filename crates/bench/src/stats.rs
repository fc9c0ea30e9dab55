//! Summary statistics: exact percentiles over recorded samples.
//!
//! Percentiles use linear interpolation between closest ranks (numpy's default `linear` method),
//! so figures can be checked against `numpy.percentile` directly. Samples are kept whole rather
//! than in a histogram: a full trace is tens of thousands of samples, and exactness is what makes
//! policy comparisons trustworthy.

use serde::Serialize;

/// Linear-interpolated percentile of already sorted `sorted` (`q` in `[0, 100]`); `None` if empty.
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let q = q.clamp(0.0, 100.0);
    let pos = q / 100.0 * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = pos - lo as f64;
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * frac)
}

/// Mean and the usual percentiles of a sample set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Arithmetic mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest sample.
    pub max: f64,
    /// Number of samples.
    pub count: usize,
}

impl Summary {
    /// Summarises `samples` (any order; NaNs are dropped). All zero when empty.
    pub fn of(samples: &[f64]) -> Self {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        let p = |q| percentile(&v, q).unwrap_or(0.0);
        Self {
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: p(50.0),
            p90: p(90.0),
            p99: p(99.0),
            max: *v.last().unwrap_or(&0.0),
            count: v.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_numpy_linear_percentiles() {
        // numpy.percentile(..., method="linear") reference: position = q/100 * (n - 1), then
        // interpolate. [15, 20, 35, 40, 50] at [0, 25, 50, 90, 99, 100] gives
        // [15, 20, 35, 46, 49.6, 50] (e.g. q=90: pos 3.6 -> 40 + 0.6 * 10).
        let v = [15.0, 20.0, 35.0, 40.0, 50.0];
        let got: Vec<f64> = [0.0, 25.0, 50.0, 90.0, 99.0, 100.0]
            .iter()
            .map(|&q| percentile(&v, q).unwrap())
            .collect();
        let want = [15.0, 20.0, 35.0, 46.0, 49.6, 50.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-9, "{got:?} vs {want:?}");
        }
        // 1..=1000 at [50, 90, 99]: positions 499.5, 899.1, 989.01 -> [500.5, 900.1, 990.01]
        let v: Vec<f64> = (1..=1000).map(f64::from).collect();
        let s = Summary::of(&v);
        assert!((s.p50 - 500.5).abs() < 1e-9);
        assert!((s.p90 - 900.1).abs() < 1e-9);
        assert!((s.p99 - 990.01).abs() < 1e-9);
        assert!((s.mean - 500.5).abs() < 1e-9);
        assert_eq!(s.count, 1000);
    }

    #[test]
    fn empty_and_unsorted_inputs() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(Summary::of(&[]), Summary::default());
        let s = Summary::of(&[3.0, 1.0, f64::NAN, 2.0]);
        assert_eq!((s.p50, s.max, s.count), (2.0, 3.0, 3));
    }
}
