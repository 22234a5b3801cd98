//! Real transports for service tests: the same test body runs over gRPC
//! and over iroh, each node a real server on loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use tern_protocol::{Handler, PeerAddr, PeerId, RpcClient};
use tern_transport_grpc::GrpcTransport;
use tern_transport_iroh::IrohTransport;

use crate::factory::{DRAIN, Grpc, Iroh, TransportFactory};

/// Which transport a test runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// tonic over HTTP/2.
    Grpc,
    /// iroh QUIC.
    Iroh,
}

/// A running node of either transport.
pub enum Node {
    /// gRPC.
    Grpc(GrpcTransport),
    /// iroh.
    Iroh(IrohTransport),
}

fn next_key() -> [u8; 32] {
    static NEXT: AtomicU8 = AtomicU8::new(1);
    let mut key = [0u8; 32];
    key[0] = NEXT.fetch_add(1, Ordering::Relaxed);
    key[1] = u8::try_from(std::process::id() % 251).unwrap();
    key[2] = 0x5e;
    key
}

impl Node {
    /// Starts a node serving `handler` on loopback, any port, with a
    /// fresh identity (through the [`crate::factory`] factories).
    pub async fn start(kind: Kind, handler: Arc<dyn Handler>) -> Node {
        let key = next_key();
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        match kind {
            Kind::Grpc => Node::Grpc(Grpc.start(key, loopback, handler).await),
            Kind::Iroh => Node::Iroh(Iroh.start(key, loopback, handler).await),
        }
    }

    /// How to reach it.
    pub fn addr(&self) -> PeerAddr {
        match self {
            Node::Grpc(t) => t.peer_addr(),
            Node::Iroh(t) => t.peer_addr(),
        }
    }

    /// Its identity.
    pub fn id(&self) -> PeerId {
        match self {
            Node::Grpc(t) => t.id(),
            Node::Iroh(t) => t.id(),
        }
    }

    /// Its client (calls as this node).
    pub fn client(&self) -> Arc<dyn RpcClient> {
        match self {
            Node::Grpc(t) => t.client(),
            Node::Iroh(t) => t.client(),
        }
    }

    /// Stops it.
    pub async fn shutdown(self) {
        match self {
            Node::Grpc(t) => t.shutdown(DRAIN).await,
            Node::Iroh(t) => t.shutdown(DRAIN).await,
        }
    }
}
