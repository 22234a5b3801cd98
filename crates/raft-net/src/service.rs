//! The serving side: the `Raft` service (votes, append entries, snapshot
//! chunks) and the `Cluster` service (join, leave, members), as
//! [`Handler`]s any transport serves.
//!
//! [`RaftServices`] exists before the Raft instance does, so that a node
//! can hand its handlers to the transports, take the transports' client,
//! and only then start Raft over that client. Until [`RaftServices`] is
//! attached to a running node (by [`crate::RaftNode::start`]), and after it
//! is detached at shutdown, every call is answered `Unavailable`.
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
//! - **Cluster/Join:** a member, or a caller presenting the join token
//!   (compared in constant time). A node joins only as itself: the address
//!   in the request must carry the caller's own id, and within the
//!   address limits ([`tern_state::limits::check_member`]).
//! - **Cluster/Leave:** a member removes only itself; an admin (access
//!   table) removes any node.
//! - **Cluster/Members:** any authenticated caller (read-only; the same
//!   facts the Status service shows); a joiner uses it to find the leader.
//! - **Cluster/MetaPut, Cluster/MetaGet:** any authenticated caller, as for
//!   the VM service (see [`crate::meta`]: linearizable reads, forwarding).
//!
//! Known limit: a member that missed the entry adding a node refuses that
//! node's Raft calls until another leader brings it up to date (if the new
//! node is the leader meanwhile, the lagging member stays behind until
//! leadership moves).
//!
//! # Join and leave
//!
//! Join and Leave are served by the leader; a follower answers
//! `FailedPrecondition` naming the leader, and the caller retries there
//! (`Cluster/Members` gives the leader's id and address;
//! [`crate::request_join`] does this). The leader allocates the node id
//! with [`Command::AllocateNodeId`] (the same peer always gets the id it
//! holds; an id once released is never handed out again), adds the node
//! as a learner, answers with the id at once (the joiner cannot start its
//! Raft before it knows its id), and promotes the learner to voter in the
//! background once it has caught up. Leave removes the node from the
//! voters, then from the cluster; a leader asked to remove itself hands
//! leadership over first and asks the caller to retry at the new leader.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use openraft::async_runtime::WatchReceiver;
use openraft::errors::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::raft::ClientWriteResponse;
use openraft::{ChangeMembers, ServerState, Snapshot};
use prost::Message;
use tern_protocol::catalog::methods;
use tern_protocol::{
    BoxFuture, Code, Dispatcher, Handler, Method, PeerAddr, PeerId, RequestContext, ServiceId,
    Status, pb,
};
use tern_state::{Capacity, Command, Member, NodeId, Response};
use tern_store::{Membership, SnapshotFile, SnapshotMeta, StateMachineStore, TypeConfig, Vote};

use crate::codec;
use crate::wire::{self, ControlRequest, ControlResponse, SnapshotAck};

/// The Raft instance type of a Tern node.
pub type RaftInstance = openraft::Raft<TypeConfig, StateMachineStore>;

/// How long a learner has to catch up before the leader gives up
/// promoting it (the joiner then fails its wait and may join again, which
/// restarts the promotion). Generous: a learner far behind first receives
/// a snapshot.
pub const PROMOTION_TIMEOUT: Duration = Duration::from_secs(120);

/// A learner this many entries behind the leader's last log counts as
/// caught up: close enough that its first rounds as a voter do not stall
/// commits, loose enough to be reached under a steady write load.
pub const PROMOTION_MAX_LAG: u64 = 64;

/// How long a membership change waits for the previous one to be
/// committed (a joint configuration to become uniform) before it gives
/// up: a few rounds of replication.
pub const MEMBERSHIP_SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Attempts of one membership change that finds another in progress.
pub const MEMBERSHIP_CHANGE_ATTEMPTS: usize = 5;

/// A snapshot transfer with no chunk for this long is abandoned and its
/// temporary file removed; the leader restarts the transfer anyway after
/// its per-chunk deadline passes.
pub const SNAPSHOT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Snapshot transfers received at once (one per sending leader; more than
/// a couple means leaders churned and old transfers are stale).
pub const MAX_INCOMING_SNAPSHOTS: usize = 4;

/// The shared secret a new node presents to join. Compared in constant
/// time; never printed.
#[derive(Clone)]
pub struct JoinToken(Arc<str>);

impl JoinToken {
    /// A token. An empty token is refused (it would let anyone join).
    pub fn new(token: impl Into<String>) -> Option<JoinToken> {
        let token: String = token.into();
        (!token.is_empty()).then(|| JoinToken(token.into()))
    }

    /// Constant-time comparison (in the length of the longer input).
    pub fn matches(&self, presented: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), presented.as_bytes());
        let mut diff = (a.len() != b.len()) as u8;
        for i in 0..a.len().max(b.len()) {
            let x = a.get(i).copied().unwrap_or(0);
            let y = b.get(i).copied().unwrap_or(0);
            diff |= x ^ y;
        }
        std::hint::black_box(diff) == 0
    }
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinToken(<redacted>)")
    }
}

/// The running node the handlers serve.
pub(crate) struct Attached {
    pub(crate) raft: RaftInstance,
    pub(crate) sm: StateMachineStore,
    pub(crate) id: NodeId,
    /// The node's client, for calls a handler forwards to the leader.
    pub(crate) client: Arc<dyn tern_protocol::RpcClient>,
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
    join_token: Option<JoinToken>,
    /// Peers (with their node ids) trusted for Raft calls while this
    /// node's membership is empty.
    bootstrap: RwLock<BTreeMap<PeerId, NodeId>>,
    incoming: Mutex<HashMap<PeerId, Incoming>>,
    promoting: Mutex<BTreeSet<NodeId>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// The Raft and Cluster services of one node; see the module docs.
/// Cloning is cheap and clones share everything.
#[derive(Clone)]
pub struct RaftServices {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RaftServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftServices")
            .field("attached", &self.attached().map(|a| a.id))
            .field("join_token", &self.shared.join_token.is_some())
            .finish_non_exhaustive()
    }
}

impl RaftServices {
    /// Services that accept joins with `join_token` (`None`: only members
    /// may call Join, e.g. to update their own address).
    pub fn new(join_token: Option<JoinToken>) -> RaftServices {
        RaftServices {
            shared: Arc::new(Shared {
                attached: RwLock::new(None),
                join_token,
                bootstrap: RwLock::new(BTreeMap::new()),
                incoming: Mutex::new(HashMap::new()),
                promoting: Mutex::new(BTreeSet::new()),
            }),
        }
    }

    /// The handler of [`ServiceId::Raft`].
    pub fn raft_handler(&self) -> Arc<dyn Handler> {
        Arc::new(RaftHandler {
            shared: self.shared.clone(),
        })
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
        *self
            .shared
            .attached
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(attached);
    }

    pub(crate) fn detach(&self) {
        *self
            .shared
            .attached
            .write()
            .unwrap_or_else(|p| p.into_inner()) = None;
        for (_, incoming) in lock(&self.shared.incoming).drain() {
            incoming.discard();
        }
    }

    fn attached(&self) -> Option<Arc<Attached>> {
        self.shared.attached()
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

    fn is_member(node: &Attached, peer: &PeerId) -> bool {
        let membership = node
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

fn not_a_member(peer: &PeerId, method: &Method, why: &str) -> Status {
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

fn raft_stopped(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("Raft stopped on this node: {e}"))
}

fn encode_answer<T: serde::Serialize>(value: &T) -> Result<Bytes, Status> {
    wire::wrap(value).map_err(|e| Status::internal(format!("cannot encode Raft answer: {e}")))
}

/// Runs `work` until the caller's deadline, if it set one.
async fn within_deadline<T>(
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
    }
}

/// What a member may ask the leader to commit with `Raft/Propose` (the
/// path a follower's writes take, see [`crate::propose`]):
///
/// - [`Command::ReportVm`] naming the caller itself as the reporter (its
///   reconciler's observation of a VM placed on it; the state refuses a
///   report from a node the VM is not placed on);
/// - [`Command::CreateVm`], [`Command::SetVmDesired`] and
///   [`Command::MigrateVm`]: an operator's VM call that reached a
///   follower, whose VM service checked it and writes it through its
///   consensus, which forwards here.
///
/// Everything else is refused: [`Command::AllocateNodeId`] (membership is
/// changed only by `Cluster/Join` and `Cluster/Leave`, which check the
/// token and the caller), [`Command::PutMeta`] (it has `Cluster/MetaPut`),
/// and the raw record writes [`Command::PutVm`] and [`Command::DeleteVm`]
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
        Command::CreateVm { .. } | Command::SetVmDesired { .. } | Command::MigrateVm { .. } => {
            Ok(())
        }
        Command::AllocateNodeId { .. }
        | Command::PutVm { .. }
        | Command::DeleteVm { .. }
        | Command::PutMeta { .. }
        | Command::ChangeAccess { .. } => Err(ProposeRefused::NotAllowed {
            command: command_name(command),
        }),
    }
}

async fn serve_raft(
    shared: &Shared,
    node: &Attached,
    ctx: &RequestContext,
    caller: &Caller,
    method: &'static Method,
    payload: Bytes,
) -> Result<Bytes, Status> {
    let bad = |e: wire::EnvelopeError| Status::invalid_argument(format!("{}: {e}", method.label()));
    if method == methods::RAFT_APPEND_ENTRIES {
        let data = wire::unwrap_bytes(payload).map_err(bad)?;
        let req =
            codec::decode_append_entries(&data).map_err(|e| bad(wire::EnvelopeError::Codec(e)))?;
        caller.must_be(
            req.vote.leader_id.node_id,
            "an append-entries request",
            "leader",
        )?;
        let resp = node.raft.append_entries(req).await.map_err(raft_stopped)?;
        encode_answer(&resp)
    } else if method == methods::RAFT_VOTE {
        let answer = match wire::unwrap::<ControlRequest>(payload).map_err(bad)? {
            ControlRequest::Vote(req) => {
                caller.must_be(req.vote.leader_id.node_id, "a vote request", "candidate")?;
                ControlResponse::Vote(node.raft.vote(req).await.map_err(raft_stopped)?)
            }
            ControlRequest::PreVote(req) => {
                caller.must_be(
                    req.vote.leader_id.node_id,
                    "a pre-vote request",
                    "candidate",
                )?;
                ControlResponse::Vote(node.raft.pre_vote(req).await.map_err(raft_stopped)?)
            }
            ControlRequest::TransferLeader(req) => {
                caller.must_be(
                    req.from_leader().leader_id.node_id,
                    "a leadership transfer",
                    "leader",
                )?;
                ControlResponse::TransferLeader(
                    node.raft
                        .handle_transfer_leader(req)
                        .await
                        .map_err(raft_stopped)?,
                )
            }
        };
        encode_answer(&answer)
    } else if method == methods::RAFT_SNAPSHOT {
        let chunk = pb::SnapshotChunk::decode(payload)
            .map_err(|e| Status::invalid_argument(format!("raft/snapshot: {e}")))?;
        receive_chunk(shared, node, caller, chunk).await
    } else if method == methods::RAFT_PROPOSE {
        // A member's write, committed here on its behalf (see
        // `check_proposal` for which). Only a leader commits; a follower
        // answers FailedPrecondition naming the leader.
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
        let command: Command = wire::unwrap(payload).map_err(bad)?;
        if let Err(why) = check_proposal(&command, &caller.ids) {
            tracing::warn!(
                caller = %ctx.peer.short(),
                caller_ids = ?caller.ids,
                command = command_name(&command),
                "refused a proposal: {why}"
            );
            return Err(Status::permission_denied(why.to_string()));
        }
        let written = crate::node::client_write(&node.raft, command)
            .await
            .map_err(crate::node::WriteError::into_status)?;
        encode_answer(&written.data)
    } else {
        Err(Status::unimplemented(format!(
            "{} is not served by the Raft service",
            method.label()
        )))
    }
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

struct ClusterHandler {
    shared: Arc<Shared>,
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
            let node = shared.node()?;
            within_deadline(&ctx, async {
                if method == methods::CLUSTER_JOIN {
                    join(&shared, &node, &ctx, payload).await
                } else if method == methods::CLUSTER_LEAVE {
                    leave(&node, &ctx, payload).await
                } else if method == methods::CLUSTER_MEMBERS {
                    Ok(members_response(&node).encode_to_vec().into())
                } else if method == methods::CLUSTER_META_PUT {
                    crate::meta::serve_put(&node, &ctx, payload).await
                } else if method == methods::CLUSTER_META_GET {
                    crate::meta::serve_get(&node, &ctx, payload).await
                } else if method == methods::CLUSTER_ACCESS_GRANT {
                    crate::access::serve_change(&node, &ctx, payload, true).await
                } else if method == methods::CLUSTER_ACCESS_REVOKE {
                    crate::access::serve_change(&node, &ctx, payload, false).await
                } else if method == methods::CLUSTER_ACCESS_LIST {
                    crate::access::serve_list(&node)
                } else {
                    Err(Status::unimplemented(format!(
                        "{} is not served by the Cluster service",
                        method.label()
                    )))
                }
            })
            .await
        })
    }
}

/// Converts a membership to the protobuf list, voters flagged.
pub(crate) fn members_pb(membership: &Membership) -> Vec<pb::Member> {
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    membership
        .nodes()
        .map(|(id, m)| pb::Member {
            node_id: *id,
            address: Some(pb::PeerAddress::from(&m.addr)),
            voter: voters.contains(id),
            capacity: Some(pb::Capacity {
                vcpus: m.capacity.vcpus,
                memory_mib: m.capacity.memory_mib,
            }),
        })
        .collect()
}

fn members_response(node: &Attached) -> pb::MembersResponse {
    let metrics = node.raft.metrics().borrow_watched().clone();
    pb::MembersResponse {
        members: members_pb(metrics.membership_config.membership()),
        leader_id: metrics.current_leader.unwrap_or(0),
    }
}

/// `FailedPrecondition` naming the leader, when this node is not it.
pub(crate) fn ensure_leader(node: &Attached) -> Result<(), Status> {
    let metrics = node.raft.metrics().borrow_watched().clone();
    if metrics.state == ServerState::Leader {
        return Ok(());
    }
    Err(match metrics.current_leader {
        Some(leader) => {
            let who = metrics
                .membership_config
                .membership()
                .get_node(&leader)
                .map(|m| m.peer_id().short())
                .unwrap_or_default();
            failed_precondition(format!(
                "not the leader; node {leader} ({who}) is: call it (Cluster/Members gives its address)"
            ))
        }
        None => Status::unavailable("no leader is known right now; retry shortly"),
    })
}

pub(crate) fn write_error(e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> Status {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => failed_precondition(format!(
            "not the leader (leader: {:?}); retry at the leader",
            f.leader_id
        )),
        RaftError::APIError(e) => failed_precondition(e.to_string()),
        RaftError::Fatal(e) => raft_stopped(e),
    }
}

/// Waits (bounded) until the effective membership is committed and not
/// joint, so that the next change is not refused as in progress.
async fn membership_settled(raft: &RaftInstance) -> Result<(), Status> {
    raft.wait(Some(MEMBERSHIP_SETTLE_TIMEOUT))
        .metrics(
            |m| {
                m.membership_config.log_id() == m.committed_membership_config.log_id()
                    && m.membership_config.membership().get_joint_config().len() == 1
            },
            "membership settled",
        )
        .await
        .map(|_| ())
        .map_err(|e| Status::unavailable(format!("a membership change is still in progress: {e}")))
}

/// Applies `changes` once the previous change has settled, retrying when
/// another change slipped in first.
async fn change_membership(
    raft: &RaftInstance,
    changes: ChangeMembers<NodeId, Member>,
    retain: bool,
) -> Result<ClientWriteResponse<TypeConfig>, Status> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        membership_settled(raft).await?;
        match raft.change_membership(changes.clone(), retain).await {
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                ChangeMembershipError::InProgress(e),
            ))) if attempt < MEMBERSHIP_CHANGE_ATTEMPTS => {
                tracing::debug!(error = %e, "membership change in progress; retrying");
            }
            other => return other.map_err(write_error),
        }
    }
}

async fn join(
    shared: &Arc<Shared>,
    node: &Arc<Attached>,
    ctx: &RequestContext,
    payload: Bytes,
) -> Result<Bytes, Status> {
    let method = methods::CLUSTER_JOIN;
    let req = pb::JoinRequest::decode(payload)
        .map_err(|e| Status::invalid_argument(format!("cluster/join: {e}")))?;
    let addr = req
        .address
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("cluster/join: address is required"))?;
    let addr = PeerAddr::try_from(addr)
        .map_err(|e| Status::invalid_argument(format!("cluster/join: address: {e}")))?;
    let member = Shared::is_member(node, &ctx.peer);
    let token_ok = shared
        .join_token
        .as_ref()
        .is_some_and(|t| t.matches(&req.token));
    if !member && !token_ok {
        return Err(not_a_member(
            &ctx.peer,
            method,
            "the join token does not match",
        ));
    }
    if addr.id != ctx.peer {
        tracing::warn!(caller = %ctx.peer.short(), named = %addr.id.short(), "refused a join for another node");
        return Err(Status::permission_denied(format!(
            "a node joins as itself: the address names {} but the caller is {}",
            addr.id.short(),
            ctx.peer.short()
        )));
    }
    ensure_leader(node)?;
    let capacity = req
        .capacity
        .map(|c| Capacity {
            vcpus: c.vcpus,
            memory_mib: c.memory_mib,
        })
        .unwrap_or_default();
    let record = Member::new(addr, capacity);
    tern_state::limits::check_member(&record)
        .map_err(|e| Status::invalid_argument(format!("cluster/join: {e}")))?;

    let membership = node
        .raft
        .metrics()
        .borrow_watched()
        .membership_config
        .clone();
    // Unique per peer and membership: a retry within one membership is
    // answered from the deduplication table; a rejoin after a leave (a new
    // membership) is a new request, so it can never get the old id back.
    let request_id = format!(
        "join-{}-{}",
        ctx.peer,
        membership.log_id().as_ref().map_or(0, |l| l.index)
    );
    let allocate = Command::AllocateNodeId {
        request_id,
        peer: ctx.peer,
    };
    let written = crate::node::client_write(&node.raft, allocate)
        .await
        .map_err(crate::node::WriteError::into_status)?;
    let id = match written.data {
        Response::NodeId(id) => id,
        Response::Rejected(r) => return Err(failed_precondition(r.to_string())),
        other => {
            return Err(Status::internal(format!(
                "node id allocation answered {other:?}"
            )));
        }
    };

    let stored = node
        .raft
        .metrics()
        .borrow_watched()
        .membership_config
        .clone();
    let change = match stored.membership().get_node(&id) {
        None => {
            tracing::info!(node = id, peer = %ctx.peer.short(), "adding learner");
            Some(ChangeMembers::AddNodes(BTreeMap::from([(id, record)])))
        }
        Some(existing) if *existing != record => {
            tracing::info!(node = id, "updating a member's address and capacity");
            Some(ChangeMembers::SetNodes(BTreeMap::from([(id, record)])))
        }
        Some(_) => None,
    };
    // The membership to answer with and the log id it took effect at
    // (metrics may not show a change the moment it commits).
    let (membership, since) = match change {
        Some(change) => {
            let written = change_membership(&node.raft, change, true).await?;
            let membership = written
                .membership()
                .clone()
                .unwrap_or_else(|| stored.membership().clone());
            (membership, Some(written.log_id))
        }
        None => (stored.membership().clone(), *stored.log_id()),
    };
    if !membership.voter_ids().any(|v| v == id) {
        spawn_promotion(shared.clone(), node.clone(), id, since);
    }
    Ok(pb::JoinResponse {
        node_id: id,
        members: members_pb(&membership),
    }
    .encode_to_vec()
    .into())
}

/// Promotes learner `id` (added by the membership at `since`) to voter
/// once it has caught up, unless a promotion of it is already under way.
fn spawn_promotion(
    shared: Arc<Shared>,
    node: Arc<Attached>,
    id: NodeId,
    since: Option<tern_store::LogId>,
) {
    if !lock(&shared.promoting).insert(id) {
        return;
    }
    tokio::spawn(async move {
        let waited = node
            .raft
            .wait(Some(PROMOTION_TIMEOUT))
            .metrics(
                |m| {
                    if m.state != ServerState::Leader {
                        return true; // nothing left to do; checked below
                    }
                    if *m.membership_config.log_id() < since {
                        return false; // metrics do not show the learner yet
                    }
                    if m.membership_config.membership().get_node(&id).is_none() {
                        return true; // removed meanwhile
                    }
                    let matched = m
                        .replication
                        .as_ref()
                        .and_then(|r| r.get(&id))
                        .and_then(|l| l.as_ref())
                        .map(|l| l.index);
                    match (matched, m.last_log_index) {
                        (Some(matched), Some(last)) => {
                            last.saturating_sub(matched) <= PROMOTION_MAX_LAG
                        }
                        _ => false,
                    }
                },
                "learner caught up",
            )
            .await;
        match waited {
            Err(e) => {
                tracing::warn!(node = id, error = %e, "learner did not catch up; not promoted")
            }
            Ok(m)
                if m.state == ServerState::Leader
                    && m.membership_config.membership().get_node(&id).is_some() =>
            {
                match change_membership(
                    &node.raft,
                    ChangeMembers::AddVoterIds(BTreeSet::from([id])),
                    true,
                )
                .await
                {
                    Ok(_) => tracing::info!(node = id, "learner promoted to voter"),
                    Err(e) => tracing::warn!(node = id, error = %e, "promotion to voter failed"),
                }
            }
            Ok(_) => tracing::info!(
                node = id,
                "promotion abandoned: no longer leader or node removed"
            ),
        }
        lock(&shared.promoting).remove(&id);
    });
}

async fn leave(
    node: &Arc<Attached>,
    ctx: &RequestContext,
    payload: Bytes,
) -> Result<Bytes, Status> {
    let method = methods::CLUSTER_LEAVE;
    let admin = node
        .sm
        .read(|s| s.role_of(&ctx.peer) == Some(tern_protocol::access::Role::Admin))
        .map_err(|e| Status::unavailable(format!("reading the access table: {e}")))?;
    if !admin && !Shared::is_member(node, &ctx.peer) {
        return Err(not_a_member(
            &ctx.peer,
            method,
            "only a member (removing itself) or an admin may remove nodes",
        ));
    }
    let req = pb::LeaveRequest::decode(payload)
        .map_err(|e| Status::invalid_argument(format!("cluster/leave: {e}")))?;
    let id = req.node_id;
    ensure_leader(node)?;
    let membership = node
        .raft
        .metrics()
        .borrow_watched()
        .membership_config
        .clone();
    let membership = membership.membership().clone();
    // A node may remove itself; removing another node is an admin's call.
    let itself = membership
        .get_node(&id)
        .is_some_and(|member| member.peer_id() == ctx.peer);
    if !admin && !itself {
        tracing::warn!(caller = %ctx.peer.short(), node = id, "refused Cluster/Leave: a member may remove only itself");
        return Err(Status::new(
            tern_protocol::Code::PermissionDenied,
            format!(
                "removing node {id} needs the admin role: a member may remove only itself (tern cluster leave with an admin's --key)"
            ),
        ));
    }
    if membership.get_node(&id).is_none() {
        return Ok(members_reply(&membership));
    }
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    if id == node.id {
        let Some(successor) = voters.iter().copied().find(|v| *v != id) else {
            return Err(failed_precondition(
                "the last voter cannot leave the cluster",
            ));
        };
        tracing::info!(
            successor,
            "asked to remove myself: handing leadership over first"
        );
        node.raft
            .trigger()
            .transfer_leader(successor)
            .await
            .map_err(raft_stopped)?;
        return Err(Status::unavailable(format!(
            "leadership is moving to node {successor}; call Leave again at the new leader"
        )));
    }
    if voters.contains(&id) {
        tracing::info!(node = id, "removing voter");
        change_membership(
            &node.raft,
            ChangeMembers::RemoveVoters(BTreeSet::from([id])),
            true,
        )
        .await?;
    }
    tracing::info!(node = id, "removing node from the cluster");
    let written = change_membership(
        &node.raft,
        ChangeMembers::RemoveNodes(BTreeSet::from([id])),
        false,
    )
    .await?;
    let membership = written
        .membership()
        .clone()
        .unwrap_or_else(|| membership.clone());
    Ok(members_reply(&membership))
}

fn members_reply(membership: &Membership) -> Bytes {
    pb::LeaveResponse {
        members: members_pb(membership),
    }
    .encode_to_vec()
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn join_tokens_compare_whole_values() {
        let t = JoinToken::new("s3cret").unwrap();
        assert!(t.matches("s3cret"));
        assert!(!t.matches("s3cre"));
        assert!(!t.matches("s3cret!"));
        assert!(!t.matches(""));
        assert!(!t.matches("S3cret"));
        assert!(JoinToken::new("").is_none());
        assert_eq!(format!("{t:?}"), "JoinToken(<redacted>)");
    }
}
