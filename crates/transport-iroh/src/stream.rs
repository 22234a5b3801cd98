//! Streaming calls over iroh: one QUIC stream per call, frames on it as
//! [`tern_protocol::stream`] draws them.
//!
//! - **Caller.** [`crate::IrohClient`] opens the QUIC stream in the call's
//!   lane (holding a lane place for the stream's life), writes the
//!   `Request` frame (first message; `deadline ms` = the idle bound) and
//!   waits for the server's `Response` (accepted) or `Error` (refused).
//!   Then `CallerSink` writes `StreamData`/`StreamEnd` and
//!   `CallerSource` reads the answers.
//! - **Server.** `serve` answers `Response`, runs the handler with a
//!   `ServerSource` over the caller's frames and a `ServerSink` for its
//!   answers, and ends the stream with `StreamEnd` or `Error`.
//! - **Rules.** Every received frame passes [`StreamRules`]; a malformed
//!   frame, a frame of another request, data after the end or an oversized
//!   message resets this stream alone with [`STREAM_MALFORMED`], and the
//!   end that read it gets a `Protocol` error.
//! - **Back-pressure.** Messages are read from QUIC only when the
//!   application asks for the next one, and written with QUIC's own flow
//!   control: a stalled reader stops its sender after one stream window
//!   ([`crate::config::DEFAULT_STREAM_WINDOW`]).
//! - **Idle bound.** Every wait (a read, a write held back by flow control)
//!   is bounded by the stream's idle bound; past it the stream is reset with
//!   [`STREAM_IDLE`] and the waiting end gets `TimedOut`.
//! - **Cancellation.** Dropping the caller's receiver stops the QUIC
//!   stream's receive side ([`STREAM_CANCELLED`]); the server sees its send
//!   side stopped and drops the handler's future. Dropping the caller's
//!   sender unfinished resets the request side; the handler's `next` fails.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use bytes::Bytes;
use iroh::endpoint::{RecvStream, SendStream, VarInt};
use tern_protocol::frame::Limits;
use tern_protocol::stream::{
    StreamEvent, StreamReceiver, StreamRules, StreamSender, StreamSide, idle_from_ms, stream_header,
};
use tern_protocol::{
    BoxFuture, CallError, Delivery, Frame, FrameKind, Handler, Header, Method, MethodKind,
    RequestContext, Status, TransportError, TransportErrorKind, TransportKind,
};
use tokio::sync::{Mutex, OwnedSemaphorePermit};
use tracing::debug;

use crate::client::{map_read_error, map_write_error};
use crate::metrics::{Outcome, Side};
use crate::transport::TrackerGuard;
use crate::wire::{self, ReadFrameError, STREAM_CANCELLED, STREAM_IDLE, STREAM_MALFORMED};

fn error(kind: TransportErrorKind, delivery: Delivery, detail: impl Into<String>) -> CallError {
    CallError::Transport(TransportError::new(
        TransportKind::Iroh,
        kind,
        delivery,
        detail,
    ))
}

/// What an open stream holds until both of its halves are dropped: its
/// lane place and its entry in the client's in-flight count (so shutdown
/// drains it).
pub(crate) struct Hold {
    pub(crate) _permit: OwnedSemaphorePermit,
    pub(crate) _guard: TrackerGuard,
    pub(crate) _active: crate::metrics::OpenStream,
}

impl Hold {
    pub(crate) fn new(permit: OwnedSemaphorePermit, guard: TrackerGuard) -> Hold {
        Hold {
            _permit: permit,
            _guard: guard,
            _active: crate::metrics::OpenStream::new(Side::Client),
        }
    }
}

/// Counts a served stream as accepted and open (until the guard drops).
fn accepted_stream(method: &Method) -> crate::metrics::OpenStream {
    crate::metrics::stream_opened(method, Side::Server, Outcome::Ok);
    crate::metrics::OpenStream::new(Side::Server)
}

/// The two halves of a QUIC stream while a call opens: dropped before
/// [`Opening::take`] (open timeout, failure), it resets both, which the
/// server sees as a cancelled call.
pub(crate) struct Opening {
    pub(crate) send: Option<SendStream>,
    pub(crate) recv: Option<RecvStream>,
}

impl Opening {
    pub(crate) fn take(mut self) -> Option<(SendStream, RecvStream)> {
        Some((self.send.take()?, self.recv.take()?))
    }
}

impl Drop for Opening {
    fn drop(&mut self) {
        if let Some(send) = &mut self.send {
            let _ = send.reset(STREAM_CANCELLED);
        }
        if let Some(recv) = &mut self.recv {
            let _ = recv.stop(STREAM_CANCELLED);
        }
    }
}

/// The caller's side of an accepted stream, made into a sender and a
/// receiver.
pub(crate) struct Accepted {
    pub(crate) send: SendStream,
    pub(crate) recv: RecvStream,
    pub(crate) method: &'static Method,
    pub(crate) header: Header,
    pub(crate) rules: StreamRules,
    pub(crate) limits: Limits,
    pub(crate) idle: Duration,
    pub(crate) hold: Hold,
    pub(crate) closed: Arc<AtomicBool>,
}

impl Accepted {
    /// The caller's halves. A server-streaming call's request side was
    /// finished with the request; it has no sender.
    pub(crate) fn split(self) -> (Option<StreamSender>, StreamReceiver) {
        let hold = Arc::new(self.hold);
        let sender = (self.method.kind == MethodKind::Bidirectional).then(|| {
            StreamSender::new(CallerSink {
                send: self.send,
                header: self.header,
                limits: self.limits,
                idle: self.idle,
                finished: false,
                _hold: hold.clone(),
                closed: self.closed.clone(),
            })
        });
        let receiver = StreamReceiver::new(CallerSource {
            recv: self.recv,
            rules: self.rules,
            limits: self.limits,
            idle: self.idle,
            over: false,
            _hold: hold,
            closed: self.closed,
        });
        (sender, receiver)
    }
}

/// Writes the caller's further messages.
struct CallerSink {
    send: SendStream,
    header: Header,
    limits: Limits,
    idle: Duration,
    finished: bool,
    _hold: Arc<Hold>,
    closed: Arc<AtomicBool>,
}

impl Drop for CallerSink {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.send.reset(STREAM_CANCELLED);
        }
    }
}

/// Writes one frame within the idle bound; past it resets the stream with
/// [`STREAM_IDLE`].
async fn write_bounded(
    send: &mut SendStream,
    frame: &Frame,
    idle: Duration,
    closed: &AtomicBool,
) -> Result<(), CallError> {
    match tokio::time::timeout(idle, wire::write_frame(send, frame)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(map_write_error(&e, closed).into()),
        Err(_) => {
            let _ = send.reset(STREAM_IDLE);
            Err(error(
                TransportErrorKind::TimedOut,
                Delivery::MayHaveBeenDelivered,
                format!("the peer took no message for the stream's idle bound of {idle:?}"),
            ))
        }
    }
}

fn frame_of(
    header: &Header,
    kind: FrameKind,
    payload: Bytes,
    limits: Limits,
) -> Result<Frame, CallError> {
    let mut header = *header;
    header.kind = kind;
    Frame::new(header, payload, limits).map_err(|e| {
        error(
            TransportErrorKind::Protocol,
            Delivery::NotDelivered,
            format!("stream message refused before sending: {e}"),
        )
    })
}

fn finished_error() -> CallError {
    error(
        TransportErrorKind::Protocol,
        Delivery::NotDelivered,
        "this side of the stream is already finished",
    )
}

impl tern_protocol::stream::MessageSink for CallerSink {
    fn send(&mut self, message: Bytes) -> BoxFuture<'_, Result<(), CallError>> {
        Box::pin(async move {
            if self.finished {
                return Err(finished_error());
            }
            let frame = frame_of(&self.header, FrameKind::StreamData, message, self.limits)?;
            write_bounded(&mut self.send, &frame, self.idle, &self.closed).await
        })
    }

    fn finish(&mut self) -> BoxFuture<'_, Result<(), CallError>> {
        Box::pin(async move {
            if self.finished {
                return Ok(());
            }
            let frame = frame_of(
                &self.header,
                FrameKind::StreamEnd,
                Bytes::new(),
                self.limits,
            )?;
            write_bounded(&mut self.send, &frame, self.idle, &self.closed).await?;
            self.finished = true;
            let _ = self.send.finish();
            Ok(())
        })
    }
}

/// Reads the server's answers.
struct CallerSource {
    recv: RecvStream,
    rules: StreamRules,
    limits: Limits,
    idle: Duration,
    over: bool,
    _hold: Arc<Hold>,
    closed: Arc<AtomicBool>,
}

impl Drop for CallerSource {
    fn drop(&mut self) {
        if !self.over {
            let _ = self.recv.stop(STREAM_CANCELLED);
        }
    }
}

impl tern_protocol::stream::MessageSource for CallerSource {
    fn next(&mut self) -> BoxFuture<'_, Option<Result<Bytes, CallError>>> {
        Box::pin(async move {
            if self.over {
                return None;
            }
            let read =
                tokio::time::timeout(self.idle, wire::read_frame(&mut self.recv, self.limits))
                    .await;
            let frame = match read {
                Err(_) => {
                    self.end(STREAM_IDLE);
                    return Some(Err(error(
                        TransportErrorKind::TimedOut,
                        Delivery::MayHaveBeenDelivered,
                        format!(
                            "no message within the stream's idle bound of {:?}",
                            self.idle
                        ),
                    )));
                }
                Ok(Err(e @ ReadFrameError::Frame(_))) => {
                    self.end(STREAM_MALFORMED);
                    return Some(Err(map_read_error(&e, &self.closed).into()));
                }
                Ok(Err(e)) => {
                    self.over = true;
                    return Some(Err(map_read_error(&e, &self.closed).into()));
                }
                Ok(Ok(frame)) => frame,
            };
            match self.rules.check(&frame.header) {
                Ok(StreamEvent::Message) => Some(Ok(frame.payload)),
                Ok(StreamEvent::End) => {
                    self.over = true;
                    wire::consume_end(&mut self.recv);
                    None
                }
                Ok(StreamEvent::Failed | StreamEvent::Refused) => {
                    self.over = true;
                    wire::consume_end(&mut self.recv);
                    Some(Err(CallError::Application(Status::decode(&frame.payload))))
                }
                Ok(StreamEvent::Cancelled) => {
                    self.over = true;
                    Some(Err(error(
                        TransportErrorKind::ConnectionLost,
                        Delivery::MayHaveBeenDelivered,
                        "the peer abandoned the stream",
                    )))
                }
                Ok(StreamEvent::Accepted) => self.broken("a second acceptance".to_owned()),
                Err(violation) => self.broken(violation.to_string()),
            }
        })
    }
}

impl CallerSource {
    fn end(&mut self, code: VarInt) {
        self.over = true;
        let _ = self.recv.stop(code);
    }

    /// Resets the stream after the peer broke its rules.
    fn broken(&mut self, why: String) -> Option<Result<Bytes, CallError>> {
        debug!("stream rule broken by the peer; resetting the stream: {why}");
        self.end(STREAM_MALFORMED);
        Some(Err(error(
            TransportErrorKind::Protocol,
            Delivery::MayHaveBeenDelivered,
            format!("the peer broke the stream's rules: {why}"),
        )))
    }
}

/// The server's send side, shared by the handler's sink and the code that
/// ends the stream after the handler returns.
struct ServerSend {
    send: Option<SendStream>,
    /// A `StreamEnd` was written by the handler's `finish`.
    ended: bool,
}

/// The handler's answers.
struct ServerSink {
    shared: Arc<Mutex<ServerSend>>,
    header: Header,
    limits: Limits,
    idle: Duration,
}

fn caller_gone() -> CallError {
    error(
        TransportErrorKind::ConnectionLost,
        Delivery::MayHaveBeenDelivered,
        "the caller's stream is over",
    )
}

impl tern_protocol::stream::MessageSink for ServerSink {
    fn send(&mut self, message: Bytes) -> BoxFuture<'_, Result<(), CallError>> {
        Box::pin(async move {
            let frame = frame_of(&self.header, FrameKind::StreamData, message, self.limits)?;
            let mut shared = self.shared.lock().await;
            if shared.ended {
                return Err(finished_error());
            }
            let Some(send) = shared.send.as_mut() else {
                return Err(caller_gone());
            };
            write_bounded(send, &frame, self.idle, &AtomicBool::new(false)).await
        })
    }

    fn finish(&mut self) -> BoxFuture<'_, Result<(), CallError>> {
        Box::pin(async move {
            let frame = frame_of(
                &self.header,
                FrameKind::StreamEnd,
                Bytes::new(),
                self.limits,
            )?;
            let mut shared = self.shared.lock().await;
            if shared.ended {
                return Ok(());
            }
            let Some(send) = shared.send.as_mut() else {
                return Err(caller_gone());
            };
            write_bounded(send, &frame, self.idle, &AtomicBool::new(false)).await?;
            let _ = send.finish();
            shared.ended = true;
            Ok(())
        })
    }
}

/// The caller's further messages, as the handler reads them.
struct ServerSource {
    recv: RecvStream,
    rules: StreamRules,
    limits: Limits,
    idle: Duration,
    over: bool,
    shared: Arc<Mutex<ServerSend>>,
}

impl ServerSource {
    /// Resets this stream alone, both ways, after a broken rule.
    async fn reset(&mut self, code: VarInt) {
        self.over = true;
        let _ = self.recv.stop(code);
        if let Some(send) = self.shared.lock().await.send.as_mut() {
            let _ = send.reset(code);
        }
    }
}

impl tern_protocol::stream::MessageSource for ServerSource {
    fn next(&mut self) -> BoxFuture<'_, Option<Result<Bytes, CallError>>> {
        Box::pin(async move {
            if self.over {
                return None;
            }
            let read =
                tokio::time::timeout(self.idle, wire::read_frame(&mut self.recv, self.limits))
                    .await;
            let frame = match read {
                Err(_) => {
                    self.reset(STREAM_IDLE).await;
                    return Some(Err(error(
                        TransportErrorKind::TimedOut,
                        Delivery::MayHaveBeenDelivered,
                        format!(
                            "the caller sent nothing within the stream's idle bound of {:?}",
                            self.idle
                        ),
                    )));
                }
                Ok(Err(ReadFrameError::Frame(e))) => {
                    debug!("malformed stream frame; resetting the stream: {e}");
                    self.reset(STREAM_MALFORMED).await;
                    return Some(Err(error(
                        TransportErrorKind::Protocol,
                        Delivery::MayHaveBeenDelivered,
                        format!("malformed stream frame: {e}"),
                    )));
                }
                Ok(Err(e)) => {
                    self.over = true;
                    return Some(Err(error(
                        TransportErrorKind::ConnectionLost,
                        Delivery::MayHaveBeenDelivered,
                        format!("the caller's side of the stream broke: {e}"),
                    )));
                }
                Ok(Ok(frame)) => frame,
            };
            match self.rules.check(&frame.header) {
                Ok(StreamEvent::Message) => Some(Ok(frame.payload)),
                Ok(StreamEvent::End) => {
                    self.over = true;
                    wire::consume_end(&mut self.recv);
                    None
                }
                Ok(_) => {
                    self.over = true;
                    Some(Err(error(
                        TransportErrorKind::ConnectionLost,
                        Delivery::MayHaveBeenDelivered,
                        "the caller abandoned the stream",
                    )))
                }
                Err(violation) => {
                    debug!("stream rule broken; resetting the stream: {violation}");
                    self.reset(STREAM_MALFORMED).await;
                    Some(Err(error(
                        TransportErrorKind::Protocol,
                        Delivery::MayHaveBeenDelivered,
                        format!("the caller broke the stream's rules: {violation}"),
                    )))
                }
            }
        })
    }
}

/// What [`serve`] needs beyond the streams.
pub(crate) struct Serving {
    pub(crate) handler: Arc<dyn Handler>,
    pub(crate) ctx: RequestContext,
    pub(crate) method: &'static Method,
    pub(crate) request: Header,
    pub(crate) payload: Bytes,
    pub(crate) limits: Limits,
    pub(crate) ack_timeout: Duration,
}

/// Serves one accepted streaming call to its end.
pub(crate) async fn serve(s: Serving, mut send: SendStream, mut recv: RecvStream) {
    let header = stream_header(
        FrameKind::Response,
        s.method,
        s.request.priority,
        s.request.request_id,
    );
    let idle = idle_from_ms(s.request.deadline_ms);
    let Ok(accept) = Frame::new(header, Bytes::new(), s.limits) else {
        return;
    };
    if let Err(e) = wire::write_frame(&mut send, &accept).await {
        debug!(method = %s.method.label(), "stream not accepted: {e}");
        return;
    }
    let _active = accepted_stream(s.method);
    let stopped = send.stopped();
    let shared = Arc::new(Mutex::new(ServerSend {
        send: Some(send),
        ended: false,
    }));
    let inbound = if s.method.kind == MethodKind::Bidirectional {
        StreamReceiver::new(ServerSource {
            recv,
            rules: StreamRules::new(
                StreamSide::Server,
                s.request.request_id,
                true,
                s.limits.max_payload,
            ),
            limits: s.limits,
            idle,
            over: false,
            shared: shared.clone(),
        })
    } else {
        // A server-streaming caller finished its side with the request.
        wire::consume_end(&mut recv);
        drop(recv);
        StreamReceiver::empty()
    };
    let outbound = StreamSender::new(ServerSink {
        shared: shared.clone(),
        header,
        limits: s.limits,
        idle,
    });
    let work = s.handler.handle_stream(
        s.ctx.clone(),
        s.method,
        s.payload.clone(),
        inbound,
        outbound,
    );
    let mut work = work;
    let outcome = tokio::select! {
        result = &mut work => Some(result),
        reason = stopped => match reason {
            // The handler finished its side and the caller read all of it:
            // not a cancellation; the handler may still be reading.
            Ok(None) => Some(work.await),
            reason => {
                debug!(method = %s.method.label(), "the caller cancelled the stream ({reason:?}); dropping the handler");
                None
            }
        }
    };
    let Some(result) = outcome else { return };
    end_stream(&s, &shared, header, idle, result).await;
}

/// Ends a served stream after its handler returned: `StreamEnd` or
/// `Error` (unless the handler finished its side itself), then the QUIC
/// finish, and a bounded wait for the caller to have it.
async fn end_stream(
    s: &Serving,
    shared: &Mutex<ServerSend>,
    header: Header,
    idle: Duration,
    result: Result<(), Status>,
) {
    let mut end = shared.lock().await;
    let ended = end.ended;
    let Some(mut send) = end.send.take() else {
        return;
    };
    drop(end);
    let last = match (ended, result) {
        (true, Ok(())) => None,
        (true, Err(status)) => {
            debug!(method = %s.method.label(), %status, "a handler failed after finishing its stream; the caller saw the end");
            None
        }
        (false, Ok(())) => Frame::new(
            Header {
                kind: FrameKind::StreamEnd,
                ..header
            },
            Bytes::new(),
            s.limits,
        )
        .ok(),
        (false, Err(status)) => Frame::new(
            Header {
                kind: FrameKind::Error,
                ..header
            },
            status.encode(),
            s.limits,
        )
        .ok(),
    };
    if let Some(frame) = last {
        match tokio::time::timeout(idle, wire::write_frame(&mut send, &frame)).await {
            Ok(Ok(())) => {}
            _ => {
                let _ = send.reset(STREAM_IDLE);
                return;
            }
        }
    }
    let _ = send.finish();
    // Wait (bounded) until the caller has the end, so that a drained
    // shutdown does not close the connection under it.
    let _ = tokio::time::timeout(s.ack_timeout, send.stopped()).await;
}
