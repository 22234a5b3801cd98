//! The calling side: [`GrpcClient`] implements [`RpcClient`] over pooled
//! tonic channels.
//!
//! - **Pooling.** One channel (one HTTP/2 connection) per peer and lane,
//!   created on the first call and shared by every later call; tonic
//!   re-establishes a lost connection on the next call. A peer whose dial
//!   failed is not dialled again before a bounded backoff has passed.
//! - **Lanes.** Each priority class has its own connection to a peer
//!   (opened only when the class is used), so a snapshot never fills the
//!   HTTP/2 connection window that Raft votes and heartbeats depend on, and
//!   no call waits in a channel's queue behind a less urgent one. The bulk
//!   lane has larger flow-control windows.
//! - **Deadlines.** `call.timeout` is sent as `grpc-timeout` and also bounds
//!   the call locally, dial included.
//! - **Identity.** Every connection is TLS 1.3 (see [`crate::tls`]): the
//!   client presents its node's certificate and accepts only the peer id
//!   it dials, so a different node at a peer's address fails the handshake
//!   and the call fails as `WrongPeer`, with nothing sent.
//! - **URLs.** Only `https://host:port` is dialled; any other scheme is
//!   refused (`NotServed`, nothing sent) with a message saying why.
//! - **Limits.** Answers above the configured message limit are refused
//!   while decoding, as a `Protocol` error.
//! - **Errors.** tonic and transport errors are mapped into the shared
//!   taxonomy (`classify`); a failure before the request was sent is
//!   `NotDelivered`, after it `MayHaveBeenDelivered`.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::PathAndQuery;
use prost::Message;
use tern_protocol::frame::DEFAULT_MAX_PAYLOAD;
use tern_protocol::stream::STREAM_HANDOVER_MESSAGES;
use tern_protocol::{
    BoxFuture, Call, CallError, CallStream, Code, Delivery, Method, MethodKind, PeerAddr, PeerId,
    Priority, RpcClient, Status, StreamCall, TransportError, TransportErrorKind, TransportKind,
};
use tonic::transport::{Channel, Endpoint};

use crate::codec::RawCodec;
use crate::io::Connector;
use crate::metrics::{self, Direction, InFlight, Outcome, Queued, Side};
use crate::server::{
    ANSWERED_KEY, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, PRIORITY_KEY, SHUTTING_DOWN_KEY,
};
use crate::tls::{self, TlsIdentity, WrongPeer};

/// First wait before dialling a peer again after a failed dial.
pub const DIAL_BACKOFF_MIN: Duration = Duration::from_millis(50);

/// Longest wait between dials of an unreachable peer: a peer that comes
/// back is reached again within this long.
pub const DIAL_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// HTTP/2 stream window of the bulk lane: large, so one snapshot chunk
/// streams without waiting for window updates on a fast link.
const BULK_STREAM_WINDOW: u32 = 8 << 20;
/// HTTP/2 connection window of the bulk lane.
const BULK_CONNECTION_WINDOW: u32 = 32 << 20;

/// The gRPC path of the standard health check, used by [`RpcClient::ping`]:
/// a round trip through the peer's HTTP/2 stack and its identity proof,
/// with no Tern service running.
const HEALTH_CHECK_PATH: &str = "/grpc.health.v1.Health/Check";

/// Configuration of a gRPC client.
#[derive(Clone)]
pub struct ClientConfig {
    /// The node's Ed25519 secret key; requests are authenticated with it.
    pub secret_key: [u8; 32],
    /// Largest request payload sent and largest answer accepted, in bytes;
    /// larger calls are refused locally (not delivered), larger answers
    /// while decoding (a `Protocol` error).
    pub max_message_size: usize,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("max_message_size", &self.max_message_size)
            .finish_non_exhaustive()
    }
}

impl ClientConfig {
    /// A configuration with the protocol's default message limit.
    pub fn new(secret_key: [u8; 32]) -> ClientConfig {
        ClientConfig {
            secret_key,
            max_message_size: DEFAULT_MAX_PAYLOAD as usize,
        }
    }
}

/// Which connection a call uses: one per priority class, created when the
/// class is first used, so that no call waits in a queue (tonic's channel
/// buffer, the HTTP/2 connection window) behind a less urgent one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Lane(Priority);

impl Lane {
    fn of(priority: Priority) -> Lane {
        Lane(priority)
    }

    fn is_bulk(self) -> bool {
        self.0 == Priority::Bulk
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PoolKey {
    peer: PeerId,
    lane: Lane,
}

/// One pooled channel to one URL of a peer, and its dial state. A peer
/// whose URL changes gets a fresh entry.
#[derive(Debug, Default)]
struct PoolEntry {
    url: String,
    channel: Mutex<Option<Channel>>,
    dial: tokio::sync::Mutex<DialState>,
}

#[derive(Debug, Default)]
struct DialState {
    failures: u32,
    retry_at: Option<Instant>,
    last_error: String,
    ever_connected: bool,
}

/// A gRPC client shared by all callers of a node.
pub struct GrpcClient {
    identity: TlsIdentity,
    max_message_size: usize,
    pool: Mutex<HashMap<PoolKey, Arc<PoolEntry>>>,
    closed: AtomicBool,
}

impl std::fmt::Debug for GrpcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcClient")
            .field("id", &self.identity.id())
            .finish_non_exhaustive()
    }
}

fn err(kind: TransportErrorKind, delivery: Delivery, detail: impl Into<String>) -> CallError {
    CallError::Transport(TransportError::new(
        TransportKind::Grpc,
        kind,
        delivery,
        detail,
    ))
}

/// What a request needs to be sent and its answer checked.
struct Outgoing<'a> {
    peer: &'a PeerAddr,
    path: &'a str,
    payload: Bytes,
    timeout: Duration,
    priority: Priority,
}

impl GrpcClient {
    /// A client calling as the node with `config.secret_key`, with a fresh
    /// TLS key bound to it.
    ///
    /// # Panics
    ///
    /// If the system's random number generator fails, so that no TLS key
    /// can be made (nothing secure can run then).
    pub fn new(config: ClientConfig) -> GrpcClient {
        GrpcClient {
            identity: TlsIdentity::new(&config.secret_key)
                .expect("making a TLS key needs only the system's random number generator"),
            max_message_size: config.max_message_size,
            pool: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
        }
    }

    /// The id it calls as.
    pub fn id(&self) -> PeerId {
        self.identity.id()
    }

    /// Refuses every later call (`LocalShutdown`) and drops the pooled
    /// connections. Calls in flight finish or fail on their own.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        if let Ok(mut pool) = self.pool.lock() {
            pool.clear();
        }
    }

    /// Drops the pooled connections and keeps serving calls: the next call
    /// to each peer connects again. For measuring connection set-up.
    pub fn close_pooled_connections(&self) {
        if let Ok(mut pool) = self.pool.lock() {
            pool.clear();
        }
    }

    /// Connections pooled now (one per peer and lane).
    pub fn pooled_channels(&self) -> usize {
        self.pool
            .lock()
            .map(|p| {
                p.values()
                    .filter(|e| e.channel.lock().map(|c| c.is_some()).unwrap_or(false))
                    .count()
            })
            .unwrap_or(0)
    }

    fn entry(&self, key: PoolKey, url: &str) -> Result<Arc<PoolEntry>, CallError> {
        let mut pool = self.pool.lock().map_err(|_| {
            err(
                TransportErrorKind::LocalShutdown,
                Delivery::NotDelivered,
                "client pool poisoned",
            )
        })?;
        if let Some(entry) = pool.get(&key)
            && entry.url == url
        {
            return Ok(entry.clone());
        }
        // A URL is checked once, when its entry is made, not on every call.
        check_url(url).map_err(|why| {
            err(
                TransportErrorKind::NotServed,
                Delivery::NotDelivered,
                format!("{}'s gRPC address {why}", key.peer.short()),
            )
        })?;
        let entry = Arc::new(PoolEntry {
            url: url.to_owned(),
            ..PoolEntry::default()
        });
        pool.insert(key, entry.clone());
        Ok(entry)
    }

    /// The pooled channel to `peer` on `lane`, dialling it if needed.
    async fn channel(&self, peer: &PeerAddr, url: &str, lane: Lane) -> Result<Channel, CallError> {
        let entry = self.entry(
            PoolKey {
                peer: peer.id,
                lane,
            },
            url,
        )?;
        if let Some(channel) = entry.channel.lock().ok().and_then(|c| c.clone()) {
            return Ok(channel);
        }
        let mut dial = entry.dial.lock().await;
        // Another caller may have dialled while this one waited.
        if let Some(channel) = entry.channel.lock().ok().and_then(|c| c.clone()) {
            return Ok(channel);
        }
        if let Some(retry_at) = dial.retry_at
            && Instant::now() < retry_at
        {
            return Err(err(
                TransportErrorKind::Unreachable,
                Delivery::NotDelivered,
                format!(
                    "{} at {url} is backing off after {} failed dials: {}",
                    peer.id.short(),
                    dial.failures,
                    dial.last_error
                ),
            ));
        }
        if dial.failures > 0 || dial.ever_connected {
            metrics::redial();
        }
        let tls = match tls::client_config(&self.identity, peer.id) {
            Ok(config) => Arc::new(config),
            Err(e) => {
                return Err(err(
                    TransportErrorKind::LocalShutdown,
                    Delivery::NotDelivered,
                    e.to_string(),
                ));
            }
        };
        match dial_channel(url, lane, tls).await {
            Ok(channel) => {
                tracing::debug!(peer = %peer.id.short(), %url, ?lane, "gRPC channel connected");
                *dial = DialState {
                    ever_connected: true,
                    ..DialState::default()
                };
                if let Ok(mut slot) = entry.channel.lock() {
                    *slot = Some(channel.clone());
                }
                Ok(channel)
            }
            Err(DialError::WrongPeer(wrong)) => {
                // Not a reachability problem: no backoff helps; report it.
                tracing::warn!(peer = %peer.id.short(), %url, error = %wrong, "the node at a peer's address is another node");
                Err(err(
                    TransportErrorKind::WrongPeer,
                    Delivery::NotDelivered,
                    format!("dialling {} at {url}: {wrong}", peer.id.short()),
                ))
            }
            Err(DialError::Other(detail)) => {
                dial.failures = dial.failures.saturating_add(1);
                let backoff = DIAL_BACKOFF_MIN
                    .saturating_mul(1u32 << dial.failures.saturating_sub(1).min(16))
                    .min(DIAL_BACKOFF_MAX);
                dial.retry_at = Some(Instant::now() + backoff);
                dial.last_error.clone_from(&detail);
                tracing::debug!(peer = %peer.id.short(), %url, %detail, ?backoff, "gRPC dial failed");
                Err(err(
                    TransportErrorKind::Unreachable,
                    Delivery::NotDelivered,
                    format!("dialling {} at {url}: {detail}", peer.id.short()),
                ))
            }
        }
    }

    /// Forgets the channel so that the next call dials again (with backoff).
    fn forget(&self, peer: &PeerAddr, url: &str, lane: Lane) {
        let key = PoolKey {
            peer: peer.id,
            lane,
        };
        if let Ok(pool) = self.pool.lock()
            && let Some(entry) = pool.get(&key)
            && entry.url == url
            && let Ok(mut slot) = entry.channel.lock()
        {
            *slot = None;
        }
    }

    /// Sends one request and checks the answer; the whole of it bounded by
    /// `out.timeout`.
    async fn send(&self, out: Outgoing<'_>) -> Result<Bytes, CallError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(err(
                TransportErrorKind::LocalShutdown,
                Delivery::NotDelivered,
                "the gRPC transport is shut down",
            ));
        }
        let Some(url) = out.peer.grpc.as_deref() else {
            return Err(err(
                TransportErrorKind::NotServed,
                Delivery::NotDelivered,
                format!("{} has no gRPC address", out.peer.id.short()),
            ));
        };
        if out.payload.len() > self.max_message_size {
            return Err(err(
                TransportErrorKind::Overloaded,
                Delivery::NotDelivered,
                format!(
                    "request of {} bytes is over the {} byte message limit; send it in chunks",
                    out.payload.len(),
                    self.max_message_size
                ),
            ));
        }
        let sent = AtomicBool::new(false);
        let timeout = out.timeout;
        let deadline = Instant::now() + timeout;
        match tokio::time::timeout(timeout, self.send_inner(url, &out, deadline, &sent)).await {
            Ok(result) => result,
            Err(_) => {
                let delivery = if sent.load(Ordering::SeqCst) {
                    Delivery::MayHaveBeenDelivered
                } else {
                    Delivery::NotDelivered
                };
                Err(err(
                    TransportErrorKind::TimedOut,
                    delivery,
                    format!("{} on {} after {timeout:?}", out.path, out.peer.id.short()),
                ))
            }
        }
    }

    async fn send_inner(
        &self,
        url: &str,
        out: &Outgoing<'_>,
        deadline: Instant,
        sent: &AtomicBool,
    ) -> Result<Bytes, CallError> {
        let lane = Lane::of(out.priority);
        let channel = self.channel(out.peer, url, lane).await?;
        let path = PathAndQuery::try_from(out.path).map_err(|e| {
            err(
                TransportErrorKind::Protocol,
                Delivery::NotDelivered,
                format!("invalid gRPC path {}: {e}", out.path),
            )
        })?;
        let mut request = tonic::Request::new(out.payload.clone());
        // What is left after the dial; never zero, which would read as "no
        // deadline" to some servers.
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        request.set_timeout(remaining);
        request
            .metadata_mut()
            .insert(PRIORITY_KEY, u32::from(out.priority as u8).into());

        let mut grpc = tonic::client::Grpc::new(channel)
            .max_decoding_message_size(self.max_message_size)
            .max_encoding_message_size(self.max_message_size);
        let queued = Queued::start(out.priority.as_str());
        let ready = grpc.ready().await;
        drop(queued);
        if let Err(e) = ready {
            self.forget(out.peer, url, lane);
            return Err(err(
                TransportErrorKind::Unreachable,
                Delivery::NotDelivered,
                format!("channel to {} not ready: {e}", out.peer.id.short()),
            ));
        }
        sent.store(true, Ordering::SeqCst);
        metrics::message(Direction::Sent, out.payload.len());
        let answer = grpc.unary(request, path, RawCodec).await;
        let ctx = Verify {
            expected: out.peer.id,
            path: out.path,
        };
        match answer {
            Ok(response) => {
                let body = response.into_inner();
                metrics::message(Direction::Received, body.len());
                Ok(body)
            }
            Err(status) => {
                let error = classify(&status, &ctx);
                if matches!(
                    error.as_transport().map(|e| e.kind),
                    Some(TransportErrorKind::Unreachable | TransportErrorKind::WrongPeer)
                ) {
                    self.forget(out.peer, url, lane);
                }
                Err(error)
            }
        }
    }
}

impl GrpcClient {
    /// What is refused before a stream is opened: a closed client, a unary
    /// method, a peer without a gRPC URL, a first message over the limit.
    /// Returns the peer's URL.
    fn check_stream_call<'p>(
        &self,
        peer: &'p PeerAddr,
        call: &StreamCall,
    ) -> Result<&'p str, CallError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(err(
                TransportErrorKind::LocalShutdown,
                Delivery::NotDelivered,
                "the gRPC transport is shut down",
            ));
        }
        let method = call.method;
        if let Err(status) = tern_protocol::rpc::require_stream(method) {
            return Err(err(
                TransportErrorKind::Protocol,
                Delivery::NotDelivered,
                status.message,
            ));
        }
        let Some(url) = peer.grpc.as_deref() else {
            return Err(err(
                TransportErrorKind::NotServed,
                Delivery::NotDelivered,
                format!("{} has no gRPC address", peer.id.short()),
            ));
        };
        if call.request.len() > self.max_message_size {
            return Err(err(
                TransportErrorKind::Overloaded,
                Delivery::NotDelivered,
                format!(
                    "request of {} bytes is over the {} byte message limit",
                    call.request.len(),
                    self.max_message_size
                ),
            ));
        }
        Ok(url)
    }

    /// Sends a stream's opening by its kind; answers tonic's result and,
    /// on a bidirectional call, the caller's sink.
    async fn send_opening(
        &self,
        grpc: &mut tonic::client::Grpc<Channel>,
        call: StreamCall,
        path: PathAndQuery,
        idle_ms: u32,
        gone_rx: tokio::sync::oneshot::Receiver<()>,
    ) -> (
        Result<tonic::Response<tonic::Streaming<Bytes>>, tonic::Status>,
        Option<crate::stream::CallerSink>,
    ) {
        let idle = call.idle_timeout;
        match call.method.kind {
            MethodKind::Bidirectional => {
                let (tx, rx) = tokio::sync::mpsc::channel(STREAM_HANDOVER_MESSAGES);
                let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
                let requests = crate::stream::Requests {
                    first: Some(call.request),
                    rx,
                    receiver_gone: gone_rx,
                    sender_done: done_rx,
                    finished: false,
                    over: false,
                };
                let mut request = tonic::Request::new(requests);
                stream_metadata(request.metadata_mut(), call.priority, idle_ms);
                let answer = grpc
                    .streaming(request, path, crate::stream::BidiCodec)
                    .await;
                let sink = crate::stream::CallerSink {
                    tx: Some(tx),
                    done: Some(done_tx),
                    idle,
                    max_message_size: self.max_message_size,
                };
                (answer, Some(sink))
            }
            MethodKind::ServerStreaming | MethodKind::Unary => {
                drop(gone_rx);
                let mut request = tonic::Request::new(call.request);
                stream_metadata(request.metadata_mut(), call.priority, idle_ms);
                (grpc.server_streaming(request, path, RawCodec).await, None)
            }
        }
    }

    /// Opens a streaming call (see [`crate::stream`]): the lane's channel,
    /// the request, and the peer's acceptance (its response headers).
    async fn open_stream_inner(
        &self,
        peer: &PeerAddr,
        call: StreamCall,
        sent: &AtomicBool,
    ) -> Result<CallStream, CallError> {
        let method = call.method;
        let url = self.check_stream_call(peer, &call)?;
        let lane = Lane::of(call.priority);
        let channel = self.channel(peer, url, lane).await?;
        let path_text = method.grpc_path();
        let path = PathAndQuery::try_from(path_text.as_str()).map_err(|e| {
            err(
                TransportErrorKind::Protocol,
                Delivery::NotDelivered,
                format!("invalid gRPC path {path_text}: {e}"),
            )
        })?;
        let mut grpc = tonic::client::Grpc::new(channel)
            .max_decoding_message_size(self.max_message_size)
            .max_encoding_message_size(self.max_message_size);
        let queued = Queued::start(call.priority.as_str());
        let ready = grpc.ready().await;
        drop(queued);
        if let Err(e) = ready {
            self.forget(peer, url, lane);
            return Err(err(
                TransportErrorKind::Unreachable,
                Delivery::NotDelivered,
                format!("channel to {} not ready: {e}", peer.id.short()),
            ));
        }
        let idle = call.idle_timeout;
        let idle_ms = call.idle_ms();
        sent.store(true, Ordering::SeqCst);
        metrics::message(Direction::Sent, call.request.len());
        let (gone_tx, gone_rx) = tokio::sync::oneshot::channel::<()>();
        let (answer, sink) = self
            .send_opening(&mut grpc, call, path, idle_ms, gone_rx)
            .await;
        let answers = match answer {
            Ok(response) => response.into_inner(),
            Err(status) => {
                let error = classify_status(&status, peer.id, &path_text);
                if matches!(
                    error.as_transport().map(|e| e.kind),
                    Some(TransportErrorKind::Unreachable | TransportErrorKind::WrongPeer)
                ) {
                    self.forget(peer, url, lane);
                }
                return Err(error);
            }
        };
        let source = crate::stream::CallerSource {
            answers: Some(answers),
            idle,
            verify: crate::stream::Verify {
                expected: peer.id,
                path: path_text,
            },
            _gone: Some(gone_tx),
            _active: metrics::OpenStream::new(Side::Client),
        };
        let (sender, receiver) = crate::stream::caller_halves(sink, source);
        Ok(CallStream { sender, receiver })
    }
}

/// The metadata of a stream's opening: its lane and its idle bound.
fn stream_metadata(metadata: &mut tonic::metadata::MetadataMap, priority: Priority, idle_ms: u32) {
    metadata.insert(PRIORITY_KEY, u32::from(priority as u8).into());
    metadata.insert(crate::stream::STREAM_IDLE_KEY, idle_ms.into());
}

/// Why a peer's gRPC URL cannot be used; each message names the URL and
/// the form to write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// `http://`: the transport is TLS only.
    #[error("`{url}` is http://: Tern's gRPC transport is TLS only; write https://{rest}")]
    Plaintext {
        /// The URL given.
        url: String,
        /// What follows `http://`.
        rest: String,
    },
    /// Another scheme, or none.
    #[error("`{0}` is not an https:// URL (https://HOST:PORT)")]
    NotHttps(String),
    /// A path after the authority, or no authority.
    #[error("`{0}` must be https://HOST:PORT with no path")]
    Path(String),
    /// Not a URL at all.
    #[error("`{url}` is not a valid URL: {reason} (https://HOST:PORT)")]
    Invalid {
        /// The URL given.
        url: String,
        /// The parser's complaint.
        reason: String,
    },
    /// No port.
    #[error("`{0}` names no port (https://HOST:PORT)")]
    NoPort(String),
}

/// Checks that a peer's gRPC URL is `https://host:port`: the only scheme a
/// node serves. Says what is wrong otherwise.
pub fn check_url(url: &str) -> Result<(), UrlError> {
    let Some(rest) = url.strip_prefix("https://") else {
        return Err(match url.strip_prefix("http://") {
            Some(rest) => UrlError::Plaintext {
                url: url.to_owned(),
                rest: rest.to_owned(),
            },
            None => UrlError::NotHttps(url.to_owned()),
        });
    };
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        return Err(UrlError::Path(url.to_owned()));
    }
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| UrlError::Invalid {
            url: url.to_owned(),
            reason: e.to_string(),
        })?;
    match uri.authority() {
        Some(a) if a.port_u16().is_some() => Ok(()),
        _ => Err(UrlError::NoPort(url.to_owned())),
    }
}

/// Why a dial failed.
enum DialError {
    /// The address answered as another node.
    WrongPeer(WrongPeer),
    /// Anything else, in words.
    Other(String),
}

async fn dial_channel(
    url: &str,
    lane: Lane,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Channel, DialError> {
    // tonic is given http:// (it would refuse https:// without its own TLS
    // feature); the connector below does the TLS, to the same host and
    // port.
    let inner = format!("http://{}", url.trim_start_matches("https://"));
    let endpoint =
        Endpoint::from_shared(inner).map_err(|e| DialError::Other(format!("bad URL: {e}")))?;
    let authority = endpoint
        .uri()
        .authority()
        .ok_or_else(|| DialError::Other("the URL names no host".to_owned()))?;
    let target = authority.as_str().to_owned();
    let mut endpoint = endpoint
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    // Fixed windows on every lane, not hyper's adaptive one: an adaptive
    // window starts at 64 KiB, and h2 closes a connection that buffers more
    // small DATA frames than half its window allows (about 175 small
    // answers), so a burst of concurrent small calls lost the connection.
    // See `server::CONNECTION_WINDOW`.
    endpoint = if lane.is_bulk() {
        endpoint
            .initial_stream_window_size(BULK_STREAM_WINDOW)
            .initial_connection_window_size(BULK_CONNECTION_WINDOW)
    } else {
        endpoint
            .initial_stream_window_size(crate::server::STREAM_WINDOW)
            .initial_connection_window_size(crate::server::CONNECTION_WINDOW)
    };
    let connector = Connector {
        target: target.into(),
        tls,
    };
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| match tls::find_wrong_peer(&e) {
            Some(wrong) => DialError::WrongPeer(wrong),
            None => DialError::Other(error_chain(&e)),
        })
}

/// `error: cause: cause`, for details.
fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let next = cause.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = cause.source();
    }
    text
}

/// What the caller expected of an answer.
struct Verify<'a> {
    expected: PeerId,
    path: &'a str,
}

/// [`classify`] for the streams module.
pub(crate) fn classify_status(status: &tonic::Status, expected: PeerId, path: &str) -> CallError {
    classify(status, &Verify { expected, path })
}

/// Maps a failed tonic call to the shared taxonomy.
///
/// A status with a source was made locally from a transport error. One
/// without came over the TLS connection from the peer the handshake proved
/// (or from the local decoder): it is the Tern service's answer only if it
/// carries [`ANSWERED_KEY`], which the peer's authentication layer sets on
/// everything it answers.
fn classify(status: &tonic::Status, ctx: &Verify<'_>) -> CallError {
    if let Some(source) = status.source() {
        return classify_transport(status, source);
    }
    let headers = status.metadata().as_ref();
    if headers.contains_key(ANSWERED_KEY) {
        if headers.contains_key(SHUTTING_DOWN_KEY) {
            return err(
                TransportErrorKind::PeerShuttingDown,
                Delivery::NotDelivered,
                format!(
                    "{} refused {}: shutting down",
                    ctx.expected.short(),
                    ctx.path
                ),
            );
        }
        return CallError::Application(Status::new(
            Code::from_u32(status.code() as u32),
            status.message(),
        ));
    }
    match status.code() {
        // tonic's own deadline enforcement, on either side, answers before
        // any service: a timeout.
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => err(
            TransportErrorKind::TimedOut,
            Delivery::MayHaveBeenDelivered,
            format!(
                "{} on {}: {}",
                ctx.path,
                ctx.expected.short(),
                status.message()
            ),
        ),
        // An answer over the message limit, a malformed body: the call
        // may have run; its answer is lost.
        _ => err(
            TransportErrorKind::Protocol,
            Delivery::MayHaveBeenDelivered,
            format!(
                "{} on {}: {} ({})",
                ctx.path,
                ctx.expected.short(),
                status.message(),
                status.code()
            ),
        ),
    }
}

fn classify_transport(status: &tonic::Status, source: &(dyn StdError + 'static)) -> CallError {
    let detail = error_chain(source);
    // A reconnect of a pooled channel met another node at the address.
    if let Some(wrong) = tls::find_wrong_peer(source) {
        return err(
            TransportErrorKind::WrongPeer,
            Delivery::NotDelivered,
            wrong.to_string(),
        );
    }
    let mut cause: Option<&(dyn StdError + 'static)> = Some(source);
    while let Some(e) = cause {
        if e.is::<tonic::ConnectError>() {
            return err(
                TransportErrorKind::Unreachable,
                Delivery::NotDelivered,
                detail,
            );
        }
        if e.is::<tonic::TimeoutExpired>() {
            return err(
                TransportErrorKind::TimedOut,
                Delivery::MayHaveBeenDelivered,
                detail,
            );
        }
        // hyper cancels a request it never handed to the connection (the
        // connection closed first, or was not ready): not sent.
        if let Some(hyper) = e.downcast_ref::<hyper::Error>()
            && hyper.is_canceled()
        {
            return err(
                TransportErrorKind::ConnectionLost,
                Delivery::NotDelivered,
                detail,
            );
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            // Streams refused or above a GOAWAY's last stream id were never
            // processed (RFC 9113 §8.7).
            if h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR))
            {
                return err(
                    TransportErrorKind::PeerShuttingDown,
                    Delivery::NotDelivered,
                    detail,
                );
            }
            return err(
                TransportErrorKind::ConnectionLost,
                Delivery::MayHaveBeenDelivered,
                detail,
            );
        }
        cause = e.source();
    }
    let kind = match status.code() {
        tonic::Code::DeadlineExceeded => TransportErrorKind::TimedOut,
        _ => TransportErrorKind::ConnectionLost,
    };
    err(kind, Delivery::MayHaveBeenDelivered, detail)
}

impl RpcClient for GrpcClient {
    fn transport(&self) -> TransportKind {
        TransportKind::Grpc
    }

    fn call<'a>(
        &'a self,
        peer: &'a PeerAddr,
        call: Call,
    ) -> BoxFuture<'a, Result<Bytes, CallError>> {
        Box::pin(async move {
            let method: &'static Method = call.method;
            let started = Instant::now();
            let _in_flight = InFlight::start(Side::Client);
            let path = method.grpc_path();
            let result = self
                .send(Outgoing {
                    peer,
                    path: &path,
                    payload: call.payload,
                    timeout: call.timeout,
                    priority: call.priority,
                })
                .await;
            let elapsed = started.elapsed();
            match &result {
                Ok(_) => metrics::call(method, Side::Client, Outcome::Ok, elapsed),
                Err(CallError::Application(_)) => {
                    metrics::call(method, Side::Client, Outcome::AppError, elapsed);
                }
                Err(CallError::Transport(e)) => {
                    metrics::call(method, Side::Client, Outcome::TransportError, elapsed);
                    metrics::call_failure(e.kind);
                    tracing::debug!(method = %method.label(), peer = %peer.id.short(), error = %e, "gRPC call failed");
                }
            }
            result
        })
    }

    fn ping<'a>(
        &'a self,
        peer: &'a PeerAddr,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Duration, CallError>> {
        Box::pin(async move {
            let request = tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            };
            let started = Instant::now();
            let bytes = self
                .send(Outgoing {
                    peer,
                    path: HEALTH_CHECK_PATH,
                    payload: request.encode_to_vec().into(),
                    timeout,
                    priority: Priority::Control,
                })
                .await?;
            let rtt = started.elapsed();
            let answer = tonic_health::pb::HealthCheckResponse::decode(bytes).map_err(|e| {
                err(
                    TransportErrorKind::Protocol,
                    Delivery::MayHaveBeenDelivered,
                    format!("undecodable health answer: {e}"),
                )
            })?;
            // The round trip is what is measured: a node that reports itself
            // not serving still answered (one that is shutting down refuses
            // the request itself, as `PeerShuttingDown`).
            tracing::trace!(peer = %peer.id.short(), ?rtt, status = answer.status().as_str_name(), "gRPC ping");
            Ok(rtt)
        })
    }

    fn open_stream<'a>(
        &'a self,
        peer: &'a PeerAddr,
        call: StreamCall,
    ) -> BoxFuture<'a, Result<CallStream, CallError>> {
        Box::pin(async move {
            let timeout = call.open_timeout;
            let method = call.method;
            let sent = AtomicBool::new(false);
            let result = match tokio::time::timeout(
                timeout,
                self.open_stream_inner(peer, call, &sent),
            )
            .await
            {
                Ok(result) => result,
                Err(_) => Err(err(
                    TransportErrorKind::TimedOut,
                    if sent.load(Ordering::SeqCst) {
                        Delivery::MayHaveBeenDelivered
                    } else {
                        Delivery::NotDelivered
                    },
                    format!("stream {} not opened within {timeout:?}", method.label()),
                )),
            };
            let outcome = match &result {
                Ok(_) => Outcome::Ok,
                Err(CallError::Application(_)) => Outcome::AppError,
                Err(CallError::Transport(e)) => {
                    metrics::call_failure(e.kind);
                    tracing::debug!(method = %method.label(), peer = %peer.id.short(), error = %e, "gRPC stream not opened");
                    Outcome::TransportError
                }
            };
            metrics::stream_opened(method, Side::Client, outcome);
            result
        })
    }
}

#[cfg(test)]
mod url_tests {
    use super::*;

    #[test]
    fn urls_are_https_host_port_only() {
        assert_eq!(check_url("https://10.0.0.1:7000"), Ok(()));
        assert_eq!(check_url("https://node-a.example:7000/"), Ok(()));
        assert_eq!(
            check_url("http://10.0.0.1:7000"),
            Err(UrlError::Plaintext {
                url: "http://10.0.0.1:7000".into(),
                rest: "10.0.0.1:7000".into()
            })
        );
        assert!(
            check_url("http://a:1")
                .unwrap_err()
                .to_string()
                .contains("write https://a:1")
        );
        assert_eq!(
            check_url("10.0.0.1:7000"),
            Err(UrlError::NotHttps("10.0.0.1:7000".into()))
        );
        assert_eq!(
            check_url("https://a:1/x"),
            Err(UrlError::Path("https://a:1/x".into()))
        );
        assert_eq!(
            check_url("https://"),
            Err(UrlError::Path("https://".into()))
        );
        assert_eq!(
            check_url("https://a"),
            Err(UrlError::NoPort("https://a".into()))
        );
        assert!(matches!(
            check_url("https://a b:1"),
            Err(UrlError::Invalid { .. })
        ));
    }

    proptest::proptest! {
        /// Any text is accepted or refused with a reason naming it; never
        /// a panic.
        #[test]
        fn any_text_is_checked_without_panicking(text in "\\PC{0,40}") {
            if let Err(e) = check_url(&text) {
                proptest::prop_assert!(e.to_string().contains(&text));
            }
        }
    }
}
