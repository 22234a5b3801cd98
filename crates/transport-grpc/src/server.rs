//! The serving side: the Tern services (messages passed through as bytes)
//! that dispatch into one
//! [`Handler`], the standard health and reflection services, caller
//! authentication, limits, and graceful shutdown.
//!
//! Every connection is TLS 1.3 (see [`crate::tls`]). The accept loop takes
//! a place under the node's connection caps (in total, per remote IP)
//! before the handshake, bounds the handshake in time, and then a place
//! per proven peer id; a connection past a cap is closed at once and
//! counted (`tern_transport_auth_failures_total{reason=…}`).
//!
//! Every request then passes through `AuthLayer`. The caller is the node
//! the TLS handshake proved, never a value the request declares. A request
//! for a Tern method (`/tern.v1.*`) from a connection without a client
//! certificate is answered `Unauthenticated` at once, before its body is
//! read; health and reflection serve everyone. Anonymous connections are
//! closed when idle past [`ANONYMOUS_IDLE_TIMEOUT`] or older than
//! [`ANONYMOUS_MAX_AGE`].
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt as _;
use http::HeaderValue;
use tern_protocol::frame::DEFAULT_MAX_PAYLOAD;
use tern_protocol::{
    Handler, Method, MethodKind, PeerId, Priority, RequestContext, ServiceId, Status,
    TransportKind, pb,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::budget::{BudgetBody, Budgets, HeldBytes};
use crate::codec::RawCodec;
use crate::io::{ConnInfo, ConnKill, Counts, KillSwitch, Places, ServerConn};
use crate::metrics::{self, AuthReason, Direction, InFlight, Outcome, Side};
use crate::tls::{self, TlsIdentity};

/// Metadata key: the caller's priority class (`0`..`3`, see
/// [`Priority`]), so the serving side can report it to the handler.
pub const PRIORITY_KEY: &str = "tern-priority";

/// Response metadata key set (to `1`) when the node refused a call because
/// it is shutting down; the client reports `PeerShuttingDown`.
pub const SHUTTING_DOWN_KEY: &str = "tern-shutting-down";

/// Response metadata key set (to `1`) on every answer that passed through
/// the node's authentication layer, so a client tells a Tern service's
/// status (an application answer) from one made by the HTTP/2 stack around
/// it (tonic's own deadline, a client-side decoding limit).
pub const ANSWERED_KEY: &str = "tern-answered";

/// The gRPC path prefix of Tern's own services, which need an
/// authenticated caller.
pub const TERN_PATH_PREFIX: &str = "/tern.v1.";

/// Interval of HTTP/2 keep-alive pings on idle connections, so that a peer
/// that vanished without closing is noticed within seconds, not at the next
/// call's deadline.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// How long a keep-alive ping may go unanswered before the connection is
/// closed.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Most concurrent streams one connection may open. Bounds the work one
/// peer can start at once; well above the callers of one node (the
/// conformance suite keeps 256 in flight, which the client then queues).
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;

/// HTTP/2 flow-control window of each inbound connection: how many bytes
/// of request bodies the server buffers per connection before the peer
/// must wait. It also sets h2's budget for small DATA frames (half the
/// window): a connection that buffers more small frames than that is closed
/// with `ENHANCE_YOUR_CALM` ("too_many_data_frames"). With hyper's adaptive
/// window the connection would start at the spec's 64 KiB, a budget of about
/// 175 small messages, and a burst of a few hundred concurrent small calls
/// (ordinary traffic for a node) lost the connection. 8 MiB allows about
/// 22,000 buffered small messages, beyond [`MAX_CONCURRENT_STREAMS`].
pub const CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;

/// HTTP/2 flow-control window of each inbound stream: one call's request
/// body may be this far ahead of the handler reading it. The stream
/// contract's per-stream window ([`tern_protocol::stream::STREAM_WINDOW`]),
/// also the client's on every lane but bulk.
pub const STREAM_WINDOW: u32 = tern_protocol::stream::STREAM_WINDOW;

/// Most inbound connections served at once, handshakes included. A
/// cluster node needs a few per peer (one per priority lane in use) plus
/// operators' tools; past this, new connections are closed at once, so a
/// flood of connections cannot exhaust file descriptors.
pub const MAX_INBOUND_CONNECTIONS: usize = 4096;

/// Most connections from one remote IP address, handshakes included: a
/// host running several nodes (a test on loopback) and its operators'
/// tools stay far below it, and one hostile host can hold at most this
/// share of [`MAX_INBOUND_CONNECTIONS`].
pub const MAX_CONNECTIONS_PER_IP: usize = 256;

/// Most connections one proven node id may hold: one per priority lane
/// (four), times a few for reconnects racing the old connection's close
/// and a CLI using the node's own key.
pub const MAX_CONNECTIONS_PER_PEER: usize = 32;

/// Longest a TLS handshake may take after the TCP accept; a client that
/// sends its handshake a byte at a time is closed after this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// An anonymous connection (no client certificate: a stock tool) with no
/// request in flight is closed after this long without a new request.
pub const ANONYMOUS_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// An anonymous connection is closed after this long whatever it does, so a
/// slow reader or a long health watch cannot hold a place for ever (the
/// tool reconnects).
pub const ANONYMOUS_MAX_AGE: Duration = Duration::from_secs(600);

/// Bounds on how often an anonymous connection's idle bound and age are
/// checked (a quarter of the idle bound, within these): often enough that
/// a connection outlives its bound by little, rarely enough to cost
/// nothing.
const ANONYMOUS_CHECK_MIN: Duration = Duration::from_millis(50);
const ANONYMOUS_CHECK_MAX: Duration = Duration::from_secs(5);

/// Handshaken connections waiting for the HTTP/2 server to take them.
const ACCEPTED_QUEUE: usize = 64;

/// How often a log line about refused connections or callers may repeat
/// for one remote address or peer and reason.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Most (source, reason) pairs the refusal log remembers; past it the
/// memory starts over, so a flood of addresses cannot grow it.
const REFUSAL_LOG_CAPACITY: usize = 4096;

/// The server's limits, each defaulting to its named constant; a node's
/// config may override them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// See [`MAX_INBOUND_CONNECTIONS`].
    pub max_connections: usize,
    /// See [`MAX_CONNECTIONS_PER_IP`].
    pub max_connections_per_ip: usize,
    /// See [`MAX_CONNECTIONS_PER_PEER`].
    pub max_connections_per_peer: usize,
    /// See [`MAX_CONCURRENT_STREAMS`].
    pub max_concurrent_streams: u32,
    /// See [`HANDSHAKE_TIMEOUT`].
    pub handshake_timeout: Duration,
    /// See [`ANONYMOUS_IDLE_TIMEOUT`].
    pub anonymous_idle_timeout: Duration,
    /// See [`ANONYMOUS_MAX_AGE`].
    pub anonymous_max_age: Duration,
    /// See [`crate::budget::MAX_IN_FLIGHT_BYTES_PER_PEER`].
    pub max_in_flight_bytes_per_peer: usize,
}

impl Default for ServerLimits {
    fn default() -> ServerLimits {
        ServerLimits {
            max_connections: MAX_INBOUND_CONNECTIONS,
            max_connections_per_ip: MAX_CONNECTIONS_PER_IP,
            max_connections_per_peer: MAX_CONNECTIONS_PER_PEER,
            max_concurrent_streams: MAX_CONCURRENT_STREAMS,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            anonymous_idle_timeout: ANONYMOUS_IDLE_TIMEOUT,
            anonymous_max_age: ANONYMOUS_MAX_AGE,
            max_in_flight_bytes_per_peer: crate::budget::MAX_IN_FLIGHT_BYTES_PER_PEER,
        }
    }
}

/// Remembers when a refusal was last logged per source and reason, so the
/// log says it once per [`REFUSAL_LOG_INTERVAL`], never once per packet.
#[derive(Debug, Default)]
pub(crate) struct RefusalLog {
    last: Mutex<HashMap<(String, AuthReason), Instant>>,
}

impl RefusalLog {
    /// Counts the refusal and tells whether to log it now.
    pub(crate) fn refuse(&self, source: &str, reason: AuthReason) -> bool {
        metrics::auth_failed(reason);
        let Ok(mut last) = self.last.lock() else {
            return false;
        };
        if last.len() >= REFUSAL_LOG_CAPACITY {
            last.clear();
        }
        let now = Instant::now();
        match last.get(&(source.to_owned(), reason)) {
            Some(at) if now.duration_since(*at) < REFUSAL_LOG_INTERVAL => false,
            _ => {
                last.insert((source.to_owned(), reason), now);
                true
            }
        }
    }
}

/// Pause after a failed `accept` (e.g. out of file descriptors) before
/// trying again, so the accept loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// After a shutdown begins, the server answers new Tern calls "shutting
/// down" (never run, `PeerShuttingDown` at the caller) over connections
/// still open for this long before it closes the idle ones, so a caller
/// learns of the shutdown from an answer rather than from a connection
/// reset racing its request (which it could only report as "may have been
/// delivered").
pub const DRAIN_ANNOUNCE: Duration = Duration::from_millis(200);

/// After the drain deadline the remaining connections are aborted; this
/// bounds how long shutdown then waits for the server task to notice.
const ABORT_GRACE: Duration = Duration::from_secs(2);

/// The health-service name of each transport, for the standard
/// `grpc.health.v1.Health` service (node health is the empty name).
pub fn transport_health_name(kind: TransportKind) -> &'static str {
    match kind {
        TransportKind::Grpc => "tern.transport.grpc",
        TransportKind::Iroh => "tern.transport.iroh",
    }
}

/// The health-service name of a Tern service, its full gRPC name.
pub fn service_health_name(service: ServiceId) -> String {
    format!(
        "{}.{}",
        tern_protocol::catalog::PROTO_PACKAGE,
        service.proto_name()
    )
}

/// Configuration of a gRPC server.
#[derive(Clone)]
pub struct ServerConfig {
    /// The node's Ed25519 secret key; its public key is the node's id.
    pub secret_key: [u8; 32],
    /// Where to listen. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Largest request or response message accepted, in bytes.
    pub max_message_size: usize,
    /// Connection, stream and time limits.
    pub limits: ServerLimits,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("listen", &self.listen)
            .field("max_message_size", &self.max_message_size)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl ServerConfig {
    /// A configuration with the protocol's default message limit and the
    /// default [`ServerLimits`].
    pub fn new(secret_key: [u8; 32], listen: SocketAddr) -> ServerConfig {
        ServerConfig {
            secret_key,
            listen,
            max_message_size: DEFAULT_MAX_PAYLOAD as usize,
            limits: ServerLimits::default(),
        }
    }
}

/// Sets what the standard `grpc.health.v1.Health` service reports.
///
/// Names: `""` is the node; [`transport_health_name`] names each transport
/// (`tern.transport.grpc`, `tern.transport.iroh`); [`service_health_name`]
/// names each Tern service (`tern.v1.Vm`...). Watchers see every change.
#[derive(Clone)]
pub struct HealthHandle {
    reporter: HealthReporter,
}

impl std::fmt::Debug for HealthHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthHandle").finish_non_exhaustive()
    }
}

fn serving(up: bool) -> ServingStatus {
    if up {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

impl HealthHandle {
    /// Sets the node's overall health (the empty service name).
    pub async fn set_node(&self, up: bool) {
        self.reporter.set_service_status("", serving(up)).await;
    }

    /// Sets one transport's health.
    pub async fn set_transport(&self, kind: TransportKind, up: bool) {
        self.reporter
            .set_service_status(transport_health_name(kind), serving(up))
            .await;
    }

    /// Sets one Tern service's health.
    pub async fn set_service(&self, service: ServiceId, up: bool) {
        self.reporter
            .set_service_status(service_health_name(service), serving(up))
            .await;
    }

    /// Sets an arbitrary name's status.
    pub async fn set(&self, name: &str, status: ServingStatus) {
        self.reporter.set_service_status(name, status).await;
    }

    async fn set_all(&self, up: bool) {
        self.set_node(up).await;
        self.set_transport(TransportKind::Grpc, up).await;
        for service in ServiceId::SERVICES {
            self.set_service(service, up).await;
        }
    }
}

/// What the middleware and the services share.
struct ServerState {
    handler: Arc<dyn Handler>,
    draining: AtomicBool,
    refusals: RefusalLog,
    budgets: Budgets,
    bytes_per_peer: usize,
}

/// The authenticated caller, put in request extensions by [`AuthLayer`].
#[derive(Debug, Clone, Copy)]
struct Caller(PeerId);

/// A running gRPC server.
pub struct GrpcServer {
    id: PeerId,
    identity: TlsIdentity,
    local_addr: SocketAddr,
    health: HealthHandle,
    state: Arc<ServerState>,
    kill: Arc<KillSwitch>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
    accept: JoinHandle<()>,
}

impl std::fmt::Debug for GrpcServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcServer")
            .field("id", &self.id)
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl GrpcServer {
    /// Binds `config.listen` and serves `handler` (typically a
    /// [`tern_protocol::Dispatcher`]) until [`GrpcServer::shutdown`].
    pub async fn start(
        config: ServerConfig,
        handler: Arc<dyn Handler>,
    ) -> std::io::Result<GrpcServer> {
        let identity = TlsIdentity::new(&config.secret_key).map_err(std::io::Error::other)?;
        let id = identity.id();
        let tls = tls::server_config(&identity).map_err(std::io::Error::other)?;
        let listener = TcpListener::bind(config.listen).await?;
        let local_addr = listener.local_addr()?;
        let state = Arc::new(ServerState {
            handler,
            draining: AtomicBool::new(false),
            refusals: RefusalLog::default(),
            budgets: Budgets::new(config.limits.max_in_flight_bytes_per_peer),
            bytes_per_peer: config.limits.max_in_flight_bytes_per_peer,
        });
        let (reporter, health_service) = tonic_health::server::health_reporter();
        let health = HealthHandle { reporter };
        health.set_all(true).await;

        // Both reflection versions describe every service the node serves,
        // including each other, so a tool sees the same list whichever it
        // speaks.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .include_reflection_service(false)
                .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(
                    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
                )
        };
        let reflection_v1 = reflection().build_v1().map_err(std::io::Error::other)?;
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .map_err(std::io::Error::other)?;

        let services = Arc::new(Services {
            state: state.clone(),
        });
        let max = config.max_message_size;
        let router = Server::builder()
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .max_concurrent_streams(Some(config.limits.max_concurrent_streams))
            // Fixed windows, not hyper's adaptive one: see CONNECTION_WINDOW.
            .initial_connection_window_size(Some(CONNECTION_WINDOW))
            .initial_stream_window_size(Some(STREAM_WINDOW))
            .tcp_nodelay(true)
            .layer(AuthLayer {
                state: state.clone(),
            })
            .add_service(TernService::<HealthName>::new(services.clone(), max))
            .add_service(TernService::<StatusName>::new(services.clone(), max))
            .add_service(TernService::<VmName>::new(services.clone(), max))
            .add_service(TernService::<MonitoringName>::new(services.clone(), max))
            .add_service(TernService::<ClusterName>::new(services.clone(), max))
            .add_service(TernService::<RaftName>::new(services, max))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);

        let kill = Arc::new(KillSwitch::default());
        let (accepted, incoming) = mpsc::channel::<ServerConn>(ACCEPTED_QUEUE);
        let accept = tokio::spawn(accept_loop(Acceptor {
            listener,
            tls: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
            limits: config.limits,
            slots: Arc::new(Semaphore::new(config.limits.max_connections)),
            per_ip: Counts::new(config.limits.max_connections_per_ip),
            per_peer: Counts::new(config.limits.max_connections_per_peer),
            kill: kill.clone(),
            state: state.clone(),
            accepted,
        }));
        let incoming =
            tokio_stream::wrappers::ReceiverStream::new(incoming).map(Ok::<_, std::io::Error>);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async move {
            // A dropped sender (the server value dropped) also stops serving.
            let _ = stopped.await;
        }));
        tracing::info!(node = %id.short(), %local_addr, "gRPC transport serving");
        Ok(GrpcServer {
            id,
            identity,
            local_addr,
            health,
            state,
            kill,
            stop: Some(stop),
            task,
            accept,
        })
    }

    /// The node's id (its public key).
    pub fn id(&self) -> PeerId {
        self.id
    }

    /// The socket address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Its URL, as put in [`tern_protocol::PeerAddr::grpc`]: always
    /// `https://`, the only scheme it serves.
    pub fn url(&self) -> String {
        format!("https://{}", self.local_addr)
    }

    /// The TLS certificate it presents (bound to the node key), as PEM, for
    /// stock clients that need a root to trust.
    pub fn certificate_pem(&self) -> String {
        self.identity.certificate_pem()
    }

    /// Sets what the standard health service reports.
    pub fn health(&self) -> &HealthHandle {
        &self.health
    }

    /// Graceful shutdown: reports `NOT_SERVING`, refuses new calls (callers
    /// see `PeerShuttingDown`), stops accepting connections, lets calls in
    /// flight finish within `drain`, then aborts the connections left.
    /// Resolves when the server has stopped.
    pub async fn shutdown(mut self, drain: Duration) {
        self.state.draining.store(true, Ordering::SeqCst);
        self.health.set_all(false).await;
        // No new connections: the listener closes with the accept loop.
        self.accept.abort();
        tokio::time::sleep(DRAIN_ANNOUNCE.min(drain)).await;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let started = Instant::now();
        match tokio::time::timeout(drain, &mut self.task).await {
            Ok(Ok(Ok(()))) => {
                tracing::info!(node = %self.id.short(), elapsed = ?started.elapsed(), "gRPC transport drained and stopped");
            }
            Ok(Ok(Err(e))) => {
                tracing::warn!(node = %self.id.short(), error = %e, "gRPC server stopped with an error");
            }
            Ok(Err(e)) => {
                tracing::warn!(node = %self.id.short(), error = %e, "gRPC server task failed");
            }
            Err(_) => {
                tracing::warn!(node = %self.id.short(), ?drain, "drain deadline passed; aborting the connections left");
                self.kill.kill_all();
                if tokio::time::timeout(ABORT_GRACE, &mut self.task)
                    .await
                    .is_err()
                {
                    self.task.abort();
                }
            }
        }
        // Connections accepted while the listener was closing are aborted too.
        self.kill.kill_all();
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        if self.stop.is_some() {
            // Dropped without a graceful shutdown: stop at once.
            self.kill.kill_all();
            self.accept.abort();
            self.task.abort();
        }
    }
}

/// What the accept loop owns.
struct Acceptor {
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    limits: ServerLimits,
    slots: Arc<Semaphore>,
    per_ip: Arc<Counts<IpAddr>>,
    per_peer: Arc<Counts<PeerId>>,
    kill: Arc<KillSwitch>,
    state: Arc<ServerState>,
    accepted: mpsc::Sender<ServerConn>,
}

/// Accepts TCP connections, takes their places under the limits, and
/// hands each to its own handshake task, so a slow handshake never holds
/// up the next accept. Ends when the server aborts it (which closes the
/// listener).
async fn accept_loop(a: Acceptor) {
    let a = Arc::new(a);
    loop {
        let (stream, remote) = match a.listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, typically: wait instead of
                // spinning on the error.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        let refuse = |reason: AuthReason, limit: usize| {
            if a.state.refusals.refuse(&remote.ip().to_string(), reason) {
                tracing::warn!(%remote, reason = reason.as_str(), limit, "refused a connection at a limit (logged once a minute per address)");
            }
        };
        let Ok(slot) = a.slots.clone().try_acquire_owned() else {
            refuse(AuthReason::ConnectionLimit, a.limits.max_connections);
            continue;
        };
        let Some(per_ip) = a.per_ip.try_take(remote.ip()) else {
            refuse(
                AuthReason::IpConnectionLimit,
                a.limits.max_connections_per_ip,
            );
            continue;
        };
        tokio::spawn(handshake(a.clone(), stream, remote, slot, per_ip));
    }
}

/// One connection's TLS handshake, its peer's place, and then its hand-over
/// to the HTTP/2 server.
async fn handshake(
    a: Arc<Acceptor>,
    stream: TcpStream,
    remote: SocketAddr,
    slot: tokio::sync::OwnedSemaphorePermit,
    per_ip: crate::io::CountGuard<IpAddr>,
) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "could not set TCP_NODELAY on an accepted connection");
    }
    let source = remote.ip().to_string();
    let tls = match tokio::time::timeout(a.limits.handshake_timeout, a.tls.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            if a.state.refusals.refuse(&source, AuthReason::Handshake) {
                tracing::warn!(%remote, error = %e, "TLS handshake failed (logged once a minute per address)");
            }
            return;
        }
        Err(_) => {
            if a.state
                .refusals
                .refuse(&source, AuthReason::HandshakeTimeout)
            {
                tracing::warn!(%remote, timeout = ?a.limits.handshake_timeout, "TLS handshake too slow; closed (logged once a minute per address)");
            }
            return;
        }
    };
    let peer = match tls.get_ref().1.peer_certificates() {
        None => None,
        Some(chain) => match tls::peer_id_of_chain(chain) {
            Ok(id) => Some(id),
            Err(e) => {
                // The verifier accepted the chain, so this cannot happen;
                // refuse rather than serve an unknown caller.
                tracing::error!(%remote, error = %e, "a verified certificate proves no identity");
                return;
            }
        },
    };
    let per_peer = match peer {
        None => None,
        Some(id) => match a.per_peer.try_take(id) {
            Some(guard) => Some(guard),
            None => {
                if a.state
                    .refusals
                    .refuse(&id.to_string(), AuthReason::PeerConnectionLimit)
                {
                    tracing::warn!(peer = %id.short(), %remote, limit = a.limits.max_connections_per_peer, "refused a connection: the peer is at its connection cap (logged once a minute per peer)");
                }
                return;
            }
        },
    };
    let conn = ServerConn::new(
        tls,
        peer,
        &a.kill,
        Places {
            slot,
            per_ip,
            per_peer,
        },
    );
    if peer.is_none() {
        tokio::spawn(watch_anonymous(
            Arc::downgrade(&conn.kill_handle()),
            conn.info().clone(),
            a.limits,
            a.clone(),
        ));
    }
    // The server stopped taking connections: this one closes on drop.
    let _ = a.accepted.send(conn).await;
}

/// Closes an anonymous connection once it is idle past its bound or older
/// than its maximum age. Ends with the connection.
async fn watch_anonymous(
    kill: std::sync::Weak<ConnKill>,
    info: ConnInfo,
    limits: ServerLimits,
    a: Arc<Acceptor>,
) {
    let opened = Instant::now();
    let tick = (limits.anonymous_idle_timeout / 4).clamp(ANONYMOUS_CHECK_MIN, ANONYMOUS_CHECK_MAX);
    loop {
        tokio::time::sleep(tick).await;
        let Some(conn) = kill.upgrade() else { return };
        if conn.is_killed() {
            return;
        }
        if info
            .activity
            .idle_longer_than(limits.anonymous_idle_timeout)
            || opened.elapsed() > limits.anonymous_max_age
        {
            let source = info.remote.map(|r| r.ip().to_string()).unwrap_or_default();
            if a.state.refusals.refuse(&source, AuthReason::IdleAnonymous) {
                tracing::info!(remote = ?info.remote, "closed an idle or old anonymous connection (logged once a minute per address)");
            }
            conn.kill();
            return;
        }
    }
}

/// What the six Tern services share: the one handler.
pub(crate) struct Services {
    state: Arc<ServerState>,
}

/// Reads a `grpc-timeout` value (`<digits><unit>`, at most 8 digits).
fn parse_grpc_timeout(value: &HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?;
    if text.len() < 2 || text.len() > 9 {
        return None;
    }
    let (digits, unit) = text.split_at(text.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn parse_priority(value: Option<&HeaderValue>) -> Option<Priority> {
    let n: u8 = value?.to_str().ok()?.parse().ok()?;
    Priority::ALL.into_iter().find(|p| *p as u8 == n)
}

/// The application status as a gRPC status, code and message unchanged.
pub(crate) fn to_tonic(status: Status) -> tonic::Status {
    tonic::Status::new(tonic::Code::from(status.code as i32), status.message)
}

impl Services {
    /// Runs one call: the encoded request goes to the handler unchanged and
    /// its encoded answer comes back unchanged (no decode and re-encode on
    /// the way: the handler decodes, as it does for iroh).
    async fn dispatch(
        &self,
        request: tonic::Request<Bytes>,
        method: &'static Method,
    ) -> Result<tonic::Response<Bytes>, tonic::Status> {
        let started = Instant::now();
        let _in_flight = InFlight::start(Side::Server);
        let Some(Caller(peer)) = request.extensions().get::<Caller>().copied() else {
            // The layer refuses these first; kept as a second line.
            return Err(tonic::Status::unauthenticated(
                "Tern services need a caller authenticated by a node-key TLS client certificate",
            ));
        };
        let headers = request.metadata().as_ref();
        let priority = parse_priority(headers.get(PRIORITY_KEY)).unwrap_or(method.priority);
        let deadline = headers
            .get("grpc-timeout")
            .and_then(parse_grpc_timeout)
            .and_then(|t| started.checked_add(t));
        // The request's bytes stay counted against the peer until the
        // handler has answered.
        let _held = request.extensions().get::<HeldBytes>().cloned();
        let payload = request.into_inner();
        metrics::message(Direction::Received, payload.len());
        let ctx = RequestContext {
            peer,
            transport: TransportKind::Grpc,
            priority,
            deadline,
        };
        let result = self.state.handler.handle(ctx, method, payload).await;
        let outcome = match &result {
            Ok(_) => Outcome::Ok,
            Err(_) => Outcome::AppError,
        };
        metrics::call(method, Side::Server, outcome, started.elapsed());
        match result {
            Ok(bytes) => {
                metrics::message(Direction::Sent, bytes.len());
                Ok(tonic::Response::new(bytes))
            }
            Err(status) => Err(to_tonic(status)),
        }
    }
}

/// The gRPC name of each Tern service, as a type, so that one generic
/// service serves them all under their names.
trait ServiceName: Send + Sync + 'static {
    const NAME: &'static str;
}

macro_rules! service_names {
    ($($ty:ident = $name:literal;)*) => {
        $(
            struct $ty;
            impl ServiceName for $ty {
                const NAME: &'static str = $name;
            }
        )*
    };
}

service_names! {
    HealthName = "tern.v1.Health";
    StatusName = "tern.v1.Status";
    VmName = "tern.v1.Vm";
    MonitoringName = "tern.v1.Monitoring";
    ClusterName = "tern.v1.Cluster";
    RaftName = "tern.v1.Raft";
}

/// One Tern service over gRPC: every method of the catalogue under its
/// name, each a unary call whose message passes to the handler as the
/// encoded bytes it arrived as (the wire is what the generated servers
/// read; stock clients and reflection see no difference).
struct TernService<N> {
    services: Arc<Services>,
    max: usize,
    _name: std::marker::PhantomData<fn() -> N>,
}

impl<N> Clone for TernService<N> {
    fn clone(&self) -> Self {
        TernService {
            services: self.services.clone(),
            max: self.max,
            _name: std::marker::PhantomData,
        }
    }
}

impl<N: ServiceName> TernService<N> {
    fn new(services: Arc<Services>, max: usize) -> TernService<N> {
        TernService {
            services,
            max,
            _name: std::marker::PhantomData,
        }
    }
}

impl<N: ServiceName> tonic::server::NamedService for TernService<N> {
    const NAME: &'static str = N::NAME;
}

/// One method's call, for tonic's unary plumbing.
struct UnaryCall {
    services: Arc<Services>,
    method: &'static Method,
}

impl tonic::server::UnaryService<Bytes> for UnaryCall {
    type Response = Bytes;
    type Future = ResponseFuture<tonic::Response<Bytes>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let (services, method) = (self.services.clone(), self.method);
        Box::pin(async move { services.dispatch(request, method).await })
    }
}

/// One streaming method's call, for tonic's streaming plumbing.
struct StreamingCall {
    services: Arc<Services>,
    method: &'static Method,
}

type Answered = ResponseFuture<tonic::Response<crate::stream::Answers>, tonic::Status>;

impl tonic::server::ServerStreamingService<Bytes> for StreamingCall {
    type Response = Bytes;
    type ResponseStream = crate::stream::Answers;
    type Future = Answered;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let (services, method) = (self.services.clone(), self.method);
        Box::pin(async move {
            let (metadata, extensions, first) = request.into_parts();
            services
                .start_stream(&metadata, &extensions, method, first, None)
                .await
        })
    }
}

impl tonic::server::StreamingService<Bytes> for StreamingCall {
    type Response = Bytes;
    type ResponseStream = crate::stream::Answers;
    type Future = Answered;

    fn call(&mut self, request: tonic::Request<tonic::Streaming<Bytes>>) -> Self::Future {
        let (services, method) = (self.services.clone(), self.method);
        Box::pin(async move {
            let (metadata, extensions, mut inbound) = request.into_parts();
            // The first message is the request the stream opens with; a
            // caller that sends none holds the stream for its idle bound at
            // most.
            let idle = stream_idle(&metadata);
            let first = match tokio::time::timeout(idle, inbound.message()).await {
                Ok(first) => first?,
                Err(_) => {
                    return Err(tonic::Status::deadline_exceeded(format!(
                        "no first message within the stream's idle bound of {idle:?}"
                    )));
                }
            };
            let Some(first) = first else {
                return Err(tonic::Status::invalid_argument(
                    "a bidirectional stream opens with its first message",
                ));
            };
            services
                .start_stream(&metadata, &extensions, method, first, Some(inbound))
                .await
        })
    }
}

/// A stream's idle bound as its caller sent it (the default if it sent
/// none), clamped.
fn stream_idle(metadata: &tonic::metadata::MetadataMap) -> Duration {
    tern_protocol::stream::idle_from_ms(
        metadata
            .as_ref()
            .get(crate::stream::STREAM_IDLE_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    )
}

impl Services {
    /// Starts a streaming call: the handler runs in its own task, its
    /// answers pass through a bounded slot to tonic, and the task is
    /// aborted when tonic drops the answers (the caller cancelled).
    async fn start_stream(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        extensions: &http::Extensions,
        method: &'static Method,
        first: Bytes,
        inbound: Option<tonic::Streaming<Bytes>>,
    ) -> Result<tonic::Response<crate::stream::Answers>, tonic::Status> {
        let Some(Caller(peer)) = extensions.get::<Caller>().copied() else {
            return Err(tonic::Status::unauthenticated(
                "Tern services need a caller authenticated by a node-key TLS client certificate",
            ));
        };
        let headers = metadata.as_ref();
        let priority = parse_priority(headers.get(PRIORITY_KEY)).unwrap_or(method.priority);
        let idle = stream_idle(metadata);
        metrics::message(Direction::Received, first.len());
        let ctx = RequestContext {
            peer,
            transport: TransportKind::Grpc,
            priority,
            deadline: None,
        };
        let inbound = match inbound {
            Some(inbound) => tern_protocol::StreamReceiver::new(crate::stream::ServerSource {
                inbound: Some(inbound),
                idle,
            }),
            None => tern_protocol::StreamReceiver::empty(),
        };
        let (tx, rx) = mpsc::channel(tern_protocol::stream::STREAM_HANDOVER_MESSAGES);
        let outbound = tern_protocol::StreamSender::new(crate::stream::ServerSink {
            tx: Some(tx.clone()),
            idle,
        });
        let work = self
            .state
            .handler
            .handle_stream(ctx, method, first, inbound, outbound);
        metrics::stream_opened(method, Side::Server, Outcome::Ok);
        let task = tokio::spawn(async move {
            let _in_flight = InFlight::start(Side::Server);
            let _active = metrics::OpenStream::new(Side::Server);
            if let Err(status) = work.await {
                // Marked as the service's answer, as unary answers are.
                let mut status = to_tonic(status);
                status.metadata_mut().insert(
                    ANSWERED_KEY,
                    tonic::metadata::MetadataValue::from_static("1"),
                );
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(tonic::Response::new(crate::stream::Answers {
            rx,
            _task: crate::stream::AbortOnDrop(task),
        }))
    }
}

impl<N: ServiceName> tower::Service<http::Request<tonic::body::Body>> for TernService<N> {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = ResponseFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let path = req.uri().path();
        let ours = |m: &&Method| {
            N::NAME
                .strip_prefix(tern_protocol::catalog::PROTO_PACKAGE)
                .and_then(|rest| rest.strip_prefix('.'))
                == Some(m.service.proto_name())
        };
        let method = Method::by_grpc_path(path).filter(ours);
        let Some(method) = method else {
            let status =
                tonic::Status::unimplemented(format!("{path} is not a method of this node"));
            return Box::pin(std::future::ready(Ok(status.into_http())));
        };
        let max = self.max;
        let services = self.services.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RawCodec)
                .apply_max_message_size_config(Some(max), Some(max));
            Ok(match method.kind {
                MethodKind::Unary => grpc.unary(UnaryCall { services, method }, req).await,
                MethodKind::ServerStreaming => {
                    grpc.server_streaming(StreamingCall { services, method }, req)
                        .await
                }
                MethodKind::Bidirectional => {
                    grpc.streaming(StreamingCall { services, method }, req)
                        .await
                }
            })
        })
    }
}

/// Tower layer that authenticates callers and proves this node's identity
/// in every answer; see the module docs.
#[derive(Clone)]
struct AuthLayer {
    state: Arc<ServerState>,
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            state: self.state.clone(),
        }
    }
}

#[derive(Clone)]
struct AuthService<S> {
    inner: S,
    state: Arc<ServerState>,
}

type ResponseFuture<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send>>;

impl<S, R> tower::Service<http::Request<tonic::body::Body>> for AuthService<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<R>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = ResponseFuture<http::Response<R>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<tonic::body::Body>) -> Self::Future {
        let info = req.extensions().get::<ConnInfo>().cloned();
        // Only anonymous connections have an idle bound to feed; a node's
        // calls skip the bookkeeping.
        let activity = info
            .as_ref()
            .filter(|i| i.peer.is_none())
            .map(|i| i.activity.start());
        let tern_method = req.uri().path().starts_with(TERN_PATH_PREFIX);
        let caller = info.as_ref().and_then(|i| i.peer);
        let answered = |mut response: http::Response<R>| {
            response
                .headers_mut()
                .insert(ANSWERED_KEY, HeaderValue::from_static("1"));
            response
        };
        if tern_method && caller.is_none() {
            // Refused before the body is read: the request is dropped with
            // its body unread, and h2 resets the stream.
            let source = info
                .as_ref()
                .and_then(|i| i.remote)
                .map(|r| r.ip().to_string())
                .unwrap_or_default();
            if self.state.refusals.refuse(&source, AuthReason::Anonymous) {
                tracing::warn!(remote = %source, path = %req.uri().path(), "refused an anonymous call to a Tern method (logged once a minute per address)");
            }
            let status = tonic::Status::unauthenticated(
                "Tern services need a caller authenticated by a node-key TLS client \
                 certificate; only grpc.health.v1 and reflection serve anonymous callers",
            );
            return Box::pin(std::future::ready(Ok(answered(status.into_http()))));
        }
        if tern_method && self.state.draining.load(Ordering::SeqCst) {
            let mut response = tonic::Status::unavailable("the node is shutting down").into_http();
            response
                .headers_mut()
                .insert(SHUTTING_DOWN_KEY, HeaderValue::from_static("1"));
            return Box::pin(std::future::ready(Ok(answered(response))));
        }
        if let Some(peer) = caller {
            req.extensions_mut().insert(Caller(peer));
            let streaming =
                Method::by_grpc_path(req.uri().path()).is_some_and(|m| m.kind.is_stream());
            if tern_method && !streaming {
                // The body draws on the peer's byte budget as it is read;
                // the bytes are given back when the call is done. (A
                // stream's messages are bounded by its window instead: see
                // `crate::stream`.)
                let budget = self.state.budgets.of(peer);
                let limit = self.state.bytes_per_peer;
                let mut held = HeldBytes::default();
                req = req.map(|body| {
                    let (body, h) = BudgetBody::new(body, budget, limit);
                    held = h;
                    tonic::body::Body::new(body)
                });
                req.extensions_mut().insert(held);
            }
        }
        let fut = self.inner.call(req);
        Box::pin(async move {
            let response = fut.await?;
            drop(activity);
            Ok(answered(response))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_and_priorities_parse() {
        let t = |s: &'static str| parse_grpc_timeout(&HeaderValue::from_static(s));
        assert_eq!(t("500m"), Some(Duration::from_millis(500)));
        assert_eq!(t("2S"), Some(Duration::from_secs(2)));
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("7u"), Some(Duration::from_micros(7)));
        assert_eq!(t("m"), None);
        assert_eq!(t("123456789S"), None);
        assert_eq!(t("12x"), None);
        let p = |s: &'static str| parse_priority(Some(&HeaderValue::from_static(s)));
        assert_eq!(p("0"), Some(Priority::Control));
        assert_eq!(p("3"), Some(Priority::Bulk));
        assert_eq!(p("4"), None);
        assert_eq!(p("x"), None);
        assert_eq!(parse_priority(None), None);
    }

    #[test]
    fn statuses_keep_code_and_message() {
        let s = to_tonic(Status::new(tern_protocol::Code::NotFound, "no vm"));
        assert_eq!(s.code(), tonic::Code::NotFound);
        assert_eq!(s.message(), "no vm");
        assert_eq!(
            service_health_name(ServiceId::Raft),
            "tern.v1.Raft".to_owned()
        );
    }
}
