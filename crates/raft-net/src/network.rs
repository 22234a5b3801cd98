//! openraft's network (`RaftNetworkFactory` / `RaftNetworkV2`) over any
//! [`RpcClient`]: the iroh transport, the gRPC transport or the dual
//! router, unchanged.
//!
//! - **Cheap clients.** [`NetworkFactory::new_client`] only copies the
//!   target's address out of the [`Member`] record openraft passes; the
//!   transport dials (and pools) on the first call. openraft keeps a
//!   client for as long as a replication stream lives, so each call looks
//!   the target up in the [`AddressBook`] first, which follows the latest
//!   membership: a member that rejoined from a new address is reached there
//!   at once (only ever under the same identity).
//! - **Lanes.** Votes, pre-votes, leadership transfers and heartbeats (the
//!   client openraft asks for with `new_heartbeat_client`) travel on
//!   [`Priority::Control`]; append entries on [`Priority::Replication`];
//!   snapshot chunks on [`Priority::Bulk`].
//! - **Deadlines.** Every call gets `RPCOption::soft_ttl()` as its whole
//!   budget, waiting for admission included, so it fails before openraft's
//!   hard limit; except replication appends, which get
//!   [`REPLICATION_TIMEOUT`] (openraft passes them the heartbeat interval,
//!   far too short for an append that waits for the follower's sync). A snapshot is streamed in [`SNAPSHOT_CHUNK_SIZE`] chunks,
//!   each with its own `soft_ttl()`: a large snapshot on a slow link never
//!   hits a whole-transfer timeout, while a stalled one fails within one
//!   chunk's budget.
//! - **Errors** map onto openraft's retry classes ([`map_call_error`]):
//!   a peer that cannot be reached or refuses us is `Unreachable` (openraft
//!   backs off), a deadline is `Timeout`, a connection lost mid-call or a
//!   garbled answer is `Network` (retried at once).
//! - **Isolation.** Each peer has its own bounded lanes ([`crate::gate`]).
//! - **Pipelined replication.** openraft's `stream_append` runs over one
//!   `Raft/AppendStream` stream per follower with several batches in
//!   flight ([`crate::append_stream`]); heartbeats, and followers that
//!   serve no streams, get unary `Raft/AppendEntries`.
//! - **Oversized batches.** An append batch whose encoding exceeds the
//!   frame payload limit is cut to the longest prefix that fits; when the
//!   follower accepts it, openraft is answered `PartialSuccess` up to the
//!   prefix's last entry and sends the rest next. A single entry always
//!   fits: the write limits keep every entry under
//!   [`tern_store::log_store::MAX_ENTRY_BYTES`], checked against the frame
//!   limit at compile time.

use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use openraft::base::{BoxFuture, BoxStream};
use openraft::errors::{
    NetworkError, RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::AppendEntriesResponse;
use openraft::{OptionalSend, RPCTypes, Snapshot};
use prost::Message;
use tern_protocol::catalog::methods;
use tern_protocol::metric_names as names;
use tern_protocol::{
    Call, CallError, Code, Method, PeerAddr, PeerId, Priority, RpcClient, StreamCall,
    TransportErrorKind, pb,
};
use tern_state::{Member, NodeId};
use tern_store::{Membership, SnapshotFile, StoreSnapshot, TypeConfig, Vote};
use tokio::sync::OwnedSemaphorePermit;

use crate::append_stream::{self, AppendItem, Range};
use crate::codec::{self, AppendEntriesRequest, CodecError};
use crate::gate::{Gates, PeerGate, Refused};
use crate::wire::{
    self, ControlRequest, ControlResponse, SnapshotAck, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};

/// Deadline of one replication append (not a heartbeat): it waits for the
/// follower's group commit (an `fdatasync`, tens of milliseconds on a busy
/// disk, hundreds on a slow one) plus a round trip. Independent of the
/// heartbeat interval, which is short so that failover is fast; a follower
/// slower than this is treated as unreachable for the moment and retried.
pub const REPLICATION_TIMEOUT: Duration = Duration::from_secs(2);

/// Bytes of snapshot data per `Raft/Snapshot` call: large enough that the
/// per-call overhead is negligible, small enough that one chunk crosses a
/// slow link well within a chunk's deadline and never nears the frame
/// payload limit.
pub const SNAPSHOT_CHUNK_SIZE: usize = 1024 * 1024;

const _: () = assert!(
    SNAPSHOT_CHUNK_SIZE + 4096 < tern_protocol::frame::DEFAULT_MAX_PAYLOAD as usize,
    "a chunk and its envelope fit one frame"
);

/// Bytes an append-entries request adds around its entries: a vote (two
/// varints and a flag), two optional log ids (a tag and three varints
/// each) and the entry count, with room to spare.
pub const APPEND_HEADER_MAX: usize = 128;

// Every entry the write path accepts (a command of at most
// `MAX_REQUEST_BYTES`, `MAX_ENTRY_BYTES` once in an entry) fits one
// append-entries call on its own, so cutting a batch to a prefix always
// makes progress and no accepted write is unreplicable.
const _: () = assert!(
    tern_store::log_store::MAX_ENTRY_BYTES + APPEND_HEADER_MAX <= wire::MAX_WRAPPED_MESSAGE,
    "the largest accepted entry fits one append-entries message"
);
const _: () = assert!(
    tern_state::limits::MAX_REQUEST_BYTES <= wire::MAX_WRAPPED_MESSAGE,
    "the largest accepted command fits one Raft/Propose call"
);

/// openraft's error for this configuration.
type RpcErr = RPCError<TypeConfig>;

/// The latest known address of every member, by node id, refreshed from
/// the membership ([`AddressBook::update`]). Shared by a node's network
/// clients.
#[derive(Debug, Default)]
pub struct AddressBook {
    addrs: RwLock<HashMap<NodeId, Arc<PeerAddr>>>,
}

impl AddressBook {
    /// Replaces the book with the members of `membership`.
    pub fn update(&self, membership: &Membership) {
        let addrs = membership
            .nodes()
            .map(|(id, m)| (*id, Arc::new(m.addr.clone())))
            .collect();
        *self.addrs.write().unwrap_or_else(|p| p.into_inner()) = addrs;
    }

    /// The latest address of `node`, if the book has one for `peer`.
    fn get(&self, node: NodeId, peer: &PeerId) -> Option<Arc<PeerAddr>> {
        self.addrs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .filter(|a| a.id == *peer)
            .cloned()
    }
}

/// Creates one [`PeerNetwork`] per target for openraft. Cloning is cheap.
#[derive(Clone)]
pub struct NetworkFactory {
    client: Arc<dyn RpcClient>,
    local: NodeId,
    gates: Arc<Gates>,
    book: Arc<AddressBook>,
    pipelined: bool,
}

impl std::fmt::Debug for NetworkFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetworkFactory")
            .field("local", &self.local)
            .field("transport", &self.client.transport())
            .finish_non_exhaustive()
    }
}

impl NetworkFactory {
    /// A factory for node `local` calling through `client`.
    pub fn new(client: Arc<dyn RpcClient>, local: NodeId) -> NetworkFactory {
        NetworkFactory {
            client,
            local,
            gates: Arc::new(Gates::default()),
            book: Arc::new(AddressBook::default()),
            pipelined: true,
        }
    }

    /// Whether replication appends go over one `Raft/AppendStream` per
    /// follower ([`crate::append_stream`]) instead of one unary
    /// `Raft/AppendEntries` at a time. On by default (see
    /// [`crate::append_stream`]'s "The default").
    #[must_use]
    pub fn with_pipelined_replication(mut self, on: bool) -> NetworkFactory {
        self.pipelined = on;
        self
    }

    /// The address book the clients consult; keep it updated with
    /// [`AddressBook::update`] as the membership changes.
    pub fn address_book(&self) -> Arc<AddressBook> {
        self.book.clone()
    }

    fn peer(&self, target: NodeId, node: &Member, append_lane: Priority) -> PeerNetwork {
        PeerNetwork {
            client: self.client.clone(),
            local: self.local,
            target,
            addr: Arc::new(node.addr.clone()),
            book: self.book.clone(),
            append_lane,
            gate: self.gates.get(target, node.peer_id()),
            unary: append_stream::UnaryUntil::default(),
            pipelined: self.pipelined,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> PeerNetwork {
        self.peer(target, node, Priority::Replication)
    }

    async fn new_heartbeat_client(&mut self, target: NodeId, node: &Member) -> PeerNetwork {
        self.peer(target, node, Priority::Control)
    }

    async fn new_snapshot_client(&mut self, target: NodeId, node: &Member) -> PeerNetwork {
        self.peer(target, node, Priority::Replication)
    }
}

/// Counts how an attempt to open a replication stream ended.
fn count_open(opened: &Result<append_stream::Opened, OpenFailed>) {
    let outcome = match opened {
        Ok(_) => "opened",
        Err(OpenFailed::NoStreams(_)) => "unary",
        Err(OpenFailed::Rpc(_)) => "failed",
    };
    ::metrics::counter!(names::RAFT_APPEND_STREAMS, "outcome" => outcome).increment(1);
}

/// openraft's connection to one target node.
pub struct PeerNetwork {
    client: Arc<dyn RpcClient>,
    local: NodeId,
    target: NodeId,
    /// The address openraft's node record gave.
    addr: Arc<PeerAddr>,
    book: Arc<AddressBook>,
    /// Lane of append entries: replication, or control for the heartbeat
    /// client.
    append_lane: Priority,
    gate: Arc<PeerGate>,
    /// Until when this follower is replicated to with unary appends, since
    /// it answered a stream `Unimplemented`
    /// ([`append_stream::UNARY_RETRY_AFTER`]).
    unary: append_stream::UnaryUntil,
    /// See [`NetworkFactory::with_pipelined_replication`].
    pipelined: bool,
}

impl std::fmt::Debug for PeerNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerNetwork")
            .field("local", &self.local)
            .field("target", &self.target)
            .field("peer", &self.addr.id)
            .field("append_lane", &self.append_lane)
            .finish_non_exhaustive()
    }
}

/// Maps a failed call onto openraft's retry classes.
///
/// - `Timeout`: the deadline passed (locally or as the peer reported it).
/// - `Unreachable` (openraft backs off): no connection, the peer is not
///   serving, is shutting down, is not who its address says, is
///   overloaded, or refuses Raft traffic from us for now (not started, does
///   not know us as a member yet, busy).
/// - `Network` (retried at once): a connection lost mid-call, a garbled
///   answer, or any other application error.
pub fn map_call_error(
    error: &CallError,
    action: RPCTypes,
    local: NodeId,
    target: NodeId,
    timeout: Duration,
) -> RpcErr {
    let timeout_err = || {
        RPCError::Timeout(Timeout {
            action,
            id: local,
            target,
            timeout,
        })
    };
    match error {
        CallError::Transport(t) => match t.kind {
            TransportErrorKind::TimedOut => timeout_err(),
            TransportErrorKind::ConnectionLost | TransportErrorKind::Protocol => {
                RPCError::Network(NetworkError::new(error))
            }
            TransportErrorKind::Unreachable
            | TransportErrorKind::PeerShuttingDown
            | TransportErrorKind::LocalShutdown
            | TransportErrorKind::Overloaded
            | TransportErrorKind::WrongPeer
            | TransportErrorKind::NotServed => RPCError::Unreachable(Unreachable::new(error)),
        },
        CallError::Application(status) => match status.code {
            Code::DeadlineExceeded => timeout_err(),
            Code::PermissionDenied
            | Code::Unavailable
            | Code::FailedPrecondition
            | Code::ResourceExhausted
            | Code::Unimplemented => RPCError::Unreachable(Unreachable::new(error)),
            _ => RPCError::Network(NetworkError::new(error)),
        },
    }
}

fn to_streaming(e: RpcErr) -> StreamingError<TypeConfig> {
    match e {
        RPCError::Timeout(t) => StreamingError::Timeout(t),
        RPCError::Unreachable(u) => StreamingError::Unreachable(u),
        RPCError::Network(n) => StreamingError::Network(n),
        RPCError::RemoteError(r) => StreamingError::Network(NetworkError::new(&r)),
    }
}

fn garbled(what: &str, e: impl std::fmt::Display) -> RpcErr {
    RPCError::Network(NetworkError::from_string(format!(
        "undecodable {what} answer: {e}"
    )))
}

/// Distinguishes snapshot transfers started by this process.
static TRANSFER_COUNTER: AtomicU64 = AtomicU64::new(0);

impl PeerNetwork {
    /// One call with `budget` for everything: admission, connection, answer.
    async fn call(
        &self,
        method: &'static Method,
        payload: Bytes,
        lane: Priority,
        budget: Duration,
        action: RPCTypes,
    ) -> Result<Bytes, RpcErr> {
        let started = Instant::now();
        let _permit = self.admit(lane, budget, action).await?;
        let remaining = budget.saturating_sub(started.elapsed());
        let timeout_err = || {
            RPCError::Timeout(Timeout {
                action,
                id: self.local,
                target: self.target,
                timeout: budget,
            })
        };
        if remaining.is_zero() {
            return Err(timeout_err());
        }
        let call = Call::new(method, payload)
            .with_timeout(remaining)
            .with_priority(lane);
        // The transport enforces the timeout; this outer bound only makes
        // sure the budget holds whatever the transport does.
        let addr = self.current_addr();
        match tokio::time::timeout(remaining, self.client.call(&addr, call)).await {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(e)) => {
                tracing::debug!(target = self.target, method = %method.label(), error = %e, "raft call failed");
                Err(map_call_error(&e, action, self.local, self.target, budget))
            }
            Err(_) => Err(timeout_err()),
        }
    }

    /// The target's latest address (see [`AddressBook`]).
    fn current_addr(&self) -> Arc<PeerAddr> {
        self.book
            .get(self.target, &self.addr.id)
            .unwrap_or_else(|| self.addr.clone())
    }

    /// A place in the target's `lane`, waiting at most `budget`.
    async fn admit(
        &self,
        lane: Priority,
        budget: Duration,
        action: RPCTypes,
    ) -> Result<OwnedSemaphorePermit, RpcErr> {
        match self.gate.admit(lane, budget).await {
            Ok(permit) => Ok(permit),
            Err(Refused::QueueFull) => {
                Err(RPCError::Unreachable(Unreachable::from_string(format!(
                    "too many {} calls queued for node {}",
                    lane.as_str(),
                    self.target
                ))))
            }
            Err(Refused::TimedOut) => Err(RPCError::Timeout(Timeout {
                action,
                id: self.local,
                target: self.target,
                timeout: budget,
            })),
        }
    }

    /// Opens a replication stream to the target carrying `first`, within
    /// [`REPLICATION_TIMEOUT`], holding a place in its replication lane.
    async fn open_append_stream(
        &self,
        first: &AppendEntriesRequest,
    ) -> Result<append_stream::Opened, OpenFailed> {
        let encoded = encode_append(first).map_err(|e| {
            tracing::error!(target = self.target, error = %e, "an append batch cannot be encoded, even one entry alone");
            OpenFailed::Rpc(RPCError::Network(NetworkError::new(&e)))
        })?;
        let budget = REPLICATION_TIMEOUT;
        let started = Instant::now();
        let lane = self
            .admit(Priority::Replication, budget, RPCTypes::AppendEntries)
            .await
            .map_err(OpenFailed::Rpc)?;
        let remaining = budget.saturating_sub(started.elapsed());
        let timeout_err = || {
            OpenFailed::Rpc(RPCError::Timeout(Timeout {
                action: RPCTypes::AppendEntries,
                id: self.local,
                target: self.target,
                timeout: budget,
            }))
        };
        if remaining.is_zero() {
            return Err(timeout_err());
        }
        let call = StreamCall::new(methods::RAFT_APPEND_STREAM, encoded.payload)
            .with_open_timeout(remaining)
            .with_idle_timeout(append_stream::APPEND_STREAM_IDLE)
            .with_priority(Priority::Replication);
        let addr = self.current_addr();
        let opened = match tokio::time::timeout(remaining, self.client.open_stream(&addr, call))
            .await
        {
            Err(_) => Err(timeout_err()),
            Ok(Err(e)) if append_stream::serves_no_streams(&e) => Err(OpenFailed::NoStreams(e)),
            Ok(Err(e)) => {
                tracing::debug!(target = self.target, error = %e, "opening a replication stream failed");
                Err(OpenFailed::Rpc(map_call_error(
                    &e,
                    RPCTypes::AppendEntries,
                    self.local,
                    self.target,
                    budget,
                )))
            }
            Ok(Ok(stream)) => self
                .opened(stream, first, encoded.prefix, lane)
                .ok_or_else(|| {
                    OpenFailed::Rpc(RPCError::Network(NetworkError::from_string(
                        "the transport opened Raft/AppendStream without its sending half"
                            .to_string(),
                    )))
                }),
        };
        count_open(&opened);
        opened
    }

    /// The leader's half of an opened replication stream; the first batch
    /// (cut to `prefix` entries, if it was) rode in the opening. `None`
    /// if the transport gave no sending half.
    fn opened(
        &self,
        stream: tern_protocol::CallStream,
        first: &AppendEntriesRequest,
        prefix: Option<usize>,
        lane: tokio::sync::OwnedSemaphorePermit,
    ) -> Option<append_stream::Opened> {
        let sender = stream.sender?;
        Some(append_stream::Opened {
            local: self.local,
            target: self.target,
            sender,
            receiver: stream.receiver,
            first: Range::of(first, prefix.unwrap_or(first.entries.len())),
            first_cut: prefix.is_some(),
            lane,
            unary: self.unary.clone(),
        })
    }

    /// One unary append: the answer and how many of the batch's entries
    /// were sent (all, or the prefix that fit one message).
    async fn append_once(
        &self,
        rpc: &AppendEntriesRequest,
        option: &RPCOption,
    ) -> Result<(wire::AppendEntriesResponse, usize), RpcErr> {
        let encoded = encode_append(rpc).map_err(|e| {
            tracing::error!(target = self.target, error = %e, "an append batch cannot be encoded, even one entry alone");
            RPCError::Network(NetworkError::new(&e))
        })?;
        if let Some(n) = encoded.prefix {
            tracing::info!(
                target = self.target,
                sent = n,
                batch = rpc.entries.len(),
                "append batch over the payload limit; sending a prefix"
            );
        }
        let heartbeat = (self.append_lane == Priority::Control).then(Instant::now);
        // A heartbeat lives within its interval (openraft's soft TTL); a
        // replication append gets its own deadline, since it waits for the
        // follower's sync and must not time out with the heartbeat.
        let budget = if heartbeat.is_some() {
            option.soft_ttl()
        } else {
            REPLICATION_TIMEOUT
        };
        let bytes = self
            .call(
                methods::RAFT_APPEND_ENTRIES,
                encoded.payload,
                self.append_lane,
                budget,
                RPCTypes::AppendEntries,
            )
            .await?;
        if let Some(sent) = heartbeat {
            crate::metrics::heartbeat(self.client.transport(), self.target, sent.elapsed());
        }
        let resp: wire::AppendEntriesResponse =
            wire::unwrap(bytes).map_err(|e| garbled("append-entries", e))?;
        Ok((resp, encoded.prefix.unwrap_or(rpc.entries.len())))
    }

    /// openraft's `stream_append` with one unary append at a time: for
    /// heartbeats and for followers that serve no streams. Ends after an
    /// error, a conflict or higher vote, or a batch cut to a prefix (openraft
    /// sends the rest from the new position).
    fn unary_stream<'s, S>(&'s self, input: S, option: RPCOption) -> BoxStream<'s, AppendItem>
    where
        S: Stream<Item = AppendEntriesRequest> + OptionalSend + Unpin + 'static,
    {
        Box::pin(futures::stream::unfold(
            (input, false),
            move |(mut input, done)| {
                let option = option.clone();
                async move {
                    if done {
                        return None;
                    }
                    let req = input.next().await?;
                    let item = match self.append_once(&req, &option).await {
                        Ok((answer, sent)) => {
                            let item = append_stream::read_answer(answer, &Range::of(&req, sent));
                            let go_on = matches!(item, Ok(Ok(_))) && sent == req.entries.len();
                            return Some((item, (input, !go_on)));
                        }
                        Err(e) => Err(e),
                    };
                    Some((item, (input, true)))
                }
            },
        ))
    }

    async fn control(
        &self,
        req: &ControlRequest,
        option: &RPCOption,
        action: RPCTypes,
    ) -> Result<ControlResponse, RpcErr> {
        let payload = wire::wrap(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let bytes = self
            .call(
                methods::RAFT_VOTE,
                payload,
                Priority::Control,
                option.soft_ttl(),
                action,
            )
            .await?;
        wire::unwrap(bytes).map_err(|e| garbled("control", e))
    }

    async fn send_chunk(
        &self,
        chunk: pb::SnapshotChunk,
        budget: Duration,
    ) -> Result<SnapshotAck, RpcErr> {
        let bytes = self
            .call(
                methods::RAFT_SNAPSHOT,
                chunk.encode_to_vec().into(),
                Priority::Bulk,
                budget,
                RPCTypes::InstallSnapshot,
            )
            .await?;
        wire::unwrap(bytes).map_err(|e| garbled("snapshot", e))
    }
}

/// Why a replication stream did not open.
enum OpenFailed {
    /// The follower serves no streams: replicate with unary appends.
    NoStreams(CallError),
    /// Any other failure, for openraft to retry.
    Rpc(RpcErr),
}

/// An encoded append request, and how many of its entries it carries when
/// the whole batch did not fit.
pub(crate) struct EncodedAppend {
    pub(crate) payload: Bytes,
    /// `Some(n)`: only the first `n` entries were encoded.
    pub(crate) prefix: Option<usize>,
}

pub(crate) fn encode_append(rpc: &AppendEntriesRequest) -> Result<EncodedAppend, CodecError> {
    match wire::wrap_with(|buf| codec::encode_append_entries_into(rpc, buf)) {
        Ok(payload) => {
            return Ok(EncodedAppend {
                payload,
                prefix: None,
            });
        }
        Err(CodecError::TooLarge { .. }) => {}
        Err(e) => return Err(e),
    }
    // Binary search for the longest prefix that fits: O(log n) encodings,
    // on a path taken only by batches of very large entries.
    let encode_prefix = |n: usize| {
        let req = AppendEntriesRequest {
            vote: rpc.vote,
            prev_log_id: rpc.prev_log_id,
            entries: rpc.entries[..n].to_vec(),
            leader_commit: rpc.leader_commit,
        };
        wire::wrap(&req)
    };
    let (mut fits, mut too_big) = (0usize, rpc.entries.len());
    let mut best = None;
    while too_big - fits > 1 {
        let mid = fits + (too_big - fits) / 2;
        match encode_prefix(mid) {
            Ok(payload) => {
                fits = mid;
                best = Some(payload);
            }
            Err(CodecError::TooLarge { .. }) => too_big = mid,
            Err(e) => return Err(e),
        }
    }
    match best {
        Some(payload) if fits > 0 => Ok(EncodedAppend {
            payload,
            prefix: Some(fits),
        }),
        _ => Err(CodecError::TooLarge {
            max: wire::MAX_WRAPPED_MESSAGE,
        }),
    }
}

impl RaftNetworkV2<TypeConfig> for PeerNetwork {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RpcErr> {
        let (resp, sent) = self.append_once(&rpc, &option).await?;
        Ok(match resp {
            AppendEntriesResponse::Success if sent < rpc.entries.len() => {
                AppendEntriesResponse::PartialSuccess(
                    sent.checked_sub(1)
                        .and_then(|i| rpc.entries.get(i))
                        .map(|e| e.log_id),
                )
            }
            resp => resp,
        })
    }

    /// Pipelined over one `Raft/AppendStream` stream (see
    /// [`crate::append_stream`]); heartbeats, and followers that answered a
    /// stream `Unimplemented` within [`append_stream::UNARY_RETRY_AFTER`],
    /// get one unary append at a time.
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<'s, Result<BoxStream<'s, AppendItem>, RpcErr>>
    where
        S: Stream<Item = AppendEntriesRequest> + OptionalSend + Unpin + 'static,
    {
        Box::pin(async move {
            let unary =
                !self.pipelined || self.append_lane == Priority::Control || self.unary.active();
            if unary {
                let this: &'s PeerNetwork = self;
                return Ok(this.unary_stream(input, option));
            }
            let mut input = input;
            let Some(first) = input.next().await else {
                let empty: BoxStream<'s, AppendItem> = Box::pin(futures::stream::empty());
                return Ok(empty);
            };
            match self.open_append_stream(&first).await {
                Ok(opened) => {
                    let output: BoxStream<'s, AppendItem> = append_stream::open(opened, input);
                    Ok(output)
                }
                Err(OpenFailed::NoStreams(e)) => {
                    self.unary.start(self.target, &e);
                    let input = futures::stream::once(std::future::ready(first)).chain(input);
                    let this: &'s PeerNetwork = self;
                    Ok(this.unary_stream(input, option))
                }
                Err(OpenFailed::Rpc(e)) => Err(e),
            }
        })
    }

    async fn vote(&mut self, rpc: VoteRequest, option: RPCOption) -> Result<VoteResponse, RpcErr> {
        match self
            .control(&ControlRequest::Vote(rpc), &option, RPCTypes::Vote)
            .await?
        {
            ControlResponse::Vote(v) => Ok(v),
            other => Err(garbled("vote", format!("{other:?}"))),
        }
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest,
        option: RPCOption,
    ) -> Result<VoteResponse, RpcErr> {
        match self
            .control(&ControlRequest::PreVote(rpc), &option, RPCTypes::Vote)
            .await?
        {
            ControlResponse::Vote(v) => Ok(v),
            other => Err(garbled("pre-vote", format!("{other:?}"))),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse, RpcErr> {
        match self
            .control(
                &ControlRequest::TransferLeader(req),
                &option,
                RPCTypes::TransferLeader,
            )
            .await?
        {
            ControlResponse::TransferLeader(r) => Ok(r),
            other => Err(garbled("transfer-leader", format!("{other:?}"))),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: StoreSnapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse, StreamingError<TypeConfig>> {
        let Snapshot { meta, snapshot } = snapshot;
        let encode_err = |e: CodecError| StreamingError::Network(NetworkError::new(&e));
        let vote_bytes = codec::encode(&vote).map_err(encode_err)?;
        let meta_bytes = codec::encode(&meta).map_err(encode_err)?;
        let snapshot_id = format!(
            "{}-{}-{}",
            self.local,
            meta.last_log_id.as_ref().map_or(0, |l| l.index),
            TRANSFER_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let file = Arc::new(snapshot);
        let total = file
            .len()
            .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        let budget = option.soft_ttl();
        tracing::info!(target = self.target, %snapshot_id, bytes = total, "sending snapshot");
        let mut cancel = pin!(cancel);
        let mut offset = 0u64;
        loop {
            let data = read_chunk(file.clone(), offset)
                .await
                .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
            let done = offset + data.len() as u64 >= total;
            let sent = data.len() as u64;
            let chunk = pb::SnapshotChunk {
                vote: vote_bytes.clone(),
                meta: meta_bytes.clone(),
                snapshot_id: snapshot_id.clone(),
                offset,
                data,
                done,
            };
            let ack = tokio::select! {
                closed = &mut cancel => return Err(StreamingError::Closed(closed)),
                ack = self.send_chunk(chunk, budget) => ack.map_err(to_streaming)?,
            };
            match ack {
                SnapshotAck::Done(resp) => {
                    tracing::info!(target = self.target, %snapshot_id, "snapshot transfer finished");
                    return Ok(resp);
                }
                SnapshotAck::Continue { next_offset } if !done && next_offset == offset + sent => {
                    offset = next_offset;
                }
                SnapshotAck::Continue { next_offset } => {
                    return Err(StreamingError::Network(NetworkError::from_string(format!(
                        "snapshot receiver expects offset {next_offset} after {} bytes (done={done})",
                        offset + sent
                    ))));
                }
            }
        }
    }
}

/// Reads up to [`SNAPSHOT_CHUNK_SIZE`] bytes at `offset` on a blocking
/// thread.
async fn read_chunk(file: Arc<SnapshotFile>, offset: u64) -> std::io::Result<Bytes> {
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; SNAPSHOT_CHUNK_SIZE];
        let mut filled = 0;
        while filled < buf.len() {
            let n = file.read_at(offset + filled as u64, &mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        buf.truncate(filled);
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(|e| std::io::Error::other(format!("snapshot read task: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::EntryPayload;
    use openraft::testing::log_id;
    use tern_protocol::{Delivery, Status, TransportError, TransportKind};
    use tern_state::Command;
    use tern_store::Entry;

    fn err(kind: TransportErrorKind) -> CallError {
        CallError::Transport(TransportError::new(
            TransportKind::Iroh,
            kind,
            Delivery::NotDelivered,
            "x",
        ))
    }

    #[test]
    fn errors_map_to_openraft_retry_classes() {
        let map = |e: CallError| map_call_error(&e, RPCTypes::Vote, 1, 2, Duration::from_secs(1));
        assert!(matches!(
            map(err(TransportErrorKind::TimedOut)),
            RPCError::Timeout(_)
        ));
        assert!(matches!(
            map(err(TransportErrorKind::Unreachable)),
            RPCError::Unreachable(_)
        ));
        assert!(matches!(
            map(err(TransportErrorKind::PeerShuttingDown)),
            RPCError::Unreachable(_)
        ));
        assert!(matches!(
            map(err(TransportErrorKind::ConnectionLost)),
            RPCError::Network(_)
        ));
        assert!(matches!(
            map(CallError::Application(Status::new(
                Code::PermissionDenied,
                "not a member"
            ))),
            RPCError::Unreachable(_)
        ));
        assert!(matches!(
            map(CallError::Application(Status::new(
                Code::DeadlineExceeded,
                "late"
            ))),
            RPCError::Timeout(_)
        ));
        assert!(matches!(
            map(CallError::Application(Status::new(Code::Internal, "bug"))),
            RPCError::Network(_)
        ));
    }

    fn big_entry(index: u64, len: usize) -> Entry {
        Entry {
            log_id: log_id::<TypeConfig>(1, 1, index),
            payload: EntryPayload::Normal(Command::DeleteVm {
                request_id: format!("r{index}"),
                vm_id: "x".repeat(len),
            }),
        }
    }

    #[test]
    fn oversized_batches_are_cut_to_the_longest_prefix_that_fits() {
        let four_mib = 4 * 1024 * 1024;
        let req = AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: None,
            entries: (1..=6).map(|i| big_entry(i, four_mib)).collect(),
            leader_commit: None,
        };
        let encoded = encode_append(&req).unwrap();
        assert_eq!(encoded.prefix, Some(3), "three 4 MiB entries fit 16 MiB");
        assert!(encoded.payload.len() <= tern_protocol::frame::DEFAULT_MAX_PAYLOAD as usize);
        let back: AppendEntriesRequest =
            codec::decode(&wire::unwrap_bytes(encoded.payload).unwrap()).unwrap();
        assert_eq!(back.entries.len(), 3);

        let small = AppendEntriesRequest {
            entries: vec![big_entry(1, 10)],
            ..req.clone()
        };
        assert_eq!(encode_append(&small).unwrap().prefix, None);

        let hopeless = AppendEntriesRequest {
            entries: vec![big_entry(1, 17 * 1024 * 1024)],
            ..req
        };
        assert!(matches!(
            encode_append(&hopeless),
            Err(CodecError::TooLarge { .. })
        ));
    }
}
