//! Metrics, recorded through the `metrics` facade the node exports.
//!
//! Every name starts with `tern_transport_` and every series carries
//! `transport="iroh"`, so the gRPC transport's series of the same names
//! compare directly on one dashboard.
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `tern_transport_connect_seconds` | histogram | | time to establish a connection (dial to handshake done) |
//! | `tern_transport_active_connections` | gauge | `direction` | open connections (`outbound` dialled, `inbound` accepted) |
//! | `tern_transport_connect_failures_total` | counter | `kind` | failed dials, by error kind |
//! | `tern_transport_connect_retries_total` | counter | | dials made after an earlier failure or loss |
//! | `tern_transport_connection_paths_total` | counter | `path` | new connections by selected path: `direct` or `relayed` |
//! | `tern_transport_call_seconds` | histogram | `method`, `side` | call latency (`client`: whole call; `server`: handler) |
//! | `tern_transport_calls_total` | counter | `method`, `side`, `outcome` | finished calls by outcome |
//! | `tern_transport_messages_total` | counter | `direction` | frames sent and received |
//! | `tern_transport_bytes_total` | counter | `direction` | frame bytes (header and payload) sent and received |
//! | `tern_transport_queue_depth` | gauge | `lane` | calls waiting for an in-flight slot, all peers |
//! | `tern_transport_in_flight` | gauge | `side` | calls in flight |

use std::time::Duration;

use metrics::{counter, gauge, histogram};

/// The `transport` label value of every series.
pub const TRANSPORT: &str = "iroh";

/// Time to establish a connection.
pub const CONNECT_SECONDS: &str = "tern_transport_connect_seconds";
/// Open connections.
pub const ACTIVE_CONNECTIONS: &str = "tern_transport_active_connections";
/// Failed dials.
pub const CONNECT_FAILURES: &str = "tern_transport_connect_failures_total";
/// Dials after an earlier failure or a lost connection.
pub const CONNECT_RETRIES: &str = "tern_transport_connect_retries_total";
/// New connections by path.
pub const CONNECTION_PATHS: &str = "tern_transport_connection_paths_total";
/// Call latency.
pub const CALL_SECONDS: &str = "tern_transport_call_seconds";
/// Finished calls.
pub const CALLS: &str = "tern_transport_calls_total";
/// Frames.
pub const MESSAGES: &str = "tern_transport_messages_total";
/// Frame bytes.
pub const BYTES: &str = "tern_transport_bytes_total";
/// Calls waiting for a lane slot.
pub const QUEUE_DEPTH: &str = "tern_transport_queue_depth";
/// Calls in flight.
pub const IN_FLIGHT: &str = "tern_transport_in_flight";

/// Which end of a connection or call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// We dialled / we called.
    Client,
    /// We accepted / we served.
    Server,
}

impl Side {
    fn call_label(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Server => "server",
        }
    }

    fn direction_label(self) -> &'static str {
        match self {
            Side::Client => "outbound",
            Side::Server => "inbound",
        }
    }
}

pub(crate) fn connected(elapsed: Duration, relayed: bool) {
    histogram!(CONNECT_SECONDS, "transport" => TRANSPORT).record(elapsed.as_secs_f64());
    let path = if relayed { "relayed" } else { "direct" };
    counter!(CONNECTION_PATHS, "transport" => TRANSPORT, "path" => path).increment(1);
}

pub(crate) fn connection_opened(side: Side) {
    gauge!(ACTIVE_CONNECTIONS, "transport" => TRANSPORT, "direction" => side.direction_label())
        .increment(1.0);
}

pub(crate) fn connection_closed(side: Side) {
    gauge!(ACTIVE_CONNECTIONS, "transport" => TRANSPORT, "direction" => side.direction_label())
        .decrement(1.0);
}

pub(crate) fn connect_failed(kind: &'static str) {
    counter!(CONNECT_FAILURES, "transport" => TRANSPORT, "kind" => kind).increment(1);
}

pub(crate) fn connect_retried() {
    counter!(CONNECT_RETRIES, "transport" => TRANSPORT).increment(1);
}

pub(crate) fn call_finished(side: Side, method: String, outcome: &'static str, elapsed: Duration) {
    histogram!(CALL_SECONDS, "transport" => TRANSPORT, "method" => method.clone(), "side" => side.call_label())
        .record(elapsed.as_secs_f64());
    counter!(CALLS, "transport" => TRANSPORT, "method" => method, "side" => side.call_label(), "outcome" => outcome)
        .increment(1);
}

pub(crate) fn frame_sent(bytes: usize) {
    counter!(MESSAGES, "transport" => TRANSPORT, "direction" => "sent").increment(1);
    counter!(BYTES, "transport" => TRANSPORT, "direction" => "sent").increment(bytes as u64);
}

pub(crate) fn frame_received(bytes: usize) {
    counter!(MESSAGES, "transport" => TRANSPORT, "direction" => "received").increment(1);
    counter!(BYTES, "transport" => TRANSPORT, "direction" => "received").increment(bytes as u64);
}

pub(crate) fn queue_depth(lane: &'static str, delta: f64) {
    gauge!(QUEUE_DEPTH, "transport" => TRANSPORT, "lane" => lane).increment(delta);
}

pub(crate) fn in_flight(side: Side, delta: f64) {
    gauge!(IN_FLIGHT, "transport" => TRANSPORT, "side" => side.call_label()).increment(delta);
}
