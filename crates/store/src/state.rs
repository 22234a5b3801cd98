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
//! [`ClusterState::apply_new`] and, if it answers with something new, a
//! variant to [`Response`]. Commands that carry a client request id are
//! deduplicated here, once for all of them: a second write with the same
//! request id is answered with the first write's response and changes
//! nothing, so clients and the transport router may retry writes freely.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tern_protocol::PeerId;

use crate::types::{Member, Membership, NodeId};

/// Longest client request id accepted, in bytes. Ids are UUIDs or similar;
/// the bound keeps the deduplication table's memory predictable.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// How many recent request ids the deduplication table remembers. A client
/// retry arrives within seconds; this many writes take far longer than that
/// at any write rate the cluster state sees, and at most a few MiB of
/// memory.
pub const MAX_DEDUP_ENTRIES: usize = 16_384;

/// The first node id handed out. 0 is never a node id, so that an unset
/// protobuf field (0) never names a node.
pub const FIRST_NODE_ID: NodeId = 1;

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
}

impl Command {
    /// The client request id that makes this command idempotent, if it
    /// carries one.
    pub fn request_id(&self) -> Option<&str> {
        match self {
            Command::AllocateNodeId { request_id, .. }
            | Command::PutVm { request_id, .. }
            | Command::DeleteVm { request_id, .. } => Some(request_id),
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
}

impl Default for ClusterState {
    fn default() -> Self {
        ClusterState {
            members: BTreeMap::new(),
            node_ids: BTreeMap::new(),
            next_node_id: FIRST_NODE_ID,
            vms: BTreeMap::new(),
            dedup: DedupTable::default(),
        }
    }
}

impl ClusterState {
    /// Applies one command, deduplicating by its request id.
    pub fn apply(&mut self, cmd: Command) -> Response {
        let Some(request_id) = cmd.request_id() else {
            return self.apply_new(cmd);
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
        let response = self.apply_new(cmd);
        self.dedup.remember(request_id, response.clone());
        response
    }

    /// Applies a command not seen before. One arm per command.
    fn apply_new(&mut self, cmd: Command) -> Response {
        match cmd {
            Command::AllocateNodeId { peer, .. } => self.allocate_node_id(peer),
            Command::PutVm { vm, .. } => self.put_vm(vm),
            Command::DeleteVm { vm_id, .. } => match self.vms.remove(&vm_id) {
                Some(vm) => Response::Vm(Box::new(vm)),
                None => Response::Rejected(Rejection::UnknownVm { vm_id }),
            },
        }
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

    fn member(n: u8) -> Member {
        let mut addr = PeerAddr::new(peer(n));
        addr.grpc = Some(format!("http://127.0.0.1:{}", 7000 + u16::from(n)));
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
        ]
    }

    proptest::proptest! {
        /// Two nodes applying the same commands agree on every response
        /// and on the state, and the state survives its snapshot encoding.
        #[test]
        fn apply_is_deterministic_and_survives_encoding(
            cmds in proptest::collection::vec(arb_command(), 0..40)
        ) {
            let (mut a, mut b) = (ClusterState::default(), ClusterState::default());
            for cmd in cmds {
                proptest::prop_assert_eq!(a.apply(cmd.clone()), b.apply(cmd));
            }
            proptest::prop_assert_eq!(&a, &b);
            let bytes = postcard::to_stdvec(&a).unwrap();
            let back: ClusterState = postcard::from_bytes(&bytes).unwrap();
            proptest::prop_assert_eq!(back, a);
        }
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
