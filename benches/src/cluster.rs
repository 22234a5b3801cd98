//! `tern-bench cluster`: the cluster rows of `cargo xtask bench`'s
//! report, measured on 3-node clusters of real `tern` processes on
//! loopback ([`tern_testkit::local`]), once per transport mode:
//!
//! - `grpc`: `mode = "grpc"`;
//! - `iroh`: `mode = "iroh"`;
//! - `dual`: `mode = "dual"`, every service preferring iroh and Raft over
//!   iroh (`raft_transport = "iroh"`), fallback to gRPC on.
//!
//! Figures, each per mode:
//!
//! - **Raft commits/s** with 1 and with 64 concurrent writers (and the
//!   counts in between for the curve in full mode). A commit is one
//!   acknowledged metadata-register put (`Cluster/MetaPut`, a Raft write
//!   of its own, applied on the leader before it is answered), sent to
//!   the leader by the bench's in-process gRPC client. Put latency
//!   percentiles with one writer come with it.
//! - **Leader failover**: SIGKILL of the leader, then the time until a
//!   client's put is acknowledged by the new leader. Probes start right
//!   after the kill, one every [`PROBE_EVERY`] to alternating survivors
//!   (each with [`PROBE_TIMEOUT`]), so the figure has that resolution. The
//!   killed node is restarted and the cluster settles before the next
//!   repeat.
//! - **Steadiness**: on the same cluster, [`BenchOpts::steady`] with no
//!   client writes, then as long with 64 writers at full speed; the
//!   elections in each window are the increase of the highest
//!   `tern_raft_term` any node reports (with PreVote a term only rises
//!   for a real election). The goal is none in either. 10 minutes each
//!   (`--steady-secs 600`) is the figure the Raft issue asks for; the
//!   default is shorter so that a bench run stays short.
//!
//! The client hop is gRPC in every mode (every node listens on both
//! transports), so the columns differ only in the transport node-to-node
//! traffic (Raft included) uses. Progress goes to stderr; the part file
//! (see `xtask/src/bench`) only to `--out`. A figure that could not be
//! measured is `null` with a note, never made up; the program then exits
//! non-zero.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::etcd::{self, EtcdCluster};
use anyhow::{Context, bail};
use tern_bench_part::{Better, Curve, Distribution, Part, Row, Series, Values, build_profile};
use tern_cluster::meta_put;
use tern_protocol::metric_names as names;
use tern_protocol::{PeerAddr, RpcClient};

use tern_testkit::config;
use tern_testkit::local::LocalCluster;
use tern_transport_dual::{RaftTransport, TransportConfig};

/// The producer's name in the report.
pub const SOURCE: &str = "cluster";

/// The seed's figure for commits/s with 1 writer (openraft's own bench:
/// one process, no network, no disk), as `cargo xtask bench`'s criterion
/// rows quote it.
pub const SEED_COMMITS_1_WRITER: f64 = 33e3;
/// The seed's figure for commits/s with 64 writers (same bench).
pub const SEED_COMMITS_64_WRITERS: f64 = 912e3;

/// Timeout of one benchmark put.
pub const PUT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a failover probe is launched after the kill.
pub const PROBE_EVERY: Duration = Duration::from_millis(20);
/// Timeout of one failover probe.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on one failover (the kill to the first acknowledged put).
pub const FAILOVER_BOUND: Duration = Duration::from_secs(60);
/// Value bytes of each benchmark put.
pub const VALUE_LEN: usize = 64;
/// Failed puts tolerated in a throughput run before the run counts as
/// failed (a steady cluster fails none).
pub const MAX_FAILED_PUTS: u64 = 20;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOpts {
    /// The `tern` binary.
    pub tern: PathBuf,
    /// The short variant.
    pub quick: bool,
    /// The part file to write.
    pub out: PathBuf,
    /// Where the nodes' data, configs and logs go.
    pub dir: PathBuf,
    /// Length of each steadiness window (idle, then full load); `None`:
    /// 5 s quick, 60 s otherwise.
    pub steady_secs: Option<u64>,
    /// A partial run for profiling and for comparing a change: only these
    /// columns (`grpc`, `iroh`, `dual`, `etcd`); empty: all of them.
    pub only_modes: Vec<String>,
    /// Writer counts instead of the default ones; empty: the default.
    pub writers: Vec<usize>,
    /// Length of each throughput run instead of the default.
    pub run_secs: Option<u64>,
    /// Only the throughput runs: no steadiness window, no failovers.
    pub throughput_only: bool,
}

impl BenchOpts {
    fn secs_per_run(&self) -> Duration {
        if let Some(secs) = self.run_secs {
            Duration::from_secs(secs)
        } else if self.quick {
            Duration::from_secs(4)
        } else {
            Duration::from_secs(15)
        }
    }
    fn writer_counts(&self) -> Vec<usize> {
        if !self.writers.is_empty() {
            self.writers.clone()
        } else if self.quick {
            vec![1, 64]
        } else {
            vec![1, 16, 64, 256]
        }
    }
    /// Length of each steadiness window.
    pub fn steady(&self) -> Duration {
        Duration::from_secs(self.steady_secs.unwrap_or(if self.quick { 5 } else { 60 }))
    }
    fn failover_repeats(&self) -> usize {
        if self.throughput_only {
            0
        } else if self.quick {
            5
        } else {
            20
        }
    }
    /// Whether the column `mode` is measured.
    fn measures(&self, mode: &str) -> bool {
        self.only_modes.is_empty() || self.only_modes.iter().any(|m| m == mode)
    }
}

/// The transport modes measured, as (column, `[transport]` section).
pub fn modes() -> Vec<(&'static str, TransportConfig)> {
    vec![
        ("grpc", config::grpc()),
        ("iroh", config::iroh()),
        (
            "dual",
            config::dual(&["all_except_raft"], RaftTransport::Iroh),
        ),
    ]
}

/// Progress lines on stderr: `[bench-cluster 3/14] ...`.
struct Progress {
    step: usize,
    total: usize,
}

impl Progress {
    fn line(&mut self, msg: &str) {
        self.step += 1;
        eprintln!(
            "[bench-cluster {}/{}] {msg}",
            self.step.min(self.total),
            self.total
        );
    }
    fn info(&self, msg: &str) {
        eprintln!("[bench-cluster {}/{}]   {msg}", self.step, self.total);
    }
}

/// What one mode measured.
#[derive(Debug, Default)]
struct ModeResult {
    /// (writers, commits/s).
    throughput: Vec<(usize, f64)>,
    /// Put latencies with one writer.
    latency_1w: Vec<Duration>,
    /// (writers, commit latency p99 in seconds) of every throughput run.
    p99: Vec<(usize, f64)>,
    /// Failover times.
    failovers: Vec<Duration>,
    /// Elections while idle, then at full load ([`BenchOpts::steady`]
    /// each).
    elections: Option<(f64, f64)>,
    /// Commit latency around snapshot builds in the loaded window.
    snapshots: Option<SnapshotSplit>,
    /// Why something is missing.
    notes: Vec<String>,
}

/// `q`-quantile (0..=100) of sorted values by nearest rank.
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn sorted_secs(d: &[Duration]) -> Vec<f64> {
    let mut v: Vec<f64> = d.iter().map(Duration::as_secs_f64).collect();
    v.sort_by(f64::total_cmp);
    v
}

/// The distribution points the report draws: p1 ... p99.9 and max.
pub fn distribution(sorted: &[f64]) -> Vec<[f64; 2]> {
    [
        1.0, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9, 100.0,
    ]
    .iter()
    .filter_map(|q| percentile(sorted, *q).map(|v| [*q, v]))
    .collect()
}

/// What a throughput run measured.
struct Run {
    /// Commits per second.
    rate: f64,
    /// Every acknowledged put's latency.
    lat: Vec<Duration>,
    /// When each of those puts was sent (Unix time, seconds), in the same
    /// order.
    sent: Vec<f64>,
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// Runs `writers` concurrent writers for `run`, each calling
/// `put(writer, i)` for its `i`th put; returns commits/s and every put's
/// latency and send time. The same loop drives Tern and etcd.
async fn throughput<F, Fut>(put: F, writers: usize, run: Duration) -> anyhow::Result<Run>
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let last_error = Arc::new(std::sync::Mutex::new(String::new()));
    let start = Instant::now();
    let start_unix = unix_now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let (put, failed, stop, last_error) = (
            put.clone(),
            failed.clone(),
            stop.clone(),
            last_error.clone(),
        );
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut sent = Vec::new();
            let mut i = 0u64;
            while start.elapsed() < run && !stop.load(Ordering::Relaxed) {
                i += 1;
                let t = Instant::now();
                match put(w, i).await {
                    Ok(()) => {
                        lat.push(t.elapsed());
                        sent.push(start_unix + (t - start).as_secs_f64());
                    }
                    Err(e) => {
                        if let Ok(mut l) = last_error.lock() {
                            *l = e;
                        }
                        if failed.fetch_add(1, Ordering::Relaxed) + 1 > MAX_FAILED_PUTS {
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                }
            }
            (lat, sent)
        });
    }
    let (mut all, mut all_sent) = (Vec::new(), Vec::new());
    while let Some(r) = tasks.join_next().await {
        let (lat, sent) = r.context("a writer task panicked")?;
        all.extend(lat);
        all_sent.extend(sent);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let failed = failed.load(Ordering::Relaxed);
    if failed > MAX_FAILED_PUTS {
        let last = last_error.lock().map(|l| l.clone()).unwrap_or_default();
        bail!("{failed} puts failed with {writers} writers (last: {last})");
    }
    Ok(Run {
        rate: all.len() as f64 / elapsed,
        lat: all,
        sent: all_sent,
    })
}

/// [`throughput`] of register puts to a Tern leader.
async fn tern_throughput(
    client: Arc<dyn RpcClient>,
    leader: PeerAddr,
    tag: &str,
    writers: usize,
    run: Duration,
) -> anyhow::Result<Run> {
    let value = Arc::new("v".repeat(VALUE_LEN));
    let tag = Arc::new(tag.to_owned());
    let put = move |w: usize, i: u64| {
        let (client, leader, value, tag) =
            (client.clone(), leader.clone(), value.clone(), tag.clone());
        async move {
            meta_put(
                client.as_ref(),
                &leader,
                &format!("{tag}-{w}-{i}"),
                &format!("bench/{w}"),
                &value,
                PUT_TIMEOUT,
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
        }
    };
    throughput(put, writers, run).await
}

/// [`throughput`] of puts to an etcd leader.
async fn etcd_throughput(
    channel: tonic::transport::Channel,
    writers: usize,
    run: Duration,
) -> anyhow::Result<Run> {
    let value = Arc::new("v".repeat(VALUE_LEN));
    let put = move |w: usize, _i: u64| {
        let (channel, value) = (channel.clone(), value.clone());
        async move {
            etcd::put(&channel, &format!("bench/{w}"), &value, PUT_TIMEOUT)
                .await
                .map(|_| ())
        }
    };
    throughput(put, writers, run).await
}

/// Writers of the steadiness window at full load.
pub const STEADY_WRITERS: usize = 64;

/// The highest Raft term any running node reports on `/metrics`.
async fn highest_term(c: &LocalCluster) -> anyhow::Result<f64> {
    let mut highest: Option<f64> = None;
    for n in &c.nodes {
        let Some(addr) = n.file.as_ref().and_then(|f| f.metrics) else {
            continue;
        };
        let text = tern_testkit::scrape(addr)
            .await
            .with_context(|| format!("scraping node {}'s /metrics", n.index))?;
        let term = tern_testkit::Metrics::parse(&text).sum(names::RAFT_TERM, &[]);
        highest = Some(highest.map_or(term, |h| h.max(term)));
    }
    highest.context("no node serves /metrics")
}

/// How often the snapshot watcher scrapes every node.
pub const SNAPSHOT_POLL: Duration = Duration::from_millis(100);

/// Snapshot builds seen on the nodes at `addrs` until `stop`, each as
/// (start, end) in Unix seconds: the end from
/// `tern_store_snapshot_last_built_timestamp_seconds`, the length from the
/// growth of `tern_store_snapshot_build_seconds` (its mean when one poll
/// sees several builds of a node).
async fn watch_snapshots(
    addrs: Vec<std::net::SocketAddr>,
    stop: Arc<AtomicBool>,
) -> Vec<(f64, f64)> {
    let count = format!("{}_count", names::STORE_SNAPSHOT_BUILD_SECONDS);
    let sum = format!("{}_sum", names::STORE_SNAPSHOT_BUILD_SECONDS);
    let mut seen: Vec<Option<(f64, f64)>> = vec![None; addrs.len()];
    let mut builds = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        for (i, addr) in addrs.iter().enumerate() {
            let Ok(text) = tern_testkit::scrape(*addr).await else {
                continue;
            };
            let m = tern_testkit::Metrics::parse(&text);
            let (n, total) = (m.sum(&count, &[]), m.sum(&sum, &[]));
            if let Some((n0, total0)) = seen[i]
                && n > n0
            {
                let end = m.sum(names::STORE_SNAPSHOT_LAST_BUILT, &[]);
                let each = (total - total0) / (n - n0);
                builds.push((end - each * (n - n0), end));
            }
            seen[i] = Some((n, total));
        }
        tokio::time::sleep(SNAPSHOT_POLL).await;
    }
    builds
}

/// Commit latency p99 of the puts that overlapped a snapshot build and of
/// the others, from one run: (p99 during, p99 outside, puts during, builds).
fn split_by_snapshots(run: &Run, builds: &[(f64, f64)]) -> SnapshotSplit {
    let (mut during, mut outside) = (Vec::new(), Vec::new());
    for (lat, sent) in run.lat.iter().zip(&run.sent) {
        let done = sent + lat.as_secs_f64();
        if builds.iter().any(|(a, b)| *sent <= *b && done >= *a) {
            during.push(lat.as_secs_f64());
        } else {
            outside.push(lat.as_secs_f64());
        }
    }
    during.sort_by(f64::total_cmp);
    outside.sort_by(f64::total_cmp);
    SnapshotSplit {
        during_p99: percentile(&during, 99.0),
        outside_p99: percentile(&outside, 99.0),
        during_puts: during.len(),
        builds: builds.len(),
    }
}

/// Commit latency around snapshot builds, at full load.
#[derive(Debug, Clone, Copy, Default)]
struct SnapshotSplit {
    /// p99 of the puts that overlapped a build (seconds).
    during_p99: Option<f64>,
    /// p99 of the others.
    outside_p99: Option<f64>,
    /// Puts that overlapped a build.
    during_puts: usize,
    /// Builds seen on any node.
    builds: usize,
}

/// Counts elections (term increases) during `window` without client
/// writes, then during `window` of [`STEADY_WRITERS`] writers, and splits
/// that loaded window's commit latency by snapshot builds.
async fn steadiness(
    c: &LocalCluster,
    mode: &str,
    window: Duration,
    p: &mut Progress,
) -> anyhow::Result<((f64, f64), SnapshotSplit)> {
    c.wait_formed().await?;
    let start = highest_term(c).await?;
    tokio::time::sleep(window).await;
    let idle_end = highest_term(c).await?;
    p.info(&format!(
        "idle {}s: {} election(s)",
        window.as_secs(),
        idle_end - start
    ));
    let (leader, _) = c.wait_formed().await?;
    let addrs = c
        .nodes
        .iter()
        .filter_map(|n| n.file.as_ref().and_then(|f| f.metrics))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn(watch_snapshots(addrs, stop.clone()));
    let loaded = tern_throughput(
        c.client.clone(),
        c.nodes[leader].addr()?,
        &format!("{mode}-steady"),
        STEADY_WRITERS,
        window,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let builds = watcher.await.context("the snapshot watcher panicked")?;
    let loaded = loaded?;
    let rate = loaded.rate;
    let split = split_by_snapshots(&loaded, &builds);
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{:.1} ms", v * 1e3));
    p.info(&format!(
        "commit p99 during {} snapshot build(s) ({} puts): {}; outside: {}",
        split.builds,
        split.during_puts,
        ms(split.during_p99),
        ms(split.outside_p99)
    ));
    let loaded_end = highest_term(c).await?;
    p.info(&format!(
        "{STEADY_WRITERS} writers {}s ({rate:.0} commits/s): {} election(s)",
        window.as_secs(),
        loaded_end - idle_end
    ));
    Ok(((idle_end - start, loaded_end - idle_end), split))
}

/// Launches `probe(n)` every [`PROBE_EVERY`] after `killed_at` (each on
/// its own task, each bounded by its own timeout) until one succeeds;
/// returns when it did. Fails after [`FAILOVER_BOUND`]. Tern's and etcd's
/// failovers are measured by this one loop.
async fn first_ack<P, Fut>(killed_at: Instant, probe: P) -> anyhow::Result<Instant>
where
    P: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Instant, String>>(64);
    let mut probes = tokio::task::JoinSet::new();
    let mut n = 0usize;
    let mut tick = tokio::time::interval(PROBE_EVERY);
    let acked = loop {
        tokio::select! {
            _ = tick.tick() => {
                if killed_at.elapsed() > FAILOVER_BOUND {
                    bail!("no put was acknowledged within {FAILOVER_BOUND:?} of killing the leader");
                }
                n += 1;
                let (attempt, tx) = (probe(n), tx.clone());
                probes.spawn(async move {
                    let _ = tx.send(attempt.await.map(|()| Instant::now())).await;
                });
            }
            Some(r) = rx.recv() => {
                if let Ok(at) = r {
                    break at;
                }
            }
        }
    };
    probes.abort_all();
    Ok(acked)
}

/// Kills the leader and measures the time until a put is acknowledged by
/// a new leader; restarts the killed node and waits until the cluster has
/// settled.
async fn failover(c: &mut LocalCluster, tag: &str) -> anyhow::Result<Duration> {
    let (leader, leader_id) = c.wait_formed().await?;
    let survivors: Vec<PeerAddr> = c
        .nodes
        .iter()
        .filter(|n| n.index != leader)
        .map(|n| n.addr())
        .collect::<anyhow::Result<_>>()?;
    c.kill(leader).await?;
    let killed_at = Instant::now();
    let client = c.client.clone();
    let tag = tag.to_owned();
    let probe = move |n: usize| {
        let (client, target) = (client.clone(), survivors[n % survivors.len()].clone());
        let id = format!("{tag}-probe-{n}");
        async move {
            match meta_put(
                client.as_ref(),
                &target,
                &id,
                "bench/failover",
                "probe",
                PROBE_TIMEOUT,
            )
            .await
            {
                Ok(put) if put.leader_id != leader_id => Ok(()),
                Ok(put) => Err(format!(
                    "acknowledged by the killed leader {}",
                    put.leader_id
                )),
                Err(e) => Err(e.to_string()),
            }
        }
    };
    let acked = first_ack(killed_at, probe).await?;
    let took = acked.saturating_duration_since(killed_at);
    c.start_node(leader).await?;
    c.wait_formed().await?;
    Ok(took)
}

/// The etcd baseline's failover: SIGKILL of the leader, then the time
/// until a put to a survivor is acknowledged (only a new leader can
/// commit it); probes as in [`failover`]. Restarts the killed member and
/// waits for a leader before returning.
async fn etcd_failover(c: &mut EtcdCluster) -> anyhow::Result<Duration> {
    let leader = c.wait_leader().await?;
    let survivors: Vec<tonic::transport::Channel> = (0..c.len())
        .filter(|i| *i != leader)
        .map(|i| c.channel(i))
        .collect();
    c.kill(leader).await?;
    let killed_at = Instant::now();
    let probe = move |n: usize| {
        let channel = survivors[n % survivors.len()].clone();
        async move {
            etcd::put(&channel, "bench/failover", "probe", PROBE_TIMEOUT)
                .await
                .map(|_| ())
        }
    };
    let acked = first_ack(killed_at, probe).await?;
    let took = acked.saturating_duration_since(killed_at);
    c.start_member(leader)?;
    c.wait_leader().await?;
    Ok(took)
}

/// Prints one throughput run's figures and keeps them in `result`.
fn note_run(result: &mut ModeResult, p: &Progress, writers: usize, rate: f64, lat: Vec<Duration>) {
    let sorted = sorted_secs(&lat);
    let (p50, p99) = (percentile(&sorted, 50.0), percentile(&sorted, 99.0));
    p.info(&format!(
        "{rate:.0} commits/s ({} puts), latency p50 {:.2} ms, p99 {:.2} ms",
        lat.len(),
        p50.unwrap_or(0.0) * 1e3,
        p99.unwrap_or(0.0) * 1e3
    ));
    if let Some(p99) = p99 {
        result.p99.push((writers, p99));
    }
    if writers == 1 {
        result.latency_1w = lat;
    }
    result.throughput.push((writers, rate));
}

/// The etcd column: the same writers, run length and failovers as
/// [`measure_mode`], on 3 etcd members.
async fn measure_etcd(opts: &BenchOpts, p: &mut Progress) -> anyhow::Result<ModeResult> {
    let mut result = ModeResult::default();
    p.line("etcd: start 3 etcd members (the baseline)");
    let mut c = EtcdCluster::start(&opts.dir.join("etcd"), 3).await?;
    let run = opts.secs_per_run();
    for writers in opts.writer_counts() {
        let leader = c.wait_leader().await?;
        p.line(&format!("etcd: {writers} writer(s) for {}s", run.as_secs()));
        match etcd_throughput(c.channel(leader), writers, run).await {
            Ok(Run { rate, lat, .. }) => {
                note_run(&mut result, p, writers, rate, lat);
            }
            Err(e) => {
                p.info(&format!("FAILED: {e:#}"));
                result.notes.push(format!("etcd {writers} writers: {e:#}"));
            }
        }
    }
    let repeats = opts.failover_repeats();
    if repeats > 0 {
        p.line(&format!("etcd: leader failover x{repeats}"));
    }
    for r in 0..repeats {
        match etcd_failover(&mut c).await {
            Ok(took) => {
                p.info(&format!(
                    "failover {}/{repeats}: {:.3}s",
                    r + 1,
                    took.as_secs_f64()
                ));
                result.failovers.push(took);
            }
            Err(e) => {
                p.info(&format!("failover {}/{repeats} FAILED: {e:#}", r + 1));
                result.notes.push(format!("etcd failover {}: {e:#}", r + 1));
                break;
            }
        }
    }
    Ok(result)
}

async fn measure_mode(
    opts: &BenchOpts,
    mode: &str,
    section: &TransportConfig,
    p: &mut Progress,
) -> anyhow::Result<ModeResult> {
    let mut result = ModeResult::default();
    p.line(&format!("{mode}: start 3 tern processes"));
    let dir = opts.dir.join(mode);
    let mut c = LocalCluster::start(&opts.tern, &dir, 3, section).await?;
    let run = opts.secs_per_run();
    for writers in opts.writer_counts() {
        let (leader, _) = c.wait_formed().await?;
        p.line(&format!(
            "{mode}: {writers} writer(s) for {}s",
            run.as_secs()
        ));
        let addr = c.nodes[leader].addr()?;
        match tern_throughput(
            c.client.clone(),
            addr,
            &format!("{mode}-{writers}w"),
            writers,
            run,
        )
        .await
        {
            Ok(Run { rate, lat, .. }) => {
                note_run(&mut result, p, writers, rate, lat);
            }
            Err(e) => {
                p.info(&format!("FAILED: {e:#}"));
                result
                    .notes
                    .push(format!("{mode} {writers} writers: {e:#}"));
            }
        }
    }
    let window = opts.steady();
    if !opts.throughput_only {
        p.line(&format!(
            "{mode}: steadiness, {}s idle then {}s with {STEADY_WRITERS} writers",
            window.as_secs(),
            window.as_secs()
        ));
        match steadiness(&c, mode, window, p).await {
            Ok((e, split)) => {
                result.elections = Some(e);
                result.snapshots = Some(split);
            }
            Err(e) => {
                p.info(&format!("FAILED: {e:#}"));
                result.notes.push(format!("{mode} steadiness: {e:#}"));
            }
        }
    }
    let repeats = opts.failover_repeats();
    if repeats > 0 {
        p.line(&format!("{mode}: leader failover x{repeats}"));
    }
    for r in 0..repeats {
        match failover(&mut c, &format!("{mode}-fo{r}")).await {
            Ok(took) => {
                p.info(&format!(
                    "failover {}/{repeats}: {:.3}s",
                    r + 1,
                    took.as_secs_f64()
                ));
                result.failovers.push(took);
            }
            Err(e) => {
                p.info(&format!("failover {}/{repeats} FAILED: {e:#}", r + 1));
                result
                    .notes
                    .push(format!("{mode} failover {}: {e:#}", r + 1));
                break;
            }
        }
    }
    c.shutdown().await;
    Ok(result)
}

/// Runs the whole benchmark and writes the part file. Errors when a
/// figure could not be measured (after writing what was).
pub async fn run(opts: &BenchOpts) -> anyhow::Result<()> {
    let modes = modes();
    let extra = if opts.throughput_only { 0 } else { 2 };
    let steps_per_mode = 1 + opts.writer_counts().len() + extra;
    let columns = modes
        .iter()
        .map(|(mode, _)| *mode)
        .chain(["etcd"])
        .filter(|mode| opts.measures(mode))
        .count();
    let mut p = Progress {
        step: 0,
        total: columns * steps_per_mode + 1,
    };
    let mut results = Vec::new();
    for (mode, section) in &modes {
        if !opts.measures(mode) {
            continue;
        }
        let r = match measure_mode(opts, mode, section, &mut p).await {
            Ok(r) => r,
            Err(e) => {
                p.info(&format!("{mode}: FAILED: {e:#}"));
                ModeResult {
                    notes: vec![format!("{mode}: {e:#}")],
                    ..ModeResult::default()
                }
            }
        };
        results.push((*mode, r));
    }
    let etcd = if !opts.measures("etcd") {
        ModeResult::default()
    } else if EtcdCluster::available() {
        match measure_etcd(opts, &mut p).await {
            Ok(r) => r,
            Err(e) => {
                p.info(&format!("etcd: FAILED: {e:#}"));
                ModeResult {
                    notes: vec![format!("etcd: {e:#}")],
                    ..ModeResult::default()
                }
            }
        }
    } else {
        ModeResult {
            notes: vec![format!(
                "etcd: `{}` is not installed (Debian package etcd-server; `cargo xtask bench` installs it)",
                etcd::ETCD
            )],
            ..ModeResult::default()
        }
    };
    results.push(("etcd", etcd));
    p.line(&format!("write {}", opts.out.display()));
    part(opts, &results).write(&opts.out)?;
    let notes: Vec<&String> = results.iter().flat_map(|(_, r)| &r.notes).collect();
    if !notes.is_empty() {
        bail!(
            "some figures could not be measured (null in the report): {}",
            notes
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    Ok(())
}

/// The report section of every row.
const SECTION: &str = "Raft on 3 tern processes";

/// The part file (format: the `tern-bench-part` crate).
fn part(opts: &BenchOpts, results: &[(&str, ModeResult)]) -> Part {
    let per_mode = |f: &dyn Fn(&ModeResult) -> Option<f64>| -> Values {
        Values::from_columns(results.iter().map(|(mode, r)| (*mode, f(r))))
    };
    let rate = |writers: usize| {
        move |r: &ModeResult| {
            r.throughput
                .iter()
                .find(|(w, _)| *w == writers)
                .map(|(_, v)| *v)
        }
    };
    let lat = |q: f64| {
        move |r: &ModeResult| {
            let s = sorted_secs(&r.latency_1w);
            percentile(&s, q).map(|v| v * 1e9)
        }
    };
    let fo = |q: f64| {
        move |r: &ModeResult| {
            let s = sorted_secs(&r.failovers);
            percentile(&s, q)
        }
    };
    let notes: Vec<String> = results.iter().flat_map(|(_, r)| r.notes.clone()).collect();
    let missing = if notes.is_empty() {
        String::new()
    } else {
        format!("; not measured: {}", notes.join("; "))
    };
    let run = opts.secs_per_run().as_secs();
    let repeats = opts.failover_repeats();
    let row = |id: &str,
               name: &str,
               unit: &str,
               better: Better,
               values: Values,
               percentile: Option<f64>,
               note: String| Row {
        id: id.to_owned(),
        section: SECTION.to_owned(),
        name: name.to_owned(),
        unit: unit.to_owned(),
        better,
        values,
        percentile,
        note,
        source: String::new(),
    };
    let mut rows: Vec<Row> = opts
        .writer_counts()
        .into_iter()
        .map(|writers| {
            let (id, name) = if writers == 1 {
                ("raft_commit_1_writer_3proc".to_owned(), "Raft commits/s, 1 writer".to_owned())
            } else {
                (
                    format!("raft_commit_{writers}_writers_3proc"),
                    format!("Raft commits/s, {writers} writers"),
                )
            };
            let seed = match writers {
                1 => Some(SEED_COMMITS_1_WRITER),
                64 => Some(SEED_COMMITS_64_WRITERS),
                _ => None,
            };
            let values = Values {
                seed,
                ..per_mode(&rate(writers))
            };
            let seed_note = if seed.is_some() {
                "; seed: openraft's bench, no network, no disk"
            } else {
                ""
            };
            row(
                &id,
                &name,
                "commits/s",
                Better::Higher,
                values,
                None,
                format!(
                    "{writers} concurrent writer(s) putting to the leader for {run}s, client over gRPC, every commit fsynced (Tern and etcd){seed_note}{missing}"
                ),
            )
        })
        .collect();
    rows.extend(vec![
        row(
            "raft_commit_latency_p50_3proc",
            "Raft commit latency, 1 writer, p50",
            "ns",
            Better::Lower,
            per_mode(&lat(50.0)),
            Some(50.0),
            "put sent to the leader until acknowledged (committed and applied)".to_owned(),
        ),
        row(
            "raft_commit_latency_p99_3proc",
            "Raft commit latency, 1 writer, p99",
            "ns",
            Better::Lower,
            per_mode(&lat(99.0)),
            Some(99.0),
            "put sent to the leader until acknowledged (committed and applied)".to_owned(),
        ),
        row(
            "raft_failover_p50_3proc",
            "leader failover after SIGKILL, p50",
            "s",
            Better::Lower,
            per_mode(&fo(50.0)),
            Some(50.0),
            format!(
                "kill to the first put acknowledged by the new leader; {repeats} repeats; probes every {} ms{missing}",
                PROBE_EVERY.as_millis()
            ),
        ),
        row(
            "raft_failover_p99_3proc",
            "leader failover after SIGKILL, p99",
            "s",
            Better::Lower,
            per_mode(&fo(99.0)),
            Some(99.0),
            format!(
                "kill to the first put acknowledged by the new leader; {repeats} repeats (p99 of {repeats} is their maximum){missing}"
            ),
        ),
    ]);
    rows.extend(
        opts.writer_counts()
            .into_iter()
            .filter(|w| *w > 1)
            .map(|writers| {
                row(
                    &format!("raft_commit_latency_p99_{writers}_writers_3proc"),
                    &format!("Raft commit latency, {writers} writers, p99"),
                    "ns",
                    Better::Lower,
                    per_mode(&|r: &ModeResult| {
                        r.p99
                            .iter()
                            .find(|(w, _)| *w == writers)
                            .map(|(_, v)| v * 1e9)
                    }),
                    Some(99.0),
                    format!(
                        "every put of the {writers}-writer throughput run, sent to the leader until acknowledged{missing}"
                    ),
                )
            }),
    );
    let window = opts.steady().as_secs();
    let builds = results
        .iter()
        .filter_map(|(mode, r)| r.snapshots.map(|s| format!("{mode} {}", s.builds)))
        .collect::<Vec<_>>()
        .join(", ");
    let tern_only = |f: &dyn Fn(&ModeResult) -> Option<f64>| -> Values {
        Values::from_columns(
            results
                .iter()
                .filter(|(mode, _)| *mode != "etcd")
                .map(|(mode, r)| (*mode, f(r))),
        )
    };
    rows.extend(vec![
        row(
            "raft_elections_idle_3proc",
            &format!("elections while idle, {window} s"),
            "count",
            Better::Lower,
            tern_only(&|r| r.elections.map(|e| e.0)),
            None,
            format!(
                "increase of the highest tern_raft_term over {window} s without client writes; goal 0; not measured for etcd{missing}"
            ),
        ),
        row(
            "raft_elections_loaded_3proc",
            &format!("elections at full load, {window} s"),
            "count",
            Better::Lower,
            tern_only(&|r| r.elections.map(|e| e.1)),
            None,
            format!(
                "increase of the highest tern_raft_term over {window} s of {STEADY_WRITERS} writers putting as fast as they can, on the same cluster right after the idle window; goal 0; not measured for etcd{missing}"
            ),
        ),
        row(
            "raft_commit_p99_during_snapshot_3proc",
            "Raft commit latency p99 during a snapshot build, 64 writers",
            "ns",
            Better::Lower,
            tern_only(&|r| r.snapshots.and_then(|s| s.during_p99).map(|v| v * 1e9)),
            Some(99.0),
            format!(
                "puts of the {window} s loaded window that overlapped a snapshot build on any node (a node snapshots every 10,000 entries; builds seen: {builds}); goal at most 2x the p99 outside one; null when no build fell in the window; not measured for etcd{missing}"
            ),
        ),
        row(
            "raft_commit_p99_outside_snapshot_3proc",
            "Raft commit latency p99 outside snapshot builds, 64 writers",
            "ns",
            Better::Lower,
            tern_only(&|r| r.snapshots.and_then(|s| s.outside_p99).map(|v| v * 1e9)),
            Some(99.0),
            format!(
                "the other puts of the same window; not measured for etcd{missing}"
            ),
        ),
    ]);
    let series = |f: &dyn Fn(&ModeResult) -> Vec<(f64, f64)>| -> Series {
        results
            .iter()
            .map(|(mode, r)| ((*mode).to_owned(), f(r)))
            .filter(|(_, points)| !points.is_empty())
            .collect()
    };
    let pairs = |points: Vec<[f64; 2]>, scale: f64| -> Vec<(f64, f64)> {
        points.into_iter().map(|[q, v]| (q, v * scale)).collect()
    };
    Part {
        source: SOURCE.to_owned(),
        profile: build_profile().to_owned(),
        quick: opts.quick,
        rows,
        distributions: vec![
            Distribution {
                id: "raft_commit_latency_3proc".to_owned(),
                title: "Raft commit latency, 1 writer, 3 tern processes".to_owned(),
                unit: "ns".to_owned(),
                series: series(&|r| pairs(distribution(&sorted_secs(&r.latency_1w)), 1e9)),
            },
            Distribution {
                id: "raft_failover_3proc".to_owned(),
                title: "Leader failover after SIGKILL, 3 tern processes".to_owned(),
                unit: "s".to_owned(),
                series: series(&|r| pairs(distribution(&sorted_secs(&r.failovers)), 1.0)),
            },
        ],
        curves: vec![Curve {
            id: "raft_commits_vs_writers_3proc".to_owned(),
            title: "Raft commits/s vs concurrent writers, 3 tern processes".to_owned(),
            x: "concurrent writers".to_owned(),
            y: "commits/s".to_owned(),
            series: series(&|r| r.throughput.iter().map(|(w, v)| (*w as f64, *v)).collect()),
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[], 50.0), None);
        let d = distribution(&v);
        assert_eq!(d.len(), 11);
        assert_eq!(d.last(), Some(&[100.0, 100.0]));
    }

    #[test]
    fn puts_overlapping_a_snapshot_build_are_counted_apart() {
        let ms = Duration::from_millis;
        // Puts sent at 0, 1, ..., 9 s, each taking 10 ms but the one at
        // 5 s (100 ms), which overlaps the build from 5.05 to 5.2 s; the
        // one at 4 s ends before it starts.
        let run = Run {
            rate: 1.0,
            lat: (0..10)
                .map(|i| if i == 5 { ms(100) } else { ms(10) })
                .collect(),
            sent: (0..10).map(f64::from).collect(),
        };
        let split = split_by_snapshots(&run, &[(5.05, 5.2)]);
        assert_eq!(split.during_puts, 1);
        assert_eq!(split.builds, 1);
        assert_eq!(split.during_p99, Some(0.1));
        assert_eq!(split.outside_p99, Some(0.01));
        let none = split_by_snapshots(&run, &[]);
        assert_eq!(none.during_p99, None);
        assert_eq!(none.during_puts, 0);
    }

    #[test]
    fn a_mode_that_failed_is_null_with_a_note() {
        let opts = BenchOpts {
            tern: "tern".into(),
            quick: true,
            out: "x.json".into(),
            dir: "/tmp".into(),
            steady_secs: None,
            only_modes: vec![],
            writers: vec![],
            run_secs: None,
            throughput_only: false,
        };
        let ok = ModeResult {
            throughput: vec![(1, 100.0), (64, 900.0)],
            latency_1w: vec![Duration::from_millis(2); 10],
            p99: vec![(1, 0.002), (64, 0.004)],
            failovers: vec![Duration::from_millis(700); 5],
            elections: Some((0.0, 1.0)),
            snapshots: Some(SnapshotSplit {
                during_p99: Some(0.02),
                outside_p99: Some(0.01),
                during_puts: 40,
                builds: 2,
            }),
            notes: vec![],
        };
        let failed = ModeResult {
            notes: vec!["iroh: did not start".into()],
            ..ModeResult::default()
        };
        let part = part(&opts, &[("grpc", ok), ("iroh", failed)]);
        assert_eq!(part.source, SOURCE);
        let row = |id: &str| part.rows.iter().find(|r| r.id == id).unwrap();
        let commits = row("raft_commit_64_writers_3proc");
        assert_eq!(commits.values.grpc, Some(900.0));
        assert_eq!(commits.values.iroh, None);
        assert_eq!(commits.values.seed, Some(SEED_COMMITS_64_WRITERS));
        assert!(commits.note.contains("did not start"));
        let p99_64 = row("raft_commit_latency_p99_64_writers_3proc");
        assert_eq!(p99_64.values.grpc, Some(0.004 * 1e9));
        assert_eq!(p99_64.values.iroh, None);
        let fo = row("raft_failover_p99_3proc");
        assert_eq!(fo.values.grpc, Some(0.7));
        assert_eq!(fo.percentile, Some(99.0));
        let loaded = row("raft_elections_loaded_3proc");
        assert_eq!(loaded.values.grpc, Some(1.0));
        assert_eq!(loaded.values.iroh, None);
        assert_eq!(row("raft_elections_idle_3proc").values.grpc, Some(0.0));
        assert!(loaded.name.ends_with("5 s"), "{}", loaded.name);
        let during = row("raft_commit_p99_during_snapshot_3proc");
        assert_eq!(during.values.grpc, Some(0.02 * 1e9));
        assert_eq!(during.values.iroh, None);
        assert!(
            during.note.contains("builds seen: grpc 2"),
            "{}",
            during.note
        );
        let outside = row("raft_commit_p99_outside_snapshot_3proc");
        assert_eq!(outside.values.grpc, Some(0.01 * 1e9));
        // What xtask reads back is what was written: 2 commit rates, 1
        // p99 beyond one writer (64), 4 latency and failover rows, 4
        // steadiness rows.
        let text = serde_json::to_string(&part).unwrap();
        assert_eq!(Part::parse(&text).unwrap().rows.len(), 11);
        assert_eq!(
            part.curves[0].series["grpc"],
            vec![(1.0, 100.0), (64.0, 900.0)]
        );
    }
}
