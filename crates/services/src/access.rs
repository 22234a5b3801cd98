//! The access check in front of every service: deny by default, one table
//! ([`tern_protocol::access::rule`]) for both transports.
//!
//! [`AccessGate`] wraps the node's [`Dispatcher`](tern_protocol::Dispatcher):
//! for each call it looks up the method's rule, reads the caller's grants
//! from the applied cluster state (roles granted to its key, membership of
//! its key) and either dispatches or answers `PermissionDenied` naming the
//! method and what it needs. Every refusal is counted under
//! [`ACCESS_DENIED`] and logged with the caller, the method and the reason,
//! at most once per [`DENIAL_LOG_INTERVAL`] per caller and method, so a
//! hostile caller cannot flood the log.
//!
//! The Raft and Cluster services keep their own checks behind the gate
//! (Raft calls only from members and bound to the caller's node id, the
//! join token for non-members); where the table says [`Rule::AnyKey`] or
//! [`Rule::Members`] the gate lets them decide, since they judge against
//! Raft's effective membership, which runs ahead of the applied state.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tern_protocol::access::{Denial, Grants, Rule, rule};
use tern_protocol::metric_names::ACCESS_DENIED;
use tern_protocol::{
    BoxFuture, Handler, Method, PeerId, RequestContext, Status, StreamReceiver, StreamSender,
};

use crate::consensus::Consensus;

/// How often a refusal of one caller for one method is logged: enough to
/// see an attack or a misconfigured client, never a flood.
pub const DENIAL_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Most (caller, method) pairs whose last log time is remembered; beyond
/// it, entries older than [`DENIAL_LOG_INTERVAL`] are dropped, and if
/// none is, refusals are counted but not logged until room frees up (many
/// keys cannot grow memory without bound).
pub const MAX_DENIAL_LOG_KEYS: usize = 4_096;

/// The access check; see the module docs.
pub struct AccessGate {
    inner: Arc<dyn Handler>,
    consensus: Arc<OnceLock<Arc<dyn Consensus>>>,
    logged: Mutex<HashMap<(PeerId, &'static str, &'static str), Instant>>,
}

impl std::fmt::Debug for AccessGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessGate").finish_non_exhaustive()
    }
}

impl AccessGate {
    /// A gate in front of `inner`. Until [`AccessGate::attach`] gives it
    /// the cluster state, calls that need a role are `Unavailable` (the
    /// node is starting); calls open to any key or to members pass to the
    /// services, which check them themselves.
    pub fn new(inner: Arc<dyn Handler>) -> AccessGate {
        AccessGate {
            inner,
            consensus: Arc::new(OnceLock::new()),
            logged: Mutex::new(HashMap::new()),
        }
    }

    /// Gives the gate the applied state to read grants from (once Raft
    /// runs). A second call is ignored.
    pub fn attach(&self, consensus: Arc<dyn Consensus>) {
        let _ = self.consensus.set(consensus);
    }

    /// What `peer` holds in the applied state, if the state is readable.
    fn grants(&self, peer: &PeerId) -> Option<Grants> {
        let consensus = self.consensus.get()?;
        consensus
            .query(|state| Grants {
                role: state.role_of(peer),
                member: state.is_member_key(peer),
                agent: state.agent_of(peer).is_some(),
            })
            .ok()
    }

    /// Decides one call: `Ok` to dispatch, or the answer to give.
    pub fn decide(&self, ctx: &RequestContext, method: &'static Method) -> Result<(), Status> {
        let Some(rule) = rule(method) else {
            return Err(self.refuse(ctx, method, Denial::NoRule, "a rule (it has none)"));
        };
        let grants = match rule {
            // Members only: the Raft service decides, against its
            // *effective* membership (which runs ahead of the applied
            // state, and for a joiner trusts the members its join answer
            // named), and binds the caller to its own node id.
            Rule::Anyone | Rule::AnyKey | Rule::Members => return Ok(()),
            Rule::Role(_) | Rule::RoleOrMember(_) | Rule::Agents => match self.grants(&ctx.peer) {
                Some(g) => g,
                None => {
                    return Err(Status::unavailable(
                        "the node is starting (its cluster state is not readable yet); retry shortly",
                    ));
                }
            },
        };
        rule.check(grants)
            .map_err(|why| self.refuse(ctx, method, why, &rule.needs()))
    }

    fn refuse(
        &self,
        ctx: &RequestContext,
        method: &'static Method,
        why: Denial,
        needs: &str,
    ) -> Status {
        metrics::counter!(
            ACCESS_DENIED,
            "service" => method.service.name(),
            "method" => method.name,
            "reason" => why.as_str(),
        )
        .increment(1);
        if self.should_log(ctx.peer, method) {
            tracing::warn!(
                caller = %ctx.peer,
                method = %method.label(),
                reason = why.as_str(),
                transport = ?ctx.transport,
                "access denied (logged at most once a minute per caller and method)"
            );
        }
        Status::permission_denied(format!(
            "{} needs {needs}; caller {} has {}",
            method.label(),
            ctx.peer.short(),
            match why {
                Denial::UnknownKey => "no role (unknown key)",
                Denial::NeedsRole => "a weaker role",
                Denial::MembersOnly => "a role but is not a member",
                Denial::AgentsOnly => "no agent registration",
                Denial::NoRule => "no rule to match (deny by default)",
            }
        ))
    }

    fn should_log(&self, peer: PeerId, method: &'static Method) -> bool {
        let now = Instant::now();
        let Ok(mut logged) = self.logged.lock() else {
            return false;
        };
        let key = (peer, method.service.name(), method.name);
        if let Some(last) = logged.get(&key)
            && now.duration_since(*last) < DENIAL_LOG_INTERVAL
        {
            return false;
        }
        if !logged.contains_key(&key) && logged.len() >= MAX_DENIAL_LOG_KEYS {
            logged.retain(|_, last| now.duration_since(*last) < DENIAL_LOG_INTERVAL);
            if logged.len() >= MAX_DENIAL_LOG_KEYS {
                return false;
            }
        }
        logged.insert(key, now);
        true
    }
}

impl Handler for AccessGate {
    fn handle(
        &self,
        ctx: RequestContext,
        method: &'static Method,
        payload: Bytes,
    ) -> BoxFuture<'static, Result<Bytes, Status>> {
        match self.decide(&ctx, method) {
            Ok(()) => self.inner.handle(ctx, method, payload),
            Err(status) => Box::pin(std::future::ready(Err(status))),
        }
    }

    /// A stream passes the same check as a call, once, before it opens:
    /// a refused stream is never handed to a service.
    fn handle_stream(
        &self,
        ctx: RequestContext,
        method: &'static Method,
        request: Bytes,
        inbound: StreamReceiver,
        outbound: StreamSender,
    ) -> BoxFuture<'static, Result<(), Status>> {
        match self.decide(&ctx, method) {
            Ok(()) => self
                .inner
                .handle_stream(ctx, method, request, inbound, outbound),
            Err(status) => Box::pin(std::future::ready(Err(status))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_protocol::catalog::methods;
    use tern_protocol::{Dispatcher, Priority, TransportKind};

    fn ctx(peer: PeerId) -> RequestContext {
        RequestContext {
            peer,
            transport: TransportKind::Grpc,
            priority: Priority::Normal,
            deadline: None,
        }
    }

    #[test]
    fn refusals_are_logged_once_a_minute_per_caller_and_method() {
        let gate = AccessGate::new(Arc::new(Dispatcher::new()));
        let a = PeerId::from_bytes([1; 32]);
        let b = PeerId::from_bytes([2; 32]);
        assert!(gate.should_log(a, methods::VM_CREATE));
        assert!(!gate.should_log(a, methods::VM_CREATE));
        assert!(gate.should_log(a, methods::VM_DELETE));
        assert!(gate.should_log(b, methods::VM_CREATE));
    }

    #[test]
    fn without_state_roles_are_unavailable_and_open_calls_pass() {
        let gate = AccessGate::new(Arc::new(Dispatcher::new()));
        let c = ctx(PeerId::from_bytes([3; 32]));
        assert!(gate.decide(&c, methods::HEALTH_CHECK).is_ok());
        assert!(gate.decide(&c, methods::CLUSTER_MEMBERS).is_ok());
        assert!(gate.decide(&c, methods::RAFT_VOTE).is_ok());
        let e = gate.decide(&c, methods::VM_CREATE).unwrap_err();
        assert_eq!(e.code, tern_protocol::Code::Unavailable);
    }
}
