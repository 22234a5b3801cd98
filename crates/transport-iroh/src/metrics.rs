//! Metrics, recorded through the `metrics` facade the node exports, under
//! the shared names of [`tern_protocol::metric_names`].
//!
//! Every series carries `transport="iroh"` (the gRPC transport records the
//! same names with `transport="grpc"`), so one dashboard compares both on
//! the same node. Services and methods are labelled as everywhere else
//! (`service="raft"`, `method="AppendEntries"`). Recorded here:
//!
//! - connection establishment time, open connections, failed dials,
//!   re-dials, and the path a new outbound connection settles on
//!   (`direct`/`relayed`: the NAT traversal outcome, labelled with the
//!   peer's short key so that a peer reached only by relay stands out; from
//!   `Connection::paths()` and its path events, see
//!   [`crate::client::NAT_SETTLE_TIME`]);
//! - per-method latency and outcome (`ok`, `app_error`,
//!   `transport_error`) on both sides, and transport failures by kind;
//! - frames and payload bytes sent and received;
//! - calls waiting for a lane slot (`lane` label) and calls in flight;
//! - streams opened (by outcome of the opening) and streams open now; a
//!   stream's messages count as frames;
//! - the endpoint's health (see [`crate::supervisor`]): whether it answers
//!   its liveness probe, unanswered probes, and rebuilds by reason. These
//!   carry no `transport` label (they are iroh's alone) and exist at 0
//!   from the bind on, so alerts on them have a series to read.
//!
//! Nothing is recorded unless the node installs a recorder.

use std::time::Duration;

use metrics::{counter, gauge, histogram};
use tern_protocol::metric_names as names;
use tern_protocol::{Method, TransportErrorKind};

/// The `transport` label value of every series.
pub const TRANSPORT: &str = "iroh";

pub(crate) use tern_protocol::metric_names::{Direction, Outcome, Side};

pub(crate) fn connected(elapsed: Duration) {
    histogram!(names::CONNECT_SECONDS, "transport" => TRANSPORT).record(elapsed.as_secs_f64());
}

/// The NAT traversal outcome of a new connection to `peer` (its short
/// key, as the router's `peer` labels): the path it settled on.
pub(crate) fn connection_path(relayed: bool, peer: String) {
    let path = if relayed { "relayed" } else { "direct" };
    counter!(names::CONNECTION_PATHS, "transport" => TRANSPORT, "path" => path, "peer" => peer)
        .increment(1);
}

pub(crate) fn connection_opened() {
    gauge!(names::CONNECTIONS_ACTIVE, "transport" => TRANSPORT).increment(1.0);
}

pub(crate) fn connection_closed() {
    gauge!(names::CONNECTIONS_ACTIVE, "transport" => TRANSPORT).decrement(1.0);
}

pub(crate) fn connect_failed() {
    counter!(names::CONNECT_FAILURES, "transport" => TRANSPORT).increment(1);
}

pub(crate) fn connect_retried() {
    counter!(names::CONNECT_RETRIES, "transport" => TRANSPORT).increment(1);
}

/// Records a finished call: its latency (unless the transport failed) and
/// its outcome.
pub(crate) fn call_finished(method: &Method, side: Side, outcome: Outcome, elapsed: Duration) {
    let labels = [
        ("transport", TRANSPORT),
        ("service", method.service.name()),
        ("method", method.name),
        ("side", side.as_str()),
    ];
    if outcome != Outcome::TransportError {
        histogram!(names::CALL_SECONDS, &labels).record(elapsed.as_secs_f64());
    }
    counter!(
        names::CALLS,
        "transport" => TRANSPORT,
        "service" => method.service.name(),
        "method" => method.name,
        "side" => side.as_str(),
        "outcome" => outcome.as_str(),
    )
    .increment(1);
}

pub(crate) fn call_failure(kind: TransportErrorKind) {
    counter!(names::CALL_FAILURES, "transport" => TRANSPORT, "kind" => kind.as_str()).increment(1);
}

pub(crate) fn frame_sent(payload: usize) {
    counter!(names::MESSAGES, "transport" => TRANSPORT, "direction" => Direction::Sent.as_str())
        .increment(1);
    counter!(names::BYTES, "transport" => TRANSPORT, "direction" => Direction::Sent.as_str())
        .increment(payload as u64);
}

pub(crate) fn frame_received(payload: usize) {
    counter!(names::MESSAGES, "transport" => TRANSPORT, "direction" => Direction::Received.as_str()).increment(1);
    counter!(names::BYTES, "transport" => TRANSPORT, "direction" => Direction::Received.as_str())
        .increment(payload as u64);
}

pub(crate) fn queue_depth(lane: &'static str, delta: f64) {
    gauge!(names::QUEUE_DEPTH, "transport" => TRANSPORT, "lane" => lane).increment(delta);
}

pub(crate) fn in_flight(side: Side, delta: f64) {
    gauge!(names::IN_FLIGHT, "transport" => TRANSPORT, "side" => side.as_str()).increment(delta);
}

/// Counts a stream's opening by its outcome (`ok`: accepted).
pub(crate) fn stream_opened(method: &Method, side: Side, outcome: Outcome) {
    metrics::counter!(
        names::STREAMS,
        "transport" => TRANSPORT,
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
        metrics::gauge!(names::STREAMS_ACTIVE, "transport" => TRANSPORT, "side" => side.as_str())
            .increment(1.0);
        OpenStream(side)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        metrics::gauge!(names::STREAMS_ACTIVE, "transport" => TRANSPORT, "side" => self.0.as_str())
            .decrement(1.0);
    }
}

/// Why the endpoint was rebuilt (the `reason` label of
/// [`names::IROH_ENDPOINT_REBUILDS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebuildReason {
    /// It stopped answering its own liveness probe.
    Probe,
    /// It closed by itself (not by this node's shutdown).
    Closed,
}

impl RebuildReason {
    /// Every reason, for registering the series at 0.
    pub const ALL: [RebuildReason; 2] = [RebuildReason::Probe, RebuildReason::Closed];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RebuildReason::Probe => "probe",
            RebuildReason::Closed => "closed",
        }
    }
}

/// Registers the endpoint-health series (at 0 rebuilds, healthy).
pub(crate) fn endpoint_bound() {
    for reason in RebuildReason::ALL {
        counter!(names::IROH_ENDPOINT_REBUILDS, "reason" => reason.as_str()).increment(0);
    }
    counter!(names::IROH_ENDPOINT_PROBE_FAILURES).increment(0);
    gauge!(names::IROH_ENDPOINT_HEALTHY).set(1.0);
}

pub(crate) fn endpoint_healthy(healthy: bool) {
    gauge!(names::IROH_ENDPOINT_HEALTHY).set(if healthy { 1.0 } else { 0.0 });
}

pub(crate) fn probe_failed() {
    counter!(names::IROH_ENDPOINT_PROBE_FAILURES).increment(1);
}

pub(crate) fn endpoint_rebuilt(reason: RebuildReason) {
    counter!(names::IROH_ENDPOINT_REBUILDS, "reason" => reason.as_str()).increment(1);
}
