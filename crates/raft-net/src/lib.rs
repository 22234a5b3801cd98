//! openraft's network traits over Tern's transport-neutral client, the one
//! Raft codec, and the Raft and Cluster services.
//!
//! Everything here runs over any [`tern_protocol::RpcClient`] (the iroh
//! transport, the gRPC transport or the dual router) and serves through
//! any transport as [`tern_protocol::Handler`]s; this crate names neither
//! iroh nor tonic.
//!
//! # Layout
//!
//! - [`codec`]: the only place openraft types are encoded for the wire
//!   (postcard), with size limits and typed errors; [`codec::append`]
//!   adds the AppendEntries fast path for heartbeats.
//! - [`wire`]: how codec bytes ride in the `Raft` service's protobuf
//!   envelopes, and the control and snapshot-ack messages.
//! - [`network`]: [`NetworkFactory`] and [`PeerNetwork`], openraft's
//!   `RaftNetworkFactory` / `RaftNetworkV2`: lanes, deadlines, error
//!   mapping, chunked snapshots, partial success for oversized batches.
//! - [`gate`]: per-peer bounded lanes, so a slow peer never stalls others.
//! - [`metrics`]: Raft metrics under the shared names (heartbeat round
//!   trips, term, leadership, elections, replication lag).
//! - [`service`]: [`RaftServices`], the Raft and Cluster handlers with
//!   their access rules (members only, each message naming its sender,
//!   what Propose may carry; join token), join, leave, members.
//! - [`access`]: the access table's Cluster calls (grant, revoke, list
//!   with the audit log), served by the leader.
//! - [`meta`]: the metadata register's `Cluster/MetaPut` and linearizable
//!   `Cluster/MetaGet`, and typed client calls ([`meta_put`], [`meta_get`]).
//! - [`node`]: [`RaftNode`], the composition a node binary uses (start,
//!   initialise, join, the checked write entry point, the fatal-failure
//!   signal, shutdown with leadership handoff), and the openraft settings
//!   as named constants.

pub mod access;
pub mod codec;
pub mod gate;
pub mod meta;
pub mod metrics;
pub mod network;
pub mod node;
pub mod service;
pub mod wire;

pub use codec::{CodecError, MAX_MESSAGE_LEN, decode, encode, encode_into};
pub use meta::{MetaError, MetaPut, MetaRead, meta_get, meta_put};
pub use network::{AddressBook, NetworkFactory, PeerNetwork, SNAPSHOT_CHUNK_SIZE};
pub use node::{
    FIRST_NODE_ID, JoinAnswer, RaftNode, RaftNodeError, RaftOptions, WriteError, limit_status,
    propose, read_node_id, request_join, request_leave, write_node_id,
};
pub use service::{
    JoinToken, ProposeRefused, RaftInstance, RaftServices, check_proposal, command_name,
};
