//! openraft's network traits over Tern's transport-neutral client, and the
//! one Raft codec.
//!
//! # Layout
//!
//! - [`codec`]: the only place openraft types are encoded for the wire
//!   (postcard), with size limits and typed errors.
//! - [`codec::append`]: typed AppendEntries encode/decode with a
//!   hand-written heartbeat path that produces postcard's exact bytes.
//!
//! The network factory (`RaftNetworkFactory` / `RaftNetworkV2` over
//! `tern_protocol::RpcClient`) comes with the transports; until then this
//! crate holds only the codec.

pub mod codec;

pub use codec::{CodecError, MAX_MESSAGE_LEN, decode, encode, encode_into};
