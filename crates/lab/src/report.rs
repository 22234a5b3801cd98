//! What a scenario tells the operator: one progress line per step, figures
//! and guarantee checks collected on the way, and at the end a summary
//! table and a verdict that becomes the exit code.
//!
//! A scenario calls [`Report::step`] before each step, [`Report::figure`]
//! for every measured value worth a row, and [`Report::check`] for every
//! guarantee (a failed check makes the run fail, but the scenario goes on
//! so that the table shows everything). Figures are reported, never
//! asserted: timings on a shared machine are data, not pass/fail.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// One row of the summary table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// What was measured or checked.
    pub what: String,
    /// The value.
    pub value: String,
    /// `Some(ok)` for a guarantee, `None` for a figure.
    pub verdict: Option<bool>,
}

/// A scenario's progress and summary.
#[derive(Debug)]
pub struct Report {
    scenario: String,
    started: Instant,
    step: usize,
    rows: Vec<Row>,
    notes: Vec<String>,
    quiet: bool,
}

impl Report {
    /// A report for `scenario`, printing progress to stdout.
    pub fn new(scenario: &str) -> Report {
        Report {
            scenario: scenario.to_owned(),
            started: Instant::now(),
            step: 0,
            rows: Vec::new(),
            notes: Vec::new(),
            quiet: false,
        }
    }

    /// A report that prints nothing (tests).
    pub fn quiet(scenario: &str) -> Report {
        Report {
            quiet: true,
            ..Report::new(scenario)
        }
    }

    /// The scenario's name.
    pub fn scenario(&self) -> &str {
        &self.scenario
    }

    /// Time since the report started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    fn line(&self, text: &str) {
        if !self.quiet {
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "[{:>7.1}s] {}: {text}",
                self.started.elapsed().as_secs_f64(),
                self.scenario
            );
            let _ = out.flush();
        }
    }

    /// Starts a numbered step and prints its progress line.
    pub fn step(&mut self, what: impl AsRef<str>) {
        self.step += 1;
        let text = format!("step {}: {}", self.step, what.as_ref());
        self.line(&text);
    }

    /// Prints a progress detail within the current step.
    pub fn info(&self, what: impl AsRef<str>) {
        self.line(&format!("  {}", what.as_ref()));
    }

    /// Records a measured figure (a row with no verdict).
    pub fn figure(&mut self, what: impl Into<String>, value: impl ToString) {
        let row = Row {
            what: what.into(),
            value: value.to_string(),
            verdict: None,
        };
        self.line(&format!("  {} = {}", row.what, row.value));
        self.rows.push(row);
    }

    /// Records the check every scenario ends with: each node stopped
    /// cleanly (`unclean` lists the node indices that did not, as returned by
    /// `Cluster::shutdown`); returns whether all did.
    pub fn stopped_cleanly(&mut self, unclean: &[usize]) -> bool {
        self.check(
            "every node stopped cleanly",
            unclean.is_empty(),
            format!("unclean: {unclean:?}"),
        )
    }

    /// Records a guarantee check; returns `ok`.
    pub fn check(&mut self, what: impl Into<String>, ok: bool, value: impl ToString) -> bool {
        let row = Row {
            what: what.into(),
            value: value.to_string(),
            verdict: Some(ok),
        };
        self.line(&format!(
            "  check {}: {} ({})",
            row.what,
            if ok { "ok" } else { "FAILED" },
            row.value
        ));
        self.rows.push(row);
        ok
    }

    /// Adds a note printed under the table (an explanation, a caveat).
    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    /// The rows so far.
    pub fn rows(&self) -> &[Row] {
        &self.rows
    }

    /// Whether every check passed (and there was at least one).
    pub fn passed(&self) -> bool {
        let checks: Vec<bool> = self.rows.iter().filter_map(|r| r.verdict).collect();
        !checks.is_empty() && checks.iter().all(|ok| *ok)
    }

    /// The summary table, with the verdict line; `error` is the error that
    /// ended the scenario early, if any.
    pub fn table(&self, error: Option<&str>) -> String {
        let what_w = self
            .rows
            .iter()
            .map(|r| r.what.chars().count())
            .max()
            .unwrap_or(0)
            .max(4);
        let value_w = self
            .rows
            .iter()
            .map(|r| r.value.chars().count())
            .max()
            .unwrap_or(0)
            .max(5);
        let mut s = String::new();
        let _ = writeln!(s, "\n== {} summary ==", self.scenario);
        let _ = writeln!(s, "{:<what_w$}  {:<value_w$}  check", "what", "value");
        let _ = writeln!(s, "{}  {}  -----", "-".repeat(what_w), "-".repeat(value_w));
        for r in &self.rows {
            let v = match r.verdict {
                None => "",
                Some(true) => "ok",
                Some(false) => "FAILED",
            };
            let _ = writeln!(s, "{:<what_w$}  {:<value_w$}  {v}", r.what, r.value);
        }
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        let verdict = match error {
            Some(e) => format!("FAIL: the scenario stopped early: {e}"),
            None if self.passed() => "PASS: every guarantee held".to_owned(),
            None if self.rows.iter().all(|r| r.verdict.is_none()) => {
                "FAIL: the scenario checked no guarantee".to_owned()
            }
            None => {
                let failed: Vec<&str> = self
                    .rows
                    .iter()
                    .filter(|r| r.verdict == Some(false))
                    .map(|r| r.what.as_str())
                    .collect();
                format!("FAIL: {}", failed.join("; "))
            }
        };
        let _ = writeln!(
            s,
            "{} ({}, {:.1}s)",
            verdict,
            self.scenario,
            self.started.elapsed().as_secs_f64()
        );
        s
    }
}

/// Latency samples and their percentiles.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    samples: Vec<Duration>,
}

impl Latencies {
    /// Adds a sample.
    pub fn push(&mut self, d: Duration) {
        self.samples.push(d);
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The `q` quantile (0..=1, nearest rank), if any sample.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.samples.is_empty() {
            return None;
        }
        let mut v = self.samples.clone();
        v.sort_unstable();
        let rank = (q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize;
        v.get(rank.saturating_sub(1).min(v.len() - 1)).copied()
    }

    /// The largest sample.
    pub fn max(&self) -> Option<Duration> {
        self.samples.iter().max().copied()
    }

    /// `p50 X ms, p99 Y ms (n=N)`.
    pub fn summary(&self) -> String {
        match (self.quantile(0.5), self.quantile(0.99)) {
            (Some(a), Some(b)) => {
                format!("p50 {} / p99 {} (n={})", ms(a), ms(b), self.samples.len())
            }
            _ => "no samples".to_owned(),
        }
    }
}

/// A duration in milliseconds with one decimal (`12.3 ms`).
pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_follows_the_checks() {
        let mut r = Report::quiet("t");
        assert!(!r.passed(), "no check is no pass");
        r.figure("calls", 10);
        assert!(!r.passed());
        assert!(
            r.table(None)
                .contains("FAIL: the scenario checked no guarantee")
        );
        assert!(r.check("no failed call", true, "0 of 10"));
        assert!(r.passed());
        assert!(r.table(None).contains("PASS"));
        assert!(!r.check("fallbacks counted", false, 0));
        assert!(!r.passed());
        let t = r.table(None);
        assert!(t.contains("FAIL: fallbacks counted"), "{t}");
        assert!(
            t.lines()
                .any(|l| l.starts_with("fallbacks counted  0 ") && l.ends_with("  FAILED")),
            "{t}"
        );
        assert!(r.table(Some("boom")).contains("stopped early: boom"));
    }

    #[test]
    fn quantiles() {
        let mut l = Latencies::default();
        assert_eq!(l.quantile(0.5), None);
        for i in 1..=100 {
            l.push(Duration::from_millis(i));
        }
        assert_eq!(l.quantile(0.5), Some(Duration::from_millis(50)));
        assert_eq!(l.quantile(0.99), Some(Duration::from_millis(99)));
        assert_eq!(l.quantile(1.0), Some(Duration::from_millis(100)));
        assert_eq!(l.max(), Some(Duration::from_millis(100)));
        assert!(l.summary().starts_with("p50 50.0 ms / p99 99.0 ms"));
    }
}
