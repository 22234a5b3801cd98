//! A test [`Consensus`]: applies commands to a real
//! [`tern_state::ClusterState`] in-process, as a single-node Raft would
//! after commit. It fakes only the layer below the services (replication),
//! never the state's logic: placement, deduplication and transitions are
//! the real `apply`.
//!
//! Several views may share one state, as the nodes of a cluster share one
//! replicated log. A [`Shared::view`] that is not the leader answers writes
//! with `NotLeader`, like a follower whose `Consensus` does not forward; a
//! [`Shared::forwarding_view`] applies them, like a follower whose
//! `Consensus` forwards writes to the leader (what a reconciler needs).
#![allow(clippy::unwrap_used)] // reason: test support; a failure should fail the test loudly.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tern_protocol::{BoxFuture, PeerAddr};
use tern_services::consensus::{Consensus, ConsensusError, MemberStatus, RaftRole, RaftStatus};
use tern_state::{Capacity, ClusterState, Command, Member, NodeId, Response};
use tokio::sync::watch;

/// The shared "replicated" state and log index.
pub(crate) struct Shared {
    state: Mutex<(ClusterState, u64)>,
    /// Every view's status watch, to publish new indexes to.
    watchers: Mutex<Vec<watch::Sender<RaftStatus>>>,
    leader: Mutex<Option<NodeId>>,
    /// The applied index, sent after every write (the state machine's
    /// change watch).
    changes: watch::Sender<u64>,
}

/// One node's view of the shared state.
pub(crate) struct TestConsensus {
    shared: Arc<Shared>,
    node_id: NodeId,
    forwards: bool,
    status: watch::Sender<RaftStatus>,
}

impl Shared {
    /// An empty cluster whose leader is `leader`.
    pub(crate) fn new(leader: NodeId) -> Arc<Shared> {
        Arc::new(Shared {
            state: Mutex::new((ClusterState::default(), 0)),
            watchers: Mutex::new(Vec::new()),
            leader: Mutex::new(Some(leader)),
            changes: watch::channel(0).0,
        })
    }

    /// Applies a membership of `members` (node id, address, capacity), all
    /// voters.
    pub(crate) fn set_members(&self, members: &[(NodeId, PeerAddr, Capacity)]) {
        let nodes: BTreeMap<NodeId, Member> = members
            .iter()
            .map(|(id, addr, cap)| (*id, Member::new(addr.clone(), *cap)))
            .collect();
        {
            let mut guard = self.state.lock().unwrap();
            guard.0.apply_membership(&nodes);
            guard.1 += 1;
        }
        self.publish();
    }

    /// Sets (or clears) the leader every view reports.
    pub(crate) fn set_leader(&self, leader: Option<NodeId>) {
        *self.leader.lock().unwrap() = leader;
        self.publish();
    }

    /// Makes every view report that Raft stopped on `failure` (what the
    /// node's consensus reports after a failed log write).
    pub(crate) fn fail_raft(&self, failure: &str) {
        for tx in self.watchers.lock().unwrap().iter() {
            tx.send_modify(|s| {
                s.role = RaftRole::Shutdown;
                s.failure = Some(failure.to_owned());
            });
        }
    }

    /// A copy of the state.
    pub(crate) fn state(&self) -> ClusterState {
        self.state.lock().unwrap().0.clone()
    }

    fn publish(&self) {
        let (state, index) = {
            let guard = self.state.lock().unwrap();
            (guard.0.clone(), guard.1)
        };
        self.changes.send_replace(index);
        let leader = *self.leader.lock().unwrap();
        let members: Vec<MemberStatus> = state
            .members()
            .iter()
            .map(|(id, m)| MemberStatus {
                node_id: *id,
                member: m.clone(),
                voter: true,
            })
            .collect();
        for tx in self.watchers.lock().unwrap().iter() {
            tx.send_modify(|s| {
                s.role = if leader == Some(s.node_id) {
                    RaftRole::Leader
                } else {
                    RaftRole::Follower
                };
                s.term = 1;
                s.leader_id = leader;
                s.members = members.clone();
                s.commit_index = index;
                s.applied_index = index;
            });
        }
    }

    /// A view for node `node_id` that does not forward writes.
    pub(crate) fn view(self: &Arc<Self>, node_id: NodeId) -> Arc<TestConsensus> {
        self.make_view(node_id, false)
    }

    /// A view for node `node_id` whose writes reach the leader even when
    /// it is a follower.
    pub(crate) fn forwarding_view(self: &Arc<Self>, node_id: NodeId) -> Arc<TestConsensus> {
        self.make_view(node_id, true)
    }

    fn make_view(self: &Arc<Self>, node_id: NodeId, forwards: bool) -> Arc<TestConsensus> {
        let (tx, _) = watch::channel(RaftStatus {
            node_id,
            ..RaftStatus::default()
        });
        self.watchers.lock().unwrap().push(tx.clone());
        self.publish();
        Arc::new(TestConsensus {
            shared: self.clone(),
            node_id,
            forwards,
            status: tx,
        })
    }
}

impl Consensus for TestConsensus {
    fn write(&self, command: Command) -> BoxFuture<'_, Result<Response, ConsensusError>> {
        Box::pin(async move {
            let leader = *self.shared.leader.lock().unwrap();
            if leader.is_none() || (leader != Some(self.node_id) && !self.forwards) {
                return Err(ConsensusError::NotLeader { leader });
            }
            let response = {
                let mut guard = self.shared.state.lock().unwrap();
                guard.1 += 1;
                let index = guard.1;
                guard.0.apply_at(index, command)
            };
            self.shared.publish();
            Ok(response)
        })
    }

    fn read(&self, read: &mut dyn FnMut(&ClusterState)) -> Result<(), ConsensusError> {
        let guard = self.shared.state.lock().unwrap();
        read(&guard.0);
        Ok(())
    }

    fn status(&self) -> watch::Receiver<RaftStatus> {
        self.status.subscribe()
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }
}
