//! Status: who this node is, what it knows of the cluster (Raft role,
//! term, leader, membership with voter flags and capacities, commit and
//! applied index) and the transport policy in force with where it comes
//! from (the node's file, or the cluster's desired policy for it), every
//! member's desired policy and labels, its version and uptime. Served as
//! `Status/Get`.

use std::sync::{Arc, LazyLock};
use std::time::Instant;

use bytes::Bytes;
use prost::Message;
use tern_protocol::catalog::{Method, methods};
use tern_protocol::{
    BoxFuture, Handler, RequestContext, RouteError, Routes, ServiceId, Status, pb,
};
use tern_state::{ClusterState, Member, PolicySource};

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
            policy_source: self.node.policy_source(),
            desired: {
                let mut desired = Vec::new();
                // A state that cannot be read (Raft stopped) shows none.
                let _ = self
                    .consensus
                    .read(&mut |state| desired = desired_policies(state));
                desired
            },
            agents: {
                let ages = self.node.agent_heartbeat_ages();
                let mut agents = Vec::new();
                let _ = self
                    .consensus
                    .read(&mut |state| agents = agent_infos(state, &ages));
                agents
            },
            heartbeat_age_ms: self
                .node
                .heartbeat_age()
                .map_or(0, |age| u64::try_from(age.as_millis()).unwrap_or(u64::MAX)),
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
        RaftRole::Agent => pb::RaftRole::Agent,
    }
}

/// The agents of the state as `tern.v1.AgentInfo`, with the leader's
/// heartbeat ages where it has them.
pub fn agent_infos(
    state: &ClusterState,
    ages: &std::collections::BTreeMap<u64, std::time::Duration>,
) -> Vec<pb::AgentInfo> {
    state
        .agents()
        .iter()
        .map(|(id, a)| pb::AgentInfo {
            node_id: *id,
            address: Some(pb::PeerAddress::from(&a.addr)),
            capacity: Some(pb::Capacity {
                vcpus: a.capacity.vcpus,
                memory_mib: a.capacity.memory_mib,
            }),
            status: a.status.name().into(),
            since_unix_ms: a.since_unix_ms,
            heartbeat_age_ms: ages
                .get(id)
                .map_or(0, |age| u64::try_from(age.as_millis()).unwrap_or(u64::MAX)),
            vms: u32::try_from(state.assignment(*id).len()).unwrap_or(u32::MAX),
        })
        .collect()
}

/// Every node's desired transport policy (node > group > all), its
/// source and the node's labels, from the replicated state: servers and
/// agents.
pub fn desired_policies(state: &ClusterState) -> Vec<pb::NodePolicy> {
    state
        .node_ids_all()
        .iter()
        .map(|id| {
            let (policy, source) = match state.desired_policy(*id) {
                Some((p, source)) => (Some(p.to_pb()), source),
                None => (None, PolicySource::Default),
            };
            pb::NodePolicy {
                node_id: *id,
                policy,
                source: source.to_string(),
                labels: state
                    .node_labels()
                    .get(id)
                    .map(|l| l.clone().into_iter().collect())
                    .unwrap_or_default(),
            }
        })
        .collect()
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
        let result = ROUTES.route(method).and_then(|route| route(self, payload));
        Box::pin(std::future::ready(result))
    }
}

/// A Status method, served at once.
type Route = fn(&StatusService, Bytes) -> Result<Bytes, Status>;

static ROUTES: LazyLock<Routes<Route>> = LazyLock::new(|| {
    routes()
        .expect("the Status routes are valid (the `routes_cover_the_catalogue` test builds them)")
});

fn routes() -> Result<Routes<Route>, RouteError> {
    Routes::<Route>::new(ServiceId::Status).unary(methods::STATUS_GET, serve_get)
}

/// `Status/Get`.
fn serve_get(service: &StatusService, payload: Bytes) -> Result<Bytes, Status> {
    pb::StatusRequest::decode(payload)
        .map_err(|e| Status::invalid_argument(format!("undecodable StatusRequest: {e}")))
        .map(|_| service.get().encode_to_vec().into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn routes_cover_the_catalogue() {
        let routes = super::routes().expect("the routes are valid");
        let missing: Vec<String> = routes.missing().iter().map(|m| m.label()).collect();
        assert!(missing.is_empty(), "methods without a route: {missing:?}");
    }
}
