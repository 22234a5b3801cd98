//! Raft metrics under the shared names of
//! [`tern_protocol::metric_names`], recorded through the `metrics` facade
//! (the node installs the recorder; without one these are no-ops).
//!
//! - Heartbeat round trips are timed by the network
//!   ([`heartbeat`], label `transport`).
//! - Everything else is read from openraft's metrics watch by one task per
//!   node ([`spawn_watcher`]): term, applied index, leadership, elections
//!   started, leader changes, and on the leader each follower's lag
//!   (label `peer`, the node id). The task ends when Raft stops.

use std::time::Duration;

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use tern_protocol::TransportKind;
use tern_protocol::metric_names as names;
use tokio::task::JoinHandle;

use crate::service::RaftInstance;

/// Records one heartbeat round trip.
pub fn heartbeat(transport: TransportKind, rtt: Duration) {
    ::metrics::histogram!(names::RAFT_HEARTBEAT_SECONDS, "transport" => transport.as_str())
        .record(rtt.as_secs_f64());
}

/// Follows `raft`'s metrics until it stops, updating the gauges and
/// counting elections and leader changes.
pub fn spawn_watcher(raft: &RaftInstance) -> JoinHandle<()> {
    let mut rx = raft.metrics();
    tokio::spawn(async move {
        let mut last_leader = None;
        let mut last_state = ServerState::Learner;
        loop {
            {
                let m = rx.borrow_watched();
                ::metrics::gauge!(names::RAFT_TERM).set(m.current_term as f64);
                ::metrics::gauge!(names::RAFT_APPLIED_INDEX)
                    .set(m.last_applied.as_ref().map_or(0, |l| l.index) as f64);
                let leading = m.state == ServerState::Leader;
                ::metrics::gauge!(names::RAFT_IS_LEADER).set(if leading { 1.0 } else { 0.0 });
                if m.state == ServerState::Candidate && last_state != ServerState::Candidate {
                    ::metrics::counter!(names::RAFT_ELECTIONS).increment(1);
                }
                if m.current_leader != last_leader {
                    if m.current_leader.is_some() {
                        ::metrics::counter!(names::RAFT_LEADER_CHANGES).increment(1);
                    }
                    last_leader = m.current_leader;
                }
                last_state = m.state;
                if let (Some(replication), Some(last)) = (&m.replication, m.last_log_index) {
                    for (peer, matched) in replication {
                        let lag = last.saturating_sub(matched.as_ref().map_or(0, |l| l.index));
                        ::metrics::gauge!(names::RAFT_REPLICATION_LAG, "peer" => peer.to_string())
                            .set(lag as f64);
                    }
                }
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    })
}
