//! Echo over iroh: one node serves a handler over QUIC, another calls it.
//!
//! Each side is an `IrohTransport` (an endpoint, a router for the
//! `tern/rpc/1` ALPN, and a client) bound to 127.0.0.1 with its own
//! Ed25519 key. The caller dials the server by key plus the direct address
//! its `PeerAddr` names; no relay, no discovery. The answer names the
//! transport and the caller's id as the server authenticated it.
//!
//! `cargo run -p tern-examples --example echo_iroh`

use std::sync::Arc;
use std::time::Duration;

use tern_examples::Echo;
use tern_protocol::catalog::methods;
use tern_protocol::{Call, RpcClient};
use tern_transport_iroh::{IrohConfig, IrohTransport};

/// How long a shutting-down transport lets calls in flight finish.
const DRAIN: Duration = Duration::from_secs(1);

/// Serves [`Echo`], calls it once, shuts both ends down; returns the answer.
async fn run() -> anyhow::Result<String> {
    let server = IrohTransport::bind(IrohConfig::new(rand::random()), Arc::new(Echo)).await?;
    // The caller is a transport too: its client dials with its own key.
    let caller = IrohTransport::bind(IrohConfig::new(rand::random()), Arc::new(Echo)).await?;
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
    async fn the_echo_comes_back_over_iroh() -> anyhow::Result<()> {
        let answer = super::run().await?;
        assert!(
            answer.starts_with("iroh ") && answer.ends_with(": hello"),
            "{answer}"
        );
        Ok(())
    }
}
