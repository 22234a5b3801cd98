//! Tern's wire format, message schemas and transport-neutral contracts.
//!
//! This crate is the shared vocabulary of every other Tern crate. It does no
//! I/O: it turns bytes into frames and back, names the services and methods a
//! node serves, and states the contracts that transports and services meet.
//!
//! # Layout
//!
//! - [`frame`]: the 24-byte frame header and the decoder that splits a byte
//!   stream into frames, with typed errors and a length limit checked before
//!   any allocation.
//! - [`catalog`]: service and method ids, names, default priorities and
//!   whether a method may be retried without being applied twice.
//! - [`access`]: roles and the one access table (`access::rule`), deny by
//!   default.
//! - [`peer`]: peer identity (an Ed25519 public key) and peer addresses that
//!   can hold an iroh address and a gRPC URL.
//! - [`rpc`]: the client and handler traits both transports implement, the
//!   error taxonomy, and [`rpc::Dispatcher`] which routes calls to services.
//! - [`routes`]: the route table each service's handler picks its
//!   methods with, keyed by the catalogue's constants, refusing a method of
//!   another service or one routed twice.
//! - [`forward`]: the one way a follower passes a write to the Raft leader
//!   ([`forward::forward_to_leader`], one timeout), over any `RpcClient`.
//! - [`stream`]: streaming calls: what a caller opens and gets, the stream
//!   limits both transports apply, and the per-stream frame rules.
//! - [`policy`]: the transport policy (`[transport]` as written, its one
//!   validation with errors naming the key, the validated `Policy`).
//! - [`exposition`]: the Prometheus text exposition parsed ([`exposition::Metrics`]:
//!   sums by label subsets, histogram quantiles, differences between
//!   scrapes), for the rollout's gates and every harness.
//! - [`metric_names`]: the name, kind and help of every exported metric,
//!   shared so both transports report under the same names.
//! - [`status`]: application status codes carried in error frames and gRPC
//!   statuses alike.
//! - [`pb`]: prost types generated from `proto/tern/v1/*.proto`, the only
//!   request and response types the transports use.

pub mod access;
pub mod catalog;
pub mod exposition;
pub mod forward;
pub mod frame;
pub mod metric_names;
pub mod peer;
pub mod policy;
pub mod routes;
pub mod rpc;
pub mod status;
pub mod stream;

/// Message types generated from the `.proto` schemas in `proto/tern/v1`.
///
/// Both transports use these types unchanged: iroh frames carry their
/// protobuf encoding as payload, tonic services take and return them.
#[allow(missing_docs)] // reason: generated code; the schemas carry the docs.
#[allow(clippy::all)] // reason: generated code.
#[allow(unreachable_pub)] // reason: generated code.
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/tern.v1.rs"));

    /// Encoded `FileDescriptorSet` of every schema, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/tern_descriptor.bin"));
}

pub use catalog::{Method, MethodKind, ServiceId};
pub use frame::{Frame, FrameError, FrameKind, Header, Priority};
pub use peer::{PeerAddr, PeerId, TransportKind, TransportSet};
pub use routes::{RouteError, Routes};
pub use rpc::{
    BoxFuture, Call, CallError, Delivery, Dispatcher, Handler, RequestContext, RpcClient,
    TransportError, TransportErrorKind,
};
pub use status::{Code, Status};
pub use stream::{CallStream, StreamCall, StreamReceiver, StreamSender};
