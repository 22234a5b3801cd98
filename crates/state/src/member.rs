//! Who is in the cluster: node ids, the member record openraft replicates
//! in its membership configuration, and what a node offers to VMs.

use serde::{Deserialize, Serialize};
use tern_protocol::{PeerAddr, PeerId, TransportSet};

/// A node's id in the Raft group. Allocated by the state machine
/// ([`crate::Command::AllocateNodeId`]) and never reused.
pub type NodeId = u64;

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
