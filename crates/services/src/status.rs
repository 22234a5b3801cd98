//! Status: who this node is, what it knows of the cluster (Raft role,
//! term, leader, membership with voter flags and capacities, commit and
//! applied index) and the transport policy in force, with its version and
//! uptime. Served as `Status/Get`.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use prost::Message;
use tern_protocol::catalog::Method;
use tern_protocol::{BoxFuture, Handler, RequestContext, Status, pb};
use tern_state::Member;

use crate::consensus::{Consensus, RaftRole};
use crate::node_info::NodeInfo;

/// The Status service.
pub struct StatusService {
    consensus: Arc<dyn Consensus>,
    node: Arc<dyn NodeInfo>,
}

impl StatusService {
    /// Status over this node's Raft and facts.
    pub fn new(consensus: Arc<dyn Consensus>, node: Arc<dyn NodeInfo>) -> Arc<StatusService> {
        Arc::new(StatusService { consensus, node })
    }

    /// The node's status now.
    pub fn get(&self) -> pb::NodeStatus {
        let raft = self.consensus.current_status();
        let uptime = Instant::now().saturating_duration_since(self.node.started());
        pb::NodeStatus {
            node_id: raft.node_id,
            address: Some(self.node.address()),
            role: role(raft.role) as i32,
            term: raft.term,
            leader_id: raft.leader_id.unwrap_or(0),
            members: raft
                .members
                .iter()
                .map(|m| pb_member(m.node_id, &m.member, m.voter))
                .collect(),
            applied_index: raft.applied_index,
            commit_index: raft.commit_index,
            policy: Some(self.node.policy()),
            version: self.node.version(),
            uptime_ms: u64::try_from(uptime.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// The `Status` service handler.
    pub fn handler(self: &Arc<Self>) -> Arc<dyn Handler> {
        self.clone()
    }
}

fn role(role: RaftRole) -> pb::RaftRole {
    match role {
        RaftRole::Leader => pb::RaftRole::Leader,
        RaftRole::Follower => pb::RaftRole::Follower,
        RaftRole::Candidate => pb::RaftRole::Candidate,
        RaftRole::Learner => pb::RaftRole::Learner,
        RaftRole::Shutdown => pb::RaftRole::Shutdown,
    }
}

/// A member as `tern.v1.Member`.
pub fn pb_member(node_id: u64, member: &Member, voter: bool) -> pb::Member {
    pb::Member {
        node_id,
        address: Some(pb::PeerAddress::from(&member.addr)),
        voter,
        capacity: Some(pb::Capacity {
            vcpus: member.capacity.vcpus,
            memory_mib: member.capacity.memory_mib,
        }),
    }
}

impl Handler for StatusService {
    fn handle(
        &self,
        _ctx: RequestContext,
        method: &'static Method,
        payload: Bytes,
    ) -> BoxFuture<'static, Result<Bytes, Status>> {
        let result = if method == tern_protocol::catalog::methods::STATUS_GET {
            pb::StatusRequest::decode(payload)
                .map_err(|e| Status::invalid_argument(format!("undecodable StatusRequest: {e}")))
                .map(|_| self.get().encode_to_vec().into())
        } else {
            Err(Status::unimplemented(format!(
                "{} is not served by the Status service",
                method.label()
            )))
        };
        Box::pin(std::future::ready(result))
    }
}
