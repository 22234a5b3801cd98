//! Agents as the servers serve them: registration, heartbeats, reports,
//! the assignment stream, and the leader's judgement of who is down.
//!
//! An agent is a node that runs VMs without being a Raft member (see
//! `tern_state::agent`). The servers give it four calls, all on the
//! Cluster service:
//!
//! - `AgentRegister` (any key; a join token or an existing registration):
//!   the leader admits the key as `AdmitNode` does for a joining server,
//!   then records the agent (`RegisterAgent`), its capacity cut to the
//!   configured maximum. A key that is a Raft member is refused.
//! - `AgentHeartbeat` (agents only, served by the leader while a majority
//!   of the servers acknowledges it, [`LEADER_QUORUM_FRESH`], or taken by
//!   a follower and relayed, see [`crate::relay`]): the leader
//!   notes when it last heard each agent (`AgentTracker`, memory only: a
//!   heartbeat is no Raft write), marks a down agent ready again, and
//!   records a changed capacity.
//! - `AgentReport` (agents only, served by the leader): a reconciler's
//!   observation of a VM placed on the caller, proposed as `ReportVm`.
//! - `AgentSync` (agents only, any server): the caller's assignment,
//!   whole, whenever it changed, from the server's applied state; a
//!   progress message while nothing changes. Agents spread these streams
//!   over the servers (the bulk of what they receive), while heartbeats and
//!   reports, small and few, go to the leader.
//!
//! [`watch_agents`] runs on every server and acts only while it leads: an
//! agent not heard for [`AgentSettings::down_after`] is marked down
//! (`SetAgentStatus`), which moves its VMs. A new leader hears nobody yet,
//! so it counts every agent as heard when it took over: an agent is never
//! marked down for a leader change, only for its own silence. A server
//! being demoted (a member with an agent record, see [`crate::demotion`])
//! is not judged until it has left the membership; from then it counts as
//! heard at that moment.
//!
//! **Never twice.** An agent stops its VMs by itself once its heartbeats
//! have gone unacknowledged for a third of `down_after` (its fence, in
//! `tern-node`), so by the time the leader marks it down and the VMs start
//! elsewhere, the old copies have been stopped, provided a workload's stop
//! grace is within the remaining two thirds less a heartbeat interval
//! (the node checks its settings against this at start).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use openraft::async_runtime::WatchReceiver;
use prost::Message;
use tern_protocol::metric_names::{
    AGENT_HEARTBEAT_AGE_MAX, AGENT_HEARTBEATS, AGENT_STATUS_CHANGES, AGENTS,
};
use tern_protocol::{Code, PeerAddr, PeerId, RequestContext, Status, StreamSender, pb};
use tern_state::{AgentStatus, Capacity, Command, NodeId, Response, VmReport};
use tokio::time::Instant;

use crate::admission::{check_token, unix_ms};
use crate::assignments::Subscription;
use crate::membership::{ensure_leader, members_pb};
use crate::node::RaftNode;
use crate::service::{ClusterShared, lock};
use tern_raft_net::Attached;

/// How often an agent heartbeats by default: often enough that a down
/// agent is noticed in seconds, rarely enough that 5,000 agents cost the
/// leader 2,500 small calls a second.
pub const DEFAULT_AGENT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);

/// How long the leader waits without a heartbeat before it marks an agent
/// down and moves its VMs, by default: 15 missed heartbeats, so a busy
/// network or a long pause does not move VMs, and room for the agent's
/// fence (a third of it, 10 s) plus a workload's default stop grace
/// (10 s) before the VMs start elsewhere.
pub const DEFAULT_AGENT_DOWN_AFTER: Duration = Duration::from_secs(30);

/// The shortest `down_after` a server accepts: the agent's fence and a
/// heartbeat or two must fit in it.
pub const MIN_AGENT_DOWN_AFTER: Duration = Duration::from_secs(3);

const _: () = assert!(
    DEFAULT_AGENT_DOWN_AFTER.as_millis() >= 10 * DEFAULT_AGENT_HEARTBEAT_INTERVAL.as_millis()
);

/// A leader acknowledges an agent's heartbeat only while a majority of
/// the servers acknowledged it (its Raft heartbeats, every 100 ms) within
/// this bound.
///
/// openraft's leader keeps its role until it hears a higher term, so a
/// leader cut off from the other servers goes on leading in its own eyes.
/// If it went on acknowledging heartbeats, an agent that reaches only it
/// would never fence, while the majority's new leader marks the agent
/// down after `down_after` and starts its VMs elsewhere: twice. With this
/// bound such an agent's fence starts at most 2 s after the old leader
/// lost its majority; the new leader was elected no sooner than that
/// majority stopped hearing it and counts the agent as heard when it took
/// over, so the fence (a third of `down_after`) and the stop grace still
/// end before the VMs move. 2 s is twenty Raft heartbeats: a loaded
/// leader is not refused for one slow round.
pub const LEADER_QUORUM_FRESH: Duration = Duration::from_secs(2);

/// How often the leader looks for silent agents.
const MONITOR_TICK: Duration = Duration::from_millis(500);

/// How often a quiet assignment stream sends a progress message: a
/// quarter of a stream's default idle bound, as `Vm/Watch` does.
pub const ASSIGNMENT_PROGRESS_INTERVAL: Duration = Duration::from_secs(15);

/// The servers' settings for agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentSettings {
    /// How often agents heartbeat ([`DEFAULT_AGENT_HEARTBEAT_INTERVAL`]).
    pub heartbeat_interval: Duration,
    /// Silence after which the leader marks an agent down
    /// ([`DEFAULT_AGENT_DOWN_AFTER`]).
    pub down_after: Duration,
}

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings {
            heartbeat_interval: DEFAULT_AGENT_HEARTBEAT_INTERVAL,
            down_after: DEFAULT_AGENT_DOWN_AFTER,
        }
    }
}

/// When the leader last heard each agent (memory only; a new leader
/// starts empty and counts every agent as heard when it took over).
#[derive(Debug, Default)]
pub(crate) struct AgentTracker {
    inner: Mutex<Tracker>,
}

#[derive(Debug, Default)]
struct Tracker {
    /// When this node last became leader (`None` while it follows), or
    /// last came back from a pause of its own (see `AgentTracker::leading`).
    leading_since: Option<Instant>,
    /// When the monitor last looked.
    last_look: Option<Instant>,
    /// The last heartbeat of each agent this leader heard.
    seen: HashMap<NodeId, Instant>,
    /// When each key last had the leader write a registration or a
    /// capacity change for it (see [`MIN_AGENT_WRITE_GAP`]); bounded by
    /// [`MAX_TRACKED_WRITERS`].
    writes: HashMap<PeerId, Instant>,
}

/// The least time between two Raft writes the leader makes for one
/// agent's key (a registration with new addresses or capacity, a capacity
/// change in a heartbeat): an agent calling in a loop, or flapping, costs
/// the log at most one entry a second.
pub const MIN_AGENT_WRITE_GAP: Duration = Duration::from_secs(1);

/// Most keys whose last write time the leader keeps; older entries are
/// dropped first (they are past the gap anyway).
const MAX_TRACKED_WRITERS: usize = 65_536;

impl AgentTracker {
    pub(crate) fn heard(&self, agent: NodeId, now: Instant) {
        self.heard_all(&[agent], now);
    }

    /// Notes every agent of a follower's relay as heard `now`.
    pub(crate) fn heard_all(&self, agents: &[NodeId], now: Instant) {
        let mut t = lock(&self.inner);
        for agent in agents {
            t.seen.insert(*agent, now);
        }
    }

    /// Notes whether this node leads; answers when it took over. A look
    /// that comes more than `pause` after the previous one means this
    /// process was itself paused (stopped, starved, its clock jumped):
    /// the silence it measured is its own, not the agents', so it counts
    /// them all as heard now, as after a take-over.
    fn leading(&self, leads: bool, now: Instant, pause: Duration) -> Option<Instant> {
        let mut t = lock(&self.inner);
        let paused = t
            .last_look
            .is_some_and(|last| now.saturating_duration_since(last) > pause);
        t.last_look = Some(now);
        if !leads {
            t.leading_since = None;
            t.seen.clear();
            return None;
        }
        if paused && t.leading_since.is_some() {
            tracing::warn!(
                pause_ms = pause.as_millis(),
                "the agent monitor itself was paused longer than its bound; counting every agent as heard now"
            );
            t.leading_since = Some(now);
        }
        Some(*t.leading_since.get_or_insert(now))
    }

    /// Admits one Raft write on behalf of `key`, at most one per
    /// [`MIN_AGENT_WRITE_GAP`]; `ResourceExhausted` otherwise.
    fn allow_write(&self, key: &PeerId, now: Instant) -> Result<(), Status> {
        let mut t = lock(&self.inner);
        if let Some(last) = t.writes.get(key)
            && now.saturating_duration_since(*last) < MIN_AGENT_WRITE_GAP
        {
            return Err(Status::new(
                Code::ResourceExhausted,
                format!(
                    "{} changed its registration less than {MIN_AGENT_WRITE_GAP:?} ago; retry later",
                    key.short()
                ),
            ));
        }
        if t.writes.len() >= MAX_TRACKED_WRITERS {
            t.writes
                .retain(|_, at| now.saturating_duration_since(*at) < MIN_AGENT_WRITE_GAP);
        }
        t.writes.insert(*key, now);
        Ok(())
    }

    /// How long ago each agent was last heard, while this node leads
    /// (empty otherwise).
    pub(crate) fn ages(&self, now: Instant) -> std::collections::BTreeMap<NodeId, Duration> {
        let t = lock(&self.inner);
        if t.leading_since.is_none() {
            return std::collections::BTreeMap::new();
        }
        t.seen
            .iter()
            .map(|(id, at)| (*id, now.saturating_duration_since(*at)))
            .collect()
    }

    /// When the leader last heard `agent`, counting its own take-over.
    fn last_heard(&self, agent: NodeId, since: Instant) -> Instant {
        lock(&self.inner)
            .seen
            .get(&agent)
            .map_or(since, |at| (*at).max(since))
    }
}

/// The caller's agent id and record, from this server's applied state;
/// `PermissionDenied` when the key is not a registered agent's.
fn caller_agent(
    node: &Attached,
    peer: &PeerId,
) -> Result<(NodeId, tern_state::AgentRecord), Status> {
    node.sm
        .read(|s| s.agent_of(peer).map(|(id, a)| (id, a.clone())))
        .map_err(|e| Status::unavailable(format!("cannot read the cluster state: {e}")))?
        .ok_or_else(|| {
            Status::permission_denied(format!(
                "{} is not a registered agent here; register with Cluster/AgentRegister (a join token)",
                peer.short()
            ))
        })
}

/// `node_id` must be the caller's own.
fn check_own(method: &str, named: NodeId, own: NodeId) -> Result<(), Status> {
    if named == own {
        return Ok(());
    }
    Err(Status::permission_denied(format!(
        "{method}: node_id {named} is not the caller's (it is node {own}); an agent speaks only for itself"
    )))
}

fn capped(declared: Option<pb::Capacity>, max: Capacity) -> Capacity {
    let declared = declared.unwrap_or_default();
    Capacity {
        vcpus: declared.vcpus.min(max.vcpus),
        memory_mib: declared.memory_mib.min(max.memory_mib),
    }
}

pub(crate) async fn write(node: &Attached, command: Command) -> Result<Response, Status> {
    match tokio::time::timeout(
        crate::meta::WRITE_TIMEOUT,
        crate::node::client_write(&node.raft, command),
    )
    .await
    {
        Ok(Ok(written)) => Ok(written.data),
        Ok(Err(e)) => Err(e.into_status()),
        Err(_) => Err(Status::unavailable(
            "the write was not committed in time; retry",
        )),
    }
}

fn rejected(r: &tern_state::Rejection) -> Status {
    tern_services::vm::rejection_status(r)
}

fn settings_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Serves `Cluster/AgentRegister`.
pub(crate) async fn serve_register(
    shared: &Arc<ClusterShared>,
    node: &Arc<Attached>,
    ctx: &RequestContext,
    payload: Bytes,
) -> Result<Bytes, Status> {
    let req = pb::AgentRegisterRequest::decode(payload)
        .map_err(|e| Status::invalid_argument(format!("cluster/agentregister: {e}")))?;
    let addr = register_address(&req, ctx)?;
    if node.is_member(&ctx.peer) {
        return Err(Status::new(
            Code::FailedPrecondition,
            format!(
                "{} is a server (a Raft member); it cannot register as an agent",
                ctx.peer.short()
            ),
        ));
    }
    ensure_leader(node)?;
    let capacity = capped(req.capacity, shared.admission.max_capacity);
    let record = tern_state::Member::new(addr.clone(), capacity);
    tern_state::limits::check_member(&record)
        .map_err(|e| Status::invalid_argument(format!("cluster/agentregister: {e}")))?;
    let (known, same, revision) = node
        .sm
        .read(|s| {
            let same = s
                .agent_of(&ctx.peer)
                .is_some_and(|(_, a)| a.addr == addr && a.capacity == capacity);
            (s.node_id_of(&ctx.peer), same, s.vm_history().revision())
        })
        .map_err(|e| Status::unavailable(format!("cannot read the cluster state: {e}")))?;
    if let (Some(id), true) = (known, same) {
        // Registered with these very addresses and capacity: nothing to
        // write (an agent restarting, or one calling in a loop).
        return Ok(register_answer(shared, node, id));
    }
    shared.agents.allow_write(&ctx.peer, Instant::now())?;
    let node_id = match known {
        // Registered before, or admitted and not yet recorded.
        Some(id) => id,
        None => admit(shared, node, ctx, &req.token, revision).await?,
    };
    let registered = write(
        node,
        Command::RegisterAgent {
            request_id: format!("agent-register-{}-{revision}", ctx.peer),
            node_id,
            addr,
            capacity,
            at_unix_ms: unix_ms(),
        },
    )
    .await?;
    match registered {
        Response::NodeId(_) => {}
        Response::Rejected(r) => return Err(rejected(&r)),
        other => {
            return Err(Status::internal(format!(
                "agent registration answered {other:?}"
            )));
        }
    }
    tracing::info!(agent = node_id, key = %ctx.peer.short(), "agent registered");
    Ok(register_answer(shared, node, node_id))
}

fn register_answer(shared: &ClusterShared, node: &Attached, node_id: NodeId) -> Bytes {
    let metrics = node.raft.metrics().borrow_watched().clone();
    let settings = shared.agent_settings;
    pb::AgentRegisterResponse {
        node_id,
        servers: members_pb(metrics.membership_config.membership()),
        leader_id: metrics.current_leader.unwrap_or(0),
        heartbeat_interval_ms: settings_ms(settings.heartbeat_interval),
        down_after_ms: settings_ms(settings.down_after),
    }
    .encode_to_vec()
    .into()
}

/// The registering agent's address: present, well formed, its own.
fn register_address(
    req: &pb::AgentRegisterRequest,
    ctx: &RequestContext,
) -> Result<PeerAddr, Status> {
    let addr = req
        .address
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("cluster/agentregister: address is required"))?;
    let addr = PeerAddr::try_from(addr)
        .map_err(|e| Status::invalid_argument(format!("cluster/agentregister: address: {e}")))?;
    if addr.id != ctx.peer {
        return Err(Status::permission_denied(format!(
            "an agent registers as itself: the address names {} but the caller is {}",
            addr.id.short(),
            ctx.peer.short()
        )));
    }
    Ok(addr)
}

/// Admits a new agent's key with its token (or the static one): a node id.
async fn admit(
    shared: &Arc<ClusterShared>,
    node: &Arc<Attached>,
    ctx: &RequestContext,
    token: &str,
    revision: u64,
) -> Result<NodeId, Status> {
    let method = tern_protocol::catalog::methods::CLUSTER_AGENT_REGISTER;
    let now = Instant::now();
    shared.failed_joins.check(&ctx.peer, now)?;
    let statically = shared
        .admission
        .static_token
        .as_ref()
        .is_some_and(|t| t.matches(token));
    let command = if statically {
        Command::AllocateNodeId {
            request_id: format!("agent-admit-{}-{revision}", ctx.peer),
            peer: ctx.peer,
        }
    } else {
        let checked = node
            .sm
            .read(|s| check_token(s, token, unix_ms()))
            .map_err(|e| Status::unavailable(format!("cannot read the cluster state: {e}")))?;
        let (token_id, token_hash) = match checked {
            Ok(t) => t,
            Err(refusal) => {
                return Err(crate::membership::refuse(shared, ctx, method, refusal, now));
            }
        };
        Command::AdmitNode {
            request_id: format!("agent-admit-{}-{revision}-{token_id}", ctx.peer),
            peer: ctx.peer,
            token_id,
            token_hash,
            at_unix_ms: unix_ms(),
        }
    };
    match write(node, command).await? {
        Response::NodeId(id) => Ok(id),
        Response::Rejected(r) => {
            if let Some(refusal) = crate::admission::TokenRefusal::from_rejection(&r) {
                return Err(crate::membership::refuse(shared, ctx, method, refusal, now));
            }
            Err(rejected(&r))
        }
        other => Err(Status::internal(format!(
            "node id allocation answered {other:?}"
        ))),
    }
}

/// Removes the agent `id` (an admin's `Cluster/Leave` of it, checked by
/// the caller): its VMs move and its id is retired. Not an agent: nothing.
pub(crate) async fn remove(node: &Attached, id: NodeId) -> Result<(), Status> {
    let is_agent = node
        .sm
        .read(|s| s.agent(id).is_some())
        .map_err(|e| Status::unavailable(format!("cannot read the cluster state: {e}")))?;
    if !is_agent {
        return Ok(());
    }
    let removed = write(
        node,
        Command::RemoveAgent {
            request_id: format!("agent-remove-{id}"),
            node_id: id,
        },
    )
    .await?;
    if let Response::Rejected(r) = removed {
        return Err(rejected(&r));
    }
    tracing::info!(agent = id, "agent removed; its VMs were moved");
    Ok(())
}

/// Serves `Cluster/AgentHeartbeat`.
pub(crate) async fn serve_heartbeat(
    shared: &Arc<ClusterShared>,
    node: &Arc<Attached>,
    ctx: &RequestContext,
    payload: Bytes,
) -> Result<Bytes, Status> {
    let req = pb::AgentHeartbeatRequest::decode(payload)
        .map_err(|e| Status::invalid_argument(format!("cluster/agentheartbeat: {e}")))?;
    let (id, record) = caller_agent(node, &ctx.peer)?;
    check_own("cluster/agentheartbeat", req.node_id, id)?;
    if !leads(node) {
        // A follower takes plain heartbeats and relays them (`relay`).
        let capacity = capped(req.capacity, shared.admission.max_capacity);
        if let Some(why) = crate::relay::leader_only(&req, &record, capacity) {
            return Err(crate::relay::to_leader(node, why));
        }
        let revision = crate::relay::relay(shared, node, id).await?;
        return Ok(heartbeat_answer(shared, node, AgentStatus::Ready, revision));
    }
    ensure_majority(node)?;
    shared.agents.heard(id, Instant::now());
    metrics::counter!(AGENT_HEARTBEATS, "via" => "direct").increment(1);
    let mut status = record.status;
    if status == AgentStatus::Down {
        let back = write(
            node,
            Command::SetAgentStatus {
                request_id: format!("agent-ready-{id}-{}", record.since_unix_ms),
                node_id: id,
                status: AgentStatus::Ready,
                at_unix_ms: unix_ms(),
            },
        )
        .await?;
        if let Response::Rejected(r) = back {
            return Err(rejected(&r));
        }
        status = AgentStatus::Ready;
        metrics::counter!(AGENT_STATUS_CHANGES, "status" => "ready").increment(1);
        tracing::info!(agent = id, "agent heard again: marked ready");
    }
    if req.capacity.is_some() {
        let capacity = capped(req.capacity, shared.admission.max_capacity);
        if capacity != record.capacity {
            shared.agents.allow_write(&ctx.peer, Instant::now())?;
            let revision = node.sm.read(|s| s.vm_history().revision()).unwrap_or(0);
            let changed = write(
                node,
                Command::RegisterAgent {
                    request_id: format!("agent-capacity-{id}-{revision}"),
                    node_id: id,
                    addr: record.addr.clone(),
                    capacity,
                    at_unix_ms: unix_ms(),
                },
            )
            .await?;
            if let Response::Rejected(r) = changed {
                return Err(rejected(&r));
            }
        }
    }
    let revision = node.sm.read(|s| s.vm_history().revision()).unwrap_or(0);
    Ok(heartbeat_answer(shared, node, status, revision))
}

/// Whether this node leads now.
fn leads(node: &Attached) -> bool {
    node.raft.metrics().borrow_watched().state == openraft::ServerState::Leader
}

/// A heartbeat's acknowledgement: the servers as this node knows them.
fn heartbeat_answer(
    shared: &ClusterShared,
    node: &Attached,
    status: AgentStatus,
    revision: u64,
) -> Bytes {
    let settings = shared.agent_settings;
    let (leader_id, servers) = {
        let m = node.raft.metrics();
        let m = m.borrow_watched();
        (
            m.current_leader.unwrap_or(0),
            members_pb(m.membership_config.membership()),
        )
    };
    pb::AgentHeartbeatResponse {
        status: status.name().into(),
        leader_id,
        servers,
        heartbeat_interval_ms: settings_ms(settings.heartbeat_interval),
        down_after_ms: settings_ms(settings.down_after),
        revision,
    }
    .encode_to_vec()
    .into()
}

/// Refuses (`Unavailable`) unless this leader is the only voter or a
/// majority acknowledged it within [`LEADER_QUORUM_FRESH`]; the agent
/// then turns to another server, which names the leader the majority
/// follows.
pub(crate) fn ensure_majority(node: &Attached) -> Result<(), Status> {
    // Read in place: this runs on every heartbeat the leader takes, and
    // the metrics (replication progress, membership) are not small.
    let watched = node.raft.metrics();
    let (alone, age) = {
        let m = watched.borrow_watched();
        (
            m.membership_config.membership().voter_ids().count() <= 1,
            m.last_quorum_acked
                .map(|at| openraft::Instant::elapsed(&at.into_inner())),
        )
    };
    majority_verdict(alone, age)
}

/// [`ensure_majority`]'s rule: `age` is the time since a majority last
/// acknowledged this leader (none yet: `None`).
fn majority_verdict(alone: bool, age: Option<Duration>) -> Result<(), Status> {
    match age {
        _ if alone => Ok(()),
        Some(age) if age <= LEADER_QUORUM_FRESH => Ok(()),
        Some(age) => Err(Status::unavailable(format!(
            "cluster/agentheartbeat: this leader has not been acknowledged by a majority of the servers for {} ms (bound {} ms): it may have been replaced; heartbeat to another server",
            age.as_millis(),
            LEADER_QUORUM_FRESH.as_millis()
        ))),
        None => Err(Status::unavailable(
            "cluster/agentheartbeat: this leader has not yet been acknowledged by a majority of the servers; heartbeat to another server or retry shortly",
        )),
    }
}

/// Serves `Cluster/AgentReport`.
pub(crate) async fn serve_report(
    node: &Arc<Attached>,
    ctx: &RequestContext,
    payload: Bytes,
) -> Result<Bytes, Status> {
    let req = pb::AgentReportRequest::decode(payload)
        .map_err(|e| Status::invalid_argument(format!("cluster/agentreport: {e}")))?;
    let (id, _) = caller_agent(node, &ctx.peer)?;
    check_own("cluster/agentreport", req.node_id, id)?;
    ensure_leader(node)?;
    let observed = match pb::VmState::try_from(req.observed) {
        Ok(pb::VmState::Running) => tern_state::VmState::Running,
        Ok(pb::VmState::Stopped) => tern_state::VmState::Stopped,
        Ok(pb::VmState::Failed) => tern_state::VmState::Failed,
        Ok(pb::VmState::Deleted) => tern_state::VmState::Deleted,
        _ => {
            return Err(Status::invalid_argument(format!(
                "cluster/agentreport: field `observed`: {} is not RUNNING, STOPPED, FAILED or DELETED",
                req.observed
            )));
        }
    };
    let vm_id = req.vm_id.clone();
    let written = write(
        node,
        Command::ReportVm {
            request_id: req.request_id,
            report: VmReport {
                vm_id: req.vm_id,
                node_id: id,
                observed,
                reason: req.reason,
                log_path: req.log_path,
            },
        },
    )
    .await?;
    match written {
        Response::Vm(vm) => {
            let network = node
                .sm
                .read(|s| tern_services::vm::network_of(s, &vm_id))
                .ok()
                .flatten();
            Ok(tern_services::vm::to_pb(&vm, network)
                .encode_to_vec()
                .into())
        }
        Response::Rejected(r) => Err(rejected(&r)),
        other => Err(Status::internal(format!("a report answered {other:?}"))),
    }
}

/// How long a server waits to apply an agent's `min_revision` before it
/// answers `Unavailable` (the agent tries another server): a follower a
/// heartbeat or two behind catches up well within it.
pub const MIN_REVISION_WAIT: Duration = Duration::from_secs(5);

/// Most assignment streams one agent may hold open on one server: its
/// own, and a second while a reconnect overlaps the old one's end. More
/// is an agent (or a stolen key) spending a server's work on copies.
pub const MAX_SYNC_STREAMS_PER_AGENT: usize = 2;

/// What one assignment message says, compared to decide whether to send.
#[derive(PartialEq)]
struct Said {
    vms: Vec<tern_state::AssignedVm>,
    status: AgentStatus,
    policy: Option<pb::TransportPolicy>,
    policy_source: String,
    servers: Vec<pb::Member>,
    grants: Vec<pb::AccessGrant>,
}

/// The caller's assignment, the revision it was read at, and its mark
/// (see [`crate::assignments`]).
fn said(node: &Attached, id: NodeId) -> Result<(Said, u64, u64), Status> {
    let servers = members_pb(
        node.raft
            .metrics()
            .borrow_watched()
            .membership_config
            .membership(),
    );
    node.sm
        .read(|s| {
            let (policy, policy_source) = match s.desired_policy(id) {
                Some((p, source)) => (Some(p.to_pb()), source.to_string()),
                None => (None, tern_state::PolicySource::Default.to_string()),
            };
            (
                Said {
                    vms: s.assignment(id),
                    status: s.agent(id).map_or(AgentStatus::Down, |a| a.status),
                    policy,
                    policy_source,
                    servers,
                    grants: crate::access::grants_pb(s),
                },
                s.vm_history().revision(),
                s.assignment_mark(id),
            )
        })
        .map_err(|e| Status::unavailable(format!("cannot read the cluster state: {e}")))
}

fn applied(node: &Attached) -> u64 {
    node.sm.read(|s| s.vm_history().revision()).unwrap_or(0)
}

/// Waits (at most [`MIN_REVISION_WAIT`]) until this server has applied
/// `min_revision`; `Unavailable` (try another server) if it does not.
async fn wait_for_revision(
    node: &Attached,
    changes: &mut tokio::sync::watch::Receiver<u64>,
    min_revision: u64,
) -> Result<(), Status> {
    if applied(node) >= min_revision {
        return Ok(());
    }
    let caught_up = tokio::time::timeout(MIN_REVISION_WAIT, async {
        while applied(node) < min_revision {
            if changes.changed().await.is_err() {
                break;
            }
        }
    })
    .await;
    if caught_up.is_err() || applied(node) < min_revision {
        return Err(Status::unavailable(format!(
            "this server has applied revision {}, behind the requested min_revision {min_revision} after {MIN_REVISION_WAIT:?}; try another server",
            applied(node),
        )));
    }
    Ok(())
}

/// Serves `Cluster/AgentSync`: the caller's assignment when the stream
/// opens and whenever it changes, until the caller goes or this server
/// stops. The stream reads the assignment when the hub
/// ([`crate::assignments`]) wakes it, and again at every progress
/// interval, so a change is sent within that interval whatever happens.
pub(crate) async fn serve_sync(
    shared: Arc<ClusterShared>,
    node: Arc<Attached>,
    ctx: RequestContext,
    request: Bytes,
    mut outbound: StreamSender,
) -> Result<(), Status> {
    let req = pb::AgentSyncRequest::decode(request)
        .map_err(|e| Status::invalid_argument(format!("cluster/agentsync: {e}")))?;
    let (id, _) = caller_agent(&node, &ctx.peer)?;
    let mut sub = Subscription::open(&shared, id)?;
    sub.follow(&node);
    {
        let mut changes = node.sm.changes();
        wait_for_revision(&node, &mut changes, req.min_revision).await?;
    }
    let mut sent: Option<Said> = None;
    let mut last = req.from_revision;
    tracing::debug!(agent = id, from = last, "assignment stream opened");
    let mut progress = false;
    loop {
        let (now, revision, mark) = said(&node, id)?;
        sub.read_at(mark);
        if sent.as_ref() != Some(&now) {
            last = revision;
            send(&mut outbound, &assignment(&now, revision), last).await?;
            sent = Some(now);
        } else if progress {
            let msg = pb::AgentAssignment {
                revision: last,
                progress: true,
                status: now.status.name().into(),
                ..pb::AgentAssignment::default()
            };
            send(&mut outbound, &msg, last).await?;
        }
        tokio::select! {
            r = sub.woken.changed() => {
                if r.is_err() {
                    return Err(Status::unavailable(format!(
                        "the server is shutting down; resume on another server from revision {last}"
                    )));
                }
                progress = false;
            },
            () = tokio::time::sleep(ASSIGNMENT_PROGRESS_INTERVAL) => progress = true,
        }
    }
}

fn assignment(now: &Said, revision: u64) -> pb::AgentAssignment {
    pb::AgentAssignment {
        revision,
        vms: tern_services::agent::to_pb_vms(&now.vms),
        progress: false,
        status: now.status.name().into(),
        policy: now.policy.clone(),
        policy_source: now.policy_source.clone(),
        servers: now.servers.clone(),
        grants: now.grants.clone(),
    }
}

async fn send(
    outbound: &mut StreamSender,
    msg: &pb::AgentAssignment,
    last: u64,
) -> Result<(), Status> {
    outbound
        .send(msg.encode_to_vec().into())
        .await
        .map_err(|e| {
            tracing::debug!(error = %e, last, "assignment stream ended by its agent");
            Status::unavailable(format!(
                "the assignment could not be sent (resume from revision {last}): {e}"
            ))
        })
}

/// Marks agents down when their heartbeats stop, while this node leads;
/// runs on every server until `stop` resolves. Also keeps
/// [`AGENTS`] and [`AGENT_HEARTBEAT_AGE_MAX`] current.
pub async fn watch_agents(raft: Arc<RaftNode>, stop: impl std::future::Future<Output = ()>) {
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(MONITOR_TICK) => {}
        }
        look(&raft).await;
    }
}

async fn look(raft: &RaftNode) {
    let shared = raft.services().shared();
    let now = Instant::now();
    let leads = raft.raft().metrics().borrow_watched().current_leader == Some(raft.id());
    // A server being demoted (still a member) is no agent to judge yet:
    // it runs its VMs as a server until it leaves the membership.
    let agents: Vec<(NodeId, AgentStatus, u64)> = raft
        .state()
        .read(|s| {
            s.agents()
                .iter()
                .filter(|(id, _)| !s.is_demoting(**id))
                .map(|(id, a)| (*id, a.status, a.since_unix_ms))
                .collect()
        })
        .unwrap_or_default();
    let ready = agents
        .iter()
        .filter(|(_, st, _)| *st == AgentStatus::Ready)
        .count();
    #[allow(clippy::cast_precision_loss)] // reason: a count of agents, far below 2^52.
    {
        metrics::gauge!(AGENTS, "status" => "ready").set(ready as f64);
        metrics::gauge!(AGENTS, "status" => "down").set((agents.len() - ready) as f64);
    }
    let down_after = shared.agent_settings.down_after;
    let Some(since) = shared.agents.leading(leads, now, down_after / 2) else {
        metrics::gauge!(AGENT_HEARTBEAT_AGE_MAX).set(0.0);
        return;
    };
    let mut oldest = Duration::ZERO;
    for (id, status, status_since) in agents {
        if status != AgentStatus::Ready {
            continue;
        }
        let age = now.saturating_duration_since(shared.agents.last_heard(id, since));
        oldest = oldest.max(age);
        if age < down_after {
            continue;
        }
        tracing::warn!(
            agent = id,
            silent_ms = age.as_millis(),
            bound_ms = down_after.as_millis(),
            "no heartbeat from an agent within the bound: marking it down and moving its VMs"
        );
        let command = Command::SetAgentStatus {
            request_id: format!("agent-down-{id}-{status_since}"),
            node_id: id,
            status: AgentStatus::Down,
            at_unix_ms: unix_ms(),
        };
        match tokio::time::timeout(
            crate::meta::WRITE_TIMEOUT,
            crate::node::client_write(raft.raft(), command),
        )
        .await
        {
            Ok(Ok(_)) => {
                metrics::counter!(AGENT_STATUS_CHANGES, "status" => "down").increment(1);
            }
            Ok(Err(e)) => {
                tracing::warn!(agent = id, error = %e, "could not mark an agent down; retrying")
            }
            Err(_) => tracing::warn!(agent = id, "marking an agent down timed out; retrying"),
        }
    }
    metrics::gauge!(AGENT_HEARTBEAT_AGE_MAX).set(oldest.as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_acknowledges_heartbeats_only_with_a_fresh_majority() {
        let fresh = LEADER_QUORUM_FRESH;
        assert!(majority_verdict(false, Some(Duration::ZERO)).is_ok());
        assert!(majority_verdict(false, Some(fresh)).is_ok());
        let stale = majority_verdict(false, Some(fresh + Duration::from_millis(1))).unwrap_err();
        assert_eq!(stale.code, Code::Unavailable);
        assert!(stale.message.contains("2001 ms"), "{}", stale.message);
        let never = majority_verdict(false, None).unwrap_err();
        assert_eq!(never.code, Code::Unavailable);
        // A single server is its own majority.
        assert!(majority_verdict(true, None).is_ok());
        assert!(majority_verdict(true, Some(fresh * 10)).is_ok());
        // The fence and a stop grace fit between the old leader's last
        // acknowledgement and the new leader's verdict (the module's
        // "Never twice").
        let fence = DEFAULT_AGENT_DOWN_AFTER / 3;
        assert!(fresh + fence + Duration::from_secs(10) < DEFAULT_AGENT_DOWN_AFTER);
    }

    #[test]
    fn a_new_leader_counts_every_agent_as_heard_when_it_took_over() {
        let t = AgentTracker::default();
        let pause = Duration::from_secs(100);
        let t0 = Instant::now();
        assert_eq!(t.leading(false, t0, pause), None);
        let since = t.leading(true, t0, pause).expect("leads");
        assert_eq!(
            t.last_heard(7, since),
            t0,
            "never heard: counted from the take-over"
        );
        let later = t0 + Duration::from_secs(5);
        t.heard(7, later);
        assert_eq!(t.last_heard(7, since), later);
        assert_eq!(
            t.leading(true, later + Duration::from_secs(1), pause),
            Some(t0),
            "still the same term of leading"
        );
        // Losing leadership forgets everything: the next take-over counts afresh.
        t.leading(false, later, pause);
        let again = later + Duration::from_secs(60);
        assert_eq!(t.leading(true, again, pause), Some(again));
        assert_eq!(t.last_heard(7, again), again);
    }

    #[test]
    fn a_pause_of_the_leader_itself_is_not_the_agents_silence() {
        let t = AgentTracker::default();
        let pause = Duration::from_secs(2);
        let t0 = Instant::now();
        t.leading(true, t0, pause);
        t.heard(7, t0);
        let tick = t0 + Duration::from_millis(500);
        assert_eq!(t.leading(true, tick, pause), Some(t0));
        // The process was stopped for 10 s: every agent counts as heard
        // when it resumed.
        let resumed = tick + Duration::from_secs(10);
        let since = t.leading(true, resumed, pause).expect("leads");
        assert_eq!(since, resumed);
        assert_eq!(t.last_heard(7, since), resumed);
    }

    #[test]
    fn writes_for_one_agent_are_spaced() {
        let t = AgentTracker::default();
        let key = PeerId::from_bytes([3; 32]);
        let t0 = Instant::now();
        assert!(t.allow_write(&key, t0).is_ok());
        let refused = t
            .allow_write(&key, t0 + Duration::from_millis(10))
            .expect_err("too soon");
        assert_eq!(refused.code, Code::ResourceExhausted);
        assert!(
            t.allow_write(&PeerId::from_bytes([4; 32]), t0).is_ok(),
            "per key"
        );
        assert!(t.allow_write(&key, t0 + MIN_AGENT_WRITE_GAP).is_ok());
    }

    #[test]
    fn an_agent_speaks_only_for_itself() {
        assert!(check_own("x", 3, 3).is_ok());
        let refused = check_own("x", 4, 3).expect_err("another's id");
        assert_eq!(refused.code, Code::PermissionDenied);
        assert!(refused.message.contains("node 3"), "{}", refused.message);
    }

    #[test]
    fn declared_capacity_is_cut_to_the_maximum() {
        let max = Capacity {
            vcpus: 4,
            memory_mib: 1024,
        };
        let c = capped(
            Some(pb::Capacity {
                vcpus: 64,
                memory_mib: 512,
            }),
            max,
        );
        assert_eq!(
            c,
            Capacity {
                vcpus: 4,
                memory_mib: 512
            }
        );
        assert_eq!(capped(None, max), Capacity::default());
    }
}
