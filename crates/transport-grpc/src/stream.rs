//! Streaming calls over gRPC: the `stream` methods of the same `.proto`
//! files, served through tonic's streaming plumbing and opened by
//! [`crate::GrpcClient`], behind the same authentication layer, connection
//! caps, lanes and message limits as unary calls.
//!
//! - **Server.** A server-streaming or bidirectional request is
//!   authenticated like any other; the handler runs in its own task and
//!   hands each answer through a slot of
//!   [`tern_protocol::stream::STREAM_HANDOVER_MESSAGES`] to tonic, which writes it under HTTP/2
//!   flow control ([`crate::server::STREAM_WINDOW`] per stream,
//!   [`crate::server::CONNECTION_WINDOW`] per connection). When the caller
//!   resets the stream, hyper drops the answer stream and the handler's
//!   task is aborted. A bidirectional call's first message is its request.
//! - **Client.** Opening waits for the response headers (the peer
//!   accepted); the caller's further messages go through a slot of the same
//!   size. Dropping the receiver, or the sender unfinished, makes the
//!   request stream fail, so hyper resets the HTTP/2 stream
//!   (`RST_STREAM`): the peer sees a cancellation, never a clean end.
//! - **Idle bound.** Sent as [`STREAM_IDLE_KEY`]; both ends bound each wait
//!   with it, as on iroh.
//! - **Byte budget.** A stream's messages are not drawn from the peer's
//!   request-byte budget ([`crate::budget`]), which holds bytes until a call
//!   is answered and would run dry on a long stream; they are bounded by
//!   the stream window instead, since they are read only as the handler
//!   asks.

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes};
use futures::Stream;
use tern_protocol::stream::{MessageSink, MessageSource, StreamReceiver, StreamSender};
use tern_protocol::{
    BoxFuture, CallError, Delivery, TransportError, TransportErrorKind, TransportKind,
};
use tokio::sync::{mpsc, oneshot};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use crate::codec::RawCodec;
use crate::metrics::{self, Direction};

/// Metadata key: a stream's idle bound in milliseconds (see
/// [`tern_protocol::StreamCall::idle_timeout`]).
pub const STREAM_IDLE_KEY: &str = "tern-stream-idle-ms";

fn err(kind: TransportErrorKind, delivery: Delivery, detail: impl Into<String>) -> CallError {
    CallError::Transport(TransportError::new(
        TransportKind::Grpc,
        kind,
        delivery,
        detail,
    ))
}

fn idle_error(idle: Duration, what: &str) -> CallError {
    err(
        TransportErrorKind::TimedOut,
        Delivery::MayHaveBeenDelivered,
        format!("{what} within the stream's idle bound of {idle:?}"),
    )
}

/// Aborts a task when dropped.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The answers of a served stream, as tonic reads them; dropping it (the
/// caller reset the stream, the connection closed) aborts the handler.
pub(crate) struct Answers {
    pub(crate) rx: mpsc::Receiver<Result<Bytes, tonic::Status>>,
    pub(crate) _task: AbortOnDrop,
}

impl Stream for Answers {
    type Item = Result<Bytes, tonic::Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

/// The handler's answers, into tonic's answer stream.
pub(crate) struct ServerSink {
    pub(crate) tx: Option<mpsc::Sender<Result<Bytes, tonic::Status>>>,
    pub(crate) idle: Duration,
}

impl MessageSink for ServerSink {
    fn send(&mut self, message: Bytes) -> BoxFuture<'_, Result<(), CallError>> {
        Box::pin(async move {
            let Some(tx) = &self.tx else {
                return Err(err(
                    TransportErrorKind::Protocol,
                    Delivery::NotDelivered,
                    "this side of the stream is already finished",
                ));
            };
            let len = message.len();
            match tokio::time::timeout(self.idle, tx.send(Ok(message))).await {
                Ok(Ok(())) => {
                    metrics::message(Direction::Sent, len);
                    Ok(())
                }
                Ok(Err(_)) => Err(err(
                    TransportErrorKind::ConnectionLost,
                    Delivery::MayHaveBeenDelivered,
                    "the caller's stream is over",
                )),
                Err(_) => Err(idle_error(self.idle, "the caller took no message")),
            }
        })
    }

    fn finish(&mut self) -> BoxFuture<'_, Result<(), CallError>> {
        self.tx = None;
        Box::pin(std::future::ready(Ok(())))
    }
}

/// The caller's further messages, as a handler reads them.
pub(crate) struct ServerSource {
    pub(crate) inbound: Option<tonic::Streaming<Bytes>>,
    pub(crate) idle: Duration,
}

impl MessageSource for ServerSource {
    fn next(&mut self) -> BoxFuture<'_, Option<Result<Bytes, CallError>>> {
        Box::pin(async move {
            let inbound = self.inbound.as_mut()?;
            let result = match tokio::time::timeout(self.idle, inbound.message()).await {
                Ok(Ok(Some(message))) => {
                    metrics::message(Direction::Received, message.len());
                    return Some(Ok(message));
                }
                Ok(Ok(None)) => None,
                Ok(Err(status)) => Some(Err(err(
                    TransportErrorKind::ConnectionLost,
                    Delivery::MayHaveBeenDelivered,
                    format!("the caller's side of the stream broke: {status}"),
                ))),
                Err(_) => Some(Err(idle_error(self.idle, "the caller sent nothing"))),
            };
            self.inbound = None;
            result
        })
    }
}

/// What the caller writes on a bidirectional stream: messages, or the
/// signal that the stream is abandoned (which the codec turns into an
/// error, so hyper resets the HTTP/2 stream instead of ending it cleanly).
pub(crate) enum Outgoing {
    Message(Bytes),
    Abandon,
}

/// The codec of a caller's bidirectional stream: [`RawCodec`] plus the
/// abandon signal.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct BidiCodec;

impl Codec for BidiCodec {
    type Encode = Outgoing;
    type Decode = Bytes;
    type Encoder = BidiCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        BidiCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for BidiCodec {
    type Item = Outgoing;
    type Error = tonic::Status;

    fn encode(&mut self, item: Outgoing, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        match item {
            Outgoing::Message(bytes) => {
                dst.put(bytes);
                Ok(())
            }
            Outgoing::Abandon => Err(tonic::Status::cancelled("the caller abandoned the stream")),
        }
    }
}

impl Decoder for BidiCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        RawCodec.decode(src)
    }
}

/// The caller's request stream on a bidirectional call: the first
/// message, then what the sender hands over; `Abandon` once the receiver
/// or an unfinished sender is dropped.
pub(crate) struct Requests {
    pub(crate) first: Option<Bytes>,
    pub(crate) rx: mpsc::Receiver<Bytes>,
    /// Fires (is dropped) when the caller's receiver is dropped.
    pub(crate) receiver_gone: oneshot::Receiver<()>,
    /// Resolves `Ok` when the sender finishes, `Err` when it is dropped
    /// unfinished.
    pub(crate) sender_done: oneshot::Receiver<()>,
    pub(crate) finished: bool,
    pub(crate) over: bool,
}

impl Stream for Requests {
    type Item = Outgoing;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Outgoing>> {
        let this = &mut *self;
        if this.over {
            return Poll::Ready(None);
        }
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Outgoing::Message(first)));
        }
        if Pin::new(&mut this.receiver_gone).poll(cx).is_ready() {
            this.over = true;
            return Poll::Ready(Some(Outgoing::Abandon));
        }
        if !this.finished
            && let Poll::Ready(done) = Pin::new(&mut this.sender_done).poll(cx)
        {
            match done {
                Ok(()) => this.finished = true,
                Err(_) => {
                    this.over = true;
                    return Poll::Ready(Some(Outgoing::Abandon));
                }
            }
        }
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(message)) => Poll::Ready(Some(Outgoing::Message(message))),
            // Every message handed over is sent; the end follows the
            // sender's finish (its channel closes with it).
            Poll::Ready(None) if this.finished => {
                this.over = true;
                Poll::Ready(None)
            }
            Poll::Ready(None) => Poll::Pending,
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The caller's further messages on a bidirectional stream.
pub(crate) struct CallerSink {
    pub(crate) tx: Option<mpsc::Sender<Bytes>>,
    pub(crate) done: Option<oneshot::Sender<()>>,
    pub(crate) idle: Duration,
    pub(crate) max_message_size: usize,
}

impl MessageSink for CallerSink {
    fn send(&mut self, message: Bytes) -> BoxFuture<'_, Result<(), CallError>> {
        Box::pin(async move {
            let Some(tx) = &self.tx else {
                return Err(err(
                    TransportErrorKind::Protocol,
                    Delivery::NotDelivered,
                    "this side of the stream is already finished",
                ));
            };
            if message.len() > self.max_message_size {
                return Err(err(
                    TransportErrorKind::Protocol,
                    Delivery::NotDelivered,
                    format!(
                        "a stream message of {} bytes is over the {} byte message limit",
                        message.len(),
                        self.max_message_size
                    ),
                ));
            }
            let len = message.len();
            match tokio::time::timeout(self.idle, tx.send(message)).await {
                Ok(Ok(())) => {
                    metrics::message(Direction::Sent, len);
                    Ok(())
                }
                Ok(Err(_)) => Err(err(
                    TransportErrorKind::ConnectionLost,
                    Delivery::MayHaveBeenDelivered,
                    "the stream is over",
                )),
                Err(_) => Err(idle_error(self.idle, "the peer took no message")),
            }
        })
    }

    fn finish(&mut self) -> BoxFuture<'_, Result<(), CallError>> {
        self.tx = None;
        if let Some(done) = self.done.take() {
            let _ = done.send(());
        }
        Box::pin(std::future::ready(Ok(())))
    }
}

/// What a caller's answers are checked against.
pub(crate) struct Verify {
    pub(crate) expected: tern_protocol::PeerId,
    pub(crate) path: String,
}

/// The answers on the caller's side.
pub(crate) struct CallerSource {
    pub(crate) answers: Option<tonic::Streaming<Bytes>>,
    pub(crate) idle: Duration,
    pub(crate) verify: Verify,
    /// Dropped with the receiver: the request stream then fails, so the
    /// HTTP/2 stream is reset.
    pub(crate) _gone: Option<oneshot::Sender<()>>,
    /// Counts the stream as open while the receiver lives.
    pub(crate) _active: crate::metrics::OpenStream,
}

impl MessageSource for CallerSource {
    fn next(&mut self) -> BoxFuture<'_, Option<Result<Bytes, CallError>>> {
        Box::pin(async move {
            let answers = self.answers.as_mut()?;
            let result = match tokio::time::timeout(self.idle, answers.message()).await {
                Ok(Ok(Some(message))) => {
                    metrics::message(Direction::Received, message.len());
                    return Some(Ok(message));
                }
                Ok(Ok(None)) => None,
                Ok(Err(status)) => Some(Err(crate::client::classify_status(
                    &status,
                    self.verify.expected,
                    &self.verify.path,
                ))),
                Err(_) => Some(Err(idle_error(self.idle, "no message"))),
            };
            // Dropping the answers resets the stream if it is not over.
            self.answers = None;
            self._gone = None;
            result
        })
    }
}

/// Makes a caller's halves.
pub(crate) fn caller_halves(
    sink: Option<CallerSink>,
    source: CallerSource,
) -> (Option<StreamSender>, StreamReceiver) {
    (sink.map(StreamSender::new), StreamReceiver::new(source))
}
