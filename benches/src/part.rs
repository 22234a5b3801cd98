//! The bench part file: what one producer measured, merged by
//! `cargo xtask bench` into the report.
//!
//! Each producer writes one JSON file (`target/bench-report/parts/<source>.json`)
//! holding a [`Part`]. A value that could not be measured is `null` with a
//! note saying why; no producer writes a made-up number.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// One producer's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Part {
    /// Unique producer name (`transport-2proc`).
    pub source: String,
    /// Cargo profile the producer was built with (`release`, `dev`).
    pub profile: String,
    /// Whether the quick mode was used.
    pub quick: bool,
    /// The table rows.
    pub rows: Vec<Row>,
    /// Latency distributions, for the distribution charts.
    pub distributions: Vec<Distribution>,
    /// Throughput-vs-concurrency curves, for the curve charts.
    pub curves: Vec<Curve>,
}

/// One row of the report table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// Stable id, unique across all parts.
    pub id: String,
    /// Report section the row belongs to.
    pub section: String,
    /// What was measured, for people.
    pub name: String,
    /// One of `ns`, `bytes/s`, `calls/s`, `commits/s`, `s`, `bytes`, `count`.
    pub unit: String,
    /// `lower` or `higher`.
    pub better: String,
    /// Value per column (`iroh`, `grpc`, `raw_iroh`, `raw_grpc`, `dual`,
    /// `seed`); `None` is "could not be measured" or "not applicable".
    pub values: BTreeMap<String, Option<f64>>,
    /// 50 or 99 for a latency percentile row.
    pub percentile: Option<u8>,
    /// Free text shown in the report.
    pub note: String,
}

/// A latency distribution per column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Distribution {
    /// Stable id.
    pub id: String,
    /// Chart title.
    pub title: String,
    /// Unit of the values.
    pub unit: String,
    /// Points `[percentile, value]` per column.
    pub series: BTreeMap<String, Vec<[f64; 2]>>,
}

/// A throughput curve per column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Curve {
    /// Stable id.
    pub id: String,
    /// Chart title.
    pub title: String,
    /// Label of the x axis.
    pub x: String,
    /// Label of the y axis.
    pub y: String,
    /// Points `[x, y]` per column.
    pub series: BTreeMap<String, Vec<[f64; 2]>>,
}

/// The Cargo profile this program was built with, as far as it can tell:
/// `release` (also the `bench` profile) or `dev`.
pub fn build_profile() -> &'static str {
    if cfg!(debug_assertions) {
        "dev"
    } else {
        "release"
    }
}

impl Part {
    /// Writes the part as pretty JSON to `path`, creating its directory.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        use anyhow::Context;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the directory {}", dir.display()))?;
        }
        let json = serde_json::to_string_pretty(self).context("encoding the part as JSON")?;
        std::fs::write(path, json + "\n")
            .with_context(|| format!("writing the part file {}", path.display()))
    }
}
