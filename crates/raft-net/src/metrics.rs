//! Raft metrics under the shared names of
//! [`tern_protocol::metric_names`], recorded through the `metrics` facade
//! (the node installs the recorder; without one these are no-ops).
//!
//! - Heartbeat round trips are timed by the network
//!   ([`heartbeat`], labels `transport` and `peer`, the follower's node
//!   id).
//! - Proposals are timed and their failures counted by the write entry
//!   point ([`proposal_committed`], [`proposal_failed`]); the failure
//!   counter exists at zero for every reason from the start
//!   ([`spawn_watcher`]), so that a rule over it has a series to read on
//!   a healthy node.
//! - Everything else is read from openraft's metrics watch by one task per
//!   node ([`spawn_watcher`]): term, applied index, leadership, whether a
//!   leader is known, elections started, leader changes, and on the leader
//!   each follower's lag (label `peer`, the node id). The task ends when
//!   Raft stops.

use std::time::Duration;

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use tern_protocol::TransportKind;
use tern_protocol::metric_names as names;
use tokio::task::JoinHandle;

use crate::service::RaftInstance;

/// Records one heartbeat round trip to follower `peer`.
pub fn heartbeat(transport: TransportKind, peer: u64, rtt: Duration) {
    ::metrics::histogram!(
        names::RAFT_HEARTBEAT_SECONDS,
        "transport" => transport.as_str(),
        "peer" => peer.to_string(),
    )
    .record(rtt.as_secs_f64());
}

/// Why a proposal was not committed: the `reason` label of
/// [`names::RAFT_PROPOSALS_FAILED`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProposalFailure {
    /// This node is not (or no longer) the leader.
    NotLeader,
    /// This node leads but its quorum lease stayed lapsed for two lease
    /// periods (no majority acknowledged it): a slow or cut-off majority.
    LeaseExpired,
    /// Raft refused it (a membership change in progress, and the like).
    RaftApi,
    /// Raft stopped (a fatal storage or internal error, or shutdown).
    Stopped,
}

impl ProposalFailure {
    /// Every reason, to register the counter at zero.
    pub const ALL: [ProposalFailure; 4] = [
        ProposalFailure::NotLeader,
        ProposalFailure::LeaseExpired,
        ProposalFailure::RaftApi,
        ProposalFailure::Stopped,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ProposalFailure::NotLeader => "not_leader",
            ProposalFailure::LeaseExpired => "lease_expired",
            ProposalFailure::RaftApi => "raft_api",
            ProposalFailure::Stopped => "stopped",
        }
    }
}

/// Records a committed proposal's latency (proposed until applied).
pub fn proposal_committed(elapsed: Duration) {
    ::metrics::histogram!(names::RAFT_PROPOSAL_SECONDS).record(elapsed.as_secs_f64());
}

/// Counts a proposal Raft did not commit.
pub fn proposal_failed(reason: ProposalFailure) {
    ::metrics::counter!(names::RAFT_PROPOSALS_FAILED, "reason" => reason.as_str()).increment(1);
}

/// Follows `raft`'s metrics until it stops, updating the gauges and
/// counting elections and leader changes.
pub fn spawn_watcher(raft: &RaftInstance) -> JoinHandle<()> {
    let mut rx = raft.metrics();
    for reason in ProposalFailure::ALL {
        ::metrics::counter!(names::RAFT_PROPOSALS_FAILED, "reason" => reason.as_str()).increment(0);
    }
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
                ::metrics::gauge!(names::RAFT_HAS_LEADER).set(if m.current_leader.is_some() {
                    1.0
                } else {
                    0.0
                });
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
