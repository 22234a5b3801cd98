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
//!   from the bind on, so alerts on them have a series to read;
//! - calls that met 0-RTT early data, by what became of them (see
//!   [`crate::server`] and [`crate::client`]).
//!
//! Nothing is recorded unless the node installs a recorder.
//!
//! The series recorded on every call (frames, bytes, calls in flight) use
//! keys built once, in statics: the `metrics` macros build a key with
//! non-literal label values in a new `Vec` each time, which was six heap
//! allocations per call on each side (measured by `benches/allocs.rs`).

use std::time::Duration;

use metrics::{Counter, Gauge, Key, Label, Level, Metadata, counter, gauge, histogram};
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

/// Where the statically keyed series say they come from.
static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// A static label set of `transport` and one more label.
macro_rules! labels {
    ($key:literal => $value:expr) => {
        [
            Label::from_static_parts("transport", TRANSPORT),
            Label::from_static_parts($key, $value),
        ]
    };
}

static SENT: [Label; 2] = labels!("direction" => Direction::Sent.as_str());
static RECEIVED: [Label; 2] = labels!("direction" => Direction::Received.as_str());
static CLIENT: [Label; 2] = labels!("side" => Side::Client.as_str());
static SERVER: [Label; 2] = labels!("side" => Side::Server.as_str());
static MESSAGES_SENT: Key = Key::from_static_parts(names::MESSAGES, &SENT);
static MESSAGES_RECEIVED: Key = Key::from_static_parts(names::MESSAGES, &RECEIVED);
static BYTES_SENT: Key = Key::from_static_parts(names::BYTES, &SENT);
static BYTES_RECEIVED: Key = Key::from_static_parts(names::BYTES, &RECEIVED);
static IN_FLIGHT_CLIENT: Key = Key::from_static_parts(names::IN_FLIGHT, &CLIENT);
static IN_FLIGHT_SERVER: Key = Key::from_static_parts(names::IN_FLIGHT, &SERVER);

fn static_counter(key: &'static Key) -> Counter {
    metrics::with_recorder(|r| r.register_counter(key, &METADATA))
}

fn static_gauge(key: &'static Key) -> Gauge {
    metrics::with_recorder(|r| r.register_gauge(key, &METADATA))
}

pub(crate) fn frame_sent(payload: usize) {
    static_counter(&MESSAGES_SENT).increment(1);
    static_counter(&BYTES_SENT).increment(payload as u64);
}

pub(crate) fn frame_received(payload: usize) {
    static_counter(&MESSAGES_RECEIVED).increment(1);
    static_counter(&BYTES_RECEIVED).increment(payload as u64);
}

pub(crate) fn queue_depth(lane: &'static str, delta: f64) {
    gauge!(names::QUEUE_DEPTH, "transport" => TRANSPORT, "lane" => lane).increment(delta);
}

pub(crate) fn in_flight(side: Side, delta: f64) {
    let key = match side {
        Side::Client => &IN_FLIGHT_CLIENT,
        Side::Server => &IN_FLIGHT_SERVER,
    };
    static_gauge(key).increment(delta);
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

/// What became of a call that met 0-RTT early data (see
/// [`names::IROH_EARLY_DATA_CALLS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EarlyData {
    /// Server: a read-only call answered before the handshake finished.
    ServedEarly,
    /// Server: another call in early data, run once the handshake finished.
    Held,
    /// Server: a held call whose handshake never finished; never run.
    Dropped,
    /// Client: a read-only call sent in early data.
    SentEarly,
    /// Client: the peer refused the early data; the call went again.
    Rejected,
}

pub(crate) fn early_data(outcome: EarlyData) {
    let outcome = match outcome {
        EarlyData::ServedEarly => "served_early",
        EarlyData::Held => "held",
        EarlyData::Dropped => "dropped",
        EarlyData::SentEarly => "sent_early",
        EarlyData::Rejected => "rejected",
    };
    counter!(names::IROH_EARLY_DATA_CALLS, "outcome" => outcome).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The static keys carry the same labels as the macro-built series of
    /// the gRPC transport, so both land on the same dashboard rows.
    #[test]
    fn static_keys_carry_the_shared_labels() {
        let labels = |key: &Key| -> Vec<(String, String)> {
            key.labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect()
        };
        let pair = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        assert_eq!(MESSAGES_SENT.name(), names::MESSAGES);
        assert_eq!(BYTES_RECEIVED.name(), names::BYTES);
        assert_eq!(IN_FLIGHT_SERVER.name(), names::IN_FLIGHT);
        assert_eq!(
            labels(&MESSAGES_SENT),
            [pair("transport", "iroh"), pair("direction", "sent")]
        );
        assert_eq!(
            labels(&BYTES_RECEIVED),
            [pair("transport", "iroh"), pair("direction", "received")]
        );
        assert_eq!(
            labels(&IN_FLIGHT_CLIENT),
            [pair("transport", "iroh"), pair("side", "client")]
        );
    }
}
