//! The server process: `tern-bench serve --transport KIND`.
//!
//! It binds on 127.0.0.1 (a free port), prints one [`Ready`] line as JSON
//! on stdout, then serves until its stdin closes (the client exited or
//! dropped it) or it gets SIGTERM or SIGINT. Our transports serve the
//! conformance suite's [`TestService`]: `Raft/AppendEntries` echoes (the
//! unary probe, sent on the normal lane), `Raft/Vote` answers at once (the
//! control-lane probe), `Raft/Snapshot` answers a chunk's length (bulk).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tern_transport_conformance::service::TestService;
use tern_transport_grpc::{GrpcTransport, ServerConfig};
use tern_transport_iroh::{IrohConfig, IrohTransport};
use tokio::io::AsyncReadExt;

use crate::kind::Kind;
use crate::raw;

/// How long a stopping server lets calls in flight finish.
const DRAIN: Duration = Duration::from_secs(2);

/// What the server prints once it serves: everything a client needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    /// The transport served.
    pub transport: Kind,
    /// The server's process id (for its CPU, memory and descriptors).
    pub pid: u32,
    /// The server's identity, hex (Ed25519 public key / iroh endpoint id).
    pub id: String,
    /// Its iroh socket addresses (iroh transports only).
    pub iroh_addrs: Vec<SocketAddr>,
    /// Its gRPC URL (gRPC transports only).
    pub grpc_url: Option<String>,
}

/// The server's secret key: read from `key_file` (32 raw bytes, as
/// `tern_transport_iroh::load_or_create_secret_key` stores it) if it
/// exists, else created there; random when no file is named.
pub fn load_key(key_file: Option<&Path>) -> anyhow::Result<[u8; 32]> {
    let Some(path) = key_file else {
        return Ok(rand::random());
    };
    match std::fs::read(path) {
        Ok(bytes) => bytes.as_slice().try_into().map_err(|_| {
            anyhow::anyhow!(
                "key file {} holds {} bytes, not a 32-byte secret key; \
                 delete it to have a new key created",
                path.display(),
                bytes.len()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key: [u8; 32] = rand::random();
            std::fs::write(path, key)
                .with_context(|| format!("creating the key file {}", path.display()))?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading the key file {}", path.display())),
    }
}

/// A server started by [`start`]: what it announced, and how to stop it.
#[derive(Debug)]
pub struct Running {
    /// What a client needs to reach it.
    pub ready: Ready,
    server: Served,
}

/// The server behind a [`Running`].
#[derive(Debug)]
enum Served {
    Iroh(IrohTransport),
    Grpc(GrpcTransport),
    RawIroh(iroh::protocol::Router),
    /// The raw gRPC server runs until the runtime stops.
    RawGrpc,
}

impl Running {
    /// Stops the server, letting calls in flight finish (bounded).
    pub async fn stop(self) {
        match self.server {
            Served::Iroh(t) => t.shutdown(DRAIN).await,
            Served::Grpc(t) => t.shutdown(DRAIN).await,
            Served::RawIroh(router) => {
                if let Err(e) = router.shutdown().await {
                    tracing::warn!("raw iroh router shutdown: {e}");
                }
            }
            Served::RawGrpc => {}
        }
    }
}

/// Starts serving `kind` with identity `key` on 127.0.0.1 (a free port) in
/// this process: the server child's work, and the allocation bench's
/// (`benches/allocs.rs`), which runs both ends in one process.
pub async fn start(kind: Kind, key: [u8; 32]) -> anyhow::Result<Running> {
    let pid = std::process::id();
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let (ready, server) = match kind {
        Kind::Iroh => {
            let t = IrohTransport::bind(
                IrohConfig::new(key).with_bind_addr(loopback),
                TestService::default().dispatcher(),
            )
            .await
            .context("binding the iroh transport")?;
            let ready = Ready {
                transport: kind,
                pid,
                id: t.id().to_string(),
                iroh_addrs: vec![t.local_addr()],
                grpc_url: None,
            };
            (ready, Served::Iroh(t))
        }
        Kind::Grpc => {
            let t = GrpcTransport::bind(
                ServerConfig::new(key, loopback),
                TestService::default().dispatcher(),
            )
            .await
            .context("binding the gRPC transport")?;
            let ready = Ready {
                transport: kind,
                pid,
                id: t.id().to_string(),
                iroh_addrs: Vec::new(),
                grpc_url: Some(t.server().url()),
            };
            (ready, Served::Grpc(t))
        }
        Kind::RawIroh => {
            let (router, id, socket) = raw::raw_iroh_server(key).await?;
            let ready = Ready {
                transport: kind,
                pid,
                id: hex::encode(id),
                iroh_addrs: vec![socket],
                grpc_url: None,
            };
            (ready, Served::RawIroh(router))
        }
        Kind::RawGrpc => {
            let (url, id) = raw::raw_grpc_server(key).await?;
            let ready = Ready {
                transport: kind,
                pid,
                id: hex::encode(id.as_bytes()),
                iroh_addrs: Vec::new(),
                grpc_url: Some(url),
            };
            (ready, Served::RawGrpc)
        }
    };
    Ok(Running { ready, server })
}

/// Serves `kind` with identity `key` until told to stop (see the module
/// docs). The ready line goes to stdout, logs to stderr.
pub async fn serve(kind: Kind, key: [u8; 32]) -> anyhow::Result<()> {
    let running = start(kind, key).await?;
    announce(&running.ready)?;
    wait_for_stop().await;
    running.stop().await;
    Ok(())
}

fn announce(ready: &Ready) -> anyhow::Result<()> {
    use std::io::Write;
    let line = serde_json::to_string(ready).context("encoding the ready line")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").context("writing the ready line to stdout")?;
    out.flush().context("flushing stdout")
}

/// Resolves when stdin reaches its end (or fails), or on SIGTERM/SIGINT.
async fn wait_for_stop() {
    let stdin_closed = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 256];
        while let Ok(n) = stdin.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot watch SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = stdin_closed => tracing::info!("stdin closed; stopping"),
        _ = term => tracing::info!("SIGTERM; stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT; stopping"),
    }
}
