//! The serving side: the iroh [`ProtocolHandler`] for [`crate::ALPN`].
//!
//! Each accepted connection runs an accept loop for bidirectional streams;
//! each stream is one call, served by its own task:
//!
//! 1. read one frame (bounded by the frame limit, checked before the
//!    payload is read, and by a read timeout);
//! 2. a ping is answered with a pong; a request is resolved against the
//!    catalogue (unknown service or method: an `Unimplemented` error frame)
//!    and run by the [`Handler`] with the connection's authenticated peer;
//! 3. the answer (response or error frame) is written and the stream
//!    finished; the task waits, bounded, for the peer's acknowledgement so a
//!    drained shutdown loses no answer.
//!
//! A request for a streaming method is served by `crate::stream::serve`
//! on the same stream, under the same places and budgets.
//!
//! The connection is served from its first packet (`on_accepting` turns
//! it into a 0-RTT connection): a stream that arrives in 0-RTT early data
//! runs at once only for a read-only method; any other waits until the
//! handshake has proven the caller, and is dropped unrun if it never does
//! (see the crate docs, "0-RTT early data", for why that makes replays
//! harmless).
//!
//! Oversize frames get a `ResourceExhausted` error frame and the request
//! side is stopped; malformed frames reset the stream. Neither touches the
//! connection. A caller that stops reading (it dropped the call) or a
//! passed deadline drops the handler's future: the service's work is
//! cancelled (on a deadline the stream is reset with
//! [`STREAM_DEADLINE_EXCEEDED`], never answered, so the caller's own timer
//! and ours agree on `TimedOut`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use iroh::endpoint::{
    Accepting, Connection, IncomingZeroRttConnection, RecvStream, SendStream, VarInt,
};
use iroh::protocol::{AcceptError, ProtocolHandler};
use tern_protocol::catalog::ServiceId;
use tern_protocol::frame::{HEADER_LEN, Limits};
use tern_protocol::{
    Code, Dispatcher, Frame, FrameError, FrameKind, Handler, Header, PeerId, Priority,
    RequestContext, Status, TransportKind,
};
use tokio::sync::Semaphore;
use tracing::{Instrument, debug, warn};

use crate::config::TransportLimits;
use crate::metrics::{self, EarlyData, Outcome, Side};
use crate::transport::Tracker;
use crate::wire::{
    self, CLOSE_SHUTTING_DOWN, CLOSE_TOO_MANY_CONNECTIONS, ReadFrameError,
    STREAM_DEADLINE_EXCEEDED, STREAM_MALFORMED, STREAM_SHUTTING_DOWN, STREAM_TOO_LARGE,
};

/// Shared state of the server: what it serves, its limits, its open
/// connections and its in-flight calls.
pub(crate) struct ServerState {
    handler: Arc<dyn Handler>,
    frame_limits: Limits,
    limits: TransportLimits,
    draining: AtomicBool,
    pub(crate) calls: Arc<Tracker>,
    connections: Mutex<HashMap<usize, IncomingZeroRttConnection>>,
    /// Per peer id: its open connections and its request-byte budget.
    peers: Mutex<HashMap<PeerId, PeerShare>>,
}

/// One peer's share of the server.
struct PeerShare {
    connections: usize,
    bytes: Arc<Semaphore>,
}

impl std::fmt::Debug for ServerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerState")
            .field("draining", &self.draining.load(Ordering::SeqCst))
            .field("calls", &self.calls.count())
            .finish_non_exhaustive()
    }
}

impl ServerState {
    pub(crate) fn new(
        handler: Arc<dyn Handler>,
        frame_limits: Limits,
        limits: TransportLimits,
    ) -> Arc<ServerState> {
        Arc::new(ServerState {
            handler,
            frame_limits,
            limits,
            draining: AtomicBool::new(false),
            calls: Arc::new(Tracker::default()),
            connections: Mutex::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
        })
    }

    /// From now on, new streams are reset with [`STREAM_SHUTTING_DOWN`]
    /// (not run); calls already accepted run to the end.
    pub(crate) fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether the node is shutting down ([`Self::begin_drain`]).
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Closes every served connection with `code`.
    pub(crate) fn close_connections(&self, code: VarInt, reason: &[u8]) {
        let connections: Vec<IncomingZeroRttConnection> = match self.connections.lock() {
            Ok(mut map) => map.drain().map(|(_, c)| c).collect(),
            Err(poisoned) => poisoned.into_inner().drain().map(|(_, c)| c).collect(),
        };
        for conn in connections {
            conn.close(code, reason);
        }
    }

    fn register(
        &self,
        conn: &IncomingZeroRttConnection,
        peer: PeerId,
    ) -> Result<Arc<Semaphore>, Refusal> {
        let (Ok(mut map), Ok(mut peers)) = (self.connections.lock(), self.peers.lock()) else {
            return Err(Refusal::TooMany);
        };
        if map.len() >= self.limits.max_connections {
            return Err(Refusal::TooMany);
        }
        let share = peers.entry(peer).or_insert_with(|| PeerShare {
            connections: 0,
            bytes: Arc::new(Semaphore::new(self.limits.max_in_flight_bytes_per_peer)),
        });
        if share.connections >= self.limits.max_connections_per_peer {
            return Err(Refusal::TooManyForPeer);
        }
        share.connections += 1;
        map.insert(conn.stable_id(), conn.clone());
        Ok(share.bytes.clone())
    }

    fn unregister(&self, id: usize, peer: PeerId) {
        if let Ok(mut map) = self.connections.lock() {
            map.remove(&id);
        }
        if let Ok(mut peers) = self.peers.lock()
            && let Some(share) = peers.get_mut(&peer)
        {
            share.connections = share.connections.saturating_sub(1);
            if share.connections == 0 {
                peers.remove(&peer);
            }
        }
    }
}

/// The [`ProtocolHandler`] serving [`crate::ALPN`].
#[derive(Debug, Clone)]
pub struct RpcProtocol {
    state: Arc<ServerState>,
}

impl RpcProtocol {
    pub(crate) fn new(state: Arc<ServerState>) -> RpcProtocol {
        RpcProtocol { state }
    }
}

impl ProtocolHandler for RpcProtocol {
    /// Serves the connection from its first packet: a resumed caller's
    /// read-only calls in 0-RTT early data are answered at once (0.5-RTT);
    /// everything else waits for the handshake (see the module docs).
    async fn on_accepting(&self, accepting: Accepting) -> Result<Connection, AcceptError> {
        let conn = accepting.into_0rtt();
        // iroh's handshake future runs only while polled, and after the
        // connection closed it fails even for a handshake that finished:
        // the proof is followed while the connection is served. The router
        // hands the proven connection to `accept` (which has nothing left
        // to do), so a connection that closes after its handshake ends
        // quietly; one whose handshake never finished (a replay, a caller
        // that went away) ends here as an error the router logs.
        let (proof, ()) = tokio::join!(proven(&conn), serve_connection(self.state.clone(), &conn));
        match proof {
            Ok(done) => Ok(done),
            Err(Unproven::Handshake(e)) => Err(e.into()),
            Err(Unproven::Closed(e)) => Err(e.into()),
        }
    }

    async fn accept(&self, _conn: Connection) -> Result<(), AcceptError> {
        Ok(())
    }

    async fn shutdown(&self) {
        // The transport drained before shutting the router down; whatever
        // is still open is closed with the shutdown code, so callers see
        // "peer shutting down" rather than a bare close. A router also
        // shuts down when its endpoint died by itself; then the node is
        // not shutting down, the server keeps serving the endpoint that
        // replaces it (see crate::supervisor), and the dead endpoint's
        // connections are closed by the rebuild.
        if self.state.is_draining() {
            self.state
                .close_connections(CLOSE_SHUTTING_DOWN, b"peer shutting down");
        }
    }
}

/// Why a connection was refused.
enum Refusal {
    TooMany,
    TooManyForPeer,
}

/// Unregisters a connection however its accept loop ends (including when
/// the router cancels it).
struct Registered {
    state: Arc<ServerState>,
    id: usize,
    peer: PeerId,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.state.unregister(self.id, self.peer);
        metrics::connection_closed();
    }
}

/// Why a connection's caller was never proven.
enum Unproven {
    /// The handshake failed.
    Handshake(iroh::endpoint::ConnectingError),
    /// The connection ended before the handshake was known to finish.
    Closed(iroh::endpoint::ConnectionError),
}

impl std::fmt::Display for Unproven {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unproven::Handshake(e) => write!(f, "the handshake failed: {e}"),
            Unproven::Closed(e) => write!(f, "the connection ended first: {e}"),
        }
    }
}

/// Waits until the handshake has proven the caller: it finished, and the
/// connection is still open. A connection that ends first (a replayed
/// first flight never finishes its handshake; it ends at the idle
/// timeout) is never taken for proven, whatever iroh's handshake future
/// later says about it.
async fn proven(conn: &IncomingZeroRttConnection) -> Result<Connection, Unproven> {
    tokio::select! {
        biased;
        reason = conn.closed() => Err(Unproven::Closed(reason)),
        done = conn.handshake_completed() => match done {
            Err(e) => Err(Unproven::Handshake(e)),
            Ok(done) => match done.close_reason() {
                None => Ok(done),
                Some(reason) => Err(Unproven::Closed(reason)),
            },
        },
    }
}

/// Who is calling, before the handshake ends if it can be known: a caller
/// resuming a session is named by the session ticket this server issued
/// to it after a full handshake (so authenticated then); any other caller
/// is known only once its handshake finishes.
async fn caller(conn: &IncomingZeroRttConnection) -> Option<PeerId> {
    let key = if conn.peer_identity().is_some() {
        conn.remote_id().ok()?
    } else {
        match proven(conn).await {
            Ok(done) => done.remote_id(),
            Err(e) => {
                debug!("a connection without a caller: {e}");
                return None;
            }
        }
    };
    Some(PeerId::from_bytes(*key.as_bytes()))
}

async fn serve_connection(state: Arc<ServerState>, conn: &IncomingZeroRttConnection) {
    let Some(peer) = caller(conn).await else {
        return;
    };
    let peer_bytes = match state.register(conn, peer) {
        Ok(bytes) => bytes,
        Err(Refusal::TooMany) => {
            warn!(peer = %peer.short(), limit = state.limits.max_connections, "refusing a connection: too many connections");
            conn.close(CLOSE_TOO_MANY_CONNECTIONS, b"too many connections");
            return;
        }
        Err(Refusal::TooManyForPeer) => {
            warn!(peer = %peer.short(), limit = state.limits.max_connections_per_peer, "refusing a connection: the peer is at its connection cap");
            conn.close(
                CLOSE_TOO_MANY_CONNECTIONS,
                b"too many connections from this peer",
            );
            return;
        }
    };
    metrics::connection_opened();
    let _registered = Registered {
        state: state.clone(),
        id: conn.stable_id(),
        peer,
    };
    debug!(peer = %peer.short(), "serving a connection");
    let per_connection = Arc::new(Semaphore::new(state.limits.max_in_flight_per_connection));
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let guard = state.calls.enter();
                // A stream taken while the handshake is still running came
                // in 0-RTT early data, which may be a replay.
                let early = recv.is_0rtt().then(|| conn.clone());
                let span = tracing::debug_span!("stream", peer = %peer.short(), id = %send.id());
                tokio::spawn(
                    serve_stream(
                        state.clone(),
                        peer,
                        send,
                        recv,
                        Budgets {
                            per_connection: per_connection.clone(),
                            peer_bytes: peer_bytes.clone(),
                        },
                        guard,
                        early,
                    )
                    .instrument(span),
                );
            }
            Err(e) => {
                debug!(peer = %peer.short(), "connection ended: {e}");
                return;
            }
        }
    }
}

fn reset(send: &mut SendStream, recv: &mut RecvStream, code: VarInt) {
    // Errors mean the stream is already closed, which is what we want.
    let _ = recv.stop(code);
    let _ = send.reset(code);
}

/// What a stream must take before its payload is read.
struct Budgets {
    /// Calls in flight on the connection.
    per_connection: Arc<Semaphore>,
    /// Request bytes in flight for the peer, over all its connections.
    peer_bytes: Arc<Semaphore>,
}

async fn serve_stream(
    state: Arc<ServerState>,
    peer: PeerId,
    mut send: SendStream,
    mut recv: RecvStream,
    budgets: Budgets,
    _call: crate::transport::TrackerGuard,
    early: Option<IncomingZeroRttConnection>,
) {
    if state.draining.load(Ordering::SeqCst) {
        reset(&mut send, &mut recv, STREAM_SHUTTING_DOWN);
        return;
    }
    let limits = state.frame_limits;
    let read_deadline = tokio::time::Instant::now() + state.limits.request_read_timeout;
    // The header first: nothing of the payload is read or allocated until
    // the call holds its place on the connection and the peer's bytes.
    let header = match tokio::time::timeout_at(read_deadline, read_header(&mut recv, limits)).await
    {
        Err(_) => Err(RequestError::Read(ReadFrameError::Eof { got: 0 })),
        Ok(result) => result,
    };
    let mut held = None;
    let read = match header {
        Ok(header) if header.kind == FrameKind::Request => {
            let Ok(permit) = budgets.per_connection.clone().try_acquire_owned() else {
                let status = Status::new(
                    Code::ResourceExhausted,
                    format!(
                        "too many calls in flight on this connection (limit {})",
                        state.limits.max_in_flight_per_connection
                    ),
                );
                let _ = recv.stop(STREAM_TOO_LARGE);
                answer(&mut send, &state, &header, Err(status)).await;
                return;
            };
            let len = header.payload_len;
            let Ok(bytes) = budgets.peer_bytes.clone().try_acquire_many_owned(len) else {
                let status = Status::new(
                    Code::ResourceExhausted,
                    format!(
                        "this peer has too many request bytes in flight (limit {} bytes); retry when earlier calls are answered",
                        state.limits.max_in_flight_bytes_per_peer
                    ),
                );
                let _ = recv.stop(STREAM_TOO_LARGE);
                answer(&mut send, &state, &header, Err(status)).await;
                return;
            };
            held = Some((permit, bytes));
            tokio::time::timeout_at(read_deadline, wire::read_payload_after(&mut recv, header))
                .await
                .map(|r| r.map_err(RequestError::Read))
        }
        Ok(header) => {
            tokio::time::timeout_at(read_deadline, wire::read_payload_after(&mut recv, header))
                .await
                .map(|r| r.map_err(RequestError::Read))
        }
        Err(e) => Ok(Err(e)),
    };
    let frame = match read {
        Err(_) => {
            debug!("no whole request within the read timeout; resetting the stream");
            reset(&mut send, &mut recv, STREAM_MALFORMED);
            return;
        }
        Ok(Ok(frame)) => frame,
        Ok(Err(RequestError::Frame { raw, error })) => {
            match error {
                FrameError::Oversize { len, max, .. } => {
                    debug!(len, max, "oversize request refused");
                    let status = Status::new(
                        Code::ResourceExhausted,
                        format!(
                            "request payload of {len} bytes exceeds this node's limit of {max} bytes"
                        ),
                    );
                    // Stop the request side first: the caller's blocked
                    // write fails at once and it reads the answer.
                    let _ = recv.stop(STREAM_TOO_LARGE);
                    answer_raw(&mut send, &state, &raw, &status).await;
                }
                FrameError::UnknownService { service, .. } => {
                    debug!(service, "request for an unknown service");
                    let status = Status::unimplemented(format!(
                        "service id {service} is unknown to this node"
                    ));
                    let _ = recv.stop(STREAM_MALFORMED);
                    answer_raw(&mut send, &state, &raw, &status).await;
                }
                other => {
                    warn!("malformed frame; resetting the stream: {other}");
                    reset(&mut send, &mut recv, STREAM_MALFORMED);
                }
            }
            return;
        }
        Ok(Err(RequestError::Read(e))) => {
            debug!("request not read: {e}");
            reset(&mut send, &mut recv, STREAM_MALFORMED);
            return;
        }
    };
    let header = frame.header;
    match header.kind {
        FrameKind::Ping => {
            wire::consume_end(&mut recv);
            let pong = Header {
                kind: FrameKind::Pong,
                priority: Priority::Control,
                idempotent: false,
                service: ServiceId::Connection,
                method: 0,
                request_id: header.request_id,
                payload_len: 0,
                deadline_ms: 0,
            };
            let _ = send.set_priority(wire::quic_priority(Priority::Control));
            if let Ok(pong) = Frame::new(pong, frame.payload, limits) {
                finish_answer(&mut send, &state, &pong).await;
            }
            return;
        }
        FrameKind::Request => {}
        other => {
            warn!("a {other:?} frame cannot open a call; resetting the stream");
            reset(&mut send, &mut recv, STREAM_MALFORMED);
            return;
        }
    }
    let _ = send.set_priority(wire::quic_priority(header.priority));
    let method = match Dispatcher::resolve(header.service, header.method) {
        Ok(method) => method,
        Err(status) => {
            answer(&mut send, &state, &header, Err(status)).await;
            return;
        }
    };
    if let Some(conn) = early {
        // Early data can be replayed by anyone who captured it, to this
        // node, at any time: only a read-only call runs on it. Anything
        // else runs once the handshake proves the caller is here, on this
        // connection; a replayed handshake never finishes.
        if method.read_only {
            metrics::early_data(EarlyData::ServedEarly);
        } else {
            metrics::early_data(EarlyData::Held);
            if let Err(e) = proven(&conn).await {
                metrics::early_data(EarlyData::Dropped);
                debug!(method = %method.label(), "a call in early data whose handshake never finished; dropped unrun: {e}");
                reset(&mut send, &mut recv, STREAM_SHUTTING_DOWN);
                return;
            }
        }
    }
    if method.kind.is_stream() {
        // The stream keeps its place on the connection and its first
        // message's bytes until it ends; its later messages are read only
        // as the handler asks, bounded by the stream window.
        let ctx = RequestContext {
            peer,
            transport: TransportKind::Iroh,
            priority: header.priority,
            deadline: None,
        };
        metrics::in_flight(Side::Server, 1.0);
        crate::stream::serve(
            crate::stream::Serving {
                handler: state.handler.clone(),
                ctx,
                method,
                request: header,
                payload: frame.payload,
                limits,
                ack_timeout: state.limits.response_ack_timeout,
            },
            send,
            recv,
        )
        .await;
        metrics::in_flight(Side::Server, -1.0);
        drop(held);
        return;
    }
    wire::consume_end(&mut recv);
    let started = Instant::now();
    let deadline = (header.deadline_ms > 0)
        .then(|| started + std::time::Duration::from_millis(u64::from(header.deadline_ms)));
    let ctx = RequestContext {
        peer,
        transport: TransportKind::Iroh,
        priority: header.priority,
        deadline,
    };
    metrics::in_flight(Side::Server, 1.0);
    let work = state.handler.handle(ctx, method, frame.payload);
    let stopped = send.stopped();
    let expiry = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d.into()).await,
            None => std::future::pending().await,
        }
    };
    let outcome = tokio::select! {
        result = work => Some(result),
        reason = stopped => {
            debug!(method = %method.label(), "caller abandoned the call ({reason:?}); cancelling it");
            None
        }
        () = expiry => {
            debug!(method = %method.label(), "the caller's deadline passed; dropping the work");
            let _ = send.reset(STREAM_DEADLINE_EXCEEDED);
            None
        }
    };
    // The slot and the bytes are free once the service is done, before the
    // answer is sent: a caller holding the answer may call again at once.
    drop(held);
    metrics::in_flight(Side::Server, -1.0);
    let label = match &outcome {
        None => Outcome::TransportError,
        Some(Ok(_)) => Outcome::Ok,
        Some(Err(_)) => Outcome::AppError,
    };
    metrics::call_finished(method, Side::Server, label, started.elapsed());
    if let Some(result) = outcome {
        answer(&mut send, &state, &header, result).await;
    }
}

enum RequestError {
    Frame {
        raw: [u8; HEADER_LEN],
        error: FrameError,
    },
    Read(ReadFrameError),
}

/// Reads and checks the request's header, keeping the raw bytes of a bad
/// one so that the error frame can echo its request id, service and
/// method. Reads nothing of the payload.
async fn read_header(recv: &mut RecvStream, limits: Limits) -> Result<Header, RequestError> {
    let mut raw = [0u8; HEADER_LEN];
    let mut have = 0;
    while have < HEADER_LEN {
        match recv.read(&mut raw[have..]).await {
            Ok(Some(n)) => have += n,
            Ok(None) => return Err(RequestError::Read(ReadFrameError::Eof { got: have })),
            Err(e) => return Err(RequestError::Read(e.into())),
        }
    }
    Header::decode(&raw, limits).map_err(|error| RequestError::Frame { raw, error })
}

/// Writes the answer to a decoded request.
async fn answer(
    send: &mut SendStream,
    state: &ServerState,
    request: &Header,
    result: Result<Bytes, Status>,
) {
    let mut header = Header {
        kind: FrameKind::Response,
        priority: request.priority,
        idempotent: false,
        service: request.service,
        method: request.method,
        request_id: request.request_id,
        payload_len: 0,
        deadline_ms: 0,
    };
    let payload = match result {
        Ok(bytes) => bytes,
        Err(status) => {
            header.kind = FrameKind::Error;
            status.encode()
        }
    };
    let frame = match Frame::new(header, payload, state.frame_limits) {
        Ok(frame) => frame,
        Err(too_large) => {
            warn!("response too large to send: {too_large}");
            header.kind = FrameKind::Error;
            let status = Status::new(
                Code::ResourceExhausted,
                format!("the response does not fit in one frame: {too_large}"),
            );
            match Frame::new(header, status.encode(), state.frame_limits) {
                Ok(frame) => frame,
                Err(_) => {
                    let _ = send.reset(STREAM_TOO_LARGE);
                    return;
                }
            }
        }
    };
    finish_answer(send, state, &frame).await;
}

/// Answers a request whose header did not decode: an error frame echoing
/// the raw request's id, service, method and priority bits (the caller
/// knows that service even when we do not).
async fn answer_raw(
    send: &mut SendStream,
    state: &ServerState,
    raw: &[u8; HEADER_LEN],
    status: &Status,
) {
    let payload = status.encode();
    let Ok(payload_len) = u32::try_from(payload.len()) else {
        let _ = send.reset(STREAM_MALFORMED);
        return;
    };
    let header = wire::error_header_for_raw(raw, payload_len);
    let mut chunks = [Bytes::copy_from_slice(&header), payload];
    if send.write_all_chunks(&mut chunks).await.is_ok() {
        metrics::frame_sent(payload_len as usize);
        let _ = send.finish();
        let _ = tokio::time::timeout(state.limits.response_ack_timeout, send.stopped()).await;
    }
}

async fn finish_answer(send: &mut SendStream, state: &ServerState, frame: &Frame) {
    match wire::write_frame(send, frame).await {
        Ok(()) => {
            let _ = send.finish();
            // Wait until the caller has the answer (bounded), so that a
            // drained shutdown never closes the connection under it.
            let _ = tokio::time::timeout(state.limits.response_ack_timeout, send.stopped()).await;
        }
        Err(e) => debug!("answer not delivered: {e}"),
    }
}
