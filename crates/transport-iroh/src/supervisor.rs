//! The supervised endpoint: a liveness probe of the node's own iroh
//! endpoint, and its rebuild (same key, same port) when it has died.
//!
//! # Why an endpoint dies
//!
//! iroh 1.4 watches the host's interfaces (netwatch) and treats a new or
//! removed interface (a veth or TAP for a VM, a bridge) as a *major*
//! network change: its socket actor calls `rebind()` on its UDP socket.
//! netwatch's rebind (`SocketState::rebind`, netwatch 0.19) first drops the
//! old socket, then binds a new one on the same address and port. The drop
//! closes *our* file descriptor, but the port is released only when the
//! last reference to the socket goes, and a fork holds one: a child made
//! with `fork`/`posix_spawn` gets a copy of every descriptor, and
//! `O_CLOEXEC` closes them only at its `exec`. A node forks often exactly
//! when interfaces change (it runs `ip` to make a VM's TAP, starts QEMU or
//! a workload), so the bind can land in that window and fail with
//! `EADDRINUSE` (`iroh::socket: failed to rebind transports: ... AddrInUse`).
//! Measured on the 2-core build machine: closing a UDP socket and at once
//! binding a new one on its port failed with `EADDRINUSE` in 1012 of 5285
//! tries while another thread of the process spawned `true` in a loop, and
//! in none of 8269 without that thread.
//!
//! netwatch then leaves the socket closed: every receive and send answers
//! `BrokenPipe` ("socket closed") without marking the socket for another
//! rebind, so it stays dead until the *next* major change, which may be
//! minutes away. In iroh 1.4.1 the receive side gives up after five failed
//! receives in a row ("All transports failed to receive. QUIC endpoint will
//! be shutdown.") and the QUIC endpoint stops (iroh#4289); the test below
//! sees exactly this. Until then, or if the driver hangs instead,
//! `Endpoint::bound_sockets` still reports the old address
//! (it is updated only by a successful rebind), `Endpoint::is_closed` is
//! false, and iroh has no public call that forces a rebind
//! (`Endpoint::network_change` only asks netwatch to look again, which
//! rebinds only if it sees a major change). The test
//! `tests/endpoint_rebuild.rs` makes the same failure on purpose by
//! holding a duplicate of the socket's descriptor, as a forked child does,
//! while adding an interface.
//!
//! # Detection
//!
//! So the state iroh exposes cannot tell; the supervisor asks the socket
//! itself. Every [`PROBE_INTERVAL`] it sends the endpoint a QUIC version
//! negotiation probe ([`crate::probe`]) from a socket of its own, which
//! only a live socket and a live QUIC driver answer. An endpoint that
//! misses [`PROBE_FAILURES`] probes in a row (each waiting
//! [`PROBE_TIMEOUT`], retried after [`PROBE_RETRY`]) is dead: found within
//! about `PROBE_INTERVAL + PROBE_FAILURES * (PROBE_TIMEOUT + PROBE_RETRY)`
//! (under 8 s). The client's failed dials and timed-out calls (every peer
//! unreachable at once looks like this) wake the supervisor to probe at
//! once rather than at its next tick; they never decide alone, so a peer
//! that is really down does not cost a rebuild. The probe needs no peer,
//! so an idle node is watched too, and a live idle endpoint always
//! answers, so idleness is no false alarm. An endpoint that closed by
//! itself (iroh#4289: a dead endpoint driver) is rebuilt too.
//!
//! An endpoint that has never answered a probe (for example: bound to
//! `0.0.0.0` in a namespace whose loopback is down, so the probe cannot
//! reach it) is never rebuilt on probes: the supervisor warns once that it
//! cannot watch this endpoint, and keeps the gauge at 0.
//!
//! # Recovery
//!
//! The rebuild closes the client's pooled connections (calls on them fail
//! at once; the dual router sends them over gRPC where allowed) and the
//! connections served on the old endpoint, stops the old router and
//! closes the old endpoint (bounded by
//! [`OLD_ENDPOINT_CLOSE_BOUND`]), binds a new endpoint with the same
//! secret key on the same address and port, retrying with a doubling
//! backoff from [`REBIND_BACKOFF_START`] to [`REBIND_BACKOFF_MAX`] while
//! the port is still held, serves the same server state (its calls, limits and handler) on it and hands
//! it to the client. Peers see the same node id at the same address: they
//! dial it again when their own connection to the old endpoint times out
//! (the QUIC idle timeout, [`crate::config::DEFAULT_IDLE_TIMEOUT`]), or
//! sooner when a ping of theirs on it goes unanswered (the dual router's
//! path check; see [`crate::client`]); an idempotent call caught on it is
//! sent again on the new connection. Each rebuild is counted in
//! `tern_iroh_endpoint_rebuilds_total{reason}`;
//! `tern_iroh_endpoint_healthy` is 0 from the first missed probe until
//! the endpoint answers again.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use iroh::Endpoint;
use iroh::protocol::Router;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::client::IrohClient;
use crate::config::IrohConfig;
use crate::metrics::{self, RebuildReason};
use crate::probe;
use crate::server::ServerState;
use crate::transport::{BindError, bind_endpoint, serve};
use crate::wire::CLOSE_ENDPOINT_REBUILT;

/// Time between liveness probes of a healthy endpoint: a dead endpoint is
/// noticed within seconds, at two 1200-byte loopback datagrams a second.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How long one probe waits for its answer. A live endpoint answers in
/// well under a millisecond; 2 s leaves room for a loaded machine.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Time between the probes that follow an unanswered one.
pub const PROBE_RETRY: Duration = Duration::from_millis(250);
/// Unanswered probes in a row that make an endpoint dead: one lost
/// datagram or one stall of the machine is not enough.
pub const PROBE_FAILURES: u32 = 3;
/// First wait before binding again when the port is still held.
pub const REBIND_BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest wait between binding attempts.
pub const REBIND_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Bound on closing the dead endpoint before binding its successor: its
/// connections cannot send their close, so QUIC would wait for them.
pub const OLD_ENDPOINT_CLOSE_BOUND: Duration = Duration::from_secs(3);

const _: () = assert!(PROBE_RETRY.as_millis() < PROBE_INTERVAL.as_millis());
const _: () = assert!(REBIND_BACKOFF_START.as_millis() < REBIND_BACKOFF_MAX.as_millis());

/// What the supervisor knows about the endpoint, for health reports and
/// tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointHealth {
    /// The endpoint answered its last probe (true from the bind until a
    /// probe goes unanswered).
    pub healthy: bool,
    /// Probes answered since the transport was bound.
    pub probes_answered: u64,
    /// Rebuilds since the transport was bound.
    pub rebuilds: u64,
    /// Failed attempts to bind a replacement endpoint (the port was still
    /// held), over all rebuilds.
    pub bind_failures: u64,
}

/// The endpoint in service and what serves on it.
#[derive(Debug, Clone)]
pub(crate) struct Live {
    pub(crate) endpoint: Endpoint,
    pub(crate) router: Router,
}

/// The state the transport and its supervisor share.
#[derive(Debug)]
pub(crate) struct Supervised {
    /// The configuration, its `bind_addr` the address actually bound (a
    /// replacement takes the same port even when port 0 was asked for).
    config: IrohConfig,
    server: Arc<ServerState>,
    client: Arc<IrohClient>,
    live: Mutex<Live>,
    healthy: AtomicBool,
    probes_answered: AtomicU64,
    rebuilds: AtomicU64,
    bind_failures: AtomicU64,
}

impl Supervised {
    pub(crate) fn new(
        config: IrohConfig,
        server: Arc<ServerState>,
        client: Arc<IrohClient>,
        live: Live,
    ) -> Supervised {
        metrics::endpoint_bound();
        Supervised {
            config,
            server,
            client,
            live: Mutex::new(live),
            healthy: AtomicBool::new(true),
            probes_answered: AtomicU64::new(0),
            rebuilds: AtomicU64::new(0),
            bind_failures: AtomicU64::new(0),
        }
    }

    /// The endpoint and router in service now.
    pub(crate) fn live(&self) -> Live {
        match self.live.lock() {
            Ok(live) => live.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set_live(&self, new: Live) {
        match self.live.lock() {
            Ok(mut live) => *live = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
    }

    pub(crate) fn health(&self) -> EndpointHealth {
        EndpointHealth {
            healthy: self.healthy.load(Ordering::SeqCst),
            probes_answered: self.probes_answered.load(Ordering::SeqCst),
            rebuilds: self.rebuilds.load(Ordering::SeqCst),
            bind_failures: self.bind_failures.load(Ordering::SeqCst),
        }
    }

    fn set_healthy(&self, healthy: bool) {
        if self.healthy.swap(healthy, Ordering::SeqCst) != healthy {
            metrics::endpoint_healthy(healthy);
        }
    }

    fn addr(&self) -> SocketAddr {
        self.config.bind_addr
    }

    pub(crate) fn client(&self) -> &Arc<IrohClient> {
        &self.client
    }

    pub(crate) fn server(&self) -> &Arc<ServerState> {
        &self.server
    }
}

/// Watches the endpoint until `stop` turns true; rebuilds it when it dies.
pub(crate) async fn supervise(shared: Arc<Supervised>, mut stop: watch::Receiver<bool>) {
    let target = probe::probe_target(shared.addr());
    let suspect = shared.client.suspect();
    let mut failures = 0u32;
    // Whether the endpoint in service has answered a probe yet.
    let mut answered = false;
    let mut warned_unwatchable = false;
    loop {
        let endpoint = shared.live().endpoint;
        let wait = if failures == 0 {
            PROBE_INTERVAL
        } else {
            PROBE_RETRY
        };
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(wait) => {}
            () = suspect.notified(), if failures == 0 => {
                debug!("a dial failed or a call timed out; probing the iroh endpoint now");
            }
            () = endpoint.closed() => {
                if *stop.borrow() {
                    return;
                }
                if !rebuild(&shared, RebuildReason::Closed, "the endpoint closed by itself", &mut stop).await {
                    return;
                }
                (failures, answered) = (0, false);
                continue;
            }
        }
        match probe::probe(target, PROBE_TIMEOUT).await {
            Ok(()) => {
                if failures > 0 || !shared.healthy.load(Ordering::SeqCst) {
                    info!(addr = %shared.addr(), "the iroh endpoint answers its liveness probe again");
                }
                shared.set_healthy(true);
                shared.probes_answered.fetch_add(1, Ordering::SeqCst);
                (failures, answered) = (0, true);
            }
            Err(e) => {
                failures += 1;
                metrics::probe_failed();
                shared.set_healthy(false);
                debug!(failures, "iroh endpoint liveness probe failed: {e}");
                if failures < PROBE_FAILURES {
                    continue;
                }
                if !answered {
                    if !warned_unwatchable {
                        warn!(
                            addr = %shared.addr(),
                            "the iroh endpoint has never answered its liveness probe ({e}); Tern cannot tell whether it dies. Check that the probe can reach it (the loopback interface must be up when binding to an unspecified address)"
                        );
                        warned_unwatchable = true;
                    }
                    failures = 0;
                    continue;
                }
                let why = format!("{PROBE_FAILURES} liveness probes in a row got no answer: {e}");
                if !rebuild(&shared, RebuildReason::Probe, &why, &mut stop).await {
                    return;
                }
                (failures, answered) = (0, false);
            }
        }
    }
}

/// Replaces the dead endpoint. Returns false if `stop` turned true first
/// (the transport is shutting down and takes it from here).
async fn rebuild(
    shared: &Supervised,
    reason: RebuildReason,
    why: &str,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let addr = shared.addr();
    shared.set_healthy(false);
    error!(
        %addr,
        reason = reason.as_str(),
        "the iroh endpoint is dead ({why}); rebuilding it with the same key and port. Calls over iroh fail until it is back (the dual router sends them over gRPC where allowed). Rebuilds that repeat: see \"iroh endpoint rebuilds\" in docs/operations.md"
    );
    let old = shared.live();
    shared.client.drop_connections();
    shared
        .server
        .close_connections(CLOSE_ENDPOINT_REBUILT, b"endpoint rebuilt");
    if tokio::time::timeout(OLD_ENDPOINT_CLOSE_BOUND, old.router.shutdown())
        .await
        .is_err()
    {
        warn!(
            %addr,
            "the dead iroh endpoint did not close within {} s; binding its replacement anyway",
            OLD_ENDPOINT_CLOSE_BOUND.as_secs()
        );
    }
    let Some((endpoint, attempts)) = bind_with_backoff(shared, stop).await else {
        return false;
    };
    let router = serve(endpoint.clone(), shared.server.clone());
    shared.set_live(Live {
        endpoint: endpoint.clone(),
        router,
    });
    shared.client.replace_endpoint(endpoint);
    shared.rebuilds.fetch_add(1, Ordering::SeqCst);
    metrics::endpoint_rebuilt(reason);
    info!(
        %addr,
        attempts,
        "iroh endpoint rebuilt with the same key and port; peers reconnect by themselves"
    );
    true
}

/// Binds the replacement endpoint, retrying while the port is held.
/// Returns it and the attempts it took, or `None` if `stop` turned true.
async fn bind_with_backoff(
    shared: &Supervised,
    stop: &mut watch::Receiver<bool>,
) -> Option<(Endpoint, u32)> {
    let mut delay = REBIND_BACKOFF_START;
    let mut attempts = 0u32;
    loop {
        if *stop.borrow() {
            return None;
        }
        attempts += 1;
        match bind_endpoint(
            &shared.config,
            shared.client.lookup(),
            shared.client.liveness(),
        )
        .await
        {
            Ok(endpoint) => return Some((endpoint, attempts)),
            Err(e) => {
                shared.bind_failures.fetch_add(1, Ordering::SeqCst);
                log_bind_failure(shared.addr(), attempts, delay, &e);
            }
        }
        tokio::select! {
            _ = stop.changed() => return None,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(REBIND_BACKOFF_MAX);
    }
}

fn log_bind_failure(addr: SocketAddr, attempts: u32, delay: Duration, e: &BindError) {
    // The first failures are expected (the port is released a moment
    // later); the tenth says something else holds it.
    if attempts < 10 {
        warn!(%addr, attempts, retry_in_ms = delay.as_millis() as u64, "binding the replacement iroh endpoint failed: {e}");
    } else {
        error!(
            %addr,
            attempts,
            retry_in_ms = delay.as_millis() as u64,
            "binding the replacement iroh endpoint keeps failing: {e}. Find what holds the port (`ss -uanp 'sport = :{}'`); Tern keeps trying",
            addr.port()
        );
    }
}
