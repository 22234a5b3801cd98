//! The row model every source of figures is converted into, and the
//! record of a run.
//!
//! The rows, charts and part files are the `tern-bench-part` crate's, the
//! one format every producer (`tern-bench transport`, `tern-bench
//! cluster`) writes; criterion's figures are converted into the same
//! [`Row`]s (see `criterion.rs`), so the report renders one model. What is
//! this report's own: [`Merged`] (every source's rows and charts of one
//! run) and [`RunRecord`] (what ran, how it ended).

use serde::{Deserialize, Serialize};

pub(crate) use tern_bench_part::{Better, Curve, Distribution, Part, Row, Series, Values};

/// Everything the report renders: the merged rows and charts of one run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Merged {
    /// Rows in report order.
    pub(crate) rows: Vec<Row>,
    /// Latency distributions of every part.
    pub(crate) distributions: Vec<Distribution>,
    /// Curves of every part.
    pub(crate) curves: Vec<Curve>,
    /// Problems found while merging (duplicate ids, unknown keys).
    pub(crate) warnings: Vec<String>,
}

impl Merged {
    /// Adds one source's figures; duplicate row ids are dropped with a
    /// warning (the first one stays).
    pub(crate) fn add(
        &mut self,
        rows: Vec<Row>,
        distributions: Vec<Distribution>,
        curves: Vec<Curve>,
    ) {
        for row in rows {
            if let Some(first) = self.rows.iter().find(|r| r.id == row.id) {
                self.warnings.push(format!(
                    "row id {:?} of {} duplicates one of {}; the second was dropped",
                    row.id, row.source, first.source
                ));
                continue;
            }
            if !row.values.unknown.is_empty() {
                let keys: Vec<&str> = row.values.unknown.keys().map(String::as_str).collect();
                self.warnings.push(format!(
                    "row {:?} of {} has value keys this report does not know: {} (kept in report.json only)",
                    row.id,
                    row.source,
                    keys.join(", ")
                ));
            }
            self.rows.push(row);
        }
        self.distributions.extend(distributions);
        self.curves.extend(curves);
    }

    /// Section names in order of first appearance.
    pub(crate) fn sections(&self) -> Vec<&str> {
        let mut sections: Vec<&str> = Vec::new();
        for row in &self.rows {
            if !sections.contains(&row.section.as_str()) {
                sections.push(&row.section);
            }
        }
        sections
    }
}

/// How a step of the run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum StepState {
    /// Started, never finished (the run was interrupted).
    Running,
    /// Finished and wrote its figures.
    Ok,
    /// Failed; its message says why. The run is incomplete.
    Failed,
    /// Not selected by `--only`.
    NotRun,
}

/// One step of a run: a build, a producer or a criterion bench.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct StepRecord {
    /// What ran (`build`, `transport`, `cluster`, `criterion frame`, ...).
    pub(crate) name: String,
    /// How it ended.
    pub(crate) state: StepState,
    /// Why it failed or was not run; empty when it succeeded.
    pub(crate) message: String,
    /// Wall-clock time it took.
    pub(crate) seconds: f64,
}

/// What was run, how and where: written when a run starts and again when
/// it ends (`target/bench-report/run.json`), so `--report-only` renders the
/// same report.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct RunRecord {
    /// The cargo profile everything was built with.
    pub(crate) profile: String,
    /// Whether `--quick` was used.
    pub(crate) quick: bool,
    /// The sources selected with `--only` (empty: all).
    pub(crate) only: Vec<String>,
    /// Seconds since the Unix epoch when the run started.
    pub(crate) started_unix: u64,
    /// When it ended, if it did.
    pub(crate) finished_unix: Option<u64>,
    /// The machine and the tree.
    pub(crate) machine: super::machine::Machine,
    /// The steps in the order they ran.
    pub(crate) steps: Vec<StepRecord>,
}

impl RunRecord {
    /// Whether some figure this run should have produced is missing.
    pub(crate) fn incomplete(&self) -> bool {
        self.finished_unix.is_none()
            || self
                .steps
                .iter()
                .any(|s| matches!(s.state, StepState::Running | StepState::Failed))
    }

    /// Whether the figures come from an unoptimised build.
    pub(crate) fn debug_build(&self) -> bool {
        matches!(self.profile.as_str(), "dev" | "test" | "debug")
    }
}
