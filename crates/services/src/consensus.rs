//! What the services need from Raft, as a trait the node implements over
//! its openraft instance, so that no service names openraft.
//!
//! [`Consensus`] is three things: proposing a [`Command`] (every VM change
//! and every reconciler report is one), reading the applied
//! [`ClusterState`], and a watch of [`RaftStatus`] (role, term, leader,
//! membership, commit and applied index) that the Health and Status
//! services read and the reconciler wakes on.

use std::time::Duration;

use tern_protocol::BoxFuture;
use tern_state::limits::LimitError;
use tern_state::{ClusterState, Command, Member, NodeId, Response};
use tokio::sync::watch;

/// A node counts as caught up (ready, and allowed to reconcile) while its
/// applied index is at most this many entries behind the leader's commit
/// index as it knows it. A healthy follower is a heartbeat's worth of
/// entries behind at most; a node replaying a long log or a snapshot is
/// far more, and must not act on a state that old.
pub const MAX_APPLY_LAG: u64 = 64;

/// The Raft role of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RaftRole {
    /// Proposes and commits writes.
    Leader,
    /// A voter following a leader.
    #[default]
    Follower,
    /// A voter asking for votes.
    Candidate,
    /// A non-voting member catching up.
    Learner,
    /// Raft has stopped on this node.
    Shutdown,
    /// Not a Raft member: an agent, which runs the VMs placed on it and
    /// follows the servers. Its "leader" is the servers' leader as its
    /// last acknowledged heartbeat named it.
    Agent,
}

/// One member of the current membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    /// Its node id.
    pub node_id: NodeId,
    /// Its identity, addresses and declared capacity.
    pub member: Member,
    /// Whether it votes (false for a learner).
    pub voter: bool,
}

/// What this node's Raft reports about itself, as of the last change.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RaftStatus {
    /// This node's id.
    pub node_id: NodeId,
    /// Its role.
    pub role: RaftRole,
    /// Its current term.
    pub term: u64,
    /// The leader it knows of, if any.
    pub leader_id: Option<NodeId>,
    /// The membership it has applied, sorted by node id.
    pub members: Vec<MemberStatus>,
    /// The highest log index it knows to be committed (the leader's commit
    /// index as last heard from the leader).
    pub commit_index: u64,
    /// The highest log index applied to its state machine.
    pub applied_index: u64,
    /// Why Raft stopped on its own (a storage failure), if it did: the
    /// node is then not live, and exits.
    pub failure: Option<String>,
}

impl RaftStatus {
    /// Entries committed but not yet applied here.
    pub fn apply_lag(&self) -> u64 {
        self.commit_index.saturating_sub(self.applied_index)
    }

    /// Whether a leader is known and this node has applied up to within
    /// `max_lag` entries of its commit index: the readiness rule, and the
    /// condition for a reconciler to act on the state.
    pub fn is_caught_up(&self, max_lag: u64) -> bool {
        self.leader_id.is_some() && self.role != RaftRole::Shutdown && self.apply_lag() <= max_lag
    }

    /// Why [`RaftStatus::is_caught_up`] is false, in words (empty when it
    /// is true).
    pub fn lag_reason(&self, max_lag: u64) -> String {
        if let Some(failure) = &self.failure {
            format!("Raft has stopped on a failure and the node is exiting: {failure}")
        } else if self.role == RaftRole::Shutdown {
            "Raft has shut down on this node".into()
        } else if self.leader_id.is_none() {
            format!("no Raft leader is known (term {})", self.term)
        } else if self.apply_lag() > max_lag {
            format!(
                "applied index {} is {} entries behind commit index {} (bound {max_lag})",
                self.applied_index,
                self.apply_lag(),
                self.commit_index
            )
        } else {
            String::new()
        }
    }
}

/// Why a write did not reach the replicated log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConsensusError {
    /// This node is not the leader and did not forward the write; it was
    /// not applied. `leader` is the leader this node knows of, if any.
    #[error("this node is not the Raft leader{}", match leader { Some(id) => format!(" (the leader is node {id})"), None => " and no leader is known".into() })]
    NotLeader {
        /// The current leader, if known.
        leader: Option<NodeId>,
    },
    /// The command is over a size limit and was not proposed (see
    /// `tern_state::limits`); retrying it as is cannot succeed.
    #[error("{0}")]
    TooLarge(LimitError),
    /// Raft cannot take writes now (no quorum, shutting down, storage
    /// failure). The write may or may not be applied later; retry with the
    /// same request id.
    #[error("Raft is unavailable: {reason}")]
    Unavailable {
        /// Why.
        reason: String,
    },
}

/// Raft as the services see it. The node implements it over its openraft
/// instance and state machine.
///
/// # Contract
///
/// - [`write`](Consensus::write) proposes `command` and returns the state
///   machine's [`Response`] once it is committed and applied on this node
///   (a refusal by the state is `Ok(Response::Rejected(..))`, not an
///   error). Commands are deduplicated by request id in the state, so a
///   write may be retried with the same command after any error but
///   [`ConsensusError::TooLarge`] (a write over the limits of
///   `tern_state::limits`, refused before it is proposed). On a
///   follower, an implementation either forwards the command to the
///   leader or answers [`ConsensusError::NotLeader`]; the VM service then
///   forwards the client's call itself (see [`crate::vm`]), and the
///   reconciler retries later. The future must finish within a bound the
///   implementation names (openraft's client write is bounded by its
///   election timeouts; wrap it in a timeout).
/// - [`read`](Consensus::read) runs `read` on the state as applied on this
///   node: possibly behind the leader by [`RaftStatus::apply_lag`]. It must
///   not block on the network.
/// - [`status`](Consensus::status) is a watch that changes whenever the
///   role, term, leader, membership, commit or applied index changes. Over
///   openraft's metrics it may trail the state machine's last apply until
///   the next Raft event (seen in tests), which [`MAX_APPLY_LAG`] absorbs;
///   code that needs the newest state reads it with `read`.
/// - [`changes`](Consensus::changes) is a watch that changes after every
///   batch of entries applied on this node and after a snapshot install
///   (its value is the last applied log index): readers that follow the
///   state, like a VM watch, wait on it and then `read`. A wake-up may
///   bring nothing new; a change is never missed by a receiver that reads
///   the state after it last woke.
pub trait Consensus: Send + Sync + 'static {
    /// Proposes a command; answers once it is applied here.
    fn write(&self, command: Command) -> BoxFuture<'_, Result<Response, ConsensusError>>;

    /// Runs `read` on the applied state.
    fn read(&self, read: &mut dyn FnMut(&ClusterState)) -> Result<(), ConsensusError>;

    /// This node's Raft status, as a watch.
    fn status(&self) -> watch::Receiver<RaftStatus>;

    /// A watch that changes whenever the applied state may have changed.
    fn changes(&self) -> watch::Receiver<u64>;
}

impl dyn Consensus {
    /// Reads a value out of the applied state.
    pub fn query<R>(&self, f: impl FnOnce(&ClusterState) -> R) -> Result<R, ConsensusError> {
        let mut f = Some(f);
        let mut out = None;
        self.read(&mut |state| {
            if let Some(f) = f.take() {
                out = Some(f(state));
            }
        })?;
        out.ok_or_else(|| ConsensusError::Unavailable {
            reason: "the state was not read".into(),
        })
    }

    /// The current Raft status.
    pub fn current_status(&self) -> RaftStatus {
        self.status().borrow().clone()
    }
}

/// How long a service waits for one write before answering `Unavailable`:
/// longer than an election (so a write survives a leader change) and well
/// inside the default call timeout.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(8);

/// [`Consensus::write`] bounded by [`WRITE_TIMEOUT`].
pub async fn write_bounded(
    consensus: &dyn Consensus,
    command: Command,
) -> Result<Response, ConsensusError> {
    match tokio::time::timeout(WRITE_TIMEOUT, consensus.write(command)).await {
        Ok(result) => result,
        Err(_) => Err(ConsensusError::Unavailable {
            reason: format!(
                "the write was not applied within {WRITE_TIMEOUT:?}; retry with the same request id"
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caught_up_needs_a_leader_and_a_small_lag() {
        let mut s = RaftStatus {
            node_id: 1,
            commit_index: 100,
            applied_index: 100 - MAX_APPLY_LAG,
            ..RaftStatus::default()
        };
        assert!(!s.is_caught_up(MAX_APPLY_LAG));
        assert!(s.lag_reason(MAX_APPLY_LAG).contains("no Raft leader"));
        s.leader_id = Some(2);
        assert!(s.is_caught_up(MAX_APPLY_LAG));
        assert_eq!(s.lag_reason(MAX_APPLY_LAG), "");
        s.applied_index -= 1;
        assert!(!s.is_caught_up(MAX_APPLY_LAG));
        assert!(s.lag_reason(MAX_APPLY_LAG).contains("behind"));
        s.role = RaftRole::Shutdown;
        assert!(s.lag_reason(MAX_APPLY_LAG).contains("shut down"));
    }
}
