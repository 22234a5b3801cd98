//! [`RaftConsensus`]: the services' [`Consensus`] trait over a running
//! [`RaftNode`], so that no service names openraft.
//!
//! Writes go through [`RaftNode::client_write`], which checks the write
//! limits before proposing (a write over them is
//! [`ConsensusError::TooLarge`]). On a follower they are sent to the
//! leader with `Raft/Propose` (through the node's router and the one
//! `tern_protocol::forward::forward_to_leader`), so a follower's
//! reconciler reports and the VM writes its VM service accepted land
//! wherever they start (the leader commits only those, see
//! `tern_raft_net::check_proposal`); a command carries a request id, so a
//! retried forward is applied once. With no leader known, or when the leader changed mid-way, the
//! write answers [`ConsensusError::NotLeader`]. The status watch is fed
//! from openraft's metrics by a task that ends when Raft stops: a change
//! of role, term, leader or membership at once, the commit and applied
//! indexes and the running state every [`STATUS_PROGRESS_EVERY`].

use std::sync::Arc;

use crate::node::{RaftNode, WriteError};
use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use openraft::errors::{ClientWriteError, Fatal, ForwardReason, RaftError};
use tern_protocol::catalog::methods;
use tern_protocol::forward::{Leader, forward_to_leader};
use tern_protocol::{BoxFuture, Code, RpcClient};
use tern_services::consensus::{Consensus, ConsensusError, MemberStatus, RaftRole, RaftStatus};
use tern_state::{ClusterState, Command, Response};
use tokio::sync::watch;

/// openraft behind the [`Consensus`] trait.
pub struct RaftConsensus {
    node: Arc<RaftNode>,
    client: Arc<dyn RpcClient>,
    status: watch::Receiver<RaftStatus>,
}

impl std::fmt::Debug for RaftConsensus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftConsensus")
            .field("node", &self.node.id())
            .finish_non_exhaustive()
    }
}

type Metrics = openraft::RaftMetrics<tern_store::TypeConfig>;

/// How often the status watch follows the commit and applied indexes and
/// the running state. openraft's metrics change with every entry (several
/// times per entry on the leader), and every status update wakes the
/// health publisher and the reconciler (a pass over this node's VMs):
/// following the indexes at once put that on every commit of every node,
/// and following the metrics at all woke this task as often. It follows
/// openraft's server metrics instead (role, term, leader, membership),
/// passed on at once, and looks at the rest on this tick.
pub const STATUS_PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

/// Raft's metrics as the services' [`RaftStatus`].
pub fn to_status(m: &Metrics) -> RaftStatus {
    let membership = m.membership_config.membership();
    let voters: Vec<u64> = membership.voter_ids().collect();
    RaftStatus {
        node_id: m.id,
        role: match m.state {
            ServerState::Leader => RaftRole::Leader,
            ServerState::Follower => RaftRole::Follower,
            ServerState::Candidate => RaftRole::Candidate,
            ServerState::Learner => RaftRole::Learner,
            ServerState::Shutdown => RaftRole::Shutdown,
        },
        term: m.current_term,
        leader_id: m.current_leader,
        members: membership
            .nodes()
            .map(|(id, member)| MemberStatus {
                node_id: *id,
                member: member.clone(),
                voter: voters.contains(id),
            })
            .collect(),
        commit_index: m.local_committed.as_ref().map_or(0, |l| l.index),
        applied_index: m.last_applied.as_ref().map_or(0, |l| l.index),
        failure: match &m.running_state {
            Ok(()) | Err(Fatal::Stopped) => None,
            Err(e) => Some(e.to_string()),
        },
    }
}

impl RaftConsensus {
    /// The adapter over `node`, forwarding a follower's writes through
    /// `client` (the node's router, calling as the node); spawns the task
    /// that mirrors Raft's metrics into the status watch.
    pub fn new(node: Arc<RaftNode>, client: Arc<dyn RpcClient>) -> Arc<RaftConsensus> {
        let metrics = node.raft().metrics();
        let mut server = node.raft().server_metrics();
        let (tx, status) = watch::channel(to_status(&metrics.borrow_watched()));
        tokio::spawn(async move {
            let mut shown = to_status(&metrics.borrow_watched());
            let mut tick = tokio::time::interval(STATUS_PROGRESS_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                // The server metrics change with the role, term, leader
                // and membership only: those are passed on at once; the
                // indexes and the running state on the next tick.
                tokio::select! {
                    changed = server.changed() => if changed.is_err() {
                        // Raft has stopped: its last state, then the end.
                        let _ = tx.send(to_status(&metrics.borrow_watched()));
                        return;
                    },
                    _ = tick.tick() => {}
                }
                let s = to_status(&metrics.borrow_watched());
                if s != shown {
                    if tx.send(s.clone()).is_err() {
                        return;
                    }
                    shown = s;
                }
            }
        });
        Arc::new(RaftConsensus {
            node,
            client,
            status,
        })
    }
}

impl RaftConsensus {
    /// Proposes `command` at `leader` on this member's behalf
    /// (`Raft/Propose`), through the one forward to the leader
    /// ([`forward_to_leader`], [`tern_protocol::forward::FORWARD_TIMEOUT`]).
    async fn forward(
        &self,
        leader: &Leader,
        command: &Command,
    ) -> Result<Response, ConsensusError> {
        let unavailable = |why: String| ConsensusError::Unavailable {
            reason: format!("forwarding to the leader (node {}): {why}", leader.id),
        };
        let payload = tern_raft_net::wire::wrap(command)
            .map_err(|e| unavailable(format!("cannot encode the command: {e}")))?;
        match forward_to_leader(
            self.client.as_ref(),
            leader,
            None,
            methods::RAFT_PROPOSE,
            payload,
        )
        .await
        {
            Ok(bytes) => tern_raft_net::wire::unwrap::<Response>(bytes)
                .map_err(|e| unavailable(format!("undecodable propose response: {e}"))),
            // Leadership moved while the write travelled.
            Err(s) if s.code == Code::FailedPrecondition => {
                Err(ConsensusError::NotLeader { leader: None })
            }
            Err(s) => Err(unavailable(s.to_string())),
        }
    }
}

impl Consensus for RaftConsensus {
    fn write(&self, command: Command) -> BoxFuture<'_, Result<Response, ConsensusError>> {
        Box::pin(async move {
            let command_copy = command.clone();
            match self.node.client_write(command).await {
                Ok(written) => Ok(written.data),
                Err(WriteError::Limit(e)) => Err(ConsensusError::TooLarge(e)),
                Err(WriteError::Raft(RaftError::APIError(ClientWriteError::ForwardToLeader(
                    f,
                )))) if f.reason != ForwardReason::LeaseExpired => {
                    let (Some(id), Some(member)) = (f.leader_id, &f.leader_node) else {
                        return Err(ConsensusError::NotLeader {
                            leader: f.leader_id,
                        });
                    };
                    let leader = Leader {
                        id,
                        addr: member.addr.clone(),
                    };
                    self.forward(&leader, &command_copy).await
                }
                // Raft stopped, or the leader's lease stayed lapsed: said
                // as the Propose handler says it.
                Err(WriteError::Raft(e)) => Err(ConsensusError::Unavailable {
                    reason: tern_raft_net::write::write_error(e).message,
                }),
            }
        })
    }

    fn read(&self, read: &mut dyn FnMut(&ClusterState)) -> Result<(), ConsensusError> {
        self.node
            .state()
            .read(|s| read(s))
            .map_err(|e| ConsensusError::Unavailable {
                reason: e.to_string(),
            })
    }

    fn status(&self) -> watch::Receiver<RaftStatus> {
        self.status.clone()
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.node.state().changes()
    }
}
