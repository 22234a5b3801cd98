//! TLS-over-TCP connections as both ends see them: counted in the
//! connection gauge, timed when dialled, held under the server's limits
//! (in total, per remote IP, per peer id), and (on the serving side)
//! closable one by one (idle anonymous connections) or all at once when a
//! graceful shutdown's drain deadline passes.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Instant;

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};

use futures::task::AtomicWaker;
use hyper_util::rt::TokioIo;
use tern_protocol::PeerId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tonic::transport::server::Connected;

use crate::metrics::{self, ConnectionGauge};
use crate::tls;

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

impl ConnKill {
    /// Aborts this connection alone.
    pub(crate) fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        self.read.wake();
        self.write.wake();
    }

    /// Whether the connection was aborted.
    pub(crate) fn is_killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }
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
            conn.kill();
        }
    }
}

fn aborted() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "closed by the server (drain deadline passed, or an idle anonymous connection)",
    )
}

/// Counts of open connections per key (remote IP, peer id), each under a
/// cap; a [`CountGuard`] holds one place and frees it on drop.
#[derive(Debug)]
pub(crate) struct Counts<K: Eq + Hash + Copy> {
    cap: usize,
    open: Mutex<HashMap<K, usize>>,
}

impl<K: Eq + Hash + Copy + Send + std::fmt::Debug + 'static> Counts<K> {
    pub(crate) fn new(cap: usize) -> Arc<Counts<K>> {
        Arc::new(Counts {
            cap,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// Takes a place for `key`, or `None` when `key` is at the cap.
    pub(crate) fn try_take(self: &Arc<Self>, key: K) -> Option<CountGuard<K>> {
        let mut open = self.open.lock().ok()?;
        let n = open.entry(key).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(CountGuard {
            counts: self.clone(),
            key,
        })
    }

    /// Open connections of `key`.
    #[cfg(test)]
    pub(crate) fn get(&self, key: K) -> usize {
        self.open
            .lock()
            .map(|o| o.get(&key).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

/// One place under a [`Counts`] cap.
#[derive(Debug)]
pub(crate) struct CountGuard<K: Eq + Hash + Copy> {
    counts: Arc<Counts<K>>,
    key: K,
}

impl<K: Eq + Hash + Copy> Drop for CountGuard<K> {
    fn drop(&mut self) {
        if let Ok(mut open) = self.counts.open.lock()
            && let Some(n) = open.get_mut(&self.key)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// What a request learns of the connection it came on (tonic puts it in
/// every request's extensions): where from, and which node the TLS
/// handshake proved, if any.
#[derive(Debug, Clone)]
pub(crate) struct ConnInfo {
    /// The remote socket address.
    pub(crate) remote: Option<SocketAddr>,
    /// The node the client certificate proved; `None` for a caller that
    /// presented no certificate (a stock tool).
    pub(crate) peer: Option<PeerId>,
    /// Requests in flight and the time of the last one, for the idle bound
    /// of anonymous connections (not kept for a node's connections).
    pub(crate) activity: Arc<Activity>,
}

/// Requests in flight on a connection and when the last one started.
#[derive(Debug)]
pub(crate) struct Activity {
    in_flight: std::sync::atomic::AtomicUsize,
    last: Mutex<Instant>,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
        }
    }

    /// Marks a request as started; the guard marks it finished.
    pub(crate) fn start(self: &Arc<Self>) -> ActivityGuard {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut last) = self.last.lock() {
            *last = Instant::now();
        }
        ActivityGuard(self.clone())
    }

    /// Whether no request is in flight and none started within `bound`.
    pub(crate) fn idle_longer_than(&self, bound: std::time::Duration) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0
            && self
                .last
                .lock()
                .map(|l| l.elapsed() > bound)
                .unwrap_or(false)
    }
}

/// A request in flight on a connection.
#[derive(Debug)]
pub(crate) struct ActivityGuard(Arc<Activity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        if let Ok(mut last) = self.0.last.lock() {
            *last = Instant::now();
        }
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An accepted, handshaken connection.
#[derive(Debug)]
pub(crate) struct ServerConn {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    info: ConnInfo,
    kill: Arc<ConnKill>,
    _gauge: ConnectionGauge,
    /// Its place under the server's connection limit, freed on close.
    _slot: OwnedSemaphorePermit,
    _per_ip: CountGuard<IpAddr>,
    _per_peer: Option<CountGuard<PeerId>>,
}

/// The places a connection holds under the server's limits.
#[derive(Debug)]
pub(crate) struct Places {
    pub(crate) slot: OwnedSemaphorePermit,
    pub(crate) per_ip: CountGuard<IpAddr>,
    pub(crate) per_peer: Option<CountGuard<PeerId>>,
}

impl ServerConn {
    pub(crate) fn new(
        stream: tokio_rustls::server::TlsStream<TcpStream>,
        peer: Option<PeerId>,
        switch: &KillSwitch,
        places: Places,
    ) -> ServerConn {
        let remote = stream.get_ref().0.peer_addr().ok();
        ServerConn {
            stream,
            info: ConnInfo {
                remote,
                peer,
                activity: Arc::new(Activity::new()),
            },
            kill: switch.register(),
            _gauge: ConnectionGauge::open(),
            _slot: places.slot,
            _per_ip: places.per_ip,
            _per_peer: places.per_peer,
        }
    }

    /// The handle that aborts this connection alone.
    pub(crate) fn kill_handle(&self) -> Arc<ConnKill> {
        self.kill.clone()
    }

    /// What requests on it will see.
    pub(crate) fn info(&self) -> &ConnInfo {
        &self.info
    }
}

impl Connected for ServerConn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
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
    stream: tokio_rustls::client::TlsStream<TcpStream>,
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
/// name moves is followed) and runs the TLS handshake that must prove the
/// expected node, timing both and counting the connection while it lives.
#[derive(Clone)]
pub(crate) struct Connector {
    pub(crate) target: Arc<str>,
    /// The client configuration pinned to the expected node.
    pub(crate) tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// Longest a client waits for the TLS handshake after the TCP connect.
pub(crate) const CLIENT_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl tower::Service<http::Uri> for Connector {
    type Response = TokioIo<ClientConn>;
    type Error = tonic::ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let target = self.target.clone();
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        Box::pin(async move {
            let started = Instant::now();
            let stream = match TcpStream::connect(&*target).await {
                Ok(stream) => stream,
                Err(e) => {
                    metrics::connect_failed();
                    return Err(tonic::ConnectError(Box::new(e)));
                }
            };
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "could not set TCP_NODELAY");
            }
            let name = rustls::pki_types::ServerName::try_from(tls::SERVER_NAME)
                .map_err(|e| tonic::ConnectError(Box::new(e)))?;
            let handshake = connector.connect(name, stream);
            match tokio::time::timeout(CLIENT_HANDSHAKE_TIMEOUT, handshake).await {
                Ok(Ok(stream)) => {
                    metrics::connected(started.elapsed());
                    Ok(TokioIo::new(ClientConn {
                        stream,
                        _gauge: ConnectionGauge::open(),
                    }))
                }
                Ok(Err(e)) => {
                    metrics::connect_failed();
                    match tls::find_wrong_peer(&e) {
                        Some(wrong) => {
                            metrics::auth_failed(metrics::AuthReason::WrongPeer);
                            Err(tonic::ConnectError(Box::new(wrong)))
                        }
                        None => {
                            metrics::auth_failed(metrics::AuthReason::Handshake);
                            Err(tonic::ConnectError(Box::new(HandshakeFailed(e))))
                        }
                    }
                }
                Err(_) => {
                    metrics::connect_failed();
                    metrics::auth_failed(metrics::AuthReason::HandshakeTimeout);
                    Err(tonic::ConnectError(Box::new(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "TLS handshake with {target} took over {CLIENT_HANDSHAKE_TIMEOUT:?}"
                        ),
                    ))))
                }
            }
        })
    }
}

/// The TLS handshake with a peer failed (not a wrong identity: a broken or
/// hostile connection, or a peer that does not speak Tern's TLS).
#[derive(Debug, thiserror::Error)]
#[error("TLS handshake failed: {0}")]
pub(crate) struct HandshakeFailed(#[source] pub(crate) io::Error);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_cap_each_key_and_free_on_drop() {
        let counts = Counts::<u8>::new(2);
        let a = counts.try_take(1).unwrap();
        let b = counts.try_take(1).unwrap();
        assert!(counts.try_take(1).is_none(), "the third place for one key");
        let other = counts.try_take(2).unwrap();
        assert_eq!(counts.get(1), 2);
        drop(a);
        assert_eq!(counts.get(1), 1);
        assert!(counts.try_take(1).is_some());
        drop((b, other));
        assert_eq!(counts.get(2), 0);
    }
}
