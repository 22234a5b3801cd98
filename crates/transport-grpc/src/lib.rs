//! The same Tern services over tonic gRPC (HTTP/2 over TCP), with the
//! standard health and reflection services.
//!
//! A node serves its [`tern_protocol::Handler`] (usually a
//! [`tern_protocol::Dispatcher`]) through typed tonic services generated
//! from the protocol crate's `.proto` schemas, and calls other nodes through
//! [`GrpcClient`], an [`tern_protocol::RpcClient`]. Services never learn that
//! gRPC carried a call: they see the same [`tern_protocol::RequestContext`]
//! as over iroh, with the caller's authenticated id.
//!
//! Stock gRPC tools work against a node: `grpc.health.v1.Health` reports the
//! node, each transport and each service (see [`HealthHandle`]), and server
//! reflection answers in both `grpc.reflection.v1` and `v1alpha`.
//!
//! # Identity
//!
//! gRPC has no key-based identity, so every Tern call carries a MAC over a
//! timestamp, a nonce, both nodes' ids and the method's path, under a key
//! only the caller and the callee can compute (X25519 of their Ed25519 node
//! keys), and every answer carries the callee's MAC over the nonce (see
//! [`auth`]). A node cannot claim another's id, a captured request cannot
//! be replayed to another node, method or (within the skew window) to the
//! same one, and a different node at a peer's old address is refused as
//! `WrongPeer`. Calls are not encrypted, and message bodies are not covered
//! by the MACs: deploy the gRPC transport on a private network (or behind
//! TLS) as before the migration; iroh, which encrypts, is where the fleet
//! is going.
//!
//! # Layout
//!
//! - [`server`]: [`GrpcServer`], the typed services that dispatch into the
//!   handler, the authentication middleware, health and reflection, and
//!   graceful shutdown.
//! - [`client`]: [`GrpcClient`], pooled channels per peer with a separate
//!   bulk lane, deadlines, identity checks and error mapping.
//! - [`auth`]: the authenticated request and response metadata, tested
//!   without sockets.
//! - [`metrics`]: recording under the names shared with the iroh transport
//!   ([`tern_protocol::metric_names`]), labelled `transport="grpc"`.
//! - `codec`: a pass-through codec for already-encoded messages.
//! - `io`: counted TCP connections, and the switch that aborts them when a
//!   drain deadline passes.
//! - [`services`]: the tonic code generated at build time (servers and
//!   typed clients), using `tern_protocol::pb`'s message types.
//! - [`GrpcTransport`]: a server and a client with one identity, shut down
//!   together.
//!
//! # Invariants
//!
//! - The caller a service sees is the one whose proof verified, never a
//!   value a request merely declared; a request with a bad proof reaches no
//!   service.
//! - An answer counts only if the peer the caller meant proved it; anything
//!   else is a transport error (`WrongPeer`, `TimedOut`...).
//! - Nothing a peer sends can panic this crate: malformed metadata,
//!   messages and statuses are typed errors.
//! - Every limit is a named constant saying why (message size, clock skew,
//!   replay window, streams per connection, keep-alive, backoff).
//!
//! # Deliberately absent
//!
//! - **TLS.** The transport being migrated from ran on private networks;
//!   identity is proven by the MACs above, but bodies are neither encrypted
//!   nor integrity-protected against an on-path attacker. iroh, the target
//!   of the migration, encrypts.
//! - **Client retries.** A failed call is reported, classified, and never
//!   retried here: whether a retry is safe is the router's decision
//!   ([`tern_protocol::CallError::is_safe_to_retry`]).
//! - **Streaming RPCs.** Every method of the schemas is unary; bulk data
//!   moves as chunks on the bulk lane.

use std::sync::Arc;
use std::time::Duration;

pub mod auth;
pub mod client;
mod codec;
mod io;
pub mod metrics;
pub mod server;

/// tonic servers and clients generated from `proto/tern/v1/*.proto`.
///
/// Their messages are `tern_protocol::pb`'s (one set of types for both
/// transports).
#[allow(missing_docs)] // reason: generated code; the schemas carry the docs.
#[allow(clippy::all)] // reason: generated code.
#[allow(unreachable_pub)] // reason: generated code.
pub mod services {
    include!(concat!(env!("OUT_DIR"), "/tern.v1.rs"));
}

pub use client::{ClientConfig, GrpcClient};
pub use server::{GrpcServer, HealthHandle, ServerConfig};
pub use tonic_health::ServingStatus;

use tern_protocol::{Handler, PeerAddr, PeerId};

/// A node's gRPC transport: its server and its client, one identity.
#[derive(Debug)]
pub struct GrpcTransport {
    server: GrpcServer,
    client: Arc<GrpcClient>,
}

impl GrpcTransport {
    /// Binds `config.listen` and serves `handler`, with a client that calls
    /// as the same node.
    pub async fn bind(
        config: ServerConfig,
        handler: Arc<dyn Handler>,
    ) -> std::io::Result<GrpcTransport> {
        let client = Arc::new(GrpcClient::new(ClientConfig {
            secret_key: config.secret_key,
            max_message_size: config.max_message_size,
        }));
        let server = GrpcServer::start(config, handler).await?;
        Ok(GrpcTransport { server, client })
    }

    /// The node's id.
    pub fn id(&self) -> PeerId {
        self.server.id()
    }

    /// The server.
    pub fn server(&self) -> &GrpcServer {
        &self.server
    }

    /// The client, shared by all callers of the node.
    pub fn client(&self) -> Arc<GrpcClient> {
        self.client.clone()
    }

    /// The socket address the server listens on.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.server.local_addr()
    }

    /// This node's address with its gRPC URL filled in.
    pub fn peer_addr(&self) -> PeerAddr {
        PeerAddr {
            grpc: Some(self.server.url()),
            ..PeerAddr::new(self.id())
        }
    }

    /// Graceful shutdown of both halves: later calls by the client fail as
    /// `LocalShutdown`; the server drains as [`GrpcServer::shutdown`] says.
    pub async fn shutdown(self, drain: Duration) {
        self.client.close();
        self.server.shutdown(drain).await;
    }
}
