//! [`IrohTransport`]: one iroh endpoint per node, serving a handler and
//! owning the client, and their graceful shutdown. The endpoint is
//! supervised: [`crate::supervisor`] probes it and rebuilds it (same key,
//! same port) when it dies; the client and the server follow the
//! replacement, so users of this type never see the swap.
//!
//! Shutdown, in order: the supervisor stops, the client refuses new calls (`LocalShutdown`) and
//! the server resets new streams with "shutting down" (callers learn their
//! request did not run); calls in flight both ways get until the drain
//! deadline; then every connection is closed with the application close
//! code [`crate::wire::CLOSE_SHUTTING_DOWN`], the router stops and the
//! endpoint closes (waiting, bounded by QUIC, for peers to acknowledge).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use iroh::address_lookup::memory::MemoryLookup;
use iroh::endpoint::{IdleTimeout, PortmapperConfig, QuicTransportConfig, VarInt, presets};
use iroh::protocol::Router;
use iroh::{Endpoint, RelayMode, RelayUrl, SecretKey, Watcher};
use tern_protocol::peer::IrohAddr;
use tern_protocol::{Handler, PeerAddr, PeerId};
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use crate::ALPN;
use crate::client::IrohClient;
use crate::config::{IrohConfig, TransportLimits};
use crate::server::{RpcProtocol, ServerState};
use crate::supervisor::{self, EndpointHealth, Live, Supervised};
use crate::wire::CLOSE_SHUTTING_DOWN;

/// Why a transport could not start.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The configuration cannot work.
    #[error("invalid iroh transport configuration: {0}")]
    Config(String),
    /// The limits cannot work.
    #[error("invalid iroh transport limits: {0}")]
    Limits(#[from] crate::config::LimitsError),
    /// The endpoint could not bind its socket.
    #[error("binding the iroh endpoint on {addr}: {detail}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why it failed.
        detail: String,
    },
}

/// `direct` as people read it: `10.0.0.1:7401, 10.0.0.2:7401`.
pub(crate) fn addr_list(direct: &[SocketAddr]) -> String {
    let list: Vec<String> = direct.iter().map(ToString::to_string).collect();
    list.join(", ")
}

/// This node's address from the endpoint's view of itself: `local` when
/// bound to a specific address, else the addresses iroh found on the
/// interfaces, sorted.
fn own_addr(
    id: PeerId,
    local: SocketAddr,
    seen: &iroh::EndpointAddr,
    relay_url: Option<String>,
) -> PeerAddr {
    let mut direct: Vec<SocketAddr> = if local.ip().is_unspecified() {
        seen.ip_addrs().copied().collect()
    } else {
        vec![local]
    };
    direct.sort_unstable();
    direct.dedup();
    PeerAddr {
        id,
        iroh: Some(IrohAddr { direct, relay_url }),
        grpc: None,
    }
}

/// Counts calls in flight so shutdown can wait for them.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    count: AtomicUsize,
    idle: Notify,
}

/// One call in flight; dropping it ends the call.
#[derive(Debug)]
pub(crate) struct TrackerGuard {
    tracker: Arc<Tracker>,
}

impl Drop for TrackerGuard {
    fn drop(&mut self) {
        if self.tracker.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.tracker.idle.notify_waiters();
        }
    }
}

impl Tracker {
    pub(crate) fn enter(self: &Arc<Self>) -> TrackerGuard {
        self.count.fetch_add(1, Ordering::SeqCst);
        TrackerGuard {
            tracker: self.clone(),
        }
    }

    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Resolves when no call is in flight.
    pub(crate) async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// How long [`IrohTransport::watch_peer_addr`] waits after the endpoint it
/// follows closed before it follows the one in service (a rebuild takes
/// milliseconds; the watch retries until the transport shuts down).
pub const ADDR_WATCH_REBIND_PAUSE: Duration = Duration::from_millis(200);

/// A node's iroh transport: its endpoint, the server for [`ALPN`] and the
/// client that calls other nodes, with the supervisor that rebuilds the
/// endpoint when it dies ([`crate::supervisor`]).
#[derive(Debug)]
pub struct IrohTransport {
    shared: Arc<Supervised>,
    stop: watch::Sender<bool>,
    supervisor: SupervisorTask,
    id: PeerId,
    local_addr: SocketAddr,
    relay_url: Option<String>,
    /// The tasks of [`Self::watch_peer_addr`], stopped at shutdown.
    watchers: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// The supervisor task; aborted if the transport is dropped without
/// [`IrohTransport::shutdown`].
#[derive(Debug)]
struct SupervisorTask(Option<tokio::task::JoinHandle<()>>);

impl Drop for SupervisorTask {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// Binds an endpoint with `config` (the endpoint alone: nothing served),
/// its address lookup fed by `lookup` and its paths chosen with
/// `liveness` (the client's; a rebuilt endpoint gets the same).
///
/// The endpoint is offline-first: no relay unless `config.relay_url`
/// names one, no address lookup (DNS, pkarr) beyond `lookup` and no port
/// mapping.
/// The QUIC settings of an endpoint with `limits`: streams, idle
/// timeout, keep-alive and receive windows. Public so that the benches'
/// raw iroh baseline runs with exactly these, not the QUIC library's
/// defaults.
pub fn quic_config(limits: &TransportLimits) -> Result<QuicTransportConfig, BindError> {
    let idle = IdleTimeout::try_from(limits.idle_timeout)
        .map_err(|e| BindError::Config(format!("idle_timeout: {e}")))?;
    Ok(QuicTransportConfig::builder()
        .max_concurrent_bidi_streams(VarInt::from_u32(limits.max_concurrent_streams))
        // The protocol uses no unidirectional streams.
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .max_idle_timeout(Some(idle))
        // The stream contract's windows: a stalled reader holds at most
        // a stream window per stream and a connection window in all.
        .stream_receive_window(VarInt::from_u32(limits.stream_window))
        .receive_window(VarInt::from_u32(limits.connection_window))
        .keep_alive_interval(limits.keep_alive)
        .build())
}

pub(crate) async fn bind_endpoint(
    config: &IrohConfig,
    lookup: &MemoryLookup,
    liveness: &Arc<crate::path_select::Liveness>,
) -> Result<Endpoint, BindError> {
    let quic = quic_config(&config.limits)?;
    let mut builder = Endpoint::builder(presets::Minimal)
        .secret_key(SecretKey::from_bytes(&config.secret_key))
        .alpns(vec![ALPN.to_vec()])
        .transport_config(quic)
        // Offline by default, whatever features other crates enable on
        // iroh: no DNS/pkarr lookup, no UPnP/PCP/NAT-PMP probing.
        .clear_address_lookup()
        // Only what callers name: the addresses in the membership.
        .address_lookup(lookup.clone())
        .portmapper_config(PortmapperConfig::Disabled)
        .path_selector(Arc::new(crate::path_select::LivePathSelector::new(
            liveness.clone(),
        )))
        .clear_ip_transports()
        .bind_addr(config.bind_addr)
        .map_err(|e| BindError::Bind {
            addr: config.bind_addr,
            detail: e.to_string(),
        })?;
    builder = match relay_url(config)? {
        None => builder.relay_mode(RelayMode::Disabled),
        Some(url) => builder.relay_mode(RelayMode::Custom(url.into())),
    };
    if let Some(der) = &config.relay_ca_der {
        let cert = iroh::tls::CaTlsConfig::custom_roots([der.clone().into()]);
        builder = builder.ca_tls_config(cert);
    }
    builder.bind().await.map_err(|e| BindError::Bind {
        addr: config.bind_addr,
        detail: e.to_string(),
    })
}

/// The relay `config` names, parsed.
fn relay_url(config: &IrohConfig) -> Result<Option<RelayUrl>, BindError> {
    match &config.relay_url {
        None => Ok(None),
        Some(url) => url
            .parse()
            .map(Some)
            .map_err(|e| BindError::Config(format!("relay_url {url:?}: {e}"))),
    }
}

/// Serves `server` on `endpoint` under [`ALPN`].
pub(crate) fn serve(endpoint: Endpoint, server: Arc<ServerState>) -> Router {
    Router::builder(endpoint)
        .accept(ALPN, RpcProtocol::new(server))
        .spawn()
}

impl IrohTransport {
    /// Binds an endpoint with `config`, serves `handler` on it and starts
    /// its supervisor.
    ///
    /// The endpoint is offline-first: no relay unless `config.relay_url`
    /// names one, no address lookup (DNS, pkarr) and no port mapping.
    pub async fn bind(
        mut config: IrohConfig,
        handler: Arc<dyn Handler>,
    ) -> Result<IrohTransport, BindError> {
        config.limits.validate()?;
        let relay = relay_url(&config)?;
        let lookup = MemoryLookup::with_provenance("tern-membership");
        let liveness = Arc::new(crate::path_select::Liveness::default());
        let endpoint = bind_endpoint(&config, &lookup, &liveness).await?;
        let local_addr = endpoint
            .bound_sockets()
            .into_iter()
            .next()
            .unwrap_or(config.bind_addr);
        // A replacement endpoint binds where this one did, also when the
        // configuration asked for any port.
        config.bind_addr = local_addr;
        let server = ServerState::new(handler, config.frame_limits, config.limits.clone());
        let router = serve(endpoint.clone(), server.clone());
        let client = Arc::new(IrohClient::new(
            endpoint.clone(),
            config.frame_limits,
            config.limits.clone(),
            relay,
            lookup,
            liveness,
        ));
        let id = PeerId::from_bytes(*endpoint.id().as_bytes());
        info!(id = %endpoint.id().fmt_short(), %local_addr, "iroh transport bound");
        let relay_url = config.relay_url.clone();
        let live = Live { endpoint, router };
        let shared = Arc::new(Supervised::new(config, server, client, live));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(supervisor::supervise(shared.clone(), stopped));
        Ok(IrohTransport {
            shared,
            stop,
            supervisor: SupervisorTask(Some(task)),
            id,
            local_addr,
            relay_url,
            watchers: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// This node's identity.
    pub fn id(&self) -> PeerId {
        self.id
    }

    /// The socket address the endpoint is bound to (a rebuilt endpoint
    /// binds the same one).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// How other nodes reach this one over iroh: its id, its direct
    /// addresses (the bound address, or the interfaces' addresses when
    /// bound to an unspecified one, sorted) and its relay, if configured.
    pub fn peer_addr(&self) -> PeerAddr {
        own_addr(
            self.id(),
            self.local_addr,
            &self.endpoint().addr(),
            self.relay_url.clone(),
        )
    }

    /// [`Self::peer_addr`] as it changes: iroh follows the host's
    /// interfaces (its network monitor), and a node bound to an
    /// unspecified address advertises what it finds there, so the value
    /// changes when an address is added or deleted. It follows the
    /// endpoint in service: when the supervisor rebuilds it, the watch
    /// moves to the replacement. The task ends at shutdown or when every
    /// receiver is dropped.
    pub fn watch_peer_addr(&self) -> watch::Receiver<PeerAddr> {
        let (tx, rx) = watch::channel(self.peer_addr());
        let shared = self.shared.clone();
        let (id, local, relay) = (self.id(), self.local_addr, self.relay_url.clone());
        let task = tokio::spawn(async move {
            loop {
                let endpoint = shared.live().endpoint;
                let mut addrs = endpoint.watch_addr();
                loop {
                    let now = own_addr(id, local, &addrs.get(), relay.clone());
                    tx.send_if_modified(|old| {
                        if *old == now {
                            return false;
                        }
                        let direct = |a: &PeerAddr| {
                            a.iroh
                                .as_ref()
                                .map(|i| addr_list(&i.direct))
                                .unwrap_or_default()
                        };
                        info!(old = %direct(old), new = %direct(&now), "this node's iroh addresses changed");
                        *old = now;
                        true
                    });
                    tokio::select! {
                        changed = addrs.updated() => if changed.is_err() { break },
                        _ = tx.closed() => return,
                    }
                }
                // The endpoint closed: a rebuild (or shutdown, which
                // aborts this task). Follow its replacement.
                tokio::select! {
                    () = tokio::time::sleep(ADDR_WATCH_REBIND_PAUSE) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        if let Ok(mut w) = self.watchers.lock() {
            w.push(task);
        }
        rx
    }

    /// The client that calls other nodes as this node.
    pub fn client(&self) -> Arc<IrohClient> {
        self.shared.client().clone()
    }

    /// The iroh endpoint in service now (for metrics and diagnostics); a
    /// rebuild replaces it.
    pub fn endpoint(&self) -> Endpoint {
        self.shared.live().endpoint
    }

    /// What the supervisor knows about the endpoint: whether it answers
    /// its liveness probe, and how often it was rebuilt.
    pub fn health(&self) -> EndpointHealth {
        self.shared.health()
    }

    /// Graceful shutdown: stop the supervisor and the address watches,
    /// stop taking calls, let calls in flight (both ways) finish within
    /// `drain`, close connections with the shutdown code, stop the router
    /// and close the endpoint.
    pub async fn shutdown(mut self, drain: Duration) {
        if let Ok(mut w) = self.watchers.lock() {
            for task in w.drain(..) {
                task.abort();
            }
        }
        let _ = self.stop.send(true);
        if let Some(task) = self.supervisor.0.take()
            && let Err(e) = task.await
        {
            warn!("iroh endpoint supervisor ended abnormally: {e}");
        }
        let client = self.shared.client().clone();
        let server = self.shared.server().clone();
        client.begin_shutdown();
        server.begin_drain();
        let idle = async {
            tokio::join!(client.wait_idle(), server.calls.wait_idle());
        };
        if tokio::time::timeout(drain, idle).await.is_err() {
            warn!(
                server_calls = server.calls.count(),
                "drain deadline passed with calls still in flight; closing anyway"
            );
        }
        client.close_connections();
        server.close_connections(CLOSE_SHUTTING_DOWN, b"peer shutting down");
        let live = self.shared.live();
        if let Err(e) = live.router.shutdown().await {
            warn!("router shutdown: {e}");
        }
        live.endpoint.close().await;
        info!(id = %live.endpoint.id().fmt_short(), "iroh transport stopped");
    }
}
