//! A [`Consensus`] over a real single-node Raft: openraft started by
//! `tern_raft_net::RaftNode` on a sled store in a temporary directory.
//! This is the adapter a node writes (it lives here because `services`
//! itself names no openraft type).
#![allow(clippy::unwrap_used)] // reason: test support; a failure should fail the test loudly.
#![allow(dead_code)] // reason: each test binary uses a different constructor.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use openraft::errors::{ClientWriteError, RaftError};
use tern_protocol::{BoxFuture, PeerAddr, RpcClient};
use tern_raft_net::{RaftNode, RaftOptions, RaftServices};
use tern_services::consensus::{Consensus, ConsensusError, MemberStatus, RaftRole, RaftStatus};
use tern_state::{Capacity, ClusterState, Command, Member, Response};
use tokio::sync::watch;

/// How long a test waits for the single node to elect itself.
const ELECTION_BOUND: Duration = Duration::from_secs(30);

/// openraft behind the [`Consensus`] trait.
pub(crate) struct RaftConsensus {
    node: RaftNode,
    status: watch::Receiver<RaftStatus>,
}

impl RaftConsensus {
    /// Starts node 1 on a store in `dir`, initialises it as the only voter
    /// with `addr` and `capacity`, and waits until it leads. `client` is
    /// never called (a lone voter has no peers).
    pub(crate) async fn single_node(
        dir: &Path,
        addr: PeerAddr,
        capacity: Capacity,
        client: Arc<dyn RpcClient>,
    ) -> Arc<RaftConsensus> {
        Self::single_node_with(&RaftServices::new(None), dir, addr, capacity, client).await
    }

    /// As [`RaftConsensus::single_node`], attached to `services` (whose
    /// Raft and Cluster handlers then serve this node).
    pub(crate) async fn single_node_with(
        services: &RaftServices,
        dir: &Path,
        addr: PeerAddr,
        capacity: Capacity,
        client: Arc<dyn RpcClient>,
    ) -> Arc<RaftConsensus> {
        let (log, sm) = tern_store::open(dir).unwrap();
        let node = RaftNode::start(services, 1, log, sm, client, &RaftOptions::default())
            .await
            .unwrap();
        node.initialize(Member::new(addr, capacity)).await.unwrap();
        let mut metrics = node.raft().metrics();
        let (tx, mut status) = watch::channel(to_status(&metrics.borrow_watched()));
        tokio::spawn(async move {
            while metrics.changed().await.is_ok() {
                let s = to_status(&metrics.borrow_watched());
                if tx.send(s).is_err() {
                    return;
                }
            }
        });
        tokio::time::timeout(
            ELECTION_BOUND,
            status.wait_for(|s| s.role == RaftRole::Leader && s.applied_index >= s.commit_index),
        )
        .await
        .expect("the single node leads")
        .unwrap();
        Arc::new(RaftConsensus { node, status })
    }

    /// Stops Raft.
    pub(crate) async fn shutdown(self: Arc<Self>) {
        if let Ok(me) = Arc::try_unwrap(self) {
            me.node.shutdown().await.unwrap();
        }
    }
}

type Metrics = openraft::RaftMetrics<tern_store::TypeConfig>;

fn to_status(m: &Metrics) -> RaftStatus {
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
        failure: None,
    }
}

impl Consensus for RaftConsensus {
    fn write(&self, command: Command) -> BoxFuture<'_, Result<Response, ConsensusError>> {
        Box::pin(async move {
            match self.node.raft().client_write(command).await {
                Ok(written) => Ok(written.data),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    Err(ConsensusError::NotLeader {
                        leader: f.leader_id,
                    })
                }
                Err(e) => Err(ConsensusError::Unavailable {
                    reason: e.to_string(),
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
}
