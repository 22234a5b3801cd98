//! A single-node Raft for the services' tests: [`tern_cluster::RaftNode`]
//! on a sled store in a temporary directory, initialised as the only voter,
//! behind the node's own [`tern_cluster::RaftConsensus`] adapter.
#![allow(clippy::unwrap_used)] // reason: test support; a failure should fail the test loudly.
#![allow(dead_code)] // reason: each test binary uses a different constructor.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tern_cluster::{RaftNode, RaftOptions, RaftServices};
use tern_protocol::{PeerAddr, RpcClient};
use tern_services::consensus::{Consensus, RaftRole};
use tern_state::{Capacity, Member};

/// How long a test waits for the single node to elect itself.
const ELECTION_BOUND: Duration = Duration::from_secs(30);

/// A running single-node Raft and the adapter the services use.
pub(crate) struct SingleNode {
    node: Arc<RaftNode>,
    /// The services' view of it.
    pub(crate) consensus: Arc<tern_cluster::RaftConsensus>,
}

impl SingleNode {
    /// Starts node 1 on a store in `dir`, initialises it as the only voter
    /// with `addr` and `capacity`, and waits until it leads. `client` is
    /// never called (a lone voter has no peers).
    pub(crate) async fn start(
        dir: &Path,
        addr: PeerAddr,
        capacity: Capacity,
        client: Arc<dyn RpcClient>,
    ) -> SingleNode {
        Self::start_with(&RaftServices::new(None), dir, addr, capacity, client).await
    }

    /// As [`SingleNode::start`], attached to `services` (whose Raft and
    /// Cluster handlers then serve this node).
    pub(crate) async fn start_with(
        services: &RaftServices,
        dir: &Path,
        addr: PeerAddr,
        capacity: Capacity,
        client: Arc<dyn RpcClient>,
    ) -> SingleNode {
        let (log, sm) = tern_store::open(dir).unwrap();
        let node = RaftNode::start(
            services,
            1,
            log,
            sm,
            client.clone(),
            &RaftOptions::default(),
        )
        .await
        .unwrap();
        node.initialize(Member::new(addr, capacity)).await.unwrap();
        let node = Arc::new(node);
        let consensus = tern_cluster::RaftConsensus::new(node.clone(), client);
        let mut status = consensus.status();
        tokio::time::timeout(
            ELECTION_BOUND,
            status.wait_for(|s| s.role == RaftRole::Leader && s.applied_index >= s.commit_index),
        )
        .await
        .expect("the single node leads")
        .unwrap();
        SingleNode { node, consensus }
    }

    /// Stops Raft.
    pub(crate) async fn shutdown(self) {
        let SingleNode { node, consensus } = self;
        drop(consensus);
        if let Ok(node) = Arc::try_unwrap(node) {
            node.shutdown().await.unwrap();
        }
    }
}
