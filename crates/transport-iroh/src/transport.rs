//! [`IrohTransport`]: one iroh endpoint per node, serving a handler and
//! owning the client, and their graceful shutdown.
//!
//! Shutdown, in order: the client refuses new calls (`LocalShutdown`) and
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
use tokio::sync::Notify;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::ALPN;
use crate::client::IrohClient;
use crate::config::IrohConfig;
use crate::server::{RpcProtocol, ServerState};

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

/// A node's iroh transport: its endpoint, the server for [`ALPN`] and the
/// client that calls other nodes.
#[derive(Debug)]
pub struct IrohTransport {
    endpoint: Endpoint,
    router: Router,
    server: Arc<ServerState>,
    client: Arc<IrohClient>,
    local_addr: SocketAddr,
    relay_url: Option<String>,
    /// The tasks of [`Self::watch_peer_addr`], stopped at shutdown.
    watchers: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl IrohTransport {
    /// Binds an endpoint with `config` and serves `handler` on it.
    ///
    /// The endpoint is offline-first: no relay unless `config.relay_url`
    /// names one, no address lookup (DNS, pkarr) and no port mapping.
    pub async fn bind(
        config: IrohConfig,
        handler: Arc<dyn Handler>,
    ) -> Result<IrohTransport, BindError> {
        config.limits.validate()?;
        let limits = &config.limits;
        let idle = IdleTimeout::try_from(limits.idle_timeout)
            .map_err(|e| BindError::Config(format!("idle_timeout: {e}")))?;
        let quic = QuicTransportConfig::builder()
            .max_concurrent_bidi_streams(VarInt::from_u32(limits.max_concurrent_streams))
            // The protocol uses no unidirectional streams.
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .max_idle_timeout(Some(idle))
            // The stream contract's windows: a stalled reader holds at most
            // a stream window per stream and a connection window in all.
            .stream_receive_window(VarInt::from_u32(limits.stream_window))
            .receive_window(VarInt::from_u32(limits.connection_window))
            .keep_alive_interval(limits.keep_alive)
            .build();
        let lookup = MemoryLookup::with_provenance("tern-membership");
        let liveness = Arc::new(crate::path_select::Liveness::default());
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
        let relay: Option<RelayUrl> = match &config.relay_url {
            None => None,
            Some(url) => Some(
                url.parse()
                    .map_err(|e| BindError::Config(format!("relay_url {url:?}: {e}")))?,
            ),
        };
        builder = match &relay {
            None => builder.relay_mode(RelayMode::Disabled),
            Some(url) => builder.relay_mode(RelayMode::Custom(url.clone().into())),
        };
        if let Some(der) = &config.relay_ca_der {
            let cert = iroh::tls::CaTlsConfig::custom_roots([der.clone().into()]);
            builder = builder.ca_tls_config(cert);
        }
        let endpoint = builder.bind().await.map_err(|e| BindError::Bind {
            addr: config.bind_addr,
            detail: e.to_string(),
        })?;
        let local_addr = endpoint
            .bound_sockets()
            .into_iter()
            .next()
            .unwrap_or(config.bind_addr);
        let server = ServerState::new(handler, config.frame_limits, config.limits.clone());
        let router = Router::builder(endpoint.clone())
            .accept(ALPN, RpcProtocol::new(server.clone()))
            .spawn();
        let client = Arc::new(IrohClient::new(
            endpoint.clone(),
            config.frame_limits,
            config.limits.clone(),
            relay,
            lookup,
            liveness,
        ));
        info!(id = %endpoint.id().fmt_short(), %local_addr, "iroh transport bound");
        Ok(IrohTransport {
            endpoint,
            router,
            server,
            client,
            local_addr,
            relay_url: config.relay_url,
            watchers: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// This node's identity.
    pub fn id(&self) -> PeerId {
        PeerId::from_bytes(*self.endpoint.id().as_bytes())
    }

    /// The socket address the endpoint is bound to.
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
            &self.endpoint.addr(),
            self.relay_url.clone(),
        )
    }

    /// [`Self::peer_addr`] as it changes: iroh follows the host's
    /// interfaces (its network monitor), and a node bound to an
    /// unspecified address advertises what it finds there, so the value
    /// changes when an address is added or deleted. The task that follows
    /// the endpoint ends when the endpoint closes or every receiver is
    /// dropped.
    pub fn watch_peer_addr(&self) -> watch::Receiver<PeerAddr> {
        let (tx, rx) = watch::channel(self.peer_addr());
        let mut addrs = self.endpoint.watch_addr();
        let (id, local, relay) = (self.id(), self.local_addr, self.relay_url.clone());
        let task = tokio::spawn(async move {
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
                    changed = addrs.updated() => if changed.is_err() { return },
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
        self.client.clone()
    }

    /// The iroh endpoint (for metrics and diagnostics).
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Graceful shutdown: stop taking calls, let calls in flight (both
    /// ways) finish within `drain`, close connections with the shutdown
    /// code, stop the router and close the endpoint.
    pub async fn shutdown(self, drain: Duration) {
        if let Ok(mut w) = self.watchers.lock() {
            for task in w.drain(..) {
                task.abort();
            }
        }
        self.client.begin_shutdown();
        self.server.begin_drain();
        let idle = async {
            tokio::join!(self.client.wait_idle(), self.server.calls.wait_idle());
        };
        if tokio::time::timeout(drain, idle).await.is_err() {
            warn!(
                server_calls = self.server.calls.count(),
                "drain deadline passed with calls still in flight; closing anyway"
            );
        }
        self.client.close_connections();
        self.server.close_connections();
        if let Err(e) = self.router.shutdown().await {
            warn!("router shutdown: {e}");
        }
        self.endpoint.close().await;
        info!(id = %self.endpoint.id().fmt_short(), "iroh transport stopped");
    }
}
