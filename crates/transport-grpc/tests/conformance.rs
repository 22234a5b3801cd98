//! The transport conformance suite, run against the gRPC transport.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tern_protocol::{BoxFuture, PeerAddr, PeerId, RpcClient};
use tern_transport_conformance::{Harness, NodeSpec, TestNode};
use tern_transport_grpc::{GrpcTransport, ServerConfig};

/// Starts gRPC nodes on loopback.
#[derive(Debug, Default, Clone, Copy)]
struct GrpcHarness;

/// A running gRPC node.
struct GrpcNode {
    transport: GrpcTransport,
}

impl Harness for GrpcHarness {
    type Node = GrpcNode;

    fn name(&self) -> &'static str {
        "grpc"
    }

    fn start(&self, spec: NodeSpec) -> BoxFuture<'_, anyhow::Result<GrpcNode>> {
        Box::pin(async move {
            let listen = spec
                .listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
            let config = ServerConfig::new(spec.secret_key, listen);
            let transport = GrpcTransport::bind(config, spec.handler).await?;
            Ok(GrpcNode { transport })
        })
    }
}

impl TestNode for GrpcNode {
    fn id(&self) -> PeerId {
        self.transport.id()
    }

    fn addr(&self) -> PeerAddr {
        self.transport.peer_addr()
    }

    fn listen_addr(&self) -> SocketAddr {
        self.transport.local_addr()
    }

    fn client(&self) -> Arc<dyn RpcClient> {
        self.transport.client()
    }

    fn shutdown(self, drain: Duration) -> BoxFuture<'static, ()> {
        Box::pin(self.transport.shutdown(drain))
    }
}

tern_transport_conformance::conformance_tests!(GrpcHarness);
