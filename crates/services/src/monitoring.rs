//! Monitoring: one registry for every metric of the process, exported as
//! Prometheus text on HTTP (`GET /metrics`) and through the Monitoring RPC.
//!
//! The registry is the `metrics` facade's global recorder (from
//! `metrics-exporter-prometheus`), so the transports, the router and Raft
//! record into it without knowing it exists. [`Monitoring::install`] sets it
//! up once per process and describes every metric in
//! [`tern_protocol::metric_names::ALL`], so each carries HELP and TYPE.
//! Latency histograms get explicit buckets ([`LATENCY_BUCKETS`]) so that
//! `histogram_quantile` can compare gRPC and iroh p99 on one node.
//!
//! Process figures (CPU seconds, resident and virtual memory, threads, open
//! and maximum file descriptors) are read from `/proc/self` at each render
//! and appended in the same text format: CPU time is fractional, which the
//! facade's integer counters cannot carry.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock, OnceLock};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use prost::Message;
use tern_protocol::catalog::{Method, methods};
use tern_protocol::metric_names::{self as names, MetricKind};
use tern_protocol::{
    BoxFuture, Handler, RequestContext, RouteError, Routes, ServiceId, Status, pb,
};
use tokio::net::TcpListener;

/// Histogram buckets for every `*_seconds` metric: 50 µs to 10 s, dense
/// where loopback and LAN calls land.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// Clock ticks per second of `/proc/self/stat` CPU times. Linux reports
/// `USER_HZ`, fixed at 100 on every architecture Tern runs on.
const USER_HZ: f64 = 100.0;

/// Most bytes of an HTTP request head the `/metrics` endpoint reads; the
/// server is for scrapers, not uploads.
pub const MAX_HTTP_HEADER_BYTES: usize = 16 * 1024;

/// Longest the `/metrics` endpoint waits for a request's head; a client
/// that sends it a byte at a time is closed after this.
pub const METRICS_HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Longest one `/metrics` connection may stay open, keep-alive included:
/// scrapers reconnect; a slow reader cannot hold a place for ever.
pub const METRICS_CONNECTION_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(60);

/// Most `/metrics` connections served at once; more are closed on accept.
/// A node has a few scrapers, not hundreds.
pub const METRICS_MAX_CONNECTIONS: usize = 64;

/// How often a refused `/metrics` connection is logged: enough to see a
/// flood, never a line per connection.
pub const METRICS_REFUSAL_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Pause after a failed accept (out of descriptors), so the loop does not
/// spin.
const METRICS_ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

// hyper refuses (panics on) a read buffer smaller than 8 KiB.
const _: () = assert!(MAX_HTTP_HEADER_BYTES >= 8192);

/// Why monitoring could not start.
#[derive(Debug, thiserror::Error)]
pub enum MonitoringError {
    /// Another metrics recorder was installed in this process first.
    #[error("a different metrics recorder is already installed in this process")]
    RecorderTaken,
    /// The bucket configuration was refused.
    #[error("invalid histogram buckets: {0}")]
    Buckets(String),
    /// The HTTP listener could not bind.
    #[error(
        "cannot listen for /metrics on {addr}: {source}; choose a free address for `metrics` in the config"
    )]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// The process's metrics registry. Clone the `Arc` freely.
#[derive(Debug)]
pub struct Monitoring {
    handle: PrometheusHandle,
}

static INSTALLED: OnceLock<Arc<Monitoring>> = OnceLock::new();

impl Monitoring {
    /// Installs the registry as the process's metrics recorder, or returns
    /// the one already installed by an earlier call.
    pub fn install() -> Result<Arc<Monitoring>, MonitoringError> {
        if let Some(m) = INSTALLED.get() {
            return Ok(m.clone());
        }
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .map_err(|e| MonitoringError::Buckets(e.to_string()))?
            .build_recorder();
        let monitoring = Arc::new(Monitoring {
            handle: recorder.handle(),
        });
        // Two threads may race here; only one recorder can win.
        if metrics::set_global_recorder(recorder).is_err() {
            return INSTALLED
                .get()
                .cloned()
                .ok_or(MonitoringError::RecorderTaken);
        }
        for def in names::ALL {
            match def.kind {
                MetricKind::Counter => metrics::describe_counter!(def.name, def.help),
                MetricKind::Gauge => metrics::describe_gauge!(def.name, def.help),
                MetricKind::Histogram => metrics::describe_histogram!(def.name, def.help),
            }
        }
        let _ = INSTALLED.set(monitoring.clone());
        Ok(INSTALLED.get().cloned().unwrap_or(monitoring))
    }

    /// The whole exposition: every recorded metric, then the process figures.
    pub fn render(&self) -> String {
        self.handle.run_upkeep();
        let mut text = self.handle.render();
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&process_metrics());
        text
    }

    /// Binds `addr` for `GET /metrics`.
    pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MonitoringError> {
        TcpListener::bind(addr)
            .await
            .map_err(|source| MonitoringError::Bind { addr, source })
    }

    /// Serves `GET /metrics` on `listener` until `shutdown` resolves.
    pub async fn serve_http(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let mut shutdown = std::pin::pin!(shutdown);
        let slots = Arc::new(tokio::sync::Semaphore::new(METRICS_MAX_CONNECTIONS));
        let mut refused_logged: Option<std::time::Instant> = None;
        loop {
            let accepted = tokio::select! {
                _ = &mut shutdown => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, remote) = match accepted {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a /metrics connection failed");
                    tokio::time::sleep(METRICS_ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                if refused_logged.is_none_or(|t| t.elapsed() > METRICS_REFUSAL_LOG_INTERVAL) {
                    tracing::warn!(%remote, limit = METRICS_MAX_CONNECTIONS, "refused a /metrics connection: too many open (logged once a minute)");
                    refused_logged = Some(std::time::Instant::now());
                }
                drop(stream);
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let service = hyper::service::service_fn(move |req| {
                    let me = me.clone();
                    async move { Ok::<_, Infallible>(me.respond(&req)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(METRICS_HEADER_READ_TIMEOUT)
                    .max_buf_size(MAX_HTTP_HEADER_BYTES)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                match tokio::time::timeout(METRICS_CONNECTION_MAX_AGE, conn).await {
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "/metrics connection ended with an error");
                    }
                    Ok(Ok(())) => {}
                    Err(_) => {
                        tracing::debug!(%remote, "/metrics connection closed at its age limit")
                    }
                }
            });
        }
    }

    fn respond(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let reply = |status: StatusCode, body: String, content_type: &str| {
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            *resp.status_mut() = status;
            if let Ok(v) = content_type.parse() {
                resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
            }
            resp
        };
        match (req.method(), req.uri().path()) {
            (&hyper::Method::GET, "/metrics") => reply(
                StatusCode::OK,
                self.render(),
                "text/plain; version=0.0.4; charset=utf-8",
            ),
            (&hyper::Method::GET, _) => reply(
                StatusCode::NOT_FOUND,
                "not found: metrics are at /metrics\n".into(),
                "text/plain",
            ),
            _ => reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET is served\n".into(),
                "text/plain",
            ),
        }
    }

    /// The Monitoring RPC handler over this registry.
    pub fn handler(self: &Arc<Self>) -> Arc<dyn Handler> {
        Arc::new(MonitoringService {
            monitoring: self.clone(),
        })
    }
}

/// Serves `Monitoring/Metrics`.
struct MonitoringService {
    monitoring: Arc<Monitoring>,
}

impl Handler for MonitoringService {
    fn handle(
        &self,
        _ctx: RequestContext,
        method: &'static Method,
        payload: Bytes,
    ) -> BoxFuture<'static, Result<Bytes, Status>> {
        let monitoring = self.monitoring.clone();
        Box::pin(async move {
            let route = ROUTES.route(method)?;
            route(&monitoring, payload)
        })
    }
}

/// A Monitoring method, served at once.
type Route = fn(&Monitoring, Bytes) -> Result<Bytes, Status>;

static ROUTES: LazyLock<Routes<Route>> = LazyLock::new(|| {
    routes().expect(
        "the Monitoring routes are valid (the `routes_cover_the_catalogue` test builds them)",
    )
});

fn routes() -> Result<Routes<Route>, RouteError> {
    Routes::<Route>::new(ServiceId::Monitoring).unary(methods::MONITORING_METRICS, serve_metrics)
}

/// `Monitoring/Metrics`.
fn serve_metrics(monitoring: &Monitoring, payload: Bytes) -> Result<Bytes, Status> {
    pb::MetricsRequest::decode(payload)
        .map_err(|e| Status::invalid_argument(format!("undecodable MetricsRequest: {e}")))?;
    let text = monitoring.render();
    Ok(pb::MetricsResponse {
        prometheus_text: text,
    }
    .encode_to_vec()
    .into())
}

/// Process figures from `/proc/self`, in Prometheus text format. A figure
/// that cannot be read is left out rather than reported as zero.
pub fn process_metrics() -> String {
    let mut out = String::new();
    let mut emit = |name: &str, value: f64| {
        if let Some(def) = names::ALL.iter().find(|d| d.name == name) {
            let kind = match def.kind {
                MetricKind::Counter => "counter",
                MetricKind::Gauge => "gauge",
                MetricKind::Histogram => "histogram",
            };
            let _ = writeln!(
                out,
                "# HELP {name} {}\n# TYPE {name} {kind}\n{name} {value}",
                def.help
            );
        }
    };
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the parenthesised command name, which may hold spaces.
        if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of stat(5); `rest` starts
            // at field 3.
            let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
            if let (Some(user), Some(system)) = (ticks(11), ticks(12)) {
                emit(names::PROCESS_CPU_SECONDS, (user + system) / USER_HZ);
            }
        }
    }
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
        };
        if let Some(kib) = field("VmRSS:") {
            emit(names::PROCESS_RESIDENT_MEMORY, kib * 1024.0);
        }
        if let Some(kib) = field("VmSize:") {
            emit(names::PROCESS_VIRTUAL_MEMORY, kib * 1024.0);
        }
        if let Some(threads) = field("Threads:") {
            emit(names::PROCESS_THREADS, threads);
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        emit(names::PROCESS_OPEN_FDS, dir.count() as f64);
    }
    if let Ok(limits) = std::fs::read_to_string("/proc/self/limits")
        && let Some(max) = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse::<f64>().ok())
    {
        emit(names::PROCESS_MAX_FDS, max);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_cover_the_catalogue() {
        let routes = routes().expect("the routes are valid");
        let missing: Vec<String> = routes.missing().iter().map(|m| m.label()).collect();
        assert!(missing.is_empty(), "methods without a route: {missing:?}");
    }

    #[test]
    fn process_figures_are_read() {
        let text = process_metrics();
        for name in [
            names::PROCESS_CPU_SECONDS,
            names::PROCESS_RESIDENT_MEMORY,
            names::PROCESS_OPEN_FDS,
            names::PROCESS_MAX_FDS,
            names::PROCESS_THREADS,
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} missing:\n{text}"
            );
        }
        let rss: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
            .and_then(|v| v.parse().ok())
            .unwrap();
        assert!(rss > 1e5, "implausible RSS {rss}");
    }
}
