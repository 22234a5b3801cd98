//! The serving side of Raft: the `Raft` service (votes, append entries,
//! snapshot chunks, proposals from members) as a [`Handler`] any transport
//! serves.
//!
//! [`RaftService`] exists before the Raft instance does, so that a node
//! can hand its handler to the transports, take the transports' client,
//! and only then start Raft over that client. Until it is
//! [attached](RaftService::attach) to a running node, and after it is
//! detached at shutdown, every call is answered `Unavailable`. The
//! `Cluster` service (join, leave, members, metadata, access) is
//! `tern-cluster`'s and reads the same [`Attached`] node.
//!
//! # Who may call
//!
//! Identity is always `RequestContext::peer`, the key the transport
//! authenticated; nothing a caller writes in a message identifies it.
//!
//! - **Raft methods:** only nodes in this node's current membership (voters
//!   and learners, joint configurations included). A node whose membership
//!   is still empty (it is joining) trusts exactly the members named in
//!   the join answer it got from the cluster, each as the node id the
//!   answer gave it, until the first membership reaches it. Everyone else
//!   gets `PermissionDenied` ("not a member") and a warning in the log.
//! - **Raft messages name their sender.** The caller's node id is the id
//!   its authenticated key holds in that membership. A vote or pre-vote
//!   whose candidate, an append-entries, snapshot chunk or leadership
//!   transfer whose leader (the vote's `leader_id.node_id`) is another
//!   node is refused with `PermissionDenied` and a warning naming both
//!   ids: a member cannot pose as a candidate or leader it is not.
//! - **Raft/Propose** commits only what [`check_proposal`] allows: the
//!   caller's reports about its own VMs and the VM writes a member's VM
//!   service forwards; never membership, metadata or raw record writes.
//!   Every proposal passes the write limits
//!   ([`tern_state::limits::check_command`]) before it is proposed.
//!
//! Known limit: a member that missed the entry adding a node refuses that
//! node's Raft calls until another leader brings it up to date (if the new
//! node is the leader meanwhile, the lagging member stays behind until
//! leadership moves).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, LazyLock, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use openraft::Snapshot;
use openraft::async_runtime::WatchReceiver;
use prost::Message;
use tern_protocol::catalog::methods;
use tern_protocol::{
    BoxFuture, Code, Handler, Method, PeerId, RequestContext, RouteError, Routes, ServiceId,
    Status, pb,
};
use tern_state::{Command, NodeId};
use tern_store::{SnapshotFile, SnapshotMeta, StateMachineStore, TypeConfig, Vote};

use crate::codec;
use crate::wire::{self, ControlRequest, ControlResponse, SnapshotAck};

/// The Raft instance type of a Tern node.
pub type RaftInstance = openraft::Raft<TypeConfig, StateMachineStore>;

/// A snapshot transfer with no chunk for this long is abandoned and its
/// temporary file removed; the leader restarts the transfer anyway after
/// its per-chunk deadline passes.
pub const SNAPSHOT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Snapshot transfers received at once (one per sending leader; more than
/// a couple means leaders churned and old transfers are stale).
pub const MAX_INCOMING_SNAPSHOTS: usize = 4;

/// The running node the handlers serve.
pub struct Attached {
    /// The Raft instance.
    pub raft: RaftInstance,
    /// Its state machine, for reads of the applied state.
    pub sm: StateMachineStore,
    /// This node's id.
    pub id: NodeId,
    /// The node's client, for calls a handler forwards to the leader.
    pub client: Arc<dyn tern_protocol::RpcClient>,
}

impl Attached {
    /// Whether `peer` is in this node's effective membership (voter or
    /// learner).
    pub fn is_member(&self, peer: &PeerId) -> bool {
        let membership = self
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .clone();
        membership
            .membership()
            .nodes()
            .any(|(_, m)| m.peer_id() == *peer)
    }
}

/// A snapshot being received from one sender.
struct Incoming {
    snapshot_id: String,
    file: SnapshotFile,
    next_offset: u64,
    touched: Instant,
}

impl Incoming {
    fn discard(self) {
        if let Err(e) = std::fs::remove_file(self.file.path()) {
            tracing::debug!(file = ?self.file.path(), error = %e, "removing abandoned snapshot file");
        }
    }
}

struct Shared {
    attached: RwLock<Option<Arc<Attached>>>,
    /// Peers (with their node ids) trusted for Raft calls while this
    /// node's membership is empty.
    bootstrap: RwLock<BTreeMap<PeerId, NodeId>>,
    incoming: Mutex<HashMap<PeerId, Incoming>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// The Raft service of one node; see the module docs. Cloning is cheap and
/// clones share everything.
#[derive(Clone)]
pub struct RaftService {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RaftService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftService")
            .field("attached", &self.attached().map(|a| a.id))
            .finish_non_exhaustive()
    }
}

impl Default for RaftService {
    fn default() -> Self {
        RaftService::new()
    }
}

impl RaftService {
    /// A service not attached to a node yet.
    pub fn new() -> RaftService {
        RaftService {
            shared: Arc::new(Shared {
                attached: RwLock::new(None),
                bootstrap: RwLock::new(BTreeMap::new()),
                incoming: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The handler of [`ServiceId::Raft`].
    pub fn handler(&self) -> Arc<dyn Handler> {
        Arc::new(RaftHandler {
            shared: self.shared.clone(),
        })
    }

    /// Serves `attached` from now on.
    pub fn attach(&self, attached: Arc<Attached>) {
        *self
            .shared
            .attached
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(attached);
    }

    /// Stops serving (every call answers `Unavailable`) and discards
    /// snapshot transfers in progress.
    pub fn detach(&self) {
        *self
            .shared
            .attached
            .write()
            .unwrap_or_else(|p| p.into_inner()) = None;
        for (_, incoming) in lock(&self.shared.incoming).drain() {
            incoming.discard();
        }
    }

    /// The node served, if attached.
    pub fn attached(&self) -> Option<Arc<Attached>> {
        self.shared.attached()
    }

    /// The node served, or `Unavailable` when none is attached.
    pub fn node(&self) -> Result<Arc<Attached>, Status> {
        self.shared.node()
    }

    /// Trusts `members` (node id and identity) for Raft calls until this
    /// node's membership is no longer empty: the members a join answer
    /// named, so that the leader can replicate to a joiner that does not
    /// know the membership yet. Each is trusted only as its own node id.
    pub fn trust_until_first_membership(
        &self,
        members: impl IntoIterator<Item = (NodeId, PeerId)>,
    ) {
        self.shared
            .bootstrap
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .extend(members.into_iter().map(|(id, peer)| (peer, id)));
    }
}

impl Shared {
    fn attached(&self) -> Option<Arc<Attached>> {
        self.attached
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn node(&self) -> Result<Arc<Attached>, Status> {
        self.attached().ok_or_else(|| {
            Status::unavailable("Raft is not running on this node (starting or stopped)")
        })
    }

    /// The node ids `peer` holds in this node's effective membership (or,
    /// while that is empty, in the join answer): empty when it may not
    /// call Raft methods (see the module docs). A peer normally holds one
    /// id; a set keeps the check exact if a membership ever names it twice.
    fn raft_caller_ids(&self, node: &Attached, peer: &PeerId) -> BTreeSet<NodeId> {
        let membership = node
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .clone();
        let membership = membership.membership();
        let mut empty = true;
        let mut ids = BTreeSet::new();
        for (id, member) in membership.nodes() {
            empty = false;
            if member.peer_id() == *peer {
                ids.insert(*id);
            }
        }
        if empty
            && let Some(id) = self
                .bootstrap
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(peer)
        {
            ids.insert(*id);
        }
        ids
    }
}

/// `PermissionDenied` for a caller outside the membership, logged.
pub fn not_a_member(peer: &PeerId, method: &Method, why: &str) -> Status {
    tracing::warn!(caller = %peer.short(), method = %method.label(), "refused: {why}");
    Status::permission_denied(format!(
        "not a member of this cluster: node {} may not call {} ({why})",
        peer.short(),
        method.label()
    ))
}

fn failed_precondition(message: impl Into<String>) -> Status {
    Status::new(Code::FailedPrecondition, message)
}

fn resource_exhausted(message: impl Into<String>) -> Status {
    Status::new(Code::ResourceExhausted, message)
}

fn deadline_exceeded(message: impl Into<String>) -> Status {
    Status::new(Code::DeadlineExceeded, message)
}

/// `Unavailable`: Raft stopped on this node.
pub fn raft_stopped(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("Raft stopped on this node: {e}"))
}

fn encode_answer<T: serde::Serialize>(value: &T) -> Result<Bytes, Status> {
    wire::wrap(value).map_err(|e| Status::internal(format!("cannot encode Raft answer: {e}")))
}

/// Runs `work` until the caller's deadline, if it set one.
pub async fn within_deadline<T>(
    ctx: &RequestContext,
    work: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    match ctx.deadline {
        Some(deadline) => tokio::time::timeout_at(deadline.into(), work)
            .await
            .unwrap_or_else(|_| Err(deadline_exceeded("the caller's deadline passed"))),
        None => work.await,
    }
}

struct RaftHandler {
    shared: Arc<Shared>,
}

impl Handler for RaftHandler {
    fn handle(
        &self,
        ctx: RequestContext,
        method: &'static Method,
        payload: Bytes,
    ) -> BoxFuture<'static, Result<Bytes, Status>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            let node = shared.node()?;
            let caller = Caller {
                peer: ctx.peer,
                ids: shared.raft_caller_ids(&node, &ctx.peer),
            };
            if caller.ids.is_empty() {
                return Err(not_a_member(
                    &ctx.peer,
                    method,
                    "Raft methods are for current members",
                ));
            }
            within_deadline(
                &ctx,
                serve_raft(&shared, &node, &ctx, &caller, method, payload),
            )
            .await
        })
    }

    /// `Raft/AppendStream` (pipelined replication, see
    /// [`crate::append_stream`]): members only, like every Raft call, and
    /// every message is checked like a unary append (it must name its
    /// caller as the leader), judged again per message.
    fn handle_stream(
        &self,
        ctx: RequestContext,
        method: &'static Method,
        request: Bytes,
        inbound: tern_protocol::StreamReceiver,
        outbound: tern_protocol::StreamSender,
    ) -> BoxFuture<'static, Result<(), Status>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            let node = shared.node()?;
            if shared.raft_caller_ids(&node, &ctx.peer).is_empty() {
                return Err(not_a_member(
                    &ctx.peer,
                    method,
                    "Raft methods are for current members",
                ));
            }
            let route = ROUTES.stream_route(method)?;
            route(shared, node, ctx, method, request, inbound, outbound).await
        })
    }
}

/// `Raft/AppendStream`: every message is checked like a unary append (it
/// must name its caller as the leader), judged again per message.
fn serve_append_stream(
    shared: Arc<Shared>,
    node: Arc<Attached>,
    ctx: RequestContext,
    method: &'static Method,
    request: Bytes,
    inbound: tern_protocol::StreamReceiver,
    outbound: tern_protocol::StreamSender,
) -> BoxFuture<'static, Result<(), Status>> {
    let peer = ctx.peer;
    let raft = node.raft.clone();
    let check = shared;
    let authorize: crate::append_stream::Authorize = Box::new(move |leader| {
        // The membership may change while the stream is open: a
        // caller removed since is refused from its next message.
        let Some(node) = check.attached() else {
            return Err(Status::unavailable(
                "Raft is not running on this node (starting or stopped)",
            ));
        };
        let caller = Caller {
            peer,
            ids: check.raft_caller_ids(&node, &peer),
        };
        if caller.ids.is_empty() {
            return Err(not_a_member(
                &peer,
                method,
                "Raft methods are for current members",
            ));
        }
        caller.must_be(leader, "an append-entries request", "leader")
    });
    Box::pin(async move {
        crate::append_stream::serve(raft, authorize, request, inbound, outbound)
            .await
            .map_err(crate::append_stream::AppendStreamError::into_status)
    })
}

/// Who called a Raft method: the identity the transport authenticated and
/// the node ids it holds in this node's membership (never empty once the
/// call is admitted).
struct Caller {
    peer: PeerId,
    ids: BTreeSet<NodeId>,
}

impl Caller {
    /// `Ok` when a message naming node `named` as its `role` (candidate,
    /// leader) comes from that node; `PermissionDenied`, logged with both
    /// ids, when it names another.
    fn must_be(&self, named: NodeId, what: &str, role: &str) -> Result<(), Status> {
        if self.ids.contains(&named) {
            return Ok(());
        }
        tracing::warn!(
            caller = %self.peer.short(),
            caller_ids = ?self.ids,
            named,
            message = what,
            "refused: a Raft message naming another node as its {role}"
        );
        Err(Status::permission_denied(format!(
            "{what} must come from its {role}: it names node {named}, but the caller {} is node {}",
            self.peer.short(),
            self.ids_text()
        )))
    }

    fn ids_text(&self) -> String {
        let ids: Vec<String> = self.ids.iter().map(ToString::to_string).collect();
        ids.join(" or ")
    }
}

/// Why the leader refuses to commit a command a member sent with
/// `Raft/Propose`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeRefused {
    /// The command is not one a member may ask for (see
    /// [`check_proposal`]).
    #[error(
        "{command} may not be proposed by a member: Raft/Propose carries only a member's reports \
         about its own VMs and the VM writes (create, start, stop, delete, migrate) its VM \
         service forwards"
    )]
    NotAllowed {
        /// The command's name.
        command: &'static str,
    },
    /// A VM report names another node as the reporter.
    #[error(
        "report-vm names node {reporter} as reporter, but the caller is node {caller}: \
         a node reports only on itself"
    )]
    NotTheReporter {
        /// The node the report names.
        reporter: NodeId,
        /// The caller's node id(s).
        caller: String,
    },
    /// A label change names another node.
    #[error(
        "set-node-labels names node {node}, but the caller is node {caller}: \
         a node records only its own labels"
    )]
    NotTheLabelledNode {
        /// The node the change names.
        node: NodeId,
        /// The caller's node id(s).
        caller: String,
    },
}

/// The name of a command, for refusals and logs.
pub fn command_name(command: &Command) -> &'static str {
    match command {
        Command::AllocateNodeId { .. } => "allocate-node-id",
        Command::PutVm { .. } => "put-vm",
        Command::DeleteVm { .. } => "delete-vm",
        Command::CreateVm { .. } => "create-vm",
        Command::SetVmDesired { .. } => "set-vm-desired",
        Command::ReportVm { .. } => "report-vm",
        Command::MigrateVm { .. } => "migrate-vm",
        Command::PutMeta { .. } => "put-meta",
        Command::ChangeAccess { .. } => "change-access",
        Command::CreateJoinToken { .. } => "create-join-token",
        Command::RevokeJoinToken { .. } => "revoke-join-token",
        Command::AdmitNode { .. } => "admit-node",
        Command::RecordMembership { .. } => "record-membership",
        Command::SetNetworkPool { .. } => "set-network-pool",
        Command::CreateVmWithData { .. } => "create-vm-with-data",
        Command::SetNodeLabels { .. } => "set-node-labels",
        Command::SetTransportPolicy { .. } => "set-transport-policy",
        Command::Rollout { .. } => "rollout",
        Command::RegisterAgent { .. } => "register-agent",
        Command::SetAgentStatus { .. } => "set-agent-status",
        Command::RemoveAgent { .. } => "remove-agent",
        Command::DemoteServer { .. } => "demote-server",
    }
}

/// What a member may ask the leader to commit with `Raft/Propose` (the
/// path a follower's writes take, see `propose` in `tern-cluster`):
///
/// - [`Command::ReportVm`] naming the caller itself as the reporter (its
///   reconciler's observation of a VM placed on it; the state refuses a
///   report from a node the VM is not placed on);
/// - [`Command::SetNodeLabels`] naming the caller itself (a node records
///   its own labels);
/// - [`Command::CreateVm`] (and [`Command::CreateVmWithData`]),
///   [`Command::SetVmDesired`] and
///   [`Command::MigrateVm`]: an operator's VM call that reached a
///   follower, whose VM service checked it and writes it through its
///   consensus, which forwards here.
///
/// Everything else is refused: [`Command::AllocateNodeId`] (membership is
/// changed only by `Cluster/Join` and `Cluster/Leave`, which check the
/// token and the caller), [`Command::PutMeta`] (it has `Cluster/MetaPut`),
/// the admission commands (tokens, admissions and membership records: the
/// leader's alone), [`Command::SetNetworkPool`] (the leader proposes its
/// configured pool itself), [`Command::SetTransportPolicy`] (it has
/// `Cluster/TransportSet`, where the operator role is checked),
/// [`Command::Rollout`] (it has `Cluster/Rollout`, operator role; the
/// driver runs on the leader), and the raw record writes [`Command::PutVm`] and
/// [`Command::DeleteVm`]
/// (tools and tests on the leader only). The match names every command,
/// so a new one is refused here until someone decides otherwise.
pub fn check_proposal(command: &Command, caller: &BTreeSet<NodeId>) -> Result<(), ProposeRefused> {
    match command {
        Command::ReportVm { report, .. } => {
            if caller.contains(&report.node_id) {
                Ok(())
            } else {
                let ids: Vec<String> = caller.iter().map(ToString::to_string).collect();
                Err(ProposeRefused::NotTheReporter {
                    reporter: report.node_id,
                    caller: ids.join(" or "),
                })
            }
        }
        Command::SetNodeLabels { node_id, .. } => {
            if caller.contains(node_id) {
                Ok(())
            } else {
                let ids: Vec<String> = caller.iter().map(ToString::to_string).collect();
                Err(ProposeRefused::NotTheLabelledNode {
                    node: *node_id,
                    caller: ids.join(" or "),
                })
            }
        }
        Command::CreateVm { .. }
        | Command::CreateVmWithData { .. }
        | Command::SetVmDesired { .. }
        | Command::MigrateVm { .. } => Ok(()),
        Command::AllocateNodeId { .. }
        | Command::PutVm { .. }
        | Command::DeleteVm { .. }
        | Command::PutMeta { .. }
        | Command::ChangeAccess { .. }
        | Command::CreateJoinToken { .. }
        | Command::RevokeJoinToken { .. }
        | Command::AdmitNode { .. }
        | Command::RecordMembership { .. }
        | Command::SetNetworkPool { .. }
        | Command::SetTransportPolicy { .. }
        | Command::RegisterAgent { .. }
        | Command::SetAgentStatus { .. }
        | Command::RemoveAgent { .. }
        | Command::DemoteServer { .. }
        | Command::Rollout { .. } => Err(ProposeRefused::NotAllowed {
            command: command_name(command),
        }),
    }
}

/// One admitted Raft call, as its route sees it.
struct RaftCall<'a> {
    shared: &'a Shared,
    node: &'a Attached,
    ctx: &'a RequestContext,
    caller: &'a Caller,
    method: &'static Method,
}

impl RaftCall<'_> {
    /// `InvalidArgument` naming the method, for a payload that does not
    /// decode.
    fn bad(&self, e: wire::EnvelopeError) -> Status {
        Status::invalid_argument(format!("{}: {e}", self.method.label()))
    }
}

/// A unary Raft method.
type Route = for<'a> fn(RaftCall<'a>, Bytes) -> BoxFuture<'a, Result<Bytes, Status>>;

/// A streaming Raft method (called after the membership check).
type StreamRoute = fn(
    Arc<Shared>,
    Arc<Attached>,
    RequestContext,
    &'static Method,
    Bytes,
    tern_protocol::StreamReceiver,
    tern_protocol::StreamSender,
) -> BoxFuture<'static, Result<(), Status>>;

static ROUTES: LazyLock<Routes<Route, StreamRoute>> = LazyLock::new(|| {
    routes().expect("the Raft routes are valid (the `routes_cover_the_catalogue` test builds them)")
});

fn routes() -> Result<Routes<Route, StreamRoute>, RouteError> {
    Routes::<Route, StreamRoute>::new(ServiceId::Raft)
        .unary(methods::RAFT_APPEND_ENTRIES, |call, payload| {
            Box::pin(serve_append_entries(call, payload))
        })?
        .unary(methods::RAFT_VOTE, |call, payload| {
            Box::pin(serve_vote(call, payload))
        })?
        .unary(methods::RAFT_SNAPSHOT, |call, payload| {
            Box::pin(serve_snapshot(call, payload))
        })?
        .unary(methods::RAFT_PROPOSE, |call, payload| {
            Box::pin(serve_propose(call, payload))
        })?
        .stream(methods::RAFT_APPEND_STREAM, serve_append_stream)
}

async fn serve_raft(
    shared: &Shared,
    node: &Attached,
    ctx: &RequestContext,
    caller: &Caller,
    method: &'static Method,
    payload: Bytes,
) -> Result<Bytes, Status> {
    let route = ROUTES.route(method)?;
    let call = RaftCall {
        shared,
        node,
        ctx,
        caller,
        method,
    };
    route(call, payload).await
}

/// `Raft/AppendEntries`.
async fn serve_append_entries(call: RaftCall<'_>, payload: Bytes) -> Result<Bytes, Status> {
    let data = wire::unwrap_bytes(payload).map_err(|e| call.bad(e))?;
    let req =
        codec::decode_append_entries(&data).map_err(|e| call.bad(wire::EnvelopeError::Codec(e)))?;
    call.caller.must_be(
        req.vote.leader_id.node_id,
        "an append-entries request",
        "leader",
    )?;
    let resp = call
        .node
        .raft
        .append_entries(req)
        .await
        .map_err(raft_stopped)?;
    encode_answer(&resp)
}

/// `Raft/Vote`: votes, pre-votes and leadership transfers.
async fn serve_vote(call: RaftCall<'_>, payload: Bytes) -> Result<Bytes, Status> {
    let (caller, raft) = (call.caller, &call.node.raft);
    let answer = match wire::unwrap::<ControlRequest>(payload).map_err(|e| call.bad(e))? {
        ControlRequest::Vote(req) => {
            caller.must_be(req.vote.leader_id.node_id, "a vote request", "candidate")?;
            ControlResponse::Vote(raft.vote(req).await.map_err(raft_stopped)?)
        }
        ControlRequest::PreVote(req) => {
            caller.must_be(
                req.vote.leader_id.node_id,
                "a pre-vote request",
                "candidate",
            )?;
            ControlResponse::Vote(raft.pre_vote(req).await.map_err(raft_stopped)?)
        }
        ControlRequest::TransferLeader(req) => {
            caller.must_be(
                req.from_leader().leader_id.node_id,
                "a leadership transfer",
                "leader",
            )?;
            ControlResponse::TransferLeader(
                raft.handle_transfer_leader(req)
                    .await
                    .map_err(raft_stopped)?,
            )
        }
    };
    encode_answer(&answer)
}

/// `Raft/Snapshot`: one chunk.
async fn serve_snapshot(call: RaftCall<'_>, payload: Bytes) -> Result<Bytes, Status> {
    let chunk = pb::SnapshotChunk::decode(payload)
        .map_err(|e| Status::invalid_argument(format!("raft/snapshot: {e}")))?;
    receive_chunk(call.shared, call.node, call.caller, chunk).await
}

/// `Raft/Propose`: a member's write, committed here on its behalf (see
/// `check_proposal` for which). Only a leader commits; a follower answers
/// FailedPrecondition naming the leader.
async fn serve_propose(call: RaftCall<'_>, payload: Bytes) -> Result<Bytes, Status> {
    // Limits before work: a payload that cannot hold an acceptable
    // command is refused before it is decoded.
    let max = tern_state::limits::MAX_REQUEST_BYTES + wire::ENVELOPE_OVERHEAD;
    if payload.len() > max {
        return Err(resource_exhausted(format!(
            "raft/propose: a proposal of {} bytes; at most {} bytes may be written to the \
             cluster state at once",
            payload.len(),
            tern_state::limits::MAX_REQUEST_BYTES
        )));
    }
    let command: Command = wire::unwrap(payload).map_err(|e| call.bad(e))?;
    if let Err(why) = check_proposal(&command, &call.caller.ids) {
        tracing::warn!(
            caller = %call.ctx.peer.short(),
            caller_ids = ?call.caller.ids,
            command = command_name(&command),
            "refused a proposal: {why}"
        );
        return Err(Status::permission_denied(why.to_string()));
    }
    let written = crate::write::client_write(&call.node.raft, command)
        .await
        .map_err(crate::write::WriteError::into_status)?;
    encode_answer(&written.data)
}

/// Stores one chunk; installs the snapshot after the last one.
async fn receive_chunk(
    shared: &Shared,
    node: &Attached,
    caller: &Caller,
    chunk: pb::SnapshotChunk,
) -> Result<Bytes, Status> {
    let peer = caller.peer;
    let vote: Vote = codec::decode(&chunk.vote)
        .map_err(|e| Status::invalid_argument(format!("snapshot vote: {e}")))?;
    caller.must_be(vote.leader_id.node_id, "a snapshot chunk", "leader")?;
    // Take this sender's transfer out of the table while its chunk is
    // written (chunks of one transfer arrive one at a time).
    let incoming = {
        let mut table = lock(&shared.incoming);
        let now = Instant::now();
        let stale: Vec<PeerId> = table
            .iter()
            .filter(|(_, t)| now.duration_since(t.touched) > SNAPSHOT_IDLE_TIMEOUT)
            .map(|(p, _)| *p)
            .collect();
        for p in stale {
            if let Some(t) = table.remove(&p) {
                tracing::info!(sender = %p.short(), id = %t.snapshot_id, "abandoning idle snapshot transfer");
                t.discard();
            }
        }
        match table.remove(&peer) {
            Some(t) if t.snapshot_id == chunk.snapshot_id => t,
            previous => {
                if let Some(old) = previous {
                    old.discard();
                }
                if chunk.offset != 0 {
                    return Err(failed_precondition(format!(
                        "no snapshot transfer {:?} in progress; start again at offset 0",
                        chunk.snapshot_id
                    )));
                }
                if table.len() >= MAX_INCOMING_SNAPSHOTS {
                    return Err(resource_exhausted(
                        "too many snapshot transfers in progress",
                    ));
                }
                let file = node
                    .sm
                    .begin_receiving_snapshot()
                    .map_err(|e| Status::internal(format!("cannot create a snapshot file: {e}")))?;
                tracing::info!(sender = %peer.short(), id = %chunk.snapshot_id, "receiving snapshot");
                Incoming {
                    snapshot_id: chunk.snapshot_id.clone(),
                    file,
                    next_offset: 0,
                    touched: now,
                }
            }
        }
    };
    if chunk.offset != incoming.next_offset {
        let expected = incoming.next_offset;
        incoming.discard();
        return Err(failed_precondition(format!(
            "snapshot chunk at offset {} but {} bytes were received; start again",
            chunk.offset, expected
        )));
    }
    let data = chunk.data;
    let offset = chunk.offset;
    let written = tokio::task::spawn_blocking(move || {
        let result = incoming.file.write_at(offset, &data);
        (incoming, result.map(|()| data.len() as u64))
    })
    .await
    .map_err(|e| Status::internal(format!("snapshot write task: {e}")))?;
    let (mut incoming, result) = written;
    let len = match result {
        Ok(len) => len,
        Err(e) => {
            incoming.discard();
            return Err(resource_exhausted(format!(
                "cannot store snapshot chunk: {e}"
            )));
        }
    };
    incoming.next_offset += len;
    incoming.touched = Instant::now();
    if !chunk.done {
        let next_offset = incoming.next_offset;
        lock(&shared.incoming).insert(peer, incoming);
        return encode_answer(&SnapshotAck::Continue { next_offset });
    }
    let meta: SnapshotMeta = match codec::decode(&chunk.meta) {
        Ok(meta) => meta,
        Err(e) => {
            incoming.discard();
            return Err(Status::invalid_argument(format!("snapshot meta: {e}")));
        }
    };
    tracing::info!(sender = %peer.short(), id = %incoming.snapshot_id, bytes = incoming.next_offset, "installing received snapshot");
    let snapshot = Snapshot {
        meta,
        snapshot: incoming.file,
    };
    let resp = node
        .raft
        .install_full_snapshot(vote, snapshot)
        .await
        .map_err(raft_stopped)?;
    encode_answer(&SnapshotAck::Done(resp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_cover_the_catalogue() {
        let routes = routes().expect("the routes are valid");
        let missing: Vec<String> = routes.missing().iter().map(|m| m.label()).collect();
        assert!(missing.is_empty(), "methods without a route: {missing:?}");
    }

    #[test]
    fn proposals_carry_only_a_members_own_writes() {
        use tern_state::{VmReport, VmSpec, VmState};
        let me = BTreeSet::from([3]);
        let report = |node_id| Command::ReportVm {
            request_id: "r".into(),
            report: VmReport {
                vm_id: "vm-1".into(),
                node_id,
                observed: VmState::Running,
                reason: String::new(),
                log_path: String::new(),
            },
        };
        assert_eq!(check_proposal(&report(3), &me), Ok(()));
        let err = check_proposal(&report(4), &me).unwrap_err();
        assert!(err.to_string().contains("node 4"), "{err}");
        assert!(err.to_string().contains("node 3"), "{err}");
        let create = Command::CreateVm {
            request_id: "c".into(),
            spec: Box::new(VmSpec::default()),
        };
        assert_eq!(check_proposal(&create, &me), Ok(()));
        let allocate = Command::AllocateNodeId {
            request_id: "a".into(),
            peer: PeerId::from_bytes([1; 32]),
        };
        let err = check_proposal(&allocate, &me).unwrap_err();
        assert_eq!(
            err,
            ProposeRefused::NotAllowed {
                command: "allocate-node-id"
            }
        );
        assert!(err.to_string().starts_with("allocate-node-id"), "{err}");
        // A member cannot set the cluster's address pool through the
        // leader; a create with user data is an operator's VM call.
        let pool = Command::SetNetworkPool {
            request_id: "p".into(),
            pool: "10.1.0.0/16".parse().unwrap(),
        };
        assert_eq!(
            check_proposal(&pool, &me),
            Err(ProposeRefused::NotAllowed {
                command: "set-network-pool"
            })
        );
        let with_data = Command::CreateVmWithData {
            request_id: "d".into(),
            spec: Box::new(VmSpec::default()),
            user_data: "x".into(),
        };
        assert_eq!(check_proposal(&with_data, &me), Ok(()));
        // A node records its own labels only; policies go through
        // Cluster/TransportSet, where the operator role is checked.
        let labels = |node_id| Command::SetNodeLabels {
            request_id: "l".into(),
            node_id,
            labels: [("zone".to_owned(), "a".to_owned())].into(),
        };
        let mine = *me.iter().next().unwrap();
        assert_eq!(check_proposal(&labels(mine), &me), Ok(()));
        assert!(matches!(
            check_proposal(&labels(mine + 100), &me),
            Err(ProposeRefused::NotTheLabelledNode { .. })
        ));
        let policy = Command::SetTransportPolicy {
            request_id: "t".into(),
            target: tern_state::PolicyTarget::All,
            policy: None,
        };
        assert_eq!(
            check_proposal(&policy, &me),
            Err(ProposeRefused::NotAllowed {
                command: "set-transport-policy"
            })
        );
    }
}
