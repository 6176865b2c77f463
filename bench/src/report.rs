//! Ratio statistics, a table for people and one JSON line per result for machines.

use serde_json::json;

/// One measured metric: per-round baseline and value, same run, interleaved.
pub struct Metric {
    pub bench: &'static str,
    pub metric: String,
    pub unit: &'static str,
    pub baseline: Vec<f64>,
    pub value: Vec<f64>,
    /// Set for a comparison with a peer: the ratio is then oriented so that above 1 means the
    /// value (Tether) is better than the baseline (the peer), whichever way the unit goes.
    pub better: Option<Better>,
}

/// Which direction of a metric is better.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Better {
    /// Latency, time, memory, CPU: ratio = baseline / value.
    Lower,
    /// Throughput, rates: ratio = value / baseline.
    Higher,
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
        Metric { bench, metric, unit, baseline: Vec::new(), value: Vec::new(), better: None }
    }

    /// A comparison with a peer (the baseline): the ratio is in the value's favour, above 1
    /// when the value is better.
    pub fn versus(bench: &'static str, metric: impl Into<String>, unit: &'static str, better: Better) -> Self {
        Metric { better: Some(better), ..Metric::new(bench, metric.into(), unit) }
    }

    /// One round: the baseline and the value measured next to it.
    pub fn push(&mut self, baseline: f64, value: f64) {
        self.baseline.push(baseline);
        self.value.push(value);
    }

    fn ratios(&self) -> Vec<f64> {
        let ratio = |b: &f64, v: &f64| if self.better == Some(Better::Lower) { b / v } else { v / b };
        self.baseline.iter().zip(&self.value).map(|(b, v)| ratio(b, v)).collect()
    }

    /// Median ratio and its range over the rounds.
    pub fn summary(&self) -> (f64, f64, f64) {
        let r = self.ratios();
        let (min, max) = r.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        (median(&r), min, max)
    }

    pub fn print(&self) {
        if let Some(better) = self.better {
            return self.print_versus(better);
        }
        let r = self.ratios();
        let (_, min, max) = self.summary();
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

    fn print_versus(&self, better: Better) {
        let (ratio, min, max) = self.summary();
        println!(
            "{:<9} {:<34} peer {:>11.1} {:<6} tether {:>11.1}  in Tether's favour {:.2} (min {:.2}, max {:.2}, {} rounds)",
            self.bench,
            self.metric,
            median(&self.baseline),
            self.unit,
            median(&self.value),
            ratio,
            min,
            max,
            self.value.len()
        );
        println!(
            "{}",
            json!({
                "bench": self.bench,
                "metric": self.metric,
                "unit": self.unit,
                "baseline": median(&self.baseline),
                "value": median(&self.value),
                "ratio": ratio,
                "ratio_min": min,
                "ratio_max": max,
                "rounds": self.value.len(),
                "better": if better == Better::Lower { "lower" } else { "higher" },
                "ratio_is": "in the value's favour (>= 1: value better than baseline)",
            })
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versus_ratios_favour_the_value_both_ways() {
        let mut latency = Metric::versus("t", "latency", "us", Better::Lower);
        latency.push(300.0, 100.0);
        assert_eq!(latency.summary().0, 3.0, "a third of the peer's latency: 3x better");
        let mut rate = Metric::versus("t", "rate", "op/s", Better::Higher);
        rate.push(100.0, 50.0);
        assert_eq!(rate.summary().0, 0.5, "half the peer's rate: worse");
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
