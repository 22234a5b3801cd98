//! How the client process calls each transport: one [`Driver`] per
//! transport, with the same operations for all of them.
//!
//! | operation          | ours (iroh, gRPC)                          | raw iroh            | raw gRPC               |
//! |--------------------|--------------------------------------------|---------------------|------------------------|
//! | [`Driver::unary`]  | `Raft/AppendEntries` echo, normal lane     | echo on a bi-stream | `AppendEntries` echo   |
//! | [`Driver::control`]| `Raft/Vote`, control lane                  | echo on a bi-stream | `Vote`                 |
//! | [`Driver::bulk`]   | `Raft/Snapshot` chunk, bulk lane           | chunk on a bi-stream| `Snapshot` chunk       |
//! | [`Driver::fresh_connection`] | a new client identity and connection, first unary call | new endpoint, connection + echo | new channel + echo |
//! | [`Driver::resumed_connection`] | pooled connections closed, read-only `Status/Get` (iroh: 0-RTT) | new connection, echo in 0-RTT | new channel + echo |
//!
//! The raw baselines have no lanes: their control probe shares the one
//! connection with the bulk transfer, which is what the lanes improve on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use iroh::endpoint::Connection;
use iroh::{Endpoint, EndpointAddr, PublicKey};
use prost::Message;
use tern_protocol::catalog::methods;
use tern_protocol::peer::IrohAddr;
use tern_protocol::{Call, PeerAddr, PeerId, Priority, RpcClient, pb};
use tern_transport_conformance::service::TestService;
use tern_transport_grpc::services::raft_client::RaftClient;
use tern_transport_grpc::{ClientConfig, GrpcClient};
use tern_transport_iroh::{IrohConfig, IrohTransport};
use tonic::transport::Channel;

use crate::kind::Kind;
use crate::raw;
use crate::serve::Ready;

/// Deadline of every call the bench makes: generous, never expected to be
/// reached; a call that does fails the measurement instead of hanging it.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Bound on setting up or tearing down one client connection.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// The client side of one transport, connected to its server.
#[derive(Debug)]
pub enum Driver {
    /// Our iroh transport: a local transport (its endpoint is the client's)
    /// calling the server.
    Iroh {
        /// The local transport; `None` once closed.
        local: Option<IrohTransport>,
        /// The server's address.
        peer: PeerAddr,
    },
    /// Our gRPC transport: a client (no local server is needed to call).
    Grpc {
        /// The client.
        client: Arc<GrpcClient>,
        /// The server's address.
        peer: PeerAddr,
    },
    /// The raw iroh baseline.
    RawIroh {
        /// The local endpoint.
        endpoint: Endpoint,
        /// The warm connection.
        conn: Connection,
        /// The server's address.
        addr: EndpointAddr,
    },
    /// The raw gRPC baseline.
    RawGrpc {
        /// tonic's generated client on one channel.
        client: RaftClient<Channel>,
        /// The server's URL.
        url: String,
        /// The server's id, which its TLS certificate must prove.
        id: PeerId,
    },
}

/// Parses the server's id from its ready line.
fn peer_id(ready: &Ready) -> anyhow::Result<PeerId> {
    ready
        .id
        .parse()
        .with_context(|| format!("the server's id {:?} in its ready line", ready.id))
}

fn iroh_addrs(ready: &Ready) -> anyhow::Result<Vec<SocketAddr>> {
    ensure!(
        !ready.iroh_addrs.is_empty(),
        "the {} server's ready line names no iroh address",
        ready.transport
    );
    Ok(ready.iroh_addrs.clone())
}

fn grpc_url(ready: &Ready) -> anyhow::Result<String> {
    ready.grpc_url.clone().with_context(|| {
        format!(
            "the {} server's ready line names no gRPC URL",
            ready.transport
        )
    })
}

/// A `Raft/AppendEntries` echo of `data` on the normal lane.
pub fn unary_call(data: Bytes) -> Call {
    Call::new(
        methods::RAFT_APPEND_ENTRIES,
        pb::RaftPayload { data }.encode_to_vec().into(),
    )
    .with_timeout(CALL_TIMEOUT)
    .with_priority(Priority::Normal)
}

fn snapshot_chunk(index: usize, data: Bytes) -> pb::SnapshotChunk {
    pb::SnapshotChunk {
        snapshot_id: "bench".into(),
        offset: (index * data.len()) as u64,
        data,
        ..Default::default()
    }
}

/// A `Status/Get`: the read-only call a resumed connection sends early.
fn status_call() -> Call {
    Call::new(
        methods::STATUS_GET,
        pb::StatusRequest {}.encode_to_vec().into(),
    )
    .with_timeout(CALL_TIMEOUT)
}

/// Times one `Status/Get` on `client`, checking its answer.
async fn timed_status(client: &dyn RpcClient, peer: &PeerAddr) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let answer = client.call(peer, status_call()).await;
    let elapsed = started.elapsed();
    check_status(&answer?)?;
    Ok(elapsed)
}

/// Checks that a `Status/Get` answer is the bench server's status.
fn check_status(answer: &[u8]) -> anyhow::Result<()> {
    let status = pb::NodeStatus::decode(answer).context("decoding the status answer")?;
    ensure!(
        status.node_id == tern_transport_conformance::service::STATUS_NODE_ID,
        "the status names node {}, not the bench server",
        status.node_id
    );
    Ok(())
}

/// Checks that an echo answer (a `RaftPayload`) carries `len` bytes.
fn check_echo(answer: &[u8], len: usize) -> anyhow::Result<()> {
    let echoed = pb::RaftPayload::decode(answer).context("decoding the echo answer")?;
    ensure!(
        echoed.data.len() == len,
        "the echo answered {} bytes for {len}",
        echoed.data.len()
    );
    Ok(())
}

/// Checks a bulk answer: the chunk's length, u64 LE (inside a
/// `RaftPayload` for ours and raw gRPC, bare for raw iroh).
fn check_len(answer: &[u8], len: usize) -> anyhow::Result<()> {
    let bytes: [u8; 8] = answer
        .try_into()
        .map_err(|_| anyhow::anyhow!("a bulk answer of {} bytes, not 8", answer.len()))?;
    let got = u64::from_le_bytes(bytes);
    ensure!(
        got == len as u64,
        "the server counted {got} bytes of a {len}-byte chunk"
    );
    Ok(())
}

async fn bind_iroh_client() -> anyhow::Result<IrohTransport> {
    let t = IrohTransport::bind(
        IrohConfig::new(rand::random()),
        TestService::default().dispatcher(),
    );
    tokio::time::timeout(SETUP_TIMEOUT, t)
        .await
        .context("binding the client's iroh transport timed out")?
        .context("binding the client's iroh transport")
}

impl Driver {
    /// Connects to the server that printed `ready` and makes one unary call,
    /// so that the connection is warm.
    pub async fn connect(ready: &Ready) -> anyhow::Result<Driver> {
        let driver = match ready.transport {
            Kind::Iroh => {
                let peer = PeerAddr {
                    iroh: Some(IrohAddr {
                        direct: iroh_addrs(ready)?,
                        relay_url: None,
                    }),
                    ..PeerAddr::new(peer_id(ready)?)
                };
                Driver::Iroh {
                    local: Some(bind_iroh_client().await?),
                    peer,
                }
            }
            Kind::Grpc => {
                let peer = PeerAddr {
                    grpc: Some(grpc_url(ready)?),
                    ..PeerAddr::new(peer_id(ready)?)
                };
                let client = Arc::new(GrpcClient::new(ClientConfig::new(rand::random())));
                Driver::Grpc { client, peer }
            }
            Kind::RawIroh => {
                let id = PublicKey::from_bytes(peer_id(ready)?.as_bytes())
                    .context("the raw iroh server's id is not an Ed25519 public key")?;
                let mut addr = EndpointAddr::new(id);
                for a in iroh_addrs(ready)? {
                    addr = addr.with_ip_addr(a);
                }
                let endpoint = raw::raw_endpoint(None).await?;
                let conn = tokio::time::timeout(
                    SETUP_TIMEOUT,
                    endpoint.connect(addr.clone(), raw::RAW_ALPN),
                )
                .await
                .context("connecting to the raw iroh server timed out")?
                .context("connecting to the raw iroh server")?;
                Driver::RawIroh {
                    endpoint,
                    conn,
                    addr,
                }
            }
            Kind::RawGrpc => {
                let url = grpc_url(ready)?;
                let id = peer_id(ready)?;
                let client = raw_grpc_connect(&url, id).await?;
                Driver::RawGrpc { client, url, id }
            }
        };
        // Warm every lane (ours open a connection per lane on gRPC), so
        // that no measurement includes a dial it did not ask for.
        driver
            .unary(Bytes::from_static(b"warm-up"))
            .await
            .context("the first unary call")?;
        driver.control().await.context("the first control call")?;
        driver
            .bulk(0, Bytes::from(vec![0u8; 2 * raw::RAW_ECHO_MAX]))
            .await
            .context("the first bulk call")?;
        Ok(driver)
    }

    /// One unary call echoing `data`.
    pub async fn unary(&self, data: Bytes) -> anyhow::Result<()> {
        let len = data.len();
        match self {
            Driver::Iroh { local, peer } => {
                let client = iroh_client(local)?;
                check_echo(&client.call(peer, unary_call(data)).await?, len)
            }
            Driver::Grpc { client, peer } => {
                check_echo(&client.call(peer, unary_call(data)).await?, len)
            }
            Driver::RawIroh { conn, .. } => {
                let answer = raw::raw_iroh_call(conn, data).await?;
                ensure!(
                    answer.len() == len,
                    "the raw echo answered {} bytes",
                    answer.len()
                );
                Ok(())
            }
            Driver::RawGrpc { client, .. } => {
                let answer = client
                    .clone()
                    .append_entries(pb::RaftPayload { data })
                    .await?
                    .into_inner();
                ensure!(
                    answer.data.len() == len,
                    "the raw echo answered {} bytes",
                    answer.data.len()
                );
                Ok(())
            }
        }
    }

    /// One control-lane call (`Raft/Vote`; a small echo for raw iroh).
    pub async fn control(&self) -> anyhow::Result<()> {
        let vote = || Call::new(methods::RAFT_VOTE, Bytes::new()).with_timeout(CALL_TIMEOUT);
        match self {
            Driver::Iroh { local, peer } => {
                iroh_client(local)?.call(peer, vote()).await?;
            }
            Driver::Grpc { client, peer } => {
                client.call(peer, vote()).await?;
            }
            Driver::RawIroh { conn, .. } => {
                raw::raw_iroh_call(conn, Bytes::from_static(b"vote")).await?;
            }
            Driver::RawGrpc { client, .. } => {
                client.clone().vote(pb::RaftPayload::default()).await?;
            }
        }
        Ok(())
    }

    /// Sends one bulk chunk (`Raft/Snapshot` on the bulk lane) and checks
    /// that the server counted all of it.
    pub async fn bulk(&self, index: usize, chunk: Bytes) -> anyhow::Result<()> {
        let len = chunk.len();
        let snapshot = |chunk| {
            Call::new(
                methods::RAFT_SNAPSHOT,
                snapshot_chunk(index, chunk).encode_to_vec().into(),
            )
            .with_timeout(CALL_TIMEOUT)
        };
        let inner = |answer: Bytes| -> anyhow::Result<Bytes> {
            Ok(pb::RaftPayload::decode(answer)
                .context("decoding the bulk answer")?
                .data)
        };
        match self {
            Driver::Iroh { local, peer } => {
                let answer = iroh_client(local)?.call(peer, snapshot(chunk)).await?;
                check_len(&inner(answer)?, len)
            }
            Driver::Grpc { client, peer } => {
                let answer = client.call(peer, snapshot(chunk)).await?;
                check_len(&inner(answer)?, len)
            }
            Driver::RawIroh { conn, .. } => check_len(&raw::raw_iroh_call(conn, chunk).await?, len),
            Driver::RawGrpc { client, .. } => {
                let answer = client
                    .clone()
                    .snapshot(snapshot_chunk(index, chunk))
                    .await?
                    .into_inner();
                check_len(&answer.data, len)
            }
        }
    }

    /// Times a fresh connection and its first unary call of `data`: what a
    /// client pays to reach a peer it has no connection to.
    ///
    /// A new client identity each time (a new iroh endpoint bound, or a
    /// new gRPC client, outside the timing), so nothing is pooled or
    /// cached and no TLS session is resumed; the timing covers dial, full
    /// handshake (and for gRPC the caller proof's key agreement) and the
    /// call. The raw iroh baseline binds a new endpoint the same way; raw
    /// gRPC opens a new channel (no session cache across channels).
    pub async fn fresh_connection(&self, data: Bytes) -> anyhow::Result<Duration> {
        let len = data.len();
        match self {
            Driver::Iroh { peer, .. } => {
                let local = bind_iroh_client().await?;
                let client = local.client();
                let started = Instant::now();
                let answer = client.call(peer, unary_call(data)).await;
                let elapsed = started.elapsed();
                let shut = tokio::time::timeout(SETUP_TIMEOUT, local.shutdown(Duration::ZERO));
                if shut.await.is_err() {
                    tracing::warn!(
                        "a fresh iroh client did not shut down within {SETUP_TIMEOUT:?}"
                    );
                }
                check_echo(&answer?, len)?;
                Ok(elapsed)
            }
            Driver::Grpc { peer, .. } => {
                let client = GrpcClient::new(ClientConfig::new(rand::random()));
                let started = Instant::now();
                let answer = client.call(peer, unary_call(data)).await;
                let elapsed = started.elapsed();
                client.close();
                check_echo(&answer?, len)?;
                Ok(elapsed)
            }
            Driver::RawIroh { addr, .. } => {
                // A new endpoint, as ours: one that connected before would
                // resume its TLS session (no signatures), which is the
                // resumed row's measurement, not this one's.
                let endpoint = raw::raw_endpoint(None).await?;
                let started = Instant::now();
                let conn = endpoint
                    .connect(addr.clone(), raw::RAW_ALPN)
                    .await
                    .context("a fresh raw iroh connection")?;
                let answer = raw::raw_iroh_call(&conn, data).await;
                let elapsed = started.elapsed();
                conn.close(0u32.into(), b"done");
                let closed = tokio::time::timeout(SETUP_TIMEOUT, endpoint.close());
                if closed.await.is_err() {
                    tracing::warn!(
                        "a fresh raw iroh endpoint did not close within {SETUP_TIMEOUT:?}"
                    );
                }
                ensure!(
                    answer?.len() == len,
                    "the raw echo answered the wrong length"
                );
                Ok(elapsed)
            }
            Driver::RawGrpc { url, id, .. } => {
                let started = Instant::now();
                let mut client = raw_grpc_connect(url, *id).await?;
                let answer = client.append_entries(pb::RaftPayload { data }).await;
                let elapsed = started.elapsed();
                ensure!(
                    answer?.into_inner().data.len() == len,
                    "the raw echo answered the wrong length"
                );
                Ok(elapsed)
            }
        }
    }

    /// Times a new connection from a client that has reached the server
    /// before, and its first call: the best each transport does when it
    /// must connect again to a peer it knows.
    ///
    /// - Ours, iroh: the pooled connections are closed and a read-only
    ///   `Status/Get` is called: the endpoint resumes its TLS session and
    ///   sends the call in 0-RTT early data.
    /// - Ours, gRPC: the pooled channels are dropped and the same call is
    ///   made on a new TLS connection.
    /// - Raw iroh: a new connection from the same endpoint, the echo sent
    ///   in early data (the raw server answers early data at once).
    /// - Raw gRPC: a new channel (tonic keeps no TLS session across
    ///   channels here), as for a fresh connection.
    pub async fn resumed_connection(&self, data: Bytes) -> anyhow::Result<Duration> {
        match self {
            Driver::Iroh { local, peer } => {
                let client = iroh_client(local)?;
                client.close_pooled_connections();
                timed_status(&*client, peer).await
            }
            Driver::Grpc { client, peer } => {
                client.close_pooled_connections();
                timed_status(&**client, peer).await
            }
            Driver::RawIroh { endpoint, addr, .. } => {
                let len = data.len();
                let started = Instant::now();
                let connecting = endpoint
                    .connect_with_opts(addr.clone(), raw::RAW_ALPN, Default::default())
                    .await
                    .context("a resumed raw iroh connection")?;
                let (answer, conn) = match connecting.into_0rtt() {
                    Ok(early) => {
                        let answer = raw::raw_iroh_call(&early, data.clone()).await;
                        let status = early
                            .handshake_completed()
                            .await
                            .context("the resumed raw handshake")?;
                        match status {
                            iroh::endpoint::ZeroRttStatus::Accepted(conn) => (answer, conn),
                            iroh::endpoint::ZeroRttStatus::Rejected(conn) => {
                                (raw::raw_iroh_call(&conn, data).await, conn)
                            }
                        }
                    }
                    Err(connecting) => {
                        let conn = connecting.await.context("a raw iroh connection")?;
                        (raw::raw_iroh_call(&conn, data).await, conn)
                    }
                };
                let elapsed = started.elapsed();
                conn.close(0u32.into(), b"done");
                ensure!(
                    answer?.len() == len,
                    "the raw echo answered the wrong length"
                );
                Ok(elapsed)
            }
            Driver::RawGrpc { .. } => self.fresh_connection(data).await,
        }
    }

    /// Closes the client side (connections, local endpoint).
    pub async fn close(&mut self) {
        match self {
            Driver::Iroh { local, .. } => {
                if let Some(t) = local.take() {
                    let _ = tokio::time::timeout(SETUP_TIMEOUT, t.shutdown(Duration::from_secs(2)))
                        .await;
                }
            }
            Driver::Grpc { client, .. } => client.close(),
            Driver::RawIroh { endpoint, conn, .. } => {
                conn.close(0u32.into(), b"done");
                let _ = tokio::time::timeout(SETUP_TIMEOUT, endpoint.close()).await;
            }
            Driver::RawGrpc { .. } => {}
        }
    }
}

fn iroh_client(
    local: &Option<IrohTransport>,
) -> anyhow::Result<Arc<tern_transport_iroh::IrohClient>> {
    match local {
        Some(t) => Ok(t.client()),
        None => bail!("the iroh client was already closed"),
    }
}

async fn raw_grpc_connect(url: &str, id: PeerId) -> anyhow::Result<RaftClient<Channel>> {
    let connect = raw::raw_grpc_channel(url, id);
    let channel = tokio::time::timeout(SETUP_TIMEOUT, connect)
        .await
        .with_context(|| format!("connecting to the raw gRPC server {url} timed out"))??;
    Ok(RaftClient::new(channel)
        .max_decoding_message_size(raw::RAW_MAX)
        .max_encoding_message_size(raw::RAW_MAX))
}
