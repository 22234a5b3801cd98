//! Health: liveness, readiness and the health of each transport, served as
//! `Health/Check` and published for the node to copy into the gRPC
//! transport's standard `grpc.health.v1` service.
//!
//! - **Liveness** is `SERVING` whenever the process answers at all, unless
//!   Raft has stopped on a failure ([`RaftStatus::failure`]: a failed log
//!   write or sync): then `NOT_SERVING` with the failure in `detail`, until
//!   the node exits.
//! - **Readiness** is `SERVING` when Raft knows a leader and this node has
//!   applied up to within [`MAX_APPLY_LAG`] entries of the commit index
//!   ([`RaftStatus::is_caught_up`]); otherwise `NOT_SERVING` with the
//!   reason in `detail`.
//! - **Transports** are what the node reports through
//!   [`NodeInfo::transports`].
//!
//! The services crate does not know the gRPC transport: the node calls
//! [`HealthService::publish`] and copies each [`HealthReport`] it yields
//! into its `HealthHandle` (`set_node(ready)`, `set_transport(kind, up)`).

use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tern_protocol::catalog::{Method, methods};
use tern_protocol::{
    BoxFuture, Handler, RequestContext, RouteError, Routes, ServiceId, Status, TransportKind, pb,
};
use tokio::sync::watch;

use crate::consensus::{Consensus, MAX_APPLY_LAG, RaftStatus};
use crate::node_info::NodeInfo;

/// How often [`HealthService::publish`] re-evaluates health when nothing
/// wakes it: transport health has no change notification, and a second
/// is quick enough for a load balancer's probe.
pub const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);

/// A summary of health in the terms `grpc.health.v1` uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HealthReport {
    /// Whether the node is ready (the node's overall status, `""`).
    pub ready: bool,
    /// Each transport and whether it is serving.
    pub transports: Vec<(TransportKind, bool)>,
    /// Why the node is not ready, when it is not.
    pub detail: String,
}

/// The Health service.
pub struct HealthService {
    consensus: Arc<dyn Consensus>,
    node: Arc<dyn NodeInfo>,
}

impl HealthService {
    /// Health over this node's Raft and facts.
    pub fn new(consensus: Arc<dyn Consensus>, node: Arc<dyn NodeInfo>) -> Arc<HealthService> {
        Arc::new(HealthService { consensus, node })
    }

    /// The current health.
    pub fn check(&self) -> pb::HealthCheckResponse {
        let status: RaftStatus = self.consensus.current_status();
        let ready = status.is_caught_up(MAX_APPLY_LAG) && status.failure.is_none();
        pb::HealthCheckResponse {
            liveness: serving(status.failure.is_none()) as i32,
            readiness: serving(ready) as i32,
            transports: self.node.transports(),
            detail: status.lag_reason(MAX_APPLY_LAG),
        }
    }

    /// The current health in `grpc.health.v1` terms.
    pub fn report(&self) -> HealthReport {
        let check = self.check();
        HealthReport {
            ready: check.readiness == pb::ServingState::Serving as i32,
            transports: check
                .transports
                .iter()
                .filter_map(|t| {
                    let kind = match pb::Transport::try_from(t.transport) {
                        Ok(pb::Transport::Grpc) => TransportKind::Grpc,
                        Ok(pb::Transport::Iroh) => TransportKind::Iroh,
                        _ => return None,
                    };
                    Some((kind, t.state == pb::ServingState::Serving as i32))
                })
                .collect(),
            detail: check.detail,
        }
    }

    /// Publishes [`HealthReport`]s until `shutdown` resolves or every
    /// receiver is dropped: re-evaluated on every Raft status change and
    /// every [`PUBLISH_INTERVAL`], sent only when it changes. The node
    /// copies each into the gRPC transport's health service.
    pub fn publish(
        self: &Arc<Self>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> watch::Receiver<HealthReport> {
        let (tx, rx) = watch::channel(self.report());
        let me = self.clone();
        let mut raft = self.consensus.status();
        tokio::spawn(async move {
            let mut shutdown = std::pin::pin!(shutdown);
            loop {
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tx.closed() => break,
                    changed = raft.changed() => if changed.is_err() {
                        // Raft's status is gone: the node is stopping.
                        tx.send_if_modified(|r| {
                            let down = HealthReport { ready: false, detail: "Raft has stopped".into(), ..r.clone() };
                            let changed = *r != down;
                            *r = down;
                            changed
                        });
                        break;
                    },
                    _ = tokio::time::sleep(PUBLISH_INTERVAL) => {}
                }
                let report = me.report();
                tx.send_if_modified(|current| {
                    if *current == report {
                        return false;
                    }
                    tracing::info!(ready = report.ready, detail = %report.detail, "health changed");
                    *current = report;
                    true
                });
            }
        });
        rx
    }

    /// The `Health` service handler.
    pub fn handler(self: &Arc<Self>) -> Arc<dyn Handler> {
        self.clone()
    }
}

fn serving(up: bool) -> pb::ServingState {
    if up {
        pb::ServingState::Serving
    } else {
        pb::ServingState::NotServing
    }
}

impl Handler for HealthService {
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

/// A Health method, served at once.
type Route = fn(&HealthService, Bytes) -> Result<Bytes, Status>;

static ROUTES: LazyLock<Routes<Route>> = LazyLock::new(|| {
    routes()
        .expect("the Health routes are valid (the `routes_cover_the_catalogue` test builds them)")
});

fn routes() -> Result<Routes<Route>, RouteError> {
    Routes::<Route>::new(ServiceId::Health).unary(methods::HEALTH_CHECK, serve_check)
}

/// `Health/Check`.
fn serve_check(service: &HealthService, payload: Bytes) -> Result<Bytes, Status> {
    pb::HealthCheckRequest::decode(payload)
        .map_err(|e| Status::invalid_argument(format!("undecodable HealthCheckRequest: {e}")))
        .map(|_| service.check().encode_to_vec().into())
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
