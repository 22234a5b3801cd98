//! Latency histograms: every call recorded, percentiles read exactly
//! (to three significant digits) from an HDR histogram.

use std::time::Duration;

use hdrhistogram::Histogram;

/// Percentiles of a distribution chart; 100 is the maximum.
pub const CHART_PERCENTILES: [f64; 11] = [
    1.0, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9, 100.0,
];

/// Longest latency recorded as itself; longer ones are recorded as this.
const MAX_NS: u64 = 600_000_000_000;

/// Latencies in nanoseconds.
#[derive(Debug, Clone)]
pub struct Latencies {
    hist: Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies::new()
    }
}

impl Latencies {
    /// An empty record: 1 ns to 10 minutes, three significant digits.
    pub fn new() -> Latencies {
        Latencies {
            hist: Histogram::new_with_bounds(1, MAX_NS, 3).expect("the bounds are valid constants"),
        }
    }

    /// Records one latency.
    pub fn record(&mut self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos())
            .unwrap_or(MAX_NS)
            .clamp(1, MAX_NS);
        self.hist.saturating_record(ns);
    }

    /// Adds every latency of `other`.
    pub fn merge(&mut self, other: &Latencies) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.hist.add(&other.hist);
    }

    /// How many latencies were recorded.
    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// The latency at `percentile` (0..=100) in ns; `None` when empty.
    pub fn percentile(&self, percentile: f64) -> Option<f64> {
        if self.hist.is_empty() {
            return None;
        }
        if percentile >= 100.0 {
            return Some(self.hist.max() as f64);
        }
        Some(self.hist.value_at_quantile(percentile / 100.0) as f64)
    }

    /// The points of a distribution chart, `[percentile, ns]`.
    pub fn chart(&self) -> Vec<[f64; 2]> {
        CHART_PERCENTILES
            .iter()
            .filter_map(|&p| self.percentile(p).map(|v| [p, v]))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_sample() {
        let mut l = Latencies::new();
        assert_eq!(l.percentile(50.0), None);
        for us in 1..=100u64 {
            l.record(Duration::from_micros(us));
        }
        assert_eq!(l.count(), 100);
        let p50 = l.percentile(50.0).expect("not empty");
        assert!((49_900.0..=50_100.0).contains(&p50), "{p50}");
        let max = l.percentile(100.0).expect("not empty");
        assert!((99_900.0..=100_100.0).contains(&max), "{max}");
        assert_eq!(l.chart().len(), CHART_PERCENTILES.len());
    }
}
