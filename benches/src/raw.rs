//! The raw baselines, the one module both measure them from: the
//! two-process bench (`tern-bench serve --transport raw-iroh|raw-grpc`)
//! and the transports' in-process criterion benches (`benches/iroh.rs`,
//! `benches/grpc.rs`, and `benches/streams.rs` for streams). What the bare libraries cost, so that our
//! transports' overhead reads as a ratio. (There were three copies, and
//! their message limits had drifted apart.)
//!
//! - iroh: a bare endpoint on its own ALPN; a call is one bi-stream, the
//!   request written and finished, the answer read to its end. No framing,
//!   no lanes, no pool.
//! - iroh streams (`benches/streams.rs`): one bi-stream of a bare endpoint
//!   on its own ALPN ([`RAW_STREAM_ALPN`]), messages length-prefixed (4
//!   bytes, LE) and echoed ([`RawStreamEcho`]).
//! - gRPC: tonic's generated `Raft` service answering directly, called with
//!   tonic's generated client on one channel, over the same TLS 1.3 with
//!   node-key certificates as our transport
//!   (`tern_transport_grpc::baseline`), so encryption costs both alike. No
//!   limits, no handler, no pool.

use std::net::SocketAddr;

use anyhow::Context;
use bytes::Bytes;
use iroh::endpoint::{Accepting, Connection, ConnectionState, RecvStream, SendStream, presets};
use iroh::protocol::{AcceptError, ProtocolHandler, Router};
use iroh::{Endpoint, RelayMode, SecretKey};
use tern_protocol::{PeerId, pb};
use tern_transport_grpc::services::raft_server::{Raft, RaftServer};
use tern_transport_grpc::tls::TlsIdentity;

/// ALPN of the raw iroh baseline.
pub const RAW_ALPN: &[u8] = b"tern/bench-raw/0";
/// Largest message either raw baseline accepts: the largest bulk chunk the
/// bench sends, with room for framing.
pub const RAW_MAX: usize = 17 << 20;
/// ALPN of the raw iroh stream baseline.
pub const RAW_STREAM_ALPN: &[u8] = b"tern/bench-raw-stream/0";
/// Raw iroh messages up to this size are echoed; larger ones are answered
/// with their length (8 bytes, LE), as `Raft/Snapshot` answers a chunk.
pub const RAW_ECHO_MAX: usize = 4096;

/// The raw iroh baseline: read the stream to its end, answer, finish.
/// Served from the first packet, early data included (a baseline has no
/// state to protect, so it answers every stream at once: what iroh can
/// do at best).
#[derive(Debug, Clone)]
pub struct RawEcho;

impl ProtocolHandler for RawEcho {
    async fn on_accepting(&self, accepting: Accepting) -> Result<Connection, AcceptError> {
        let conn = accepting.into_0rtt();
        echo_streams(&conn).await;
        tokio::select! {
            biased;
            reason = conn.closed() => Err(reason.into()),
            done = conn.handshake_completed() => Ok(done?),
        }
    }

    async fn accept(&self, _conn: Connection) -> Result<(), AcceptError> {
        Ok(())
    }
}

async fn echo_streams<S: ConnectionState>(conn: &iroh::endpoint::Connection<S>) {
    {
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            tokio::spawn(async move {
                let Ok(data) = recv.read_to_end(RAW_MAX).await else {
                    return;
                };
                let answer = if data.len() <= RAW_ECHO_MAX {
                    Bytes::from(data)
                } else {
                    Bytes::copy_from_slice(&(data.len() as u64).to_le_bytes())
                };
                let _ = send.write_chunk(answer).await;
                let _ = send.finish();
                let _ = send.stopped().await;
            });
        }
    }
}

/// Reads one length-prefixed message of the raw stream baseline.
pub async fn raw_stream_read(recv: &mut RecvStream) -> anyhow::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    anyhow::ensure!(
        len <= RAW_MAX,
        "raw message of {len} bytes, above {RAW_MAX}"
    );
    let mut data = vec![0u8; len];
    recv.read_exact(&mut data).await?;
    Ok(data)
}

/// Writes one length-prefixed message of the raw stream baseline.
pub async fn raw_stream_write(send: &mut SendStream, message: Bytes) -> anyhow::Result<()> {
    let len = u32::try_from(message.len())?.to_le_bytes();
    send.write_all_chunks(&mut [Bytes::copy_from_slice(&len), message])
        .await?;
    Ok(())
}

/// The raw iroh stream baseline: echo length-prefixed messages.
#[derive(Debug, Clone)]
pub struct RawStreamEcho;

impl ProtocolHandler for RawStreamEcho {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            tokio::spawn(async move {
                while let Ok(data) = raw_stream_read(&mut recv).await {
                    if raw_stream_write(&mut send, Bytes::from(data))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
        Ok(())
    }
}

/// A bare iroh endpoint on 127.0.0.1 (free port), no relay, with `key` as
/// identity (a random one when `None`). Its QUIC settings (windows,
/// streams, idle timeout) are exactly our transport's
/// ([`tern_transport_iroh::transport::quic_config`] of the default
/// limits), so the baseline differs from ours only by what our layer
/// adds, not by the QUIC library's default windows.
pub async fn raw_endpoint(key: Option<[u8; 32]>) -> anyhow::Result<Endpoint> {
    let quic = tern_transport_iroh::transport::quic_config(
        &tern_transport_iroh::TransportLimits::default(),
    )
    .context("the raw iroh endpoint's QUIC settings")?;
    let mut builder = Endpoint::builder(presets::Minimal)
        .transport_config(quic)
        .relay_mode(RelayMode::Disabled)
        .clear_ip_transports()
        .bind_addr("127.0.0.1:0")
        .context("the raw iroh endpoint's bind address")?;
    if let Some(key) = key {
        builder = builder.secret_key(SecretKey::from_bytes(&key));
    }
    builder.bind().await.context("binding a raw iroh endpoint")
}

/// Starts the raw iroh echo server; returns its router (shut it down to
/// stop), its endpoint id and its socket address.
pub async fn raw_iroh_server(key: [u8; 32]) -> anyhow::Result<(Router, [u8; 32], SocketAddr)> {
    let endpoint = raw_endpoint(Some(key)).await?;
    let socket = *endpoint
        .bound_sockets()
        .first()
        .context("the raw iroh endpoint reports no bound socket")?;
    let id = *endpoint.id().as_bytes();
    let router = Router::builder(endpoint).accept(RAW_ALPN, RawEcho).spawn();
    Ok((router, id, socket))
}

/// One raw iroh call: `data` on a fresh bi-stream of `conn`, the answer.
pub async fn raw_iroh_call<S: ConnectionState>(
    conn: &iroh::endpoint::Connection<S>,
    data: Bytes,
) -> anyhow::Result<Vec<u8>> {
    let (mut send, mut recv) = conn.open_bi().await.context("opening a stream")?;
    send.write_chunk(data)
        .await
        .context("writing the request")?;
    send.finish().context("finishing the request")?;
    recv.read_to_end(RAW_MAX)
        .await
        .context("reading the answer")
}

/// The raw gRPC baseline: tonic's generated Raft service, answering
/// directly (`AppendEntries` and `Propose` echo, `Vote` answers empty,
/// `Snapshot` answers the chunk's length).
#[derive(Debug, Clone, Copy)]
pub struct RawRaft;

#[tonic::async_trait]
impl Raft for RawRaft {
    async fn vote(
        &self,
        _request: tonic::Request<pb::RaftPayload>,
    ) -> Result<tonic::Response<pb::RaftPayload>, tonic::Status> {
        Ok(tonic::Response::new(pb::RaftPayload::default()))
    }

    async fn append_entries(
        &self,
        request: tonic::Request<pb::RaftPayload>,
    ) -> Result<tonic::Response<pb::RaftPayload>, tonic::Status> {
        Ok(tonic::Response::new(request.into_inner()))
    }

    async fn snapshot(
        &self,
        request: tonic::Request<pb::SnapshotChunk>,
    ) -> Result<tonic::Response<pb::RaftPayload>, tonic::Status> {
        let len = request.into_inner().data.len() as u64;
        Ok(tonic::Response::new(pb::RaftPayload {
            data: Bytes::copy_from_slice(&len.to_le_bytes()),
        }))
    }

    async fn propose(
        &self,
        request: tonic::Request<pb::RaftPayload>,
    ) -> Result<tonic::Response<pb::RaftPayload>, tonic::Status> {
        Ok(tonic::Response::new(request.into_inner()))
    }

    type AppendStreamStream = tonic::Streaming<pb::RaftPayload>;

    /// Echoes every message of the stream back, in order.
    async fn append_stream(
        &self,
        request: tonic::Request<tonic::Streaming<pb::RaftPayload>>,
    ) -> Result<tonic::Response<Self::AppendStreamStream>, tonic::Status> {
        Ok(tonic::Response::new(request.into_inner()))
    }
}

/// Starts the raw gRPC server on 127.0.0.1 (free port, `TCP_NODELAY` on
/// every connection, as tonic's own clients set), TLS with a certificate
/// bound to `key`; returns its URL and id. It runs until the runtime stops.
pub async fn raw_grpc_server(key: [u8; 32]) -> anyhow::Result<(String, PeerId)> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .context("binding the raw gRPC listener")?;
    let url = format!("https://{}", listener.local_addr()?);
    let identity = TlsIdentity::new(&key)?;
    let id = identity.id();
    let incoming = tern_transport_grpc::baseline::incoming(listener, &identity)?;
    let service = RaftServer::new(RawRaft)
        .max_decoding_message_size(RAW_MAX)
        .max_encoding_message_size(RAW_MAX);
    tokio::spawn(async move {
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await
        {
            tracing::error!("raw gRPC server stopped: {e}");
        }
    });
    Ok((url, id))
}

/// A raw tonic client of the raw gRPC server at `url` (`https://IP:PORT`)
/// whose id is `id`, presenting a fresh key, as our client does.
pub async fn raw_grpc_channel(url: &str, id: PeerId) -> anyhow::Result<tonic::transport::Channel> {
    tern_transport_grpc::client::check_url(url)
        .map_err(|why| anyhow::anyhow!("raw gRPC URL {why}"))?;
    let addr: SocketAddr = url
        .trim_start_matches("https://")
        .parse()
        .with_context(|| format!("the raw gRPC URL {url:?}"))?;
    let identity = TlsIdentity::new(&rand::random())?;
    tern_transport_grpc::baseline::channel(addr, &identity, id)
        .await
        .map_err(|e| anyhow::anyhow!("connecting to the raw gRPC server {url}: {e}"))
}
