//! Recording helpers over the `metrics` facade, under the shared names of
//! [`tern_protocol::metric_names`].
//!
//! Every series carries `transport="grpc"` here and `transport="iroh"` in
//! the iroh transport, so one dashboard compares both on the same node.
//! Services and methods are labelled as the router labels them
//! (`service="raft"`, `method="AppendEntries"`). Nothing is recorded unless
//! the node installs a recorder (e.g. the Prometheus exporter).

use std::time::Duration;

use tern_protocol::metric_names as names;
use tern_protocol::{Method, TransportErrorKind};

/// Label value of every series this crate records.
pub const TRANSPORT_LABEL: &str = "grpc";

pub(crate) use tern_protocol::metric_names::{Direction, Outcome, Side};

pub(crate) fn message(direction: Direction, bytes: usize) {
    let labels = [
        ("transport", TRANSPORT_LABEL),
        ("direction", direction.as_str()),
    ];
    metrics::counter!(names::MESSAGES, &labels).increment(1);
    metrics::counter!(names::BYTES, &labels).increment(bytes as u64);
}

/// Records a finished call: its latency (unless the transport failed) and
/// its outcome.
pub(crate) fn call(method: &Method, side: Side, outcome: Outcome, elapsed: Duration) {
    let labels = [
        ("transport", TRANSPORT_LABEL),
        ("service", method.service.name()),
        ("method", method.name),
        ("side", side.as_str()),
    ];
    if !matches!(outcome, Outcome::TransportError) {
        metrics::histogram!(names::CALL_SECONDS, &labels).record(elapsed.as_secs_f64());
    }
    metrics::counter!(
        names::CALLS,
        "transport" => TRANSPORT_LABEL,
        "service" => method.service.name(),
        "method" => method.name,
        "side" => side.as_str(),
        "outcome" => outcome.as_str(),
    )
    .increment(1);
}

pub(crate) fn call_failure(kind: TransportErrorKind) {
    metrics::counter!(names::CALL_FAILURES, "transport" => TRANSPORT_LABEL, "kind" => kind.as_str())
        .increment(1);
}

pub(crate) fn connected(elapsed: Duration) {
    metrics::histogram!(names::CONNECT_SECONDS, "transport" => TRANSPORT_LABEL)
        .record(elapsed.as_secs_f64());
}

pub(crate) fn connect_failed() {
    metrics::counter!(names::CONNECT_FAILURES, "transport" => TRANSPORT_LABEL).increment(1);
}

pub(crate) fn redial() {
    metrics::counter!(names::CONNECT_RETRIES, "transport" => TRANSPORT_LABEL).increment(1);
}

/// Why a connection or call was refused for want of a proven identity, or
/// turned away at a limit before any work: the `reason` label of
/// `tern_transport_auth_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthReason {
    /// A TLS handshake failed (bad certificate, garbled records, not TLS).
    Handshake,
    /// A TLS handshake did not finish within its bound (slowloris).
    HandshakeTimeout,
    /// The dialled address answered with another node's valid identity.
    WrongPeer,
    /// A caller without a client certificate called a Tern method.
    Anonymous,
    /// Refused: the remote IP is at its connection cap.
    IpConnectionLimit,
    /// Refused: the peer id is at its connection cap.
    PeerConnectionLimit,
    /// Refused: the node is at its total connection cap.
    ConnectionLimit,
    /// An anonymous connection closed after its idle bound or its age.
    IdleAnonymous,
}

impl AuthReason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthReason::Handshake => "tls_handshake",
            AuthReason::HandshakeTimeout => "tls_handshake_timeout",
            AuthReason::WrongPeer => "wrong_peer",
            AuthReason::Anonymous => "anonymous",
            AuthReason::IpConnectionLimit => "ip_connection_limit",
            AuthReason::PeerConnectionLimit => "peer_connection_limit",
            AuthReason::ConnectionLimit => "connection_limit",
            AuthReason::IdleAnonymous => "idle_anonymous",
        }
    }
}

pub(crate) fn auth_failed(reason: AuthReason) {
    metrics::counter!(names::AUTH_FAILURES, "transport" => TRANSPORT_LABEL, "reason" => reason.as_str())
        .increment(1);
}

/// Counts one open connection while it lives.
#[derive(Debug)]
pub(crate) struct ConnectionGauge(());

impl ConnectionGauge {
    pub(crate) fn open() -> ConnectionGauge {
        metrics::gauge!(names::CONNECTIONS_ACTIVE, "transport" => TRANSPORT_LABEL).increment(1.0);
        ConnectionGauge(())
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        metrics::gauge!(names::CONNECTIONS_ACTIVE, "transport" => TRANSPORT_LABEL).decrement(1.0);
    }
}

/// Counts one call in flight on one side while it lives.
#[derive(Debug)]
pub(crate) struct InFlight(Side);

impl InFlight {
    pub(crate) fn start(side: Side) -> InFlight {
        metrics::gauge!(names::IN_FLIGHT, "transport" => TRANSPORT_LABEL, "side" => side.as_str())
            .increment(1.0);
        InFlight(side)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!(names::IN_FLIGHT, "transport" => TRANSPORT_LABEL, "side" => self.0.as_str())
            .decrement(1.0);
    }
}

/// Counts one call waiting for its lane's connection to take it, while it
/// waits (the channel's queue and the connection's stream limit).
#[derive(Debug)]
pub(crate) struct Queued(&'static str);

impl Queued {
    pub(crate) fn start(lane: &'static str) -> Queued {
        metrics::gauge!(names::QUEUE_DEPTH, "transport" => TRANSPORT_LABEL, "lane" => lane)
            .increment(1.0);
        Queued(lane)
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        metrics::gauge!(names::QUEUE_DEPTH, "transport" => TRANSPORT_LABEL, "lane" => self.0)
            .decrement(1.0);
    }
}

/// Counts a stream's opening by its outcome (`ok`: accepted).
pub(crate) fn stream_opened(method: &Method, side: Side, outcome: Outcome) {
    metrics::counter!(
        names::STREAMS,
        "transport" => TRANSPORT_LABEL,
        "service" => method.service.name(),
        "method" => method.name,
        "side" => side.as_str(),
        "outcome" => outcome.as_str(),
    )
    .increment(1);
}

/// One open stream in [`names::STREAMS_ACTIVE`], for as long as it lives.
#[derive(Debug)]
pub(crate) struct OpenStream(Side);

impl OpenStream {
    pub(crate) fn new(side: Side) -> OpenStream {
        metrics::gauge!(names::STREAMS_ACTIVE, "transport" => TRANSPORT_LABEL, "side" => side.as_str()).increment(1.0);
        OpenStream(side)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        metrics::gauge!(names::STREAMS_ACTIVE, "transport" => TRANSPORT_LABEL, "side" => self.0.as_str()).decrement(1.0);
    }
}
