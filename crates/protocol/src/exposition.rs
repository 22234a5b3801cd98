//! The Prometheus text exposition, parsed: the one parser for the
//! product (the rollout's gates read members' `Monitoring/Metrics`) and
//! every harness (`tern-process-kit` re-exports it).
//!
//! [`Metrics::parse`] never panics on what a node serves: a line that does
//! not parse is skipped. Sums match samples by name and a subset of their
//! labels; histograms are read as Prometheus does (`histogram_quantile`,
//! linear within a bucket); [`Metrics::since`] turns two scrapes of
//! counters into the figures of the interval between them.

use std::collections::BTreeMap;

/// One Prometheus sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name (with `_bucket`/`_sum`/`_count` suffixes as exposed).
    pub name: String,
    /// Labels in order of appearance.
    pub labels: Vec<(String, String)>,
    /// Value.
    pub value: f64,
}

impl Sample {
    /// A label's value.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn matches(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.name == name && labels.iter().all(|(k, v)| self.label(k) == Some(*v))
    }
}

/// A parsed Prometheus text exposition.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// Every sample.
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Parses the text format (comments skipped; a line that does not parse
    /// is skipped, never a panic).
    pub fn parse(text: &str) -> Metrics {
        Metrics {
            samples: text.lines().filter_map(parse_line).collect(),
        }
    }

    /// Sum of `name`'s samples whose labels include all of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.matches(name, labels))
            .map(|s| s.value)
            .sum()
    }

    /// Cumulative buckets `(le, count)` of histogram `name` summed over the
    /// series matching `labels`, sorted by `le`.
    pub fn buckets(&self, name: &str, labels: &[(&str, &str)]) -> Vec<(f64, f64)> {
        let bucket = format!("{name}_bucket");
        let mut by_le: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        for s in self.samples.iter().filter(|s| s.matches(&bucket, labels)) {
            let le = match s.label("le") {
                Some("+Inf") => f64::INFINITY,
                Some(v) => match v.parse::<f64>() {
                    Ok(x) => x,
                    Err(_) => continue,
                },
                None => continue,
            };
            let e = by_le.entry(le.to_bits()).or_insert((le, 0.0));
            e.1 += s.value;
        }
        let mut v: Vec<(f64, f64)> = by_le.into_values().collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    }

    /// The `q` quantile of histogram `name` (as Prometheus'
    /// `histogram_quantile`: linear within the bucket), in seconds.
    pub fn quantile(&self, name: &str, labels: &[(&str, &str)], q: f64) -> Option<f64> {
        quantile_of(&self.buckets(name, labels), q)
    }

    /// The element-wise difference `self - earlier` (counters and
    /// histogram buckets over an interval).
    pub fn since(&self, earlier: &Metrics) -> Metrics {
        let samples = self
            .samples
            .iter()
            .map(|s| {
                let before = earlier
                    .samples
                    .iter()
                    .find(|e| e.name == s.name && e.labels == s.labels)
                    .map_or(0.0, |e| e.value);
                Sample {
                    value: s.value - before,
                    ..s.clone()
                }
            })
            .collect();
        Metrics { samples }
    }
}

/// Per-node differences `after - before` of two scrapes of every node.
pub fn deltas(after: &[Metrics], before: &[Metrics]) -> Vec<Metrics> {
    after.iter().zip(before).map(|(a, b)| a.since(b)).collect()
}

/// Sum of `name` with `labels` over several nodes' metrics.
pub fn sum_all(ms: &[Metrics], name: &str, labels: &[(&str, &str)]) -> f64 {
    ms.iter().map(|m| m.sum(name, labels)).sum()
}

/// Sums of `name` over several nodes' metrics grouped by the value of
/// label `by` (zero sums left out), as `value=sum, ...`.
pub fn by_label(ms: &[Metrics], name: &str, by: &str) -> String {
    let mut groups: BTreeMap<String, f64> = BTreeMap::new();
    for m in ms {
        for s in m.samples.iter().filter(|s| s.name == name) {
            *groups
                .entry(s.label(by).unwrap_or("-").to_owned())
                .or_default() += s.value;
        }
    }
    let parts: Vec<String> = groups
        .into_iter()
        .filter(|(_, v)| *v != 0.0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if parts.is_empty() {
        "none".to_owned()
    } else {
        parts.join(", ")
    }
}

/// `histogram_quantile` over cumulative `(le, count)` buckets.
pub fn quantile_of(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total;
    let mut prev_le = 0.0;
    let mut prev_count = 0.0;
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(prev_le);
            }
            let in_bucket = count - prev_count;
            if in_bucket <= 0.0 {
                return Some(le);
            }
            return Some(prev_le + (le - prev_le) * (rank - prev_count) / in_bucket);
        }
        prev_le = if le.is_finite() { le } else { prev_le };
        prev_count = count;
    }
    Some(prev_le)
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => return None,
    };
    let mut labels = Vec::new();
    let rest = if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices();
        let end;
        loop {
            // key
            let mut key = String::new();
            let mut c = chars.next()?;
            while c.1 == ' ' || c.1 == ',' {
                c = chars.next()?;
            }
            if c.1 == '}' {
                end = c.0 + 1;
                break;
            }
            while c.1 != '=' {
                key.push(c.1);
                c = chars.next()?;
            }
            let (_, q) = chars.next()?;
            if q != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                let (_, ch) = chars.next()?;
                match ch {
                    '\\' => {
                        let (_, esc) = chars.next()?;
                        value.push(match esc {
                            'n' => '\n',
                            other => other,
                        });
                    }
                    '"' => break,
                    other => value.push(other),
                }
            }
            labels.push((key.trim().to_owned(), value));
        }
        body.get(end..)?
    } else {
        rest
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: tests; a failure should fail the test loudly.

    use super::*;

    const EXPO: &str = r#"# HELP tern_router_fallbacks_total Calls...
# TYPE tern_router_fallbacks_total counter
tern_router_fallbacks_total{service="vm",method="Stop",reason="transport_error"} 3
tern_router_fallbacks_total{service="raft",method="Append",reason="breaker_open"} 4
tern_transport_call_seconds_bucket{transport="iroh",side="client",le="0.001"} 10
tern_transport_call_seconds_bucket{transport="iroh",side="client",le="0.01"} 90
tern_transport_call_seconds_bucket{transport="iroh",side="client",le="+Inf"} 100
tern_transport_call_seconds_sum{transport="iroh",side="client"} 0.5
weird{a="x\"y,z}"} 1.5
process_threads 12
garbage line
"#;

    #[test]
    fn exposition_parses() {
        let m = Metrics::parse(EXPO);
        assert_eq!(m.sum("tern_router_fallbacks_total", &[]), 7.0);
        assert_eq!(
            m.sum("tern_router_fallbacks_total", &[("service", "vm")]),
            3.0
        );
        assert_eq!(m.sum("process_threads", &[]), 12.0);
        assert_eq!(m.sum("weird", &[("a", "x\"y,z}")]), 1.5);
        let b = m.buckets("tern_transport_call_seconds", &[("transport", "iroh")]);
        assert_eq!(b.len(), 3);
        let p50 = m
            .quantile("tern_transport_call_seconds", &[("transport", "iroh")], 0.5)
            .unwrap();
        assert!((p50 - 0.0055).abs() < 1e-9, "{p50}");
        // Beyond the last finite bucket: its bound.
        let p99 = m
            .quantile("tern_transport_call_seconds", &[], 0.99)
            .unwrap();
        assert!((p99 - 0.01).abs() < 1e-9, "{p99}");
        assert_eq!(quantile_of(&[], 0.5), None);
    }

    #[test]
    fn since_subtracts() {
        let a = Metrics::parse("x{a=\"1\"} 2\ny 1\n");
        let b = Metrics::parse("x{a=\"1\"} 5\ny 1\nz 3\n");
        let d = b.since(&a);
        assert_eq!(d.sum("x", &[]), 3.0);
        assert_eq!(d.sum("y", &[]), 0.0);
        assert_eq!(d.sum("z", &[]), 3.0);
    }

    proptest::proptest! {
        /// Any text parses without a panic, and every sample it yields
        /// has a name.
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,400}") {
            let m = Metrics::parse(&text);
            for s in &m.samples {
                proptest::prop_assert!(!s.name.is_empty());
            }
            let _ = m.quantile("x", &[], 0.99);
        }

        /// Lines of the exposition's shape parse back to their values.
        #[test]
        fn well_formed_lines_parse(name in "[a-z_]{1,20}", key in "[a-z]{1,8}", value in "[a-z0-9 ,]{0,12}", v in -1e9f64..1e9) {
            let text = format!("{name}{{{key}=\"{value}\"}} {v}\n");
            let m = Metrics::parse(&text);
            proptest::prop_assert_eq!(m.sum(&name, &[(key.as_str(), value.as_str())]), v);
        }
    }
}
