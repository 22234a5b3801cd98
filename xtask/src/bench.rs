//! `cargo xtask bench`: measure everything in one run on one machine, then
//! write one report.
//!
//! # Layout
//!
//! - this file: options and the run itself — build once in one profile,
//!   run each producer program, then each criterion bench, with progress;
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
mod machine;
mod model;
mod render;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{Context, bail};

use model::{Merged, Part, RunRecord, StepRecord, StepState};
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
    /// Every criterion bench of the workspace.
    Criterion,
}

impl Source {
    const ALL: [Source; 3] = [Source::Transport, Source::Cluster, Source::Criterion];

    fn name(self) -> &'static str {
        match self {
            Source::Transport => "transport",
            Source::Cluster => "cluster",
            Source::Criterion => "criterion",
        }
    }

    /// The `source` its part file declares (and the file's stem).
    fn part_source(self) -> &'static str {
        match self {
            Source::Transport => "transport-2proc",
            Source::Cluster => "cluster",
            Source::Criterion => "criterion",
        }
    }

    /// The producer program: (binary, package).
    fn producer(self) -> Option<(&'static str, &'static str)> {
        match self {
            Source::Transport => Some(("tern-bench", "tern-benches")),
            Source::Cluster => Some(("tern-bench", "tern-benches")),
            Source::Criterion => None,
        }
    }

    fn parse(name: &str) -> anyhow::Result<Source> {
        Source::ALL
            .into_iter()
            .find(|s| s.name() == name)
            .with_context(|| {
                format!("unknown source {name:?} for --only (expected criterion, transport or cluster, comma-separated)")
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

/// A program built for the run.
#[derive(Clone, Debug)]
struct Artifact {
    /// The cargo target's name (binary or bench name).
    name: String,
    /// The package's directory (criterion benches run there, as under
    /// `cargo bench`).
    package_dir: PathBuf,
    executable: PathBuf,
}

/// One run: its options, its record and its progress.
struct Run {
    opts: Options,
    target: PathBuf,
    record: RunRecord,
    start: Instant,
    /// Steps announced so far and in total.
    step: usize,
    total: usize,
}

impl Run {
    fn new(opts: Options, target: PathBuf) -> Run {
        let producers = Source::ALL
            .iter()
            .filter(|s| s.producer().is_some() && opts.selected(**s))
            .count();
        let criterion = usize::from(opts.selected(Source::Criterion));
        // Builds (binaries, criterion benches), producers, criterion.
        let total = usize::from(producers > 0) + criterion + producers + criterion;
        let record = RunRecord {
            profile: opts.profile.clone(),
            quick: opts.quick,
            only: opts.only.iter().map(|s| s.name().to_owned()).collect(),
            started_unix: machine::unix_now(),
            finished_unix: None,
            machine: machine::Machine::probe(),
            steps: Vec::new(),
        };
        Run {
            opts,
            target,
            record,
            start: Instant::now(),
            step: 0,
            total,
        }
    }

    fn elapsed(&self) -> String {
        let s = self.start.elapsed().as_secs();
        format!("{}m{:02}s", s / 60, s % 60)
    }

    fn announce(&mut self, what: &str) {
        self.step += 1;
        println!(
            "\n[xtask bench {}/{} +{}] {what}",
            self.step,
            self.total,
            self.elapsed()
        );
    }

    fn finish_step(&mut self, name: &str, began: Instant, result: &anyhow::Result<()>) {
        let seconds = began.elapsed().as_secs_f64();
        let (state, message) = match result {
            Ok(()) => (StepState::Ok, String::new()),
            Err(e) => (StepState::Failed, format!("{e:#}")),
        };
        match result {
            Ok(()) => println!(
                "[xtask bench +{}] {name}: done in {seconds:.0}s",
                self.elapsed()
            ),
            Err(e) => eprintln!(
                "[xtask bench +{}] {name}: FAILED after {seconds:.0}s: {e:#}",
                self.elapsed()
            ),
        }
        self.record.steps.push(StepRecord {
            name: name.to_owned(),
            state,
            message,
            seconds,
        });
        // Keep the record current: an interrupted run still says what ran.
        if let Err(e) = write_record(&self.target, &self.record) {
            eprintln!("xtask: warning: {e:#}");
        }
    }

    fn execute(mut self) -> anyhow::Result<()> {
        let profile = self.opts.profile.clone();
        println!(
            "xtask: bench run: profile {profile}, {} mode{}; {} steps; report in {}",
            if self.opts.quick { "quick" } else { "full" },
            if self.opts.only.is_empty() {
                String::new()
            } else {
                format!(", only {}", self.record.only.join(","))
            },
            self.total,
            report_dir(&self.target).display()
        );
        if self.record.debug_build() {
            println!(
                "xtask: profile {profile} is a debug build: the figures prove the pipeline, they are not for comparison"
            );
        }
        // Nothing of an earlier run may pass for this run's figures.
        let parts = parts_dir(&self.target);
        std::fs::create_dir_all(&parts).with_context(|| format!("creating {}", parts.display()))?;
        for source in Source::ALL {
            let file = parts.join(format!("{}.json", source.part_source()));
            if file.exists() {
                std::fs::remove_file(&file)
                    .with_context(|| format!("removing the stale {}", file.display()))?;
            }
            if !self.opts.selected(source) {
                self.record.steps.push(StepRecord {
                    name: source.name().to_owned(),
                    state: StepState::NotRun,
                    message: "excluded by --only".to_owned(),
                    seconds: 0.0,
                });
            }
        }
        write_record(&self.target, &self.record)?;

        // 1. Build every program once, in one profile.
        let producers: Vec<Source> = Source::ALL
            .into_iter()
            .filter(|s| s.producer().is_some() && self.opts.selected(*s))
            .collect();
        let mut bins: Result<Vec<Artifact>, String> = Ok(Vec::new());
        if !producers.is_empty() {
            let mut packages = Vec::new();
            for source in &producers {
                if let Some((_, package)) = source.producer()
                    && !packages.contains(&package)
                {
                    packages.push(package);
                }
                if *source == Source::Cluster {
                    packages.push("tern-node");
                }
            }
            let mut args = vec!["build", "--profile", &profile];
            for p in &packages {
                args.extend(["-p", p]);
            }
            args.push("--bins");
            self.announce(&format!("build: cargo {}", args.join(" ")));
            let began = Instant::now();
            let built = cargo_artifacts(&args, "bin");
            let result = built
                .as_ref()
                .map(|_| ())
                .map_err(|e| anyhow::anyhow!("{e:#}"));
            self.finish_step("build binaries", began, &result);
            bins = built.map_err(|e| format!("the build failed: {e:#}"));
        }
        let mut benches: Result<Vec<Artifact>, String> = Ok(Vec::new());
        if self.opts.selected(Source::Criterion) {
            let args = [
                "bench",
                "--no-run",
                "--profile",
                &profile,
                "--workspace",
                // The criterion bench targets only: `--benches` would also
                // build every library's libtest harness, which refuses
                // criterion's options.
                "--bench",
                "*",
            ];
            self.announce(&format!("build: cargo {}", args.join(" ")));
            let began = Instant::now();
            let built = cargo_artifacts(&args, "bench");
            let result = built
                .as_ref()
                .map(|_| ())
                .map_err(|e| anyhow::anyhow!("{e:#}"));
            self.finish_step("build criterion benches", began, &result);
            benches = built.map_err(|e| format!("the build failed: {e:#}"));
        }

        // 2. The producers, each writing its part file.
        for source in producers {
            let Some((binary, package)) = source.producer() else {
                continue;
            };
            self.announce(&format!("{}: {binary}", source.name()));
            let began = Instant::now();
            let result = self.run_producer(source, binary, package, &bins);
            self.finish_step(source.name(), began, &result);
        }

        // 3. Every criterion bench.
        if self.opts.selected(Source::Criterion) {
            self.announce("criterion benches");
            let began = Instant::now();
            let result = self.run_criterion(&benches);
            self.finish_step("criterion", began, &result);
        }

        self.record.finished_unix = Some(machine::unix_now());
        self.record.machine.load_end = machine::load_average();
        write_record(&self.target, &self.record)?;
        let report = write_report(&self.target, self.record.clone())?;
        println!("xtask: bench run took {}", self.elapsed());
        let failed: Vec<String> = report
            .run
            .steps
            .iter()
            .filter(|s| s.state == StepState::Failed)
            .map(|s| format!("{}: {}", s.name, s.message))
            .collect();
        if !failed.is_empty() {
            bail!(
                "the report is incomplete; these steps failed:\n  {}",
                failed.join("\n  ")
            );
        }
        Ok(())
    }

    fn run_producer(
        &self,
        source: Source,
        binary: &str,
        package: &str,
        bins: &Result<Vec<Artifact>, String>,
    ) -> anyhow::Result<()> {
        let bins = bins
            .as_ref()
            .map_err(|e| anyhow::anyhow!("not measured: {e}"))?;
        let find = |name: &str| {
            bins.iter().find(|a| a.name == name).with_context(|| {
                format!(
                    "not measured: the build produced no `{name}` binary (package {package}); does it exist in this tree yet?"
                )
            })
        };
        let exe = find(binary)?;
        let out = parts_dir(&self.target).join(format!("{}.json", source.part_source()));
        let mut cmd = Command::new(&exe.executable);
        cmd.current_dir(crate::root());
        match source {
            Source::Transport => {
                cmd.arg("transport");
            }
            Source::Cluster => {
                let tern = find("tern")?;
                cmd.arg("cluster").arg("--tern").arg(&tern.executable);
            }
            Source::Criterion => {}
        }
        if self.opts.quick {
            cmd.arg("--quick");
        }
        cmd.arg("--out").arg(&out);
        run_forwarding(cmd, source.name(), self.start)?;
        let part = Part::read(&out).with_context(|| {
            format!("{binary} exited successfully but its part file is missing or malformed")
        })?;
        if part.source != source.part_source() {
            bail!(
                "{binary} wrote source {:?}, expected {:?}",
                part.source,
                source.part_source()
            );
        }
        Ok(())
    }

    fn run_criterion(&self, benches: &Result<Vec<Artifact>, String>) -> anyhow::Result<()> {
        let benches = benches
            .as_ref()
            .map_err(|e| anyhow::anyhow!("not measured: {e}"))?;
        if benches.is_empty() {
            bail!("not measured: the build produced no criterion bench");
        }
        let home = self.target.join("criterion");
        let mut failed = Vec::new();
        for (i, bench) in benches.iter().enumerate() {
            println!(
                "[xtask bench criterion {}/{} +{}] {}",
                i + 1,
                benches.len(),
                self.elapsed(),
                bench.name
            );
            let mut cmd = Command::new(&bench.executable);
            cmd.current_dir(&bench.package_dir)
                .env("CRITERION_HOME", &home)
                .arg("--bench");
            if self.opts.quick {
                cmd.args(CRITERION_QUICK);
            }
            if let Err(e) = run_forwarding(cmd, &bench.name, self.start) {
                eprintln!("[xtask bench] criterion bench {} failed: {e:#}", bench.name);
                failed.push(format!("{}: {e:#}", bench.name));
            }
        }
        if !failed.is_empty() {
            bail!("criterion benches failed: {}", failed.join("; "));
        }
        Ok(())
    }
}

/// Runs `cargo ARGS --message-format=json-render-diagnostics` (cargo's
/// progress and diagnostics go to the terminal) and returns the
/// executables of targets of `kind` (`bin`, `bench`) it built.
fn cargo_artifacts(args: &[&str], kind: &str) -> anyhow::Result<Vec<Artifact>> {
    let mut cmd = crate::cargo();
    cmd.args(args)
        .arg("--message-format=json-render-diagnostics")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting cargo {}", args.join(" ")))?;
    let stdout = child.stdout.take().context("cargo's stdout")?;
    // Cargo's progress and rendered diagnostics, forwarded; the first
    // errors are kept for the report.
    let stderr = child.stderr.take().context("cargo's stderr")?;
    let errors = std::thread::spawn(move || {
        let mut errors = Vec::new();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("{line}");
            if line.starts_with("error") && errors.len() < ERROR_TAIL_LINES {
                errors.push(line);
            }
        }
        errors
    });
    let mut artifacts = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo's output")?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            println!("{line}");
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(executable) = msg["executable"].as_str() else {
            continue;
        };
        let kinds = msg["target"]["kind"].as_array();
        if !kinds.is_some_and(|k| k.iter().any(|k| k == kind)) {
            continue;
        }
        let manifest = PathBuf::from(msg["manifest_path"].as_str().unwrap_or_default());
        artifacts.push(Artifact {
            name: msg["target"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            package_dir: manifest
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(crate::root),
            executable: PathBuf::from(executable),
        });
    }
    let status = child.wait().context("waiting for cargo")?;
    let errors = errors.join().unwrap_or_default();
    if !status.success() {
        bail!(
            "cargo {} failed ({status}): {}",
            args.join(" "),
            if errors.is_empty() {
                "see its output above".to_owned()
            } else {
                errors.join(" / ")
            }
        );
    }
    artifacts.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(artifacts)
}

/// Runs a program, forwarding each line of its stdout and stderr with the
/// elapsed time, and fails with its last lines if it fails.
fn run_forwarding(mut cmd: Command, label: &str, start: Instant) -> anyhow::Result<()> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd.spawn().with_context(|| format!("starting {program}"))?;
    let tail: Arc<Mutex<VecDeque<String>>> = Arc::default();
    let mut readers = Vec::new();
    for (stream, is_err) in [
        (
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            false,
        ),
        (
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            true,
        ),
    ] {
        let Some(stream) = stream else { continue };
        let tail = Arc::clone(&tail);
        let label = label.to_owned();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                let s = start.elapsed().as_secs();
                let stamped = format!("  +{}m{:02}s {label}| {line}", s / 60, s % 60);
                if is_err {
                    eprintln!("{stamped}");
                } else {
                    println!("{stamped}");
                }
                if let Ok(mut tail) = tail.lock() {
                    if tail.len() == ERROR_TAIL_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
            }
        }));
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for {program}"))?;
    for reader in readers {
        let _ = reader.join();
    }
    if status.success() {
        return Ok(());
    }
    let tail: Vec<String> = tail
        .lock()
        .map(|t| t.iter().filter(|l| !l.trim().is_empty()).cloned().collect())
        .unwrap_or_default();
    // The program's own error line if it printed one, else its last line.
    let last = tail
        .iter()
        .find(|l| l.trim_start().to_ascii_lowercase().starts_with("error"))
        .or(tail.last())
        .cloned()
        .unwrap_or_default();
    bail!(
        "{label} failed ({status}): {last}\n  last output:\n    {}",
        tail.join("\n    ")
    )
}

/// Reads this run's part files and criterion figures, writes report.md,
/// report.json and the charts, and prints the report.
fn write_report(target: &Path, record: RunRecord) -> anyhow::Result<Report> {
    let report = build_report(target, record)?;
    let dir = report_dir(target);
    // Charts of an earlier run must not be mistaken for this one's.
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            if entry.path().extension().is_some_and(|e| e == "svg") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    let mut report = report;
    let (charts, warnings) = write_charts(&dir, &report.merged)?;
    report.charts = charts;
    report.merged.warnings.extend(warnings);
    let markdown = render::markdown(&report)?;
    std::fs::write(dir.join("report.md"), &markdown).context("writing report.md")?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )
    .context("writing report.json")?;
    println!("\n{markdown}");
    println!(
        "xtask: report written to {} (raw numbers: report.json; charts: {} SVG files)",
        dir.join("report.md").display(),
        report.charts.len()
    );
    Ok(report)
}

fn build_report(target: &Path, record: RunRecord) -> anyhow::Result<Report> {
    let mut merged = Merged::default();
    let mut parts = Vec::new();
    let ran =
        |source: Source| record.only.is_empty() || record.only.iter().any(|o| o == source.name());
    let mut figures = Vec::new();
    if ran(Source::Criterion) {
        let since = UNIX_EPOCH + Duration::from_secs(record.started_unix);
        // Modification times have whole-second precision on some file
        // systems; a second of slack keeps this run's first figure.
        let since = since.checked_sub(Duration::from_secs(1)).unwrap_or(since);
        figures = criterion::collect(&target.join("criterion"), Some(since))?;
        merged.add(criterion::rows(&figures), Vec::new(), Vec::new());
    }
    for source in Source::ALL {
        if source.producer().is_none() || !ran(source) {
            continue;
        }
        let path = parts_dir(target).join(format!("{}.json", source.part_source()));
        if !path.exists() {
            continue; // Its step says why.
        }
        match Part::read(&path) {
            Ok(part) => {
                parts.push(PartInfo {
                    source: part.source.clone(),
                    profile: part.profile.clone(),
                    quick: part.quick,
                });
                merged.add(part.rows, part.distributions, part.curves);
            }
            Err(e) => merged.warnings.push(format!("{e:#}")),
        }
    }
    let criterion_summary = render::summarize(&merged.rows);
    Ok(Report {
        run: record,
        parts,
        merged,
        criterion: figures,
        charts: Vec::new(),
        criterion_summary,
    })
}

/// Writes one SVG per distribution and curve; a chart that cannot be drawn
/// is a warning in the report, not a failure of the run.
fn write_charts(dir: &Path, merged: &Merged) -> anyhow::Result<(Vec<Chart>, Vec<String>)> {
    let mut charts = Vec::new();
    let mut warnings = Vec::new();
    let drawn = merged
        .distributions
        .iter()
        .map(|d| (d.id.as_str(), d.title.as_str(), charts::distribution_svg(d)))
        .chain(
            merged
                .curves
                .iter()
                .map(|c| (c.id.as_str(), c.title.as_str(), charts::curve_svg(c))),
        );
    for (id, title, svg) in drawn {
        match svg {
            Ok(svg) => {
                let file = charts::file_name(id);
                std::fs::write(dir.join(&file), svg).with_context(|| format!("writing {file}"))?;
                charts.push(Chart {
                    title: title.to_owned(),
                    file,
                });
            }
            Err(e) => warnings.push(format!("chart {id:?} not drawn: {e:#}")),
        }
    }
    Ok((charts, warnings))
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

        let failover = table_line(&md, "leader failover after SIGKILL, p99");
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
