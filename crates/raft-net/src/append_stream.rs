//! Pipelined replication: openraft's `stream_append` over one
//! bidirectional `Raft/AppendStream` stream per follower.
//!
//! **Leader side** (`open`). openraft hands the network a stream of
//! append-entries requests for one follower and wants the answers in the
//! same order. The first request opens the stream (it rides in the
//! opening); a feeder task then sends each next request as soon as
//! openraft produces it, while fewer than [`MAX_APPEND_IN_FLIGHT`] batches
//! wait for their answer, so the leader no longer waits for one append's
//! answer before it sends the next. The answers are read in order (the
//! stream keeps order, and the follower answers in order); each must come
//! within [`REPLICATION_TIMEOUT`] of its batch being sent.
//!
//! **Follower side** (`serve`). Every message is checked before Raft
//! sees it: its size ([`MAX_APPEND_MESSAGE`]), that it decodes as an
//! append-entries request, and that its caller may send it (a current
//! member, naming itself as the leader; judged again for every message,
//! so a member removed mid-stream is refused from then on). Accepted
//! requests go to the local Raft in order (`Raft::stream_append`), and
//! their answers go back in order. A message that breaks a rule ends that
//! stream with a typed [`AppendStreamError`] after the answers to the
//! messages before it; nothing else on the node is affected.
//!
//! **When a stream breaks** the leader's answer stream yields the error
//! and ends; openraft retries from the follower's last acknowledged log
//! position on a new stream, so nothing is lost and nothing is applied
//! twice (a re-sent entry that the follower already holds is a no-op).
//! A stream that fails before it opened may be opened over gRPC by the
//! dual router under its usual rules; once open, no transport retries it.
//!
//! **Unary appends stay.** Heartbeats (openraft's heartbeat client sends
//! one request per stream) go as `Raft/AppendEntries` on the control lane:
//! opening a stream for one message would cost a round trip more. And a
//! follower that does not serve streams (a node of an older version
//! answers `Unimplemented`) is replicated to with `Raft/AppendEntries`,
//! one batch at a time, for [`UNARY_RETRY_AFTER`] before a stream is
//! tried again.

//! **The default.** `RaftOptions::pipelined_replication` is on unless a
//! node's options turn it off (the unary path stays, tested, for that and
//! for older followers). It was off for one stop: the lab's `udp-blocked`
//! scenario saw a VM write wait past its 8 s bound while UDP was blocked.
//! The cause was not the stream: a follower's forwarded write waited out
//! its whole iroh budget (7 s) on the dead path before falling back. The
//! router now pings a slow call's path and falls back when the ping fails
//! (`tern_transport_dual::router::PATH_CHECK_AFTER`), and the scenario's
//! slowest write during the block is about 2 s (one `REPLICATION_TIMEOUT`
//! on the stalled stream, after which it is reopened over gRPC).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use openraft::errors::{NetworkError, RPCError, Timeout};
use openraft::raft::{StreamAppendError, StreamAppendResult};
use openraft::{OptionalSend, RPCTypes};
use tern_protocol::metric_names as names;
use tern_protocol::{CallError, Code, Status, StreamReceiver, StreamSender};
use tern_state::NodeId;
use tern_store::{LogId, TypeConfig};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;

use crate::codec::{self, AppendEntriesRequest};
use crate::network::{REPLICATION_TIMEOUT, map_call_error};
use crate::service::RaftInstance;
use crate::wire::{self, AppendEntriesResponse, EnvelopeError};

/// Append batches a leader keeps in flight to one follower on its stream
/// before it waits for the oldest answer. Each answer waits for the
/// follower's group commit (one `fdatasync`), so a batch sent while the
/// previous ones are being synced joins the follower's next sync instead
/// of waiting a whole round trip plus a sync for its turn. openraft puts
/// every entry written meanwhile into its next batch, so a few batches
/// cover a sync in progress, one being written and one on the wire; eight
/// leave room for a slow disk or a long link while bounding the entries a
/// broken stream puts back to be re-sent. It stays below openraft's own
/// follower pipeline (64 requests between the stream and the core loop), so
/// the follower never blocks on it; bytes in flight are bounded by the
/// stream window as well.
pub const MAX_APPEND_IN_FLIGHT: usize = 8;

/// Idle bound of a replication stream, sent to the follower: the longest
/// either end waits for the other's next message before it gives the
/// stream up. Larger than [`APPEND_STREAM_QUIET_CLOSE`], so that the leader
/// ends a quiet stream itself before the follower times it out.
pub const APPEND_STREAM_IDLE: Duration = Duration::from_secs(30);

/// A leader with nothing to send a follower for this long ends the stream
/// cleanly (after its last answers); the next write opens a new one. On a
/// quiet cluster streams do not sit open until their idle bound fails
/// them, which would log an error for no fault.
pub const APPEND_STREAM_QUIET_CLOSE: Duration = Duration::from_secs(10);

/// How long a leader replicates with unary `Raft/AppendEntries` to a
/// follower that answered a stream `Unimplemented` (an older node during a
/// rolling upgrade) before it tries a stream again.
pub const UNARY_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Largest message a follower reads from a replication stream: one
/// wrapped append-entries request at the frame payload limit. Checked
/// before decoding.
pub const MAX_APPEND_MESSAGE: usize = wire::MAX_WRAPPED_MESSAGE + wire::ENVELOPE_OVERHEAD;

// A bound of 1 would be the unary path again; openraft's follower
// pipeline (`PIPELINE_BUFFER_SIZE`, 64) must not be the bottleneck.
const _: () = assert!(MAX_APPEND_IN_FLIGHT >= 2 && MAX_APPEND_IN_FLIGHT <= 64);
const _: () = assert!(APPEND_STREAM_QUIET_CLOSE.as_millis() < APPEND_STREAM_IDLE.as_millis());
const _: () = assert!(
    REPLICATION_TIMEOUT.as_millis() < APPEND_STREAM_IDLE.as_millis(),
    "an answer is late long before the stream counts as idle"
);

type RpcErr = RPCError<TypeConfig>;

/// One answer of openraft's `stream_append` output.
pub(crate) type AppendItem = Result<StreamAppendResult<TypeConfig>, RpcErr>;

/// openraft's `stream_append` output, owned.
pub(crate) type AppendOutput = Pin<Box<dyn Stream<Item = AppendItem> + Send + 'static>>;

/// The log range a sent batch covers, to read its answer.
#[derive(Debug, Clone)]
pub(crate) struct Range {
    /// The request's `prev_log_id`.
    pub(crate) prev: Option<LogId>,
    /// The last log id sent: the last entry's, or `prev` without entries.
    pub(crate) last: Option<LogId>,
}

impl Range {
    /// The range of `req`'s first `sent` entries.
    pub(crate) fn of(req: &AppendEntriesRequest, sent: usize) -> Range {
        let last = sent
            .checked_sub(1)
            .and_then(|i| req.entries.get(i))
            .map(|e| e.log_id)
            .or(req.prev_log_id);
        Range {
            prev: req.prev_log_id,
            last,
        }
    }
}

/// openraft's reading of an answer to a batch covering `range`. Checked,
/// unlike openraft's own conversion: an answer a follower could not
/// honestly give (a conflict before the first entry, a partial success
/// beyond what was sent) is a garbled answer, never a panic.
#[allow(clippy::result_large_err)] // reason: openraft's own error type, which its network API returns unboxed; one per answer
pub(crate) fn read_answer(
    answer: AppendEntriesResponse,
    range: &Range,
) -> Result<StreamAppendResult<TypeConfig>, RpcErr> {
    match answer {
        AppendEntriesResponse::Success => Ok(Ok(range.last)),
        AppendEntriesResponse::PartialSuccess(matched) if matched <= range.last => Ok(Ok(matched)),
        AppendEntriesResponse::PartialSuccess(_) => Err(garbled(
            "a partial success beyond the entries sent".to_string(),
        )),
        AppendEntriesResponse::Conflict => match range.prev {
            Some(prev) => Ok(Err(StreamAppendError::Conflict(prev))),
            None => Err(garbled(
                "a conflict at the start of the log, where none can be".to_string(),
            )),
        },
        AppendEntriesResponse::HigherVote(vote) => Ok(Err(StreamAppendError::HigherVote(vote))),
    }
}

fn garbled(what: String) -> RpcErr {
    RPCError::Network(NetworkError::from_string(format!(
        "undecodable append-entries answer: {what}"
    )))
}

fn timeout(local: NodeId, target: NodeId) -> RpcErr {
    RPCError::Timeout(Timeout {
        action: RPCTypes::AppendEntries,
        id: local,
        target,
        timeout: REPLICATION_TIMEOUT,
    })
}

/// A batch on the wire, waiting for its answer. Holds one of the
/// stream's [`MAX_APPEND_IN_FLIGHT`] places until it is dropped.
struct InFlight {
    range: Range,
    /// The batch was cut to a prefix: the stream ends after its answer,
    /// so that openraft sends the rest from the new position.
    cut: bool,
    sent_at: Instant,
    _place: OwnedSemaphorePermit,
    gauge: ::metrics::Gauge,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
    }
}

/// What the feeder tells the answer reader, in order.
enum Fed {
    /// A batch was sent.
    Batch(InFlight),
    /// Sending failed; the stream is over.
    Failed(RpcErr),
}

/// Until when a follower that serves no replication streams gets unary
/// appends ([`UNARY_RETRY_AFTER`] from when it said so). Shared by a
/// follower's network client and the readers of its streams, since a
/// transport may accept a stream before the follower's handler refuses it.
#[derive(Debug, Default, Clone)]
pub(crate) struct UnaryUntil(Arc<std::sync::Mutex<Option<std::time::Instant>>>);

impl UnaryUntil {
    /// Whether unary appends are in force now.
    pub(crate) fn active(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|until| std::time::Instant::now() < until)
    }

    /// Puts unary appends in force for [`UNARY_RETRY_AFTER`]; `error` is
    /// the follower's refusal.
    pub(crate) fn start(&self, target: NodeId, error: &CallError) {
        tracing::info!(
            target,
            error = %error,
            retry_after_secs = UNARY_RETRY_AFTER.as_secs(),
            "the follower serves no replication streams; replicating with unary appends"
        );
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(std::time::Instant::now() + UNARY_RETRY_AFTER);
    }
}

/// Whether `error` says the follower (or this node's client) serves no
/// replication streams, as a node of an older version answers; unary
/// appends still work then.
pub(crate) fn serves_no_streams(error: &CallError) -> bool {
    match error {
        CallError::Application(status) => status.code == Code::Unimplemented,
        CallError::Transport(t) => {
            t.kind == tern_protocol::TransportErrorKind::NotServed
                && t.delivery == tern_protocol::Delivery::NotDelivered
        }
    }
}

/// Everything [`open`] needs from its network client.
pub(crate) struct Opened {
    /// The leader's node id (for errors).
    pub(crate) local: NodeId,
    /// The follower's node id.
    pub(crate) target: NodeId,
    /// The open stream.
    pub(crate) sender: StreamSender,
    /// Its answers.
    pub(crate) receiver: StreamReceiver,
    /// The first batch, sent by the opening.
    pub(crate) first: Range,
    /// Whether the first batch was cut to a prefix.
    pub(crate) first_cut: bool,
    /// Held while the stream is open: its place in the peer's replication
    /// lane.
    pub(crate) lane: OwnedSemaphorePermit,
    /// Set when the follower refuses the stream as one it does not serve.
    pub(crate) unary: UnaryUntil,
}

/// Runs an opened replication stream: spawns the feeder that sends
/// openraft's further requests (at most [`MAX_APPEND_IN_FLIGHT`] batches
/// unanswered) and returns the answers in order. The feeder ends when
/// openraft's input ends, after [`APPEND_STREAM_QUIET_CLOSE`] without a
/// request, when a send fails, or when the returned stream is dropped.
pub(crate) fn open<S>(opened: Opened, input: S) -> AppendOutput
where
    S: Stream<Item = AppendEntriesRequest> + OptionalSend + Unpin + 'static,
{
    let Opened {
        local,
        target,
        sender,
        receiver,
        first,
        first_cut,
        lane,
        unary,
    } = opened;
    let places = Arc::new(Semaphore::new(MAX_APPEND_IN_FLIGHT));
    let gauge = ::metrics::gauge!(names::RAFT_APPEND_IN_FLIGHT, "peer" => target.to_string());
    let (fed_tx, fed_rx) = mpsc::channel::<Fed>(MAX_APPEND_IN_FLIGHT);
    let first_place = places
        .clone()
        .try_acquire_owned()
        .expect("a fresh semaphore of MAX_APPEND_IN_FLIGHT >= 2 places has one free");
    gauge.increment(1.0);
    batch_sent();
    let first = InFlight {
        range: first,
        cut: first_cut,
        sent_at: Instant::now(),
        _place: first_place,
        gauge: gauge.clone(),
    };
    if fed_tx.try_send(Fed::Batch(first)).is_err() {
        // Unreachable: the channel is fresh and holds MAX_APPEND_IN_FLIGHT.
        tracing::error!(target, "replication stream: no room for its first batch");
    }
    let feeder = Feeder {
        local,
        target,
        sender,
        places,
        fed: fed_tx,
        gauge,
    };
    if first_cut {
        tokio::spawn(feeder.finish());
    } else {
        tokio::spawn(feeder.run(input));
    }
    let reader = Reader {
        local,
        target,
        receiver,
        fed: fed_rx,
        done: false,
        answered: false,
        unary,
        _lane: lane,
    };
    Box::pin(futures::stream::unfold(reader, |mut r| async move {
        let item = r.next().await?;
        Some((item, r))
    }))
}

fn batch_sent() {
    ::metrics::counter!(names::RAFT_APPEND_STREAM_BATCHES, "side" => "client").increment(1);
}

/// Sends openraft's requests after the first.
/// What the feeder does next.
enum Next {
    /// Send this batch.
    Request(AppendEntriesRequest),
    /// End the stream cleanly.
    Finish,
    /// The reader is gone: stop.
    Stop,
}

struct Feeder {
    local: NodeId,
    target: NodeId,
    sender: StreamSender,
    places: Arc<Semaphore>,
    fed: mpsc::Sender<Fed>,
    gauge: ::metrics::Gauge,
}

impl Feeder {
    async fn run<S>(mut self, mut input: S)
    where
        S: Stream<Item = AppendEntriesRequest> + Unpin,
    {
        loop {
            // A place first: openraft builds a batch only when asked, so
            // the batch it builds once a place is free carries everything
            // written meanwhile.
            let place = tokio::select! {
                place = self.places.clone().acquire_owned() => match place {
                    Ok(place) => place,
                    // Never closed; treat it as the end.
                    Err(_) => return,
                },
                () = self.fed.closed() => return,
            };
            let req = match self.next_request(&mut input).await {
                Next::Request(req) => req,
                Next::Finish => return self.finish().await,
                Next::Stop => return,
            };
            let encoded = match crate::network::encode_append(&req) {
                Ok(encoded) => encoded,
                Err(e) => {
                    tracing::error!(target = self.target, error = %e, "an append batch cannot be encoded, even one entry alone");
                    let _ = self
                        .fed
                        .send(Fed::Failed(RPCError::Network(NetworkError::new(&e))))
                        .await;
                    return;
                }
            };
            let sent = encoded.prefix.unwrap_or(req.entries.len());
            let cut = encoded.prefix.is_some();
            if cut {
                tracing::info!(
                    target = self.target,
                    sent,
                    batch = req.entries.len(),
                    "append batch over the payload limit; sending a prefix"
                );
            }
            if !self.send(encoded.payload).await {
                return;
            }
            self.gauge.increment(1.0);
            batch_sent();
            tracing::trace!(
                target: "tern_commit_path",
                to = self.target,
                last = req.entries.get(sent.wrapping_sub(1)).map_or(0, |e| e.log_id.index),
                "batch sent"
            );
            let batch = InFlight {
                range: Range::of(&req, sent),
                cut,
                sent_at: Instant::now(),
                _place: place,
                gauge: self.gauge.clone(),
            };
            if self.fed.send(Fed::Batch(batch)).await.is_err() {
                return;
            }
            if cut {
                return self.finish().await;
            }
        }
    }

    /// The next batch openraft builds; the stream ends (cleanly) when the
    /// input ends or stays quiet for [`APPEND_STREAM_QUIET_CLOSE`], and
    /// stops when the reader is gone.
    async fn next_request<S>(&mut self, input: &mut S) -> Next
    where
        S: Stream<Item = AppendEntriesRequest> + Unpin,
    {
        let next = tokio::select! {
            next = tokio::time::timeout(APPEND_STREAM_QUIET_CLOSE, input.next()) => next,
            () = self.fed.closed() => return Next::Stop,
        };
        match next {
            Ok(Some(req)) => Next::Request(req),
            Ok(None) => {
                tracing::debug!(
                    target = self.target,
                    "replication input ended; closing the stream"
                );
                Next::Finish
            }
            Err(_) => {
                tracing::debug!(
                    target = self.target,
                    "nothing to replicate for a while; closing the stream"
                );
                Next::Finish
            }
        }
    }

    /// Sends one encoded batch; false when the stream is over (a failed
    /// send is reported to the reader).
    async fn send(&mut self, payload: Bytes) -> bool {
        let sent = tokio::select! {
            sent = self.sender.send(payload) => sent,
            () = self.fed.closed() => return false,
        };
        match sent {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(target = self.target, error = %e, "replication stream send failed");
                let err = map_call_error(
                    &e,
                    RPCTypes::AppendEntries,
                    self.local,
                    self.target,
                    REPLICATION_TIMEOUT,
                );
                let _ = self.fed.send(Fed::Failed(err)).await;
                false
            }
        }
    }

    /// Ends the leader's side cleanly: the follower answers what it has
    /// and ends the stream.
    async fn finish(mut self) {
        let finished = tokio::select! {
            finished = self.sender.finish() => finished,
            () = self.fed.closed() => return,
        };
        if let Err(e) = finished {
            tracing::debug!(target = self.target, error = %e, "replication stream finish failed");
            let err = map_call_error(
                &e,
                RPCTypes::AppendEntries,
                self.local,
                self.target,
                REPLICATION_TIMEOUT,
            );
            let _ = self.fed.send(Fed::Failed(err)).await;
        }
    }
}

/// Reads the answers in order.
struct Reader {
    local: NodeId,
    target: NodeId,
    receiver: StreamReceiver,
    fed: mpsc::Receiver<Fed>,
    done: bool,
    /// Whether the follower answered anything yet.
    answered: bool,
    unary: UnaryUntil,
    _lane: OwnedSemaphorePermit,
}

impl Reader {
    async fn next(&mut self) -> Option<AppendItem> {
        if self.done {
            return None;
        }
        let item = self.step().await;
        if !matches!(item, Some(Ok(Ok(_)))) {
            self.done = true;
        }
        item
    }

    async fn step(&mut self) -> Option<AppendItem> {
        let batch = match self.fed.recv().await {
            Some(Fed::Batch(batch)) => batch,
            Some(Fed::Failed(err)) => return Some(Err(err)),
            None => {
                // Every batch is answered and the leader's side finished:
                // the follower ends the stream.
                let end = tokio::time::timeout(REPLICATION_TIMEOUT, self.receiver.next()).await;
                return match end {
                    Ok(Some(Ok(_))) => Some(Err(garbled("an answer to no request".to_string()))),
                    Ok(Some(Err(e))) => {
                        tracing::debug!(target = self.target, error = %e, "replication stream ended with an error after its last answer");
                        None
                    }
                    Ok(None) | Err(_) => None,
                };
            }
        };
        let deadline = batch.sent_at + REPLICATION_TIMEOUT;
        let answer = match tokio::time::timeout_at(deadline, self.receiver.next()).await {
            Err(_) => return Some(Err(timeout(self.local, self.target))),
            Ok(None) => {
                return Some(Err(RPCError::Network(NetworkError::from_string(format!(
                    "node {} ended the replication stream without answering every batch",
                    self.target
                )))));
            }
            Ok(Some(Err(e))) if !self.answered && serves_no_streams(&e) => {
                // Accepted by the transport, refused by the follower's
                // handler: replicate with unary appends, at once.
                self.unary.start(self.target, &e);
                return Some(Err(RPCError::Network(NetworkError::from_string(format!(
                    "node {} serves no replication streams: {e}",
                    self.target
                )))));
            }
            Ok(Some(Err(e))) => {
                tracing::debug!(target = self.target, error = %e, "replication stream broke");
                return Some(Err(map_call_error(
                    &e,
                    RPCTypes::AppendEntries,
                    self.local,
                    self.target,
                    REPLICATION_TIMEOUT,
                )));
            }
            Ok(Some(Ok(bytes))) => bytes,
        };
        self.answered = true;
        let answer: AppendEntriesResponse = match wire::unwrap(answer) {
            Ok(answer) => answer,
            Err(e) => return Some(Err(garbled(e.to_string()))),
        };
        let result = read_answer(answer, &batch.range);
        tracing::trace!(
            target: "tern_commit_path",
            from = self.target,
            last = batch.range.last.map_or(0, |l| l.index),
            "answer received"
        );
        if batch.cut {
            // openraft sends the rest from the new position, on a new stream.
            self.done = true;
        }
        Some(result)
    }
}

/// Why a follower ended a replication stream. Each ends that stream only
/// (after the answers to the messages before the offending one); the
/// transport, the connection and Raft go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendStreamError {
    /// A message larger than any append-entries request can be.
    #[error(
        "message {position} on Raft/AppendStream has {len} bytes; at most {max} bytes are read"
    )]
    Oversize {
        /// 1-based position of the message on the stream.
        position: u64,
        /// Its length.
        len: usize,
        /// [`MAX_APPEND_MESSAGE`].
        max: usize,
    },
    /// A message that is not an append-entries request.
    #[error("message {position} on Raft/AppendStream is not an append-entries request: {source}")]
    Undecodable {
        /// 1-based position of the message on the stream.
        position: u64,
        /// What the decoder said.
        source: EnvelopeError,
    },
    /// The caller may not send this message (no longer a member, or it
    /// names another node as its leader).
    #[error("message {position} on Raft/AppendStream refused: {status}")]
    Refused {
        /// 1-based position of the message on the stream.
        position: u64,
        /// The refusal, as a unary call would get it.
        status: Status,
    },
    /// The caller's side of the stream broke.
    #[error("Raft/AppendStream broke after {position} messages: {source}")]
    Broken {
        /// Messages received before it broke.
        position: u64,
        /// The transport's error.
        source: CallError,
    },
    /// An answer could not be sent (the caller is gone).
    #[error("cannot answer on Raft/AppendStream: {0}")]
    AnswerLost(CallError),
    /// An answer could not be encoded.
    #[error("cannot encode an answer on Raft/AppendStream: {0}")]
    Encode(String),
    /// Raft stopped on this node.
    #[error("Raft stopped on this node: {0}")]
    Stopped(String),
}

impl AppendStreamError {
    /// The status the caller gets.
    pub fn into_status(self) -> Status {
        let code = match &self {
            AppendStreamError::Oversize { .. } => Code::ResourceExhausted,
            AppendStreamError::Undecodable { .. } => Code::InvalidArgument,
            AppendStreamError::Refused { status, .. } => status.code,
            AppendStreamError::Broken { .. } | AppendStreamError::AnswerLost(_) => Code::Cancelled,
            AppendStreamError::Encode(_) => Code::Internal,
            AppendStreamError::Stopped(_) => Code::Unavailable,
        };
        Status::new(code, self.to_string())
    }
}

/// Whether a caller may send a request naming `leader` as its leader, now.
pub(crate) type Authorize = Box<dyn Fn(NodeId) -> Result<(), Status> + Send + Sync + 'static>;

/// Reads the caller's messages, checked, as openraft's input.
struct Inbound {
    first: Option<Bytes>,
    inbound: StreamReceiver,
    authorize: Authorize,
    position: u64,
    error: Arc<std::sync::Mutex<Option<AppendStreamError>>>,
}

impl Inbound {
    async fn next(&mut self) -> Option<AppendEntriesRequest> {
        let bytes = match self.first.take() {
            Some(first) => first,
            None => match self.inbound.next().await {
                None => return None,
                Some(Ok(bytes)) => bytes,
                Some(Err(source)) => {
                    return self.fail(AppendStreamError::Broken {
                        position: self.position,
                        source,
                    });
                }
            },
        };
        self.position += 1;
        let position = self.position;
        if bytes.len() > MAX_APPEND_MESSAGE {
            return self.fail(AppendStreamError::Oversize {
                position,
                len: bytes.len(),
                max: MAX_APPEND_MESSAGE,
            });
        }
        let decoded = wire::unwrap_bytes(bytes)
            .and_then(|data| codec::decode_append_entries(&data).map_err(EnvelopeError::Codec));
        let req = match decoded {
            Ok(req) => req,
            Err(source) => return self.fail(AppendStreamError::Undecodable { position, source }),
        };
        if let Err(status) = (self.authorize)(req.vote.leader_id.node_id) {
            return self.fail(AppendStreamError::Refused { position, status });
        }
        ::metrics::counter!(names::RAFT_APPEND_STREAM_BATCHES, "side" => "server").increment(1);
        tracing::trace!(
            target: "tern_commit_path",
            last = req.entries.last().map_or(0, |e| e.log_id.index),
            "batch received"
        );
        Some(req)
    }

    fn fail(&mut self, error: AppendStreamError) -> Option<AppendEntriesRequest> {
        tracing::warn!(error = %error, "ending a replication stream");
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
        None
    }
}

/// Serves one replication stream on a follower (see the module docs):
/// `request` is its first message, `inbound` the rest.
pub(crate) async fn serve(
    raft: RaftInstance,
    authorize: Authorize,
    request: Bytes,
    inbound: StreamReceiver,
    mut outbound: StreamSender,
) -> Result<(), AppendStreamError> {
    let error = Arc::new(std::sync::Mutex::new(None));
    let reader = Inbound {
        first: Some(request),
        inbound,
        authorize,
        position: 0,
        error: error.clone(),
    };
    let input = futures::stream::unfold(reader, |mut r| async move {
        let req = r.next().await?;
        Some((req, r))
    });
    let mut answers = std::pin::pin!(raft.stream_append(input));
    while let Some(answer) = answers.next().await {
        let result = answer.map_err(|fatal| AppendStreamError::Stopped(fatal.to_string()))?;
        let last = match &result {
            Ok(Some(l)) => l.index,
            _ => 0,
        };
        let bytes = wire::wrap(&AppendEntriesResponse::from(result))
            .map_err(|e| AppendStreamError::Encode(e.to_string()))?;
        outbound
            .send(bytes)
            .await
            .map_err(AppendStreamError::AnswerLost)?;
        tracing::trace!(target: "tern_commit_path", last, "answer sent");
    }
    match error.lock().unwrap_or_else(|p| p.into_inner()).take() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::testing::log_id;
    use tern_store::Vote;

    fn range(prev: Option<u64>, last: Option<u64>) -> Range {
        Range {
            prev: prev.map(|i| log_id::<TypeConfig>(1, 1, i)),
            last: last.map(|i| log_id::<TypeConfig>(1, 1, i)),
        }
    }

    #[test]
    fn answers_a_follower_cannot_honestly_give_are_garbled_not_panics() {
        // openraft's own conversion unwraps the previous log id of a
        // conflict; a conflict at the start of the log is refused here.
        assert!(matches!(
            read_answer(AppendEntriesResponse::Conflict, &range(None, Some(3))),
            Err(RPCError::Network(_))
        ));
        assert!(matches!(
            read_answer(
                AppendEntriesResponse::PartialSuccess(Some(log_id::<TypeConfig>(1, 1, 9))),
                &range(Some(1), Some(3))
            ),
            Err(RPCError::Network(_))
        ));
        assert!(matches!(
            read_answer(AppendEntriesResponse::Conflict, &range(Some(1), Some(3))),
            Ok(Err(StreamAppendError::Conflict(_)))
        ));
        assert_eq!(
            read_answer(AppendEntriesResponse::Success, &range(Some(1), Some(3))).unwrap(),
            Ok(Some(log_id::<TypeConfig>(1, 1, 3)))
        );
        assert!(matches!(
            read_answer(
                AppendEntriesResponse::HigherVote(Vote::new(5, 2)),
                &range(Some(1), Some(3))
            ),
            Ok(Err(StreamAppendError::HigherVote(_)))
        ));
    }

    #[test]
    fn refusals_keep_their_codes() {
        let e = AppendStreamError::Undecodable {
            position: 2,
            source: EnvelopeError::Protobuf("x".into()),
        };
        assert_eq!(e.clone().into_status().code, Code::InvalidArgument);
        assert!(e.to_string().contains("message 2"), "{e}");
        let e = AppendStreamError::Refused {
            position: 1,
            status: Status::permission_denied("not a member"),
        };
        assert_eq!(e.into_status().code, Code::PermissionDenied);
    }
}
