//! Ratio statistics, a table for people and one JSON line per result for machines.

use serde_json::json;

/// One measured metric: per-round baseline and value, same run, interleaved.
pub struct Metric {
    pub bench: &'static str,
    pub metric: String,
    pub unit: &'static str,
    pub baseline: Vec<f64>,
    pub value: Vec<f64>,
}

pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

impl Metric {
    pub fn new(bench: &'static str, metric: String, unit: &'static str) -> Self {
        Metric { bench, metric, unit, baseline: Vec::new(), value: Vec::new() }
    }

    /// One round: the baseline and the value measured next to it.
    pub fn push(&mut self, baseline: f64, value: f64) {
        self.baseline.push(baseline);
        self.value.push(value);
    }

    fn ratios(&self) -> Vec<f64> {
        self.baseline.iter().zip(&self.value).map(|(b, v)| v / b).collect()
    }

    pub fn print(&self) {
        let r = self.ratios();
        let (min, max) = r.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        println!(
            "{:<10} {:<32} baseline {:>12.1} {:<6} value {:>12.1}  ratio {:.3} (min {:.3}, max {:.3}, {} rounds)",
            self.bench,
            self.metric,
            median(&self.baseline),
            self.unit,
            median(&self.value),
            median(&r),
            min,
            max,
            r.len()
        );
        println!(
            "{}",
            json!({
                "bench": self.bench,
                "metric": self.metric,
                "unit": self.unit,
                "baseline": median(&self.baseline),
                "value": median(&self.value),
                "ratio": median(&r),
                "ratio_min": min,
                "ratio_max": max,
                "rounds": r.len(),
            })
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
