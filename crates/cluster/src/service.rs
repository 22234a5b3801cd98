//! The `Cluster` service (join, leave, members, the metadata register,
//! the access table, the desired transport policies, the rollout) and [`RaftServices`], the node's two Raft-side
//! services (this one and `tern-raft-net`'s `Raft` service) registered and
//! attached together.

use std::collections::BTreeSet;
use std::sync::{Arc, LazyLock, Mutex};

use bytes::Bytes;
use prost::Message;
use tern_protocol::catalog::methods;
use tern_protocol::{
    BoxFuture, Dispatcher, Handler, Method, PeerId, RequestContext, RouteError, Routes, ServiceId,
    Status, StreamReceiver, StreamSender,
};
use tern_raft_net::service::within_deadline;
use tern_raft_net::{Attached, RaftService};
use tern_state::NodeId;

use crate::admission::{Admission, FailedJoins};
use crate::agents::{AgentSettings, AgentTracker};
use crate::membership::{JoinToken, join, leave, members_response};

/// What the Cluster handlers share: the Raft service (for the attached
/// node), the admission settings, failed join attempts and the promotions
/// under way.
pub(crate) struct ClusterShared {
    pub(crate) raft: RaftService,
    pub(crate) admission: Admission,
    pub(crate) failed_joins: FailedJoins,
    pub(crate) promoting: Mutex<BTreeSet<NodeId>>,
    /// Held through one demotion on this leader, so that two demotions
    /// at once cannot both pass the check of the voters left.
    pub(crate) demoting: tokio::sync::Mutex<()>,
    /// When the leader last recorded each member's new addresses (see
    /// [`crate::address::MIN_RECORDED_GAP`]).
    pub(crate) address_updates: Mutex<std::collections::BTreeMap<NodeId, tokio::time::Instant>>,
    /// The agents' heartbeat settings.
    pub(crate) agent_settings: AgentSettings,
    /// When the leader last heard each agent.
    pub(crate) agents: AgentTracker,
    /// The assignment streams this server wakes.
    pub(crate) assignments: crate::assignments::AssignmentHub,
    /// The agents' heartbeats this server takes as a follower.
    pub(crate) relay: crate::relay::HeartbeatRelay,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// The Raft and Cluster services of one node. Cloning is cheap and clones
/// share everything.
#[derive(Clone)]
pub struct RaftServices {
    shared: Arc<ClusterShared>,
}

impl std::fmt::Debug for RaftServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftServices")
            .field("attached", &self.shared.raft.attached().map(|a| a.id))
            .field("admission", &self.shared.admission)
            .finish_non_exhaustive()
    }
}

impl RaftServices {
    /// The state the Cluster handler shares, owned (for this crate's
    /// tests).
    #[cfg(test)]
    pub(crate) fn shared_arc(&self) -> Arc<ClusterShared> {
        self.shared.clone()
    }

    /// The state the Cluster handler shares.
    pub(crate) fn shared(&self) -> &ClusterShared {
        &self.shared
    }

    /// Services that accept joins with the cluster's join tokens and, if
    /// given, the static `join_token`; with the default [`Admission`]
    /// otherwise.
    pub fn new(join_token: Option<JoinToken>) -> RaftServices {
        RaftServices::with_admission(Admission {
            static_token: join_token,
            ..Admission::default()
        })
    }

    /// Services that admit joiners as `admission` says.
    pub fn with_admission(admission: Admission) -> RaftServices {
        RaftServices::with_settings(admission, AgentSettings::default())
    }

    /// Services that admit joiners as `admission` says and judge agents
    /// by `agents`.
    pub fn with_settings(admission: Admission, agents: AgentSettings) -> RaftServices {
        RaftServices {
            shared: Arc::new(ClusterShared {
                raft: RaftService::new(),
                admission,
                failed_joins: FailedJoins::default(),
                promoting: Mutex::new(BTreeSet::new()),
                demoting: tokio::sync::Mutex::new(()),
                address_updates: Mutex::new(std::collections::BTreeMap::new()),
                agent_settings: agents,
                agents: AgentTracker::default(),
                assignments: crate::assignments::AssignmentHub::default(),
                relay: crate::relay::HeartbeatRelay::default(),
            }),
        }
    }

    /// On the leader: how long ago it last heard each agent it has heard
    /// since it took over (empty on a server that does not lead).
    pub fn agent_heartbeat_ages(&self) -> std::collections::BTreeMap<NodeId, std::time::Duration> {
        self.shared.agents.ages(tokio::time::Instant::now())
    }

    /// The handler of [`ServiceId::Raft`].
    pub fn raft_handler(&self) -> Arc<dyn Handler> {
        self.shared.raft.handler()
    }

    /// The handler of [`ServiceId::Cluster`].
    pub fn cluster_handler(&self) -> Arc<dyn Handler> {
        Arc::new(ClusterHandler {
            shared: self.shared.clone(),
        })
    }

    /// `dispatcher` with both services registered.
    pub fn register(&self, dispatcher: Dispatcher) -> Dispatcher {
        dispatcher
            .register(ServiceId::Raft, self.raft_handler())
            .register(ServiceId::Cluster, self.cluster_handler())
    }

    pub(crate) fn attach(&self, attached: Arc<Attached>) {
        self.shared.raft.attach(attached);
    }

    pub(crate) fn detach(&self) {
        self.shared.raft.detach();
    }

    /// Trusts `members` (node id and identity) for Raft calls until this
    /// node's membership is no longer empty; see
    /// [`RaftService::trust_until_first_membership`].
    pub fn trust_until_first_membership(
        &self,
        members: impl IntoIterator<Item = (NodeId, PeerId)>,
    ) {
        self.shared.raft.trust_until_first_membership(members);
    }
}

struct ClusterHandler {
    shared: Arc<ClusterShared>,
}

impl Handler for ClusterHandler {
    fn handle(
        &self,
        ctx: RequestContext,
        method: &'static Method,
        payload: Bytes,
    ) -> BoxFuture<'static, Result<Bytes, Status>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            let node = shared.raft.node()?;
            let route = ROUTES.route(method)?;
            within_deadline(&ctx, route(&shared, &node, &ctx, payload)).await
        })
    }

    /// `Cluster/AgentSync`; no other Cluster method is a stream.
    fn handle_stream(
        &self,
        ctx: RequestContext,
        method: &'static Method,
        request: Bytes,
        inbound: StreamReceiver,
        outbound: StreamSender,
    ) -> BoxFuture<'static, Result<(), Status>> {
        drop(inbound);
        let shared = self.shared.clone();
        Box::pin(async move {
            let node = shared.raft.node()?;
            let route = ROUTES.stream_route(method)?;
            route(shared.clone(), node, ctx, request, outbound).await
        })
    }
}

/// A Cluster method.
type Route = for<'a> fn(
    &'a Arc<ClusterShared>,
    &'a Arc<Attached>,
    &'a RequestContext,
    Bytes,
) -> BoxFuture<'a, Result<Bytes, Status>>;

/// A streaming Cluster method.
type StreamRoute = fn(
    Arc<ClusterShared>,
    Arc<Attached>,
    RequestContext,
    Bytes,
    StreamSender,
) -> BoxFuture<'static, Result<(), Status>>;

static ROUTES: LazyLock<Routes<Route, StreamRoute>> = LazyLock::new(|| {
    routes()
        .expect("the Cluster routes are valid (the `routes_cover_the_catalogue` test builds them)")
});

fn routes() -> Result<Routes<Route, StreamRoute>, RouteError> {
    use crate::{access, admission, demotion, membership, meta, policy, rollout};
    Routes::<Route, StreamRoute>::new(ServiceId::Cluster)
        .unary(methods::CLUSTER_JOIN, |shared, node, ctx, payload| {
            Box::pin(join(shared, node, ctx, payload))
        })?
        .unary(methods::CLUSTER_LEAVE, |shared, node, ctx, payload| {
            Box::pin(leave(shared, node, ctx, payload))
        })?
        .unary(methods::CLUSTER_MEMBERS, |_, node, _, _| {
            let answer = members_response(node).encode_to_vec().into();
            Box::pin(std::future::ready(Ok(answer)))
        })?
        .unary(methods::CLUSTER_META_PUT, |_, node, ctx, payload| {
            Box::pin(meta::serve_put(node, ctx, payload))
        })?
        .unary(methods::CLUSTER_META_GET, |_, node, ctx, payload| {
            Box::pin(meta::serve_get(node, ctx, payload))
        })?
        .unary(methods::CLUSTER_ACCESS_GRANT, |_, node, ctx, payload| {
            Box::pin(access::serve_change(node, ctx, payload, true))
        })?
        .unary(methods::CLUSTER_ACCESS_REVOKE, |_, node, ctx, payload| {
            Box::pin(access::serve_change(node, ctx, payload, false))
        })?
        .unary(methods::CLUSTER_ACCESS_LIST, |_, node, _, _| {
            Box::pin(std::future::ready(access::serve_list(node)))
        })?
        .unary(methods::CLUSTER_TOKEN_CREATE, |_, node, ctx, payload| {
            Box::pin(admission::serve_create(node, ctx, payload))
        })?
        .unary(methods::CLUSTER_TOKEN_REVOKE, |_, node, ctx, payload| {
            Box::pin(admission::serve_revoke(node, ctx, payload))
        })?
        .unary(methods::CLUSTER_TOKEN_LIST, |_, node, ctx, _| {
            Box::pin(std::future::ready(admission::serve_list(node, ctx)))
        })?
        .unary(methods::CLUSTER_PROMOTE, |_, node, ctx, payload| {
            Box::pin(membership::promote(node, ctx, payload))
        })?
        .unary(methods::CLUSTER_DEMOTE, |shared, node, ctx, payload| {
            Box::pin(demotion::serve(shared, node, ctx, payload))
        })?
        .unary(methods::CLUSTER_TRANSPORT_SET, |_, node, ctx, payload| {
            Box::pin(policy::serve_set(node, ctx, payload))
        })?
        .unary(methods::CLUSTER_ROLLOUT, |_, node, ctx, payload| {
            Box::pin(rollout::serve_change(node, ctx, payload))
        })?
        .unary(methods::CLUSTER_ROLLOUT_GET, |_, node, _, _| {
            Box::pin(std::future::ready(rollout::serve_get(node)))
        })
        .and_then(agent_routes)
}

/// The agents' calls (see [`crate::agents`]).
fn agent_routes(
    routes: Routes<Route, StreamRoute>,
) -> Result<Routes<Route, StreamRoute>, RouteError> {
    use crate::agents;
    routes
        .unary(
            methods::CLUSTER_AGENT_REGISTER,
            |shared, node, ctx, payload| {
                Box::pin(agents::serve_register(shared, node, ctx, payload))
            },
        )?
        .unary(
            methods::CLUSTER_AGENT_HEARTBEAT,
            |shared, node, ctx, payload| {
                Box::pin(agents::serve_heartbeat(shared, node, ctx, payload))
            },
        )?
        .unary(
            methods::CLUSTER_AGENTS_HEARD,
            |shared, node, ctx, payload| {
                Box::pin(crate::relay::serve_heard(shared, node, ctx, payload))
            },
        )?
        .unary(methods::CLUSTER_AGENT_REPORT, |_, node, ctx, payload| {
            Box::pin(agents::serve_report(node, ctx, payload))
        })?
        .stream(
            methods::CLUSTER_AGENT_SYNC,
            |shared, node, ctx, request, outbound| {
                Box::pin(agents::serve_sync(shared, node, ctx, request, outbound))
            },
        )
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
