//! The measurements against one server child, in the order the module
//! docs list them, each phase bounded; and [`run`], every transport in turn.

use super::part::build_part;
use super::*;

/// A figure that may be missing, with the reason.
pub(super) type Maybe<T> = Result<T, String>;

/// Everything measured for one transport.
#[derive(Debug)]
pub struct Measured {
    /// Fresh connection + first call.
    pub conn: Latencies,
    /// New connection of a client that connected before + first call
    /// (iroh: 0-RTT).
    pub conn_resumed: Latencies,
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

async fn resumed_phase(driver: &Driver, settings: &Settings) -> anyhow::Result<Latencies> {
    let mut lat = Latencies::new();
    for _ in 0..settings.conn_samples {
        lat.record(driver.resumed_connection(payload()).await?);
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
            "connection establishment, resumed: {} new connections",
            settings.conn_samples
        ),
    );
    let conn_resumed = bounded("resumed connections", resumed_phase(&driver, settings)).await?;

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
        conn_resumed,
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

/// Runs `what` alone against a `kind` server child started from `exe`
/// for about `duration`, for a profiler or a quick before/after; returns
/// a line saying what was measured.
pub async fn load(
    exe: &Path,
    kind: Kind,
    what: Load,
    duration: Duration,
) -> anyhow::Result<String> {
    let mut server = ServerChild::spawn(exe, kind).await?;
    let result = bounded("the load", load_on(&server, what, duration)).await;
    match result {
        Ok(line) => {
            server.stop().await?;
            Ok(format!("{kind} {line}"))
        }
        Err(e) => Err(server.explain(e).await),
    }
}

/// `N calls, p50 X µs, p99 Y µs`.
fn summary(lat: &Latencies) -> String {
    let us = |p: f64| lat.percentile(p).unwrap_or(f64::NAN) / 1e3;
    format!(
        "{} calls, p50 {:.0} µs, p99 {:.0} µs",
        lat.count(),
        us(50.0),
        us(99.0)
    )
}

async fn load_on(server: &ServerChild, what: Load, duration: Duration) -> anyhow::Result<String> {
    let driver = Arc::new(Driver::connect(&server.ready).await?);
    let settings = Settings::full();
    let started = Instant::now();
    let line = match what {
        Load::Unary => {
            let mut lat = Latencies::new();
            let data = payload();
            while started.elapsed() < duration {
                let t = Instant::now();
                driver.unary(data.clone()).await?;
                lat.record(t.elapsed());
            }
            format!("unary: {}", summary(&lat))
        }
        Load::Bulk => {
            let chunk = Bytes::from(vec![0x42u8; BULK_CHUNKS[0]]);
            let mut bytes = 0usize;
            while started.elapsed() < duration {
                bulk_transfer(&driver, &chunk, settings.bulk_total, settings.bulk_parallel).await?;
                bytes += settings.bulk_total;
            }
            let rate = bytes as f64 / started.elapsed().as_secs_f64();
            format!("bulk 1 MiB chunks: {:.0} MB/s", rate / 1e6)
        }
        Load::ControlUnderBulk => {
            let idle = control_samples(&driver, 2_000).await?;
            let samples = Settings {
                control_samples: (duration.as_millis() as usize).max(100) * 2,
                ..settings
            };
            let (lat, rate) = control_under_bulk(&driver, &samples).await?;
            format!(
                "control idle: {}; during bulk: {}; bulk meanwhile {:.0} MB/s",
                summary(&idle),
                summary(&lat),
                rate / 1e6
            )
        }
    };
    match Arc::try_unwrap(driver) {
        Ok(mut d) => d.close().await,
        Err(_) => tracing::warn!("client tasks still hold the driver; dropping it"),
    }
    Ok(line)
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
