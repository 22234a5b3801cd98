//! The shared transport conformance suite, run against the iroh transport.
//!
//! Every node is a real [`IrohTransport`] bound on loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tern_protocol::{BoxFuture, PeerAddr, PeerId, RpcClient};
use tern_transport_conformance::{Harness, NodeSpec, TestNode};
use tern_transport_iroh::{IrohConfig, IrohTransport};

/// How long a restarted node retries binding an address its predecessor
/// just released.
const REBIND_PATIENCE: Duration = Duration::from_secs(10);

/// Starts iroh nodes.
#[derive(Debug, Default, Clone, Copy)]
pub struct IrohHarness;

/// A running iroh node.
pub struct IrohNode {
    transport: IrohTransport,
}

impl Harness for IrohHarness {
    type Node = IrohNode;

    fn name(&self) -> &'static str {
        "iroh"
    }

    fn start(&self, spec: NodeSpec) -> BoxFuture<'_, anyhow::Result<IrohNode>> {
        Box::pin(async move {
            let mut config = IrohConfig::new(spec.secret_key);
            if let Some(addr) = spec.listen {
                config = config.with_bind_addr(addr);
            }
            let deadline = tokio::time::Instant::now() + REBIND_PATIENCE;
            loop {
                match IrohTransport::bind(config.clone(), spec.handler.clone()).await {
                    Ok(transport) => return Ok(IrohNode { transport }),
                    // The old node's socket may take a moment to be released.
                    Err(e) if spec.listen.is_some() && tokio::time::Instant::now() < deadline => {
                        tracing::debug!("rebinding: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => return Err(e).context("binding an iroh node"),
                }
            }
        })
    }
}

impl TestNode for IrohNode {
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

tern_transport_conformance::conformance_tests!(IrohHarness);
