//! The row model every source of figures is converted into, and the "part"
//! files the producer programs write.
//!
//! A part file (`target/bench-report/parts/<source>.json`) is the contract
//! between a producer (`tern-bench transport`, `tern-lab bench-cluster`) and
//! this report: `source`, `profile`, `quick`, then `rows`, `distributions`
//! and `curves`. Criterion's figures are converted into the same [`Row`]s
//! (see `criterion.rs`), so the report renders one model.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// Which way a figure improves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Better {
    /// Smaller is better (latency, time, memory).
    Lower,
    /// Larger is better (throughput).
    Higher,
}

/// The values of one row, one per column. Absent or `null`: not
/// applicable, or could not be measured (the row's note says which).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Values {
    /// Ours over iroh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) iroh: Option<f64>,
    /// Ours over gRPC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) grpc: Option<f64>,
    /// The raw iroh baseline (QUIC without our protocol), same run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) raw_iroh: Option<f64>,
    /// The raw gRPC baseline (tonic without our protocol), same run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) raw_grpc: Option<f64>,
    /// Ours with the dual router.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) dual: Option<f64>,
    /// The seed's figure (measured elsewhere, not in this run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) seed: Option<f64>,
    /// Ours where the code is the same for both transports (frame codec).
    /// Not part of the producers' contract; criterion rows use it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ours: Option<f64>,
    /// A transport-independent raw baseline (memcpy). Criterion rows only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) raw: Option<f64>,
    /// Keys this report does not know; kept in the JSON, named in a warning.
    #[serde(flatten)]
    pub(crate) unknown: BTreeMap<String, serde_json::Value>,
}

/// One figure of the report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Row {
    /// Stable and unique across all sources.
    pub(crate) id: String,
    /// The report's section (rows are grouped by it, in order of appearance).
    pub(crate) section: String,
    /// What the figure is, in words.
    pub(crate) name: String,
    /// `ns`, `bytes/s`, `calls/s`, `commits/s`, `s`, `bytes` or `count`.
    pub(crate) unit: String,
    /// Which way the figure improves.
    pub(crate) better: Better,
    /// The columns.
    pub(crate) values: Values,
    /// 50 or 99 when the row is a latency percentile.
    #[serde(default)]
    pub(crate) percentile: Option<f64>,
    /// Free text shown in the report.
    #[serde(default)]
    pub(crate) note: String,
    /// Which producer measured it (`criterion`, `transport-2proc`, ...); set
    /// when merging, not read from part files.
    #[serde(default)]
    pub(crate) source: String,
}

/// Points of one line in a chart: `[x, y]`.
pub(crate) type Series = BTreeMap<String, Vec<(f64, f64)>>;

/// A latency distribution: for each transport, `[percentile, value]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Distribution {
    /// Unique id; also the chart's file name.
    pub(crate) id: String,
    /// The chart's title.
    pub(crate) title: String,
    /// Unit of the values (`ns` or `s`).
    pub(crate) unit: String,
    /// One line per transport.
    pub(crate) series: Series,
}

/// Throughput against concurrency: for each series, `[concurrency, rate]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Curve {
    /// Unique id; also the chart's file name.
    pub(crate) id: String,
    /// The chart's title.
    pub(crate) title: String,
    /// What x counts.
    pub(crate) x: String,
    /// What y measures.
    pub(crate) y: String,
    /// One line per series.
    pub(crate) series: Series,
}

/// One producer's output file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Part {
    /// The producer's unique name; also the file's stem.
    pub(crate) source: String,
    /// The cargo profile the producer was built with.
    pub(crate) profile: String,
    /// Whether `--quick` was used.
    pub(crate) quick: bool,
    /// Figures.
    #[serde(default)]
    pub(crate) rows: Vec<Row>,
    /// Latency distributions (charts).
    #[serde(default)]
    pub(crate) distributions: Vec<Distribution>,
    /// Throughput-vs-concurrency curves (charts).
    #[serde(default)]
    pub(crate) curves: Vec<Curve>,
}

impl Part {
    /// Parses a part file, naming the file in every error.
    pub(crate) fn read(path: &Path) -> anyhow::Result<Part> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading part file {}", path.display()))?;
        Part::parse(&text).with_context(|| {
            format!(
                "part file {} does not follow the part format (see xtask/src/bench/model.rs)",
                path.display()
            )
        })
    }

    /// Parses and checks a part's text.
    pub(crate) fn parse(text: &str) -> anyhow::Result<Part> {
        let mut part: Part = serde_json::from_str(text)?;
        if part.source.is_empty() {
            bail!("\"source\" is empty");
        }
        for row in &mut part.rows {
            row.source.clone_from(&part.source);
            if row.id.is_empty() {
                bail!("a row of {} has an empty id", part.source);
            }
        }
        Ok(part)
    }
}

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
