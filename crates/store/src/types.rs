//! The Raft type configuration of the whole project, and the node record
//! openraft replicates in its membership.
//!
//! Every crate that names an openraft type for Tern names it through
//! [`TypeConfig`] and the aliases here, so that bumping openraft touches the
//! three crates allowed to see it (`store`, `raft-net`, `node`).

use serde::{Deserialize, Serialize};
use tern_protocol::{PeerAddr, PeerId, TransportSet};

use crate::state::{Command, Response};

/// A node's id in the Raft group. Allocated by the state machine
/// ([`Command::AllocateNodeId`]) and never reused.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// Tern's Raft type configuration: `u64` node ids, [`Member`] nodes,
    /// [`Command`] writes and [`Response`] replies, on the tokio runtime.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = NodeId,
        Node = Member,
);

/// A log entry.
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
/// A log id: the leader that proposed an entry and its index.
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
/// A vote (term, candidate, committed).
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
/// Snapshot metadata: last included log id and membership.
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
/// The membership as last applied, with the log id that introduced it.
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
/// A membership configuration: voter sets and the nodes' records.
pub type Membership = openraft::Membership<NodeId, Member>;
/// openraft's storage error for this configuration.
pub type StorageError = openraft::StorageError<TypeConfig>;

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
