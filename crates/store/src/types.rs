//! The Raft type configuration of the whole project: openraft's generic
//! types bound to the replicated model of `tern-state`.
//!
//! Every crate that names an openraft type for Tern names it through
//! [`TypeConfig`] and the aliases here, so that bumping openraft touches the
//! three crates allowed to see it (`store`, `raft-net`, `node`).

use tern_state::{Command, Member, NodeId, Response};

openraft::declare_raft_types!(
    /// Tern's Raft type configuration: `u64` node ids, [`Member`] nodes,
    /// [`Command`] writes and [`Response`] replies, on the tokio runtime.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = NodeId,
        Node = Member,
);

/// A log entry.
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
/// A log id: the leader that proposed an entry and its index.
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
/// A vote (term, candidate, committed).
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
/// Snapshot metadata: last included log id and membership.
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
/// The membership as last applied, with the log id that introduced it.
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
/// A membership configuration: voter sets and the nodes' records.
pub type Membership = openraft::Membership<NodeId, Member>;
/// openraft's storage error for this configuration.
pub type StorageError = openraft::StorageError<TypeConfig>;
