//! The replicated cluster state and the commands that change it.
//!
//! [`ClusterState::apply`] is a pure function from a state and a
//! [`Command`] to a new state and a [`Response`]: no I/O, no clock, no
//! randomness, so every node that applies the same log reaches the same
//! state. The Raft state machine (`tern_store::StateMachineStore`) calls it for
//! every normal entry and [`ClusterState::apply_membership`] for every
//! membership entry.
//!
//! Adding a command is adding a variant to [`Command`], an arm to
//! `ClusterState::apply_new` and, if it answers with something new, a
//! variant to [`Response`]. Commands that carry a client request id are
//! deduplicated here, once for all of them: a second write with the same
//! request id is answered with the first write's response and changes
//! nothing, so clients and the transport router may retry writes freely.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};
use tern_protocol::PeerId;
use tern_protocol::access::Role;

use crate::access::{AccessEvent, AuditEvent};
use crate::admission::JoinTokenRecord;
use crate::agent::AgentRecord;
use crate::command::{Command, Rejection, Response};
use crate::dedup::DedupTable;
use crate::events::VmHistory;
use crate::limits::MAX_REQUEST_ID_LEN;
use crate::marks::AssignmentMarks;
use crate::member::{FIRST_NODE_ID, Member, NodeId};
use crate::meta::MetaEntry;
use crate::network::NetworkState;
use crate::policy::{DesiredPolicies, Labels};
use crate::rollout::Rollout;
use crate::vm::{VmIndex, VmRecord};

/// The replicated cluster state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "StoredState")]
pub struct ClusterState {
    /// Members as of the last applied membership entry, voters and
    /// learners.
    pub(crate) members: BTreeMap<NodeId, Member>,
    /// Node ids held by peers: current members and peers allocated an id
    /// that have not joined yet. An id leaves this map when its node leaves
    /// the membership, and is never handed out again.
    pub(crate) node_ids: BTreeMap<PeerId, NodeId>,
    /// The next node id to hand out.
    pub(crate) next_node_id: NodeId,
    /// VM records by id.
    pub(crate) vms: BTreeMap<String, VmRecord>,
    /// Recent client request ids.
    pub(crate) dedup: DedupTable,
    /// The number in the next VM id [`Command::CreateVm`] hands out.
    pub(crate) next_vm_number: u64,
    /// The metadata register: key to value and the index it was written at.
    pub(crate) meta: BTreeMap<String, MetaEntry>,
    /// Roles granted to keys (members hold the member role implicitly).
    pub(crate) access: BTreeMap<PeerId, BTreeSet<Role>>,
    /// The most recent access, token and membership changes, oldest
    /// first, at most [`MAX_AUDIT_LOG`](crate::access::MAX_AUDIT_LOG).
    pub(crate) audit_log: VecDeque<AuditEvent>,
    /// The sequence number of the next audit event.
    pub(crate) next_audit_seq: u64,
    /// Join tokens by public id.
    pub(crate) tokens: BTreeMap<String, JoinTokenRecord>,
    /// The recent changes of VM records with their revisions, and the
    /// revision of the last applied command (snapshot format 5 on).
    pub(crate) vm_history: VmHistory,
    /// The guest network's pool and the address leased to each VM
    /// (snapshot format 6 on).
    pub(crate) network: NetworkState,
    /// Operator user data of the VMs that have some, by VM id (snapshot
    /// format 6 on).
    pub(crate) user_data: BTreeMap<String, String>,
    /// Each member's labels (snapshot format 7 on).
    pub(crate) node_labels: BTreeMap<NodeId, Labels>,
    /// The desired transport policies (snapshot format 7 on).
    pub(crate) policies: DesiredPolicies,
    /// The transport rollout, the last one started (snapshot format 8 on).
    pub(crate) rollout: Option<Rollout>,
    /// The agents: nodes that run VMs without being Raft members
    /// (snapshot format 9 on).
    pub(crate) agents: BTreeMap<NodeId, AgentRecord>,
    /// Indexes over `vms` (names, reserved capacity), derived from them:
    /// not serialized, rebuilt on decoding.
    #[serde(skip)]
    pub(crate) index: VmIndex,
    /// Which nodes' assignments applies may have changed (see
    /// [`crate::marks`]): not serialized, everything marked on decoding.
    #[serde(skip)]
    pub(crate) marks: AssignmentMarks,
}

/// The fields of [`ClusterState`] as they are serialized (all but the
/// derived index), decoded first and turned into a state with its index
/// rebuilt.
#[derive(Deserialize)]
struct StoredState {
    members: BTreeMap<NodeId, Member>,
    node_ids: BTreeMap<PeerId, NodeId>,
    next_node_id: NodeId,
    vms: BTreeMap<String, VmRecord>,
    dedup: DedupTable,
    next_vm_number: u64,
    meta: BTreeMap<String, MetaEntry>,
    access: BTreeMap<PeerId, BTreeSet<Role>>,
    audit_log: VecDeque<AuditEvent>,
    next_audit_seq: u64,
    tokens: BTreeMap<String, JoinTokenRecord>,
    vm_history: VmHistory,
    network: NetworkState,
    user_data: BTreeMap<String, String>,
    node_labels: BTreeMap<NodeId, Labels>,
    policies: DesiredPolicies,
    rollout: Option<Rollout>,
    agents: BTreeMap<NodeId, AgentRecord>,
}

impl From<StoredState> for ClusterState {
    fn from(s: StoredState) -> ClusterState {
        ClusterState {
            index: VmIndex::of(s.vms.values()),
            marks: AssignmentMarks::default(),
            members: s.members,
            node_ids: s.node_ids,
            next_node_id: s.next_node_id,
            vms: s.vms,
            dedup: s.dedup,
            next_vm_number: s.next_vm_number,
            meta: s.meta,
            access: s.access,
            audit_log: s.audit_log,
            next_audit_seq: s.next_audit_seq,
            tokens: s.tokens,
            vm_history: s.vm_history,
            network: s.network.reindexed(),
            user_data: s.user_data,
            node_labels: s.node_labels,
            policies: s.policies,
            rollout: s.rollout,
            agents: s.agents,
        }
    }
}

/// The cluster state as snapshot format 8 wrote it, before agents: the
/// same fields in the same order, without the last one. Read so that a
/// node upgraded in place keeps its state; it has no agents.
#[derive(Debug, Deserialize)]
pub struct ClusterStateV8 {
    members: BTreeMap<NodeId, Member>,
    node_ids: BTreeMap<PeerId, NodeId>,
    next_node_id: NodeId,
    vms: BTreeMap<String, VmRecord>,
    dedup: DedupTable,
    next_vm_number: u64,
    meta: BTreeMap<String, MetaEntry>,
    access: BTreeMap<PeerId, BTreeSet<Role>>,
    audit_log: VecDeque<AuditEvent>,
    next_audit_seq: u64,
    tokens: BTreeMap<String, JoinTokenRecord>,
    vm_history: VmHistory,
    network: NetworkState,
    user_data: BTreeMap<String, String>,
    node_labels: BTreeMap<NodeId, Labels>,
    policies: DesiredPolicies,
    rollout: Option<Rollout>,
}

impl From<ClusterStateV8> for ClusterState {
    fn from(v8: ClusterStateV8) -> ClusterState {
        ClusterState::from(StoredState {
            members: v8.members,
            node_ids: v8.node_ids,
            next_node_id: v8.next_node_id,
            vms: v8.vms,
            dedup: v8.dedup,
            next_vm_number: v8.next_vm_number,
            meta: v8.meta,
            access: v8.access,
            audit_log: v8.audit_log,
            next_audit_seq: v8.next_audit_seq,
            tokens: v8.tokens,
            vm_history: v8.vm_history,
            network: v8.network,
            user_data: v8.user_data,
            node_labels: v8.node_labels,
            policies: v8.policies,
            rollout: v8.rollout,
            agents: BTreeMap::new(),
        })
    }
}

/// The cluster state as snapshot format 7 wrote it, before the rollout:
/// the same fields in the same order, without the last one. Read so that
/// a node upgraded in place keeps its state; it has no rollout.
#[derive(Debug, Deserialize)]
pub struct ClusterStateV7 {
    members: BTreeMap<NodeId, Member>,
    node_ids: BTreeMap<PeerId, NodeId>,
    next_node_id: NodeId,
    vms: BTreeMap<String, VmRecord>,
    dedup: DedupTable,
    next_vm_number: u64,
    meta: BTreeMap<String, MetaEntry>,
    access: BTreeMap<PeerId, BTreeSet<Role>>,
    audit_log: VecDeque<AuditEvent>,
    next_audit_seq: u64,
    tokens: BTreeMap<String, JoinTokenRecord>,
    vm_history: VmHistory,
    network: NetworkState,
    user_data: BTreeMap<String, String>,
    node_labels: BTreeMap<NodeId, Labels>,
    policies: DesiredPolicies,
}

impl From<ClusterStateV7> for ClusterState {
    fn from(v7: ClusterStateV7) -> ClusterState {
        ClusterState::from(StoredState {
            members: v7.members,
            node_ids: v7.node_ids,
            next_node_id: v7.next_node_id,
            vms: v7.vms,
            dedup: v7.dedup,
            next_vm_number: v7.next_vm_number,
            meta: v7.meta,
            access: v7.access,
            audit_log: v7.audit_log,
            next_audit_seq: v7.next_audit_seq,
            tokens: v7.tokens,
            vm_history: v7.vm_history,
            network: v7.network,
            user_data: v7.user_data,
            node_labels: v7.node_labels,
            policies: v7.policies,
            rollout: None,
            agents: BTreeMap::new(),
        })
    }
}

/// The cluster state as snapshot format 6 wrote it, before node labels and
/// desired transport policies: the same fields in the same order, without
/// the last two. Read so that a node upgraded in place keeps its state; it
/// has no labels (each node records its own when it next starts) and no
/// desired policy (every node runs its file or the default, as before).
#[derive(Debug, Deserialize)]
pub struct ClusterStateV6 {
    members: BTreeMap<NodeId, Member>,
    node_ids: BTreeMap<PeerId, NodeId>,
    next_node_id: NodeId,
    vms: BTreeMap<String, VmRecord>,
    dedup: DedupTable,
    next_vm_number: u64,
    meta: BTreeMap<String, MetaEntry>,
    access: BTreeMap<PeerId, BTreeSet<Role>>,
    audit_log: VecDeque<AuditEvent>,
    next_audit_seq: u64,
    tokens: BTreeMap<String, JoinTokenRecord>,
    vm_history: VmHistory,
    network: NetworkState,
    user_data: BTreeMap<String, String>,
}

impl From<ClusterStateV6> for ClusterState {
    fn from(v6: ClusterStateV6) -> ClusterState {
        ClusterState::from(StoredState {
            members: v6.members,
            node_ids: v6.node_ids,
            next_node_id: v6.next_node_id,
            vms: v6.vms,
            dedup: v6.dedup,
            next_vm_number: v6.next_vm_number,
            meta: v6.meta,
            access: v6.access,
            audit_log: v6.audit_log,
            next_audit_seq: v6.next_audit_seq,
            tokens: v6.tokens,
            vm_history: v6.vm_history,
            network: v6.network,
            user_data: v6.user_data,
            node_labels: BTreeMap::new(),
            policies: DesiredPolicies::default(),
            rollout: None,
            agents: BTreeMap::new(),
        })
    }
}

/// The cluster state as snapshot format 5 wrote it, before the guest
/// network: the same fields in the same order, without the last one. Read
/// so that a node upgraded in place keeps its state; it has no pool and no
/// leases, as a log of that version applies (a pool is set by a later
/// command, which leases addresses to the VMs then).
#[derive(Debug, Deserialize)]
pub struct ClusterStateV5 {
    members: BTreeMap<NodeId, Member>,
    node_ids: BTreeMap<PeerId, NodeId>,
    next_node_id: NodeId,
    vms: BTreeMap<String, VmRecord>,
    dedup: DedupTable,
    next_vm_number: u64,
    meta: BTreeMap<String, MetaEntry>,
    access: BTreeMap<PeerId, BTreeSet<Role>>,
    audit_log: VecDeque<AuditEvent>,
    next_audit_seq: u64,
    tokens: BTreeMap<String, JoinTokenRecord>,
    vm_history: VmHistory,
}

impl From<ClusterStateV5> for ClusterState {
    fn from(v5: ClusterStateV5) -> ClusterState {
        ClusterState {
            index: VmIndex::of(v5.vms.values()),
            marks: AssignmentMarks::default(),
            members: v5.members,
            node_ids: v5.node_ids,
            next_node_id: v5.next_node_id,
            vms: v5.vms,
            dedup: v5.dedup,
            next_vm_number: v5.next_vm_number,
            meta: v5.meta,
            access: v5.access,
            audit_log: v5.audit_log,
            next_audit_seq: v5.next_audit_seq,
            tokens: v5.tokens,
            vm_history: v5.vm_history,
            network: NetworkState::default(),
            user_data: BTreeMap::new(),
            node_labels: BTreeMap::new(),
            policies: DesiredPolicies::default(),
            rollout: None,
            agents: BTreeMap::new(),
        }
    }
}

/// The cluster state as snapshot format 4 wrote it, before the history of
/// VM changes: the same fields in the same order, without the last one.
/// Read so that a node upgraded in place keeps its state; its history
/// starts empty, whole after the snapshot's last index
/// ([`ClusterState::start_vm_history_at`]), so a watch from before it is
/// told to re-list.
#[derive(Debug, Deserialize)]
pub struct ClusterStateV4 {
    members: BTreeMap<NodeId, Member>,
    node_ids: BTreeMap<PeerId, NodeId>,
    next_node_id: NodeId,
    vms: BTreeMap<String, VmRecord>,
    dedup: DedupTable,
    next_vm_number: u64,
    meta: BTreeMap<String, MetaEntry>,
    access: BTreeMap<PeerId, BTreeSet<Role>>,
    audit_log: VecDeque<AuditEvent>,
    next_audit_seq: u64,
    tokens: BTreeMap<String, JoinTokenRecord>,
}

impl From<ClusterStateV4> for ClusterState {
    fn from(v4: ClusterStateV4) -> ClusterState {
        ClusterState {
            index: VmIndex::of(v4.vms.values()),
            marks: AssignmentMarks::default(),
            members: v4.members,
            node_ids: v4.node_ids,
            next_node_id: v4.next_node_id,
            vms: v4.vms,
            dedup: v4.dedup,
            next_vm_number: v4.next_vm_number,
            meta: v4.meta,
            access: v4.access,
            audit_log: v4.audit_log,
            next_audit_seq: v4.next_audit_seq,
            tokens: v4.tokens,
            vm_history: VmHistory::default(),
            network: NetworkState::default(),
            user_data: BTreeMap::new(),
            node_labels: BTreeMap::new(),
            policies: DesiredPolicies::default(),
            rollout: None,
            agents: BTreeMap::new(),
        }
    }
}

/// The cluster state as snapshot format 2 wrote it, before the access
/// table existed: the same fields in the same order, without the last
/// three. Read so that a node upgraded in place keeps its state (its
/// access table starts empty, and the first node grants its admins when it
/// next leads).
#[derive(Debug, Deserialize)]
pub struct ClusterStateV2 {
    pub(crate) members: BTreeMap<NodeId, Member>,
    pub(crate) node_ids: BTreeMap<PeerId, NodeId>,
    pub(crate) next_node_id: NodeId,
    pub(crate) vms: BTreeMap<String, VmRecord>,
    pub(crate) dedup: DedupTable,
    pub(crate) next_vm_number: u64,
    pub(crate) meta: BTreeMap<String, MetaEntry>,
}

/// The cluster state as snapshot format 3 wrote it, before join tokens and
/// the general audit log: the same fields in the same order, the access
/// log holding access changes only. Read so that a node upgraded in place
/// keeps its state and its audit trail.
#[derive(Debug, Deserialize)]
pub struct ClusterStateV3 {
    members: BTreeMap<NodeId, Member>,
    node_ids: BTreeMap<PeerId, NodeId>,
    next_node_id: NodeId,
    vms: BTreeMap<String, VmRecord>,
    dedup: DedupTable,
    next_vm_number: u64,
    meta: BTreeMap<String, MetaEntry>,
    access: BTreeMap<PeerId, BTreeSet<Role>>,
    access_log: VecDeque<AccessEvent>,
    next_access_seq: u64,
}

impl From<ClusterStateV3> for ClusterState {
    fn from(v3: ClusterStateV3) -> ClusterState {
        ClusterState {
            index: VmIndex::of(v3.vms.values()),
            marks: AssignmentMarks::default(),
            members: v3.members,
            node_ids: v3.node_ids,
            next_node_id: v3.next_node_id,
            vms: v3.vms,
            dedup: v3.dedup,
            next_vm_number: v3.next_vm_number,
            meta: v3.meta,
            access: v3.access,
            audit_log: v3.access_log.into_iter().map(AuditEvent::from).collect(),
            next_audit_seq: v3.next_access_seq,
            tokens: BTreeMap::new(),
            vm_history: VmHistory::default(),
            network: NetworkState::default(),
            user_data: BTreeMap::new(),
            node_labels: BTreeMap::new(),
            policies: DesiredPolicies::default(),
            rollout: None,
            agents: BTreeMap::new(),
        }
    }
}

impl From<ClusterStateV2> for ClusterState {
    fn from(v2: ClusterStateV2) -> ClusterState {
        ClusterState {
            index: VmIndex::of(v2.vms.values()),
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
            audit_log: VecDeque::new(),
            next_audit_seq: 1,
            tokens: BTreeMap::new(),
            vm_history: VmHistory::default(),
            network: NetworkState::default(),
            user_data: BTreeMap::new(),
            node_labels: BTreeMap::new(),
            policies: DesiredPolicies::default(),
            rollout: None,
            agents: BTreeMap::new(),
            index: VmIndex::default(),
            marks: AssignmentMarks::default(),
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
        self.vm_history.advance(index);
        // A retry answered from the table is marked too: marks may say
        // "changed" when nothing did, never the reverse.
        self.mark_for(&cmd);
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

    /// The history of VM changes and the current revision (what
    /// `Vm/Watch` serves; see [`crate::events`]).
    pub fn vm_history(&self) -> &VmHistory {
        &self.vm_history
    }

    /// Starts an empty history of VM changes, whole after `revision`:
    /// for a state read from a snapshot format that had no history, whose
    /// last applied index is `revision`.
    pub fn start_vm_history_at(&mut self, revision: u64) {
        self.vm_history = VmHistory::starting_at(revision);
    }

    /// Applies a command not seen before. One arm per command.
    fn apply_new(&mut self, index: u64, cmd: Command) -> Response {
        match cmd {
            Command::AllocateNodeId { peer, .. } => self.allocate_node_id(peer),
            Command::PutVm { vm, .. } => self.put_vm(vm),
            Command::DeleteVm { vm_id, .. } => match self.remove_vm(&vm_id, |_| {}) {
                Some(vm) => Response::Vm(Box::new(vm)),
                None => Response::Rejected(Rejection::UnknownVm { vm_id }),
            },
            Command::CreateVm { spec, .. } => self.create_vm(*spec, String::new()),
            Command::CreateVmWithData {
                spec, user_data, ..
            } => self.create_vm(*spec, user_data),
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
            } => self.change_access(grant, key, role, by, at_unix_ms),
            Command::CreateJoinToken { token, .. } => self.create_join_token(token),
            Command::RevokeJoinToken {
                id, by, at_unix_ms, ..
            } => self.revoke_join_token(id, by, at_unix_ms),
            Command::AdmitNode {
                peer,
                token_id,
                token_hash,
                at_unix_ms,
                ..
            } => self.admit_node(peer, token_id, token_hash, at_unix_ms),
            Command::RecordMembership {
                change,
                by,
                at_unix_ms,
                ..
            } => self.record_membership(change, by, at_unix_ms),
            Command::SetNetworkPool { pool, .. } => self.set_network_pool(pool),
            Command::SetNodeLabels {
                node_id, labels, ..
            } => self.set_node_labels(node_id, labels),
            Command::SetTransportPolicy { target, policy, .. } => {
                self.set_transport_policy(target, policy)
            }
            Command::Rollout {
                op,
                last,
                at_unix_ms,
                ..
            } => self.apply_rollout(op, last, at_unix_ms),
            cmd @ (Command::RegisterAgent { .. }
            | Command::SetAgentStatus { .. }
            | Command::RemoveAgent { .. }
            | Command::DemoteServer { .. }) => self.apply_agent(cmd),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::JoinTokenRecord;
    use crate::meta::{MAX_META_KEY_LEN, MAX_META_VALUE_LEN};
    use crate::{Capacity, MAX_DEDUP_ENTRIES, MAX_META_KEYS, VmReport, VmSpec, VmState};
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
        let log: Vec<_> = s.audit_log().collect();
        assert_eq!(log.len(), 4);
        assert_eq!(log[1].by, peer(1));
        assert_eq!(log[1].action.key(), Some(peer(2)));
        assert_eq!(log[1].action.name(), "grant");
        assert_eq!(log[3].seq, 4);
        assert_eq!(log[3].action.name(), "revoke");
        assert_eq!(log[0].at_unix_ms, 1_700_000_000_000);
        // A retried change is answered from the dedup table, not logged again.
        assert_eq!(
            s.apply(access(true, 2, Role::Operator, 1, "b")),
            Response::Done
        );
        assert_eq!(s.audit_log().count(), 4);
    }

    const T0: u64 = 1_700_000_000_000;
    const HOUR: u64 = 3_600_000;

    fn token(id: &str, by: u8, uses: Option<u32>) -> Command {
        Command::CreateJoinToken {
            request_id: format!("t-{id}-{by}-{uses:?}"),
            token: JoinTokenRecord {
                id: id.into(),
                hash: [7; 32],
                created_by: peer(by),
                created_at_unix_ms: T0,
                expires_at_unix_ms: T0 + HOUR,
                uses_left: uses,
                used: 0,
            },
        }
    }

    fn admit(n: u8, id: &str, hash: u8, at: u64) -> Command {
        Command::AdmitNode {
            request_id: format!("admit-{n}-{id}-{hash}-{at}"),
            peer: peer(n),
            token_id: id.into(),
            token_hash: [hash; 32],
            at_unix_ms: at,
        }
    }

    /// Tokens: only admins create them; a token admits until it expires or
    /// is used up, never with another secret, never after a revoke; each
    /// step is in the audit log.
    #[test]
    fn join_tokens_expire_are_used_up_and_are_audited() {
        let mut s = ClusterState::default();
        s.apply(access(true, 1, Role::Admin, 1, "boot"));
        s.apply(access(true, 2, Role::Operator, 1, "op"));
        assert_eq!(
            s.apply(token("0000000a", 2, None)),
            Response::Rejected(Rejection::NotAdmin { by: peer(2) }),
            "an operator may not create tokens"
        );
        assert_eq!(s.apply(token("0000000a", 1, Some(2))), Response::Done);
        assert!(matches!(
            s.apply(token("NOT-HEX!", 1, None)),
            Response::Rejected(Rejection::InvalidToken { .. })
        ));
        // A wrong secret admits nobody and spends nothing.
        assert_eq!(
            s.apply(admit(5, "0000000a", 8, T0 + 1)),
            Response::Rejected(Rejection::UnknownToken {
                id: "0000000a".into()
            })
        );
        let first = s.apply(admit(5, "0000000a", 7, T0 + 1));
        assert!(matches!(first, Response::NodeId(_)), "{first:?}");
        // A retried admission answers the same id and spends no use.
        assert_eq!(s.apply(admit(5, "0000000a", 7, T0 + 1)), first);
        assert_eq!(s.join_tokens()["0000000a"].uses_left, Some(1));
        assert!(matches!(
            s.apply(admit(6, "0000000a", 7, T0 + 2)),
            Response::NodeId(_)
        ));
        // Used up: refused as such; it stays listed until it expires.
        assert_eq!(
            s.apply(admit(7, "0000000a", 7, T0 + 3)),
            Response::Rejected(Rejection::TokenUsedUp {
                id: "0000000a".into()
            })
        );
        assert_eq!(s.join_tokens()["0000000a"].used, 2);
        // Expiry is by the proposer's clock, a value in the command.
        s.apply(token("0000000b", 1, None));
        assert_eq!(
            s.apply(admit(8, "0000000b", 7, T0 + HOUR)),
            Response::Rejected(Rejection::TokenExpired {
                id: "0000000b".into()
            })
        );
        // Revoked: gone.
        s.apply(token("0000000c", 1, None));
        assert_eq!(
            s.apply(Command::RevokeJoinToken {
                request_id: "rv".into(),
                id: "0000000c".into(),
                by: peer(1),
                at_unix_ms: T0 + 5,
            }),
            Response::Done
        );
        assert!(matches!(
            s.apply(admit(9, "0000000c", 7, T0 + 6)),
            Response::Rejected(Rejection::UnknownToken { .. })
        ));
        let actions: Vec<&str> = s.audit_log().map(|e| e.action.name()).collect();
        assert_eq!(
            actions,
            [
                "grant",
                "grant",
                "token-create",
                "admit",
                "admit",
                "token-create",
                "token-create",
                "token-revoke"
            ]
        );
    }

    /// A token's lifetime and uses are bounded, and so is the table.
    #[test]
    fn join_token_bounds_are_enforced() {
        let mut s = ClusterState::default();
        s.apply(access(true, 1, Role::Admin, 1, "boot"));
        let mut long = token("000000aa", 1, None);
        if let Command::CreateJoinToken { token, .. } = &mut long {
            token.expires_at_unix_ms = T0 + crate::admission::MAX_TOKEN_TTL_MS + 1;
        }
        assert!(matches!(
            s.apply(long),
            Response::Rejected(Rejection::InvalidToken { .. })
        ));
        assert!(matches!(
            s.apply(token("000000ab", 1, Some(0))),
            Response::Rejected(Rejection::InvalidToken { .. })
        ));
        for i in 0..crate::admission::MAX_JOIN_TOKENS {
            assert_eq!(s.apply(token(&format!("{i:08x}"), 1, None)), Response::Done);
        }
        assert_eq!(
            s.apply(token("ffffffff", 1, None)),
            Response::Rejected(Rejection::TokensFull)
        );
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

    fn membership(nodes: &[(NodeId, u8)]) -> BTreeMap<NodeId, Member> {
        nodes.iter().map(|(id, n)| (*id, member(*n))).collect()
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

    /// Agent commands for the marks' property: registrations of peers
    /// that may or may not hold the id, status changes, removals.
    fn arb_agent_command() -> impl proptest::strategy::Strategy<Value = Command> {
        use proptest::prelude::*;
        let req = "[e-h]{1,2}";
        prop_oneof![
            (req, 0u8..4, 3u64..7, 1u32..4).prop_map(|(r, p, node_id, vcpus)| {
                Command::RegisterAgent {
                    request_id: r,
                    node_id,
                    addr: PeerAddr::new(peer(p)),
                    capacity: Capacity {
                        vcpus,
                        memory_mib: 4096,
                    },
                    at_unix_ms: 1,
                }
            }),
            (req, 3u64..7, any::<bool>()).prop_map(|(r, node_id, down)| {
                Command::SetAgentStatus {
                    request_id: r,
                    node_id,
                    status: if down {
                        crate::AgentStatus::Down
                    } else {
                        crate::AgentStatus::Ready
                    },
                    at_unix_ms: 2,
                }
            }),
            (req, 3u64..7).prop_map(|(r, node_id)| Command::RemoveAgent {
                request_id: r,
                node_id,
            }),
        ]
    }

    /// What an agent's assignment stream sends for `node`, as the state
    /// holds it (the servers' list is the members).
    fn assignment_of(s: &ClusterState, node: NodeId) -> String {
        format!(
            "{:?} {:?} {:?} {:?} {:?}",
            s.assignment(node),
            s.agent(node).map(|a| a.status),
            s.desired_policy(node)
                .map(|(p, source)| (p.clone(), source.to_string())),
            s.access,
            s.members,
        )
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

        /// Whatever is applied, a node whose assignment changed has a new
        /// mark: a server that compares marks never misses a change it
        /// must stream (marks may change when nothing did, never the
        /// reverse).
        #[test]
        fn a_changed_assignment_always_has_a_new_mark(
            cmds in proptest::collection::vec(
                proptest::prop_oneof![arb_command(), arb_agent_command()],
                0..60,
            )
        ) {
            let mut s = ClusterState::default();
            s.apply_membership(&membership(&[(1, 1), (2, 2)]));
            for (index, cmd) in (1u64..).zip(cmds) {
                let before: Vec<(String, u64)> = (1..7)
                    .map(|n| (assignment_of(&s, n), s.assignment_mark(n)))
                    .collect();
                let what = cmd.to_string();
                s.apply_at(index, cmd);
                for (n, (was, mark)) in (1..7).zip(before) {
                    if assignment_of(&s, n) != was {
                        proptest::prop_assert_ne!(
                            s.assignment_mark(n), mark,
                            "{} changed node {}'s assignment without a new mark", what, n
                        );
                    }
                }
            }
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
                // The indexes kept in step equal the ones rebuilt from the
                // records.
                proptest::prop_assert_eq!(&state.index, &VmIndex::of(state.vms().values()));
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
        state.apply_membership(&nodes);
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

    /// Every change of a VM record is one event at the log index that made
    /// it, in order; a retried write or a refusal makes none.
    #[test]
    fn every_vm_change_is_an_event_at_its_log_index() {
        let mut state = cluster(&[cap(4, 4096)]);
        let cmd = |req: &str, vm: &str, s: VmState| Command::SetVmDesired {
            request_id: req.into(),
            vm_id: vm.into(),
            desired: s,
        };
        let created = state.apply_at(
            10,
            Command::CreateVm {
                request_id: "c".into(),
                spec: spec("web", 1, 64),
            },
        );
        let id = match created {
            Response::Vm(vm) => vm.id,
            other => panic!("{other:?}"),
        };
        // A retry (same request id) and a refusal change nothing.
        state.apply_at(
            11,
            Command::CreateVm {
                request_id: "c".into(),
                spec: spec("web", 1, 64),
            },
        );
        state.apply_at(12, cmd("bad", "vm-99", VmState::Stopped));
        state.apply_at(
            13,
            Command::PutMeta {
                request_id: "m".into(),
                key: "k".into(),
                value: "v".into(),
            },
        );
        state.apply_at(14, cmd("s", &id, VmState::Stopped));
        state.apply_at(15, cmd("d", &id, VmState::Deleted));
        state.apply_at(
            16,
            Command::ReportVm {
                request_id: "r".into(),
                report: VmReport {
                    vm_id: id.clone(),
                    node_id: 1,
                    observed: VmState::Deleted,
                    reason: String::new(),
                    log_path: String::new(),
                },
            },
        );
        let h = state.vm_history();
        assert_eq!(h.revision(), 16);
        let seen: Vec<(u64, VmState, bool)> = h
            .events()
            .map(|e| (e.revision, e.vm.desired, e.deleted))
            .collect();
        assert_eq!(
            seen,
            [
                (10, VmState::Running, false),
                (14, VmState::Stopped, false),
                (15, VmState::Deleted, false),
                (16, VmState::Deleted, true),
            ]
        );
        let batch = h.after(14, 10, usize::MAX).unwrap();
        assert_eq!(batch.events.len(), 2);
        assert_eq!(batch.events[1].vm.observed, VmState::Deleted);
        // A state read from a format without history is whole after its
        // last index only.
        state.start_vm_history_at(16);
        assert!(state.vm_history().after(15, 1, usize::MAX).is_err());
        assert!(
            state
                .vm_history()
                .after(16, 1, usize::MAX)
                .unwrap()
                .events
                .is_empty()
        );
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
