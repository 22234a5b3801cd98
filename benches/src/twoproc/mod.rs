//! `tern-bench transport`: the measurements between two processes, and the
//! server child processes they run against.
//!
//! For each transport ([`Kind::ALL`]) the client starts `tern-bench serve`
//! as a child ([`ServerChild`]), connects ([`Driver`]) and measures, in
//! this order:
//!
//! 1. unary calls, 64 B, one caller, every latency recorded; around them
//!    the CPU time of both processes, their peak memory (reset just
//!    before) and, after, their open file descriptors;
//! 2. connection establishment: a fresh connection and its first call;
//! 3. calls/s at 1, 4, 16, 64 and 256 concurrent callers;
//! 4. bulk throughput: 64 MiB in 1, 4 and 8 MiB chunks (8 MiB is the
//!    largest power of two that fits the protocol's default 16 MiB frame
//!    with its header), a few in flight;
//! 5. control-lane latency, idle and while a bulk transfer runs on the
//!    same pair of processes.
//!
//! Every call has a deadline and every phase a bound, so a hung server
//! fails the run with the transport named and the tail of the server's
//! stderr, instead of hanging it. Children are killed when the client
//! exits, on success or error (`kill_on_drop`, and they stop on their own
//! when their stdin closes).

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::client::Driver;
use crate::kind::Kind;
use crate::procfs;
use crate::serve::Ready;
use crate::stats::Latencies;
use tern_bench_part::{Better, Curve, Distribution, Part, Row, Series, Values, build_profile};

/// The `source` of the part file.
pub const SOURCE: &str = "transport-2proc";
/// Payload of the unary and connection probes.
pub const UNARY_PAYLOAD: usize = 64;
/// Bytes of one bulk transfer.
pub const BULK_TOTAL: usize = 64 << 20;
/// Chunk sizes of the bulk rows.
pub const BULK_CHUNKS: [usize; 3] = [1 << 20, 4 << 20, 8 << 20];
/// Concurrent callers of the calls/s curve.
pub const CURVE_LEVELS: [usize; 5] = [1, 4, 16, 64, 256];
/// Lines of a child's stderr kept for error messages.
const STDERR_TAIL: usize = 40;
/// Longest a server may take to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a server may take to stop once its stdin closed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on any one measurement phase.
const PHASE_TIMEOUT: Duration = Duration::from_secs(600);

/// How much each measurement does.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Fresh connections timed.
    pub conn_samples: usize,
    /// Unary calls timed (one caller); also the CPU/memory sample.
    pub unary_calls: usize,
    /// How long each level of the calls/s curve runs.
    pub curve_duration: Duration,
    /// Bytes per bulk transfer.
    pub bulk_total: usize,
    /// Transfers per chunk size.
    pub bulk_rounds: usize,
    /// Bulk chunks in flight at once.
    pub bulk_parallel: usize,
    /// Control calls timed, idle and again during bulk.
    pub control_samples: usize,
}

impl Settings {
    /// The full run (several minutes).
    pub fn full() -> Settings {
        Settings {
            conn_samples: 200,
            unary_calls: 100_000,
            curve_duration: Duration::from_secs(3),
            bulk_total: BULK_TOTAL,
            bulk_rounds: 3,
            bulk_parallel: 4,
            control_samples: 2_000,
        }
    }

    /// `--quick`: every figure, smaller samples (a minute or two).
    pub fn quick() -> Settings {
        Settings {
            conn_samples: 30,
            unary_calls: 10_000,
            curve_duration: Duration::from_millis(700),
            bulk_total: BULK_TOTAL,
            bulk_rounds: 1,
            bulk_parallel: 4,
            control_samples: 300,
        }
    }

    /// `--smoke` (tests): every figure from tiny samples; the numbers mean
    /// little, the pipeline is what is checked.
    pub fn smoke() -> Settings {
        Settings {
            conn_samples: 3,
            unary_calls: 200,
            curve_duration: Duration::from_millis(150),
            bulk_total: 8 << 20,
            bulk_rounds: 1,
            bulk_parallel: 4,
            control_samples: 20,
        }
    }
}

/// Progress lines on stderr: `[transport 3/28] grpc unary 64 B: ...`.
#[derive(Debug)]
struct Progress {
    step: usize,
    total: usize,
}

impl Progress {
    fn step(&mut self, kind: Kind, what: &str) {
        self.step += 1;
        self.say(kind, what);
    }

    fn say(&self, kind: Kind, what: &str) {
        eprintln!("[transport {}/{}] {kind} {what}", self.step, self.total);
    }
}

/// Steps [`Progress`] counts per transport.
const STEPS_PER_TRANSPORT: usize = 7;

// ---------------------------------------------------------------------------
// The server child.

/// A running `tern-bench serve` child.
#[derive(Debug)]
pub struct ServerChild {
    kind: Kind,
    child: Child,
    stdin: Option<ChildStdin>,
    _stdout: ChildStdout,
    tail: Arc<Mutex<VecDeque<String>>>,
    reader: Option<tokio::task::JoinHandle<()>>,
    /// What the server announced.
    pub ready: Ready,
}

impl ServerChild {
    /// Starts `exe serve --transport KIND` and waits for its ready line.
    pub async fn spawn(exe: &Path, kind: Kind) -> anyhow::Result<ServerChild> {
        let mut child = Command::new(exe)
            .args(["serve", "--transport", kind.cli_name()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("{kind}: starting the server {}", exe.display()))?;
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let reader = child.stderr.take().map(|stderr| {
            let tail = tail.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Ok(mut t) = tail.lock() {
                        if t.len() == STDERR_TAIL {
                            t.pop_front();
                        }
                        t.push_back(line);
                    }
                }
            })
        });
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .context("the server child has no stdout pipe")?;
        let mut partial = ServerStart {
            kind,
            child,
            tail,
            reader,
        };
        let mut lines = BufReader::new(stdout);
        let mut line = String::new();
        let read = tokio::time::timeout(READY_TIMEOUT, lines.read_line(&mut line)).await;
        let ready = match read {
            Err(_) => {
                return Err(partial
                    .explain(anyhow!(
                        "the server printed no ready line within {READY_TIMEOUT:?}"
                    ))
                    .await);
            }
            Ok(Err(e)) => return Err(partial.explain(anyhow!("reading its stdout: {e}")).await),
            Ok(Ok(0)) => {
                return Err(partial
                    .explain(anyhow!("the server closed stdout before it was ready"))
                    .await);
            }
            Ok(Ok(_)) => match serde_json::from_str::<Ready>(line.trim()) {
                Ok(r) => r,
                Err(e) => {
                    return Err(partial
                        .explain(anyhow!(
                            "its ready line {:?} is not valid: {e}",
                            line.trim()
                        ))
                        .await);
                }
            },
        };
        if ready.transport != kind {
            return Err(partial
                .explain(anyhow!("it serves {} instead", ready.transport))
                .await);
        }
        let ServerStart {
            child,
            tail,
            reader,
            ..
        } = partial;
        Ok(ServerChild {
            kind,
            child,
            stdin,
            _stdout: lines.into_inner(),
            tail,
            reader,
            ready,
        })
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.ready.pid
    }

    /// Adds to `err` the transport, whether the server is still running,
    /// and the tail of its stderr.
    pub async fn explain(&mut self, err: anyhow::Error) -> anyhow::Error {
        let status = match self.child.try_wait() {
            Ok(Some(status)) => format!("the server exited ({status})"),
            Ok(None) => "the server is still running".to_owned(),
            Err(e) => format!("the server's state is unknown ({e})"),
        };
        let tail = tail_text(&self.tail);
        anyhow!(
            "{}: {err:#}\n{status}; its stderr ends with:\n{tail}",
            self.kind
        )
    }

    /// Stops the server: closes its stdin, waits for it to exit, kills it
    /// if it does not within [`STOP_TIMEOUT`]. Fails if it exited with an
    /// error.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        drop(self.stdin.take());
        match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(self
                .explain(anyhow!("the server stopped with {status}"))
                .await),
            Ok(Err(e)) => Err(self.explain(anyhow!("waiting for the server: {e}")).await),
            Err(_) => {
                let _ = self.child.kill().await;
                Err(self
                    .explain(anyhow!(
                        "the server did not stop within {STOP_TIMEOUT:?} of its stdin closing; killed"
                    ))
                    .await)
            }
        }
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        if let Some(r) = self.reader.take() {
            r.abort();
        }
    }
}

/// A child that has not announced itself yet.
struct ServerStart {
    kind: Kind,
    child: Child,
    tail: Arc<Mutex<VecDeque<String>>>,
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl ServerStart {
    /// Kills the child, lets its stderr drain, and names both in `err`.
    async fn explain(&mut self, err: anyhow::Error) -> anyhow::Error {
        let status = match tokio::time::timeout(Duration::from_secs(2), self.child.wait()).await {
            Ok(Ok(status)) => format!("the server exited ({status})"),
            _ => {
                let _ = self.child.kill().await;
                "the server was killed".to_owned()
            }
        };
        if let Some(r) = self.reader.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), r).await;
        }
        anyhow!(
            "{}: {err:#}\n{status}; its stderr ends with:\n{}",
            self.kind,
            tail_text(&self.tail)
        )
    }
}

fn tail_text(tail: &Mutex<VecDeque<String>>) -> String {
    let lines: Vec<String> = tail
        .lock()
        .map(|t| t.iter().cloned().collect())
        .unwrap_or_default();
    if lines.is_empty() {
        "  (nothing)".to_owned()
    } else {
        lines
            .iter()
            .map(|l| format!("  {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

// ---------------------------------------------------------------------------
// The measurements.

/// A figure that may be missing, with the reason.
type Maybe<T> = Result<T, String>;

/// Everything measured for one transport.
#[derive(Debug)]
pub struct Measured {
    /// Fresh connection + first call.
    pub conn: Latencies,
    /// Unary calls, one caller.
    pub unary: Latencies,
    /// `(callers, calls/s)`.
    pub curve: Vec<(usize, f64)>,
    /// Levels of the curve at which calls failed, and why.
    pub curve_failures: Vec<String>,
    /// `(chunk bytes, bytes/s)`.
    pub bulk: Vec<(usize, f64)>,
    /// Control calls with nothing else running.
    pub control_idle: Latencies,
    /// Control calls while a bulk transfer runs.
    pub control_bulk: Latencies,
    /// Bulk bytes/s moved while the control calls ran.
    pub bulk_during_control: f64,
    /// Client CPU seconds per 100k unary calls.
    pub cpu_client: Maybe<f64>,
    /// Server CPU seconds per 100k unary calls.
    pub cpu_server: Maybe<f64>,
    /// Client peak resident bytes during the unary calls.
    pub rss_client: Maybe<u64>,
    /// Server peak resident bytes during the unary calls.
    pub rss_server: Maybe<u64>,
    /// Client open descriptors with the connection up.
    pub fds_client: Maybe<usize>,
    /// Server open descriptors with the connection up.
    pub fds_server: Maybe<usize>,
}

fn payload() -> Bytes {
    Bytes::from(vec![0x5a; UNARY_PAYLOAD])
}

async fn bounded<T>(
    what: &str,
    fut: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(PHASE_TIMEOUT, fut)
        .await
        .map_err(|_| anyhow!("{what} did not finish within {PHASE_TIMEOUT:?}"))?
        .with_context(|| what.to_owned())
}

fn proc_err(what: &str, pid: u32, e: std::io::Error) -> String {
    format!("{what} of pid {pid} unreadable: {e}")
}

async fn unary_phase(
    driver: &Driver,
    settings: &Settings,
    server_pid: u32,
    kind: Kind,
    progress: &Progress,
) -> anyhow::Result<(Latencies, [Maybe<f64>; 2], [Maybe<u64>; 2])> {
    let me = std::process::id();
    let reset = |pid: u32| {
        procfs::reset_peak_rss(pid).map_err(|e| {
            format!("the peak memory of pid {pid} could not be reset before the calls: {e}")
        })
    };
    let reset_client = reset(me);
    let reset_server = reset(server_pid);
    let cpu0 = (procfs::cpu_seconds(me), procfs::cpu_seconds(server_pid));
    let data = payload();
    let mut lat = Latencies::new();
    let report_every = (settings.unary_calls / 5).max(1);
    for i in 0..settings.unary_calls {
        let started = Instant::now();
        driver.unary(data.clone()).await?;
        lat.record(started.elapsed());
        if (i + 1) % report_every == 0 {
            progress.say(
                kind,
                &format!(
                    "unary {UNARY_PAYLOAD} B: {}/{} calls",
                    i + 1,
                    settings.unary_calls
                ),
            );
        }
    }
    let cpu1 = (procfs::cpu_seconds(me), procfs::cpu_seconds(server_pid));
    let per_100k = 100_000.0 / settings.unary_calls as f64;
    let cpu = |a: std::io::Result<f64>, b: std::io::Result<f64>, pid| match (a, b) {
        (Ok(a), Ok(b)) => Ok((b - a) * per_100k),
        (Err(e), _) | (_, Err(e)) => Err(proc_err("CPU time", pid, e)),
    };
    let rss = |reset: Result<(), String>, pid| {
        reset.and_then(|()| procfs::peak_rss_bytes(pid).map_err(|e| proc_err("VmHWM", pid, e)))
    };
    Ok((
        lat,
        [cpu(cpu0.0, cpu1.0, me), cpu(cpu0.1, cpu1.1, server_pid)],
        [rss(reset_client, me), rss(reset_server, server_pid)],
    ))
}

async fn conn_phase(driver: &Driver, settings: &Settings) -> anyhow::Result<Latencies> {
    let mut lat = Latencies::new();
    for _ in 0..settings.conn_samples {
        lat.record(driver.fresh_connection(payload()).await?);
    }
    Ok(lat)
}

/// The calls/s curve. A level at which calls fail has no point; it is
/// named, with how many calls failed and the first error, in the returned
/// list (a transport that cannot carry that many callers is a finding, not
/// a reason to lose the other figures).
async fn curve_phase(
    driver: &Arc<Driver>,
    settings: &Settings,
    levels: &[usize],
) -> anyhow::Result<(Vec<(usize, f64)>, Vec<String>)> {
    let mut curve = Vec::new();
    let mut failures = Vec::new();
    for &callers in levels {
        let done = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let first_error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let started = Instant::now();
        let deadline = started + settings.curve_duration;
        let tasks: Vec<_> = (0..callers)
            .map(|_| {
                let (driver, done, failed, first_error) = (
                    driver.clone(),
                    done.clone(),
                    failed.clone(),
                    first_error.clone(),
                );
                tokio::spawn(async move {
                    let data = payload();
                    while Instant::now() < deadline {
                        match driver.unary(data.clone()).await {
                            Ok(()) => {
                                done.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                if let Ok(mut first) = first_error.lock() {
                                    first.get_or_insert_with(|| format!("{e:#}"));
                                }
                                break;
                            }
                        }
                    }
                })
            })
            .collect();
        for t in futures::future::join_all(tasks).await {
            t.context("a caller task panicked")?;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let failed = failed.load(Ordering::Relaxed);
        if failed == 0 {
            curve.push((callers, done.load(Ordering::Relaxed) as f64 / elapsed));
        } else {
            let first = first_error
                .lock()
                .ok()
                .and_then(|f| f.clone())
                .unwrap_or_default();
            tracing::warn!("{callers} callers: {failed} calls failed: {first}");
            failures.push(format!(
                "{callers} callers: {failed} calls failed (callers stop at their first \
                 error), first: {first}"
            ));
            // Let the client re-dial before the next level.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    Ok((curve, failures))
}

/// Sends `total` bytes as chunks of `chunk` bytes, `parallel` in flight.
async fn bulk_transfer(
    driver: &Arc<Driver>,
    chunk: &Bytes,
    total: usize,
    parallel: usize,
) -> anyhow::Result<()> {
    let chunks = total.div_ceil(chunk.len());
    let next = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..parallel.min(chunks))
        .map(|_| {
            let (driver, chunk, next) = (driver.clone(), chunk.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= chunks {
                        return anyhow::Ok(());
                    }
                    driver.bulk(i, chunk.clone()).await?;
                }
            })
        })
        .collect();
    for w in futures::future::join_all(workers).await {
        w.context("a bulk sender task failed")??;
    }
    Ok(())
}

async fn bulk_phase(
    driver: &Arc<Driver>,
    settings: &Settings,
) -> anyhow::Result<Vec<(usize, f64)>> {
    let mut rates = Vec::new();
    for chunk_len in BULK_CHUNKS {
        let chunk = Bytes::from(vec![0x42u8; chunk_len]);
        let started = Instant::now();
        for _ in 0..settings.bulk_rounds {
            bulk_transfer(driver, &chunk, settings.bulk_total, settings.bulk_parallel).await?;
        }
        let bytes =
            (settings.bulk_total.div_ceil(chunk_len) * chunk_len * settings.bulk_rounds) as f64;
        rates.push((chunk_len, bytes / started.elapsed().as_secs_f64()));
    }
    Ok(rates)
}

async fn control_samples(driver: &Driver, n: usize) -> anyhow::Result<Latencies> {
    let mut lat = Latencies::new();
    for _ in 0..n {
        let started = Instant::now();
        driver.control().await?;
        lat.record(started.elapsed());
    }
    Ok(lat)
}

/// Control calls while 1 MiB bulk chunks stream without pause; returns the
/// latencies and the bulk rate during them.
async fn control_under_bulk(
    driver: &Arc<Driver>,
    settings: &Settings,
) -> anyhow::Result<(Latencies, f64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let moved = Arc::new(AtomicU64::new(0));
    let chunk = Bytes::from(vec![0x42u8; BULK_CHUNKS[0]]);
    let senders: Vec<_> = (0..settings.bulk_parallel)
        .map(|w| {
            let (driver, chunk, stop, moved) =
                (driver.clone(), chunk.clone(), stop.clone(), moved.clone());
            tokio::spawn(async move {
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    driver.bulk(i, chunk.clone()).await?;
                    moved.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    i += 1;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    // Wait until bulk is flowing (bounded by the phase timeout above).
    while moved.load(Ordering::Relaxed) == 0 && !senders.iter().any(|s| s.is_finished()) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let started = Instant::now();
    let bytes0 = moved.load(Ordering::Relaxed);
    let lat = control_samples(driver, settings.control_samples).await;
    let rate = (moved.load(Ordering::Relaxed) - bytes0) as f64 / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for s in futures::future::join_all(senders).await {
        s.context("a bulk sender task failed")??;
    }
    Ok((lat?, rate))
}

/// Measures one transport against its server child.
async fn measure(
    kind: Kind,
    server: &mut ServerChild,
    settings: &Settings,
    progress: &mut Progress,
) -> anyhow::Result<Measured> {
    let me = std::process::id();
    let server_pid = server.pid();
    let driver = Arc::new(bounded("connecting", Driver::connect(&server.ready)).await?);

    progress.step(
        kind,
        &format!("unary {UNARY_PAYLOAD} B: 0/{} calls", settings.unary_calls),
    );
    let (unary, [cpu_client, cpu_server], [rss_client, rss_server]) = bounded(
        "unary calls",
        unary_phase(&driver, settings, server_pid, kind, progress),
    )
    .await?;
    let fds_client = procfs::fd_count(me).map_err(|e| proc_err("descriptors", me, e));
    let fds_server =
        procfs::fd_count(server_pid).map_err(|e| proc_err("descriptors", server_pid, e));

    progress.step(
        kind,
        &format!(
            "connection establishment: {} fresh connections",
            settings.conn_samples
        ),
    );
    let conn = bounded("fresh connections", conn_phase(&driver, settings)).await?;

    progress.step(
        kind,
        &format!(
            "calls/s at {CURVE_LEVELS:?} concurrent callers, {:?} each",
            settings.curve_duration
        ),
    );
    let (curve, curve_failures) = bounded(
        "the calls/s curve",
        curve_phase(&driver, settings, &CURVE_LEVELS),
    )
    .await?;

    progress.step(
        kind,
        &format!(
            "bulk: {} MiB x {} in 1/4/8 MiB chunks",
            settings.bulk_total >> 20,
            settings.bulk_rounds
        ),
    );
    let bulk = bounded("bulk transfers", bulk_phase(&driver, settings)).await?;

    progress.step(
        kind,
        &format!("control lane idle: {} calls", settings.control_samples),
    );
    let control_idle = bounded(
        "idle control calls",
        control_samples(&driver, settings.control_samples),
    )
    .await?;

    progress.step(
        kind,
        &format!(
            "control lane during bulk: {} calls",
            settings.control_samples
        ),
    );
    let (control_bulk, bulk_during_control) = bounded(
        "control calls during bulk",
        control_under_bulk(&driver, settings),
    )
    .await?;

    match Arc::try_unwrap(driver) {
        Ok(mut d) => d.close().await,
        Err(_) => tracing::warn!("{kind}: client tasks still hold the driver; dropping it"),
    }
    Ok(Measured {
        conn,
        unary,
        curve,
        curve_failures,
        bulk,
        control_idle,
        control_bulk,
        bulk_during_control,
        cpu_client,
        cpu_server,
        rss_client,
        rss_server,
        fds_client,
        fds_server,
    })
}

/// Runs every measurement for every transport in `kinds`, starting
/// servers from `exe`, and returns the part.
pub async fn run(
    exe: &Path,
    kinds: &[Kind],
    settings: &Settings,
    quick: bool,
) -> anyhow::Result<Part> {
    let mut progress = Progress {
        step: 0,
        total: kinds.len() * STEPS_PER_TRANSPORT,
    };
    let mut results = Vec::new();
    for &kind in kinds {
        progress.step(kind, "starting the server process");
        let mut server = ServerChild::spawn(exe, kind).await?;
        let measured = match measure(kind, &mut server, settings, &mut progress).await {
            Ok(m) => m,
            Err(e) => return Err(server.explain(e).await),
        };
        server.stop().await?;
        results.push((kind, measured));
    }
    Ok(build_part(&results, settings, quick))
}

// ---------------------------------------------------------------------------
// The part file.

const SECTION_CONN: &str = "Connections between two processes";
const SECTION_CALLS: &str = "Calls between two processes";
const SECTION_CONTROL: &str = "Control lane under bulk load, two processes";
const SECTION_RESOURCES: &str = "Resources, two processes";

struct RowSpec<'a> {
    id: &'a str,
    section: &'a str,
    name: String,
    unit: &'a str,
    better: Better,
    percentile: Option<u8>,
    note: String,
}

fn row(spec: RowSpec<'_>, values: BTreeMap<String, Option<f64>>) -> Row {
    Row {
        id: spec.id.to_owned(),
        section: spec.section.to_owned(),
        name: spec.name,
        unit: spec.unit.to_owned(),
        better: spec.better,
        values: Values::from_columns(values),
        percentile: spec.percentile.map(f64::from),
        note: spec.note,
        source: String::new(),
    }
}

fn values<'a>(
    results: &'a [(Kind, Measured)],
    f: impl Fn(&'a Measured) -> Option<f64>,
) -> BTreeMap<String, Option<f64>> {
    results
        .iter()
        .map(|(k, m)| (k.value_key().to_owned(), f(m)))
        .collect()
}

/// Values of a figure that may be missing, and a note naming what is
/// missing and why.
fn maybe_values(
    results: &[(Kind, Measured)],
    f: impl Fn(&Measured) -> Maybe<f64>,
) -> (BTreeMap<String, Option<f64>>, String) {
    let mut missing = Vec::new();
    let values = results
        .iter()
        .map(|(k, m)| {
            let v = match f(m) {
                Ok(v) => Some(v),
                Err(why) => {
                    missing.push(format!("{k}: {why}"));
                    None
                }
            };
            (k.value_key().to_owned(), v)
        })
        .collect();
    (values, missing.join("; "))
}

fn join_notes(a: String, b: String) -> String {
    match (a.is_empty(), b.is_empty()) {
        (_, true) => a,
        (true, false) => b,
        (false, false) => format!("{a}; not measured: {b}"),
    }
}

fn build_part(results: &[(Kind, Measured)], s: &Settings, quick: bool) -> Part {
    let mut rows = Vec::new();
    let lat_row = |rows: &mut Vec<Row>,
                   id: &str,
                   section: &str,
                   name: &str,
                   p: u8,
                   note: String,
                   pick: &dyn Fn(&Measured) -> &Latencies| {
        rows.push(row(
            RowSpec {
                id,
                section,
                name: format!("{name}, p{p}"),
                unit: "ns",
                better: Better::Lower,
                percentile: Some(p),
                note,
            },
            values(results, |m| pick(m).percentile(f64::from(p))),
        ));
    };

    let conn_note = format!(
        "{} fresh connections; ours: a new client identity each (iroh: endpoint bound outside \
         the timing), timed from dial to the first 64 B call's answer; raw: new connection or \
         channel from the same process",
        s.conn_samples
    );
    for p in [50, 99] {
        lat_row(
            &mut rows,
            &format!("conn_p{p}_2proc"),
            SECTION_CONN,
            "connection establishment + first call, without 0-RTT",
            p,
            conn_note.clone(),
            &|m| &m.conn,
        );
    }
    for p in [50u8, 99] {
        rows.push(row(
            RowSpec {
                id: &format!("conn_0rtt_p{p}_2proc"),
                section: SECTION_CONN,
                name: format!("connection establishment + first call, with 0-RTT, p{p}"),
                unit: "ns",
                better: Better::Lower,
                percentile: Some(p),
                note: "not applicable: our iroh transport deliberately does not use 0-RTT (early \
                       data would reach a service before the caller's key is proven; see the \
                       tern-transport-iroh crate docs), and gRPC over TCP+HTTP/2 has none"
                    .to_owned(),
            },
            results
                .iter()
                .map(|(k, _)| (k.value_key().to_owned(), None))
                .collect(),
        ));
    }

    let unary_note = format!(
        "{} sequential calls, 1 caller, each one timed; ours: Raft/AppendEntries echo on the \
         normal lane",
        s.unary_calls
    );
    for p in [50, 99] {
        lat_row(
            &mut rows,
            &format!("unary_p{p}_2proc"),
            SECTION_CALLS,
            "unary call, 64 B payload",
            p,
            unary_note.clone(),
            &|m| &m.unary,
        );
    }
    let curve_failures: String = results
        .iter()
        .flat_map(|(k, m)| m.curve_failures.iter().map(move |f| format!("{k} at {f}")))
        .collect::<Vec<_>>()
        .join("; ");
    for callers in [1usize, 64] {
        rows.push(row(
            RowSpec {
                id: &format!("calls_per_s_c{callers}_2proc"),
                section: SECTION_CALLS,
                name: format!(
                    "unary calls/s, {callers} concurrent caller{}",
                    if callers == 1 { "" } else { "s" }
                ),
                unit: "calls/s",
                better: Better::Higher,
                percentile: None,
                note: join_notes(
                    format!(
                        "64 B echo, callers loop for {:?} on one client",
                        s.curve_duration
                    ),
                    curve_failures.clone(),
                ),
            },
            values(results, |m| {
                m.curve.iter().find(|(c, _)| *c == callers).map(|(_, r)| *r)
            }),
        ));
    }
    for chunk in BULK_CHUNKS {
        let mib = chunk >> 20;
        rows.push(row(
            RowSpec {
                id: &format!("bulk_{mib}mib_2proc"),
                section: SECTION_CALLS,
                name: format!("bulk throughput, {mib} MiB calls"),
                unit: "bytes/s",
                better: Better::Higher,
                percentile: None,
                note: format!(
                    "{} MiB x {} in {mib} MiB calls, {} in flight; ours: Raft/Snapshot on the \
                     bulk lane (protobuf encoding included)",
                    s.bulk_total >> 20,
                    s.bulk_rounds,
                    s.bulk_parallel
                ),
            },
            values(results, |m| {
                m.bulk.iter().find(|(c, _)| *c == chunk).map(|(_, r)| *r)
            }),
        ));
    }

    let idle_note = format!(
        "{} sequential calls, nothing else running; ours: Raft/Vote on the control lane; raw: a \
         small echo (raw iroh) or Vote (raw gRPC) on the one connection",
        s.control_samples
    );
    let rates: Vec<String> = results
        .iter()
        .map(|(k, m)| format!("{k} {:.0} MB/s", m.bulk_during_control / 1e6))
        .collect();
    let bulk_note = format!(
        "{} sequential calls while {} x 1 MiB bulk calls stream without pause to the same \
         server (bulk rate meanwhile, approximate: chunks completed in the window, which is short when the control calls are fast: {}); the raw baselines have no lanes",
        s.control_samples,
        s.bulk_parallel,
        rates.join(", ")
    );
    for p in [50, 99] {
        lat_row(
            &mut rows,
            &format!("control_idle_p{p}_2proc"),
            SECTION_CONTROL,
            "control-lane call, idle",
            p,
            idle_note.clone(),
            &|m| &m.control_idle,
        );
    }
    for p in [50, 99] {
        lat_row(
            &mut rows,
            &format!("control_bulk_p{p}_2proc"),
            SECTION_CONTROL,
            "control-lane call during a bulk transfer",
            p,
            bulk_note.clone(),
            &|m| &m.control_bulk,
        );
    }

    let per = format!(
        "measured over the {} one-caller unary calls, scaled to 100k",
        s.unary_calls
    );
    let cpu_note = format!("user+sys from /proc/<pid>/stat, {per}");
    let rss_note = format!(
        "VmHWM, reset (clear_refs) just before the {} unary calls; the client process also holds \
         the bench itself and what earlier transports left allocated",
        s.unary_calls
    );
    let fd_note = "/proc/<pid>/fd counted after the unary calls, connection up (the client also \
                   holds its pipes to the server child)"
        .to_owned();
    type Pick = fn(&Measured) -> Maybe<f64>;
    let resources: [(&str, &str, &str, &String, Pick); 6] = [
        (
            "cpu_client_per_100k_2proc",
            "CPU seconds per 100k unary calls, client process",
            "s",
            &cpu_note,
            |m| m.cpu_client.clone(),
        ),
        (
            "cpu_server_per_100k_2proc",
            "CPU seconds per 100k unary calls, server process",
            "s",
            &cpu_note,
            |m| m.cpu_server.clone(),
        ),
        (
            "peak_rss_client_2proc",
            "peak memory during the unary calls, client process",
            "bytes",
            &rss_note,
            |m| m.rss_client.clone().map(|b| b as f64),
        ),
        (
            "peak_rss_server_2proc",
            "peak memory during the unary calls, server process",
            "bytes",
            &rss_note,
            |m| m.rss_server.clone().map(|b| b as f64),
        ),
        (
            "fds_client_2proc",
            "open file descriptors, client process",
            "count",
            &fd_note,
            |m| m.fds_client.clone().map(|n| n as f64),
        ),
        (
            "fds_server_2proc",
            "open file descriptors, server process",
            "count",
            &fd_note,
            |m| m.fds_server.clone().map(|n| n as f64),
        ),
    ];
    for (id, name, unit, note, pick) in resources {
        let (vals, missing) = maybe_values(results, pick);
        rows.push(row(
            RowSpec {
                id,
                section: SECTION_RESOURCES,
                name: name.to_owned(),
                unit,
                better: Better::Lower,
                percentile: None,
                note: join_notes(note.clone(), missing),
            },
            vals,
        ));
    }

    let series = |pick: &dyn Fn(&Measured) -> &Latencies| -> Series {
        results
            .iter()
            .map(|(k, m)| {
                let points = pick(m).chart().into_iter().map(|[q, v]| (q, v));
                (k.value_key().to_owned(), points.collect())
            })
            .collect()
    };
    let distributions = vec![
        Distribution {
            id: "unary_latency_2proc".to_owned(),
            title: "Unary call latency, 64 B, 2 processes".to_owned(),
            unit: "ns".to_owned(),
            series: series(&|m| &m.unary),
        },
        Distribution {
            id: "control_during_bulk_latency_2proc".to_owned(),
            title: "Control-lane latency during a bulk transfer, 2 processes".to_owned(),
            unit: "ns".to_owned(),
            series: series(&|m| &m.control_bulk),
        },
    ];
    let curves = vec![Curve {
        id: "calls_vs_concurrency_2proc".to_owned(),
        title: "Calls/s vs concurrent callers, 2 processes".to_owned(),
        x: "concurrent callers".to_owned(),
        y: "calls/s".to_owned(),
        series: results
            .iter()
            .map(|(k, m)| {
                (
                    k.value_key().to_owned(),
                    m.curve.iter().map(|&(c, r)| (c as f64, r)).collect(),
                )
            })
            .collect(),
    }];
    Part {
        source: SOURCE.to_owned(),
        profile: build_profile().to_owned(),
        quick,
        rows,
        distributions,
        curves,
    }
}

/// Every row id the part holds, in order (for tests and the report).
pub const ROW_IDS: [&str; 21] = [
    "conn_p50_2proc",
    "conn_p99_2proc",
    "conn_0rtt_p50_2proc",
    "conn_0rtt_p99_2proc",
    "unary_p50_2proc",
    "unary_p99_2proc",
    "calls_per_s_c1_2proc",
    "calls_per_s_c64_2proc",
    "bulk_1mib_2proc",
    "bulk_4mib_2proc",
    "bulk_8mib_2proc",
    "control_idle_p50_2proc",
    "control_idle_p99_2proc",
    "control_bulk_p50_2proc",
    "control_bulk_p99_2proc",
    "cpu_client_per_100k_2proc",
    "cpu_server_per_100k_2proc",
    "peak_rss_client_2proc",
    "peak_rss_server_2proc",
    "fds_client_2proc",
    "fds_server_2proc",
];
