//! [`DualRouter`]: an [`RpcClient`] over both transports, driven by the
//! [`Policy`] in force.
//!
//! For each call:
//! 1. The policy names the preferred transport for the call's service (for
//!    Raft under `adaptive`, the per-peer [`Adaptive`] chooser does).
//! 2. A peer that does not serve the preferred transport (a node not yet
//!    migrated) is reached over the other; so is any peer when this node has
//!    no client for the preferred one. Counted as a reroute.
//! 3. A call preferring iroh, with `fallback_to_grpc` on and gRPC available,
//!    gets part of its time budget on iroh and keeps [`FALLBACK_RESERVE`]
//!    for gRPC. On a transport error that [`CallError::is_safe_to_retry`]
//!    allows, it is sent again over gRPC; the fallback is counted per
//!    service and logged. Application errors are answers and never retried.
//! 4. A call on iroh that is slow to answer has its path checked: after
//!    [`PATH_CHECK_AFTER`] without an answer the router pings the peer over
//!    iroh; if the ping fails too, the path is dead (UDP blocked, say) and
//!    an idempotent call goes to gRPC at once rather than after its whole
//!    iroh budget (seconds for a forwarded write). A slow handler on a live
//!    path keeps its call. The ping runs on a task of its own, so a call
//!    whose iroh budget ends first still has its fallback counted by the
//!    ping's verdict (`path_dead`, unplanned, rather than `timed_out`).
//! 5. After an iroh failure the peer's [`Breaker`] sends calls straight to
//!    gRPC for a cool-down, so a blocked path costs one timeout (or one
//!    failed path check), not one per call. An iroh call that timed out,
//!    however short, has its path checked in the background: a peer whose
//!    endpoint was rebuilt leaves a silent pooled connection, which the
//!    check's unanswered ping closes, so the breaker's next trial dials
//!    afresh instead of timing out until the QUIC idle timeout.
//!
//! Streams ([`DualRouter::open_stream_routed`]) are routed the same way;
//! only their opening may fall back (before the stream is handed to the
//! caller). A stream that breaks after that is the caller's to resume.
//!
//! The policy is swapped atomically ([`DualRouter::set_policy`]): a call
//! reads it once when it starts, so calls in flight finish under the policy
//! they started with and none fails because of the change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tern_protocol::metric_names as names;
use tern_protocol::{
    BoxFuture, Call, CallError, CallStream, Delivery, PeerAddr, PeerId, RpcClient, ServiceId,
    StreamCall, TransportError, TransportErrorKind, TransportKind,
};

use crate::adaptive::Adaptive;
use crate::breaker::{Admit, Breaker};
use crate::policy::{Mode, Policy, Preference, RaftTransport};

/// Most of a call's time kept back for the gRPC fallback when the first
/// attempt goes over iroh (half the timeout if that is less).
pub const FALLBACK_RESERVE: Duration = Duration::from_secs(3);
/// A fallback is not attempted with less time left than this.
pub const MIN_FALLBACK_TIME: Duration = Duration::from_millis(20);
/// An iroh call that may fall back and has had no answer for this long has
/// its path pinged (see [`DualRouter::call_routed`]); a healthy call on a
/// LAN answers in milliseconds, a Raft commit under load in tens.
pub const PATH_CHECK_AFTER: Duration = Duration::from_millis(500);
/// A path whose ping fails within this long is taken for dead and the call
/// goes to gRPC.
pub const PATH_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a fallback waiting to be classified waits for the path check
/// in flight: the check ends within its ping's [`PATH_CHECK_TIMEOUT`];
/// the tenth more keeps a check that started with the wait from losing a
/// tie with it.
pub const PATH_CHECK_SETTLE: Duration =
    PATH_CHECK_TIMEOUT.saturating_add(Duration::from_millis(100));
/// How often idle adaptive paths are pinged.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// Timeout of one probe ping.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// A peer with no Raft call for this long is no longer probed.
pub const PROBE_FORGET: Duration = Duration::from_secs(60);

/// How long a path check's "dead" verdict classes a timed-out iroh call to
/// that peer as [`names::FALLBACK_PATH_DEAD`] rather than a missed
/// deadline (a check that finds the path alive clears it sooner).
pub const PATH_DEAD_MEMORY: Duration = Duration::from_secs(10);

/// What the router keeps per peer.
#[derive(Debug)]
struct PeerState {
    addr: PeerAddr,
    breaker: Breaker,
    adaptive: Adaptive,
    last_raft_call: Option<Instant>,
    /// The last path check of iroh to this peer, shared by the calls
    /// waiting on it.
    path: PathCheck,
}

/// What the router knows of one peer's iroh path from its path checks:
/// calls waiting on the same peer share one check instead of each pinging.
#[derive(Debug)]
struct PathCheck {
    /// When a check last found the path alive, or an iroh call that had
    /// waited for a check was answered.
    alive_at: Option<Instant>,
    /// When a check last found it dead, and what the ping said.
    dead: Option<(Instant, TransportError)>,
    /// A check is in flight.
    checking: bool,
    /// Bumped each time a check ends, whatever its verdict: a fallback
    /// waiting to be classified ([`DualRouter::settled_reason`]) waits on
    /// it.
    settled: tokio::sync::watch::Sender<u64>,
}

impl Default for PathCheck {
    fn default() -> PathCheck {
        PathCheck {
            alive_at: None,
            dead: None,
            checking: false,
            settled: tokio::sync::watch::Sender::new(0),
        }
    }
}

/// What a waiting call does in one round of its path watch.
enum Round {
    /// The path answered recently, or another call is checking it.
    Wait,
    /// It failed a check recently: give up on iroh.
    Dead(TransportError),
    /// Check it now (this call holds `checking`).
    Check,
}

/// Clears `checking` and tells the waiters when the check is done (or its
/// task is dropped).
struct Checking {
    router: DualRouter,
    peer: PeerAddr,
}

impl Drop for Checking {
    fn drop(&mut self) {
        self.router.with_peer(&self.peer, |p| {
            p.path.checking = false;
            p.path.settled.send_modify(|n| *n = n.wrapping_add(1));
        });
    }
}

struct Inner {
    grpc: Option<Arc<dyn RpcClient>>,
    iroh: Option<Arc<dyn RpcClient>>,
    policy: RwLock<Arc<Policy>>,
    peers: Mutex<HashMap<PeerId, PeerState>>,
}

/// The router. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct DualRouter {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DualRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DualRouter")
            .field("grpc", &self.inner.grpc.is_some())
            .field("iroh", &self.inner.iroh.is_some())
            .field("policy", &self.policy())
            .finish()
    }
}

/// How one call was routed, for the caller's logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The transport tried first.
    pub first: TransportKind,
    /// Whether the call fell back to gRPC.
    pub fell_back: bool,
}

fn label(kind: TransportKind) -> &'static str {
    kind.as_str()
}

impl DualRouter {
    /// A router over the clients this node has (at least one).
    pub fn new(
        grpc: Option<Arc<dyn RpcClient>>,
        iroh: Option<Arc<dyn RpcClient>>,
        policy: Policy,
    ) -> DualRouter {
        DualRouter {
            inner: Arc::new(Inner {
                grpc,
                iroh,
                policy: RwLock::new(Arc::new(policy)),
                peers: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        match self.inner.policy.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the policy atomically and returns the previous one. Calls
    /// in flight finish under the policy they started with.
    pub fn set_policy(&self, policy: Policy) -> Arc<Policy> {
        let new = Arc::new(policy);
        let old = {
            let mut guard = match self.inner.policy.write() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            std::mem::replace(&mut *guard, new.clone())
        };
        if *old != *new {
            metrics::counter!(names::ROUTER_POLICY_CHANGES).increment(1);
            tracing::info!(old = ?old.to_config(), new = ?new.to_config(), "transport policy changed");
        }
        old
    }

    /// Which transport Raft uses to `peer` now (for status displays).
    pub fn raft_transport_to(&self, peer: &PeerId) -> Option<TransportKind> {
        let policy = self.policy();
        match policy.preference(ServiceId::Raft) {
            Preference::Fixed(kind) => Some(kind),
            Preference::Adaptive => {
                self.with_peers(|peers| peers.get(peer).map(|p| p.adaptive.current()))
            }
        }
    }

    fn client(&self, kind: TransportKind) -> Option<&Arc<dyn RpcClient>> {
        match kind {
            TransportKind::Grpc => self.inner.grpc.as_ref(),
            TransportKind::Iroh => self.inner.iroh.as_ref(),
        }
    }

    fn available(&self, kind: TransportKind, peer: &PeerAddr) -> bool {
        self.client(kind).is_some() && peer.transports().contains(kind)
    }

    fn with_peers<T>(&self, f: impl FnOnce(&mut HashMap<PeerId, PeerState>) -> T) -> T {
        let mut guard = match self.inner.peers.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    fn with_peer<T>(&self, peer: &PeerAddr, f: impl FnOnce(&mut PeerState) -> T) -> T {
        self.with_peers(|peers| {
            let state = peers.entry(peer.id).or_insert_with(|| PeerState {
                addr: peer.clone(),
                breaker: Breaker::default(),
                adaptive: Adaptive::default(),
                last_raft_call: None,
                path: PathCheck::default(),
            });
            if state.addr != *peer {
                state.addr = peer.clone();
            }
            f(state)
        })
    }

    /// The transport to try first for `service` on `peer` under `policy`,
    /// and whether a failure there may fall back to gRPC; counts a
    /// reroute. `NotServed` when no transport is common.
    fn first_choice(
        &self,
        policy: &Policy,
        peer: &PeerAddr,
        service: ServiceId,
        started: Instant,
    ) -> Result<(TransportKind, bool), TransportError> {
        let preferred = match policy.preference(service) {
            Preference::Fixed(kind) => kind,
            Preference::Adaptive => self.with_peer(peer, |p| {
                p.last_raft_call = Some(started);
                p.adaptive.current()
            }),
        };
        let first = if self.available(preferred, peer) {
            preferred
        } else {
            let other = match preferred {
                TransportKind::Grpc => TransportKind::Iroh,
                TransportKind::Iroh => TransportKind::Grpc,
            };
            if !self.available(other, peer) {
                return Err(TransportError::new(
                    preferred,
                    TransportErrorKind::NotServed,
                    Delivery::NotDelivered,
                    format!(
                        "peer {} serves {:?} but this node has clients for grpc={} iroh={}",
                        peer.id.short(),
                        peer.transports(),
                        self.inner.grpc.is_some(),
                        self.inner.iroh.is_some()
                    ),
                ));
            }
            let reason = if self.client(preferred).is_none() {
                "no_local_client"
            } else {
                "peer_does_not_serve"
            };
            metrics::counter!(names::ROUTER_REROUTES, "service" => service.name(), "reason" => reason)
                .increment(1);
            other
        };
        let can_fall_back = first == TransportKind::Iroh
            && policy.fallback_to_grpc
            && self.available(TransportKind::Grpc, peer);
        Ok((first, can_fall_back))
    }

    /// Opens a streaming call on `peer` and says how it was routed: the
    /// transport is chosen as for a call; an opening that fails on iroh
    /// before the stream was handed over is opened again over gRPC under
    /// the same rules as a call's fallback (a transport error,
    /// [`CallError::is_safe_to_retry`], time left). Once opened, a stream's
    /// failures are the caller's: nothing is retried, since messages may
    /// have been delivered.
    pub async fn open_stream_routed(
        &self,
        peer: &PeerAddr,
        call: StreamCall,
    ) -> (Result<CallStream, CallError>, Option<Route>) {
        let policy = self.policy();
        let method = call.method;
        let service = method.service;
        let started = crate::now();
        let deadline = started + call.open_timeout;
        let (first, can_fall_back) = match self.first_choice(&policy, peer, service, started) {
            Ok(choice) => choice,
            Err(err) => return (Err(err.into()), None),
        };
        let route = |first, fell_back| Some(Route { first, fell_back });
        if can_fall_back
            && let Admit::Open { .. } = self.with_peer(peer, |p| p.breaker.admit(started))
        {
            metrics::counter!(names::ROUTER_FALLBACKS, "service" => service.name(), "method" => method.name, "reason" => names::FALLBACK_BREAKER_OPEN)
                .increment(1);
            let result = self.attempt_stream(TransportKind::Grpc, peer, call).await;
            return (result, route(TransportKind::Grpc, true));
        }
        let budget = if can_fall_back {
            call.open_timeout
                .saturating_sub(FALLBACK_RESERVE.min(call.open_timeout / 2))
        } else {
            call.open_timeout
        };
        let opening = self.attempt_stream(first, peer, call.clone().with_open_timeout(budget));
        let result = if first == TransportKind::Iroh && can_fall_back && method.idempotent {
            self.watched(peer, opening).await
        } else {
            opening.await
        };
        if first == TransportKind::Iroh && can_fall_back {
            match &result {
                Ok(_) => self.with_peer(peer, |p| p.breaker.on_success()),
                Err(CallError::Application(_)) => self.with_peer(peer, |p| p.breaker.on_neutral()),
                Err(CallError::Transport(_)) => {
                    self.with_peer(peer, |p| p.breaker.on_failure(crate::now()))
                }
            }
        }
        if first == TransportKind::Iroh
            && let Err(CallError::Transport(e)) = &result
        {
            self.check_after_timeout(peer, e);
        }
        let err = match &result {
            Err(CallError::Transport(e))
                if can_fall_back && result_is_retryable(&result, method) =>
            {
                e.clone()
            }
            _ => return (result, route(first, false)),
        };
        let remaining = deadline.saturating_duration_since(crate::now());
        if remaining < MIN_FALLBACK_TIME {
            return (result, route(first, false));
        }
        self.count_fallback(peer, &err, method);
        tracing::warn!(
            peer = %peer.id.short(),
            method = %method.label(),
            error = %err,
            "iroh stream failed to open; opening it over gRPC"
        );
        let retried = self
            .attempt_stream(TransportKind::Grpc, peer, call.with_open_timeout(remaining))
            .await;
        (retried, route(first, true))
    }

    async fn attempt_stream(
        &self,
        kind: TransportKind,
        peer: &PeerAddr,
        call: StreamCall,
    ) -> Result<CallStream, CallError> {
        let Some(client) = self.client(kind) else {
            return Err(TransportError::new(
                kind,
                TransportErrorKind::NotServed,
                Delivery::NotDelivered,
                "no client",
            )
            .into());
        };
        let service = call.method.service;
        metrics::counter!(names::ROUTER_CALLS, "service" => service.name(), "transport" => label(kind)).increment(1);
        let result = client.open_stream(peer, call).await;
        if service == ServiceId::Raft
            && let Err(CallError::Transport(_)) = &result
        {
            let switch = self.with_peer(peer, |p| p.adaptive.record_error(kind, crate::now()));
            self.note_switch(peer, switch);
        }
        result
    }

    /// Calls `call` on `peer` and says how it was routed.
    pub async fn call_routed(
        &self,
        peer: &PeerAddr,
        call: Call,
    ) -> (Result<Bytes, CallError>, Option<Route>) {
        let policy = self.policy();
        let method = call.method;
        let service = method.service;
        let started = crate::now();
        let deadline = started + call.timeout;

        let (first, can_fall_back) = match self.first_choice(&policy, peer, service, started) {
            Ok(choice) => choice,
            Err(err) => return (Err(err.into()), None),
        };

        if can_fall_back
            && let Admit::Open { .. } = self.with_peer(peer, |p| p.breaker.admit(started))
        {
            metrics::counter!(names::ROUTER_FALLBACKS, "service" => service.name(), "method" => method.name, "reason" => names::FALLBACK_BREAKER_OPEN)
                .increment(1);
            let result = self.attempt(TransportKind::Grpc, peer, call).await;
            return (
                result,
                Some(Route {
                    first: TransportKind::Grpc,
                    fell_back: true,
                }),
            );
        }

        let budget = if can_fall_back {
            call.timeout
                .saturating_sub(FALLBACK_RESERVE.min(call.timeout / 2))
        } else {
            call.timeout
        };
        let attempt = self.attempt(first, peer, call.clone().with_timeout(budget));
        let result = if first == TransportKind::Iroh && can_fall_back && method.idempotent {
            self.watched(peer, attempt).await
        } else {
            attempt.await
        };
        if first == TransportKind::Iroh && can_fall_back {
            match &result {
                Ok(_) => self.with_peer(peer, |p| p.breaker.on_success()),
                Err(CallError::Application(_)) => self.with_peer(peer, |p| p.breaker.on_neutral()),
                Err(CallError::Transport(_)) => {
                    self.with_peer(peer, |p| p.breaker.on_failure(crate::now()))
                }
            }
        }
        if first == TransportKind::Iroh
            && let Err(CallError::Transport(e)) = &result
        {
            self.check_after_timeout(peer, e);
        }
        let Err(err) = &result else {
            return (
                result,
                Some(Route {
                    first,
                    fell_back: false,
                }),
            );
        };
        let Some(transport_err) = err.as_transport() else {
            return (
                result,
                Some(Route {
                    first,
                    fell_back: false,
                }),
            );
        };
        if !can_fall_back || !err.is_safe_to_retry(method) {
            return (
                result,
                Some(Route {
                    first,
                    fell_back: false,
                }),
            );
        }
        let remaining = deadline.saturating_duration_since(crate::now());
        if remaining < MIN_FALLBACK_TIME {
            return (
                result,
                Some(Route {
                    first,
                    fell_back: false,
                }),
            );
        }
        self.count_fallback(peer, transport_err, method);
        tracing::warn!(
            peer = %peer.id.short(),
            method = %method.label(),
            error = %transport_err,
            "iroh call failed at the transport level; retrying over gRPC"
        );
        let retried = self
            .attempt(TransportKind::Grpc, peer, call.with_timeout(remaining))
            .await;
        (
            retried,
            Some(Route {
                first,
                fell_back: true,
            }),
        )
    }

    /// The `reason` label of a fallback after `err` on iroh: the error's
    /// kind, except that a `TimedOut` on a path a ping found dead within
    /// [`PATH_DEAD_MEMORY`] (and none found alive since) is
    /// [`names::FALLBACK_PATH_DEAD`] — the path failed, the call did not
    /// merely miss its deadline. The split decides what counts as an
    /// unplanned fallback ([`names::fallback_is_unplanned`]).
    fn fallback_reason(&self, peer: &PeerAddr, err: &TransportError) -> &'static str {
        if err.kind != TransportErrorKind::TimedOut {
            return err.kind.as_str();
        }
        let now = crate::now();
        let dead = self.with_peer(peer, |p| {
            p.path
                .dead
                .as_ref()
                .is_some_and(|(at, _)| now.saturating_duration_since(*at) < PATH_DEAD_MEMORY)
        });
        if dead {
            names::FALLBACK_PATH_DEAD
        } else {
            err.kind.as_str()
        }
    }

    /// Counts a fallback after `err` on iroh under its reason
    /// ([`DualRouter::fallback_reason`]). A `TimedOut` while a check of the
    /// peer's path is in flight is counted once the check's verdict is in
    /// (at most [`PATH_CHECK_SETTLE`] later, on a task of its own): the
    /// call's iroh budget and the check can end together (a 3 s call gives
    /// iroh 1.5 s; a check pings after 0.5 s and waits 1 s), and which of
    /// the two came first must not decide whether a dead path counts as
    /// unplanned. The retry over gRPC does not wait for the verdict.
    fn count_fallback(
        &self,
        peer: &PeerAddr,
        err: &TransportError,
        method: &'static tern_protocol::Method,
    ) {
        let count = move |reason: &'static str| {
            metrics::counter!(names::ROUTER_FALLBACKS, "service" => method.service.name(), "method" => method.name, "reason" => reason)
                .increment(1);
        };
        let pending =
            err.kind == TransportErrorKind::TimedOut && self.with_peer(peer, |p| p.path.checking);
        if !pending {
            count(self.fallback_reason(peer, err));
            return;
        }
        let (router, peer, err) = (self.clone(), peer.clone(), err.clone());
        tokio::spawn(async move { count(router.settled_reason(&peer, &err).await) });
    }

    /// [`DualRouter::fallback_reason`] once no check of `peer`'s path is in
    /// flight (waiting [`PATH_CHECK_SETTLE`] at most for the one that is).
    async fn settled_reason(&self, peer: &PeerAddr, err: &TransportError) -> &'static str {
        if err.kind == TransportErrorKind::TimedOut {
            let pending = self.with_peer(peer, |p| {
                p.path.checking.then(|| p.path.settled.subscribe())
            });
            if let Some(mut settled) = pending {
                // An error means the peer's state was dropped: classify
                // now.
                let _ = tokio::time::timeout(PATH_CHECK_SETTLE, settled.changed()).await;
            }
        }
        self.fallback_reason(peer, err)
    }

    /// Runs `attempt` (a call or a stream opening on iroh that may fall
    /// back) while watching its path: once it has gone [`PATH_CHECK_AFTER`]
    /// without an answer, and every [`PATH_CHECK_AFTER`] after that, the
    /// iroh path to `peer` is pinged. A ping that fails at the transport
    /// level within [`PATH_CHECK_TIMEOUT`] means the path is dead (UDP
    /// blocked, the peer's address gone): the attempt is abandoned with a
    /// `TimedOut` error that may have been delivered, so the caller falls
    /// back to gRPC at once instead of waiting out the whole iroh budget.
    /// Only used for idempotent methods, which are safe to send again. A
    /// ping that answers leaves the attempt running: the handler is slow,
    /// not the path. Calls waiting on the same peer share one check (see
    /// [`PathCheck`]): one pings, the others use its verdict.
    async fn watched<T>(
        &self,
        peer: &PeerAddr,
        attempt: impl std::future::Future<Output = Result<T, CallError>>,
    ) -> Result<T, CallError> {
        let Some(iroh) = self.client(TransportKind::Iroh).cloned() else {
            return attempt.await;
        };
        let started = crate::now();
        let watch = async {
            loop {
                tokio::time::sleep(PATH_CHECK_AFTER).await;
                match self.path_round(peer) {
                    Round::Wait => continue,
                    Round::Dead(e) => break e,
                    Round::Check => {}
                }
                if let Some(dead) = self.check_path(peer, iroh.clone()).await {
                    break dead;
                }
            }
        };
        tokio::select! {
            biased;
            result = attempt => {
                if !matches!(result, Err(CallError::Transport(_)))
                    && crate::now().saturating_duration_since(started) >= PATH_CHECK_AFTER
                {
                    // iroh answered: a check still in flight must not
                    // call the path dead.
                    self.with_peer(peer, |p| p.path.alive_at = Some(crate::now()));
                }
                result
            }
            dead = watch => {
                let waited = crate::now().saturating_duration_since(started);
                tracing::warn!(
                    peer = %peer.id.short(),
                    waited_ms = waited.as_millis(),
                    error = %dead,
                    "the iroh path stopped answering pings; giving up on iroh for this call"
                );
                Err(TransportError::new(
                    TransportKind::Iroh,
                    TransportErrorKind::TimedOut,
                    Delivery::MayHaveBeenDelivered,
                    format!(
                        "no answer after {} ms and the path did not answer a ping ({dead})",
                        waited.as_millis()
                    ),
                )
                .into())
            }
        }
    }

    /// After an iroh attempt to `peer` timed out (`err`), checks the path
    /// in the background unless a check is in flight or a verdict is
    /// fresh. A call too short to be watched (a Raft append's budget is
    /// tens of milliseconds) never pings; yet a peer whose endpoint died
    /// and was rebuilt leaves the pooled connection to it silent until the
    /// QUIC idle timeout, and every call and breaker trial on it times out
    /// meanwhile. The check's unanswered ping closes that connection (see
    /// `tern_transport_iroh`'s "Silent connections"), so the next call
    /// dials the rebuilt endpoint; its verdict also classes the fallback
    /// ([`DualRouter::count_fallback`]).
    fn check_after_timeout(&self, peer: &PeerAddr, err: &TransportError) {
        if err.kind != TransportErrorKind::TimedOut {
            return;
        }
        let Some(iroh) = self.client(TransportKind::Iroh).cloned() else {
            return;
        };
        if let Round::Check = self.path_round(peer) {
            // The check runs on its own task; its verdict is recorded.
            drop(self.check_path(peer, iroh));
        }
    }

    /// Pings `peer` over iroh on a task of its own (this call holds
    /// `checking`, see [`DualRouter::path_round`]) and records the verdict;
    /// answers the ping's error when the path is dead. The task outlives a
    /// call that stops waiting (its attempt ended first), so the verdict is
    /// still recorded for the calls and fallbacks waiting on it.
    fn check_path(
        &self,
        peer: &PeerAddr,
        iroh: Arc<dyn RpcClient>,
    ) -> impl std::future::Future<Output = Option<TransportError>> + use<> {
        let checking = Checking {
            router: self.clone(),
            peer: peer.clone(),
        };
        let task = tokio::spawn(async move {
            let Checking { router, peer } = &checking;
            let sent = crate::now();
            let result = iroh.ping(peer, PATH_CHECK_TIMEOUT).await;
            let at = crate::now();
            router.with_peer(peer, |p| {
                let answered = p.path.alive_at.is_some_and(|a| a >= sent);
                match result {
                    Err(CallError::Transport(e)) if !answered => {
                        metrics::counter!(names::ROUTER_PATH_CHECKS, "outcome" => "dead")
                            .increment(1);
                        p.path.dead = Some((at, e.clone()));
                        Some(e)
                    }
                    _ => {
                        metrics::counter!(names::ROUTER_PATH_CHECKS, "outcome" => "alive")
                            .increment(1);
                        p.path.alive_at = Some(at);
                        p.path.dead = None;
                        None
                    }
                }
            })
        });
        async move { task.await.ok().flatten() }
    }

    /// One round of a waiting call's path watch: a verdict younger than
    /// [`PATH_CHECK_AFTER`] is reused, a check in flight is waited for,
    /// otherwise this call checks.
    fn path_round(&self, peer: &PeerAddr) -> Round {
        let now = crate::now();
        let recent = |at: Instant| now.saturating_duration_since(at) < PATH_CHECK_AFTER;
        self.with_peer(peer, |p| {
            if let Some((at, e)) = &p.path.dead
                && recent(*at)
            {
                return Round::Dead(e.clone());
            }
            if p.path.alive_at.is_some_and(recent) || p.path.checking {
                return Round::Wait;
            }
            p.path.checking = true;
            Round::Check
        })
    }

    async fn attempt(
        &self,
        kind: TransportKind,
        peer: &PeerAddr,
        call: Call,
    ) -> Result<Bytes, CallError> {
        let Some(client) = self.client(kind) else {
            return Err(TransportError::new(
                kind,
                TransportErrorKind::NotServed,
                Delivery::NotDelivered,
                "no client",
            )
            .into());
        };
        let service = call.method.service;
        metrics::counter!(names::ROUTER_CALLS, "service" => service.name(), "transport" => label(kind)).increment(1);
        let result = client.call(peer, call).await;
        if service == ServiceId::Raft
            && let Err(CallError::Transport(_)) = &result
        {
            let switch = self.with_peer(peer, |p| p.adaptive.record_error(kind, crate::now()));
            self.note_switch(peer, switch);
        }
        result
    }

    fn note_switch(&self, peer: &PeerAddr, switch: Option<crate::adaptive::Switch>) {
        if let Some(s) = switch {
            metrics::counter!(names::ROUTER_ADAPTIVE_SWITCHES, "from" => label(s.from), "to" => label(s.to))
                .increment(1);
            metrics::gauge!(names::ROUTER_ADAPTIVE_IROH, "peer" => peer.id.short()).set(
                if s.to == TransportKind::Iroh {
                    1.0
                } else {
                    0.0
                },
            );
            tracing::info!(peer = %peer.id.short(), from = %s.from, to = %s.to, reason = %s.reason, "adaptive Raft transport switched");
        }
    }

    /// Starts the task that pings both paths of peers under adaptive Raft,
    /// so the chooser has fresh, comparable round trips (pings measure the
    /// path alone; Raft calls include disk flushes and would bias it). The
    /// task ends when the last clone of the router is dropped.
    pub fn start_probing(&self) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PROBE_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let router = DualRouter { inner };
                router.probe_once().await;
            }
        })
    }

    /// One round of probes (public for tests and benchmarks).
    pub async fn probe_once(&self) {
        let policy = self.policy();
        if policy.mode != Mode::Dual || policy.raft_transport != RaftTransport::Adaptive {
            return;
        }
        let now = crate::now();
        let due: Vec<(PeerAddr, TransportKind)> = self.with_peers(|peers| {
            peers.retain(|_, p| {
                p.last_raft_call
                    .is_none_or(|t| now.saturating_duration_since(t) < PROBE_FORGET)
            });
            peers
                .values()
                .filter(|p| p.last_raft_call.is_some())
                .flat_map(|p| {
                    [TransportKind::Grpc, TransportKind::Iroh]
                        .into_iter()
                        .filter(|k| p.adaptive.stats(*k).is_stale(now))
                        .map(|k| (p.addr.clone(), k))
                        .collect::<Vec<_>>()
                })
                .filter(|(addr, k)| self.available(*k, addr))
                .collect()
        });
        for (addr, kind) in due {
            let Some(client) = self.client(kind) else {
                continue;
            };
            let result = client.ping(&addr, PROBE_TIMEOUT).await;
            let now = crate::now();
            let switch = self.with_peer(&addr, |p| match &result {
                Ok(rtt) => p.adaptive.record_ok(kind, *rtt, now),
                Err(_) => p.adaptive.record_error(kind, now),
            });
            self.note_switch(&addr, switch);
        }
    }
}

fn result_is_retryable(
    result: &Result<CallStream, CallError>,
    method: &tern_protocol::Method,
) -> bool {
    matches!(result, Err(e) if e.is_safe_to_retry(method))
}

impl RpcClient for DualRouter {
    fn transport(&self) -> TransportKind {
        match self.policy().mode {
            Mode::Iroh => TransportKind::Iroh,
            Mode::Grpc | Mode::Dual => TransportKind::Grpc,
        }
    }

    fn call<'a>(
        &'a self,
        peer: &'a PeerAddr,
        call: Call,
    ) -> BoxFuture<'a, Result<Bytes, CallError>> {
        Box::pin(async move { self.call_routed(peer, call).await.0 })
    }

    fn open_stream<'a>(
        &'a self,
        peer: &'a PeerAddr,
        call: StreamCall,
    ) -> BoxFuture<'a, Result<CallStream, CallError>> {
        Box::pin(async move { self.open_stream_routed(peer, call).await.0 })
    }

    fn ping<'a>(
        &'a self,
        peer: &'a PeerAddr,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Duration, CallError>> {
        Box::pin(async move {
            let kind = match self.policy().preference(ServiceId::Health) {
                Preference::Fixed(kind) => kind,
                Preference::Adaptive => TransportKind::Grpc,
            };
            let kind = if self.available(kind, peer) {
                kind
            } else if kind == TransportKind::Iroh {
                TransportKind::Grpc
            } else {
                TransportKind::Iroh
            };
            match self.client(kind) {
                Some(client) if peer.transports().contains(kind) => {
                    client.ping(peer, timeout).await
                }
                _ => Err(TransportError::new(
                    kind,
                    TransportErrorKind::NotServed,
                    Delivery::NotDelivered,
                    "no common transport",
                )
                .into()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    //! The router's logic against scripted clients. The real transports are
    //! exercised by the node's integration tests; here a fake is the point:
    //! it lets each test say exactly how a path fails.

    use super::*;
    use crate::policy::{IrohServices, Mode};
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tern_protocol::catalog::{METHODS, Method, methods};
    use tern_protocol::{Priority, Status};

    type Scripted = Result<Bytes, CallError>;

    /// A client whose answers are scripted; it answers `Ok(kind name)` when
    /// the script is empty.
    struct Fake {
        kind: TransportKind,
        script: Mutex<VecDeque<Scripted>>,
        calls: AtomicU64,
        pings: AtomicU64,
        delay: Duration,
        ping: Duration,
    }

    impl Fake {
        fn new(kind: TransportKind) -> Arc<Fake> {
            Arc::new(Fake {
                kind,
                script: Mutex::new(VecDeque::new()),
                calls: AtomicU64::new(0),
                pings: AtomicU64::new(0),
                delay: Duration::ZERO,
                ping: Duration::from_millis(1),
            })
        }
        fn with(kind: TransportKind, delay: Duration, ping: Duration) -> Arc<Fake> {
            Arc::new(Fake {
                kind,
                script: Mutex::new(VecDeque::new()),
                calls: AtomicU64::new(0),
                pings: AtomicU64::new(0),
                delay,
                ping,
            })
        }
        fn push(&self, r: Scripted) {
            self.script.lock().unwrap().push_back(r);
        }
        fn calls(&self) -> u64 {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl RpcClient for Fake {
        fn transport(&self) -> TransportKind {
            self.kind
        }
        fn call<'a>(
            &'a self,
            _peer: &'a PeerAddr,
            _call: Call,
        ) -> BoxFuture<'a, Result<Bytes, CallError>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let next = self.script.lock().unwrap().pop_front();
            Box::pin(async move {
                tokio::time::sleep(self.delay).await;
                next.unwrap_or_else(|| Ok(Bytes::from(self.kind.as_str())))
            })
        }
        fn ping<'a>(
            &'a self,
            _peer: &'a PeerAddr,
            timeout: Duration,
        ) -> BoxFuture<'a, Result<Duration, CallError>> {
            self.pings.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                if self.ping > timeout {
                    tokio::time::sleep(timeout).await;
                    return Err(TransportError::new(
                        self.kind,
                        TransportErrorKind::TimedOut,
                        Delivery::NotDelivered,
                        "scripted: no pong",
                    )
                    .into());
                }
                tokio::time::sleep(self.ping).await;
                Ok(self.ping)
            })
        }
    }

    /// The `TimedOut` an iroh attempt ends with when its budget runs out.
    fn budget_timeout() -> TransportError {
        TransportError::new(
            TransportKind::Iroh,
            TransportErrorKind::TimedOut,
            Delivery::MayHaveBeenDelivered,
            "budget",
        )
    }

    /// UDP blocked on an open connection: a router whose iroh calls time
    /// out at their budget and whose pings go unanswered (Vm over iroh);
    /// its iroh fake.
    fn blocked() -> (DualRouter, Arc<Fake>) {
        let i = Fake::with(
            TransportKind::Iroh,
            Duration::from_secs(3600),
            Duration::from_secs(3600),
        );
        let r = DualRouter::new(
            Some(Fake::new(TransportKind::Grpc)),
            Some(Arc::new(Budgeted(i.clone()))),
            dual(&[ServiceId::Vm]),
        );
        (r, i)
    }

    /// A fake whose calls end with `TimedOut` at their budget, as the real
    /// transports' do.
    struct Budgeted(Arc<Fake>);
    impl RpcClient for Budgeted {
        fn transport(&self) -> TransportKind {
            TransportKind::Iroh
        }
        fn call<'a>(
            &'a self,
            peer: &'a PeerAddr,
            call: Call,
        ) -> BoxFuture<'a, Result<Bytes, CallError>> {
            Box::pin(async move {
                let timeout = call.timeout;
                match tokio::time::timeout(timeout, self.0.call(peer, call)).await {
                    Ok(r) => r,
                    Err(_) => Err(budget_timeout().into()),
                }
            })
        }
        fn ping<'a>(
            &'a self,
            peer: &'a PeerAddr,
            timeout: Duration,
        ) -> BoxFuture<'a, Result<Duration, CallError>> {
            self.0.ping(peer, timeout)
        }
    }
    fn peer(iroh: bool, grpc: bool) -> PeerAddr {
        PeerAddr {
            id: PeerId::from_bytes([9; 32]),
            iroh: iroh.then(tern_protocol::peer::IrohAddr::default),
            grpc: grpc.then(|| "https://127.0.0.1:1".to_owned()),
        }
    }

    fn lost(delivery: Delivery) -> Scripted {
        Err(TransportError::new(
            TransportKind::Iroh,
            TransportErrorKind::ConnectionLost,
            delivery,
            "scripted",
        )
        .into())
    }

    fn dual(services: &[ServiceId]) -> Policy {
        Policy {
            mode: Mode::Dual,
            prefer_iroh: IrohServices::Some(services.iter().copied().collect()),
            raft_transport: RaftTransport::Grpc,
            fallback_to_grpc: true,
        }
    }

    fn router(policy: Policy) -> (DualRouter, Arc<Fake>, Arc<Fake>) {
        let (g, i) = (
            Fake::new(TransportKind::Grpc),
            Fake::new(TransportKind::Iroh),
        );
        (
            DualRouter::new(Some(g.clone()), Some(i.clone()), policy),
            g,
            i,
        )
    }

    fn call(method: &'static Method) -> Call {
        Call::new(method, Bytes::new()).with_timeout(Duration::from_secs(10))
    }

    #[tokio::test(start_paused = true)]
    async fn services_follow_the_policy() {
        let (r, g, i) = router(dual(&[ServiceId::Health, ServiceId::Status]));
        let p = peer(true, true);
        assert_eq!(
            r.call(&p, call(methods::HEALTH_CHECK)).await.unwrap(),
            "iroh"
        );
        assert_eq!(r.call(&p, call(methods::STATUS_GET)).await.unwrap(), "iroh");
        assert_eq!(r.call(&p, call(methods::VM_CREATE)).await.unwrap(), "grpc");
        assert_eq!(r.call(&p, call(methods::RAFT_VOTE)).await.unwrap(), "grpc");
        assert_eq!((g.calls(), i.calls()), (2, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_grpc_only_peer_is_reached_over_grpc_whatever_the_policy() {
        let (r, g, i) = router(Policy {
            mode: Mode::Iroh,
            ..dual(&[])
        });
        assert_eq!(
            r.call(&peer(false, true), call(methods::HEALTH_CHECK))
                .await
                .unwrap(),
            "grpc"
        );
        assert_eq!(
            r.call(&peer(true, false), call(methods::HEALTH_CHECK))
                .await
                .unwrap(),
            "iroh"
        );
        assert_eq!((g.calls(), i.calls()), (1, 1));
        // A node without an iroh client reaches everyone over gRPC.
        let g2 = Fake::new(TransportKind::Grpc);
        let grpc_only = DualRouter::new(
            Some(g2.clone()),
            None,
            Policy {
                mode: Mode::Iroh,
                ..dual(&[])
            },
        );
        assert_eq!(
            grpc_only
                .call(&peer(true, true), call(methods::VM_LIST))
                .await
                .unwrap(),
            "grpc"
        );
        let err = grpc_only
            .call(&peer(true, false), call(methods::VM_LIST))
            .await
            .unwrap_err();
        assert_eq!(
            err.as_transport().map(|t| t.kind),
            Some(TransportErrorKind::NotServed)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn transport_failures_fall_back_to_grpc_when_safe() {
        let (r, g, i) = router(dual(&[ServiceId::Vm]));
        let p = peer(true, true);
        i.push(lost(Delivery::MayHaveBeenDelivered));
        let (result, route) = r.call_routed(&p, call(methods::VM_CREATE)).await;
        assert_eq!(result.unwrap(), "grpc", "idempotent create retried on gRPC");
        assert_eq!(
            route,
            Some(Route {
                first: TransportKind::Iroh,
                fell_back: true
            })
        );
        assert_eq!((g.calls(), i.calls()), (1, 1));
    }

    static NOT_IDEMPOTENT: Method = Method {
        service: ServiceId::Vm,
        id: 99,
        name: "Imaginary",
        idempotent: false,
        read_only: false,
        priority: Priority::Normal,
        kind: tern_protocol::MethodKind::Unary,
    };

    #[tokio::test(start_paused = true)]
    async fn a_mutation_that_may_have_arrived_is_never_sent_twice() {
        let (r, g, i) = router(dual(&[ServiceId::Vm]));
        let p = peer(true, true);
        i.push(lost(Delivery::MayHaveBeenDelivered));
        let err = r.call(&p, call(&NOT_IDEMPOTENT)).await.unwrap_err();
        assert!(err.may_have_been_delivered());
        assert_eq!(g.calls(), 0, "not retried on gRPC");
        // ...but one that provably did not arrive is.
        tokio::time::advance(Duration::from_secs(60)).await; // let the breaker close
        i.push(lost(Delivery::NotDelivered));
        assert_eq!(r.call(&p, call(&NOT_IDEMPOTENT)).await.unwrap(), "grpc");
        assert_eq!(i.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn application_errors_are_answers_not_failures() {
        let (r, g, i) = router(dual(&[ServiceId::Vm]));
        i.push(Err(CallError::Application(Status::not_found("no such vm"))));
        let err = r
            .call(&peer(true, true), call(methods::VM_GET))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(tern_protocol::Code::NotFound));
        assert_eq!(g.calls(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn no_fallback_when_the_operator_turned_it_off() {
        let (r, g, i) = router(Policy {
            fallback_to_grpc: false,
            ..dual(&[ServiceId::Vm])
        });
        i.push(lost(Delivery::NotDelivered));
        assert!(
            r.call(&peer(true, true), call(methods::VM_GET))
                .await
                .is_err()
        );
        assert_eq!(g.calls(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_broken_path_is_skipped_until_its_cooldown_ends() {
        let (r, g, i) = router(dual(&[ServiceId::Status]));
        let p = peer(true, true);
        i.push(lost(Delivery::NotDelivered));
        assert_eq!(r.call(&p, call(methods::STATUS_GET)).await.unwrap(), "grpc");
        for _ in 0..5 {
            assert_eq!(r.call(&p, call(methods::STATUS_GET)).await.unwrap(), "grpc");
        }
        assert_eq!(i.calls(), 1, "iroh not retried during the cool-down");
        tokio::time::advance(crate::breaker::BASE_COOLDOWN).await;
        assert_eq!(
            r.call(&p, call(methods::STATUS_GET)).await.unwrap(),
            "iroh",
            "trial after cool-down"
        );
        assert_eq!(r.call(&p, call(methods::STATUS_GET)).await.unwrap(), "iroh");
        assert_eq!(g.calls(), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn the_iroh_attempt_leaves_time_for_the_fallback() {
        let g = Fake::new(TransportKind::Grpc);
        // iroh hangs past any budget: the fake times out only when dropped,
        // so the router's budget must cut it.
        let i = Fake::with(
            TransportKind::Iroh,
            Duration::from_secs(3600),
            Duration::from_millis(1),
        );
        let r = DualRouter::new(
            Some(g.clone()),
            Some(Arc::new(Budgeted(i))),
            dual(&[ServiceId::Vm]),
        );
        let started = tokio::time::Instant::now();
        let out = r
            .call(&peer(true, true), call(methods::VM_LIST))
            .await
            .unwrap();
        assert_eq!(out, "grpc");
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(10) - FALLBACK_RESERVE,
            "iroh got the budget, gRPC the reserve"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_path_is_found_by_a_ping_and_the_call_falls_back_at_once() {
        // iroh takes calls and never answers, and its pings go unanswered
        // too: UDP blocked on a connection that was open.
        let g = Fake::new(TransportKind::Grpc);
        let i = Fake::with(
            TransportKind::Iroh,
            Duration::from_secs(3600),
            Duration::from_secs(3600),
        );
        let r = DualRouter::new(Some(g.clone()), Some(i.clone()), dual(&[ServiceId::Vm]));
        let p = peer(true, true);
        let long = |m| Call::new(m, Bytes::new()).with_timeout(Duration::from_secs(60));
        let started = tokio::time::Instant::now();
        let (result, route) = r.call_routed(&p, long(methods::VM_STOP)).await;
        assert_eq!(result.unwrap(), "grpc");
        assert_eq!(
            route,
            Some(Route {
                first: TransportKind::Iroh,
                fell_back: true
            })
        );
        assert_eq!(
            started.elapsed(),
            PATH_CHECK_AFTER + PATH_CHECK_TIMEOUT,
            "one failed ping, not the iroh budget of {:?}",
            Duration::from_secs(60) - FALLBACK_RESERVE
        );
        assert_eq!((g.calls(), i.calls()), (1, 1));
        // The breaker is open: the next call does not try iroh.
        assert_eq!(r.call(&p, long(methods::VM_STOP)).await.unwrap(), "grpc");
        assert_eq!(i.calls(), 1);
        // A timeout on this path is its death, an unplanned fallback.
        let timed_out = budget_timeout();
        assert_eq!(r.fallback_reason(&p, &timed_out), names::FALLBACK_PATH_DEAD);
        assert!(names::fallback_is_unplanned(
            r.fallback_reason(&p, &timed_out)
        ));
        // Once the verdict is old, a timeout is a missed deadline again.
        tokio::time::advance(PATH_DEAD_MEMORY).await;
        assert_eq!(r.fallback_reason(&p, &timed_out), "timed_out");
    }

    #[tokio::test(start_paused = true)]
    async fn a_budget_ending_while_the_path_is_checked_counts_the_check_verdict() {
        // UDP blocked: iroh never answers, nor do its pings. A 2.8 s call
        // gives iroh 1.4 s; the path check pings at 0.5 s and its verdict
        // comes at 1.5 s, after the attempt timed out. The call falls back
        // at once, and its fallback is still counted as the dead path it
        // was, not as a missed deadline.
        let (r, i) = blocked();
        let p = peer(true, true);
        let started = tokio::time::Instant::now();
        let timeout = Duration::from_millis(2800);
        let (result, route) = r
            .call_routed(
                &p,
                Call::new(methods::VM_LIST, Bytes::new()).with_timeout(timeout),
            )
            .await;
        assert_eq!(result.unwrap(), "grpc");
        assert_eq!(route.map(|r| r.fell_back), Some(true));
        assert_eq!(
            started.elapsed(),
            timeout / 2,
            "the fallback does not wait for the verdict"
        );
        let timed_out = budget_timeout();
        // The check outlived the call that started it.
        assert_eq!(r.fallback_reason(&p, &timed_out), "timed_out");
        assert_eq!(
            r.settled_reason(&p, &timed_out).await,
            names::FALLBACK_PATH_DEAD
        );
        assert_eq!(started.elapsed(), PATH_CHECK_AFTER + PATH_CHECK_TIMEOUT);
        assert_eq!(i.pings.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_call_that_times_out_has_its_path_checked() {
        // A peer whose endpoint was rebuilt: the pooled connection is
        // silent, calls and pings go unanswered. A Raft-like call (200 ms,
        // too short to be watched) times out and falls back at once; a
        // check follows in the background, whose failed ping closes the
        // silent connection and classes the fallback as the dead path.
        let (r, i) = blocked();
        let p = peer(true, true);
        let started = tokio::time::Instant::now();
        let short =
            Call::new(methods::VM_LIST, Bytes::new()).with_timeout(Duration::from_millis(200));
        let (result, route) = r.call_routed(&p, short).await;
        assert_eq!(result.unwrap(), "grpc");
        assert_eq!(route.map(|r| r.fell_back), Some(true));
        assert_eq!(started.elapsed(), Duration::from_millis(100));
        tokio::task::yield_now().await;
        assert_eq!(i.pings.load(Ordering::SeqCst), 1, "a check started");
        let timed_out = budget_timeout();
        assert_eq!(
            r.settled_reason(&p, &timed_out).await,
            names::FALLBACK_PATH_DEAD
        );
        // Once the verdict is old and the breaker's cool-down over, the
        // trial's timeout checks the path again.
        let short =
            Call::new(methods::VM_LIST, Bytes::new()).with_timeout(Duration::from_millis(200));
        tokio::time::advance(crate::breaker::BASE_COOLDOWN * 64).await;
        let (_, route) = r.call_routed(&p, short).await;
        assert_eq!(
            route.map(|r| r.first),
            Some(TransportKind::Iroh),
            "the breaker's trial"
        );
        tokio::task::yield_now().await;
        assert_eq!(
            i.pings.load(Ordering::SeqCst),
            2,
            "an old verdict is checked again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_during_a_check_keeps_the_path_alive() {
        // A slow handler on a live path whose ping is slower still: the
        // call is answered at 1.2 s, the ping fails at 1.5 s. The answer
        // wins: the path is not taken for dead.
        let g = Fake::new(TransportKind::Grpc);
        let i = Fake::with(
            TransportKind::Iroh,
            Duration::from_millis(1200),
            Duration::from_secs(3600),
        );
        let r = DualRouter::new(Some(g.clone()), Some(i.clone()), dual(&[ServiceId::Vm]));
        let p = peer(true, true);
        let call = Call::new(methods::VM_LIST, Bytes::new()).with_timeout(Duration::from_secs(10));
        assert_eq!(r.call(&p, call).await.unwrap(), "iroh");
        let timed_out = budget_timeout();
        assert_eq!(r.settled_reason(&p, &timed_out).await, "timed_out");
        assert!(r.with_peer(&p, |p| p.path.dead.is_none()));
        assert_eq!(i.pings.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_missed_deadline_on_a_live_path_is_a_planned_fallback() {
        // A loaded machine: iroh answers pings but not this call within
        // its budget (shorter than the first path check, as a Raft
        // heartbeat's): the call is sent again over gRPC and its fallback
        // is classed `timed_out`, not unplanned.
        let g = Fake::new(TransportKind::Grpc);
        let i = Fake::with(
            TransportKind::Iroh,
            Duration::from_millis(200),
            Duration::from_millis(1),
        );
        let timed_out = budget_timeout();
        i.push(Err(timed_out.clone().into()));
        let r = DualRouter::new(Some(g.clone()), Some(i.clone()), dual(&[ServiceId::Vm]));
        let p = peer(true, true);
        let short =
            Call::new(methods::VM_LIST, Bytes::new()).with_timeout(Duration::from_millis(400));
        let (result, route) = r.call_routed(&p, short).await;
        assert_eq!(result.unwrap(), "grpc");
        assert_eq!(route.map(|r| r.fell_back), Some(true));
        let reason = r.fallback_reason(&p, &timed_out);
        assert_eq!(reason, "timed_out");
        assert!(!names::fallback_is_unplanned(reason));
        let lost = TransportError::new(
            TransportKind::Iroh,
            TransportErrorKind::ConnectionLost,
            Delivery::MayHaveBeenDelivered,
            "reset",
        );
        assert!(names::fallback_is_unplanned(r.fallback_reason(&p, &lost)));
    }

    /// `n` `Vm/Stop` calls to `p` at once (60 s each), their answers.
    async fn concurrent_stops(
        r: &DualRouter,
        p: &PeerAddr,
        n: usize,
    ) -> Vec<Result<Bytes, CallError>> {
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..n {
            let (r, p) = (r.clone(), p.clone());
            let call =
                Call::new(methods::VM_STOP, Bytes::new()).with_timeout(Duration::from_secs(60));
            calls.spawn(async move { r.call(&p, call).await });
        }
        calls.join_all().await
    }

    #[tokio::test(start_paused = true)]
    async fn calls_waiting_on_one_peer_share_its_path_checks() {
        // 200 calls wait 5 s each on a live path (a slow commit): the path
        // is pinged about once per check interval, not once per call.
        let g = Fake::new(TransportKind::Grpc);
        let i = Fake::with(
            TransportKind::Iroh,
            Duration::from_secs(5),
            Duration::from_millis(1),
        );
        let r = DualRouter::new(Some(g.clone()), Some(i.clone()), dual(&[ServiceId::Vm]));
        let p = peer(true, true);
        for answer in concurrent_stops(&r, &p, 200).await {
            assert_eq!(answer.unwrap(), "iroh");
        }
        let pings = i.pings.load(Ordering::SeqCst);
        assert!(
            (1..=12).contains(&pings),
            "{pings} pings for 200 calls over 5 s"
        );
        // And when the path is dead, the calls waiting on it all learn it
        // from one failed check.
        let dead = Fake::with(
            TransportKind::Iroh,
            Duration::from_secs(3600),
            Duration::from_secs(3600),
        );
        let r = DualRouter::new(Some(g.clone()), Some(dead.clone()), dual(&[ServiceId::Vm]));
        for answer in concurrent_stops(&r, &p, 50).await {
            assert_eq!(answer.unwrap(), "grpc");
        }
        let pings = dead.pings.load(Ordering::SeqCst);
        assert!((1..=3).contains(&pings), "{pings} pings for 50 calls");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_answer_on_a_live_path_is_waited_for() {
        // The handler takes 5 s, the path answers pings: the call stays on
        // iroh however many checks it takes.
        let g = Fake::new(TransportKind::Grpc);
        let i = Fake::with(
            TransportKind::Iroh,
            Duration::from_secs(5),
            Duration::from_millis(1),
        );
        let r = DualRouter::new(Some(g.clone()), Some(i.clone()), dual(&[ServiceId::Vm]));
        let call = Call::new(methods::VM_STOP, Bytes::new()).with_timeout(Duration::from_secs(60));
        let (result, route) = r.call_routed(&peer(true, true), call).await;
        assert_eq!(result.unwrap(), "iroh");
        assert_eq!(
            route,
            Some(Route {
                first: TransportKind::Iroh,
                fell_back: false
            })
        );
        assert_eq!(g.calls(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_is_not_idempotent_keeps_its_iroh_budget() {
        // `Cluster/TokenCreate` is not safe to send twice: its path is not
        // watched, since abandoning it could not be followed by a retry.
        let g = Fake::new(TransportKind::Grpc);
        let i = Fake::with(
            TransportKind::Iroh,
            Duration::from_secs(5),
            Duration::from_secs(3600),
        );
        let r = DualRouter::new(
            Some(g.clone()),
            Some(i.clone()),
            dual(&[ServiceId::Cluster]),
        );
        let method = METHODS
            .iter()
            .find(|m| !m.idempotent)
            .expect("a method that is not idempotent");
        let call = Call::new(method, Bytes::new()).with_timeout(Duration::from_secs(60));
        let (result, _) = r.call_routed(&peer(true, true), call).await;
        assert_eq!(result.unwrap(), "iroh");
        assert_eq!(g.calls(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_policy_change_does_not_disturb_calls_in_flight() {
        let g = Fake::new(TransportKind::Grpc);
        let i = Fake::with(
            TransportKind::Iroh,
            Duration::from_millis(500),
            Duration::from_millis(1),
        );
        let r = DualRouter::new(Some(g.clone()), Some(i.clone()), dual(&[ServiceId::Status]));
        let p = peer(true, true);
        let in_flight = {
            let (r, p) = (r.clone(), p.clone());
            tokio::spawn(async move { r.call(&p, call(methods::STATUS_GET)).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let old = r.set_policy(Policy {
            mode: Mode::Grpc,
            ..dual(&[])
        });
        assert_eq!(old.mode, Mode::Dual);
        assert_eq!(
            in_flight.await.unwrap().unwrap(),
            "iroh",
            "finished under the old policy"
        );
        assert_eq!(r.call(&p, call(methods::STATUS_GET)).await.unwrap(), "grpc");
        // Rollback is the same action with the old policy.
        r.set_policy((*old).clone());
        assert_eq!(r.call(&p, call(methods::STATUS_GET)).await.unwrap(), "iroh");
    }

    #[tokio::test(start_paused = true)]
    async fn adaptive_raft_moves_to_the_faster_path_from_probes() {
        let g = Fake::with(
            TransportKind::Grpc,
            Duration::ZERO,
            Duration::from_millis(4),
        );
        let i = Fake::with(
            TransportKind::Iroh,
            Duration::ZERO,
            Duration::from_millis(1),
        );
        let policy = Policy {
            raft_transport: RaftTransport::Adaptive,
            ..dual(&[])
        };
        let r = DualRouter::new(Some(g.clone()), Some(i.clone()), policy);
        let p = peer(true, true);
        assert_eq!(
            r.call(&p, call(methods::RAFT_APPEND_ENTRIES))
                .await
                .unwrap(),
            "grpc",
            "starts on gRPC"
        );
        assert_eq!(r.raft_transport_to(&p.id), Some(TransportKind::Grpc));
        let mut now = tokio::time::Instant::now();
        let until = now + crate::adaptive::SWITCH_DWELL + Duration::from_secs(3);
        while now < until {
            r.call(&p, call(methods::RAFT_APPEND_ENTRIES))
                .await
                .unwrap();
            r.probe_once().await;
            tokio::time::advance(Duration::from_millis(500)).await;
            now = tokio::time::Instant::now();
        }
        assert_eq!(r.raft_transport_to(&p.id), Some(TransportKind::Iroh));
        assert_eq!(
            r.call(&p, call(methods::RAFT_APPEND_ENTRIES))
                .await
                .unwrap(),
            "iroh"
        );
    }
}
