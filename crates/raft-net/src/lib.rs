//! openraft's network adapter: its network traits over Tern's
//! transport-neutral client, the one Raft codec, per-peer lanes, and the
//! `Raft` service that answers them. How a node is composed around Raft
//! (start, join, leave, the Cluster service) is `tern-cluster`'s.
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
//! - [`append_stream`]: pipelined replication, openraft's `stream_append`
//!   over one `Raft/AppendStream` stream per follower: the leader's
//!   bounded pipeline ([`append_stream::MAX_APPEND_IN_FLIGHT`]) and the
//!   follower's checked, in-order serving.
//! - [`gate`]: per-peer bounded lanes, so a slow peer never stalls others.
//! - [`metrics`]: Raft metrics under the shared names (heartbeat round
//!   trips, term, leadership, elections, replication lag).
//! - [`service`]: [`RaftService`], the Raft handler with its access rules
//!   (members only, each message naming its sender, what Propose may
//!   carry), and the [`Attached`] node it serves.
//! - [`write`](mod@write): [`write::client_write`], the one checked write entry
//!   point, and the statuses its refusals map to.

pub mod append_stream;
pub mod codec;
pub mod gate;
pub mod metrics;
pub mod network;
pub mod service;
pub mod wire;
pub mod write;

pub use codec::{CodecError, MAX_MESSAGE_LEN, decode, encode, encode_into};
pub use network::{AddressBook, NetworkFactory, PeerNetwork, SNAPSHOT_CHUNK_SIZE};
pub use service::{
    Attached, ProposeRefused, RaftInstance, RaftService, check_proposal, command_name,
};
