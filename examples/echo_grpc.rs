//! Echo over gRPC: the same handler as `echo_iroh`, served by tonic over
//! TLS 1.3 whose certificates are bound to the nodes' Ed25519 keys.
//!
//! The server listens on 127.0.0.1 (a free port) and its `PeerAddr` names
//! an `https://` URL and its id; the caller's client accepts exactly that
//! id in the handshake and presents its own key, which the server's
//! handler sees as the caller. The handler code is the same as over iroh:
//! only the transport changed.
//!
//! `cargo run -p tern-examples --example echo_grpc`

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tern_examples::Echo;
use tern_protocol::catalog::methods;
use tern_protocol::{Call, RpcClient};
use tern_transport_grpc::{GrpcTransport, ServerConfig};

/// How long a shutting-down transport lets calls in flight finish.
const DRAIN: Duration = Duration::from_secs(1);

/// Serves [`Echo`], calls it once, shuts both ends down; returns the answer.
async fn run() -> anyhow::Result<String> {
    let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let server =
        GrpcTransport::bind(ServerConfig::new(rand::random(), any), Arc::new(Echo)).await?;
    let caller =
        GrpcTransport::bind(ServerConfig::new(rand::random(), any), Arc::new(Echo)).await?;
    let call =
        Call::new(methods::HEALTH_CHECK, "hello".into()).with_timeout(Duration::from_secs(10));
    let answer = caller.client().call(&server.peer_addr(), call).await?;
    caller.shutdown(DRAIN).await;
    server.shutdown(DRAIN).await;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    println!("{}", run().await?);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn the_echo_comes_back_over_grpc() -> anyhow::Result<()> {
        let answer = super::run().await?;
        assert!(
            answer.starts_with("grpc ") && answer.ends_with(": hello"),
            "{answer}"
        );
        Ok(())
    }
}
