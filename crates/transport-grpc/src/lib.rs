//! The same Tern services over tonic gRPC (HTTP/2 over TCP), with the
//! standard health and reflection services.
//!
//! A node serves its [`tern_protocol::Handler`] (usually a
//! [`tern_protocol::Dispatcher`]) under the gRPC names of the protocol
//! crate's `.proto` schemas (each message passed through as its encoded
//! bytes, so the handler decodes once, as over iroh), and calls other nodes through
//! [`GrpcClient`], an [`tern_protocol::RpcClient`]. Services never learn that
//! gRPC carried a call: they see the same [`tern_protocol::RequestContext`]
//! as over iroh, with the caller's authenticated id.
//!
//! Stock gRPC tools work against a node: `grpc.health.v1.Health` reports the
//! node, each transport and each service (see [`HealthHandle`]), and server
//! reflection answers in both `grpc.reflection.v1` and `v1alpha`.
//!
//! # Identity and privacy
//!
//! Every connection is TLS 1.3, and both ends prove their Ed25519 node key
//! in the handshake (the key iroh uses, so a node is one identity on both
//! transports; see [`tls`]). A client accepts exactly the node it dials; a
//! server derives the caller's id from its certificate, and a handler sees
//! only that id. What this gives, per attacker:
//!
//! - **An eavesdropper** reads nothing: bodies, metadata, join tokens and
//!   answers are encrypted.
//! - **An on-path attacker** can delay, drop or cut connections, which the
//!   caller sees as transport errors; it cannot alter, splice or replay a
//!   request or an answer (TLS records are authenticated and sequenced),
//!   and it cannot pose as either end without the node's secret key.
//! - **An anonymous client** (no client certificate: `grpcurl -insecure`,
//!   Python `grpcio` with TLS) reaches `grpc.health.v1` and reflection
//!   only; every `tern.v1` method answers `Unauthenticated` before its
//!   body is read. It is held to the per-IP connection cap and closed when
//!   idle.
//! - **A node with any key** is that node, nothing more: what it may call
//!   is decided above the transport, by the services.
//!
//! There is no cleartext listener and no `http://` URL.
//!
//! # Layout
//!
//! - [`server`]: [`GrpcServer`], the Tern services that dispatch into the
//!   handler, the authentication middleware, health and reflection, and
//!   graceful shutdown.
//! - [`client`]: [`GrpcClient`], pooled channels per peer with a separate
//!   bulk lane, deadlines, identity checks and error mapping.
//! - [`tls`]: certificates bound to the node key, the verifiers that turn a
//!   handshake into a peer id, and the rustls configurations of both ends.
//! - [`metrics`]: recording under the names shared with the iroh transport
//!   ([`tern_protocol::metric_names`]), labelled `transport="grpc"`.
//! - [`baseline`]: the same TLS for the benches' raw tonic baseline.
//! - [`budget`]: request bytes in flight per peer, drawn as bodies are read.
//! - `codec`: a pass-through codec for already-encoded messages.
//! - `io`: counted TLS connections, their places under the connection
//!   caps, the client's TLS connector, and the switch that aborts
//!   connections when a drain deadline passes.
//! - [`stream`]: server-streaming and bidirectional calls: the handler's
//!   task and its bounded hand-over to tonic, the caller's halves, idle
//!   bounds, cancellation as an HTTP/2 reset.
//! - [`services`]: the tonic code generated at build time (servers and
//!   typed clients), using `tern_protocol::pb`'s message types.
//! - [`GrpcTransport`]: a server and a client with one identity, shut down
//!   together.
//!
//! # Invariants
//!
//! - The caller a service sees is the node its TLS session proved, never a
//!   value a request merely declared; an anonymous caller reaches no Tern
//!   service.
//! - An answer counts only if it came over a connection to the peer the
//!   caller meant; any other peer fails the handshake (`WrongPeer`).
//! - Nothing a peer sends can panic this crate: malformed metadata,
//!   messages, certificates and statuses are typed errors.
//! - Every limit is a named constant saying why, with a config override
//!   where operators need one (message size, connections in total, per IP
//!   and per peer, streams per connection, handshake time, anonymous idle
//!   time and age, keep-alive, backoff).
//!
//! # Deliberately absent
//!
//! - **Client retries.** A failed call is reported, classified, and never
//!   retried here: whether a retry is safe is the router's decision
//!   ([`tern_protocol::CallError::is_safe_to_retry`]).
//! - **Client-streaming RPCs.** The schemas' streams are server-streaming
//!   and bidirectional ([`stream`]); bulk data moves as unary chunks on the
//!   bulk lane.

use std::sync::Arc;
use std::time::Duration;

pub mod baseline;
pub mod budget;
pub mod client;
mod codec;
mod io;
pub mod metrics;
pub mod server;
pub mod stream;
pub mod tls;

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
pub use server::{GrpcServer, HealthHandle, ServerConfig, ServerLimits};
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
