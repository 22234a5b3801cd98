//! Streaming calls: what a caller opens ([`StreamCall`]), what it gets
//! ([`CallStream`]: a [`StreamSender`] and a [`StreamReceiver`]), the
//! limits every transport applies to streams, and the per-stream frame
//! rules ([`StreamRules`]) the iroh transport checks every frame against.
//!
//! The contract itself (ordering, back-pressure, deadlines, cancellation,
//! lanes, errors) is written on [`crate::RpcClient::open_stream`] and
//! [`crate::Handler::handle_stream`]. This module does no I/O: senders and
//! receivers are trait objects the transports implement.
//!
//! # Frames of one streaming call on iroh
//!
//! One QUIC stream carries one call. The caller writes a `Request` frame
//! (the first message as payload; `deadline ms` is the stream's idle
//! bound), then, on a bidirectional call, one `StreamData` frame per
//! message and a `StreamEnd` when it has no more. The server answers
//! `Response` (empty: the handler accepted the call) or `Error` (refused,
//! with a status), then one `StreamData` frame per message, then
//! `StreamEnd` (the handler finished) or `Error` (it failed). A `Cancel`
//! from either side abandons the call, as does a QUIC reset. Every frame
//! carries the request id of the `Request`.

use std::time::Duration;

use bytes::Bytes;

use crate::catalog::Method;
use crate::frame::{FrameKind, Header, Priority};
use crate::rpc::{BoxFuture, CallError};

/// How long [`crate::RpcClient::open_stream`] may take unless the caller
/// sets another bound: dial, stream set-up and the peer's acceptance.
/// Like a unary call's default, since opening costs about one call.
pub const DEFAULT_STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a stream may go without progress (a message received, or a
/// send accepted) unless the caller sets another bound. A minute: long
/// enough for a quiet watch between keep-alives of its own, short enough
/// that a stream to a vanished peer does not hold its place for long.
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The longest idle bound a stream may ask for; longer values are clamped
/// (as [`crate::rpc::MAX_CALL_TIMEOUT`] clamps calls). A stream that is
/// quieter than this sends keep-alive messages of its own.
pub const MAX_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// Per-stream window, both transports: the most bytes of one stream a
/// receiver holds that its application has not read yet (QUIC's stream
/// receive window on iroh, HTTP/2's stream window on gRPC). A sender whose
/// receiver stops reading can get at most this far ahead (plus the one
/// message it is writing and a message in each end's hand-over slot), so a
/// stalled reader costs bounded memory on both ends. 2 MiB covers the
/// bandwidth-delay product of a 1 Gbit/s link at 16 ms, and matches the
/// gRPC server's stream window.
pub const STREAM_WINDOW: u32 = 2 * 1024 * 1024;

/// Messages that wait between a stream's application and its transport in
/// each direction (a bounded hand-over slot; the transport's window does
/// the rest of the buffering). One keeps the memory bound tight while
/// letting the next message be encoded while the last is on the wire.
pub const STREAM_HANDOVER_MESSAGES: usize = 1;

const _: () =
    assert!(DEFAULT_STREAM_IDLE_TIMEOUT.as_millis() <= MAX_STREAM_IDLE_TIMEOUT.as_millis());
const _: () = assert!(MAX_STREAM_IDLE_TIMEOUT.as_millis() <= u32::MAX as u128);
const _: () = assert!(STREAM_HANDOVER_MESSAGES >= 1);

/// A streaming call to open: the method, its first message, and its
/// bounds.
#[derive(Debug, Clone)]
pub struct StreamCall {
    /// A method whose kind is a stream.
    pub method: &'static Method,
    /// The first message: the whole request of a server-streaming call, the
    /// first of many on a bidirectional one.
    pub request: Bytes,
    /// Bounds the opening: dial, stream set-up and the peer's acceptance.
    pub open_timeout: Duration,
    /// Bounds each wait on the open stream: for the next message, and for a
    /// send to be accepted. Also sent to the peer, which applies it to its
    /// own waits for the caller's messages.
    pub idle_timeout: Duration,
    /// The lane the stream belongs to (defaults to the method's).
    pub priority: Priority,
}

impl StreamCall {
    /// A stream with the method's priority and the default bounds.
    pub fn new(method: &'static Method, request: Bytes) -> StreamCall {
        StreamCall {
            method,
            request,
            open_timeout: DEFAULT_STREAM_OPEN_TIMEOUT,
            idle_timeout: DEFAULT_STREAM_IDLE_TIMEOUT,
            priority: method.priority,
        }
    }

    /// The same stream with another opening bound (clamped to
    /// [`crate::rpc::MAX_CALL_TIMEOUT`]).
    pub fn with_open_timeout(mut self, timeout: Duration) -> StreamCall {
        self.open_timeout = timeout.min(crate::rpc::MAX_CALL_TIMEOUT);
        self
    }

    /// The same stream with another idle bound (clamped to
    /// [`MAX_STREAM_IDLE_TIMEOUT`]).
    pub fn with_idle_timeout(mut self, timeout: Duration) -> StreamCall {
        self.idle_timeout = timeout.min(MAX_STREAM_IDLE_TIMEOUT);
        self
    }

    /// The same stream in another lane.
    pub fn with_priority(mut self, priority: Priority) -> StreamCall {
        self.priority = priority;
        self
    }

    /// The idle bound in whole milliseconds as carried on the wire (at
    /// least 1, so that it is never read as "none").
    pub fn idle_ms(&self) -> u32 {
        idle_ms(self.idle_timeout)
    }
}

/// An idle bound as carried on the wire: whole milliseconds, at least 1,
/// at most [`MAX_STREAM_IDLE_TIMEOUT`].
pub fn idle_ms(timeout: Duration) -> u32 {
    u32::try_from(timeout.min(MAX_STREAM_IDLE_TIMEOUT).as_millis())
        .unwrap_or(u32::MAX)
        .max(1)
}

/// The idle bound a peer asked for (0 = none said: the default), clamped.
pub fn idle_from_ms(ms: u32) -> Duration {
    if ms == 0 {
        DEFAULT_STREAM_IDLE_TIMEOUT
    } else {
        Duration::from_millis(u64::from(ms)).min(MAX_STREAM_IDLE_TIMEOUT)
    }
}

/// The sending half of a stream, as a transport implements it.
pub trait MessageSink: Send + 'static {
    /// Sends one message; resolves once the transport has taken it (which
    /// waits while the receiver's window is full).
    fn send(&mut self, message: Bytes) -> BoxFuture<'_, Result<(), CallError>>;
    /// Says that no more messages follow; the receiver sees the end after
    /// the last message.
    fn finish(&mut self) -> BoxFuture<'_, Result<(), CallError>>;
}

/// The receiving half of a stream, as a transport implements it.
pub trait MessageSource: Send + 'static {
    /// The next message; `None` once the sender finished cleanly.
    fn next(&mut self) -> BoxFuture<'_, Option<Result<Bytes, CallError>>>;
}

/// Sends a stream's messages. Dropping it before [`StreamSender::finish`]
/// abandons the stream: the peer sees it cancelled, not finished.
pub struct StreamSender {
    inner: Box<dyn MessageSink>,
}

impl std::fmt::Debug for StreamSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSender").finish_non_exhaustive()
    }
}

impl StreamSender {
    /// Wraps a transport's sink.
    pub fn new(sink: impl MessageSink) -> StreamSender {
        StreamSender {
            inner: Box::new(sink),
        }
    }

    /// Sends one message; waits while the peer's window is full (at most
    /// the stream's idle bound, then `TimedOut`).
    pub fn send(&mut self, message: Bytes) -> BoxFuture<'_, Result<(), CallError>> {
        self.inner.send(message)
    }

    /// Ends this direction of the stream cleanly.
    pub fn finish(&mut self) -> BoxFuture<'_, Result<(), CallError>> {
        self.inner.finish()
    }
}

/// Receives a stream's messages, in order. Dropping it before the end
/// cancels the stream at the peer.
pub struct StreamReceiver {
    inner: Box<dyn MessageSource>,
}

impl std::fmt::Debug for StreamReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReceiver").finish_non_exhaustive()
    }
}

impl StreamReceiver {
    /// Wraps a transport's source.
    pub fn new(source: impl MessageSource) -> StreamReceiver {
        StreamReceiver {
            inner: Box::new(source),
        }
    }

    /// A receiver that has nothing: what a server-streaming handler gets
    /// as its inbound side (its one request is its argument).
    pub fn empty() -> StreamReceiver {
        StreamReceiver::new(Empty)
    }

    /// The next message; `None` once the sender finished cleanly. After an
    /// error or `None`, the stream is over.
    #[allow(clippy::should_implement_trait)] // reason: an async receiver, named like `StreamExt::next`; `Iterator::next` would have to block.
    pub fn next(&mut self) -> BoxFuture<'_, Option<Result<Bytes, CallError>>> {
        self.inner.next()
    }
}

struct Empty;

impl MessageSource for Empty {
    fn next(&mut self) -> BoxFuture<'_, Option<Result<Bytes, CallError>>> {
        Box::pin(std::future::ready(None))
    }
}

/// An open streaming call, as [`crate::RpcClient::open_stream`] returns it.
#[derive(Debug)]
pub struct CallStream {
    /// Further requests: `Some` on a bidirectional call, `None` on a
    /// server-streaming one (its one request was sent by the opening).
    pub sender: Option<StreamSender>,
    /// The answers, in order.
    pub receiver: StreamReceiver,
}

/// Which end of a streaming call reads the frames being checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamSide {
    /// The caller, reading the server's frames.
    Caller,
    /// The server, reading the caller's frames after its `Request`.
    Server,
}

/// A frame that breaks the rules of a streaming call. The stream is reset
/// (that stream only; the connection and the other calls go on).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamViolation {
    /// The frame names another request than the one the stream carries.
    #[error("a {kind:?} frame for request {got} on the stream of request {expected}")]
    UnknownRequest {
        /// The frame's kind.
        kind: FrameKind,
        /// The stream's request id.
        expected: u64,
        /// The id the frame named.
        got: u64,
    },
    /// The frame came after the stream's end (`StreamEnd`, `Error` or
    /// `Cancel`) or after an earlier violation.
    #[error("a {kind:?} frame after the stream ended")]
    AfterEnd {
        /// The frame's kind.
        kind: FrameKind,
    },
    /// The frame's kind has no place at this point of the call.
    #[error("a {kind:?} frame is not allowed {when}")]
    Unexpected {
        /// The frame's kind.
        kind: FrameKind,
        /// Where it came.
        when: &'static str,
    },
    /// A message larger than the stream's message limit.
    #[error("a stream message of {len} bytes exceeds the limit of {max} bytes")]
    Oversize {
        /// The announced length.
        len: u32,
        /// The limit.
        max: u32,
    },
}

/// What a frame that keeps the rules means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEvent {
    /// The server accepted the call (`Response`, caller side only).
    Accepted,
    /// The server refused the call before accepting it (`Error`; the
    /// payload is the status). The stream is over.
    Refused,
    /// One message (`StreamData`).
    Message,
    /// The sender finished cleanly (`StreamEnd`). The stream is over.
    End,
    /// The server's handler failed after accepting (`Error`; the payload is
    /// the status). The stream is over.
    Failed,
    /// The other end abandoned the call (`Cancel`). The stream is over.
    Cancelled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Caller side: waiting for the server's acceptance.
    Opening,
    /// Messages flow.
    Open,
    /// Ended, cleanly or not; every further frame is a violation.
    Over,
}

/// The rules one end of one streaming call checks every received frame
/// against. Pure: no I/O, no clock. A violation ends the stream (every
/// later frame is [`StreamViolation::AfterEnd`]).
#[derive(Debug, Clone)]
pub struct StreamRules {
    side: StreamSide,
    request_id: u64,
    /// Whether the other end may send messages (a server-streaming call's
    /// caller sends none after its request).
    messages_allowed: bool,
    max_message: u32,
    phase: Phase,
}

impl StreamRules {
    /// Rules for `side` of the call with `request_id`. `messages_allowed`
    /// says whether the other end may send `StreamData` (false for what a
    /// server reads on a server-streaming call); `max_message` bounds one
    /// message.
    pub fn new(
        side: StreamSide,
        request_id: u64,
        messages_allowed: bool,
        max_message: u32,
    ) -> StreamRules {
        StreamRules {
            side,
            request_id,
            messages_allowed,
            max_message,
            phase: match side {
                StreamSide::Caller => Phase::Opening,
                StreamSide::Server => Phase::Open,
            },
        }
    }

    /// Whether the stream is over (ended, failed, cancelled or broken).
    pub fn is_over(&self) -> bool {
        self.phase == Phase::Over
    }

    /// Checks one received frame's header.
    pub fn check(&mut self, header: &Header) -> Result<StreamEvent, StreamViolation> {
        let result = self.check_inner(header);
        match result {
            Ok(StreamEvent::Accepted | StreamEvent::Message) => {}
            Ok(_) | Err(_) => self.phase = Phase::Over,
        }
        result
    }

    fn check_inner(&mut self, header: &Header) -> Result<StreamEvent, StreamViolation> {
        let kind = header.kind;
        if self.phase == Phase::Over {
            return Err(StreamViolation::AfterEnd { kind });
        }
        if kind.is_connection_level() || kind == FrameKind::Request {
            return Err(StreamViolation::Unexpected {
                kind,
                when: "inside a streaming call",
            });
        }
        if header.request_id != self.request_id {
            return Err(StreamViolation::UnknownRequest {
                kind,
                expected: self.request_id,
                got: header.request_id,
            });
        }
        if header.payload_len > self.max_message {
            return Err(StreamViolation::Oversize {
                len: header.payload_len,
                max: self.max_message,
            });
        }
        match (self.side, self.phase, kind) {
            (_, _, FrameKind::Cancel) => Ok(StreamEvent::Cancelled),
            (StreamSide::Caller, Phase::Opening, FrameKind::Response) => {
                self.phase = Phase::Open;
                Ok(StreamEvent::Accepted)
            }
            (StreamSide::Caller, Phase::Opening, FrameKind::Error) => Ok(StreamEvent::Refused),
            (StreamSide::Caller, Phase::Opening, _) => Err(StreamViolation::Unexpected {
                kind,
                when: "before the server accepted the call",
            }),
            (StreamSide::Caller, _, FrameKind::Error) => Ok(StreamEvent::Failed),
            (_, _, FrameKind::StreamEnd) => Ok(StreamEvent::End),
            (_, _, FrameKind::StreamData) if self.messages_allowed => Ok(StreamEvent::Message),
            (_, _, FrameKind::StreamData) => Err(StreamViolation::Unexpected {
                kind,
                when: "from the caller of a server-streaming call",
            }),
            (StreamSide::Caller, _, _) => Err(StreamViolation::Unexpected {
                kind,
                when: "after the server accepted the call",
            }),
            (StreamSide::Server, _, _) => Err(StreamViolation::Unexpected {
                kind,
                when: "from the caller of an open stream",
            }),
        }
    }
}

/// The header of a frame of the stream with `request_id` (any kind but
/// `Request`; `payload_len` is set when the frame is built).
pub fn stream_header(
    kind: FrameKind,
    method: &Method,
    priority: Priority,
    request_id: u64,
) -> Header {
    Header {
        kind,
        priority,
        idempotent: false,
        service: method.service,
        method: method.id,
        request_id,
        payload_len: 0,
        deadline_ms: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::methods;

    fn h(kind: FrameKind, request_id: u64, len: u32) -> Header {
        let mut header = stream_header(kind, methods::VM_WATCH, Priority::Normal, request_id);
        header.payload_len = len;
        header
    }

    #[test]
    fn a_caller_sees_accept_messages_and_end() {
        let mut r = StreamRules::new(StreamSide::Caller, 7, true, 100);
        assert_eq!(
            r.check(&h(FrameKind::Response, 7, 0)),
            Ok(StreamEvent::Accepted)
        );
        for _ in 0..3 {
            assert_eq!(
                r.check(&h(FrameKind::StreamData, 7, 100)),
                Ok(StreamEvent::Message)
            );
        }
        assert_eq!(
            r.check(&h(FrameKind::StreamEnd, 7, 0)),
            Ok(StreamEvent::End)
        );
        assert!(r.is_over());
        assert_eq!(
            r.check(&h(FrameKind::StreamData, 7, 1)),
            Err(StreamViolation::AfterEnd {
                kind: FrameKind::StreamData
            })
        );
    }

    #[test]
    fn every_rule_break_is_a_typed_violation() {
        let mut r = StreamRules::new(StreamSide::Caller, 7, true, 100);
        assert!(matches!(
            r.check(&h(FrameKind::StreamData, 7, 1)),
            Err(StreamViolation::Unexpected { .. })
        ));
        let mut r = StreamRules::new(StreamSide::Caller, 7, true, 100);
        assert_eq!(
            r.check(&h(FrameKind::Response, 8, 0)),
            Err(StreamViolation::UnknownRequest {
                kind: FrameKind::Response,
                expected: 7,
                got: 8
            })
        );
        let mut r = StreamRules::new(StreamSide::Server, 7, true, 100);
        assert_eq!(
            r.check(&h(FrameKind::StreamData, 7, 101)),
            Err(StreamViolation::Oversize { len: 101, max: 100 })
        );
        let mut r = StreamRules::new(StreamSide::Server, 7, false, 100);
        assert!(matches!(
            r.check(&h(FrameKind::StreamData, 7, 1)),
            Err(StreamViolation::Unexpected { .. })
        ));
        let mut r = StreamRules::new(StreamSide::Server, 7, true, 100);
        assert!(matches!(
            r.check(&h(FrameKind::Response, 7, 1)),
            Err(StreamViolation::Unexpected { .. })
        ));
        assert!(r.is_over(), "a violation ends the stream");
        let mut r = StreamRules::new(StreamSide::Server, 7, true, 100);
        assert_eq!(
            r.check(&h(FrameKind::Cancel, 7, 0)),
            Ok(StreamEvent::Cancelled)
        );
        let mut r = StreamRules::new(StreamSide::Caller, 7, true, 100);
        assert_eq!(
            r.check(&h(FrameKind::Error, 7, 5)),
            Ok(StreamEvent::Refused)
        );
        let mut r = StreamRules::new(StreamSide::Caller, 7, true, 100);
        r.check(&h(FrameKind::Response, 7, 0)).unwrap();
        assert_eq!(r.check(&h(FrameKind::Error, 7, 5)), Ok(StreamEvent::Failed));
    }

    #[test]
    fn idle_bounds_round_trip_and_clamp() {
        assert_eq!(idle_ms(Duration::from_micros(1)), 1);
        assert_eq!(
            idle_from_ms(idle_ms(Duration::from_secs(100_000))),
            MAX_STREAM_IDLE_TIMEOUT
        );
        assert_eq!(idle_from_ms(0), DEFAULT_STREAM_IDLE_TIMEOUT);
        let s = StreamCall::new(methods::RAFT_APPEND_STREAM, Bytes::new());
        assert_eq!(s.priority, Priority::Replication);
        assert_eq!(s.idle_ms(), 60_000);
    }
}
