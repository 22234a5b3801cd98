//! The Markdown report: header (machine, build, run), the seed's pass/fail
//! criterion, one table per section, charts, steps.
//!
//! Every ratio is worded ("iroh 1.61× better") so that a reader never has to
//! know whether a figure is a time or a rate to read its direction.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::criterion::Figure;
use super::machine::utc;
use super::model::{Better, Merged, Row, RunRecord, StepState};

/// A part's header, as recorded in the report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct PartInfo {
    /// The producer.
    pub(crate) source: String,
    /// The profile it says it was built with.
    pub(crate) profile: String,
    /// Whether it ran with `--quick`.
    pub(crate) quick: bool,
}

/// A chart written beside the report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Chart {
    /// Its title.
    pub(crate) title: String,
    /// File name inside `target/bench-report/`.
    pub(crate) file: String,
}

/// Everything in one report; also the shape of `report.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Report {
    /// How, when and where the figures were measured.
    pub(crate) run: RunRecord,
    /// The parts that were read.
    pub(crate) parts: Vec<PartInfo>,
    /// The merged rows and charts' data.
    pub(crate) merged: Merged,
    /// Every criterion figure found (fresh or stale), raw.
    pub(crate) criterion: Vec<Figure>,
    /// Charts written.
    pub(crate) charts: Vec<Chart>,
    /// The seed's criterion, counted.
    pub(crate) criterion_summary: Summary,
}

/// The seed's success criterion: "P99 latency within 10% of baseline",
/// with gRPC as the baseline.
pub(crate) const CRITERION: &str = "P99 latency within 10% of baseline (baseline: gRPC)";

/// The tolerance of the criterion: 10%.
const TOLERANCE: f64 = 0.10;

/// What a pass/fail verdict was computed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Basis {
    /// A P99 latency: the criterion itself.
    P99,
    /// A median (criterion's median or a p50 row): the same test, not P99.
    Median,
    /// Another percentile.
    Percentile,
    /// A throughput: iroh must reach 90% of gRPC.
    Throughput,
    /// A figure that is neither (a mean, a size).
    Value,
}

/// The pass/fail cell of one row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Within 10% of gRPC (or better).
    Pass(Basis),
    /// Worse than gRPC by more than 10%.
    Fail(Basis),
    /// The row lacks iroh or gRPC.
    NotApplicable,
}

/// The seed's criterion applied to a row.
pub(crate) fn verdict(row: &Row) -> Verdict {
    let (Some(iroh), Some(grpc)) = (row.values.iroh, row.values.grpc) else {
        return Verdict::NotApplicable;
    };
    if !(iroh.is_finite() && grpc.is_finite()) || grpc <= 0.0 {
        return Verdict::NotApplicable;
    }
    let pass = match row.better {
        Better::Lower => iroh <= (1.0 + TOLERANCE) * grpc,
        Better::Higher => iroh >= (1.0 - TOLERANCE) * grpc,
    };
    let basis = match row.percentile {
        Some(p) if (p - 99.0).abs() < 1e-9 => Basis::P99,
        Some(p) if (p - 50.0).abs() < 1e-9 => Basis::Median,
        Some(_) => Basis::Percentile,
        None if row.better == Better::Higher => Basis::Throughput,
        None if row.source == "criterion" => Basis::Median,
        None => Basis::Value,
    };
    if pass {
        Verdict::Pass(basis)
    } else {
        Verdict::Fail(basis)
    }
}

fn verdict_cell(row: &Row) -> String {
    let label = |basis: Basis| match basis {
        Basis::P99 => "P99".to_owned(),
        Basis::Median => "on the median, not P99".to_owned(),
        Basis::Percentile => format!(
            "on p{}, not P99",
            row.percentile.map(trim_float).unwrap_or_default()
        ),
        Basis::Throughput => "on throughput, not P99".to_owned(),
        Basis::Value => "on this figure, not P99".to_owned(),
    };
    match verdict(row) {
        Verdict::Pass(b) => format!("PASS ({})", label(b)),
        Verdict::Fail(b) => format!("**FAIL** ({})", label(b)),
        Verdict::NotApplicable => "n/a".to_owned(),
    }
}

/// Pass/fail counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Summary {
    /// P99 rows that pass.
    pub(crate) p99_pass: usize,
    /// P99 rows that fail.
    pub(crate) p99_fail: usize,
    /// Other rows with both transports that pass the same comparison.
    pub(crate) other_pass: usize,
    /// Other rows with both transports that fail it.
    pub(crate) other_fail: usize,
    /// Rows without both transports.
    pub(crate) not_applicable: usize,
    /// Ids of failing rows.
    pub(crate) failing: Vec<String>,
}

/// Counts the verdicts of all rows.
pub(crate) fn summarize(rows: &[Row]) -> Summary {
    let mut s = Summary::default();
    for row in rows {
        match verdict(row) {
            Verdict::Pass(Basis::P99) => s.p99_pass += 1,
            Verdict::Fail(Basis::P99) => {
                s.p99_fail += 1;
                s.failing.push(row.id.clone());
            }
            Verdict::Pass(_) => s.other_pass += 1,
            Verdict::Fail(_) => {
                s.other_fail += 1;
                s.failing.push(row.id.clone());
            }
            Verdict::NotApplicable => s.not_applicable += 1,
        }
    }
    s
}

fn trim_float(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn three(v: f64) -> String {
    // Three significant digits.
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A value with its unit, scaled for reading.
pub(crate) fn human(v: f64, unit: &str) -> String {
    if !v.is_finite() {
        return format!("{v} {unit}");
    }
    match unit {
        "ns" => human_seconds(v * 1e-9),
        "s" => human_seconds(v),
        "bytes/s" => {
            if v >= 1e9 {
                format!("{} GB/s", three(v / 1e9))
            } else if v >= 1e6 {
                format!("{} MB/s", three(v / 1e6))
            } else {
                format!("{} kB/s", three(v / 1e3))
            }
        }
        "bytes" => {
            const KIB: f64 = 1024.0;
            if v >= KIB * KIB * KIB {
                format!("{} GiB", three(v / (KIB * KIB * KIB)))
            } else if v >= KIB * KIB {
                format!("{} MiB", three(v / (KIB * KIB)))
            } else if v >= KIB {
                format!("{} KiB", three(v / KIB))
            } else {
                format!("{v:.0} B")
            }
        }
        "count" => {
            if v.fract() == 0.0 {
                format!("{v:.0}")
            } else {
                three(v)
            }
        }
        rate if rate.ends_with("/s") => {
            if v >= 1e6 {
                format!("{}M {rate}", three(v / 1e6))
            } else if v >= 1e4 {
                format!("{}k {rate}", three(v / 1e3))
            } else {
                format!("{v:.0} {rate}")
            }
        }
        other => format!("{} {other}", three(v)),
    }
}

fn human_seconds(s: f64) -> String {
    if s >= 1.0 {
        format!("{} s", three(s))
    } else if s >= 1e-3 {
        format!("{} ms", three(s * 1e3))
    } else if s >= 1e-6 {
        format!("{} µs", three(s * 1e6))
    } else {
        format!("{} ns", three(s * 1e9))
    }
}

/// How many times better `a` is than `b` (above 1: `a` is better).
pub(crate) fn advantage(a: f64, b: f64, better: Better) -> f64 {
    match better {
        Better::Lower => b / a,
        Better::Higher => a / b,
    }
}

/// "1.61× better", "1.20× worse" or "equal".
pub(crate) fn worded(a: f64, b: f64, better: Better) -> String {
    let f = advantage(a, b, better);
    if !f.is_finite() || f <= 0.0 {
        return "not comparable".to_owned();
    }
    if (f - 1.0).abs() < 0.005 {
        "equal".to_owned()
    } else if f > 1.0 {
        format!("{}× better", three(f))
    } else {
        format!("{}× worse", three(1.0 / f))
    }
}

fn iroh_vs_grpc(row: &Row) -> String {
    match (row.values.iroh, row.values.grpc) {
        (Some(i), Some(g)) => format!("iroh {}", worded(i, g, row.better)),
        _ => String::new(),
    }
}

fn ours_vs_raw(row: &Row) -> String {
    let v = &row.values;
    let mut parts = Vec::new();
    for (label, ours, raw) in [
        ("", v.ours, v.raw),
        ("iroh ", v.iroh, v.raw_iroh),
        ("gRPC ", v.grpc, v.raw_grpc),
    ] {
        if let (Some(o), Some(r)) = (ours, raw) {
            parts.push(format!("{label}{}", worded(o, r, row.better)));
        }
    }
    parts.join("; ")
}

fn ours_vs_seed(row: &Row) -> String {
    let v = &row.values;
    let Some(seed) = v.seed else {
        return String::new();
    };
    let mut parts = Vec::new();
    for (label, ours) in [
        ("", v.ours),
        ("iroh ", v.iroh),
        ("gRPC ", v.grpc),
        ("dual ", v.dual),
    ] {
        if let Some(o) = ours {
            parts.push(format!("{label}{}", worded(o, seed, row.better)));
        }
    }
    parts.join("; ")
}

/// Each of our transports against etcd doing the same work in the same
/// run (the cluster rows' baseline).
fn ours_vs_etcd(row: &Row) -> String {
    let v = &row.values;
    let Some(etcd) = v.etcd else {
        return String::new();
    };
    [("iroh ", v.iroh), ("gRPC ", v.grpc), ("dual ", v.dual)]
        .into_iter()
        .filter_map(|(label, ours)| ours.map(|o| format!("{label}{}", worded(o, etcd, row.better))))
        .collect::<Vec<_>>()
        .join("; ")
}

fn raw_cell(row: &Row) -> String {
    let v = &row.values;
    let mut parts = Vec::new();
    if let Some(r) = v.raw {
        parts.push(human(r, &row.unit));
    }
    if let Some(r) = v.raw_iroh {
        parts.push(format!("iroh raw {}", human(r, &row.unit)));
    }
    if let Some(r) = v.raw_grpc {
        parts.push(format!("gRPC raw {}", human(r, &row.unit)));
    }
    parts.join("; ")
}

fn cell(v: Option<f64>, unit: &str) -> String {
    v.map(|v| human(v, unit)).unwrap_or_else(|| "—".to_owned())
}

/// Escapes what would break a Markdown table cell.
fn md(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

fn duration(seconds: f64) -> String {
    let s = seconds.round() as u64;
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{seconds:.1}s")
    }
}

/// The whole Markdown report.
pub(crate) fn markdown(report: &Report) -> anyhow::Result<String> {
    let run = &report.run;
    let m = &run.machine;
    let rows = &report.merged.rows;
    let mut out = String::new();
    writeln!(out, "# Tern benchmark report\n")?;

    let debug_parts: Vec<&str> = report
        .parts
        .iter()
        .filter(|p| matches!(p.profile.as_str(), "dev" | "debug" | "test"))
        .map(|p| p.source.as_str())
        .collect();
    if run.debug_build() || !debug_parts.is_empty() {
        let what = if run.debug_build() {
            format!("profile `{}`", run.profile)
        } else {
            format!(
                "parts built without optimisation: {}",
                debug_parts.join(", ")
            )
        };
        writeln!(
            out,
            "> **⚠ DEBUG BUILD ({what}): these figures are NOT for comparison.** \
             They prove that the pipeline works; measure with the default \
             `--profile bench` for figures.\n"
        )?;
    }
    if run.incomplete() {
        writeln!(
            out,
            "> **INCOMPLETE:** some figures were not measured; see \"Steps\" below.\n"
        )?;
        for step in run.steps.iter().filter(|s| s.state != StepState::Ok) {
            if matches!(step.state, StepState::Failed | StepState::Running) {
                writeln!(
                    out,
                    "> - not measured: {}: {}",
                    step.name,
                    md(first_line(&step.message))
                )?;
            }
        }
        writeln!(out)?;
    }
    if run.quick {
        writeln!(
            out,
            "Quick mode: fewer samples and shorter runs; the figures are rougher than a full run's.\n"
        )?;
    }

    writeln!(out, "## Machine and run\n")?;
    writeln!(out, "| | |\n|---|---|")?;
    writeln!(
        out,
        "| cores | {} (available parallelism; {} listed in /proc/cpuinfo) |",
        m.cores, m.cpus_listed
    )?;
    writeln!(out, "| CPU | {} |", md(&m.cpu))?;
    writeln!(out, "| kernel | Linux {} |", md(&m.kernel))?;
    writeln!(
        out,
        "| memory | {:.1} GiB total, {:.1} GiB available at start |",
        m.mem_total_kib as f64 / 1024.0 / 1024.0,
        m.mem_available_kib as f64 / 1024.0 / 1024.0
    )?;
    writeln!(out, "| rustc | {} |", md(&m.rustc))?;
    writeln!(
        out,
        "| commit | {}{} |",
        m.commit,
        if m.dirty {
            " (tree dirty: uncommitted changes were measured)"
        } else {
            " (clean tree)"
        }
    )?;
    writeln!(
        out,
        "| profile | `{}`{} |",
        run.profile,
        if run.debug_build() {
            " — debug build, not for comparison"
        } else {
            ""
        }
    )?;
    writeln!(
        out,
        "| mode | {}{} |",
        if run.quick { "quick" } else { "full" },
        if run.only.is_empty() {
            String::new()
        } else {
            format!(", only {}", run.only.join(", "))
        }
    )?;
    let took = run
        .finished_unix
        .map(|f| {
            format!(
                ", took {}",
                duration(f.saturating_sub(run.started_unix) as f64)
            )
        })
        .unwrap_or_else(|| ", did not finish".to_owned());
    writeln!(out, "| date | {}{took} |", utc(run.started_unix))?;
    writeln!(
        out,
        "| load average (1, 5, 15 min) | start {}; end {} — the machine is shared, so other work may have run during the measurements |",
        m.load_start,
        if m.load_end.is_empty() {
            "unknown"
        } else {
            &m.load_end
        }
    )?;
    writeln!(out)?;

    let s = &report.criterion_summary;
    writeln!(out, "## The seed's criterion: {CRITERION}\n")?;
    writeln!(
        out,
        "- P99 rows: **{} pass, {} fail**.",
        s.p99_pass, s.p99_fail
    )?;
    writeln!(
        out,
        "- Other rows with both transports, the same comparison on their median or throughput (not P99): {} pass, {} fail.",
        s.other_pass, s.other_fail
    )?;
    writeln!(
        out,
        "- Rows without both an iroh and a gRPC figure: {} (n/a).",
        s.not_applicable
    )?;
    if !s.failing.is_empty() {
        writeln!(out, "- Failing: {}.", s.failing.join(", "))?;
    }
    writeln!(
        out,
        "\nPASS means: lower-is-better figures, iroh ≤ 1.10 × gRPC; higher-is-better figures, iroh ≥ 0.90 × gRPC.\n"
    )?;

    let with_dual = rows.iter().any(|r| r.values.dual.is_some());
    for section in report.merged.sections() {
        writeln!(out, "## {}\n", md(section))?;
        let with_etcd = rows
            .iter()
            .any(|r| r.section == section && r.values.etcd.is_some());
        let dual_head = if with_dual { " dual |" } else { "" };
        let dual_rule = if with_dual { "---|" } else { "" };
        let etcd_head = if with_etcd {
            " etcd 3.4 (same run) | ours vs etcd |"
        } else {
            ""
        };
        let etcd_rule = if with_etcd { "---|---|" } else { "" };
        writeln!(
            out,
            "| figure | iroh | gRPC |{dual_head}{etcd_head} raw baseline (same run) | seed | iroh vs gRPC | ours vs raw | ours vs seed | P99 within 10% of gRPC | note |"
        )?;
        writeln!(
            out,
            "|---|---|---|{dual_rule}{etcd_rule}---|---|---|---|---|---|---|"
        )?;
        for row in rows.iter().filter(|r| r.section == section) {
            let (iroh, grpc) = match row.values.ours {
                Some(ours) if row.values.iroh.is_none() && row.values.grpc.is_none() => (
                    format!("{} (both)", human(ours, &row.unit)),
                    "same code".to_owned(),
                ),
                _ => (
                    cell(row.values.iroh, &row.unit),
                    cell(row.values.grpc, &row.unit),
                ),
            };
            let dual = if with_dual {
                format!(" {} |", cell(row.values.dual, &row.unit))
            } else {
                String::new()
            };
            let etcd = if with_etcd {
                format!(
                    " {} | {} |",
                    cell(row.values.etcd, &row.unit),
                    ours_vs_etcd(row)
                )
            } else {
                String::new()
            };
            writeln!(
                out,
                "| {} | {iroh} | {grpc} |{dual}{etcd} {} | {} | {} | {} | {} | {} | {} |",
                md(&row.name),
                raw_cell(row),
                row.values
                    .seed
                    .map(|v| human(v, &row.unit))
                    .unwrap_or_default(),
                iroh_vs_grpc(row),
                ours_vs_raw(row),
                ours_vs_seed(row),
                verdict_cell(row),
                md(&row.note),
            )?;
        }
        writeln!(out)?;
    }
    if rows.is_empty() {
        writeln!(out, "No figures were measured.\n")?;
    }

    writeln!(out, "## Charts\n")?;
    if report.charts.is_empty() {
        writeln!(out, "No distributions or curves in this run's parts.\n")?;
    }
    for chart in &report.charts {
        writeln!(out, "- [{}]({})", md(&chart.title), chart.file)?;
    }
    if report.charts.is_empty() {
        writeln!(out)?;
    } else {
        writeln!(out)?;
        for chart in &report.charts {
            writeln!(out, "![{}]({})\n", md(&chart.title), chart.file)?;
        }
    }
    writeln!(
        out,
        "Criterion's own HTML reports (distributions, samples, history): [target/criterion/report/index.html](../criterion/report/index.html)\n"
    )?;

    writeln!(out, "## Steps\n")?;
    writeln!(out, "| step | result | took |\n|---|---|---|")?;
    for step in &run.steps {
        let result = match step.state {
            StepState::Ok => "ok".to_owned(),
            StepState::Failed => format!("**FAILED**: {}", md(first_line(&step.message))),
            StepState::Running => "did not finish".to_owned(),
            StepState::NotRun => format!("not run: {}", md(&step.message)),
        };
        writeln!(
            out,
            "| {} | {result} | {} |",
            md(&step.name),
            duration(step.seconds)
        )?;
    }
    writeln!(out)?;
    if !report.merged.warnings.is_empty() {
        writeln!(out, "Warnings:\n")?;
        for w in &report.merged.warnings {
            writeln!(out, "- {}", md(w))?;
        }
        writeln!(out)?;
    }

    writeln!(out, "## Reading the table\n")?;
    writeln!(
        out,
        "- \"iroh vs gRPC\", \"ours vs raw\", \"ours vs seed\": how many times better or worse the first figure is than the second, whatever the unit (for times, smaller is better; for rates, larger is better)."
    )?;
    writeln!(
        out,
        "- raw baseline: the same work without our protocol (plain QUIC streams, plain tonic), measured in the same run on the same machine."
    )?;
    writeln!(
        out,
        "- etcd 3.4 (same run): Debian's etcd-server, 3 members on loopback with default settings (fsync on), driven with the same writers, value size, run length and failover procedure as Tern's cluster rows; \"ours vs etcd\" is each Tern transport against it."
    )?;
    writeln!(
        out,
        "- seed: the figure the seed document quotes, measured elsewhere on other hardware; a ratio to it is a rough orientation, not a comparison."
    )?;
    writeln!(
        out,
        "- criterion rows: the median over criterion's samples of the mean time per iteration; part rows say in their name or note what they are (p50, p99, totals)."
    )?;
    writeln!(
        out,
        "- Raw numbers of everything: report.json beside this file."
    )?;
    Ok(out)
}

fn first_line(message: &str) -> &str {
    message.lines().next().unwrap_or("")
}
