//! One-concept examples of Tern's crates, each a small program you can run
//! and read top to bottom:
//!
//! | example | concept | crates it shows |
//! |---|---|---|
//! | `echo_iroh` | serve a [`Handler`] over iroh and call it | protocol, transport-iroh |
//! | `echo_grpc` | the same handler over gRPC (TLS with node keys) | protocol, transport-grpc |
//! | `router_fallback` | the dual router prefers iroh and falls back to gRPC when iroh fails before delivery | transport-dual, both transports |
//! | `single_node_raft` | a whole node (Raft on sled, both transports) as a one-node cluster: a write and a linearizable read | node, the wire types |
//!
//! Run one with `cargo run -p tern-examples --example echo_iroh`. Each is
//! also a test of itself (`test = true` in `Cargo.toml`), so
//! `cargo xtask test` builds and runs them all and they cannot rot.
//!
//! # Layout
//!
//! The examples are the files beside this one (`echo_iroh.rs`,
//! `echo_grpc.rs`, `router_fallback.rs`, `single_node_raft.rs`); this
//! library holds only [`Echo`], the handler the transport examples serve.

use bytes::Bytes;
use tern_protocol::rpc::{BoxFuture, Handler, RequestContext};
use tern_protocol::{Method, Status};

/// A handler that answers every call with `"<transport> <caller>: "`
/// followed by the request's bytes, so a caller sees which transport
/// carried its call and who the server thinks it is. Transports treat
/// payloads as opaque bytes; a real service decodes its `.proto` message.
#[derive(Debug, Default, Clone, Copy)]
pub struct Echo;

impl Handler for Echo {
    fn handle(
        &self,
        ctx: RequestContext,
        _method: &'static Method,
        payload: Bytes,
    ) -> BoxFuture<'static, Result<Bytes, Status>> {
        // The caller's id comes from the handshake, never from the message.
        let mut answer = format!("{} {}: ", ctx.transport, ctx.peer.short()).into_bytes();
        answer.extend_from_slice(&payload);
        Box::pin(std::future::ready(Ok(Bytes::from(answer))))
    }
}
