//! The dual router: one [`tern_protocol::RpcClient`] over both transports,
//! driven by the operators' `[transport]` configuration.
//!
//! This is the heart of the migration: per service, a node prefers iroh or
//! gRPC; a call that fails at the transport level on iroh falls back to gRPC
//! when that cannot apply a mutation twice; Raft traffic can follow measured
//! latency and errors per peer; and the policy changes on a running node
//! without failing a call.
//!
//! # Layout
//!
//! - [`policy`]: the `[transport]` section as written, its validation with
//!   key-naming errors, and the validated [`Policy`].
//! - [`adaptive`]: the per-peer adaptive Raft chooser (pure, time passed in).
//! - [`breaker`]: the per-peer circuit breaker that stops paying for a
//!   broken iroh path on every call (pure, time passed in).
//! - [`router`]: [`DualRouter`], which applies all of the above to real
//!   clients.
//!
//! The router knows the transports only through the `RpcClient` trait; it
//! names neither iroh nor tonic.

pub mod adaptive;
pub mod breaker;
pub mod policy;
pub mod router;

pub use policy::{Mode, Policy, PolicyError, RaftTransport, TransportConfig};
pub use router::{DualRouter, Route};

/// The router's clock: tokio's, so tests can pause and advance it; as a std
/// `Instant` for the pure state machines.
pub(crate) fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}
