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
//! - Everything else is read from openraft's metrics by one task per
//!   node ([`spawn_watcher`]): term, leadership, whether a leader is
//!   known, elections started and leader changes as they change (the
//!   server metrics), the applied index and, on the leader, each
//!   follower's lag (label `peer`, the node id) every
//!   [`PROGRESS_GAUGES_EVERY`]. The task ends when Raft stops.
//!
//! # Counting elections
//!
//! openraft's metrics arrive on a watch channel, which keeps only the
//! latest value: a Candidate state that lasts one vote round trip (a
//! pre-vote already found a quorum) is usually never seen, so counting
//! entries into `Candidate` misses most elections. An election leaves a
//! trace that lasts, though: the node's persisted vote names itself at a
//! new term, and it stays so while the node is Candidate and, if it won,
//! Leader. [`ElectionCounter`] counts each term in which the node is seen
//! voting for itself as Candidate or Leader, once. A restarted node starts
//! counting after the vote it stored before ([`spawn_watcher`]'s
//! `stored_vote_term`): openraft restores a leader that restarts as leader
//! of the same term, which is not a new election.

use std::time::Duration;

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use openraft::vote::RaftLeaderId;
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

/// How often the applied index and the replication lag gauges are
/// updated. openraft's full metrics change with every entry; following
/// them woke this task (and formatted a label per peer) for every entry,
/// on every node. Role, term, leader and elections follow openraft's
/// server metrics, which change only with them, at once.
pub const PROGRESS_GAUGES_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Counts the elections this node started, from what its metrics show
/// (see the module docs): pure, so it is tested without a cluster.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ElectionCounter {
    /// The last term counted.
    counted: Option<u64>,
}

impl ElectionCounter {
    /// A counter for a node whose stored vote (read before Raft started)
    /// named itself at `stored_vote_term`, if it did: that term's election
    /// happened before this process and is not counted again.
    pub fn after(stored_vote_term: Option<u64>) -> ElectionCounter {
        ElectionCounter {
            counted: stored_vote_term,
        }
    }

    /// Observes one metrics value: this node's id, its vote (term and the
    /// node voted for) and its server state. True when it shows an
    /// election not counted before.
    pub fn observe(&mut self, me: u64, vote_term: u64, voted_for: u64, state: ServerState) -> bool {
        let campaigning = matches!(state, ServerState::Candidate | ServerState::Leader);
        if !campaigning || voted_for != me || self.counted.is_some_and(|t| t >= vote_term) {
            return false;
        }
        self.counted = Some(vote_term);
        true
    }
}

/// Follows `raft`'s metrics until it stops, updating the gauges and
/// counting elections and leader changes. `stored_vote_term` is the term
/// of the vote the store held for this node itself when Raft started (see
/// [`ElectionCounter::after`]).
pub fn spawn_watcher(raft: &RaftInstance, stored_vote_term: Option<u64>) -> JoinHandle<()> {
    let mut server = raft.server_metrics();
    let data = raft.data_metrics();
    for reason in ProposalFailure::ALL {
        ::metrics::counter!(names::RAFT_PROPOSALS_FAILED, "reason" => reason.as_str()).increment(0);
    }
    tokio::spawn(async move {
        let mut last_leader = None;
        let mut elections = ElectionCounter::after(stored_vote_term);
        let mut tick = tokio::time::interval(PROGRESS_GAUGES_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            {
                let m = server.borrow_watched();
                let vote = m.vote.leader_id();
                ::metrics::gauge!(names::RAFT_TERM).set(vote.term() as f64);
                let leading = m.state == ServerState::Leader;
                ::metrics::gauge!(names::RAFT_IS_LEADER).set(if leading { 1.0 } else { 0.0 });
                ::metrics::gauge!(names::RAFT_HAS_LEADER).set(if m.current_leader.is_some() {
                    1.0
                } else {
                    0.0
                });
                if elections.observe(m.id, vote.term(), *vote.node_id(), m.state) {
                    tracing::info!(term = vote.term(), "this node started an election");
                    ::metrics::counter!(names::RAFT_ELECTIONS).increment(1);
                }
                if m.current_leader != last_leader {
                    if m.current_leader.is_some() {
                        ::metrics::counter!(names::RAFT_LEADER_CHANGES).increment(1);
                    }
                    last_leader = m.current_leader;
                }
            }
            tokio::select! {
                changed = server.changed() => if changed.is_err() {
                    return;
                },
                _ = tick.tick() => {
                    let m = data.borrow_watched();
                    ::metrics::gauge!(names::RAFT_APPLIED_INDEX)
                        .set(m.last_applied.as_ref().map_or(0, |l| l.index) as f64);
                    if let (Some(replication), Some(last)) = (&m.replication, &m.last_log) {
                        for (peer, matched) in replication {
                            let lag = last
                                .index
                                .saturating_sub(matched.as_ref().map_or(0, |l| l.index));
                            ::metrics::gauge!(names::RAFT_REPLICATION_LAG, "peer" => peer.to_string())
                                .set(lag as f64);
                        }
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_election_is_counted_once_per_term_whatever_the_watch_shows() {
        let mut c = ElectionCounter::default();
        // Initialised as the first node: a vote for itself at term 0, not
        // yet leader.
        assert!(!c.observe(1, 0, 1, ServerState::Follower));
        // The Candidate state was coalesced away: first seen as Leader.
        assert!(c.observe(1, 1, 1, ServerState::Leader));
        assert!(!c.observe(1, 1, 1, ServerState::Leader));
        // Deposed, then a vote for another node: nothing.
        assert!(!c.observe(1, 2, 2, ServerState::Follower));
        // Its own campaign at term 3, lost and retried at term 4.
        assert!(c.observe(1, 3, 1, ServerState::Candidate));
        assert!(!c.observe(1, 3, 1, ServerState::Candidate));
        assert!(c.observe(1, 4, 1, ServerState::Candidate));
        assert!(!c.observe(1, 4, 1, ServerState::Leader));
    }

    #[test]
    fn a_vote_for_itself_from_before_a_restart_is_not_an_election() {
        let mut c = ElectionCounter::after(Some(7));
        assert!(!c.observe(2, 7, 2, ServerState::Learner));
        // openraft restores a restarted leader at its old term.
        assert!(!c.observe(2, 7, 2, ServerState::Leader));
        assert!(c.observe(2, 8, 2, ServerState::Candidate));
    }
}
