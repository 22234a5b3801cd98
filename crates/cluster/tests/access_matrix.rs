//! Deny by default, one table, both transports: every method of the
//! catalogue × every kind of caller (an unknown key, viewer, operator,
//! admin, a member) × gRPC and iroh, against the node's access check
//! ([`AccessGate`]) in front of the real Raft and Cluster services on a
//! real single-node Raft. A method without an expectation here fails the
//! test, as does one without a rule in the table.
#![allow(clippy::unwrap_used)] // reason: tests fail loudly on unexpected errors.

#[path = "services_support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use support::raft::SingleNode;
use tern_cluster::RaftServices;
use tern_protocol::access::{Role, rule};
use tern_protocol::catalog::{METHODS, STREAM_METHODS, methods};
use tern_protocol::{
    BoxFuture, Call, CallError, Code, Dispatcher, Handler, Method, PeerAddr, PeerId,
    RequestContext, ServiceId, Status, StreamCall, pb,
};
use tern_services::access::AccessGate;
use tern_services::consensus::Consensus;
use tern_state::{Capacity, Command, Response};
use tern_test_transports::{Kind, Node};

/// Per-call bound.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The callers of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Unknown,
    Viewer,
    Operator,
    Admin,
    Member,
    /// A registered agent's key: no role, not a member.
    Agent,
}

const EVERYONE: [Who; 6] = [
    Who::Unknown,
    Who::Viewer,
    Who::Operator,
    Who::Admin,
    Who::Member,
    Who::Agent,
];

/// Who may call each method, written out independently of the table.
fn allowed(method: &Method) -> &'static [Who] {
    use Who::{Admin, Agent, Member, Operator, Viewer};
    const READERS: &[Who] = &[Viewer, Operator, Admin, Member];
    match method.label().as_str() {
        "health/check" => &EVERYONE,
        "status/get" | "vm/list" | "vm/get" | "monitoring/metrics" | "cluster/metaget"
        | "cluster/accesslist" | "cluster/rolloutget" => READERS,
        "vm/create" | "vm/start" | "vm/stop" | "vm/delete" | "vm/migrate" => &[Operator, Admin],
        "cluster/metaput" => &[Operator, Admin, Member],
        // Desired transport policies: operators; members forward them.
        "cluster/transportset" => &[Operator, Admin, Member],
        // Rollout changes: operators; members forward them.
        "cluster/rollout" => &[Operator, Admin, Member],
        "cluster/accessgrant" | "cluster/accessrevoke" => &[Admin],
        // Tokens, promotion and demotion: admins only (a member never
        // mints tokens nor changes another's role).
        "cluster/tokencreate"
        | "cluster/tokenrevoke"
        | "cluster/tokenlist"
        | "cluster/promote"
        | "cluster/demote" => &[Admin],
        // Anyone reaches the Cluster service; it wants the join token
        // (none sent here) or membership.
        "cluster/join" => &[Member],
        // Everyone: a joiner finds the leader with it.
        "cluster/members" => &EVERYONE,
        // Removing a node (999, not the caller) is an admin's call; a
        // member may remove only itself, so it is refused here by the
        // Cluster service.
        "cluster/leave" => &[Admin],
        "raft/vote" | "raft/appendentries" | "raft/snapshot" | "raft/propose" => &[Member],
        // A follower relaying agents' heartbeats: servers only (an agent
        // cannot vouch for others, nor an admin for anyone).
        "cluster/agentsheard" => &[Member],
        // Streams, checked once before they open.
        "vm/watch" => READERS,
        "raft/appendstream" => &[Member],
        // Any key reaches registration; the Cluster service wants a token
        // or an existing registration (here: an empty request, refused as
        // malformed, not denied).
        "cluster/agentregister" => &EVERYONE,
        // An agent's own calls: registered agents only.
        "cluster/agentheartbeat" | "cluster/agentreport" | "cluster/agentsync" => &[Agent],
        other => panic!("no expectation for {other}: add one here and a rule to access::rule"),
    }
}

/// Answers every call `Ok`: stands for the services the gate guards.
struct Probe;

impl Handler for Probe {
    fn handle(
        &self,
        _ctx: RequestContext,
        _method: &'static Method,
        _payload: Bytes,
    ) -> BoxFuture<'static, Result<Bytes, Status>> {
        Box::pin(std::future::ready(Ok(Bytes::new())))
    }
}

/// A payload that harms nothing when allowed: empty, except Leave and
/// Demote, which name a node that does not exist, and Join, the caller's own address
/// with a wrong token (the member's join is answered with the existing
/// membership).
fn payload(method: &Method, caller: &PeerAddr, agent_id: u64) -> Bytes {
    if method == methods::CLUSTER_AGENT_HEARTBEAT {
        return pb::AgentHeartbeatRequest {
            node_id: agent_id,
            ..pb::AgentHeartbeatRequest::default()
        }
        .encode_to_vec()
        .into();
    }
    if method == methods::CLUSTER_AGENT_REPORT {
        // Names the agent itself and no state: refused as malformed by
        // the service once the gate let it through.
        return pb::AgentReportRequest {
            node_id: agent_id,
            request_id: "r".into(),
            ..pb::AgentReportRequest::default()
        }
        .encode_to_vec()
        .into();
    }
    if method == methods::CLUSTER_LEAVE {
        return pb::LeaveRequest { node_id: 999 }.encode_to_vec().into();
    }
    if method == methods::CLUSTER_DEMOTE {
        return pb::DemoteRequest { node_id: 999 }.encode_to_vec().into();
    }
    if method == methods::CLUSTER_JOIN {
        return pb::JoinRequest {
            token: "not-the-token".into(),
            address: Some(pb::PeerAddress::from(caller)),
            capacity: Some(pb::Capacity {
                vcpus: 4,
                memory_mib: 4096,
            }),
        }
        .encode_to_vec()
        .into();
    }
    Bytes::new()
}

async fn grant(consensus: &dyn Consensus, key: PeerId, role: Role, by: PeerId, n: usize) {
    let r = consensus
        .write(Command::ChangeAccess {
            request_id: format!("grant-{n}"),
            grant: true,
            key,
            role,
            by,
            at_unix_ms: 1,
        })
        .await
        .unwrap();
    assert_eq!(r, Response::Done);
}

async fn matrix(kind: Kind) {
    let dir = tempfile::tempdir().unwrap();
    // The member: a client whose key is the Raft member's.
    let member = Node::start(kind, Arc::new(Dispatcher::new())).await;
    let services = RaftServices::new(None);
    let raft = SingleNode::start_with(
        &services,
        &dir.path().join("raft"),
        member.addr(),
        Capacity {
            vcpus: 4,
            memory_mib: 4096,
        },
        member.client(),
    )
    .await;
    let consensus = raft.consensus.clone();
    let c: Arc<dyn Consensus> = consensus.clone();
    let probe: Arc<dyn Handler> = Arc::new(Probe);
    let dispatcher = services.register(
        Dispatcher::new()
            .register(ServiceId::Health, probe.clone())
            .register(ServiceId::Status, probe.clone())
            .register(ServiceId::Vm, probe.clone())
            .register(ServiceId::Monitoring, probe),
    );
    let gate = Arc::new(AccessGate::new(Arc::new(dispatcher)));
    gate.attach(c.clone());
    let server = Node::start(kind, gate).await;

    let mut callers = Vec::new();
    for who in EVERYONE {
        let node = if who == Who::Member {
            None
        } else {
            Some(Node::start(kind, Arc::new(Dispatcher::new())).await)
        };
        callers.push((who, node));
    }
    let id_of = |who: Who| -> PeerId {
        callers
            .iter()
            .find(|(w, _)| *w == who)
            .and_then(|(_, n)| n.as_ref().map(Node::id))
            .unwrap()
    };
    let admin = id_of(Who::Admin);
    grant(c.as_ref(), admin, Role::Admin, admin, 0).await;
    grant(c.as_ref(), id_of(Who::Operator), Role::Operator, admin, 1).await;
    grant(c.as_ref(), id_of(Who::Viewer), Role::Viewer, admin, 2).await;
    let agent_addr = callers
        .iter()
        .find(|(w, _)| *w == Who::Agent)
        .and_then(|(_, n)| n.as_ref().map(Node::addr))
        .unwrap();
    let Response::NodeId(agent_id) = c
        .write(Command::AllocateNodeId {
            request_id: "agent-id".into(),
            peer: agent_addr.id,
        })
        .await
        .unwrap()
    else {
        panic!("an id for the agent")
    };
    let registered = c
        .write(Command::RegisterAgent {
            request_id: "agent-register".into(),
            node_id: agent_id,
            addr: agent_addr,
            capacity: Capacity {
                vcpus: 1,
                memory_mib: 64,
            },
            at_unix_ms: 1,
        })
        .await
        .unwrap();
    assert_eq!(registered, Response::NodeId(agent_id));

    let target = server.addr();
    let mut wrong = Vec::new();
    for method in METHODS {
        assert!(rule(method).is_some(), "{} has no rule", method.label());
        let expected = allowed(method);
        for (who, node) in &callers {
            let (client, addr) = match node {
                Some(n) => (n.client(), n.addr()),
                None => (member.client(), member.addr()),
            };
            let call =
                Call::new(method, payload(method, &addr, agent_id)).with_timeout(CALL_TIMEOUT);
            let result = client.call(&target, call).await;
            let denied = match &result {
                Err(CallError::Application(s)) => {
                    s.code == Code::PermissionDenied || s.code == Code::Unauthenticated
                }
                Err(CallError::Transport(t)) => {
                    panic!("{kind:?} {who:?} {}: transport error {t}", method.label())
                }
                Ok(_) => false,
            };
            let want_allowed = expected.contains(who);
            if denied == want_allowed {
                wrong.push(format!(
                    "{kind:?} {who:?} {}: expected {}, got {result:?}",
                    method.label(),
                    if want_allowed { "allowed" } else { "denied" }
                ));
            }
            if denied
                && rule(method).is_some_and(|r| {
                    matches!(
                        r,
                        tern_protocol::access::Rule::Role(_)
                            | tern_protocol::access::Rule::RoleOrMember(_)
                    )
                })
                && method != methods::CLUSTER_LEAVE
                && let Err(CallError::Application(s)) = &result
            {
                // The gate's refusals name the method and what it needs.
                assert!(
                    s.message.contains(&method.label()) && s.message.contains("needs"),
                    "{s}"
                );
            }
        }
    }
    for method in STREAM_METHODS {
        assert!(rule(method).is_some(), "{} has no rule", method.label());
        let expected = allowed(method);
        for (who, node) in &callers {
            let client = match node {
                Some(n) => n.client(),
                None => member.client(),
            };
            let call = StreamCall::new(method, Bytes::new()).with_open_timeout(CALL_TIMEOUT);
            // A refusal may come with the opening or as the stream's first
            // answer.
            let result = match client.open_stream(&target, call).await {
                Ok(mut stream) => match stream.receiver.next().await {
                    Some(Err(e)) => Err(e),
                    _ => Ok(()),
                },
                Err(e) => Err(e),
            };
            let denied = match &result {
                Err(CallError::Application(s)) => {
                    s.code == Code::PermissionDenied || s.code == Code::Unauthenticated
                }
                Err(CallError::Transport(t)) => {
                    panic!("{kind:?} {who:?} {}: transport error {t}", method.label())
                }
                Ok(_) => false,
            };
            if denied == expected.contains(who) {
                wrong.push(format!(
                    "{kind:?} {who:?} {} (stream): expected {}, got {}",
                    method.label(),
                    if denied { "allowed" } else { "denied" },
                    match &result {
                        Ok(_) => "an open stream".to_owned(),
                        Err(e) => e.to_string(),
                    }
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} wrong answers:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    for n in callers.into_iter().filter_map(|(_, n)| n) {
        n.shutdown().await;
    }
    server.shutdown().await;
    member.shutdown().await;
    drop(consensus);
    raft.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_every_role_over_grpc() {
    matrix(Kind::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_every_role_over_iroh() {
    matrix(Kind::Iroh).await;
}
