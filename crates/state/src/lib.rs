//! The replicated cluster state: what every node agrees on through Raft.
//!
//! This crate is the domain model and nothing else: no storage, no Raft
//! library, no transport, no clock and no I/O. `tern-store` persists it,
//! `tern-cluster` replicates it, and the services read and propose it.
//! [`ClusterState::apply_at`] is a pure function of the state and a
//! command, so every node that applies the same log reaches the same state.
//!
//! # Layout
//!
//! - [`state`]: [`ClusterState`] itself, the one `apply` that dispatches a
//!   command to its module, deduplication by request id, and the reader of
//!   older snapshot layouts.
//! - [`command`]: the [`Command`]s that change the state, the
//!   [`Response`]s they return and the [`Rejection`]s that refuse them.
//! - [`vm`]: VM specs and records, reconcilers' reports, placement on the
//!   members' capacity, and the VM lifecycle commands.
//! - [`agent`]: agents, the nodes that run VMs without being Raft
//!   members: their records, ready or down, and moving the VMs of one
//!   that went down.
//! - [`member`]: [`NodeId`] allocation, the [`Member`] record a membership
//!   holds, [`Capacity`], and applying a new membership.
//! - [`meta`]: the metadata register.
//! - [`network`]: the guest network's address pool and the address and
//!   MAC leased to each VM.
//! - [`access`]: roles granted to keys and the audit log of every access,
//!   token and membership change.
//! - [`admission`]: join tokens (hashed, expiring, counted) and the audit
//!   records of membership changes.
//! - [`events`]: the bounded history of VM changes with their revisions
//!   (log indexes), which `Vm/Watch` serves.
//! - [`policy`]: node labels, group selectors, and the desired transport
//!   policies per node, group and all, with their precedence.
//! - [`rollout`]: the transport rollout: its plan and gates, the stage in
//!   force and the nodes it covers (a policy layer between node and
//!   group), the pure gate evaluation, and the history of decisions.
//! - [`marks`]: which nodes' assignments an apply may have changed, so a
//!   server wakes only the assignment streams of the agents concerned.
//! - [`dedup`]: the table of recent request ids and their answers.
//! - [`limits`]: the size limits every write is checked against before it
//!   is proposed ([`limits::check_command`]), as named constants.

pub mod access;
pub mod admission;
pub mod agent;
pub mod command;
pub mod dedup;
pub mod events;
pub mod limits;
pub mod marks;
pub mod member;
pub mod meta;
pub mod network;
pub mod policy;
pub mod rollout;
pub mod state;
pub mod vm;

pub use access::{AuditAction, AuditEvent, MAX_ACCESS_KEYS, MAX_AUDIT_LOG};
pub use admission::{JoinTokenRecord, MembershipChange};
pub use agent::{AgentRecord, AgentStatus, AgentView, AssignedVm};
pub use command::{Command, Rejection, RequestId, Response};
pub use dedup::MAX_DEDUP_ENTRIES;
pub use events::{EventBatch, HistoryGap, MAX_VM_EVENT_BYTES, MAX_VM_EVENTS, VmEvent, VmHistory};
pub use limits::MAX_REQUEST_ID_LEN;
pub use member::{Capacity, FIRST_NODE_ID, Member, NodeId};
pub use meta::{
    MAX_META_KEY_LEN, MAX_META_KEYS, MAX_META_VALUE_LEN, MetaEntry, check_meta, check_meta_key,
};
pub use network::{Ipv4Net, Lease, NetworkState};
pub use policy::{
    DesiredPolicies, LabelError, Labels, MAX_LABEL_LEN, MAX_LABELS, PolicySource, PolicyTarget,
    Selector, check_labels, check_policy,
};
pub use rollout::{
    Decision, DecisionKind, GateCheck, GateFigures, Gates, Plan, PlanError, Rollout, RolloutOp,
    RolloutStatus, Stage, Verdict,
};
pub use state::ClusterState;
pub use vm::{VmRecord, VmReport, VmSpec, VmState};
