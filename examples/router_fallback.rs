//! The dual router's fallback: a call prefers iroh, iroh fails before the
//! request is delivered, and the router retries it over gRPC.
//!
//! The server serves [`Echo`] over both transports. The policy is the
//! migration's middle stage (`mode = "dual"`, iroh preferred for every
//! service but Raft, fallback on). The first call goes over iroh. Then
//! the server's iroh endpoint is shut down and the peer's iroh address
//! points at a stranger's endpoint: the dial fails in the handshake (the
//! stranger cannot prove the key dialled), so the request provably did
//! not arrive and the router sends it over gRPC instead. The answers name
//! the transport that carried each call.
//!
//! `cargo run -p tern-examples --example router_fallback`

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tern_examples::Echo;
use tern_protocol::catalog::methods;
use tern_protocol::rpc::Dispatcher;
use tern_protocol::{Call, PeerAddr, RpcClient};
use tern_transport_dual::policy::{MigrationConfig, Mode, RaftTransport};
use tern_transport_dual::{DualRouter, Policy, TransportConfig};
use tern_transport_grpc::{GrpcTransport, ServerConfig};
use tern_transport_iroh::{IrohConfig, IrohTransport};

/// How long a shutting-down transport lets calls in flight finish.
const DRAIN: Duration = Duration::from_secs(1);

fn echo_call() -> Call {
    Call::new(methods::HEALTH_CHECK, "hello".into()).with_timeout(Duration::from_secs(10))
}

/// Returns the answers before and after iroh broke.
async fn run() -> anyhow::Result<(String, String)> {
    let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    // The server: one key, both transports, one handler.
    let key: [u8; 32] = rand::random();
    let grpc = GrpcTransport::bind(ServerConfig::new(key, any), Arc::new(Echo)).await?;
    let iroh = IrohTransport::bind(IrohConfig::new(key), Arc::new(Echo)).await?;
    let server = PeerAddr {
        iroh: iroh.peer_addr().iroh,
        ..grpc.peer_addr()
    };

    // The caller: a client per transport, and the router over both.
    let caller_key: [u8; 32] = rand::random();
    let caller_grpc =
        GrpcTransport::bind(ServerConfig::new(caller_key, any), Arc::new(Echo)).await?;
    let caller_iroh = IrohTransport::bind(IrohConfig::new(caller_key), Arc::new(Echo)).await?;
    let policy = Policy::from_config(&TransportConfig {
        mode: Mode::Dual,
        migration: MigrationConfig {
            prefer_iroh: vec!["all_except_raft".into()],
            raft_transport: RaftTransport::Grpc,
            fallback_to_grpc: true,
        },
    })?;
    let router = DualRouter::new(
        Some(caller_grpc.client() as Arc<dyn RpcClient>),
        Some(caller_iroh.client() as Arc<dyn RpcClient>),
        policy,
    );

    let before = router.call(&server, echo_call()).await?;

    // iroh breaks: the server's endpoint goes away, and its address now
    // answers with another key.
    iroh.shutdown(DRAIN).await;
    let stranger =
        IrohTransport::bind(IrohConfig::new(rand::random()), Arc::new(Dispatcher::new())).await?;
    let broken = PeerAddr {
        iroh: stranger.peer_addr().iroh,
        ..server
    };
    let after = router.call(&broken, echo_call()).await?;

    stranger.shutdown(DRAIN).await;
    caller_iroh.shutdown(DRAIN).await;
    caller_grpc.shutdown(DRAIN).await;
    grpc.shutdown(DRAIN).await;
    let text = |b: bytes::Bytes| String::from_utf8_lossy(&b).into_owned();
    Ok((text(before), text(after)))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (before, after) = run().await?;
    println!("iroh healthy: {before}");
    println!("iroh broken:  {after}");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_call_falls_back_to_grpc_when_iroh_fails_before_delivery() -> anyhow::Result<()> {
        let (before, after) = super::run().await?;
        assert!(before.starts_with("iroh "), "{before}");
        assert!(after.starts_with("grpc "), "{after}");
        Ok(())
    }
}
