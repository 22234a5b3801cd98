//! Metric names and recording helpers, through the `metrics` facade.
//!
//! The names are shared with the iroh transport: every series carries
//! `transport="grpc"` here and `transport="iroh"` there, so one dashboard
//! compares both on the same node. Nothing is recorded unless the node
//! installs a recorder (e.g. the Prometheus exporter).

use std::time::Duration;

use tern_protocol::{Method, TransportErrorKind};

/// Label value of every series this crate records.
pub const TRANSPORT_LABEL: &str = "grpc";

/// Histogram, seconds: time to establish an outbound connection (TCP and
/// HTTP/2 handshake). Labels: `transport`.
pub const CONNECT_SECONDS: &str = "tern_transport_connect_seconds";
/// Gauge: connections open now. Labels: `transport`, `direction`
/// (`inbound` | `outbound`).
pub const CONNECTIONS_ACTIVE: &str = "tern_transport_connections_active";
/// Counter: outbound connection attempts that failed. Labels: `transport`.
pub const CONNECT_FAILURES: &str = "tern_transport_connect_failures_total";
/// Counter: connections dialled again after an earlier one to the same
/// peer failed or was lost. Labels: `transport`.
pub const REDIALS: &str = "tern_transport_redials_total";
/// Counter: calls that failed at the transport level. Labels: `transport`,
/// `method`, `kind` (a [`TransportErrorKind`] name).
pub const CALL_FAILURES: &str = "tern_transport_call_failures_total";
/// Histogram, seconds: call latency as the caller (`side="client"`) or the
/// serving node (`side="server"`) sees it. Labels: `transport`, `method`,
/// `side`.
pub const CALL_SECONDS: &str = "tern_rpc_call_seconds";
/// Counter: request and response messages. Labels: `transport`,
/// `direction` (`sent` | `received`).
pub const MESSAGES: &str = "tern_transport_messages_total";
/// Counter: payload bytes of those messages. Labels: `transport`,
/// `direction`.
pub const BYTES: &str = "tern_transport_bytes_total";
/// Counter: requests refused because their caller proof failed. Labels:
/// `transport`.
pub const AUTH_FAILURES: &str = "tern_transport_auth_failures_total";

/// Direction of a message, for [`MESSAGES`] and [`BYTES`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Direction {
    Sent,
    Received,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Sent => "sent",
            Direction::Received => "received",
        }
    }
}

pub(crate) fn message(direction: Direction, bytes: usize) {
    let labels = [
        ("transport", TRANSPORT_LABEL),
        ("direction", direction.as_str()),
    ];
    metrics::counter!(MESSAGES, &labels).increment(1);
    metrics::counter!(BYTES, &labels).increment(bytes as u64);
}

pub(crate) fn call_latency(method: &Method, side: &'static str, elapsed: Duration) {
    metrics::histogram!(
        CALL_SECONDS,
        "transport" => TRANSPORT_LABEL,
        "method" => method.label(),
        "side" => side,
    )
    .record(elapsed.as_secs_f64());
}

pub(crate) fn call_failure(method: &Method, kind: TransportErrorKind) {
    metrics::counter!(
        CALL_FAILURES,
        "transport" => TRANSPORT_LABEL,
        "method" => method.label(),
        "kind" => kind.as_str(),
    )
    .increment(1);
}

pub(crate) fn connected(elapsed: Duration) {
    metrics::histogram!(CONNECT_SECONDS, "transport" => TRANSPORT_LABEL)
        .record(elapsed.as_secs_f64());
}

pub(crate) fn connect_failed() {
    metrics::counter!(CONNECT_FAILURES, "transport" => TRANSPORT_LABEL).increment(1);
}

pub(crate) fn redial() {
    metrics::counter!(REDIALS, "transport" => TRANSPORT_LABEL).increment(1);
}

pub(crate) fn auth_failed() {
    metrics::counter!(AUTH_FAILURES, "transport" => TRANSPORT_LABEL).increment(1);
}

/// Counts one open connection in [`CONNECTIONS_ACTIVE`] while it lives.
#[derive(Debug)]
pub(crate) struct ConnectionGauge {
    direction: &'static str,
}

impl ConnectionGauge {
    pub(crate) fn open(direction: &'static str) -> ConnectionGauge {
        metrics::gauge!(CONNECTIONS_ACTIVE, "transport" => TRANSPORT_LABEL, "direction" => direction)
            .increment(1.0);
        ConnectionGauge { direction }
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        metrics::gauge!(CONNECTIONS_ACTIVE, "transport" => TRANSPORT_LABEL, "direction" => self.direction)
            .decrement(1.0);
    }
}
