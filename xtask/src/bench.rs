//! `cargo xtask bench`: measure everything in one run on one machine, then
//! write one report.
//!
//! # Layout
//!
//! - this file: the command line (options, the sources of figures) and
//!   where the run's files go;
//! - `execute.rs`: the run itself — build once in one profile, run each
//!   producer program, then each criterion bench, with progress;
//! - `output.rs`: the report's files — merge the parts and criterion's
//!   figures, write report.md, report.json and the charts;
//! - `model.rs`: the row model and the producers' "part" file format;
//! - `criterion.rs`: criterion's figures converted into rows;
//! - `render.rs`: the Markdown report, ratios and the seed's pass/fail;
//! - `charts.rs`: SVG charts (plotters);
//! - `machine.rs`: the machine and tree the figures come from.
//!
//! # Output (`target/bench-report/`)
//!
//! `report.md` (also printed), `report.json` (every raw number and the
//! machine), `*.svg` (charts), `parts/<source>.json` (what each producer
//! wrote) and `run.json` (what ran; `--report-only` re-renders from it).
//! Criterion's HTML reports stay under `target/criterion/report/`.
//!
//! A failed step never hides the others: the run goes on, the report of
//! what did succeed is written and marked incomplete, and the command exits
//! non-zero naming each failure.

mod charts;
mod criterion;
mod execute;
mod machine;
mod model;
mod output;
mod render;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{Context, bail};

use execute::Run;
use model::{Merged, Part, RunRecord, StepRecord, StepState};
use output::write_report;
use render::{Chart, PartInfo, Report};

/// The report directory, under the target directory.
const REPORT_DIR: &str = "bench-report";

/// Criterion's options in quick mode: `--quick` stops sampling once the
/// figure is stable; the shorter warm-up and measurement bound a slow
/// (debug) build's run.
const CRITERION_QUICK: &[&str] = &[
    "--quick",
    "--warm-up-time",
    "0.5",
    "--measurement-time",
    "1",
];

/// How many of a failing program's last output lines its error quotes.
const ERROR_TAIL_LINES: usize = 12;

/// A source of figures, in the order a run measures them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// `tern-bench transport`: calls between two processes.
    Transport,
    /// `tern-bench cluster`: Raft on 3 real `tern` processes, failover.
    Cluster,
    /// `tern-bench fleet`: 3 real servers and simulated agents, per
    /// transport.
    Fleet,
    /// Every criterion bench of the workspace.
    Criterion,
}

impl Source {
    const ALL: [Source; 4] = [
        Source::Transport,
        Source::Cluster,
        Source::Fleet,
        Source::Criterion,
    ];

    fn name(self) -> &'static str {
        match self {
            Source::Transport => "transport",
            Source::Cluster => "cluster",
            Source::Fleet => "fleet",
            Source::Criterion => "criterion",
        }
    }

    /// The `source` its part file declares (and the file's stem).
    fn part_source(self) -> &'static str {
        match self {
            Source::Transport => "transport-2proc",
            Source::Cluster => "cluster",
            Source::Fleet => "fleet",
            Source::Criterion => "criterion",
        }
    }

    /// The producer program: (binary, package).
    fn producer(self) -> Option<(&'static str, &'static str)> {
        match self {
            Source::Transport => Some(("tern-bench", "tern-benches")),
            Source::Cluster | Source::Fleet => Some(("tern-bench", "tern-benches")),
            Source::Criterion => None,
        }
    }

    fn parse(name: &str) -> anyhow::Result<Source> {
        Source::ALL
            .into_iter()
            .find(|s| s.name() == name)
            .with_context(|| {
                format!("unknown source {name:?} for --only (expected criterion, transport, cluster or fleet, comma-separated)")
            })
    }
}

/// The command line.
#[derive(Debug, PartialEq)]
struct Options {
    quick: bool,
    report_only: bool,
    profile: String,
    /// Empty: every source.
    only: Vec<Source>,
}

impl Options {
    fn parse(args: &[String]) -> anyhow::Result<Options> {
        let mut opts = Options {
            quick: false,
            report_only: false,
            profile: "bench".to_owned(),
            only: Vec::new(),
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let mut value = |name: &str| {
                args.next()
                    .cloned()
                    .with_context(|| format!("{name} needs a value"))
            };
            match arg.as_str() {
                "--quick" => opts.quick = true,
                "--report-only" => opts.report_only = true,
                "--profile" => opts.profile = value("--profile")?,
                "--only" => {
                    for name in value("--only")?.split(',') {
                        let source = Source::parse(name.trim())?;
                        if !opts.only.contains(&source) {
                            opts.only.push(source);
                        }
                    }
                }
                other => bail!(
                    "unknown bench option {other:?} (expected --quick, --report-only, --profile NAME, --only criterion|transport|cluster)"
                ),
            }
        }
        if opts.profile.is_empty() {
            bail!("--profile needs a cargo profile name (bench, release, dev)");
        }
        Ok(opts)
    }

    fn selected(&self, source: Source) -> bool {
        self.only.is_empty() || self.only.contains(&source)
    }
}

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let opts = Options::parse(args)?;
    let target = crate::target_dir();
    if opts.report_only {
        let record = read_record(&target)?;
        let report = write_report(&target, record)?;
        if report.run.incomplete() {
            println!("xtask: note: the last run was incomplete (see \"Steps\" in the report)");
        }
        return Ok(());
    }
    if opts.selected(Source::Cluster) {
        crate::prereqs::install_bench()?;
    }
    Run::new(opts, target).execute()
}

fn report_dir(target: &Path) -> PathBuf {
    target.join(REPORT_DIR)
}

fn parts_dir(target: &Path) -> PathBuf {
    report_dir(target).join("parts")
}

fn read_record(target: &Path) -> anyhow::Result<RunRecord> {
    let path = report_dir(target).join("run.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no record of a previous run at {} (run `cargo xtask bench` first)",
            path.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn write_record(target: &Path, record: &RunRecord) -> anyhow::Result<()> {
    let dir = report_dir(target);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("run.json"), serde_json::to_string_pretty(record)?)
        .context("writing run.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRANSPORT: &str = include_str!("bench/fixtures/transport-2proc.json");
    const CLUSTER: &str = include_str!("bench/fixtures/cluster.json");

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    fn record() -> RunRecord {
        RunRecord {
            profile: "bench".to_owned(),
            quick: true,
            started_unix: 1_795_522_933,
            finished_unix: Some(1_795_523_100),
            ..RunRecord::default()
        }
    }

    fn fixture_report() -> Report {
        let mut merged = Merged::default();
        let mut parts = Vec::new();
        for text in [TRANSPORT, CLUSTER] {
            let part = Part::parse(text).expect("fixture parses");
            parts.push(PartInfo {
                source: part.source.clone(),
                profile: part.profile.clone(),
                quick: part.quick,
            });
            merged.add(part.rows, part.distributions, part.curves);
        }
        let criterion_summary = render::summarize(&merged.rows);
        Report {
            run: record(),
            parts,
            merged,
            criterion: Vec::new(),
            charts: Vec::new(),
            criterion_summary,
        }
    }

    fn table_line<'a>(md: &'a str, figure: &str) -> &'a str {
        md.lines()
            .find(|l| l.starts_with(&format!("| {figure} |")))
            .unwrap_or_else(|| panic!("no row {figure:?} in:\n{md}"))
    }

    #[test]
    fn options() {
        let o = Options::parse(&args(&[])).unwrap();
        assert_eq!(o.profile, "bench");
        assert!(!o.quick && !o.report_only && o.only.is_empty());
        let o = Options::parse(&args(&[
            "--quick",
            "--profile",
            "dev",
            "--only",
            "transport,cluster",
        ]))
        .unwrap();
        assert!(o.quick);
        assert_eq!(o.profile, "dev");
        assert_eq!(o.only, vec![Source::Transport, Source::Cluster]);
        assert!(!o.selected(Source::Criterion));
        assert!(Options::parse(&args(&["--only", "nope"])).is_err());
        assert!(Options::parse(&args(&["--profile"])).is_err());
        assert!(Options::parse(&args(&["--fast"])).is_err());
    }

    #[test]
    fn table_has_rows_ratios_and_verdicts() {
        let report = fixture_report();
        let md = render::markdown(&report).unwrap();

        let p99 = table_line(&md, "unary call, 64 B payload, p99");
        assert!(p99.contains("| 71.0 µs | 128 µs |"), "{p99}");
        assert!(p99.contains("iroh raw 66.0 µs; gRPC raw 89.0 µs"), "{p99}");
        assert!(p99.contains("iroh 1.80× better"), "{p99}");
        assert!(p99.contains("iroh 1.08× worse; gRPC 1.44× worse"), "{p99}");
        assert!(p99.contains("PASS (P99)"), "{p99}");

        // Within 10% but worse: passes, and the ratio says "worse".
        let control = table_line(&md, "control call while a bulk transfer runs, p99");
        assert!(control.contains("iroh 1.07× worse"), "{control}");
        assert!(control.contains("PASS (P99)"), "{control}");

        let p50 = table_line(&md, "unary call, 64 B payload, p50");
        assert!(p50.contains("PASS (on the median, not P99)"), "{p50}");

        let calls = table_line(&md, "calls/s, 64 concurrent callers");
        assert!(calls.contains("60.0k calls/s | 70.0k calls/s"), "{calls}");
        assert!(calls.contains("iroh 1.17× worse"), "{calls}");
        assert!(
            calls.contains("**FAIL** (on throughput, not P99)"),
            "{calls}"
        );

        let bulk = table_line(&md, "bulk throughput, 64 MiB");
        assert!(bulk.contains("| 900 MB/s | — |"), "{bulk}");
        assert!(bulk.contains("| n/a |"), "{bulk}");
        assert!(bulk.contains("gRPC: not measured"), "{bulk}");

        let rss = table_line(&md, "peak memory of the server process");
        assert!(rss.contains("| 50.0 MiB | 30.0 MiB |"), "{rss}");
        assert!(rss.contains("**FAIL** (on this figure, not P99)"), "{rss}");

        let commits = table_line(&md, "commits/s, 1 writer");
        assert!(
            commits.contains("iroh 22.0× worse; gRPC 23.6× worse; dual 22.8× worse"),
            "{commits}"
        );
        assert!(
            commits.contains("PASS (on throughput, not P99)"),
            "{commits}"
        );

        // The cluster rows carry etcd's figure and each transport's ratio
        // to it (rates: higher is better; times: lower is better).
        assert!(commits.contains("| 1000 commits/s |"), "{commits}");
        assert!(
            commits.contains("iroh 1.50× better; gRPC 1.40× better; dual 1.45× better"),
            "{commits}"
        );
        assert!(md.contains("etcd 3.4 (same run) | ours vs etcd |"));
        let failover = table_line(&md, "leader failover after SIGKILL, p99");
        assert!(
            failover.contains("iroh 2.00× better; gRPC 2.37× better"),
            "{failover}"
        );
        assert!(failover.contains("| 1.90 s | 1.60 s |"), "{failover}");
        assert!(failover.contains("**FAIL** (P99)"), "{failover}");

        // Sections in order of appearance; the dual column appears because
        // a row has a dual figure.
        let sections: Vec<&str> = md.lines().filter(|l| l.starts_with("## ")).collect();
        assert!(sections.contains(&"## Calls between two processes"));
        assert!(sections.contains(&"## Raft on 3 tern processes"));
        assert!(md.contains("| figure | iroh | gRPC | dual |"));

        let s = &report.criterion_summary;
        assert_eq!((s.p99_pass, s.p99_fail), (2, 1), "{s:?}");
        assert_eq!(
            (s.other_pass, s.other_fail, s.not_applicable),
            (2, 2, 1),
            "{s:?}"
        );
        assert!(md.contains("- P99 rows: **2 pass, 1 fail**."), "{md}");
        // A part from a debug build is flagged as not for comparison.
        assert!(md.contains("DEBUG BUILD"), "{md}");
        assert!(
            md.contains("parts built without optimisation: cluster"),
            "{md}"
        );
    }

    #[test]
    fn charts_render_to_svg() {
        let report = fixture_report();
        assert_eq!(report.merged.distributions.len(), 1);
        assert_eq!(report.merged.curves.len(), 1);
        let svg = charts::distribution_svg(&report.merged.distributions[0]).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100.min(svg.len())]);
        assert!(svg.contains("gRPC") && svg.contains("iroh") && svg.contains("p99"));
        assert!(svg.contains("max"));
        let svg = charts::curve_svg(&report.merged.curves[0]).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("concurrent callers"));
    }

    #[test]
    fn report_files_from_part_files() {
        let target = std::env::temp_dir().join(format!("xtask-bench-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&target);
        std::fs::create_dir_all(parts_dir(&target)).unwrap();
        std::fs::write(parts_dir(&target).join("transport-2proc.json"), TRANSPORT).unwrap();
        let mut run = record();
        run.only = vec!["transport".to_owned(), "cluster".to_owned()];
        run.steps.push(StepRecord {
            name: "cluster".to_owned(),
            state: StepState::Failed,
            message: "not measured: the build produced no `tern-lab` binary".to_owned(),
            seconds: 0.0,
        });
        write_record(&target, &run).unwrap();
        let report = write_report(&target, read_record(&target).unwrap()).unwrap();
        let dir = report_dir(&target);
        let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
        assert!(md.contains("INCOMPLETE"), "{md}");
        assert!(md.contains(
            "not measured: cluster: not measured: the build produced no `tern-lab` binary"
        ));
        assert!(md.contains("(unary_latency_2proc.svg)"));
        assert!(dir.join("unary_latency_2proc.svg").exists());
        assert!(dir.join("calls_vs_concurrency_2proc.svg").exists());
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap())
                .unwrap();
        assert_eq!(json["merged"]["rows"].as_array().map(Vec::len), Some(6));
        assert_eq!(report.charts.len(), 2);
        std::fs::remove_dir_all(&target).unwrap();
    }
}
