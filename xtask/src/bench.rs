//! `cargo xtask bench`: run every criterion bench, then print one table.
//!
//! Each row names a figure, our measurement, the raw baseline measured in
//! the same run where one applies (so overhead is a ratio, not a guess), and
//! the seed's figure where it had one. Figures come from criterion's own
//! `estimates.json` files (median of the samples), so criterion's HTML
//! reports under `target/criterion` stay available beside the table.
//! The table is also written to `target/bench-report/report.md`, and the
//! raw numbers to `target/bench-report/report.json`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// How a figure is read.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// Time per iteration; smaller is better.
    Time,
    /// Bytes per second from the bench's declared throughput; larger is
    /// better.
    Bytes,
    /// Elements (calls) per second from the bench's declared throughput.
    Elements,
}

/// A row of the report.
struct Row {
    figure: &'static str,
    /// Criterion id: `group/function`.
    id: &'static str,
    kind: Kind,
    /// Raw baseline bench measured in the same run, if any.
    baseline: Option<&'static str>,
    /// The seed's figure in the row's unit (ns for time, bytes/s for rates).
    seed: Option<f64>,
    /// What the issue asks for, in words.
    target: &'static str,
}

const ROWS: &[Row] = &[
    Row {
        figure: "heartbeat frame encode+decode (header + empty AppendEntries)",
        id: "raft/heartbeat_encode_decode",
        kind: Kind::Time,
        baseline: None,
        seed: Some(382.0),
        target: "<= 40 ns",
    },
    Row {
        figure: "frame header encode+decode",
        id: "frame/header_encode_decode",
        kind: Kind::Time,
        baseline: None,
        seed: None,
        target: "",
    },
    Row {
        figure: "1 MiB frame encode+decode",
        id: "frame/1mib_encode_decode",
        kind: Kind::Bytes,
        baseline: Some("frame/1mib_memcpy_baseline"),
        seed: Some(12.5e9),
        target: "no copy of the payload",
    },
    Row {
        figure: "iroh endpoint create+bind",
        id: "iroh/endpoint/create_bind",
        kind: Kind::Time,
        baseline: Some("iroh/endpoint/raw_create_bind"),
        seed: Some(2.3e6),
        target: "",
    },
    Row {
        figure: "unary call, small payload — iroh",
        id: "iroh/unary/small_payload",
        kind: Kind::Time,
        baseline: Some("iroh/unary/raw_baseline"),
        seed: None,
        target: "within 10% of raw iroh",
    },
    Row {
        figure: "unary call, small payload — gRPC",
        id: "grpc/unary/small_payload",
        kind: Kind::Time,
        baseline: Some("grpc/unary/raw_baseline"),
        seed: None,
        target: "",
    },
    Row {
        figure: "64 concurrent callers — iroh",
        id: "iroh/concurrent/64_callers",
        kind: Kind::Elements,
        baseline: Some("iroh/concurrent/raw_baseline"),
        seed: None,
        target: "within 10% of raw iroh",
    },
    Row {
        figure: "64 concurrent callers — gRPC",
        id: "grpc/concurrent/64_callers",
        kind: Kind::Elements,
        baseline: Some("grpc/concurrent/raw_baseline"),
        seed: None,
        target: "",
    },
    Row {
        figure: "bulk 64 MiB — iroh",
        id: "iroh/bulk/64mib",
        kind: Kind::Bytes,
        baseline: Some("iroh/bulk/raw_baseline"),
        seed: None,
        target: "within 10% of raw iroh",
    },
    Row {
        figure: "bulk 64 MiB — gRPC",
        id: "grpc/bulk/64mib",
        kind: Kind::Bytes,
        baseline: Some("grpc/bulk/raw_baseline"),
        seed: None,
        target: "",
    },
    Row {
        figure: "control call during a bulk transfer — iroh",
        id: "iroh/control_during_bulk/vote",
        kind: Kind::Time,
        baseline: None,
        seed: None,
        target: "",
    },
    Row {
        figure: "control call during a bulk transfer — gRPC",
        id: "grpc/control_during_bulk/vote",
        kind: Kind::Time,
        baseline: None,
        seed: None,
        target: "",
    },
    Row {
        figure: "Raft commits, 3 nodes, 1 writer — iroh (seed: openraft, no network/disk)",
        id: "raft/commit_1_writer/iroh",
        kind: Kind::Elements,
        baseline: None,
        seed: Some(33e3),
        target: "",
    },
    Row {
        figure: "Raft commits, 3 nodes, 1 writer — gRPC (seed: openraft, no network/disk)",
        id: "raft/commit_1_writer/grpc",
        kind: Kind::Elements,
        baseline: None,
        seed: Some(33e3),
        target: "",
    },
    Row {
        figure: "Raft commits, 3 nodes, 64 writers — iroh (seed: openraft, no network/disk)",
        id: "raft/commit_64_writers/iroh",
        kind: Kind::Elements,
        baseline: None,
        seed: Some(912e3),
        target: "",
    },
    Row {
        figure: "Raft commits, 3 nodes, 64 writers — gRPC (seed: openraft, no network/disk)",
        id: "raft/commit_64_writers/grpc",
        kind: Kind::Elements,
        baseline: None,
        seed: Some(912e3),
        target: "",
    },
];

/// One measured figure.
#[derive(Clone, Copy)]
struct Measured {
    /// Median time per iteration, ns.
    ns: f64,
    /// Declared throughput per iteration (bytes or elements), if any.
    per_iter: Option<f64>,
}

impl Measured {
    fn value(&self, kind: Kind) -> Option<f64> {
        match kind {
            Kind::Time => Some(self.ns),
            Kind::Bytes | Kind::Elements => self.per_iter.map(|n| n / (self.ns * 1e-9)),
        }
    }
}

fn read_measurement(dir: &Path) -> anyhow::Result<Measured> {
    let estimates: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("new/estimates.json"))?)?;
    let ns = estimates["median"]["point_estimate"]
        .as_f64()
        .context("median estimate")?;
    let benchmark: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("new/benchmark.json"))?)?;
    let per_iter = benchmark["throughput"]
        .as_object()
        .and_then(|t| t.values().next())
        .and_then(serde_json::Value::as_f64);
    Ok(Measured { ns, per_iter })
}

/// Criterion stores `group/function` under `target/criterion/<group>/<function>`
/// with some characters replaced; find the directory by the ids recorded in
/// each `benchmark.json`.
fn collect(criterion: &Path) -> anyhow::Result<Vec<(String, Measured)>> {
    let mut found = Vec::new();
    let mut stack = vec![criterion.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n == "new") {
                    let Some(bench_dir) = path.parent() else {
                        continue;
                    };
                    let meta: serde_json::Value =
                        match std::fs::read_to_string(path.join("benchmark.json")) {
                            Ok(text) => serde_json::from_str(&text)?,
                            Err(_) => continue,
                        };
                    let id = meta["full_id"].as_str().unwrap_or_default().to_owned();
                    found.push((id, read_measurement(bench_dir)?));
                } else {
                    stack.push(path);
                }
            }
        }
    }
    Ok(found)
}

fn human(value: f64, kind: Kind) -> String {
    match kind {
        Kind::Time if value >= 1e6 => format!("{:.2} ms", value / 1e6),
        Kind::Time if value >= 1e3 => format!("{:.2} µs", value / 1e3),
        Kind::Time => format!("{value:.1} ns"),
        Kind::Bytes if value >= 1e9 => format!("{:.2} GB/s", value / 1e9),
        Kind::Bytes => format!("{:.1} MB/s", value / 1e6),
        Kind::Elements => format!("{value:.0} /s"),
    }
}

/// How many times better `ours` is than `other` (above 1 = ours is better).
fn advantage(ours: f64, other: f64, kind: Kind) -> f64 {
    match kind {
        Kind::Time => other / ours,
        Kind::Bytes | Kind::Elements => ours / other,
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores, {cpu}, Linux {}", kernel.trim())
}

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    let report_only = args.iter().any(|a| a == "--report-only");
    if let Some(other) = args
        .iter()
        .find(|a| *a != "--quick" && *a != "--report-only")
    {
        bail!("unknown bench option {other:?} (expected --quick or --report-only)");
    }
    if report_only {
        // Re-tabulate the figures of the last run without measuring again.
        return report(&crate::target_dir(), quick);
    }
    println!(
        "xtask: running every criterion bench{}",
        if quick { " (--quick)" } else { "" }
    );
    let mut cmd = crate::cargo();
    // `--bench '*'`: the criterion bench targets only. `--benches` would
    // also run every library's libtest harness, which refuses criterion's
    // options such as `--quick`.
    cmd.args(["bench", "--workspace", "--bench", "*", "--"]);
    if quick {
        cmd.arg("--quick");
    }
    let status = cmd.status().context("running cargo bench")?;
    if !status.success() {
        bail!("cargo bench failed ({status}); the report was not written");
    }
    report(&crate::target_dir(), quick)
}

fn report(target: &Path, quick: bool) -> anyhow::Result<()> {
    let measured = collect(&target.join("criterion"))?;
    let get = |id: &str| measured.iter().find(|(m, _)| m == id).map(|(_, v)| *v);

    let mut md = String::new();
    writeln!(md, "# Tern benchmark report\n")?;
    writeln!(
        md,
        "Machine: {}. Mode: {}.\n",
        machine(),
        if quick { "quick" } else { "full" }
    )?;
    writeln!(
        md,
        "| figure | ours | raw baseline (same run) | ours vs baseline | seed | ours vs seed | target |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|")?;
    let mut json_rows = Vec::new();
    for row in ROWS {
        let ours = get(row.id).and_then(|m| m.value(row.kind));
        let base = row.baseline.and_then(get).and_then(|m| m.value(row.kind));
        let cell = |v: Option<f64>| {
            v.map(|v| human(v, row.kind))
                .unwrap_or_else(|| "not run".into())
        };
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => format!("{:.2}×", advantage(a, b, row.kind)),
            _ => "".into(),
        };
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.figure,
            cell(ours),
            if row.baseline.is_some() {
                cell(base)
            } else {
                String::new()
            },
            ratio(ours, base),
            row.seed.map(|s| human(s, row.kind)).unwrap_or_default(),
            ratio(ours, row.seed),
            row.target
        )?;
        json_rows.push(serde_json::json!({
            "figure": row.figure, "id": row.id, "ours": ours, "baseline": base, "seed": row.seed,
            "unit": match row.kind { Kind::Time => "ns", Kind::Bytes => "bytes/s", Kind::Elements => "per second" },
        }));
    }
    writeln!(
        md,
        "\n\"ours vs …\" is how many times better ours is (above 1× = ours is better)."
    )?;
    writeln!(
        md,
        "Criterion's HTML reports: target/criterion/report/index.html"
    )?;

    let out = target.join("bench-report");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("report.md"), &md)?;
    let all: Vec<serde_json::Value> = measured
        .iter()
        .map(|(id, m)| serde_json::json!({"id": id, "median_ns": m.ns, "throughput_per_iter": m.per_iter}))
        .collect();
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(
            &serde_json::json!({"machine": machine(), "quick": quick, "rows": json_rows, "all": all}),
        )?,
    )?;
    println!("\n{md}");
    println!(
        "xtask: report written to {}",
        display(&out.join("report.md"))
    );
    Ok(())
}

fn display(path: &Path) -> String {
    PathBuf::from(path).display().to_string()
}
