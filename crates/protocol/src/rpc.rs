//! The transport-neutral contracts: [`RpcClient`], which both transports
//! implement, and [`Handler`], which services implement and transports serve.
//!
//! Services never learn which transport carried a call, and callers never
//! learn which transport answered it, except through [`TransportError`],
//! whose taxonomy is the same for iroh and gRPC.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::catalog::{Method, ServiceId};
use crate::frame::Priority;
use crate::peer::{PeerAddr, PeerId, TransportKind};
use crate::status::{Code, Status};
use crate::stream::{CallStream, StreamCall, StreamReceiver, StreamSender};

/// A boxed, sendable future, so that both traits stay object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The timeout a [`Call`] gets unless the caller sets one.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest timeout a call may ask for; longer values are clamped. Bulk
/// transfers are chunked, so no single call needs more.
pub const MAX_CALL_TIMEOUT: Duration = Duration::from_secs(600);

/// One call of one method on one peer.
#[derive(Debug, Clone)]
pub struct Call {
    /// What to call.
    pub method: &'static Method,
    /// The encoded request message.
    pub payload: Bytes,
    /// How long the caller waits in all, connection set-up included.
    pub timeout: Duration,
    /// Scheduling class (defaults to the method's).
    pub priority: Priority,
}

impl Call {
    /// A call with the method's default priority and [`DEFAULT_CALL_TIMEOUT`].
    pub fn new(method: &'static Method, payload: Bytes) -> Call {
        Call {
            method,
            payload,
            timeout: DEFAULT_CALL_TIMEOUT,
            priority: method.priority,
        }
    }

    /// The same call with another timeout (clamped to [`MAX_CALL_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Call {
        self.timeout = timeout.min(MAX_CALL_TIMEOUT);
        self
    }

    /// The same call in another priority class.
    pub fn with_priority(mut self, priority: Priority) -> Call {
        self.priority = priority;
        self
    }

    /// The timeout in whole milliseconds as carried on the wire (at least 1,
    /// so that a tiny timeout is not read as "none").
    pub fn timeout_ms(&self) -> u32 {
        u32::try_from(self.timeout.as_millis())
            .unwrap_or(u32::MAX)
            .max(1)
    }
}

/// Whether a request that failed may nevertheless have reached the peer's
/// service. This decides whether a non-idempotent request may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Delivery {
    /// The request provably never reached the peer's service (no connection,
    /// refused before dispatch, rejected by a local limit). Retrying cannot
    /// apply it twice.
    NotDelivered,
    /// The request may have been processed (sent, then the connection was
    /// lost or the deadline passed). Retry only idempotent methods.
    MayHaveBeenDelivered,
}

/// What went wrong below the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportErrorKind {
    /// No connection could be made (dial failed, address unknown, refused).
    Unreachable,
    /// The deadline passed.
    TimedOut,
    /// The connection broke while the call was in flight.
    ConnectionLost,
    /// The peer is shutting down and did not take the call.
    PeerShuttingDown,
    /// This node's transport is shutting down.
    LocalShutdown,
    /// A local limit was hit (too many calls in flight to this peer, queue
    /// full); try later.
    Overloaded,
    /// The peer's identity is not the one the address named.
    WrongPeer,
    /// The peer sent bytes that break the protocol (malformed frame,
    /// undecodable response).
    Protocol,
    /// The peer does not serve this transport (no address for it).
    NotServed,
}

impl TransportErrorKind {
    /// Lower-case name for metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportErrorKind::Unreachable => "unreachable",
            TransportErrorKind::TimedOut => "timed_out",
            TransportErrorKind::ConnectionLost => "connection_lost",
            TransportErrorKind::PeerShuttingDown => "peer_shutting_down",
            TransportErrorKind::LocalShutdown => "local_shutdown",
            TransportErrorKind::Overloaded => "overloaded",
            TransportErrorKind::WrongPeer => "wrong_peer",
            TransportErrorKind::Protocol => "protocol",
            TransportErrorKind::NotServed => "not_served",
        }
    }
}

/// A failure of the transport, not of the service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{transport} transport: {} ({}): {detail}", kind.as_str(), match delivery { Delivery::NotDelivered => "not delivered", Delivery::MayHaveBeenDelivered => "may have been delivered" })]
pub struct TransportError {
    /// What failed.
    pub kind: TransportErrorKind,
    /// Whether the request may have reached the service anyway.
    pub delivery: Delivery,
    /// Which transport failed.
    pub transport: TransportKind,
    /// Details for humans and logs.
    pub detail: String,
}

impl TransportError {
    /// A transport error.
    pub fn new(
        transport: TransportKind,
        kind: TransportErrorKind,
        delivery: Delivery,
        detail: impl Into<String>,
    ) -> TransportError {
        TransportError {
            kind,
            delivery,
            transport,
            detail: detail.into(),
        }
    }
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The transport failed; see [`TransportError::delivery`] before retrying.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The service answered with an error. The request was delivered.
    #[error("peer answered {0}")]
    Application(#[from] Status),
}

impl CallError {
    /// Whether the request may have reached the peer's service.
    pub fn may_have_been_delivered(&self) -> bool {
        match self {
            CallError::Transport(e) => e.delivery == Delivery::MayHaveBeenDelivered,
            CallError::Application(_) => true,
        }
    }

    /// Whether the same request may be sent again (on this or another
    /// transport) without risk of applying it twice: a transport error where
    /// the request was not delivered, or where the method is idempotent.
    /// Application errors are answers, not failures to deliver, and are
    /// never retried by a transport or router.
    pub fn is_safe_to_retry(&self, method: &Method) -> bool {
        match self {
            CallError::Transport(e) => e.delivery == Delivery::NotDelivered || method.idempotent,
            CallError::Application(_) => false,
        }
    }

    /// The transport error, if it is one.
    pub fn as_transport(&self) -> Option<&TransportError> {
        match self {
            CallError::Transport(e) => Some(e),
            CallError::Application(_) => None,
        }
    }

    /// The application status code, if it is one.
    pub fn code(&self) -> Option<Code> {
        match self {
            CallError::Application(s) => Some(s.code),
            CallError::Transport(_) => None,
        }
    }
}

/// A client for one transport: calls any service method on any peer.
///
/// # Contract
///
/// - **Identity.** The call reaches the peer whose key is `peer.id`, or
///   fails with [`TransportErrorKind::WrongPeer`] / `Unreachable`; a
///   different node listening at the same address is never trusted.
/// - **Deadline.** `call.timeout` bounds the whole call, connection set-up
///   included; it is also sent to the peer, whose service may stop working
///   on the request once it passes. When it expires the call fails with
///   [`TransportErrorKind::TimedOut`], `NotDelivered` if the request was
///   never sent and `MayHaveBeenDelivered` otherwise.
/// - **Priority.** Calls in a more urgent class are never queued behind
///   calls in a less urgent one to the same peer (separate streams or
///   connections, separate bounded queues).
/// - **Sharing.** One client is shared by all callers of a node; it pools
///   connections per peer and re-dials lost ones (with bounded backoff) on
///   the next call, without any step from the caller.
/// - **Cancellation.** Dropping the returned future abandons the call and
///   releases its resources; the peer is told where the transport can.
/// - **Errors.** A service's failure is [`CallError::Application`] with the
///   service's status, unchanged. Everything else is a [`TransportError`]
///   that says whether the request may have been delivered; only such
///   errors may be retried, and only as [`CallError::is_safe_to_retry`] says.
/// - **Shutdown.** After the owning transport shuts down, calls fail with
///   [`TransportErrorKind::LocalShutdown`], `NotDelivered`.
///
/// # Streams
///
/// [`RpcClient::open_stream`] opens a server-streaming or bidirectional
/// call ([`crate::catalog::MethodKind`]). Everything above holds for it
/// (identity, lanes, sharing, shutdown), and further:
///
/// - **Opening.** `open_stream` sends the first message and resolves once
///   the peer's handler accepted the call, or fails: refused by the peer
///   (`Application`, e.g. `Unimplemented`, `PermissionDenied`), or a
///   [`TransportError`] whose delivery says whether the first message may
///   have reached the service. [`StreamCall::open_timeout`] bounds the
///   whole opening, dial included (`TimedOut`).
/// - **Ordering.** The messages of one direction arrive in the order they
///   were sent, each exactly once, or the stream fails: a receiver never
///   sees a gap, a duplicate or a reordering, only a prefix followed by an
///   error.
/// - **Back-pressure.** A sender's `send` resolves once the transport has
///   taken the message, and waits while the receiver's window is full; a
///   receiver that stops reading stops its sender after at most
///   [`crate::stream::STREAM_WINDOW`] bytes (plus a message in each end's
///   hand-over slot, [`crate::stream::STREAM_HANDOVER_MESSAGES`]), and its
///   transport buffers no more than that for the stream. Each transport
///   names its per-connection window as well (QUIC's connection receive
///   window on iroh, HTTP/2's connection window on gRPC), so the streams of
///   one connection cost bounded memory together. Nothing queues without
///   bound.
/// - **Deadlines.** There is no deadline for the whole stream (a watch may
///   run for days). [`StreamCall::idle_timeout`] bounds every wait on the
///   open stream: a `next` with no message, a `send` the peer's window
///   holds back. Past it the wait fails with `TimedOut`,
///   `MayHaveBeenDelivered`, and the stream is cancelled. The bound is sent
///   to the peer, which applies it to its own waits for the caller's
///   messages.
/// - **Cancellation, both ways.** Dropping the [`StreamReceiver`] before
///   the end cancels the stream at the peer: its handler's future is
///   dropped (its work stops) and its sends fail. Dropping the
///   [`StreamSender`] without [`StreamSender::finish`] abandons the
///   caller's side: the handler's `next` fails. A handler that returns
///   (or fails) ends the caller's receiver after its last message; one
///   that drops its inbound receiver makes the caller's sends fail.
/// - **Lanes.** A stream belongs to [`StreamCall::priority`]'s lane like a
///   call does and holds one of the lane's places to its peer while open;
///   streams of a less urgent lane never hold back a more urgent lane's
///   calls or streams (own places, own QUIC priority or HTTP/2
///   connection), so a control call never waits behind a busy stream.
/// - **Errors: what was delivered when a stream breaks.** Every message a
///   receiver got was delivered, once, in order. When a stream breaks
///   (connection lost, reset, idle bound, peer restart), the receiving end
///   sees the error after the messages that arrived; messages whose `send`
///   resolved may or may not have reached the peer's application
///   (`MayHaveBeenDelivered`), and the sender learns of the break at its
///   next `send` or `finish`. A handler's failure after accepting reaches
///   the caller as [`CallError::Application`] after the messages sent
///   before it. A caller that resumes (a Raft follower's next index, a
///   watch's revision) resumes from its own position: no transport or
///   router retries a stream once it was opened.
pub trait RpcClient: Send + Sync + 'static {
    /// Which transport this client uses.
    fn transport(&self) -> TransportKind;

    /// Calls `call.method` on `peer`; the result is the encoded response.
    fn call<'a>(
        &'a self,
        peer: &'a PeerAddr,
        call: Call,
    ) -> BoxFuture<'a, Result<Bytes, CallError>>;

    /// Measures one round trip to `peer`'s transport (no service runs).
    /// Used to probe idle peers; errors as for [`RpcClient::call`].
    fn ping<'a>(
        &'a self,
        peer: &'a PeerAddr,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Duration, CallError>>;

    /// Opens a streaming call of `call.method` on `peer`; see "Streams"
    /// above. A client without streams (the default) refuses every stream
    /// as `NotServed`, not delivered.
    fn open_stream<'a>(
        &'a self,
        peer: &'a PeerAddr,
        call: StreamCall,
    ) -> BoxFuture<'a, Result<CallStream, CallError>> {
        let _ = peer;
        let err = TransportError::new(
            self.transport(),
            TransportErrorKind::NotServed,
            Delivery::NotDelivered,
            format!("this client opens no streams ({})", call.method.label()),
        );
        Box::pin(std::future::ready(Err(err.into())))
    }
}

/// Checks that `method` is a stream, for transports opening or serving
/// one: a unary method asked for as a stream is `Unimplemented`.
pub fn require_stream(method: &Method) -> Result<(), Status> {
    if method.kind.is_stream() {
        Ok(())
    } else {
        Err(Status::unimplemented(format!(
            "{} is a unary method, not a stream",
            method.label()
        )))
    }
}

/// Calls `method` with a typed request and decodes the typed response.
/// A response that does not decode is a [`TransportErrorKind::Protocol`]
/// error (the request was delivered).
pub async fn call_typed<Req, Resp>(
    client: &(impl RpcClient + ?Sized),
    peer: &PeerAddr,
    method: &'static Method,
    request: &Req,
    timeout: Duration,
) -> Result<Resp, CallError>
where
    Req: prost::Message,
    Resp: prost::Message + Default,
{
    let call = Call::new(method, request.encode_to_vec().into()).with_timeout(timeout);
    let bytes = client.call(peer, call).await?;
    Resp::decode(bytes).map_err(|e| {
        CallError::Transport(TransportError::new(
            client.transport(),
            TransportErrorKind::Protocol,
            Delivery::MayHaveBeenDelivered,
            format!("undecodable {} response: {e}", method.label()),
        ))
    })
}

/// What a service knows about the call it is serving.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// The caller, as authenticated by the transport (the iroh connection's
    /// remote key, or the gRPC caller's verified signature). Never a value
    /// the caller merely declared.
    pub peer: PeerId,
    /// The transport that carried the call.
    pub transport: TransportKind,
    /// The priority class the caller chose.
    pub priority: Priority,
    /// When the caller stops waiting, if it said.
    pub deadline: Option<Instant>,
}

impl RequestContext {
    /// Time left before the caller's deadline (`None` if it set none).
    pub fn remaining(&self, now: Instant) -> Option<Duration> {
        self.deadline.map(|d| d.saturating_duration_since(now))
    }
}

/// The serving side of a service, served by both transports.
///
/// # Contract
///
/// - `method` is already resolved against the catalogue: transports answer
///   unknown services and methods with `Unimplemented` themselves.
/// - `ctx.peer` is authenticated; authorisation (e.g. "only members may call
///   Raft methods") is the handler's decision, answered with
///   `PermissionDenied`.
/// - Failures are returned as a [`Status`] and reach the caller unchanged
///   as [`CallError::Application`]; a handler must not panic on any payload.
/// - The returned future owns what it needs (`'static`): transports spawn it
///   and may drop it when the caller cancels or the deadline passes.
///
/// # Streams
///
/// [`Handler::handle_stream`] serves a streaming method (transports call
/// it only for methods whose kind is a stream, and `handle` only for unary
/// ones). It gets the first message, the caller's further messages
/// (`inbound`, empty on a server-streaming call) and a sender for its
/// answers (`outbound`); the call was accepted when it is called.
///
/// - Returning `Ok(())` ends the caller's receiver cleanly after every
///   message sent; returning `Err(status)` ends it with that status after
///   them. `outbound` need not be finished by the handler.
/// - `outbound.send` waits while the caller's window is full (the
///   back-pressure of the contract), at most the caller's idle bound, and
///   fails once the caller is gone.
/// - The transport drops the handler's future when the caller cancels
///   (drops its receiver) or the connection is lost: a handler needs no
///   cancellation logic beyond what dropping a future gives.
/// - `ctx.deadline` is `None` on streams (there is no deadline for a whole
///   stream); `inbound.next` is bounded by the caller's idle bound.
/// - The default answers `Unimplemented`.
pub trait Handler: Send + Sync + 'static {
    /// Serves one call.
    fn handle(
        &self,
        ctx: RequestContext,
        method: &'static Method,
        payload: Bytes,
    ) -> BoxFuture<'static, Result<Bytes, Status>>;

    /// Serves one streaming call; see "Streams" above.
    fn handle_stream(
        &self,
        ctx: RequestContext,
        method: &'static Method,
        request: Bytes,
        inbound: StreamReceiver,
        outbound: StreamSender,
    ) -> BoxFuture<'static, Result<(), Status>> {
        let _ = (ctx, request, inbound, outbound);
        let status = Status::unimplemented(format!(
            "{} is not served as a stream by this node",
            method.label()
        ));
        Box::pin(std::future::ready(Err(status)))
    }
}

impl<H: Handler + ?Sized> Handler for Arc<H> {
    fn handle(
        &self,
        ctx: RequestContext,
        method: &'static Method,
        payload: Bytes,
    ) -> BoxFuture<'static, Result<Bytes, Status>> {
        (**self).handle(ctx, method, payload)
    }

    fn handle_stream(
        &self,
        ctx: RequestContext,
        method: &'static Method,
        request: Bytes,
        inbound: StreamReceiver,
        outbound: StreamSender,
    ) -> BoxFuture<'static, Result<(), Status>> {
        (**self).handle_stream(ctx, method, request, inbound, outbound)
    }
}

/// Routes calls to the handler registered for their service. A node builds
/// one and gives it to each transport it serves.
#[derive(Default, Clone)]
pub struct Dispatcher {
    services: BTreeMap<ServiceId, Arc<dyn Handler>>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("services", &self.services.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Dispatcher {
    /// An empty dispatcher: every call is `Unimplemented`.
    pub fn new() -> Dispatcher {
        Dispatcher::default()
    }

    /// Serves `service` with `handler`, replacing any earlier one.
    pub fn register(mut self, service: ServiceId, handler: Arc<dyn Handler>) -> Dispatcher {
        self.services.insert(service, handler);
        self
    }

    /// Whether `service` has a handler.
    pub fn serves(&self, service: ServiceId) -> bool {
        self.services.contains_key(&service)
    }

    /// Resolves a wire (service, method) pair, for transports: unknown
    /// methods are `Unimplemented`.
    pub fn resolve(service: ServiceId, method: u16) -> Result<&'static Method, Status> {
        service.method(method).ok_or_else(|| {
            Status::unimplemented(format!("service {service} has no method with id {method}"))
        })
    }
}

impl Handler for Dispatcher {
    fn handle(
        &self,
        ctx: RequestContext,
        method: &'static Method,
        payload: Bytes,
    ) -> BoxFuture<'static, Result<Bytes, Status>> {
        match self.services.get(&method.service) {
            Some(handler) => handler.handle(ctx, method, payload),
            None => {
                let status = Status::unimplemented(format!(
                    "service {} is not served by this node",
                    method.service
                ));
                Box::pin(std::future::ready(Err(status)))
            }
        }
    }

    fn handle_stream(
        &self,
        ctx: RequestContext,
        method: &'static Method,
        request: Bytes,
        inbound: StreamReceiver,
        outbound: StreamSender,
    ) -> BoxFuture<'static, Result<(), Status>> {
        match self.services.get(&method.service) {
            Some(handler) => handler.handle_stream(ctx, method, request, inbound, outbound),
            None => {
                let status = Status::unimplemented(format!(
                    "service {} is not served by this node",
                    method.service
                ));
                Box::pin(std::future::ready(Err(status)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::methods;

    struct Echo;
    impl Handler for Echo {
        fn handle(
            &self,
            ctx: RequestContext,
            method: &'static Method,
            payload: Bytes,
        ) -> BoxFuture<'static, Result<Bytes, Status>> {
            Box::pin(async move {
                assert_eq!(ctx.transport, TransportKind::Iroh);
                Ok(Bytes::from(format!("{}:{}", method.label(), payload.len())))
            })
        }
    }

    fn ctx() -> RequestContext {
        RequestContext {
            peer: PeerId::from_bytes([1; 32]),
            transport: TransportKind::Iroh,
            priority: Priority::Normal,
            deadline: None,
        }
    }

    fn block_on<F: Future>(f: F) -> F::Output {
        // A handler future in these tests completes on first poll.
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut f = std::pin::pin!(f);
        match f.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(v) => v,
            std::task::Poll::Pending => panic!("test future was pending"),
        }
    }

    #[test]
    fn dispatcher_routes_by_service_and_refuses_the_rest() {
        let d = Dispatcher::new().register(ServiceId::Status, Arc::new(Echo));
        assert!(d.serves(ServiceId::Status));
        let ok = block_on(d.handle(ctx(), methods::STATUS_GET, Bytes::from_static(b"abc")));
        assert_eq!(ok, Ok(Bytes::from_static(b"status/get:3")));
        let err = block_on(d.handle(ctx(), methods::VM_CREATE, Bytes::new())).unwrap_err();
        assert_eq!(err.code, Code::Unimplemented);
        assert!(err.message.contains("vm"));
        assert_eq!(
            Dispatcher::resolve(ServiceId::Vm, 99).unwrap_err().code,
            Code::Unimplemented
        );
        assert_eq!(
            Dispatcher::resolve(ServiceId::Vm, 1),
            Ok(methods::VM_CREATE)
        );
    }

    #[test]
    fn retry_safety_follows_delivery_and_idempotency() {
        let lost = |delivery| {
            CallError::Transport(TransportError::new(
                TransportKind::Iroh,
                TransportErrorKind::ConnectionLost,
                delivery,
                "x",
            ))
        };
        let not_idempotent = Method {
            service: ServiceId::Vm,
            id: 100,
            name: "Imaginary",
            idempotent: false,
            read_only: false,
            priority: Priority::Normal,
            kind: crate::catalog::MethodKind::Unary,
        };
        assert!(lost(Delivery::NotDelivered).is_safe_to_retry(&not_idempotent));
        assert!(!lost(Delivery::MayHaveBeenDelivered).is_safe_to_retry(&not_idempotent));
        assert!(lost(Delivery::MayHaveBeenDelivered).is_safe_to_retry(methods::RAFT_VOTE));
        let app = CallError::Application(Status::not_found("x"));
        assert!(!app.is_safe_to_retry(methods::RAFT_VOTE));
        assert!(app.may_have_been_delivered());
        assert_eq!(app.code(), Some(Code::NotFound));
        let text = lost(Delivery::NotDelivered).to_string();
        assert!(
            text.contains("iroh") && text.contains("not delivered"),
            "{text}"
        );
    }

    #[test]
    fn call_timeouts_are_clamped_and_never_zero_on_the_wire() {
        let c = Call::new(methods::HEALTH_CHECK, Bytes::new());
        assert_eq!(c.timeout, DEFAULT_CALL_TIMEOUT);
        assert_eq!(c.priority, Priority::Normal);
        assert_eq!(
            c.clone().with_timeout(Duration::from_secs(10_000)).timeout,
            MAX_CALL_TIMEOUT
        );
        assert_eq!(
            c.clone()
                .with_timeout(Duration::from_micros(10))
                .timeout_ms(),
            1
        );
        assert_eq!(
            Call::new(methods::RAFT_VOTE, Bytes::new()).priority,
            Priority::Control
        );
    }
}
