//! The calling side: [`IrohClient`], the iroh [`RpcClient`].
//!
//! - **Pooling.** Per peer, one connection shared by the control,
//!   replication and normal lanes, and a second one for the bulk lane
//!   alone, each shared by every caller of its lanes. Bulk gets its own
//!   connection because QUIC stream priorities only order the data a
//!   connection has not sent yet: once bulk data fills the connection's
//!   congestion window, a control call waits for acknowledgements behind
//!   it (measured: milliseconds, against a fraction of one on gRPC, which
//!   also keeps bulk on its own HTTP/2 connection). Its own connection has
//!   its own congestion window. Each is dialled lazily by the first call (by `EndpointId` plus the direct
//!   addresses and relay in [`PeerAddr::iroh`], or this node's own relay
//!   when the address names none); concurrent first calls
//!   wait for that one dial. A connection found closed is dropped and the
//!   next call dials again.
//! - **Addresses move.** A pooled connection remembers the direct
//!   addresses it was dialled with. A call naming other addresses for the
//!   peer (the membership recorded the peer's new ones after it moved)
//!   dials again at once, without waiting out a backoff, and the new
//!   connection replaces the old in the pool; calls already on the old one
//!   finish there. QUIC migrates only the dialling side, so a connection
//!   this node dialled to a peer that moved is dead however long it is
//!   kept. Every address a call names is also given to the endpoint's
//!   address lookup (`MemoryLookup`), so that iroh's own path discovery on
//!   live connections uses the newest too.
//! - **0-RTT.** A read-only unary call that finds no pooled connection
//!   and dials one to a peer this endpoint holds a session ticket for is
//!   sent in the handshake's first flight (0-RTT early data) and answered
//!   within one round trip; if the peer refuses the early data, it is sent
//!   again on the finished connection. Other calls that arrive meanwhile
//!   wait for the handshake, as for any dial. See the crate docs.
//! - **Backoff.** After a failed dial the next one waits
//!   [`crate::backoff::delay`] (exponential, jittered, capped); callers wait
//!   within their own deadline.
//! - **Lanes.** Each peer has one bounded lane per priority class: a
//!   semaphore of in-flight calls and a bounded count of waiting ones. A
//!   lane's calls never wait for another lane's slots, and their streams
//!   carry the lane's QUIC send priority, so control data is sent before
//!   bulk data buffered on the same connection.
//! - **Deadlines.** `call.timeout` bounds the whole call, dial included.
//! - **Delivery.** Every failure before the first byte of the request is
//!   written is `NotDelivered`; after, `MayHaveBeenDelivered`, unless the
//!   peer proved otherwise (a stream reset with "shutting down", "malformed"
//!   or "too large" means the request did not run).
//! - **One retry for idempotent calls.** An idempotent method's call whose
//!   connection is lost before the answer (`ConnectionLost`: the peer's
//!   endpoint died and was rebuilt, see [`crate::supervisor`], or a path
//!   went away) is sent once more on a newly dialled connection, within
//!   the same deadline. Nothing else is retried here: a mutation that may
//!   have run is the caller's (the dual router's) to decide.
//! - **Silent connections.** A ping that goes unanswered within its
//!   timeout closes the pooled connection it rode on (code
//!   [`CLOSE_PATH_SILENT`]), so the next call dials again instead of
//!   waiting for the QUIC idle timeout on a peer whose endpoint was
//!   rebuilt; the dual router's path check pings exactly when a call is
//!   slow.
//! - **Cancellation.** Dropping a call resets its stream and stops reading
//!   it; the server drops the service's work.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use iroh::address_lookup::memory::MemoryLookup;
use iroh::endpoint::{
    ConnectError, ConnectWithOptsError, ConnectingError, Connection, ConnectionError,
    ConnectionState, OutgoingZeroRttConnection, ReadError, RecvStream, SendStream, VarInt,
    WriteError, ZeroRttStatus,
};
use iroh::{Endpoint, EndpointAddr, PublicKey, RelayUrl};
use tern_protocol::catalog::ServiceId;
use tern_protocol::frame::Limits;
use tern_protocol::stream::{StreamEvent, StreamRules, StreamSide};
use tern_protocol::{
    BoxFuture, Call, CallError, CallStream, Delivery, Frame, FrameKind, Header, MethodKind,
    PeerAddr, PeerId, Priority, RpcClient, Status, StreamCall, TransportError, TransportErrorKind,
    TransportKind,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::debug;

use crate::backoff;
use crate::config::TransportLimits;
use crate::metrics::{self, EarlyData, Outcome, Side};
use crate::path_select::{LIVENESS_TICK, Liveness};
use crate::transport::{Tracker, TrackerGuard};
use crate::wire::{
    self, CLOSE_ENDPOINT_REBUILT, CLOSE_PATH_SILENT, CLOSE_SHUTTING_DOWN, ReadFrameError,
    STREAM_CANCELLED, STREAM_DEADLINE_EXCEEDED, STREAM_IDLE, STREAM_MALFORMED,
    STREAM_SHUTTING_DOWN, STREAM_TOO_LARGE,
};

/// Size of a ping's payload: the request id, echoed by the pong.
const PING_PAYLOAD: usize = 8;

fn error(
    kind: TransportErrorKind,
    delivery: Delivery,
    detail: impl Into<String>,
) -> TransportError {
    TransportError::new(TransportKind::Iroh, kind, delivery, detail)
}

/// The iroh [`RpcClient`]; see the module docs for what it guarantees.
#[derive(Debug)]
pub struct IrohClient {
    endpoint: RwLock<Option<Endpoint>>,
    frame_limits: Limits,
    limits: TransportLimits,
    peers: Mutex<HashMap<PeerId, Arc<Peer>>>,
    closed: Arc<AtomicBool>,
    calls: Arc<Tracker>,
    next_request_id: AtomicU64,
    /// This node's own relay, tried for a peer whose address names no
    /// relay (a join seed, a CLI target): a peer behind NAT with no
    /// reachable direct address is still found there.
    default_relay: Option<RelayUrl>,
    /// The endpoint's address lookup, fed with every address a call names.
    lookup: MemoryLookup,
    /// When the paths of the connections this client dialled last heard
    /// from their peer (read by the endpoint's path selector).
    liveness: Arc<Liveness>,
    /// Woken when a dial fails or a call times out: the endpoint's
    /// supervisor probes the endpoint at once instead of at its next tick
    /// (see [`crate::supervisor`]). A hint, never a verdict.
    suspect: Arc<tokio::sync::Notify>,
}

/// What the client keeps per peer.
#[derive(Debug)]
struct Peer {
    lanes: [Lane; 4],
    /// The pooled connections: [`SHARED_POOL`] for the control,
    /// replication and normal lanes, [`BULK_POOL`] for the bulk lane.
    pools: [Pooled; 2],
}

/// Index in [`Peer::pools`] of the connection the control, replication and
/// normal lanes share.
const SHARED_POOL: usize = 0;
/// Index in [`Peer::pools`] of the bulk lane's own connection.
const BULK_POOL: usize = 1;

/// The pool a lane's calls use.
fn pool_of(priority: Priority) -> usize {
    match priority {
        Priority::Bulk => BULK_POOL,
        Priority::Control | Priority::Replication | Priority::Normal => SHARED_POOL,
    }
}

/// One pooled connection to a peer.
#[derive(Debug, Default)]
struct Pooled {
    /// The connection, read by every call without waiting (the fast path);
    /// written only under `slot`. Behind an `Arc`: cloning iroh's
    /// `Connection` copies its ALPN into a new `Vec`, an allocation per
    /// call.
    current: Mutex<Option<Arc<Connection>>>,
    /// The direct addresses `current` was dialled with, sorted: a call
    /// naming others takes the slow path, which dials them.
    dialled: Mutex<Vec<std::net::SocketAddr>>,
    /// Serialises dials: concurrent first calls wait for one dial.
    slot: tokio::sync::Mutex<Slot>,
}

/// The direct addresses `addr` names, sorted and deduplicated (the form
/// pooled connections remember).
fn direct_addrs(addr: &PeerAddr) -> Vec<std::net::SocketAddr> {
    let mut direct = addr
        .iroh
        .as_ref()
        .map(|i| i.direct.clone())
        .unwrap_or_default();
    direct.sort_unstable();
    direct.dedup();
    direct
}

/// Whether `dialled` (sorted, deduplicated) are the direct addresses
/// `addr` names, without allocating when `addr` lists them sorted and
/// deduplicated already (the membership's form; this runs on every call).
fn same_addrs(dialled: &[std::net::SocketAddr], addr: &PeerAddr) -> bool {
    let named = addr
        .iroh
        .as_ref()
        .map(|i| i.direct.as_slice())
        .unwrap_or_default();
    if named.windows(2).all(|w| w[0] < w[1]) {
        return dialled == named;
    }
    dialled == direct_addrs(addr).as_slice()
}

impl Pooled {
    fn open_connection(&self, addr: &PeerAddr) -> Option<Arc<Connection>> {
        if !same_addrs(&self.dialled.lock().ok()?, addr) {
            return None;
        }
        let current = self.current.lock().ok()?;
        current
            .as_ref()
            .filter(|conn| conn.close_reason().is_none())
            .cloned()
    }

    /// The pooled connection, if open, whatever addresses it was dialled
    /// with.
    fn current_connection(&self) -> Option<Arc<Connection>> {
        let current = self.current.lock().ok()?;
        current
            .as_ref()
            .filter(|conn| conn.close_reason().is_none())
            .cloned()
    }

    /// Closes `conn` if it is still this pool's connection: a ping on it
    /// went unanswered, so the next call dials again (a peer whose
    /// endpoint was rebuilt answers a new dial at once, while the old
    /// connection would stay silent until the QUIC idle timeout).
    fn forget_silent(&self, conn: &Connection, peer: &PeerId) {
        let current = self.current_connection();
        if current.is_some_and(|c| c.stable_id() == conn.stable_id()) {
            debug!(peer = %peer.short(), "a ping on the pooled connection went unanswered; closing it so the next call dials again");
            conn.close(CLOSE_PATH_SILENT, b"ping unanswered");
        }
    }

    fn set_current(&self, conn: Option<Arc<Connection>>, dialled: &[std::net::SocketAddr]) {
        if let Ok(mut current) = self.current.lock() {
            *current = conn;
        }
        if let Ok(mut d) = self.dialled.lock() {
            dialled.clone_into(&mut d);
        }
    }
}

/// The pooled connection to a peer and its dial history.
#[derive(Debug, Default)]
struct Slot {
    conn: Option<Arc<Connection>>,
    /// The direct addresses `conn` was dialled with, sorted.
    dialled: Vec<std::net::SocketAddr>,
    /// Consecutive failed dials.
    failures: u32,
    /// No dial before this instant (backoff).
    retry_at: Option<tokio::time::Instant>,
    /// A connection existed before: the next dial is a re-dial.
    had_connection: bool,
}

/// One priority lane to one peer.
#[derive(Debug)]
struct Lane {
    priority: Priority,
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
}

impl Lane {
    async fn acquire(&self, max_waiting: usize) -> Result<OwnedSemaphorePermit, TransportError> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= max_waiting {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(error(
                TransportErrorKind::Overloaded,
                Delivery::NotDelivered,
                format!(
                    "{} lane to this peer has {max_waiting} calls waiting already",
                    self.priority.as_str()
                ),
            ));
        }
        metrics::queue_depth(self.priority.as_str(), 1.0);
        let _waiting = Waiting(self);
        self.permits.clone().acquire_owned().await.map_err(|_| {
            error(
                TransportErrorKind::LocalShutdown,
                Delivery::NotDelivered,
                "client closed",
            )
        })
    }
}

/// Counts a caller waiting for a lane slot, however the wait ends.
struct Waiting<'a>(&'a Lane);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
        metrics::queue_depth(self.0.priority.as_str(), -1.0);
    }
}

/// A call's streams: dropped before the call finished (cancelled, timed
/// out), it resets the request side and stops the response side, which
/// the server sees as "the caller abandoned the call".
struct CallStreams {
    send: SendStream,
    recv: RecvStream,
    done: bool,
}

impl Drop for CallStreams {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.send.reset(STREAM_CANCELLED);
            let _ = self.recv.stop(STREAM_CANCELLED);
        }
    }
}

/// A request written on its own stream (finished if the write went
/// through); its answer is still to be read. A read-only call sent in
/// 0-RTT early data comes back from the dial as one.
struct Written {
    streams: CallStreams,
    written: Result<(), WriteError>,
}

/// Opens a stream on `conn` with the frame's lane priority and writes
/// `frame` on it. `sent`, if given, is set just before the first byte may
/// leave (it decides delivery if the caller's deadline cuts the call).
async fn write_request<S: ConnectionState>(
    conn: &iroh::endpoint::Connection<S>,
    frame: &Frame,
    sent: Option<&AtomicBool>,
) -> Result<Written, ConnectionError> {
    let (send, recv) = conn.open_bi().await?;
    let mut streams = CallStreams {
        send,
        recv,
        done: false,
    };
    let _ = streams
        .send
        .set_priority(wire::quic_priority(frame.header.priority));
    if let Some(sent) = sent {
        sent.store(true, Ordering::SeqCst);
    }
    let written = wire::write_frame(&mut streams.send, frame).await.map(|()| {
        let _ = streams.send.finish();
    });
    Ok(Written { streams, written })
}

/// A read-only call that may go in early data: its request frame (with
/// its request id) and the flag recording that it may have left.
#[derive(Clone, Copy)]
struct EarlyRequest<'a> {
    frame: &'a Frame,
    sent: &'a AtomicBool,
}

impl IrohClient {
    pub(crate) fn new(
        endpoint: Endpoint,
        frame_limits: Limits,
        limits: TransportLimits,
        default_relay: Option<RelayUrl>,
        lookup: MemoryLookup,
        liveness: Arc<Liveness>,
    ) -> Self {
        IrohClient {
            default_relay,
            lookup,
            liveness,
            endpoint: RwLock::new(Some(endpoint)),
            frame_limits,
            limits,
            peers: Mutex::new(HashMap::new()),
            closed: Arc::new(AtomicBool::new(false)),
            calls: Arc::new(Tracker::default()),
            next_request_id: AtomicU64::new(1),
            suspect: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// The hint the client gives when a dial fails or a call times out.
    /// The address lookup this client feeds (a rebuilt endpoint gets it).
    pub(crate) fn lookup(&self) -> &MemoryLookup {
        &self.lookup
    }

    /// The path liveness this client samples (a rebuilt endpoint's path
    /// selector reads it).
    pub(crate) fn liveness(&self) -> &Arc<Liveness> {
        &self.liveness
    }

    pub(crate) fn suspect(&self) -> Arc<tokio::sync::Notify> {
        self.suspect.clone()
    }

    /// Moves the client to a rebuilt endpoint: every pooled connection
    /// (they lived on the old endpoint) is closed, so calls on them fail at
    /// once instead of waiting for their deadline, and the dial backoff is
    /// forgotten, so the next call dials on `endpoint` straight away.
    /// Lanes and their waiting calls are kept.
    pub(crate) fn replace_endpoint(&self, endpoint: Endpoint) {
        if let Ok(mut current) = self.endpoint.write()
            && current.is_some()
        {
            *current = Some(endpoint);
        }
        self.drop_connections();
    }

    /// Closes every pooled connection and forgets the dial backoff; the
    /// peers (and the session tickets the endpoint holds for them) stay
    /// known, so the next call to each peer dials again and resumes its
    /// TLS session, a read-only first call in 0-RTT early data. For
    /// measuring connection set-up, and for tests.
    pub fn close_pooled_connections(&self) {
        self.close_pooled(VarInt::from_u32(0), b"closed by the caller");
    }

    /// Closes every pooled connection (code [`CLOSE_ENDPOINT_REBUILT`]) and
    /// resets each pool's dial history; the peers stay known.
    pub(crate) fn drop_connections(&self) {
        self.close_pooled(CLOSE_ENDPOINT_REBUILT, b"endpoint rebuilt");
    }

    fn close_pooled(&self, code: VarInt, reason: &[u8]) {
        let peers: Vec<Arc<Peer>> = match self.peers.lock() {
            Ok(map) => map.values().cloned().collect(),
            Err(poisoned) => poisoned.into_inner().values().cloned().collect(),
        };
        for peer in peers {
            for pooled in &peer.pools {
                if let Some(conn) = pooled.current.lock().ok().and_then(|mut c| c.take()) {
                    conn.close(code, reason);
                }
                if let Ok(mut slot) = pooled.slot.try_lock() {
                    if let Some(conn) = slot.conn.take() {
                        conn.close(code, reason);
                    }
                    slot.failures = 0;
                    slot.retry_at = None;
                }
            }
        }
    }

    /// The direct addresses the pooled connection to `peer` (the shared
    /// one, which control, replication and normal calls use) was dialled
    /// with, sorted; `None` if there is none. For diagnostics and tests:
    /// which addresses this node reaches a peer at.
    pub fn dialled(&self, peer: &PeerId) -> Option<Vec<std::net::SocketAddr>> {
        let peer = self.peers.lock().ok()?.get(peer).cloned()?;
        let pooled = &peer.pools[SHARED_POOL];
        pooled.current.lock().ok()?.as_ref()?;
        pooled.dialled.lock().ok().map(|d| d.clone())
    }

    /// New calls fail with `LocalShutdown` from now on.
    pub(crate) fn begin_shutdown(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Resolves when no call is in flight.
    pub(crate) async fn wait_idle(&self) {
        self.calls.wait_idle().await;
    }

    /// Closes every pooled connection with the shutdown code and lets go of
    /// the endpoint.
    pub(crate) fn close_connections(&self) {
        let peers: Vec<Arc<Peer>> = match self.peers.lock() {
            Ok(mut map) => map.drain().map(|(_, p)| p).collect(),
            Err(poisoned) => poisoned.into_inner().drain().map(|(_, p)| p).collect(),
        };
        for peer in peers {
            for lane in &peer.lanes {
                lane.permits.close();
            }
            for pooled in &peer.pools {
                if let Some(conn) = pooled.current.lock().ok().and_then(|mut c| c.take()) {
                    conn.close(CLOSE_SHUTTING_DOWN, b"peer shutting down");
                }
                if let Ok(mut slot) = pooled.slot.try_lock() {
                    slot.conn = None;
                }
            }
        }
        if let Ok(mut endpoint) = self.endpoint.write() {
            *endpoint = None;
        }
    }

    /// A dial error; an endpoint closed while this node is not shutting
    /// down is one the supervisor is replacing: `Unreachable`, not
    /// `LocalShutdown`, so callers (the dual router) treat it as a path
    /// failure that passes.
    fn map_dial_error(&self, e: ConnectError) -> TransportError {
        let closed_endpoint = matches!(
            &e,
            ConnectError::Connect {
                source: ConnectWithOptsError::EndpointClosed { .. },
                ..
            }
        );
        if closed_endpoint && !self.closed.load(Ordering::SeqCst) {
            return error(
                TransportErrorKind::Unreachable,
                Delivery::NotDelivered,
                "this node's iroh endpoint died and is being rebuilt; try again in a moment",
            );
        }
        map_connect_error(e)
    }

    fn local_shutdown() -> TransportError {
        error(
            TransportErrorKind::LocalShutdown,
            Delivery::NotDelivered,
            "this node's iroh transport is shutting down",
        )
    }

    fn enter(&self) -> Result<TrackerGuard, TransportError> {
        let guard = self.calls.enter();
        if self.closed.load(Ordering::SeqCst) {
            return Err(Self::local_shutdown());
        }
        Ok(guard)
    }

    fn peer(&self, id: PeerId) -> Result<Arc<Peer>, TransportError> {
        let mut peers = self.peers.lock().map_err(|_| Self::local_shutdown())?;
        if let Some(peer) = peers.get(&id) {
            return Ok(peer.clone());
        }
        if peers.len() >= self.limits.max_peers {
            return Err(error(
                TransportErrorKind::Overloaded,
                Delivery::NotDelivered,
                format!("client already tracks {} peers", self.limits.max_peers),
            ));
        }
        let lane = |priority: Priority| Lane {
            priority,
            permits: Arc::new(Semaphore::new(self.limits.lane(priority))),
            waiting: AtomicUsize::new(0),
        };
        let peer = Arc::new(Peer {
            lanes: Priority::ALL.map(lane),
            pools: Default::default(),
        });
        peers.insert(id, peer.clone());
        Ok(peer)
    }

    /// The pooled connection to `addr`, dialled if there is none.
    async fn connection(
        &self,
        peer: &Pooled,
        addr: &PeerAddr,
    ) -> Result<Arc<Connection>, TransportError> {
        self.connection_early(peer, addr, None)
            .await
            .map(|(conn, _)| conn)
    }

    /// [`Self::connection`]; if this call dials and holds a session ticket
    /// for the peer, `early` (a read-only call) is sent in 0-RTT early
    /// data with the handshake's first flight and comes back as an
    /// [`Written`] whose answer is to be read.
    async fn connection_early(
        &self,
        peer: &Pooled,
        addr: &PeerAddr,
        early: Option<EarlyRequest<'_>>,
    ) -> Result<(Arc<Connection>, Option<Written>), TransportError> {
        if let Some(conn) = peer.open_connection(addr) {
            return Ok((conn, None));
        }
        let direct = direct_addrs(addr);
        let mut slot = peer.slot.lock().await;
        let moved = slot.conn.is_some() && slot.dialled != direct;
        if moved {
            tracing::info!(
                peer = %addr.id.short(),
                old = %crate::transport::addr_list(&slot.dialled),
                new = %crate::transport::addr_list(&direct),
                "the peer's addresses changed; dialling the new ones"
            );
            // Calls on the old connection finish there; new ones wait for
            // the dial below.
            slot.conn = None;
            slot.retry_at = None;
            peer.set_current(None, &direct);
        }
        if let Some(conn) = &slot.conn {
            match conn.close_reason() {
                None => return Ok((conn.clone(), None)),
                Some(reason) => {
                    debug!(peer = %addr.id.short(), "pooled connection is closed ({reason}); re-dialling");
                    slot.conn = None;
                    peer.set_current(None, &direct);
                }
            }
        }
        if let Some(at) = slot.retry_at
            && at > tokio::time::Instant::now()
        {
            // Wait out the backoff; the caller's deadline bounds the wait.
            tokio::time::sleep_until(at).await;
        }
        if slot.failures > 0 || slot.had_connection {
            metrics::connect_retried();
        }
        match self.dial(addr, early).await {
            Ok((conn, early)) => {
                let conn = Arc::new(conn);
                slot.failures = 0;
                slot.retry_at = None;
                slot.had_connection = true;
                slot.conn = Some(conn.clone());
                slot.dialled.clone_from(&direct);
                peer.set_current(Some(conn.clone()), &direct);
                Ok((conn, early))
            }
            Err(e) => {
                metrics::connect_failed();
                self.suspect.notify_one();
                slot.failures = slot.failures.saturating_add(1);
                let delay = backoff::delay(slot.failures, rand::random::<f64>());
                slot.retry_at = Some(tokio::time::Instant::now() + delay);
                debug!(peer = %addr.id.short(), failures = slot.failures, ?delay, "dial failed: {e}");
                Err(e)
            }
        }
    }

    async fn dial(
        &self,
        addr: &PeerAddr,
        early: Option<EarlyRequest<'_>>,
    ) -> Result<(Connection, Option<Written>), TransportError> {
        let endpoint = self
            .endpoint
            .read()
            .ok()
            .and_then(|e| e.clone())
            .ok_or_else(Self::local_shutdown)?;
        let Some(iroh_addr) = &addr.iroh else {
            return Err(error(
                TransportErrorKind::NotServed,
                Delivery::NotDelivered,
                format!("peer {} has no iroh address", addr.id.short()),
            ));
        };
        let key = PublicKey::from_bytes(addr.id.as_bytes()).map_err(|e| {
            error(
                TransportErrorKind::WrongPeer,
                Delivery::NotDelivered,
                format!(
                    "peer id {} is not an Ed25519 public key: {e}",
                    addr.id.short()
                ),
            )
        })?;
        let mut target = EndpointAddr::new(key);
        for direct in &iroh_addr.direct {
            target = target.with_ip_addr(*direct);
        }
        // iroh's own path discovery (on this and any live connection to
        // the peer) learns the addresses the caller named.
        self.lookup.set_endpoint_info(target.clone());
        let relay = match &iroh_addr.relay_url {
            Some(url) => Some(url.parse::<RelayUrl>().map_err(|e| {
                error(
                    TransportErrorKind::Unreachable,
                    Delivery::NotDelivered,
                    format!("peer's relay url {url:?}: {e}"),
                )
            })?),
            None => self.default_relay.clone(),
        };
        if let Some(url) = relay {
            target = target.with_relay_url(url);
        }
        let started = Instant::now();
        let connecting = endpoint
            .connect_with_opts(target, crate::ALPN, Default::default())
            .await
            .map_err(|e| self.map_dial_error(e.into()))?;
        // 0-RTT is possible only with a session ticket from an earlier
        // connection to this peer (`into_0rtt` gives the attempt back
        // without one), and used only for a read-only call.
        let attempt = match early {
            Some(request) => connecting.into_0rtt().map(|z| (z, request)),
            None => Err(connecting),
        };
        let (conn, early) = match attempt {
            Ok((zero_rtt, request)) => self.send_early(zero_rtt, request).await?,
            Err(connecting) => (
                connecting
                    .await
                    .map_err(|e| self.map_dial_error(e.into()))?,
                None,
            ),
        };
        if conn.remote_id() != key {
            // iroh's TLS already ties the connection to the key we dialled;
            // this check keeps the contract explicit.
            conn.close(VarInt::from_u32(0), b"wrong peer");
            return Err(error(
                TransportErrorKind::WrongPeer,
                Delivery::NotDelivered,
                "the endpoint at that address has another key",
            ));
        }
        let relayed = conn
            .paths()
            .iter()
            .find(|p| p.is_selected())
            .is_some_and(|p| p.is_relay());
        metrics::connected(started.elapsed());
        metrics::connection_opened();
        let closed = conn.weak_handle().closed();
        let events = conn.path_events();
        let peer = addr.id.short();
        let sampler = sample_liveness(conn.weak_handle(), self.liveness.clone());
        tokio::spawn(async move {
            tokio::join!(closed, settle_path(relayed, peer, events), sampler);
            metrics::connection_closed();
        });
        debug!(peer = %addr.id.short(), elapsed = ?started.elapsed(), relayed, early = early.is_some(), "connected");
        Ok((conn, early))
    }

    /// Sends `request` in 0-RTT early data on `zero_rtt`, then waits for
    /// the handshake. If the peer refused the early data (it lost or never
    /// issued the ticket, or it restarted), nothing of it was served: the
    /// caller sends the call again on the finished connection.
    async fn send_early(
        &self,
        zero_rtt: OutgoingZeroRttConnection,
        request: EarlyRequest<'_>,
    ) -> Result<(Connection, Option<Written>), TransportError> {
        let early = match write_request(&zero_rtt, request.frame, None).await {
            Ok(written) => {
                metrics::early_data(EarlyData::SentEarly);
                Some(written)
            }
            Err(e) => {
                debug!("no stream in early data ({e}); the call waits for the handshake");
                None
            }
        };
        let status = zero_rtt
            .handshake_completed()
            .await
            .map_err(|e| self.map_dial_error(e.into()))?;
        match status {
            ZeroRttStatus::Accepted(conn) => {
                // Counted as sent only now: until the handshake finished,
                // the peer's answer is all that could show it got the
                // call, and a read-only call that ran without an answer
                // changed nothing, so "not delivered" is true in effect.
                if early.is_some() {
                    request.sent.store(true, Ordering::SeqCst);
                }
                Ok((conn, early))
            }
            ZeroRttStatus::Rejected(conn) => {
                if let Some(mut call) = early {
                    metrics::early_data(EarlyData::Rejected);
                    debug!("the peer refused the early data; sending the call again");
                    // Its streams are dead with the early data; nothing to
                    // reset.
                    call.streams.done = true;
                }
                Ok((conn, None))
            }
        }
    }

    /// Sends one frame on a new stream in `priority`'s lane and reads the
    /// answer. `sent` becomes true once any byte of the request may have
    /// left, which decides delivery if the caller's deadline cuts the call.
    ///
    /// A `read_only` call that finds no connection to the peer rides in
    /// the new connection's 0-RTT early data when it can.
    async fn round_trip(
        &self,
        addr: &PeerAddr,
        mut frame: Frame,
        sent: &AtomicBool,
        read_only: bool,
    ) -> Result<Frame, TransportError> {
        let priority = frame.header.priority;
        let peer = self.peer(addr.id)?;
        let _permit = peer.lanes[priority as usize]
            .acquire(self.limits.lane_queue)
            .await?;
        frame.header.request_id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        let early = read_only.then_some(EarlyRequest {
            frame: &frame,
            sent,
        });
        let (conn, early) = self
            .connection_early(&peer.pools[pool_of(priority)], addr, early)
            .await?;
        let Written {
            mut streams,
            written,
        } = match early {
            Some(early) => early,
            None => write_request(&*conn, &frame, Some(sent))
                .await
                .map_err(|e| map_connection_error(&e, Delivery::NotDelivered, &self.closed))?,
        };
        let answer = wire::read_frame(&mut streams.recv, self.frame_limits).await;
        let answer = match (written, answer) {
            // The peer may have answered (e.g. "too large") and stopped our
            // request side: the answer wins over the write error.
            (_, Ok(answer)) => answer,
            (Err(write), Err(_)) => return Err(map_write_error(&write, &self.closed)),
            (Ok(()), Err(read)) => return Err(map_read_error(&read, &self.closed)),
        };
        wire::consume_end(&mut streams.recv);
        streams.done = true;
        if answer.header.request_id != frame.header.request_id {
            return Err(error(
                TransportErrorKind::Protocol,
                Delivery::MayHaveBeenDelivered,
                format!(
                    "answer for request {} on the stream of request {}",
                    answer.header.request_id, frame.header.request_id
                ),
            ));
        }
        Ok(answer)
    }

    /// [`Self::call_inner`], sent once more on a new connection when the
    /// method is idempotent and its connection was lost.
    async fn call_retrying(
        &self,
        addr: &PeerAddr,
        call: Call,
        sent: &AtomicBool,
    ) -> Result<Bytes, CallError> {
        if !call.method.idempotent {
            return self.call_inner(addr, call, sent).await;
        }
        match self.call_inner(addr, call.clone(), sent).await {
            Err(CallError::Transport(e)) if e.kind == TransportErrorKind::ConnectionLost => {
                debug!(peer = %addr.id.short(), "connection lost under an idempotent call; sending it again on a new connection: {e}");
                self.call_inner(addr, call, sent).await
            }
            other => other,
        }
    }

    async fn call_inner(
        &self,
        addr: &PeerAddr,
        call: Call,
        sent: &AtomicBool,
    ) -> Result<Bytes, CallError> {
        let header = Header {
            kind: FrameKind::Request,
            priority: call.priority,
            idempotent: call.method.idempotent,
            service: call.method.service,
            method: call.method.id,
            request_id: 0,
            payload_len: 0,
            deadline_ms: call.timeout_ms(),
        };
        let frame = Frame::new(header, call.payload, self.frame_limits).map_err(|e| {
            error(
                TransportErrorKind::Protocol,
                Delivery::NotDelivered,
                format!("request refused before sending: {e}"),
            )
        })?;
        let answer = self
            .round_trip(addr, frame, sent, call.method.read_only)
            .await?;
        match answer.header.kind {
            FrameKind::Response => Ok(answer.payload),
            FrameKind::Error => Err(CallError::Application(Status::decode(&answer.payload))),
            other => Err(error(
                TransportErrorKind::Protocol,
                Delivery::MayHaveBeenDelivered,
                format!("a {other:?} frame answered a request"),
            )
            .into()),
        }
    }

    /// The `Request` frame that opens a streaming call (its request id is
    /// set when the stream is open).
    fn stream_request(&self, call: StreamCall) -> Result<Frame, CallError> {
        let method = call.method;
        if let Err(status) = tern_protocol::rpc::require_stream(method) {
            return Err(error(
                TransportErrorKind::Protocol,
                Delivery::NotDelivered,
                status.message,
            )
            .into());
        }
        let header = Header {
            kind: FrameKind::Request,
            priority: call.priority,
            idempotent: method.idempotent,
            service: method.service,
            method: method.id,
            request_id: 0,
            payload_len: 0,
            deadline_ms: call.idle_ms(),
        };
        Frame::new(header, call.request, self.frame_limits).map_err(|e| {
            error(
                TransportErrorKind::Protocol,
                Delivery::NotDelivered,
                format!("stream request refused before sending: {e}"),
            )
            .into()
        })
    }

    /// Opens a streaming call (see [`crate::stream`]): its lane place, its
    /// QUIC stream, the `Request` frame, and the server's acceptance.
    async fn open_stream_inner(
        &self,
        addr: &PeerAddr,
        call: StreamCall,
        sent: &AtomicBool,
        guard: TrackerGuard,
    ) -> Result<CallStream, CallError> {
        let method = call.method;
        let priority = call.priority;
        let idle = call.idle_timeout;
        let mut frame = self.stream_request(call)?;
        let peer = self.peer(addr.id)?;
        let permit = peer.lanes[priority as usize]
            .acquire(self.limits.stream_open_queue)
            .await?;
        let conn = self
            .connection(&peer.pools[pool_of(priority)], addr)
            .await?;
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| map_connection_error(&e, Delivery::NotDelivered, &self.closed))?;
        let mut opening = crate::stream::Opening {
            send: Some(send),
            recv: Some(recv),
        };
        let request_id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        frame.header.request_id = request_id;
        let (written, answer) = {
            let (Some(send), Some(recv)) = (opening.send.as_mut(), opening.recv.as_mut()) else {
                return Err(Self::local_shutdown().into());
            };
            let _ = send.set_priority(wire::quic_priority(priority));
            sent.store(true, Ordering::SeqCst);
            let written = wire::write_frame(send, &frame).await;
            if written.is_ok() && method.kind == MethodKind::ServerStreaming {
                let _ = send.finish();
            }
            (written, wire::read_frame(recv, self.frame_limits).await)
        };
        let answer = match (written, answer) {
            (_, Ok(answer)) => answer,
            (Err(write), Err(_)) => return Err(map_write_error(&write, &self.closed).into()),
            (Ok(()), Err(read)) => return Err(map_read_error(&read, &self.closed).into()),
        };
        let rules = check_acceptance(&answer, &mut opening, request_id, self.frame_limits)?;
        let Some((send, recv)) = opening.take() else {
            return Err(Self::local_shutdown().into());
        };
        let mut template = frame.header;
        template.deadline_ms = 0;
        template.idempotent = false;
        template.payload_len = 0;
        let accepted = crate::stream::Accepted {
            send,
            recv,
            method,
            header: template,
            rules,
            limits: self.frame_limits,
            idle,
            hold: crate::stream::Hold::new(permit, guard),
            closed: self.closed.clone(),
        };
        let (sender, receiver) = accepted.split();
        Ok(CallStream { sender, receiver })
    }

    async fn ping_inner(&self, addr: &PeerAddr, sent: &AtomicBool) -> Result<Duration, CallError> {
        let nonce: u64 = rand::random();
        let header = Header {
            kind: FrameKind::Ping,
            priority: Priority::Control,
            idempotent: true,
            service: ServiceId::Connection,
            method: 0,
            request_id: 0,
            payload_len: 0,
            deadline_ms: 0,
        };
        let payload = Bytes::copy_from_slice(&nonce.to_le_bytes());
        debug_assert_eq!(payload.len(), PING_PAYLOAD);
        let frame = Frame::new(header, payload.clone(), self.frame_limits).map_err(|e| {
            error(
                TransportErrorKind::Protocol,
                Delivery::NotDelivered,
                e.to_string(),
            )
        })?;
        // Dial first so the round trip measures the network, not set-up.
        let peer = self.peer(addr.id)?;
        self.connection(&peer.pools[pool_of(header.priority)], addr)
            .await?;
        let started = Instant::now();
        let answer = self.round_trip(addr, frame, sent, false).await?;
        let rtt = started.elapsed();
        if answer.header.kind != FrameKind::Pong || answer.payload != payload {
            return Err(error(
                TransportErrorKind::Protocol,
                Delivery::MayHaveBeenDelivered,
                format!("ping answered by a {:?} frame", answer.header.kind),
            )
            .into());
        }
        Ok(rtt.max(Duration::from_nanos(1)))
    }
}

/// Checks the server's answer to a stream's `Request`: accepted (the
/// rules go on checking the stream), refused (its status), or a broken
/// rule.
fn check_acceptance(
    answer: &Frame,
    opening: &mut crate::stream::Opening,
    request_id: u64,
    limits: Limits,
) -> Result<StreamRules, CallError> {
    let mut rules = StreamRules::new(StreamSide::Caller, request_id, true, limits.max_payload);
    match rules.check(&answer.header) {
        Ok(StreamEvent::Accepted) => Ok(rules),
        Ok(StreamEvent::Refused) => {
            if let Some(recv) = opening.recv.as_mut() {
                wire::consume_end(recv);
            }
            Err(CallError::Application(Status::decode(&answer.payload)))
        }
        Ok(other) => Err(error(
            TransportErrorKind::Protocol,
            Delivery::MayHaveBeenDelivered,
            format!("the peer answered a stream's opening with {other:?}"),
        )
        .into()),
        Err(violation) => Err(error(
            TransportErrorKind::Protocol,
            Delivery::MayHaveBeenDelivered,
            format!("the peer answered a stream's opening against the rules: {violation}"),
        )
        .into()),
    }
}

/// How long a connection that starts on a relay may take to switch to a
/// direct path (hole punching) before its NAT traversal counts as
/// "relayed". Hole punching on iroh takes a few round trips; 10 s covers
/// slow paths while still reporting an outcome for long-lived connections.
pub const NAT_SETTLE_TIME: Duration = Duration::from_secs(10);

/// Samples `conn`'s IP paths into `liveness` every [`LIVENESS_TICK`] until
/// it closes, then forgets them (see [`crate::path_select`]).
async fn sample_liveness(conn: iroh::endpoint::WeakConnectionHandle, liveness: Arc<Liveness>) {
    let mut seen: Vec<std::net::SocketAddr> = Vec::new();
    loop {
        let Some(c) = conn.upgrade() else { break };
        if c.close_reason().is_some() {
            break;
        }
        let now = tokio::time::Instant::now().into_std();
        for path in c.paths().iter() {
            if let iroh::TransportAddr::Ip(remote) = path.remote_addr() {
                liveness.observe(*remote, path.stats().udp_rx.datagrams, now);
                if !seen.contains(remote) {
                    seen.push(*remote);
                }
            }
        }
        drop(c);
        tokio::time::sleep(LIVENESS_TICK).await;
    }
    liveness.forget(&seen);
}

/// Records the path a new connection settles on: direct at once, direct
/// once a direct path is selected within [`NAT_SETTLE_TIME`], relayed
/// otherwise (or if the connection ends first).
async fn settle_path(relayed: bool, peer: String, mut events: iroh::endpoint::PathEventStream) {
    use futures::StreamExt;
    use iroh::endpoint::PathEvent;
    if !relayed {
        metrics::connection_path(false, peer);
        return;
    }
    let went_direct = async {
        while let Some(event) = events.next().await {
            if let PathEvent::Selected { remote_addr, .. } = event
                && remote_addr.is_ip()
            {
                return true;
            }
        }
        false
    };
    let direct = tokio::time::timeout(NAT_SETTLE_TIME, went_direct)
        .await
        .unwrap_or(false);
    metrics::connection_path(!direct, peer);
}

fn timed_out(timeout: Duration, sent: &AtomicBool) -> CallError {
    let delivery = if sent.load(Ordering::SeqCst) {
        Delivery::MayHaveBeenDelivered
    } else {
        Delivery::NotDelivered
    };
    error(
        TransportErrorKind::TimedOut,
        delivery,
        format!("no answer within {timeout:?}"),
    )
    .into()
}

impl RpcClient for IrohClient {
    fn transport(&self) -> TransportKind {
        TransportKind::Iroh
    }

    fn call<'a>(
        &'a self,
        peer: &'a PeerAddr,
        call: Call,
    ) -> BoxFuture<'a, Result<Bytes, CallError>> {
        Box::pin(async move {
            let _guard = self.enter()?;
            let timeout = call.timeout;
            let method = call.method;
            let started = Instant::now();
            let sent = AtomicBool::new(false);
            metrics::in_flight(Side::Client, 1.0);
            let result = tokio::time::timeout(timeout, self.call_retrying(peer, call, &sent))
                .await
                .unwrap_or_else(|_| {
                    self.suspect.notify_one();
                    Err(timed_out(timeout, &sent))
                });
            metrics::in_flight(Side::Client, -1.0);
            let outcome = match &result {
                Ok(_) => Outcome::Ok,
                Err(CallError::Application(_)) => Outcome::AppError,
                Err(CallError::Transport(e)) => {
                    metrics::call_failure(e.kind);
                    Outcome::TransportError
                }
            };
            metrics::call_finished(method, Side::Client, outcome, started.elapsed());
            result
        })
    }

    fn ping<'a>(
        &'a self,
        peer: &'a PeerAddr,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Duration, CallError>> {
        Box::pin(async move {
            let _guard = self.enter()?;
            let sent = AtomicBool::new(false);
            // The connection the ping rides on, if one is open already.
            let pooled = self.peer(peer.id)?;
            let before = pooled.pools[SHARED_POOL].current_connection();
            tokio::time::timeout(timeout, self.ping_inner(peer, &sent))
                .await
                .unwrap_or_else(|_| {
                    if let Some(conn) = before {
                        pooled.pools[SHARED_POOL].forget_silent(&conn, &peer.id);
                    }
                    Err(timed_out(timeout, &sent))
                })
        })
    }

    fn open_stream<'a>(
        &'a self,
        peer: &'a PeerAddr,
        call: StreamCall,
    ) -> BoxFuture<'a, Result<CallStream, CallError>> {
        Box::pin(async move {
            let guard = self.enter()?;
            let timeout = call.open_timeout;
            let method = call.method;
            let sent = AtomicBool::new(false);
            let result =
                tokio::time::timeout(timeout, self.open_stream_inner(peer, call, &sent, guard))
                    .await
                    .unwrap_or_else(|_| Err(timed_out(timeout, &sent)));
            let outcome = match &result {
                Ok(_) => Outcome::Ok,
                Err(CallError::Application(_)) => Outcome::AppError,
                Err(CallError::Transport(e)) => {
                    metrics::call_failure(e.kind);
                    debug!(method = %method.label(), peer = %peer.id.short(), error = %e, "iroh stream not opened");
                    Outcome::TransportError
                }
            };
            metrics::stream_opened(method, Side::Client, outcome);
            result
        })
    }
}

/// What a stream error code from the peer says about the request.
pub(crate) fn map_stream_code(code: VarInt, what: &str) -> TransportError {
    if code == STREAM_SHUTTING_DOWN {
        error(
            TransportErrorKind::PeerShuttingDown,
            Delivery::NotDelivered,
            format!("peer is shutting down and did not run the request ({what})"),
        )
    } else if code == STREAM_IDLE {
        error(
            TransportErrorKind::TimedOut,
            Delivery::MayHaveBeenDelivered,
            format!("the peer gave up on the stream after its idle bound ({what})"),
        )
    } else if code == STREAM_DEADLINE_EXCEEDED {
        error(
            TransportErrorKind::TimedOut,
            Delivery::MayHaveBeenDelivered,
            format!("the deadline passed while the peer worked on the request ({what})"),
        )
    } else if code == STREAM_MALFORMED || code == STREAM_TOO_LARGE {
        error(
            TransportErrorKind::Protocol,
            Delivery::NotDelivered,
            format!("peer refused the request frame with code {code} ({what})"),
        )
    } else {
        error(
            TransportErrorKind::ConnectionLost,
            Delivery::MayHaveBeenDelivered,
            format!("peer abandoned the call with code {code} ({what})"),
        )
    }
}

pub(crate) fn map_connection_error(
    e: &ConnectionError,
    delivery: Delivery,
    closed: &AtomicBool,
) -> TransportError {
    match e {
        ConnectionError::ApplicationClosed(close) if close.error_code == CLOSE_SHUTTING_DOWN => {
            error(
                TransportErrorKind::PeerShuttingDown,
                delivery,
                format!("peer closed the connection: {e}"),
            )
        }
        ConnectionError::LocallyClosed if closed.load(Ordering::SeqCst) => error(
            TransportErrorKind::LocalShutdown,
            delivery,
            "this node's iroh transport is shutting down",
        ),
        other => error(
            TransportErrorKind::ConnectionLost,
            delivery,
            format!("connection lost: {other}"),
        ),
    }
}

pub(crate) fn map_write_error(e: &WriteError, closed: &AtomicBool) -> TransportError {
    match e {
        WriteError::Stopped(code) => map_stream_code(*code, "request side stopped"),
        WriteError::ConnectionLost(ce) => {
            map_connection_error(ce, Delivery::MayHaveBeenDelivered, closed)
        }
        WriteError::ClosedStream => error(
            TransportErrorKind::ConnectionLost,
            Delivery::MayHaveBeenDelivered,
            "request stream closed while writing",
        ),
        WriteError::ZeroRttRejected => error(
            TransportErrorKind::ConnectionLost,
            Delivery::NotDelivered,
            "0-RTT data rejected by the peer",
        ),
    }
}

pub(crate) fn map_read_error(e: &ReadFrameError, closed: &AtomicBool) -> TransportError {
    match e {
        ReadFrameError::Read(ReadError::Reset(code)) => map_stream_code(*code, "answer reset"),
        ReadFrameError::Read(ReadError::ConnectionLost(ce)) => {
            map_connection_error(ce, Delivery::MayHaveBeenDelivered, closed)
        }
        ReadFrameError::Read(ReadError::ZeroRttRejected) => error(
            TransportErrorKind::ConnectionLost,
            Delivery::NotDelivered,
            "0-RTT data rejected by the peer",
        ),
        ReadFrameError::Read(ReadError::ClosedStream) => error(
            TransportErrorKind::Protocol,
            Delivery::MayHaveBeenDelivered,
            "answer stream already closed",
        ),
        ReadFrameError::Eof { got } => error(
            TransportErrorKind::Protocol,
            Delivery::MayHaveBeenDelivered,
            format!("answer stream ended after {got} bytes, without a whole frame"),
        ),
        ReadFrameError::Frame(fe) => error(
            TransportErrorKind::Protocol,
            Delivery::MayHaveBeenDelivered,
            format!("malformed answer: {fe}"),
        ),
    }
}

fn map_connect_error(e: ConnectError) -> TransportError {
    let not = Delivery::NotDelivered;
    let from_connection = |ce: &ConnectionError| match ce {
        ConnectionError::TransportError(te) if te.crypto.is_some() => error(
            TransportErrorKind::WrongPeer,
            not,
            format!("handshake failed; the endpoint at that address is not this peer: {te}"),
        ),
        ConnectionError::ApplicationClosed(close) if close.error_code == CLOSE_SHUTTING_DOWN => {
            error(
                TransportErrorKind::PeerShuttingDown,
                not,
                format!("peer closed the connection: {ce}"),
            )
        }
        other => error(
            TransportErrorKind::Unreachable,
            not,
            format!("connecting: {other}"),
        ),
    };
    match &e {
        ConnectError::Connect {
            source: ConnectWithOptsError::EndpointClosed { .. },
            ..
        } => IrohClient::local_shutdown(),
        ConnectError::Connecting {
            source: ConnectingError::ConnectionError { source, .. },
            ..
        } => from_connection(source),
        ConnectError::Connection { source, .. } => from_connection(source),
        other => error(
            TransportErrorKind::Unreachable,
            not,
            format!("connecting: {other}"),
        ),
    }
}
