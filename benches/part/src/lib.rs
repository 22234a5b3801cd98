//! The bench part file: what one producer measured, in the one format
//! every producer writes (`tern-bench transport`, `tern-bench cluster`)
//! and `cargo xtask bench` reads and merges into its report.
//!
//! A part file is `target/bench-report/parts/<source>.json` holding a
//! [`Part`]: `source`, `profile`, `quick`, then [`Row`]s (the report's
//! table), [`Distribution`]s and [`Curve`]s (its charts). Criterion's
//! figures are converted by xtask into the same [`Row`]s, so the report
//! renders one model. A value that could not be measured is absent (or
//! `null`) with a note saying why; no producer writes a made-up number.
//!
//! Before this crate the format was written down three times (the
//! transport producer's structs, xtask's structs, and untyped JSON in the
//! cluster producer); now a producer cannot write what xtask cannot read.
//!
//! # Layout
//!
//! One module: the types ([`Part`], [`Row`], [`Values`], [`Better`],
//! [`Distribution`], [`Curve`]), reading and checking ([`Part::parse`],
//! [`Part::read`]), writing ([`Part::write`]) and [`build_profile`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Which way a figure improves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    /// Smaller is better (latency, time, memory).
    Lower,
    /// Larger is better (throughput).
    Higher,
}

/// The values of one row, one per column. Absent or `null`: not
/// applicable, or could not be measured (the row's note says which).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Values {
    /// Ours over iroh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iroh: Option<f64>,
    /// Ours over gRPC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<f64>,
    /// The raw iroh baseline (QUIC without our protocol), same run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_iroh: Option<f64>,
    /// The raw gRPC baseline (tonic without our protocol), same run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_grpc: Option<f64>,
    /// Ours with the dual router.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dual: Option<f64>,
    /// The seed's figure (measured elsewhere, not in this run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<f64>,
    /// etcd 3.4 doing the same work on the same machine in the same run
    /// (cluster rows only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd: Option<f64>,
    /// Ours where the code is the same for both transports (frame codec).
    /// Criterion rows only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ours: Option<f64>,
    /// A transport-independent raw baseline (memcpy). Criterion rows only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<f64>,
    /// Keys this format does not know; kept in the JSON, named in a
    /// warning by the report.
    #[serde(flatten)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

impl Values {
    /// The value of `column` by its name (see [`Values::column_mut`]);
    /// `None` for a column this format does not name.
    pub fn column(&self, column: &str) -> Option<Option<f64>> {
        Some(match column {
            "iroh" => self.iroh,
            "grpc" => self.grpc,
            "raw_iroh" => self.raw_iroh,
            "raw_grpc" => self.raw_grpc,
            "dual" => self.dual,
            "seed" => self.seed,
            "etcd" => self.etcd,
            "ours" => self.ours,
            "raw" => self.raw,
            _ => return None,
        })
    }

    /// The value of `column` by its name (`iroh`, `grpc`, `raw_iroh`,
    /// `raw_grpc`, `dual`, `seed`, `etcd`, `ours`, `raw`); `None` for any other.
    pub fn column_mut(&mut self, column: &str) -> Option<&mut Option<f64>> {
        Some(match column {
            "iroh" => &mut self.iroh,
            "grpc" => &mut self.grpc,
            "raw_iroh" => &mut self.raw_iroh,
            "raw_grpc" => &mut self.raw_grpc,
            "dual" => &mut self.dual,
            "seed" => &mut self.seed,
            "etcd" => &mut self.etcd,
            "ours" => &mut self.ours,
            "raw" => &mut self.raw,
            _ => return None,
        })
    }

    /// Values from `(column, value)` pairs; a column this format does not
    /// name is kept in [`Values::unknown`] (and so reported as such).
    pub fn from_columns<K: AsRef<str>>(
        columns: impl IntoIterator<Item = (K, Option<f64>)>,
    ) -> Values {
        let mut v = Values::default();
        for (column, value) in columns {
            let column = column.as_ref();
            match v.column_mut(column) {
                Some(slot) => *slot = value,
                None => {
                    v.unknown.insert(
                        column.to_owned(),
                        value.map_or(serde_json::Value::Null, serde_json::Value::from),
                    );
                }
            }
        }
        v
    }
}

/// One figure of the report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// Stable and unique across all sources; the report's rows are
    /// compared across runs by it.
    pub id: String,
    /// The report's section (rows are grouped by it, in order of appearance).
    pub section: String,
    /// What the figure is, in words.
    pub name: String,
    /// `ns`, `bytes/s`, `calls/s`, `commits/s`, `s`, `bytes` or `count`.
    pub unit: String,
    /// Which way the figure improves.
    pub better: Better,
    /// The columns.
    pub values: Values,
    /// 50 or 99 when the row is a latency percentile.
    #[serde(default)]
    pub percentile: Option<f64>,
    /// Free text shown in the report.
    #[serde(default)]
    pub note: String,
    /// Which producer measured it (`criterion`, `transport-2proc`, ...):
    /// set from the part's `source` when read, never written by producers.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
}

/// Points of the lines of one chart, by series: `[x, y]`.
pub type Series = BTreeMap<String, Vec<(f64, f64)>>;

/// A latency distribution: for each column, `[percentile, value]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Distribution {
    /// Unique id; also the chart's file name.
    pub id: String,
    /// The chart's title.
    pub title: String,
    /// Unit of the values (`ns` or `s`).
    pub unit: String,
    /// One line per column.
    pub series: Series,
}

/// Throughput against concurrency: for each series, `[concurrency, rate]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Curve {
    /// Unique id; also the chart's file name.
    pub id: String,
    /// The chart's title.
    pub title: String,
    /// What x counts.
    pub x: String,
    /// What y measures.
    pub y: String,
    /// One line per series.
    pub series: Series,
}

/// One producer's output file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Part {
    /// The producer's unique name; also the file's stem.
    pub source: String,
    /// The cargo profile the producer was built with ([`build_profile`]).
    pub profile: String,
    /// Whether `--quick` was used.
    pub quick: bool,
    /// Figures.
    #[serde(default)]
    pub rows: Vec<Row>,
    /// Latency distributions (charts).
    #[serde(default)]
    pub distributions: Vec<Distribution>,
    /// Throughput-vs-concurrency curves (charts).
    #[serde(default)]
    pub curves: Vec<Curve>,
}

/// A part file that cannot be read, written or used.
#[derive(Debug, thiserror::Error)]
pub enum PartError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The text is not a part in this format.
    #[error("not a part file in the format of tern-bench-part: {0}")]
    Json(#[from] serde_json::Error),
    /// `source` is empty.
    #[error("\"source\" is empty")]
    NoSource,
    /// A row has no id.
    #[error("a row of {part} has an empty id")]
    NoRowId {
        /// The part's source.
        part: String,
    },
    /// A part file's text is at fault.
    #[error("part file {path}: {error}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        error: Box<PartError>,
    },
}

impl Part {
    /// Parses and checks a part's text; every row's `source` is set to the
    /// part's.
    pub fn parse(text: &str) -> Result<Part, PartError> {
        let mut part: Part = serde_json::from_str(text)?;
        if part.source.is_empty() {
            return Err(PartError::NoSource);
        }
        for row in &mut part.rows {
            row.source.clone_from(&part.source);
            if row.id.is_empty() {
                return Err(PartError::NoRowId {
                    part: part.source.clone(),
                });
            }
        }
        Ok(part)
    }

    /// Reads and checks a part file.
    pub fn read(path: &Path) -> Result<Part, PartError> {
        let text = std::fs::read_to_string(path).map_err(|source| PartError::Io {
            path: path.to_owned(),
            source,
        })?;
        Part::parse(&text).map_err(|error| PartError::File {
            path: path.to_owned(),
            error: Box::new(error),
        })
    }

    /// Writes the part as pretty JSON to `path`, creating its directory.
    pub fn write(&self, path: &Path) -> Result<(), PartError> {
        let io = |source| PartError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(path, json + "\n").map_err(io)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_part_reads_back_with_sources_set() {
        let part = Part {
            source: "cluster".into(),
            profile: build_profile().into(),
            quick: true,
            rows: vec![Row {
                id: "raft_commit_1_writer_3proc".into(),
                section: "Raft on 3 tern processes".into(),
                name: "Raft commits/s, 1 writer".into(),
                unit: "commits/s".into(),
                better: Better::Higher,
                values: Values::from_columns([("grpc", Some(900.0)), ("iroh", None)]),
                percentile: None,
                note: String::new(),
                source: String::new(),
            }],
            distributions: vec![],
            curves: vec![Curve {
                id: "c".into(),
                title: "t".into(),
                x: "writers".into(),
                y: "commits/s".into(),
                series: [("grpc".to_owned(), vec![(1.0, 100.0), (64.0, 900.0)])].into(),
            }],
        };
        let dir = std::env::temp_dir().join(format!("tern-bench-part-{}", std::process::id()));
        let path = dir.join("parts").join("cluster.json");
        part.write(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"better\": \"higher\""), "{text}");
        assert_eq!(
            text.matches("\"source\"").count(),
            1,
            "rows carry no source: {text}"
        );
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            json["curves"][0]["series"]["grpc"][0],
            serde_json::json!([1.0, 100.0]),
            "points are [x, y] arrays"
        );
        let back = Part::read(&path).unwrap();
        assert_eq!(back.rows[0].source, "cluster");
        assert_eq!(back.rows[0].values.grpc, Some(900.0));
        assert_eq!(back.curves, part.curves);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn unknown_columns_are_kept_and_bad_parts_refused() {
        let v = Values::from_columns([("raw_iroh", Some(1.0)), ("quic", Some(2.0))]);
        assert_eq!(v.raw_iroh, Some(1.0));
        assert_eq!(v.unknown["quic"], serde_json::json!(2.0));
        assert!(matches!(
            Part::parse(r#"{"source": "", "profile": "dev", "quick": true}"#),
            Err(PartError::NoSource)
        ));
        assert!(matches!(
            Part::parse(
                r#"{"source": "x", "profile": "dev", "quick": true, "rows": [{"id": "", "section": "s", "name": "n", "unit": "ns", "better": "lower", "values": {}}]}"#
            ),
            Err(PartError::NoRowId { .. })
        ));
        assert!(matches!(Part::parse("[]"), Err(PartError::Json(_))));
    }
}
