//! Who is in the cluster: node ids, the member record openraft replicates
//! in its membership configuration, and what a node offers to VMs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tern_protocol::{PeerAddr, PeerId, TransportSet};

use crate::command::{Rejection, Response};
use crate::state::ClusterState;

/// A node's id in the Raft group. Allocated by the state machine
/// ([`crate::Command::AllocateNodeId`]) and never reused.
pub type NodeId = u64;

/// The first node id handed out. 0 is never a node id, so that an unset
/// protobuf field (0) never names a node.
pub const FIRST_NODE_ID: NodeId = 1;

/// What a node offers to VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Capacity {
    /// Virtual CPUs available to VMs.
    pub vcpus: u32,
    /// Memory available to VMs, in MiB.
    pub memory_mib: u64,
}

/// A cluster member as openraft replicates it in the membership
/// configuration: who it is (its Ed25519 key, the iroh `EndpointId`), how to
/// reach it over each transport it serves, and its capacity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    /// Identity and addresses. A transport is served exactly when its
    /// address is present.
    pub addr: PeerAddr,
    /// Resources the node offers.
    pub capacity: Capacity,
}

impl Member {
    /// A member record.
    pub fn new(addr: PeerAddr, capacity: Capacity) -> Member {
        Member { addr, capacity }
    }

    /// The member's identity.
    pub fn peer_id(&self) -> PeerId {
        self.addr.id
    }

    /// The transports the member serves.
    pub fn transports(&self) -> TransportSet {
        self.addr.transports()
    }
}

/// The placeholder member: an all-zero identity with no address and no
/// capacity. openraft fills in a default node when a membership is built
/// from bare ids (its storage test suite does); no real node has this
/// identity, and it serves no transport, so it can never be dialled.
impl Default for Member {
    fn default() -> Self {
        Member {
            addr: PeerAddr::new(PeerId::from_bytes([0; 32])),
            capacity: Capacity::default(),
        }
    }
}

impl ClusterState {
    pub(crate) fn allocate_node_id(&mut self, peer: PeerId) -> Response {
        if let Some(id) = self.node_ids.get(&peer) {
            return Response::NodeId(*id);
        }
        let id = self.next_node_id;
        let Some(next) = id.checked_add(1) else {
            return Response::Rejected(Rejection::NodeIdsExhausted);
        };
        self.next_node_id = next;
        self.node_ids.insert(peer, id);
        Response::NodeId(id)
    }

    /// Records a newly applied membership: its nodes become the members.
    /// Nodes that were members and are no longer give up their node id for
    /// good, unless they are being demoted (they have an agent record,
    /// [`crate::Command::DemoteServer`]): those stay nodes of the cluster
    /// as agents, with their id, labels and VMs. Ids seen in a membership
    /// are never handed out again. A node that enters the membership
    /// holding an agent record (an agent that joined as a server) is no
    /// agent any more; one that was a member already keeps its record (a
    /// demotion under way). `nodes` are the membership's nodes, voters
    /// and learners (openraft's `Membership::nodes()`).
    pub fn apply_membership<'a>(
        &mut self,
        nodes: impl IntoIterator<Item = (&'a NodeId, &'a Member)>,
    ) {
        let members: BTreeMap<NodeId, Member> = nodes
            .into_iter()
            .map(|(id, member)| (*id, member.clone()))
            .collect();
        for (id, old) in &self.members {
            let demoted = self.agents.contains_key(id);
            if !members.contains_key(id)
                && !demoted
                && self.node_ids.get(&old.peer_id()) == Some(id)
            {
                self.node_ids.remove(&old.peer_id());
            }
        }
        for (id, member) in &members {
            self.node_ids.insert(member.peer_id(), *id);
            if *id >= self.next_node_id {
                self.next_node_id = id.saturating_add(1);
            }
            // An agent that joined as a server (its role changed in its
            // config) keeps its id and its VMs; it is no agent any more.
            if !self.members.contains_key(id) {
                self.agents.remove(id);
            }
        }
        self.members = members;
        self.forget_departed();
        self.marks.everyone();
    }

    /// Current members by node id.
    pub fn members(&self) -> &BTreeMap<NodeId, Member> {
        &self.members
    }

    /// The node id held by a peer, if any.
    pub fn node_id_of(&self, peer: &PeerId) -> Option<NodeId> {
        self.node_ids.get(peer).copied()
    }

    /// Whether `key` is the key of a current member (voter or learner).
    pub fn is_member_key(&self, key: &PeerId) -> bool {
        self.members.values().any(|m| m.peer_id() == *key)
    }
}
