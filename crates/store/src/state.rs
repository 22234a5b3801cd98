//! The replicated cluster state and the commands that change it.
//!
//! [`ClusterState::apply`] is a pure function from a state and a
//! [`Command`] to a new state and a [`Response`]: no I/O, no clock, no
//! randomness, so every node that applies the same log reaches the same
//! state. The Raft state machine ([`crate::StateMachineStore`]) calls it for
//! every normal entry and [`ClusterState::apply_membership`] for every
//! membership entry.
//!
//! Adding a command is adding a variant to [`Command`], an arm to
//! `ClusterState::apply_new` and, if it answers with something new, a
//! variant to [`Response`]. Commands that carry a client request id are
//! deduplicated here, once for all of them: a second write with the same
//! request id is answered with the first write's response and changes
//! nothing, so clients and the transport router may retry writes freely.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tern_protocol::PeerId;
use tern_protocol::access::Role;

use crate::types::{Capacity, Member, Membership, NodeId};

pub use crate::limits::{MAX_META_KEY_LEN, MAX_META_VALUE_LEN, MAX_REQUEST_ID_LEN};

/// How many recent request ids the deduplication table remembers. A client
/// retry arrives within seconds; this many writes take far longer than that
/// at any write rate the cluster state sees, and at most a few MiB of
/// memory.
pub const MAX_DEDUP_ENTRIES: usize = 16_384;

/// Most keys the metadata register holds: with the two bounds above, at
/// most about 42 MiB of state in the worst case, a few hundred KiB for the
/// labels it is meant for.
pub const MAX_META_KEYS: usize = 10_000;

/// The first node id handed out. 0 is never a node id, so that an unset
/// protobuf field (0) never names a node.
pub const FIRST_NODE_ID: NodeId = 1;

/// How many access changes the audit log keeps (oldest dropped first):
/// years of grants and revocations at any rate people make them, a few
/// hundred KiB of state at most.
pub const MAX_ACCESS_LOG: usize = 1_000;

/// Most keys the access table holds: far more operators than a cluster
/// has, and a bound on the state a compromised admin key can grow.
pub const MAX_ACCESS_KEYS: usize = 1_000;

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
    /// [`ClusterState::place`]) and want it running. The spec was validated
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
}

/// A reconciler's observation of one VM, the payload of
/// [`Command::ReportVm`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VmReport {
    /// The VM.
    pub vm_id: String,
    /// The reporting node; must be the node the VM is placed on.
    pub node_id: NodeId,
    /// `Running`, `Stopped`, `Failed` or (after a delete) `Deleted`.
    pub observed: VmState,
    /// Why it failed, when it did.
    pub reason: String,
    /// The workload log or serial console on the node.
    pub log_path: String,
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
            | Command::ChangeAccess { request_id, .. } => Some(request_id),
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
         ({members} members; capacity is what each node declares when it joins)"
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
}

/// Lifecycle state of a VM, desired or observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum VmState {
    /// Not set.
    #[default]
    Unspecified,
    /// Accepted, not yet running.
    Pending,
    /// Running.
    Running,
    /// Stopped.
    Stopped,
    /// Failed; see the record's `reason`.
    Failed,
    /// Moving to another node.
    Migrating,
    /// Deleted, resources being released.
    Deleted,
}

/// What a VM is: the operator's request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct VmSpec {
    /// DNS-label-like name, unique in the cluster.
    pub name: String,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// `"microvm"` or `"process"`.
    pub runtime: String,
    /// microVM guest kernel path on the node.
    pub kernel: String,
    /// microVM initrd path on the node.
    pub initrd: String,
    /// microVM root image path on the node.
    pub image: String,
    /// microVM kernel command line.
    pub kernel_cmdline: String,
    /// Process runtime: the workload's argv.
    pub command: Vec<String>,
    /// Pin to this node (0 = placement chooses).
    pub pin_node: NodeId,
}

/// A VM as the cluster state records it (mirrors `tern.v1.VmRecord`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct VmRecord {
    /// Cluster-unique id.
    pub id: String,
    /// What was asked for.
    pub spec: VmSpec,
    /// The node it is placed on.
    pub node_id: NodeId,
    /// The state the cluster wants.
    pub desired: VmState,
    /// The state the node last reported.
    pub observed: VmState,
    /// Why it failed, when it did.
    pub reason: String,
    /// Serial console or workload log path on the node.
    pub log_path: String,
    /// Bumped by every write of the record.
    pub generation: u64,
    /// While migrating: the node it is moving to (0 = not migrating). The
    /// VM stays placed on `node_id` until that node reports it stopped.
    pub migrate_to: NodeId,
}

impl VmRecord {
    /// Whether a migration has been asked for and not handed over yet.
    pub fn is_migrating(&self) -> bool {
        self.migrate_to != 0
    }
}

/// One remembered request: when it was applied and what it answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Remembered {
    seq: u64,
    response: Response,
}

/// Recent request ids and their responses, oldest evicted first once
/// [`MAX_DEDUP_ENTRIES`] are held.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct DedupTable {
    by_id: BTreeMap<RequestId, Remembered>,
    /// Application order, for eviction.
    order: BTreeMap<u64, RequestId>,
    next_seq: u64,
}

impl DedupTable {
    fn get(&self, id: &str) -> Option<&Response> {
        self.by_id.get(id).map(|r| &r.response)
    }

    fn remember(&mut self, id: RequestId, response: Response) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.insert(seq, id.clone());
        if let Some(old) = self.by_id.insert(id, Remembered { seq, response }) {
            self.order.remove(&old.seq);
        }
        while self.by_id.len() > MAX_DEDUP_ENTRIES {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.by_id.remove(&oldest);
        }
    }
}

/// The replicated cluster state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Members as of the last applied membership entry, voters and
    /// learners.
    members: BTreeMap<NodeId, Member>,
    /// Node ids held by peers: current members and peers allocated an id
    /// that have not joined yet. An id leaves this map when its node leaves
    /// the membership, and is never handed out again.
    node_ids: BTreeMap<PeerId, NodeId>,
    /// The next node id to hand out.
    next_node_id: NodeId,
    /// VM records by id.
    vms: BTreeMap<String, VmRecord>,
    /// Recent client request ids.
    dedup: DedupTable,
    /// The number in the next VM id [`Command::CreateVm`] hands out.
    next_vm_number: u64,
    /// The metadata register: key to value and the index it was written at.
    meta: BTreeMap<String, MetaEntry>,
    /// Roles granted to keys (members hold the member role implicitly).
    access: BTreeMap<PeerId, std::collections::BTreeSet<Role>>,
    /// The most recent access changes, oldest first, at most
    /// [`MAX_ACCESS_LOG`].
    access_log: std::collections::VecDeque<AccessEvent>,
    /// The sequence number of the next access event.
    next_access_seq: u64,
}

/// One access change, as the audit log records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessEvent {
    /// Position in the log, never reused.
    pub seq: u64,
    /// When, by the proposer's clock (milliseconds since the Unix epoch).
    pub at_unix_ms: u64,
    /// Who made the change.
    pub by: PeerId,
    /// Granted (`true`) or revoked (`false`).
    pub grant: bool,
    /// The key changed.
    pub key: PeerId,
    /// The role.
    pub role: Role,
}

/// One key of the metadata register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaEntry {
    /// The value.
    pub value: String,
    /// The log index of the put that wrote it.
    pub index: u64,
}

/// Checks a metadata key and value against the register's bounds (the
/// state applies the same check; services call it to refuse early).
pub fn check_meta(key: &str, value: &str) -> Result<(), Rejection> {
    check_meta_key(key)?;
    if value.len() > MAX_META_VALUE_LEN {
        return Err(Rejection::MetaValueTooLarge { len: value.len() });
    }
    Ok(())
}

/// Checks a metadata key against the register's bounds.
pub fn check_meta_key(key: &str) -> Result<(), Rejection> {
    if key.is_empty() || key.len() > MAX_META_KEY_LEN || key.chars().any(char::is_control) {
        return Err(Rejection::InvalidMetaKey { len: key.len() });
    }
    Ok(())
}

/// The cluster state as snapshot format 2 wrote it, before the access
/// table existed: the same fields in the same order, without the last
/// three. Read so that a node upgraded in place keeps its state (its
/// access table starts empty, and the first node grants its admins when it
/// next leads).
#[derive(Debug, Deserialize)]
pub(crate) struct ClusterStateV2 {
    members: BTreeMap<NodeId, Member>,
    node_ids: BTreeMap<PeerId, NodeId>,
    next_node_id: NodeId,
    vms: BTreeMap<String, VmRecord>,
    dedup: DedupTable,
    next_vm_number: u64,
    meta: BTreeMap<String, MetaEntry>,
}

impl From<ClusterStateV2> for ClusterState {
    fn from(v2: ClusterStateV2) -> ClusterState {
        ClusterState {
            members: v2.members,
            node_ids: v2.node_ids,
            next_node_id: v2.next_node_id,
            vms: v2.vms,
            dedup: v2.dedup,
            next_vm_number: v2.next_vm_number,
            meta: v2.meta,
            ..ClusterState::default()
        }
    }
}

impl Default for ClusterState {
    fn default() -> Self {
        ClusterState {
            members: BTreeMap::new(),
            node_ids: BTreeMap::new(),
            next_node_id: FIRST_NODE_ID,
            vms: BTreeMap::new(),
            dedup: DedupTable::default(),
            next_vm_number: 1,
            meta: BTreeMap::new(),
            access: BTreeMap::new(),
            access_log: std::collections::VecDeque::new(),
            next_access_seq: 1,
        }
    }
}

impl ClusterState {
    /// Applies one command, deduplicating by its request id, as if it
    /// were the entry at log index 0 (for tests and tools; the state
    /// machine calls [`ClusterState::apply_at`]).
    pub fn apply(&mut self, cmd: Command) -> Response {
        self.apply_at(0, cmd)
    }

    /// Applies the command of the log entry at `index`, deduplicating by
    /// its request id. The index is part of the entry, so the result is
    /// still the same on every node.
    pub fn apply_at(&mut self, index: u64, cmd: Command) -> Response {
        let Some(request_id) = cmd.request_id() else {
            return self.apply_new(index, cmd);
        };
        if request_id.is_empty() || request_id.len() > MAX_REQUEST_ID_LEN {
            return Response::Rejected(Rejection::InvalidRequestId {
                len: request_id.len(),
            });
        }
        if let Some(previous) = self.dedup.get(request_id) {
            return previous.clone();
        }
        let request_id = request_id.to_owned();
        let response = self.apply_new(index, cmd);
        self.dedup.remember(request_id, response.clone());
        response
    }

    /// Applies a command not seen before. One arm per command.
    fn apply_new(&mut self, index: u64, cmd: Command) -> Response {
        match cmd {
            Command::AllocateNodeId { peer, .. } => self.allocate_node_id(peer),
            Command::PutVm { vm, .. } => self.put_vm(vm),
            Command::DeleteVm { vm_id, .. } => match self.vms.remove(&vm_id) {
                Some(vm) => Response::Vm(Box::new(vm)),
                None => Response::Rejected(Rejection::UnknownVm { vm_id }),
            },
            Command::CreateVm { spec, .. } => self.create_vm(*spec),
            Command::SetVmDesired { vm_id, desired, .. } => self.set_vm_desired(vm_id, desired),
            Command::ReportVm { report, .. } => self.report_vm(report),
            Command::MigrateVm { vm_id, target, .. } => self.migrate_vm(vm_id, target),
            Command::PutMeta { key, value, .. } => self.put_meta(index, key, value),
            Command::ChangeAccess {
                grant,
                key,
                role,
                by,
                at_unix_ms,
                ..
            } => self.change_access(AccessEvent {
                seq: 0,
                at_unix_ms,
                by,
                grant,
                key,
                role,
            }),
        }
    }

    fn has_admin(&self) -> bool {
        self.access
            .values()
            .any(|roles| roles.contains(&Role::Admin))
    }

    fn change_access(&mut self, mut event: AccessEvent) -> Response {
        if self.has_admin() && self.role_of(&event.by) != Some(Role::Admin) {
            return Response::Rejected(Rejection::NotAdmin { by: event.by });
        }
        if event.grant {
            if !self.access.contains_key(&event.key) && self.access.len() >= MAX_ACCESS_KEYS {
                return Response::Rejected(Rejection::AccessFull);
            }
            self.access.entry(event.key).or_default().insert(event.role);
        } else {
            if event.role == Role::Admin {
                let admins = self
                    .access
                    .iter()
                    .filter(|(k, roles)| **k != event.key && roles.contains(&Role::Admin))
                    .count();
                let holds = self
                    .access
                    .get(&event.key)
                    .is_some_and(|roles| roles.contains(&Role::Admin));
                if holds && admins == 0 {
                    return Response::Rejected(Rejection::LastAdmin { key: event.key });
                }
            }
            if let Some(roles) = self.access.get_mut(&event.key) {
                roles.remove(&event.role);
                if roles.is_empty() {
                    self.access.remove(&event.key);
                }
            }
        }
        event.seq = self.next_access_seq;
        self.next_access_seq = self.next_access_seq.saturating_add(1);
        self.access_log.push_back(event);
        while self.access_log.len() > MAX_ACCESS_LOG {
            self.access_log.pop_front();
        }
        Response::Done
    }

    /// The strongest role granted to `key`, if any (membership aside).
    pub fn role_of(&self, key: &PeerId) -> Option<Role> {
        self.access
            .get(key)
            .and_then(|roles| roles.iter().next_back().copied())
    }

    /// Whether `key` is the key of a current member (voter or learner).
    pub fn is_member_key(&self, key: &PeerId) -> bool {
        self.members.values().any(|m| m.peer_id() == *key)
    }

    /// The roles granted, by key.
    pub fn access(&self) -> &BTreeMap<PeerId, std::collections::BTreeSet<Role>> {
        &self.access
    }

    /// The most recent access changes, oldest first.
    pub fn access_log(&self) -> impl Iterator<Item = &AccessEvent> {
        self.access_log.iter()
    }

    fn put_meta(&mut self, index: u64, key: String, value: String) -> Response {
        if let Err(why) = check_meta(&key, &value) {
            return Response::Rejected(why);
        }
        if self.meta.len() >= MAX_META_KEYS && !self.meta.contains_key(&key) {
            return Response::Rejected(Rejection::MetaFull);
        }
        self.meta.insert(key, MetaEntry { value, index });
        Response::MetaWritten { index }
    }

    fn allocate_node_id(&mut self, peer: PeerId) -> Response {
        if let Some(id) = self.node_ids.get(&peer) {
            return Response::NodeId(*id);
        }
        let id = self.next_node_id;
        let Some(next) = id.checked_add(1) else {
            return Response::Rejected(Rejection::NodeIdsExhausted);
        };
        self.next_node_id = next;
        self.node_ids.insert(peer, id);
        Response::NodeId(id)
    }

    fn put_vm(&mut self, mut vm: Box<VmRecord>) -> Response {
        if let Some((existing, _)) = self
            .vms
            .iter()
            .find(|(id, other)| **id != vm.id && other.spec.name == vm.spec.name)
        {
            return Response::Rejected(Rejection::NameTaken {
                name: vm.spec.name,
                existing: existing.clone(),
            });
        }
        vm.generation = self.vms.get(&vm.id).map_or(0, |v| v.generation) + 1;
        self.vms.insert(vm.id.clone(), (*vm).clone());
        Response::Vm(vm)
    }

    /// What `node` has left for VMs: its declared capacity minus what the
    /// VMs placed on it, or migrating to it, reserve. Every VM reserves its
    /// vCPUs and memory whatever its state (a stopped VM can be started
    /// again without a new placement), until its record is removed. `None`
    /// if `node` is not a member.
    pub fn free_capacity(&self, node: NodeId) -> Option<Capacity> {
        let member = self.members.get(&node)?;
        let mut free = member.capacity;
        for vm in self.vms.values() {
            if vm.node_id == node || vm.migrate_to == node {
                free.vcpus = free.vcpus.saturating_sub(vm.spec.vcpus);
                free.memory_mib = free.memory_mib.saturating_sub(vm.spec.memory_mib);
            }
        }
        Some(free)
    }

    /// Where a VM with `spec` goes: its pinned node if it has room, else
    /// the member with the most free memory after placement, then the most
    /// free vCPUs, then the lowest id. Deterministic: it reads only the
    /// replicated state.
    pub fn place(&self, spec: &VmSpec) -> Result<NodeId, Rejection> {
        let fits = |free: Capacity| free.vcpus >= spec.vcpus && free.memory_mib >= spec.memory_mib;
        if spec.pin_node != 0 {
            return self.check_room(spec.pin_node, spec).map(|()| spec.pin_node);
        }
        self.members
            .keys()
            .filter_map(|id| self.free_capacity(*id).map(|free| (*id, free)))
            .filter(|(_, free)| fits(*free))
            .max_by_key(|(id, free)| (free.memory_mib, free.vcpus, std::cmp::Reverse(*id)))
            .map(|(id, _)| id)
            .ok_or(Rejection::NoCapacity {
                vcpus: spec.vcpus,
                memory_mib: spec.memory_mib,
                members: self.members.len(),
            })
    }

    /// Whether `node` is a member with room for `spec`.
    fn check_room(&self, node: NodeId, spec: &VmSpec) -> Result<(), Rejection> {
        let free = self
            .free_capacity(node)
            .ok_or(Rejection::UnknownNode { node_id: node })?;
        if free.vcpus >= spec.vcpus && free.memory_mib >= spec.memory_mib {
            Ok(())
        } else {
            Err(Rejection::NodeFull {
                node_id: node,
                free_vcpus: free.vcpus,
                free_memory_mib: free.memory_mib,
                vcpus: spec.vcpus,
                memory_mib: spec.memory_mib,
            })
        }
    }

    fn create_vm(&mut self, spec: VmSpec) -> Response {
        if let Some((existing, _)) = self.vms.iter().find(|(_, v)| v.spec.name == spec.name) {
            return Response::Rejected(Rejection::NameTaken {
                name: spec.name,
                existing: existing.clone(),
            });
        }
        let node_id = match self.place(&spec) {
            Ok(node) => node,
            Err(why) => return Response::Rejected(why),
        };
        // Skip ids taken by records written with `PutVm`.
        let id = loop {
            let n = self.next_vm_number;
            let Some(next) = n.checked_add(1) else {
                return Response::Rejected(Rejection::VmIdsExhausted);
            };
            self.next_vm_number = next;
            let id = format!("vm-{n}");
            if !self.vms.contains_key(&id) {
                break id;
            }
        };
        let vm = VmRecord {
            id: id.clone(),
            spec,
            node_id,
            desired: VmState::Running,
            observed: VmState::Pending,
            generation: 1,
            ..VmRecord::default()
        };
        self.vms.insert(id, vm.clone());
        Response::Vm(Box::new(vm))
    }

    /// Applies `change` to an existing record and bumps its generation.
    fn update_vm(
        &mut self,
        vm_id: String,
        change: impl FnOnce(&mut VmRecord) -> Result<(), Rejection>,
    ) -> Response {
        let Some(vm) = self.vms.get_mut(&vm_id) else {
            return Response::Rejected(Rejection::UnknownVm { vm_id });
        };
        let mut updated = vm.clone();
        if let Err(why) = change(&mut updated) {
            return Response::Rejected(why);
        }
        updated.generation = updated.generation.saturating_add(1);
        *vm = updated.clone();
        Response::Vm(Box::new(updated))
    }

    fn set_vm_desired(&mut self, vm_id: String, desired: VmState) -> Response {
        if !matches!(
            desired,
            VmState::Running | VmState::Stopped | VmState::Deleted
        ) {
            return Response::Rejected(Rejection::InvalidDesiredState { state: desired });
        }
        match self.vms.get(&vm_id) {
            None => return Response::Rejected(Rejection::UnknownVm { vm_id }),
            // Deleting twice answers the record as it stands.
            Some(vm) if vm.desired == VmState::Deleted && desired == VmState::Deleted => {
                return Response::Vm(Box::new(vm.clone()));
            }
            // A VM on a node that left the cluster has no reconciler to
            // remove it: the record goes at once.
            Some(vm) if desired == VmState::Deleted && !self.members.contains_key(&vm.node_id) => {
                return match self.vms.remove(&vm_id) {
                    Some(mut vm) => {
                        vm.desired = VmState::Deleted;
                        vm.observed = VmState::Deleted;
                        Response::Vm(Box::new(vm))
                    }
                    None => Response::Rejected(Rejection::UnknownVm { vm_id }),
                };
            }
            Some(_) => {}
        }
        let id = vm_id.clone();
        self.update_vm(vm_id, |vm| {
            if vm.desired == VmState::Deleted {
                return Err(Rejection::VmDeleting { vm_id: id });
            }
            if desired == VmState::Deleted {
                // A deletion ends any migration: the source removes the VM.
                vm.migrate_to = 0;
            }
            if desired == VmState::Running
                && matches!(vm.observed, VmState::Failed | VmState::Stopped)
            {
                // An explicit start of a VM that ended (stopped, exited or
                // failed) is a fresh attempt: reconcilers start a VM wanted
                // running only while it is observed pending or running.
                vm.observed = VmState::Pending;
                vm.reason.clear();
            }
            vm.desired = desired;
            Ok(())
        })
    }

    fn report_vm(&mut self, report: VmReport) -> Response {
        let VmReport {
            vm_id,
            node_id,
            observed,
            reason,
            log_path,
        } = report;
        let Some(vm) = self.vms.get(&vm_id) else {
            return Response::Rejected(Rejection::UnknownVm { vm_id });
        };
        if vm.node_id != node_id {
            return Response::Rejected(Rejection::NotPlacedHere {
                placed_on: vm.node_id,
                vm_id,
                node_id,
            });
        }
        let removed = vm.desired == VmState::Deleted;
        let valid = match observed {
            VmState::Running | VmState::Stopped | VmState::Failed => true,
            VmState::Deleted => removed,
            _ => false,
        };
        if !valid {
            return Response::Rejected(Rejection::InvalidReport { vm_id, observed });
        }
        if observed == VmState::Deleted {
            return match self.vms.remove(&vm_id) {
                Some(mut vm) => {
                    vm.observed = VmState::Deleted;
                    vm.generation = vm.generation.saturating_add(1);
                    Response::Vm(Box::new(vm))
                }
                None => Response::Rejected(Rejection::UnknownVm { vm_id }),
            };
        }
        self.update_vm(vm_id, |vm| {
            if vm.is_migrating() && matches!(observed, VmState::Stopped | VmState::Failed) {
                // The source has stopped it: hand over to the target, whose
                // reconciler starts it if it is wanted running.
                vm.node_id = vm.migrate_to;
                vm.migrate_to = 0;
                vm.observed = VmState::Pending;
                vm.reason.clear();
                vm.log_path.clear();
            } else {
                vm.observed = observed;
                vm.reason = reason;
                vm.log_path = log_path;
            }
            Ok(())
        })
    }

    fn migrate_vm(&mut self, vm_id: String, target: NodeId) -> Response {
        let Some(vm) = self.vms.get(&vm_id) else {
            return Response::Rejected(Rejection::UnknownVm { vm_id });
        };
        if vm.desired == VmState::Deleted {
            return Response::Rejected(Rejection::VmDeleting { vm_id });
        }
        if target == vm.node_id {
            if !vm.is_migrating() {
                return Response::Rejected(Rejection::AlreadyOnNode {
                    vm_id,
                    node_id: target,
                });
            }
            // Rollback: the source keeps (and restarts, if wanted) the VM.
            return self.update_vm(vm_id, |vm| {
                vm.migrate_to = 0;
                Ok(())
            });
        }
        if vm.is_migrating() {
            if vm.migrate_to == target {
                return Response::Vm(Box::new(vm.clone()));
            }
            return Response::Rejected(Rejection::MigrationInProgress {
                target: vm.migrate_to,
                vm_id,
            });
        }
        if let Err(why) = self.check_room(target, &vm.spec) {
            return Response::Rejected(why);
        }
        self.update_vm(vm_id, |vm| {
            vm.migrate_to = target;
            Ok(())
        })
    }

    /// Records a newly applied membership: its nodes become the members.
    /// Nodes that were members and are no longer give up their node id for
    /// good; ids seen in a membership are never handed out again.
    pub fn apply_membership(&mut self, membership: &Membership) {
        let members: BTreeMap<NodeId, Member> = membership
            .nodes()
            .map(|(id, member)| (*id, member.clone()))
            .collect();
        for (id, old) in &self.members {
            if !members.contains_key(id) && self.node_ids.get(&old.peer_id()) == Some(id) {
                self.node_ids.remove(&old.peer_id());
            }
        }
        for (id, member) in &members {
            self.node_ids.insert(member.peer_id(), *id);
            if *id >= self.next_node_id {
                self.next_node_id = id.saturating_add(1);
            }
        }
        self.members = members;
    }

    /// Current members by node id.
    pub fn members(&self) -> &BTreeMap<NodeId, Member> {
        &self.members
    }

    /// The node id held by a peer, if any.
    pub fn node_id_of(&self, peer: &PeerId) -> Option<NodeId> {
        self.node_ids.get(peer).copied()
    }

    /// All VM records by id.
    pub fn vms(&self) -> &BTreeMap<String, VmRecord> {
        &self.vms
    }

    /// One VM record.
    pub fn vm(&self, id: &str) -> Option<&VmRecord> {
        self.vms.get(id)
    }

    /// One key of the metadata register, as applied on this node.
    pub fn meta(&self, key: &str) -> Option<&MetaEntry> {
        self.meta.get(key)
    }

    /// The whole metadata register, by key.
    pub fn meta_entries(&self) -> &BTreeMap<String, MetaEntry> {
        &self.meta
    }

    /// The response remembered for a request id, if it is still
    /// remembered.
    pub fn remembered_response(&self, request_id: &str) -> Option<&Response> {
        self.dedup.get(request_id)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::types::Capacity;
    use tern_protocol::PeerAddr;

    fn peer(n: u8) -> PeerId {
        PeerId::from_bytes([n; 32])
    }

    fn access(grant: bool, key: u8, role: Role, by: u8, req: &str) -> Command {
        Command::ChangeAccess {
            request_id: req.into(),
            grant,
            key: peer(key),
            role,
            by: peer(by),
            at_unix_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn access_bootstraps_then_only_admins_change_it() {
        let mut s = ClusterState::default();
        // Bootstrap: no admin yet, the first node grants itself.
        assert_eq!(
            s.apply(access(true, 1, Role::Admin, 1, "a")),
            Response::Done
        );
        assert_eq!(s.role_of(&peer(1)), Some(Role::Admin));
        assert_eq!(
            s.apply(access(true, 2, Role::Operator, 1, "b")),
            Response::Done
        );
        // An operator cannot grant itself admin.
        assert_eq!(
            s.apply(access(true, 2, Role::Admin, 2, "c")),
            Response::Rejected(Rejection::NotAdmin { by: peer(2) })
        );
        assert_eq!(s.role_of(&peer(2)), Some(Role::Operator));
        // Roles accumulate; the strongest counts.
        assert_eq!(
            s.apply(access(true, 2, Role::Viewer, 1, "d")),
            Response::Done
        );
        assert_eq!(s.role_of(&peer(2)), Some(Role::Operator));
        // The last admin cannot be revoked.
        assert_eq!(
            s.apply(access(false, 1, Role::Admin, 1, "e")),
            Response::Rejected(Rejection::LastAdmin { key: peer(1) })
        );
        assert_eq!(
            s.apply(access(false, 2, Role::Operator, 1, "f")),
            Response::Done
        );
        assert_eq!(s.role_of(&peer(2)), Some(Role::Viewer));
        // Every applied change is in the log, with who and when.
        let log: Vec<_> = s.access_log().collect();
        assert_eq!(log.len(), 4);
        assert_eq!(log[1].by, peer(1));
        assert_eq!(log[1].key, peer(2));
        assert!(log[1].grant);
        assert_eq!(log[3].seq, 4);
        assert!(!log[3].grant);
        assert_eq!(log[0].at_unix_ms, 1_700_000_000_000);
        // A retried change is answered from the dedup table, not logged again.
        assert_eq!(
            s.apply(access(true, 2, Role::Operator, 1, "b")),
            Response::Done
        );
        assert_eq!(s.access_log().count(), 4);
    }

    fn member(n: u8) -> Member {
        let mut addr = PeerAddr::new(peer(n));
        addr.grpc = Some(format!("https://127.0.0.1:{}", 7000 + u16::from(n)));
        Member::new(
            addr,
            Capacity {
                vcpus: 4,
                memory_mib: 8192,
            },
        )
    }

    fn membership(nodes: &[(NodeId, u8)]) -> Membership {
        let voters: BTreeSet<NodeId> = nodes.iter().map(|(id, _)| *id).collect();
        let nodes: BTreeMap<NodeId, Member> =
            nodes.iter().map(|(id, n)| (*id, member(*n))).collect();
        Membership::new(vec![voters], nodes).unwrap()
    }

    fn vm(id: &str, name: &str) -> VmRecord {
        VmRecord {
            id: id.into(),
            spec: VmSpec {
                name: name.into(),
                vcpus: 1,
                memory_mib: 256,
                runtime: "process".into(),
                ..VmSpec::default()
            },
            node_id: 1,
            desired: VmState::Running,
            ..VmRecord::default()
        }
    }

    #[test]
    fn a_repeated_request_id_is_answered_from_the_table() {
        let mut state = ClusterState::default();
        let put = Command::PutVm {
            request_id: "r1".into(),
            vm: Box::new(vm("vm-1", "web")),
        };
        let first = state.apply(put.clone());
        let Response::Vm(stored) = &first else {
            panic!("{first:?}")
        };
        assert_eq!(stored.generation, 1);
        let after_first = state.clone();
        assert_eq!(state.apply(put), first);
        assert_eq!(state, after_first, "a retry changes nothing");

        // A new request id is a new write.
        let again = state.apply(Command::PutVm {
            request_id: "r2".into(),
            vm: Box::new(vm("vm-1", "web")),
        });
        assert!(matches!(
            again,
            Response::Vm(ref v) if v.generation == 2
        ));

        // A rejected write is remembered too, so its retry is refused alike.
        let del = Command::DeleteVm {
            request_id: "r3".into(),
            vm_id: "nope".into(),
        };
        let refused = state.apply(del.clone());
        assert!(matches!(
            refused,
            Response::Rejected(Rejection::UnknownVm { .. })
        ));
        assert_eq!(state.apply(del), refused);
    }

    #[test]
    fn bad_request_ids_are_refused_and_not_remembered() {
        let mut state = ClusterState::default();
        for id in [String::new(), "x".repeat(MAX_REQUEST_ID_LEN + 1)] {
            let len = id.len();
            let r = state.apply(Command::DeleteVm {
                request_id: id,
                vm_id: "a".into(),
            });
            assert_eq!(r, Response::Rejected(Rejection::InvalidRequestId { len }));
        }
        assert_eq!(state, ClusterState::default());
    }

    #[test]
    fn the_dedup_table_is_bounded_and_evicts_oldest_first() {
        let mut state = ClusterState::default();
        for i in 0..MAX_DEDUP_ENTRIES + 10 {
            state.apply(Command::AllocateNodeId {
                request_id: format!("req-{i}"),
                peer: peer(1),
            });
        }
        assert_eq!(state.dedup.by_id.len(), MAX_DEDUP_ENTRIES);
        assert_eq!(state.dedup.order.len(), MAX_DEDUP_ENTRIES);
        assert!(state.remembered_response("req-0").is_none());
        assert!(state.remembered_response("req-9").is_none());
        assert!(state.remembered_response("req-10").is_some());
    }

    #[test]
    fn vm_names_are_unique_and_deletes_return_the_record() {
        let mut state = ClusterState::default();
        state.apply(Command::PutVm {
            request_id: "a".into(),
            vm: Box::new(vm("vm-1", "web")),
        });
        let clash = state.apply(Command::PutVm {
            request_id: "b".into(),
            vm: Box::new(vm("vm-2", "web")),
        });
        assert!(matches!(
            clash,
            Response::Rejected(Rejection::NameTaken { .. })
        ));
        let gone = state.apply(Command::DeleteVm {
            request_id: "c".into(),
            vm_id: "vm-1".into(),
        });
        assert!(matches!(gone, Response::Vm(ref v) if v.id == "vm-1"));
        assert!(state.vms().is_empty());
    }

    #[test]
    fn node_ids_are_stable_per_peer_and_never_reused() {
        let mut state = ClusterState::default();
        // Bootstrap: node 1 was initialised directly into the membership.
        state.apply_membership(&membership(&[(1, 1)]));
        assert_eq!(state.node_id_of(&peer(1)), Some(1));

        let alloc = |state: &mut ClusterState, req: &str, p: u8| {
            state.apply(Command::AllocateNodeId {
                request_id: req.into(),
                peer: peer(p),
            })
        };
        assert_eq!(alloc(&mut state, "j2", 2), Response::NodeId(2));
        // The same peer asking again (another request id) keeps its id.
        assert_eq!(alloc(&mut state, "j2-retry", 2), Response::NodeId(2));
        state.apply_membership(&membership(&[(1, 1), (2, 2)]));
        assert_eq!(state.members().len(), 2);

        // Node 2 leaves, then rejoins: it gets a fresh id, 2 is retired.
        state.apply_membership(&membership(&[(1, 1)]));
        assert_eq!(state.node_id_of(&peer(2)), None);
        assert_eq!(alloc(&mut state, "j2-again", 2), Response::NodeId(3));
        assert_eq!(alloc(&mut state, "j4", 4), Response::NodeId(4));
    }

    fn arb_command() -> impl proptest::strategy::Strategy<Value = Command> {
        use proptest::prelude::*;
        let req = "[a-d]{1,2}";
        prop_oneof![
            (req, 0u8..4).prop_map(|(r, p)| Command::AllocateNodeId {
                request_id: r,
                peer: peer(p),
            }),
            (req, 0u8..5, 0u8..3).prop_map(|(r, id, name)| Command::PutVm {
                request_id: r,
                vm: Box::new(vm(&format!("vm-{id}"), &format!("n{name}"))),
            }),
            (req, 0u8..5).prop_map(|(r, id)| Command::DeleteVm {
                request_id: r,
                vm_id: format!("vm-{id}"),
            }),
            (req, 0u8..3, 0u64..3).prop_map(|(r, name, pin)| Command::CreateVm {
                request_id: r,
                spec: Box::new(VmSpec {
                    pin_node: pin,
                    ..vm("x", &format!("n{name}")).spec
                }),
            }),
            (req, 0u8..5, 0u8..4).prop_map(|(r, id, s)| Command::SetVmDesired {
                request_id: r,
                vm_id: format!("vm-{id}"),
                desired: [
                    VmState::Running,
                    VmState::Stopped,
                    VmState::Deleted,
                    VmState::Pending
                ][usize::from(s)],
            }),
            (req, 0u8..5, 1u64..3, 0u8..3).prop_map(|(r, id, node, s)| Command::ReportVm {
                request_id: r,
                report: VmReport {
                    vm_id: format!("vm-{id}"),
                    node_id: node,
                    observed: [VmState::Running, VmState::Stopped, VmState::Deleted]
                        [usize::from(s)],
                    reason: String::new(),
                    log_path: String::new(),
                },
            }),
            (req, 0u8..5, 1u64..3).prop_map(|(r, id, target)| Command::MigrateVm {
                request_id: r,
                vm_id: format!("vm-{id}"),
                target,
            }),
            (req, 0u8..3, "[a-z]{0,3}").prop_map(|(r, k, value)| Command::PutMeta {
                request_id: r,
                key: format!("k{k}"),
                value,
            }),
        ]
    }

    #[test]
    fn the_metadata_register_keeps_the_index_and_refuses_out_of_bounds() {
        let mut state = ClusterState::default();
        let put = |req: &str, key: &str, value: &str| Command::PutMeta {
            request_id: req.into(),
            key: key.into(),
            value: value.into(),
        };
        assert_eq!(
            state.apply_at(7, put("r1", "zone", "eu")),
            Response::MetaWritten { index: 7 }
        );
        // A retry answers the first write's index and changes nothing.
        assert_eq!(
            state.apply_at(9, put("r1", "zone", "eu")),
            Response::MetaWritten { index: 7 }
        );
        assert_eq!(state.meta("zone").map(|e| e.index), Some(7));
        assert_eq!(
            state.apply_at(10, put("r2", "zone", "us")),
            Response::MetaWritten { index: 10 }
        );
        assert_eq!(state.meta("zone").map(|e| e.value.as_str()), Some("us"));
        for (req, key, value, why) in [
            ("r3", "", "v", Rejection::InvalidMetaKey { len: 0 }),
            ("r4", "a\nb", "v", Rejection::InvalidMetaKey { len: 3 }),
            (
                "r5",
                &"k".repeat(MAX_META_KEY_LEN + 1),
                "v",
                Rejection::InvalidMetaKey {
                    len: MAX_META_KEY_LEN + 1,
                },
            ),
            (
                "r6",
                "k",
                &"v".repeat(MAX_META_VALUE_LEN + 1),
                Rejection::MetaValueTooLarge {
                    len: MAX_META_VALUE_LEN + 1,
                },
            ),
        ] {
            assert_eq!(
                state.apply_at(11, put(req, key, value)),
                Response::Rejected(why)
            );
        }
        for i in 1..MAX_META_KEYS {
            state.apply_at(20, put(&format!("f{i}"), &format!("key{i}"), ""));
        }
        assert_eq!(state.meta_entries().len(), MAX_META_KEYS);
        assert_eq!(
            state.apply_at(30, put("full", "one-more", "")),
            Response::Rejected(Rejection::MetaFull)
        );
        assert_eq!(
            state.apply_at(31, put("overwrite", "zone", "ap")),
            Response::MetaWritten { index: 31 },
            "a full register still takes writes to existing keys"
        );
    }

    proptest::proptest! {
        /// Two nodes applying the same commands agree on every response
        /// and on the state, and the state survives its snapshot encoding.
        #[test]
        fn apply_is_deterministic_and_survives_encoding(
            cmds in proptest::collection::vec(arb_command(), 0..40)
        ) {
            let (mut a, mut b) = (ClusterState::default(), ClusterState::default());
            a.apply_membership(&membership(&[(1, 1), (2, 2)]));
            b.apply_membership(&membership(&[(1, 1), (2, 2)]));
            for cmd in cmds {
                proptest::prop_assert_eq!(a.apply(cmd.clone()), b.apply(cmd));
            }
            proptest::prop_assert_eq!(&a, &b);
            let bytes = postcard::to_stdvec(&a).unwrap();
            let back: ClusterState = postcard::from_bytes(&bytes).unwrap();
            proptest::prop_assert_eq!(back, a);
        }

        /// Whatever VM commands arrive, in any order, no node is promised
        /// more than it declared: the VMs placed on it or moving to it fit
        /// its capacity, and every VM is placed on a member.
        #[test]
        fn placement_never_overcommits_a_node(
            cmds in proptest::collection::vec(arb_vm_command(), 0..60)
        ) {
            let mut state = ClusterState::default();
            state.apply_membership(&membership(&[(1, 1), (2, 2)]));
            for cmd in cmds {
                state.apply(cmd);
                for (id, member) in state.members() {
                    let (vcpus, memory) = state
                        .vms()
                        .values()
                        .filter(|vm| vm.node_id == *id || vm.migrate_to == *id)
                        .fold((0u64, 0u64), |(v, m), vm| {
                            (v + u64::from(vm.spec.vcpus), m + vm.spec.memory_mib)
                        });
                    proptest::prop_assert!(vcpus <= u64::from(member.capacity.vcpus));
                    proptest::prop_assert!(memory <= member.capacity.memory_mib);
                }
                for vm in state.vms().values() {
                    proptest::prop_assert!(state.members().contains_key(&vm.node_id));
                }
            }
        }
    }

    /// VM commands only (no `PutVm`, which bypasses placement), with sizes
    /// that fill the two 4-vCPU, 8 GiB test members quickly.
    fn arb_vm_command() -> impl proptest::strategy::Strategy<Value = Command> {
        use proptest::prelude::*;
        let req = "[a-z]{1,3}";
        let state = prop_oneof![
            Just(VmState::Running),
            Just(VmState::Stopped),
            Just(VmState::Failed),
            Just(VmState::Deleted),
        ];
        prop_oneof![
            (
                req,
                0u8..6,
                1u32..4,
                prop_oneof![Just(256u64), Just(2048), Just(4096)],
                0u64..3
            )
                .prop_map(|(r, name, vcpus, memory_mib, pin)| Command::CreateVm {
                    request_id: r,
                    spec: Box::new(VmSpec {
                        name: format!("n{name}"),
                        vcpus,
                        memory_mib,
                        runtime: "process".into(),
                        pin_node: pin,
                        ..VmSpec::default()
                    }),
                }),
            (req, 1u8..7, state.clone()).prop_map(|(r, id, desired)| Command::SetVmDesired {
                request_id: r,
                vm_id: format!("vm-{id}"),
                desired,
            }),
            (req, 1u8..7, 1u64..3, state).prop_map(|(r, id, node, observed)| Command::ReportVm {
                request_id: r,
                report: VmReport {
                    vm_id: format!("vm-{id}"),
                    node_id: node,
                    observed,
                    reason: String::new(),
                    log_path: String::new(),
                },
            }),
            (req, 1u8..7, 1u64..4).prop_map(|(r, id, target)| Command::MigrateVm {
                request_id: r,
                vm_id: format!("vm-{id}"),
                target,
            }),
        ]
    }

    fn cap(vcpus: u32, memory_mib: u64) -> Capacity {
        Capacity { vcpus, memory_mib }
    }

    /// A cluster of members 1..=n with the given capacities.
    fn cluster(caps: &[Capacity]) -> ClusterState {
        let mut state = ClusterState::default();
        let nodes: BTreeMap<NodeId, Member> = caps
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let n = u8::try_from(i + 1).unwrap();
                (NodeId::from(n), Member::new(PeerAddr::new(peer(n)), *c))
            })
            .collect();
        let voters: BTreeSet<NodeId> = nodes.keys().copied().collect();
        state.apply_membership(&Membership::new(vec![voters], nodes).unwrap());
        state
    }

    fn spec(name: &str, vcpus: u32, memory_mib: u64) -> Box<VmSpec> {
        Box::new(VmSpec {
            name: name.into(),
            vcpus,
            memory_mib,
            runtime: "process".into(),
            command: vec!["sleep".into(), "600".into()],
            ..VmSpec::default()
        })
    }

    fn create(state: &mut ClusterState, req: &str, spec: Box<VmSpec>) -> Response {
        state.apply(Command::CreateVm {
            request_id: req.into(),
            spec,
        })
    }

    fn created(r: Response) -> VmRecord {
        match r {
            Response::Vm(vm) => *vm,
            other => panic!("expected a VM, got {other:?}"),
        }
    }

    fn report(state: &mut ClusterState, req: &str, vm: &str, node: NodeId, s: VmState) -> Response {
        state.apply(Command::ReportVm {
            request_id: req.into(),
            report: VmReport {
                vm_id: vm.into(),
                node_id: node,
                observed: s,
                reason: String::new(),
                log_path: format!("/logs/{vm}"),
            },
        })
    }

    fn desire(state: &mut ClusterState, req: &str, vm: &str, s: VmState) -> Response {
        state.apply(Command::SetVmDesired {
            request_id: req.into(),
            vm_id: vm.into(),
            desired: s,
        })
    }

    #[test]
    fn placement_picks_the_freest_node_and_reserves_capacity() {
        let mut state = cluster(&[cap(4, 1024), cap(4, 4096), cap(1, 8192)]);
        let a = created(create(&mut state, "a", spec("a", 2, 1024)));
        // Node 3 has the most memory but one vCPU: node 2 is the freest fit.
        assert_eq!(a.node_id, 2);
        assert_eq!(
            (a.id.as_str(), a.desired, a.observed),
            ("vm-1", VmState::Running, VmState::Pending)
        );
        assert_eq!(state.free_capacity(2), Some(cap(2, 3072)));
        let b = created(create(&mut state, "b", spec("b", 1, 4000)));
        assert_eq!(b.node_id, 3);
        let c = created(create(&mut state, "c", spec("c", 2, 1024)));
        // Nodes 1 and 2 both fit; node 2 keeps more memory afterwards.
        assert_eq!(c.node_id, 2);
        let none = create(&mut state, "d", spec("d", 3, 2048));
        assert!(
            matches!(
                none,
                Response::Rejected(Rejection::NoCapacity {
                    vcpus: 3,
                    members: 3,
                    ..
                })
            ),
            "{none:?}"
        );
        let text = match none {
            Response::Rejected(r) => r.to_string(),
            _ => unreachable!(),
        };
        assert!(text.contains("3 free vCPUs"), "{text}");
    }

    #[test]
    fn pins_are_honoured_or_refused_with_the_reason() {
        let mut state = cluster(&[cap(4, 4096), cap(2, 512)]);
        let mut pinned = spec("p", 1, 256);
        pinned.pin_node = 2;
        assert_eq!(created(create(&mut state, "p", pinned)).node_id, 2);
        let mut full = spec("q", 1, 512);
        full.pin_node = 2;
        assert!(matches!(
            create(&mut state, "q", full),
            Response::Rejected(Rejection::NodeFull {
                node_id: 2,
                free_memory_mib: 256,
                ..
            })
        ));
        let mut nowhere = spec("r", 1, 64);
        nowhere.pin_node = 9;
        assert_eq!(
            create(&mut state, "r", nowhere),
            Response::Rejected(Rejection::UnknownNode { node_id: 9 })
        );
        // No members at all: no capacity.
        let mut empty = ClusterState::default();
        assert!(matches!(
            create(&mut empty, "s", spec("s", 1, 64)),
            Response::Rejected(Rejection::NoCapacity { members: 0, .. })
        ));
    }

    #[test]
    fn a_retried_create_makes_one_vm() {
        let mut state = cluster(&[cap(4, 4096)]);
        let first = create(&mut state, "same", spec("web", 1, 64));
        let again = create(&mut state, "same", spec("web", 1, 64));
        assert_eq!(first, again);
        assert_eq!(state.vms().len(), 1);
        // The same name under a new request id is refused.
        assert!(matches!(
            create(&mut state, "other", spec("web", 1, 64)),
            Response::Rejected(Rejection::NameTaken { .. })
        ));
    }

    #[test]
    fn desired_and_observed_states_follow_commands_and_reports() {
        let mut state = cluster(&[cap(4, 4096), cap(4, 4096)]);
        let vm = created(create(&mut state, "c", spec("web", 1, 64)));
        let (id, node) = (vm.id.clone(), vm.node_id);
        let other = 3 - node;
        let running = created(report(&mut state, "r1", &id, node, VmState::Running));
        assert_eq!(running.observed, VmState::Running);
        assert_eq!(running.log_path, format!("/logs/{id}"));
        assert!(running.generation > vm.generation);
        assert!(matches!(
            report(&mut state, "r2", &id, other, VmState::Stopped),
            Response::Rejected(Rejection::NotPlacedHere { .. })
        ));
        assert!(matches!(
            report(&mut state, "r3", &id, node, VmState::Deleted),
            Response::Rejected(Rejection::InvalidReport { .. })
        ));
        assert!(matches!(
            desire(&mut state, "d0", &id, VmState::Migrating),
            Response::Rejected(Rejection::InvalidDesiredState { .. })
        ));
        assert_eq!(
            created(desire(&mut state, "d1", &id, VmState::Stopped)).desired,
            VmState::Stopped
        );
        report(&mut state, "r4", &id, node, VmState::Failed);
        // Start after a failure is a fresh attempt.
        let restarted = created(desire(&mut state, "d2", &id, VmState::Running));
        assert_eq!(
            (restarted.desired, restarted.observed),
            (VmState::Running, VmState::Pending)
        );
        // Delete: wanted gone; removed once the node reports it removed.
        assert_eq!(
            created(desire(&mut state, "d3", &id, VmState::Deleted)).desired,
            VmState::Deleted
        );
        assert_eq!(
            desire(&mut state, "d4", &id, VmState::Running),
            Response::Rejected(Rejection::VmDeleting { vm_id: id.clone() })
        );
        assert_eq!(
            created(desire(&mut state, "d5", &id, VmState::Deleted)).desired,
            VmState::Deleted
        );
        assert_eq!(state.free_capacity(node), Some(cap(3, 4032)));
        let gone = created(report(&mut state, "r5", &id, node, VmState::Deleted));
        assert_eq!(gone.observed, VmState::Deleted);
        assert!(state.vm(&id).is_none());
        assert_eq!(state.free_capacity(node), Some(cap(4, 4096)));
        assert!(matches!(
            desire(&mut state, "d6", &id, VmState::Stopped),
            Response::Rejected(Rejection::UnknownVm { .. })
        ));
    }

    #[test]
    fn deleting_a_vm_whose_node_left_removes_it_at_once() {
        let mut state = cluster(&[cap(4, 4096), cap(4, 64)]);
        let mut s = spec("web", 1, 64);
        s.pin_node = 2;
        let vm = created(create(&mut state, "c", s));
        state.apply_membership(&membership(&[(1, 1)]));
        let gone = created(desire(&mut state, "d", &vm.id, VmState::Deleted));
        assert_eq!(gone.observed, VmState::Deleted);
        assert!(state.vms().is_empty());
    }

    #[test]
    fn migration_hands_over_only_after_the_source_reports_it_stopped() {
        let mut state = cluster(&[cap(4, 4096), cap(4, 4096), cap(1, 32)]);
        let mut s = spec("web", 1, 64);
        s.pin_node = 1;
        let id = created(create(&mut state, "c", s)).id;
        report(&mut state, "r1", &id, 1, VmState::Running);
        let migrate = |state: &mut ClusterState, req: &str, target| {
            state.apply(Command::MigrateVm {
                request_id: req.into(),
                vm_id: id.clone(),
                target,
            })
        };
        assert!(matches!(
            migrate(&mut state, "m0", 1),
            Response::Rejected(Rejection::AlreadyOnNode { node_id: 1, .. })
        ));
        assert!(matches!(
            migrate(&mut state, "m1", 3),
            Response::Rejected(Rejection::NodeFull { node_id: 3, .. })
        ));
        assert!(matches!(
            migrate(&mut state, "m2", 7),
            Response::Rejected(Rejection::UnknownNode { node_id: 7 })
        ));
        let moving = created(migrate(&mut state, "m3", 2));
        assert_eq!((moving.node_id, moving.migrate_to), (1, 2));
        // The target reserves room while the VM moves.
        assert_eq!(state.free_capacity(2), Some(cap(3, 4032)));
        assert!(matches!(
            migrate(&mut state, "m4", 3),
            Response::Rejected(Rejection::MigrationInProgress { target: 2, .. })
        ));
        // Still running on the source: nothing moves.
        let still = created(report(&mut state, "r2", &id, 1, VmState::Running));
        assert_eq!((still.node_id, still.migrate_to), (1, 2));
        // The source stopped it: the record moves to the target.
        let moved = created(report(&mut state, "r3", &id, 1, VmState::Stopped));
        assert_eq!((moved.node_id, moved.migrate_to), (2, 0));
        assert_eq!(
            (moved.desired, moved.observed),
            (VmState::Running, VmState::Pending)
        );
        assert_eq!(state.free_capacity(1), Some(cap(4, 4096)));
        // The old source's late reports are refused.
        assert!(matches!(
            report(&mut state, "r4", &id, 1, VmState::Stopped),
            Response::Rejected(Rejection::NotPlacedHere { placed_on: 2, .. })
        ));
        // Rollback: a migration back to the current node before the
        // hand-over cancels it.
        created(migrate(&mut state, "m5", 1));
        let cancelled = created(migrate(&mut state, "m6", 2));
        assert_eq!((cancelled.node_id, cancelled.migrate_to), (2, 0));
        assert_eq!(state.free_capacity(1), Some(cap(4, 4096)));
    }

    #[test]
    fn ids_seen_in_a_membership_are_never_allocated() {
        let mut state = ClusterState::default();
        state.apply_membership(&membership(&[(7, 1)]));
        let r = state.apply(Command::AllocateNodeId {
            request_id: "x".into(),
            peer: peer(9),
        });
        assert_eq!(r, Response::NodeId(8));
    }
}
