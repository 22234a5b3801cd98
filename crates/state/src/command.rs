//! The writes to the cluster state ([`Command`]), the state machine's
//! answers ([`Response`]) and why it refuses one ([`Rejection`]).

use serde::{Deserialize, Serialize};
use tern_protocol::PeerId;
use tern_protocol::access::Role;

use crate::access::MAX_ACCESS_KEYS;
use crate::admission::{JoinTokenRecord, MAX_JOIN_TOKENS, MembershipChange, TOKEN_HASH_LEN};
use crate::limits::MAX_REQUEST_ID_LEN;
use crate::member::NodeId;
use crate::meta::{MAX_META_KEY_LEN, MAX_META_KEYS, MAX_META_VALUE_LEN};
use crate::network::{Ipv4Net, MAX_POOL_PREFIX, MIN_POOL_PREFIX};
use crate::vm::{VmRecord, VmReport, VmSpec, VmState};

/// A client-chosen id that makes a write safe to retry.
pub type RequestId = String;

/// A write to the cluster state, the payload of a normal Raft entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Give a node id to the peer with this identity: its current id if it
    /// has one, otherwise a fresh id never used before. Join calls this
    /// before adding the peer as a learner.
    AllocateNodeId {
        /// Deduplication id.
        request_id: RequestId,
        /// The joining peer's identity.
        peer: PeerId,
    },
    /// Create or replace a VM record. The stored record's `generation` is
    /// one more than the previous record's (1 for a new VM).
    PutVm {
        /// Deduplication id.
        request_id: RequestId,
        /// The record to store, keyed by its `id` (boxed: a record is large
        /// next to the other commands).
        vm: Box<VmRecord>,
    },
    /// Remove a VM record.
    DeleteVm {
        /// Deduplication id.
        request_id: RequestId,
        /// The VM to remove.
        vm_id: String,
    },
    /// Create a VM: give it the next id (`vm-<n>`), place it (see
    /// [`ClusterState::place`](crate::ClusterState::place)) and want it running. The spec was validated
    /// by the VM service before it was proposed.
    CreateVm {
        /// Deduplication id: a retried create answers the first VM.
        request_id: RequestId,
        /// What to run (boxed: a spec is large next to other commands).
        spec: Box<VmSpec>,
    },
    /// Change the state an operator wants a VM in: `Running` (start),
    /// `Stopped` (stop) or `Deleted` (delete; the record goes once the
    /// node reports the VM removed). Starting a VM observed stopped or
    /// failed makes it pending again: a fresh attempt.
    SetVmDesired {
        /// Deduplication id.
        request_id: RequestId,
        /// The VM.
        vm_id: String,
        /// `Running`, `Stopped` or `Deleted`.
        desired: VmState,
    },
    /// What a node's reconciler observes of a VM placed on it.
    ReportVm {
        /// Deduplication id (reconcilers make a fresh one per report).
        request_id: RequestId,
        /// The observation.
        report: VmReport,
    },
    /// Move a VM to `target`: the source stops it, its report of the stop
    /// moves the record to the target, whose reconciler starts it. A
    /// `target` equal to the VM's current node cancels a migration that
    /// has not handed over yet (the rollback).
    MigrateVm {
        /// Deduplication id.
        request_id: RequestId,
        /// The VM.
        vm_id: String,
        /// The node to move it to.
        target: NodeId,
    },
    /// Set `key` of the metadata register to `value` (cluster labels and
    /// other small operator metadata; also the lab's and benches' write
    /// workload). Answers [`Response::MetaWritten`] with the log index the
    /// write was applied at.
    PutMeta {
        /// Deduplication id: a retried put answers the first put's index.
        request_id: RequestId,
        /// 1 to [`MAX_META_KEY_LEN`] bytes, no control characters.
        key: String,
        /// At most [`MAX_META_VALUE_LEN`] bytes.
        value: String,
    },
    /// Grant `role` to `key`, or revoke it. Recorded in the access log
    /// with who asked and when.
    ChangeAccess {
        /// Deduplication id.
        request_id: RequestId,
        /// Grant (`true`) or revoke (`false`).
        grant: bool,
        /// The key whose roles change.
        key: PeerId,
        /// The role.
        role: Role,
        /// Who asked: the caller's authenticated key. It must hold the
        /// admin role when the change is applied, unless no key holds it
        /// yet (the first node bootstrapping its table).
        by: PeerId,
        /// When, in milliseconds since the Unix epoch, by the proposer's
        /// clock (a value, so `apply` stays pure).
        at_unix_ms: u64,
    },
    // New commands go at the end: a command's position is its tag in log
    // entries and snapshots already written.
    /// Create a join token (admin only, checked at apply): recorded with
    /// its expiry and uses, its secret only as a hash.
    CreateJoinToken {
        /// Deduplication id.
        request_id: RequestId,
        /// The token; `created_by` must hold the admin role.
        token: JoinTokenRecord,
    },
    /// Revoke a join token (admin only, checked at apply).
    RevokeJoinToken {
        /// Deduplication id.
        request_id: RequestId,
        /// The token's public id.
        id: String,
        /// Who asked (the caller's authenticated key).
        by: PeerId,
        /// When, by the proposer's clock.
        at_unix_ms: u64,
    },
    /// Admit a joining node with a join token: spend one use and give the
    /// peer a node id (as [`Command::AllocateNodeId`]). Refused when the
    /// token is unknown, has another hash, expired at `at_unix_ms` or is
    /// used up.
    AdmitNode {
        /// Deduplication id: a retried join answers the same id and
        /// spends no second use.
        request_id: RequestId,
        /// The joining peer's identity (the caller's authenticated key).
        peer: PeerId,
        /// The token's public id.
        token_id: String,
        /// The hash of the secret the joiner presented.
        token_hash: [u8; TOKEN_HASH_LEN],
        /// When, by the proposer's clock.
        at_unix_ms: u64,
    },
    /// Record, in the audit log, a membership change the leader made.
    RecordMembership {
        /// Deduplication id.
        request_id: RequestId,
        /// The change.
        change: MembershipChange,
        /// Who asked for it (the caller's key; the joiner's for a join).
        by: PeerId,
        /// When, by the proposer's clock.
        at_unix_ms: u64,
    },
    /// [`Command::CreateVm`] with operator user data for the guest (at
    /// most [`crate::limits::MAX_USER_DATA_LEN`] bytes), kept beside the
    /// record until it is removed.
    CreateVmWithData {
        /// Deduplication id: a retried create answers the first one.
        request_id: RequestId,
        /// What to create.
        spec: Box<VmSpec>,
        /// The user data.
        user_data: String,
    },
    /// Set the guest network's address pool ([`crate::network`]): the
    /// same pool again changes nothing; another is refused while any VM
    /// holds an address. Leases an address to every VM without one.
    SetNetworkPool {
        /// Deduplication id.
        request_id: RequestId,
        /// The pool.
        pool: Ipv4Net,
    },
    /// Record a node's labels ([`crate::policy`]); an empty set removes
    /// them. A node proposes its own (`Raft/Propose` admits only the
    /// caller's own node id) when its config's differ from the state's.
    SetNodeLabels {
        /// Deduplication id.
        request_id: RequestId,
        /// The node (a member).
        node_id: NodeId,
        /// At most [`crate::policy::MAX_LABELS`], checked by
        /// [`crate::policy::check_labels`].
        labels: crate::policy::Labels,
    },
    /// Set (`Some`) or clear (`None`) the desired transport policy of a
    /// node, a group or all ([`crate::policy`]). The policy gets the
    /// config file's validation; a node must be a member, a group must
    /// select one.
    SetTransportPolicy {
        /// Deduplication id.
        request_id: RequestId,
        /// Whom it is for.
        target: crate::policy::PolicyTarget,
        /// The policy, or `None` to clear.
        policy: Option<tern_protocol::policy::TransportConfig>,
    },
    /// Change the transport rollout ([`crate::rollout`]): start a plan,
    /// pause, resume, advance, hold, roll back, abort, or roll every node
    /// back. The driver's decisions carry the decision number they
    /// expect, so a stale one is refused.
    Rollout {
        /// Deduplication id.
        request_id: RequestId,
        /// The change.
        op: crate::rollout::RolloutOp,
        /// Nodes to pick as canaries after every other (the leader, nodes
        /// the proposer finds unhealthy), for a start or an advance.
        last: Vec<NodeId>,
        /// When, by the proposer's clock (soaks count from it).
        at_unix_ms: u64,
    },
    /// Record an agent ([`crate::agent`]): a node that runs VMs without
    /// being a Raft member. `node_id` must be the id allocated to
    /// `addr.id` (by [`Command::AdmitNode`] or
    /// [`Command::AllocateNodeId`]); a known agent's addresses and
    /// capacity are updated. Answers [`Response::NodeId`].
    RegisterAgent {
        /// Deduplication id.
        request_id: RequestId,
        /// The agent's node id.
        node_id: NodeId,
        /// Its identity (the caller's authenticated key) and addresses.
        addr: tern_protocol::PeerAddr,
        /// What it offers to VMs (cut to the servers' maximum before it
        /// is proposed).
        capacity: crate::member::Capacity,
        /// When, by the proposer's clock.
        at_unix_ms: u64,
    },
    /// The leader's judgement of an agent: ready (heartbeating) or down
    /// (not heard within its bound). Down moves the agent's VMs.
    SetAgentStatus {
        /// Deduplication id.
        request_id: RequestId,
        /// The agent.
        node_id: NodeId,
        /// Its new status.
        status: crate::agent::AgentStatus,
        /// When, by the proposer's clock.
        at_unix_ms: u64,
    },
    /// Remove an agent (an admin's `Cluster/Leave` of it): its VMs move as
    /// for a down agent and its node id is retired.
    RemoveAgent {
        /// Deduplication id.
        request_id: RequestId,
        /// The agent.
        node_id: NodeId,
    },
    /// Start demoting a server to an agent (an admin's `Cluster/Demote`):
    /// the member `node_id` gets an agent record with its own addresses
    /// and capacity, so that when the membership entry that removes it
    /// applies, it stays a node of the cluster with its id and its VMs
    /// (`ClusterState::apply_membership`). Answers [`Response::NodeId`];
    /// the same demotion again (still a member) changes nothing.
    DemoteServer {
        /// Deduplication id.
        request_id: RequestId,
        /// The server (a Raft member, voter or learner).
        node_id: NodeId,
        /// When, by the proposer's clock.
        at_unix_ms: u64,
    },
}

impl Command {
    /// The client request id that makes this command idempotent, if it
    /// carries one.
    pub fn request_id(&self) -> Option<&str> {
        match self {
            Command::AllocateNodeId { request_id, .. }
            | Command::PutVm { request_id, .. }
            | Command::DeleteVm { request_id, .. }
            | Command::CreateVm { request_id, .. }
            | Command::SetVmDesired { request_id, .. }
            | Command::ReportVm { request_id, .. }
            | Command::MigrateVm { request_id, .. }
            | Command::PutMeta { request_id, .. }
            | Command::ChangeAccess { request_id, .. }
            | Command::CreateJoinToken { request_id, .. }
            | Command::RevokeJoinToken { request_id, .. }
            | Command::AdmitNode { request_id, .. }
            | Command::RecordMembership { request_id, .. }
            | Command::SetNetworkPool { request_id, .. }
            | Command::SetNodeLabels { request_id, .. }
            | Command::SetTransportPolicy { request_id, .. }
            | Command::Rollout { request_id, .. }
            | Command::RegisterAgent { request_id, .. }
            | Command::SetAgentStatus { request_id, .. }
            | Command::RemoveAgent { request_id, .. }
            | Command::DemoteServer { request_id, .. }
            | Command::CreateVmWithData { request_id, .. } => Some(request_id),
        }
    }
}

impl std::fmt::Display for Command {
    /// A one-line summary for logs; never the whole record.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::AllocateNodeId { request_id, peer } => {
                write!(f, "allocate-node-id peer={} req={request_id}", peer.short())
            }
            Command::PutVm { request_id, vm } => write!(f, "put-vm {} req={request_id}", vm.id),
            Command::DeleteVm { request_id, vm_id } => {
                write!(f, "delete-vm {vm_id} req={request_id}")
            }
            Command::CreateVm { request_id, spec } => {
                write!(f, "create-vm name={} req={request_id}", spec.name)
            }
            Command::SetVmDesired {
                request_id,
                vm_id,
                desired,
            } => write!(f, "set-vm-desired {vm_id} {desired:?} req={request_id}"),
            Command::ReportVm { request_id, report } => write!(
                f,
                "report-vm {} node={} {:?} req={request_id}",
                report.vm_id, report.node_id, report.observed
            ),
            Command::MigrateVm {
                request_id,
                vm_id,
                target,
            } => write!(f, "migrate-vm {vm_id} to={target} req={request_id}"),
            Command::PutMeta {
                request_id,
                key,
                value,
            } => write!(
                f,
                "put-meta {key:?} ({} bytes) req={request_id}",
                value.len()
            ),
            Command::ChangeAccess {
                request_id,
                grant,
                key,
                role,
                by,
                ..
            } => write!(
                f,
                "{} {role} key={} by={} req={request_id}",
                if *grant { "grant" } else { "revoke" },
                key.short(),
                by.short()
            ),
            Command::CreateJoinToken { request_id, token } => write!(
                f,
                "token-create {} expires={} uses={} by={} req={request_id}",
                token.id,
                token.expires_at_unix_ms,
                token
                    .uses_left
                    .map_or_else(|| "unlimited".to_owned(), |n| n.to_string()),
                token.created_by.short()
            ),
            Command::RevokeJoinToken {
                request_id, id, by, ..
            } => {
                write!(f, "token-revoke {id} by={} req={request_id}", by.short())
            }
            Command::AdmitNode {
                request_id,
                peer,
                token_id,
                ..
            } => write!(
                f,
                "admit {} token={token_id} req={request_id}",
                peer.short()
            ),
            Command::RecordMembership {
                request_id,
                change,
                by,
                ..
            } => write!(f, "membership: {change} by={} req={request_id}", by.short()),
            Command::CreateVmWithData {
                request_id,
                spec,
                user_data,
            } => write!(
                f,
                "create-vm name={} user-data={} bytes req={request_id}",
                spec.name,
                user_data.len()
            ),
            Command::SetNetworkPool { request_id, pool } => {
                write!(f, "set-network-pool {pool} req={request_id}")
            }
            Command::SetNodeLabels {
                request_id,
                node_id,
                labels,
            } => write!(
                f,
                "set-node-labels node={node_id} ({} labels) req={request_id}",
                labels.len()
            ),
            Command::SetTransportPolicy {
                request_id,
                target,
                policy,
            } => match policy {
                Some(p) => write!(
                    f,
                    "set-transport-policy {target} mode={} req={request_id}",
                    p.mode.as_str()
                ),
                None => write!(f, "clear-transport-policy {target} req={request_id}"),
            },
            Command::Rollout { request_id, op, .. } => {
                write!(f, "rollout {} req={request_id}", op.name())
            }
            Command::RegisterAgent {
                request_id,
                node_id,
                addr,
                ..
            } => write!(
                f,
                "register-agent node={node_id} key={} req={request_id}",
                addr.id.short()
            ),
            Command::SetAgentStatus {
                request_id,
                node_id,
                status,
                ..
            } => write!(f, "agent-status node={node_id} {status} req={request_id}"),
            Command::RemoveAgent {
                request_id,
                node_id,
            } => write!(f, "remove-agent node={node_id} req={request_id}"),
            Command::DemoteServer {
                request_id,
                node_id,
                ..
            } => write!(f, "demote-server node={node_id} req={request_id}"),
        }
    }
}

/// The state machine's answer to one entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Applied; nothing to report (blank and membership entries).
    Done,
    /// The node id allocated to a peer.
    NodeId(NodeId),
    /// A VM record: the stored record after a put, the removed one after a
    /// delete. Boxed: a record is large next to the other responses.
    Vm(Box<VmRecord>),
    /// A metadata put was applied at this log index.
    MetaWritten {
        /// The index of the log entry that applied it.
        index: u64,
    },
    /// The command was valid Raft data but the state refused it. Refusals
    /// are deterministic, so every node refuses alike.
    Rejected(Rejection),
}

/// Why the state refused a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    /// The request id is empty or longer than [`MAX_REQUEST_ID_LEN`].
    #[error("request id of {len} bytes is not allowed (1 to {MAX_REQUEST_ID_LEN} bytes)")]
    InvalidRequestId {
        /// Its length in bytes.
        len: usize,
    },
    /// No VM has this id.
    #[error("no VM with id {vm_id:?}")]
    UnknownVm {
        /// The id asked for.
        vm_id: String,
    },
    /// Another VM already has this name.
    #[error("VM name {name:?} is taken by VM {existing:?}")]
    NameTaken {
        /// The name asked for.
        name: String,
        /// The VM that has it.
        existing: String,
    },
    /// Node ids are exhausted (after 2^64 joins).
    #[error("no node ids left")]
    NodeIdsExhausted,
    /// A metadata key that is empty, too long or has control characters.
    #[error(
        "metadata key of {len} bytes is not allowed: 1 to {MAX_META_KEY_LEN} bytes, \
         no control characters"
    )]
    InvalidMetaKey {
        /// Its length in bytes.
        len: usize,
    },
    /// A metadata value over [`MAX_META_VALUE_LEN`].
    #[error("metadata value of {len} bytes is too large (at most {MAX_META_VALUE_LEN} bytes)")]
    MetaValueTooLarge {
        /// Its length in bytes.
        len: usize,
    },
    /// The register holds [`MAX_META_KEYS`] keys; only existing keys may
    /// be written.
    #[error(
        "the metadata register is full ({MAX_META_KEYS} keys); overwrite an existing key instead"
    )]
    MetaFull,
    /// VM ids are exhausted (after 2^64 creates).
    #[error("no VM ids left")]
    VmIdsExhausted,
    /// No member has room for the VM.
    #[error(
        "no node has {vcpus} free vCPUs and {memory_mib} MiB free memory \
         ({members} nodes, servers and agents; capacity is what each node declares when it joins)"
    )]
    NoCapacity {
        /// vCPUs asked for.
        vcpus: u32,
        /// Memory asked for, in MiB.
        memory_mib: u64,
        /// How many members were considered.
        members: usize,
    },
    /// An access change asked by a key that is not an admin.
    #[error("key {by} does not hold the admin role; only admins change access")]
    NotAdmin {
        /// The key that asked.
        by: PeerId,
    },
    /// Revoking the admin role from the last key holding it.
    #[error("key {key} holds the last admin role; grant admin to another key before revoking it")]
    LastAdmin {
        /// The key.
        key: PeerId,
    },
    /// The access table holds [`MAX_ACCESS_KEYS`] keys.
    #[error("the access table is full ({MAX_ACCESS_KEYS} keys); revoke unused keys first")]
    AccessFull,
    /// The node named (a pin or a migration target) is not a member.
    #[error("node {node_id} is not a member of the cluster")]
    UnknownNode {
        /// The node asked for.
        node_id: NodeId,
    },
    /// The node named (a pin or a migration target) is an agent the
    /// leader has marked down.
    #[error(
        "node {node_id} is an agent that is down (its heartbeats stopped); choose another node"
    )]
    NodeDown {
        /// The node asked for.
        node_id: NodeId,
    },
    /// An agent registration whose node id is not the one allocated to
    /// its key.
    #[error("node id {node_id} is not the id allocated to this agent's key")]
    AgentIdMismatch {
        /// The id given.
        node_id: NodeId,
    },
    /// A Raft member (a server) cannot register as an agent.
    #[error("node {node_id} is a server (a Raft member); it cannot register as an agent")]
    AgentIsServer {
        /// The node.
        node_id: NodeId,
    },
    /// The node named (a pin or a migration target) lacks room for the VM.
    #[error(
        "node {node_id} has {free_vcpus} free vCPUs and {free_memory_mib} MiB free memory; \
         the VM needs {vcpus} vCPUs and {memory_mib} MiB"
    )]
    NodeFull {
        /// The node asked for.
        node_id: NodeId,
        /// Its free vCPUs.
        free_vcpus: u32,
        /// Its free memory in MiB.
        free_memory_mib: u64,
        /// vCPUs asked for.
        vcpus: u32,
        /// Memory asked for, in MiB.
        memory_mib: u64,
    },
    /// A desired state an operator cannot ask for.
    #[error("{state:?} cannot be requested: use Running, Stopped or Deleted")]
    InvalidDesiredState {
        /// The state asked for.
        state: VmState,
    },
    /// The VM is being deleted; nothing but the deletion can happen to it.
    #[error("VM {vm_id:?} is being deleted")]
    VmDeleting {
        /// The VM.
        vm_id: String,
    },
    /// A node reported on a VM placed elsewhere (a stale reconciler).
    #[error("node {node_id} reported on VM {vm_id:?}, which is placed on node {placed_on}")]
    NotPlacedHere {
        /// The VM.
        vm_id: String,
        /// The reporting node.
        node_id: NodeId,
        /// Where the VM is placed.
        placed_on: NodeId,
    },
    /// A report carried a state a node cannot observe then.
    #[error("a node cannot report VM {vm_id:?} as {observed:?} now")]
    InvalidReport {
        /// The VM.
        vm_id: String,
        /// The state reported.
        observed: VmState,
    },
    /// The VM is already moving to another node.
    #[error(
        "VM {vm_id:?} is already migrating to node {target}; \
         migrate it to its current node to cancel"
    )]
    MigrationInProgress {
        /// The VM.
        vm_id: String,
        /// Where it is going.
        target: NodeId,
    },
    /// The VM is already on the node asked for.
    #[error("VM {vm_id:?} is already on node {node_id}")]
    AlreadyOnNode {
        /// The VM.
        vm_id: String,
        /// Its node.
        node_id: NodeId,
    },
    // New rejections go at the end: a variant's position is its tag in
    // answers remembered by the deduplication table.
    /// The join token named is not in the table, or the secret presented
    /// does not match it (the two are not told apart).
    #[error(
        "no join token {id} with that secret (unknown, revoked or mistyped); ask an admin for a new one"
    )]
    UnknownToken {
        /// The token's public id.
        id: String,
    },
    /// The join token expired.
    #[error("join token {id} has expired; ask an admin for a new one (tern cluster token create)")]
    TokenExpired {
        /// The token's public id.
        id: String,
    },
    /// The join token has no uses left.
    #[error("join token {id} is used up; ask an admin for a new one (tern cluster token create)")]
    TokenUsedUp {
        /// The token's public id.
        id: String,
    },
    /// A token to create is malformed.
    #[error("invalid join token: {why}")]
    InvalidToken {
        /// What is wrong.
        why: String,
    },
    /// [`MAX_JOIN_TOKENS`] tokens are alive.
    #[error(
        "{MAX_JOIN_TOKENS} join tokens are alive; revoke some first (tern cluster token revoke)"
    )]
    TokensFull,
    /// Every address of the guest network's pool is leased.
    #[error(
        "the address pool {pool} is exhausted ({leased} VMs hold addresses); \
         delete VMs or choose a larger pool"
    )]
    AddressPoolExhausted {
        /// The pool.
        pool: String,
        /// How many addresses are leased.
        leased: u64,
    },
    /// Changing the pool while VMs hold addresses from the current one.
    #[error(
        "the address pool is {pool} and {leased} VMs hold addresses from it; \
         it can only change while no VM holds one"
    )]
    PoolInUse {
        /// The current pool.
        pool: String,
        /// How many addresses are leased.
        leased: u64,
    },
    /// A pool of a size outside the allowed prefix lengths.
    #[error(
        "pool {pool}: a pool's prefix length must be from {MIN_POOL_PREFIX} to {MAX_POOL_PREFIX}"
    )]
    InvalidPool {
        /// The pool.
        pool: String,
    },
    /// Labels or a selector that break the label rules.
    #[error("{why}")]
    InvalidLabels {
        /// What is wrong (names the key or value).
        why: String,
    },
    /// A transport policy the config file's validation refuses.
    #[error("{key}: {reason}")]
    InvalidPolicy {
        /// The key at fault, e.g. `transport.mode`.
        key: String,
        /// Why.
        reason: String,
    },
    /// A group policy whose selector names no node's labels.
    #[error("group {selector} selects no node: no member has that label (see tern status)")]
    EmptyGroup {
        /// The selector.
        selector: String,
    },
    /// [`crate::policy::MAX_GROUP_POLICIES`] group policies are set.
    #[error(
        "{} group policies are set; clear some first",
        crate::policy::MAX_GROUP_POLICIES
    )]
    TooManyGroupPolicies,
    /// A rollout plan that is not valid (the stage and key named).
    #[error("invalid rollout plan: {why}")]
    InvalidPlan {
        /// Why, naming the stage index and key.
        why: String,
    },
    /// A rollout change refused in the rollout's present state.
    #[error("rollout: {why}")]
    Rollout {
        /// Why.
        why: String,
    },
    /// A demotion of a node that is an agent already.
    #[error("node {node_id} is an agent already; only a server (a Raft member) can be demoted")]
    AlreadyAgent {
        /// The node.
        node_id: NodeId,
    },
    /// A demotion of an id that is no node of the cluster.
    #[error("node {node_id} is not a server of the cluster (tern cluster members lists them)")]
    NotAServer {
        /// The id given.
        node_id: NodeId,
    },
}
