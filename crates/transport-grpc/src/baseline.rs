//! The raw tonic baseline's TLS: the same rustls configurations as the
//! transport (TLS 1.3, node-key certificates, client certificates), with
//! none of the transport's limits, pooling, lanes or error mapping, so the
//! benches compare like with like (`cargo xtask bench`: "raw tonic" beside
//! our gRPC transport).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use hyper_util::rt::TokioIo;
use tern_protocol::PeerId;
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::{Channel, Endpoint};

use crate::tls::{self, TlsIdentity};

/// An accepted TLS connection that tonic can serve.
#[derive(Debug)]
pub struct TlsConn(tokio_rustls::server::TlsStream<TcpStream>);

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

impl tokio::io::AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Accepted connections of `listener`, each through a TLS handshake as
/// the transport's server does it (failed handshakes are skipped).
pub fn incoming(
    listener: TcpListener,
    identity: &TlsIdentity,
) -> Result<impl Stream<Item = std::io::Result<TlsConn>> + use<>, tls::ConfigError> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls::server_config(identity)?));
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(stream).await {
                    let _ = tx.send(Ok(TlsConn(tls))).await;
                }
            });
        }
    });
    Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// Why the raw baseline's channel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The TLS client configuration could not be built.
    #[error("the raw baseline's TLS client configuration: {0}")]
    Tls(#[source] tls::ConfigError),
    /// tonic refused the endpoint or could not connect to it.
    #[error("connecting the raw baseline's channel to {addr}: {source}; is its server running?")]
    Connect {
        /// The server's address.
        addr: std::net::SocketAddr,
        /// tonic's error.
        source: tonic::transport::Error,
    },
}

/// A tonic channel to `addr` over TLS as the transport's client dials it:
/// presenting `identity`, accepting only `expected`.
pub async fn channel(
    addr: std::net::SocketAddr,
    identity: &TlsIdentity,
    expected: PeerId,
) -> Result<Channel, ChannelError> {
    let config = tls::client_config(identity, expected).map_err(ChannelError::Tls)?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let connect = |source| ChannelError::Connect { addr, source };
    Endpoint::from_shared(format!("http://{addr}"))
        .map_err(connect)?
        .tcp_nodelay(true)
        .connect_with_connector(tower::service_fn(move |_uri| {
            let connector = connector.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let name = rustls::pki_types::ServerName::try_from(tls::SERVER_NAME)
                    .map_err(std::io::Error::other)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(connect)
}
