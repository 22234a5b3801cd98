//! TCP connections as both ends see them: counted in the connection gauge,
//! timed when dialled, and (on the serving side) closable all at once when a
//! graceful shutdown's drain deadline passes.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Instant;

use futures::task::AtomicWaker;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::metrics::{self, ConnectionGauge};

/// A switch that aborts every registered connection at once.
#[derive(Debug, Default)]
pub(crate) struct KillSwitch {
    killed: AtomicBool,
    connections: Mutex<Vec<Weak<ConnKill>>>,
}

/// One connection's share of the [`KillSwitch`].
#[derive(Debug, Default)]
pub(crate) struct ConnKill {
    killed: AtomicBool,
    read: AtomicWaker,
    write: AtomicWaker,
}

/// Pruning threshold: the registry drops entries of closed connections when
/// it grows past this many, so it stays proportional to open connections.
const KILL_REGISTRY_PRUNE_AT: usize = 1024;

impl KillSwitch {
    fn register(&self) -> Arc<ConnKill> {
        let conn = Arc::new(ConnKill::default());
        if self.killed.load(Ordering::SeqCst) {
            conn.killed.store(true, Ordering::SeqCst);
        }
        if let Ok(mut list) = self.connections.lock() {
            if list.len() >= KILL_REGISTRY_PRUNE_AT {
                list.retain(|w| w.strong_count() > 0);
            }
            list.push(Arc::downgrade(&conn));
        }
        conn
    }

    /// Aborts every connection registered so far and any registered later.
    pub(crate) fn kill_all(&self) {
        self.killed.store(true, Ordering::SeqCst);
        let list = match self.connections.lock() {
            Ok(mut list) => std::mem::take(&mut *list),
            Err(_) => return,
        };
        for conn in list.iter().filter_map(Weak::upgrade) {
            conn.killed.store(true, Ordering::SeqCst);
            conn.read.wake();
            conn.write.wake();
        }
    }
}

fn aborted() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "closed: the drain deadline of a graceful shutdown passed",
    )
}

/// An accepted connection.
#[derive(Debug)]
pub(crate) struct ServerConn {
    stream: TcpStream,
    kill: Arc<ConnKill>,
    _gauge: ConnectionGauge,
    /// Its place under the server's connection limit, freed on close.
    _slot: OwnedSemaphorePermit,
}

impl ServerConn {
    pub(crate) fn new(
        stream: TcpStream,
        switch: &KillSwitch,
        slot: OwnedSemaphorePermit,
    ) -> ServerConn {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY on an accepted connection");
        }
        ServerConn {
            stream,
            kill: switch.register(),
            _gauge: ConnectionGauge::open(),
            _slot: slot,
        }
    }
}

impl Connected for ServerConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for ServerConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.kill.read.register(cx.waker());
        if self.kill.killed.load(Ordering::SeqCst) {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ServerConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.kill.write.register(cx.waker());
        if self.kill.killed.load(Ordering::SeqCst) {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.kill.write.register(cx.waker());
        if self.kill.killed.load(Ordering::SeqCst) {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// An outbound connection, counted while it lives.
#[derive(Debug)]
pub(crate) struct ClientConn {
    stream: TcpStream,
    _gauge: ConnectionGauge,
}

impl AsyncRead for ClientConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Dials one peer's `host:port` (resolved at each dial, so a peer whose
/// name moves is followed), timing the TCP handshake and counting the
/// connection while it lives.
#[derive(Debug, Clone)]
pub(crate) struct Connector {
    pub(crate) target: Arc<str>,
}

impl tower::Service<http::Uri> for Connector {
    type Response = TokioIo<ClientConn>;
    type Error = tonic::ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let target = self.target.clone();
        Box::pin(async move {
            let started = Instant::now();
            match TcpStream::connect(&*target).await {
                Ok(stream) => {
                    metrics::connected(started.elapsed());
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "could not set TCP_NODELAY");
                    }
                    Ok(TokioIo::new(ClientConn {
                        stream,
                        _gauge: ConnectionGauge::open(),
                    }))
                }
                Err(e) => {
                    metrics::connect_failed();
                    Err(tonic::ConnectError(Box::new(e)))
                }
            }
        })
    }
}
