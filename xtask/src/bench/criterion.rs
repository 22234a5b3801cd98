//! Criterion's figures, converted into report rows.
//!
//! Figures come from criterion's own files (`target/criterion/**/new/`,
//! the median of the samples), so its HTML reports under
//! `target/criterion/report/` stay available beside ours. A figure whose
//! files are older than the run is stale (left from an earlier run) and is
//! not reported as this run's.

use std::path::Path;
use std::time::SystemTime;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::model::{Better, Row, Values};

/// How a criterion figure is read.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// Time per iteration (ns).
    Time,
    /// The bench's declared throughput per second (bytes or elements).
    Rate,
}

/// A report row built from criterion ids.
struct Spec {
    id: &'static str,
    section: &'static str,
    name: &'static str,
    unit: &'static str,
    kind: Kind,
    iroh: Option<&'static str>,
    grpc: Option<&'static str>,
    raw_iroh: Option<&'static str>,
    raw_grpc: Option<&'static str>,
    /// Transport-independent figure.
    ours: Option<&'static str>,
    /// Transport-independent baseline.
    raw: Option<&'static str>,
    seed: Option<f64>,
    note: &'static str,
}

const NONE: Spec = Spec {
    id: "",
    section: "",
    name: "",
    unit: "ns",
    kind: Kind::Time,
    iroh: None,
    grpc: None,
    raw_iroh: None,
    raw_grpc: None,
    ours: None,
    raw: None,
    seed: None,
    note: "",
};

const WIRE: &str = "Wire format (criterion, one process)";
const ONE_PROCESS: &str = "Calls inside one process (criterion)";
const RAFT: &str = "Raft inside one process (criterion)";
const STREAMS: &str = "Streams inside one process (criterion)";

const SPECS: &[Spec] = &[
    Spec {
        id: "heartbeat_encode_decode",
        section: WIRE,
        name: "heartbeat frame encode+decode (header + empty AppendEntries)",
        ours: Some("raft/heartbeat_encode_decode"),
        seed: Some(382.0),
        note: "same code for both transports; target <= 40 ns",
        ..NONE
    },
    Spec {
        id: "frame_header_encode_decode",
        section: WIRE,
        name: "frame header encode+decode",
        ours: Some("frame/header_encode_decode"),
        note: "same code for both transports",
        ..NONE
    },
    Spec {
        id: "frame_1mib_encode_decode",
        section: WIRE,
        name: "1 MiB frame encode+decode",
        unit: "bytes/s",
        kind: Kind::Rate,
        ours: Some("frame/1mib_encode_decode"),
        raw: Some("frame/1mib_memcpy_baseline"),
        seed: Some(12.5e9),
        note: "the payload is not copied, so this exceeds memory bandwidth; raw = one memcpy of 1 MiB",
        ..NONE
    },
    Spec {
        id: "endpoint_create_bind",
        section: ONE_PROCESS,
        name: "endpoint create+bind",
        iroh: Some("iroh/endpoint/create_bind"),
        raw_iroh: Some("iroh/endpoint/raw_create_bind"),
        seed: Some(2.3e6),
        note: "gRPC has no endpoint to create",
        ..NONE
    },
    Spec {
        id: "connect_and_first_call_raw",
        section: ONE_PROCESS,
        name: "connection establishment + first call (raw iroh, no 0-RTT)",
        raw_iroh: Some("iroh/handshake/raw_connect_and_call"),
        note: "a full handshake (no session to resume); resumed connections with 0-RTT are the two-process rows",
        ..NONE
    },
    Spec {
        id: "unary_small_1proc",
        section: ONE_PROCESS,
        name: "unary call, small payload",
        iroh: Some("iroh/unary/small_payload"),
        grpc: Some("grpc/unary/small_payload"),
        raw_iroh: Some("iroh/unary/raw_baseline"),
        raw_grpc: Some("grpc/unary/raw_baseline"),
        note: "criterion median of the mean time per call",
        ..NONE
    },
    Spec {
        id: "concurrent_64_1proc",
        section: ONE_PROCESS,
        name: "calls/s with 64 concurrent callers",
        unit: "calls/s",
        kind: Kind::Rate,
        iroh: Some("iroh/concurrent/64_callers"),
        grpc: Some("grpc/concurrent/64_callers"),
        raw_iroh: Some("iroh/concurrent/raw_baseline"),
        raw_grpc: Some("grpc/concurrent/raw_baseline"),
        ..NONE
    },
    Spec {
        id: "bulk_64mib_1proc",
        section: ONE_PROCESS,
        name: "bulk transfer, 64 MiB",
        unit: "bytes/s",
        kind: Kind::Rate,
        iroh: Some("iroh/bulk/64mib"),
        grpc: Some("grpc/bulk/64mib"),
        raw_iroh: Some("iroh/bulk/raw_baseline"),
        raw_grpc: Some("grpc/bulk/raw_baseline"),
        ..NONE
    },
    Spec {
        id: "control_during_bulk_1proc",
        section: ONE_PROCESS,
        name: "control call (Vote) while a bulk transfer runs",
        iroh: Some("iroh/control_during_bulk/vote"),
        grpc: Some("grpc/control_during_bulk/vote"),
        ..NONE
    },
    Spec {
        id: "raft_commit_1_writer_1proc",
        section: RAFT,
        name: "commits/s, 3 nodes, 1 writer",
        unit: "commits/s",
        kind: Kind::Rate,
        iroh: Some("raft/commit_1_writer/iroh"),
        grpc: Some("raft/commit_1_writer/grpc"),
        seed: Some(33e3),
        note: "real transports on loopback and synced log writes; seed: openraft's bench, no network, no disk",
        ..NONE
    },
    Spec {
        id: "raft_commit_64_writers_1proc",
        section: RAFT,
        name: "commits/s, 3 nodes, 64 writers",
        unit: "commits/s",
        kind: Kind::Rate,
        iroh: Some("raft/commit_64_writers/iroh"),
        grpc: Some("raft/commit_64_writers/grpc"),
        seed: Some(912e3),
        note: "real transports on loopback and synced log writes; seed: openraft's bench, no network, no disk",
        ..NONE
    },
    Spec {
        id: "stream_rate_1kib_1proc",
        section: STREAMS,
        name: "messages/s on one stream, 1 KiB messages (echoed)",
        unit: "msgs/s",
        kind: Kind::Rate,
        iroh: Some("stream/rate_1kib/iroh"),
        grpc: Some("stream/rate_1kib/grpc"),
        raw_iroh: Some("stream/rate_1kib/raw_iroh"),
        raw_grpc: Some("stream/rate_1kib/raw_grpc"),
        note: "goal: iroh >= 1.0x gRPC and >= 0.9x raw iroh",
        ..NONE
    },
    Spec {
        id: "stream_round_trip_1kib_1proc",
        section: STREAMS,
        name: "per-message round trip on an open stream, 1 KiB (median = p50)",
        iroh: Some("stream/round_trip_1kib/iroh"),
        grpc: Some("stream/round_trip_1kib/grpc"),
        raw_iroh: Some("stream/round_trip_1kib/raw_iroh"),
        raw_grpc: Some("stream/round_trip_1kib/raw_grpc"),
        note: "p99 is printed by the bench (benches/benches/streams.rs)",
        ..NONE
    },
    Spec {
        id: "stream_rate_64kib_1proc",
        section: STREAMS,
        name: "messages/s on one stream, 64 KiB messages (echoed)",
        unit: "msgs/s",
        kind: Kind::Rate,
        iroh: Some("stream/rate_64kib/iroh"),
        grpc: Some("stream/rate_64kib/grpc"),
        raw_iroh: Some("stream/rate_64kib/raw_iroh"),
        raw_grpc: Some("stream/rate_64kib/raw_grpc"),
        note: "goal: iroh >= 1.0x gRPC and >= 0.9x raw iroh",
        ..NONE
    },
    Spec {
        id: "stream_round_trip_64kib_1proc",
        section: STREAMS,
        name: "per-message round trip on an open stream, 64 KiB (median = p50)",
        iroh: Some("stream/round_trip_64kib/iroh"),
        grpc: Some("stream/round_trip_64kib/grpc"),
        raw_iroh: Some("stream/round_trip_64kib/raw_iroh"),
        raw_grpc: Some("stream/round_trip_64kib/raw_grpc"),
        note: "p99 is printed by the bench (benches/benches/streams.rs)",
        ..NONE
    },
];

/// One criterion measurement as found on disk.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Figure {
    /// Criterion's `full_id` (`group/function`).
    pub(crate) id: String,
    /// Median time per iteration, ns.
    pub(crate) median_ns: f64,
    /// Declared throughput per iteration (bytes or elements), if any.
    pub(crate) throughput_per_iter: Option<f64>,
    /// Whether it was measured in this run (not left from an earlier one).
    pub(crate) fresh: bool,
}

impl Figure {
    fn value(&self, kind: Kind) -> Option<f64> {
        match kind {
            Kind::Time => Some(self.median_ns),
            Kind::Rate => self
                .throughput_per_iter
                .map(|n| n / (self.median_ns * 1e-9)),
        }
    }
}

fn read_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Every criterion figure under `criterion` (the `target/criterion`
/// directory). Figures written before `since` are marked stale.
pub(crate) fn collect(criterion: &Path, since: Option<SystemTime>) -> anyhow::Result<Vec<Figure>> {
    let mut found = Vec::new();
    let mut stack = vec![criterion.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if !path.is_dir() {
                continue;
            }
            if path.file_name().is_none_or(|n| n != "new") {
                stack.push(path);
                continue;
            }
            let meta_path = path.join("benchmark.json");
            if !meta_path.exists() {
                continue;
            }
            let meta = read_json(&meta_path)?;
            let estimates = read_json(&path.join("estimates.json"))?;
            let median_ns = estimates["median"]["point_estimate"]
                .as_f64()
                .with_context(|| format!("no median in {}", path.display()))?;
            let throughput_per_iter = meta["throughput"]
                .as_object()
                .and_then(|t| t.values().next())
                .and_then(serde_json::Value::as_f64);
            let modified = std::fs::metadata(path.join("estimates.json"))
                .and_then(|m| m.modified())
                .ok();
            let fresh = match (since, modified) {
                (Some(since), Some(modified)) => modified >= since,
                (Some(_), None) => false,
                (None, _) => true,
            };
            found.push(Figure {
                id: meta["full_id"].as_str().unwrap_or_default().to_owned(),
                median_ns,
                throughput_per_iter,
                fresh,
            });
        }
    }
    found.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(found)
}

/// The report rows, from this run's figures only. A row none of whose
/// figures was measured in this run is left out.
pub(crate) fn rows(figures: &[Figure]) -> Vec<Row> {
    let mut rows = Vec::new();
    for spec in SPECS {
        let get = |id: Option<&str>| {
            let id = id?;
            figures
                .iter()
                .find(|f| f.id == id && f.fresh)
                .and_then(|f| f.value(spec.kind))
        };
        let values = Values {
            iroh: get(spec.iroh),
            grpc: get(spec.grpc),
            raw_iroh: get(spec.raw_iroh),
            raw_grpc: get(spec.raw_grpc),
            ours: get(spec.ours),
            raw: get(spec.raw),
            seed: spec.seed,
            ..Values::default()
        };
        let measured = [
            values.iroh,
            values.grpc,
            values.raw_iroh,
            values.raw_grpc,
            values.ours,
            values.raw,
        ]
        .iter()
        .any(Option::is_some);
        if !measured {
            continue;
        }
        rows.push(Row {
            id: spec.id.to_owned(),
            section: spec.section.to_owned(),
            name: spec.name.to_owned(),
            unit: spec.unit.to_owned(),
            better: match spec.kind {
                Kind::Time => Better::Lower,
                Kind::Rate => Better::Higher,
            },
            values,
            percentile: None,
            note: spec.note.to_owned(),
            source: "criterion".to_owned(),
        });
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figure(id: &str, ns: f64, per_iter: Option<f64>) -> Figure {
        Figure {
            id: id.to_owned(),
            median_ns: ns,
            throughput_per_iter: per_iter,
            fresh: true,
        }
    }

    #[test]
    fn criterion_figures_become_rows_with_both_transports() {
        let figures = vec![
            figure("iroh/unary/small_payload", 70_000.0, Some(1.0)),
            figure("grpc/unary/small_payload", 110_000.0, Some(1.0)),
            figure("iroh/concurrent/64_callers", 1e6, Some(64.0)),
            Figure {
                fresh: false,
                ..figure("grpc/concurrent/64_callers", 1e6, Some(64.0))
            },
        ];
        let rows = rows(&figures);
        assert_eq!(rows.len(), 2, "only rows with a fresh figure: {rows:?}");
        assert_eq!(rows[0].values.iroh, Some(70_000.0));
        assert_eq!(rows[0].values.grpc, Some(110_000.0));
        assert_eq!(rows[0].better, Better::Lower);
        // 64 calls per iteration of 1 ms = 64 000 calls/s; the stale gRPC
        // figure is not reported as this run's.
        assert_eq!(rows[1].values.iroh, Some(64_000.0));
        assert_eq!(rows[1].values.grpc, None);
        assert_eq!(rows[1].better, Better::Higher);
    }
}
