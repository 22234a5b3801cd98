//! The replicated cluster state: what every node agrees on through Raft.
//!
//! This crate is the domain model and nothing else: no storage, no Raft
//! library, no transport, no clock and no I/O. `tern-store` persists it,
//! `tern-cluster` replicates it, and the services read and propose it.
//!
//! # Layout
//!
//! - [`state`]: [`ClusterState`] (members, node-id allocation, VM records
//!   with their placement, desired and observed states and migration steps,
//!   the metadata register, the access table and its audit log, the
//!   request-id deduplication table), the [`Command`]s that change it and
//!   the [`Response`]s they return; a pure `apply`.
//! - [`member`]: [`NodeId`], the [`Member`] record a membership holds, and
//!   [`Capacity`].
//! - [`limits`]: the size limits every write is checked against before it
//!   is proposed ([`limits::check_command`]), as named constants.

pub mod limits;
pub mod member;
pub mod state;

pub use member::{Capacity, Member, NodeId};
pub use state::{
    AccessEvent, ClusterState, Command, MetaEntry, Rejection, RequestId, Response, VmRecord,
    VmReport, VmSpec, VmState,
};
