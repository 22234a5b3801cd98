//! The run: build every program once in one profile, run each producer
//! program (each writes its part file), then each criterion bench, with a
//! progress line per step and a record of how each step ended.

use super::*;

/// A program built for the run.
#[derive(Clone, Debug)]
pub(super) struct Artifact {
    /// The cargo target's name (binary or bench name).
    name: String,
    /// The package's directory (criterion benches run there, as under
    /// `cargo bench`).
    package_dir: PathBuf,
    executable: PathBuf,
}

/// One run: its options, its record and its progress.
pub(super) struct Run {
    opts: Options,
    target: PathBuf,
    record: RunRecord,
    start: Instant,
    /// Steps announced so far and in total.
    step: usize,
    total: usize,
}

impl Run {
    pub(super) fn new(opts: Options, target: PathBuf) -> Run {
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

    pub(super) fn execute(mut self) -> anyhow::Result<()> {
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
                if matches!(source, Source::Cluster | Source::Fleet)
                    && !packages.contains(&"tern-node")
                {
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
            Source::Fleet => {
                let tern = find("tern")?;
                cmd.arg("fleet").arg("--tern").arg(&tern.executable);
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
