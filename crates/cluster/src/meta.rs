//! The metadata register: `Cluster/MetaPut` and `Cluster/MetaGet`, a small
//! replicated key-value map in the cluster state (cluster labels, operator
//! metadata; the lab's and benches' write/read workload), and typed client
//! calls for it.
//!
//! # Semantics
//!
//! - **Put** is a Raft write ([`Command::PutMeta`]) carrying the client's
//!   request id, which the state deduplicates: a retried put is applied
//!   once and answers the first put's log index. It answers once the entry
//!   is committed and applied on the leader.
//! - **Get is linearizable**: the leader confirms it still leads with a
//!   quorum (openraft's `ensure_linearizable` with the read-index policy),
//!   waits until its state machine has applied up to that read index, and
//!   only then reads. The answer carries the read index: the value
//!   reflects every write committed at or below it. A node that cannot
//!   reach a quorum within [`LINEARIZE_TIMEOUT`] answers `Unavailable`;
//!   it never answers from a possibly stale state.
//! - **On a follower** both calls are forwarded once, unchanged apart from
//!   the `forwarded` flag, to the leader the follower knows (the same choice
//!   a follower's writes make with `Raft/Propose`). A call that arrives
//!   already forwarded at a node that is not the leader is answered
//!   `FailedPrecondition` naming the leader, so forwards never loop. With
//!   no leader known the answer is `Unavailable`.
//! - **Who may call**: any authenticated caller, as for the VM service
//!   (the CLI with a throw-away key, a member forwarding). The register is
//!   operator metadata, not a secret store.
//!
//! Errors a client sees, by [`MetaError`]: `InvalidArgument` for a key or
//! value out of bounds (see [`tern_state::MAX_META_KEY_LEN`] and
//! friends), `Unavailable` for no leader / no quorum / leader unreachable
//! (retry, with the same request id for a put), `FailedPrecondition` for a
//! forwarded call that found no leader at its destination (retry).

use std::time::Duration;

use bytes::Bytes;
use openraft::ReadPolicy;
use openraft::errors::{ClientWriteError, ForwardToLeader, LinearizableReadError, RaftError};
use prost::Message;
use tern_protocol::catalog::methods;
use tern_protocol::forward::{Leader, forward_to_leader, not_leader};
use tern_protocol::{Call, CallError, Code, PeerAddr, RequestContext, RpcClient, Status, pb};
use tern_state::{Command, NodeId, Response};
use tern_state::{MAX_REQUEST_ID_LEN, check_meta, check_meta_key};
use tern_store::TypeConfig;

use crate::node::WriteError;
use tern_raft_net::Attached;

/// How long a put waits to be committed before answering `Unavailable`:
/// longer than an election, so a put survives a leader change, and well
/// inside the default call timeout.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(8);

/// How long a get waits for the leader to confirm its leadership with a
/// quorum: a few heartbeat rounds. Past it the node answers `Unavailable`
/// (partitioned or leaderless) instead of a possibly stale value.
pub const LINEARIZE_TIMEOUT: Duration = Duration::from_secs(4);

/// A committed put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaPut {
    /// Log index the put was applied at.
    pub index: u64,
    /// The leader that committed it.
    pub leader_id: NodeId,
}

/// A linearizable read of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRead {
    /// The value and the index of the put that wrote it, if the key is set.
    pub value: Option<(String, u64)>,
    /// The read index: every write committed at or below it is reflected.
    pub read_index: u64,
    /// The leader that confirmed the read.
    pub leader_id: NodeId,
}

/// Why a register call failed, as a client sees it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MetaError {
    /// The key, value or request id is out of bounds; do not retry as is.
    #[error("invalid metadata request: {0}")]
    Invalid(String),
    /// No leader, no quorum, or the leader could not be reached: the
    /// cluster cannot confirm the operation now. Retry (a put with the same
    /// request id; it may have been applied).
    #[error("metadata register unavailable: {0}; retry (a put with the same request id)")]
    Unavailable(String),
    /// The node called is not the leader and did not forward (the call was
    /// already forwarded). Retry, at the leader if the message names it.
    #[error("not the leader: {0}")]
    NotLeader(String),
    /// The call failed in transport; a put may or may not have been
    /// delivered. Retry with the same request id.
    #[error("call failed: {0}")]
    Call(CallError),
    /// Any other answer (the node refused for another reason, or answered
    /// something undecodable).
    #[error("metadata call answered: {0}")]
    Other(String),
}

impl MetaError {
    fn from_call(error: CallError) -> MetaError {
        match error {
            CallError::Application(s) => match s.code {
                Code::InvalidArgument => MetaError::Invalid(s.message),
                Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted => {
                    MetaError::Unavailable(s.message)
                }
                Code::FailedPrecondition => MetaError::NotLeader(s.message),
                _ => MetaError::Other(s.to_string()),
            },
            other => MetaError::Call(other),
        }
    }

    /// Whether retrying (with the same request id for a put) may succeed.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, MetaError::Invalid(_) | MetaError::Other(_))
    }
}

/// Sets `key` to `value` through the node at `addr` (any member; a
/// follower forwards to the leader). `request_id` makes retries safe.
pub async fn meta_put(
    client: &dyn RpcClient,
    addr: &PeerAddr,
    request_id: &str,
    key: &str,
    value: &str,
    timeout: Duration,
) -> Result<MetaPut, MetaError> {
    let req = pb::MetaPutRequest {
        request_id: request_id.to_owned(),
        key: key.to_owned(),
        value: value.to_owned(),
        forwarded: false,
    };
    let call =
        Call::new(methods::CLUSTER_META_PUT, req.encode_to_vec().into()).with_timeout(timeout);
    let bytes = client
        .call(addr, call)
        .await
        .map_err(MetaError::from_call)?;
    let resp = pb::MetaPutResponse::decode(bytes)
        .map_err(|e| MetaError::Other(format!("undecodable MetaPutResponse: {e}")))?;
    Ok(MetaPut {
        index: resp.index,
        leader_id: resp.leader_id,
    })
}

/// Reads `key` linearizably through the node at `addr` (any member; a
/// follower forwards to the leader).
pub async fn meta_get(
    client: &dyn RpcClient,
    addr: &PeerAddr,
    key: &str,
    timeout: Duration,
) -> Result<MetaRead, MetaError> {
    let req = pb::MetaGetRequest {
        key: key.to_owned(),
        forwarded: false,
    };
    let call =
        Call::new(methods::CLUSTER_META_GET, req.encode_to_vec().into()).with_timeout(timeout);
    let bytes = client
        .call(addr, call)
        .await
        .map_err(MetaError::from_call)?;
    let resp = pb::MetaGetResponse::decode(bytes)
        .map_err(|e| MetaError::Other(format!("undecodable MetaGetResponse: {e}")))?;
    Ok(from_get_response(resp))
}

/// The protobuf answer as a [`MetaRead`].
pub fn from_get_response(resp: pb::MetaGetResponse) -> MetaRead {
    MetaRead {
        value: resp.found.then_some((resp.value, resp.write_index)),
        read_index: resp.read_index,
        leader_id: resp.leader_id,
    }
}

fn invalid(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

/// Serves `Cluster/MetaPut`.
pub(crate) async fn serve_put(
    node: &Attached,
    ctx: &RequestContext,
    payload: Bytes,
) -> Result<Bytes, Status> {
    let req = pb::MetaPutRequest::decode(payload.clone())
        .map_err(|e| Status::invalid_argument(format!("cluster/metaput: {e}")))?;
    if req.request_id.is_empty() || req.request_id.len() > MAX_REQUEST_ID_LEN {
        return Err(Status::invalid_argument(format!(
            "field `request_id`: {} bytes; a request id is 1 to {MAX_REQUEST_ID_LEN} bytes, \
             chosen by the client so that retries are safe",
            req.request_id.len()
        )));
    }
    check_meta(&req.key, &req.value).map_err(invalid)?;
    let command = Command::PutMeta {
        request_id: req.request_id.clone(),
        key: req.key.clone(),
        value: req.value.clone(),
    };
    tracing::debug!(%command, caller = %ctx.peer.short(), "metadata put");
    tracing::trace!(target: "tern_commit_path", request_id = %req.request_id, "put received");
    let forwarded = || {
        pb::MetaPutRequest {
            forwarded: true,
            ..req.clone()
        }
        .encode_to_vec()
        .into()
    };
    let written = match write_at_leader(
        node,
        ctx,
        command,
        "put",
        methods::CLUSTER_META_PUT,
        forwarded,
        req.forwarded,
    )
    .await?
    {
        LeaderWrite::Written(data) => data,
        LeaderWrite::Forwarded(answer) => return Ok(answer),
    };
    match written {
        Response::MetaWritten { index } => {
            tracing::trace!(target: "tern_commit_path", index, "put answered");
            Ok(pb::MetaPutResponse {
                index,
                leader_id: node.id,
            }
            .encode_to_vec()
            .into())
        }
        Response::Rejected(why) => Err(invalid(why)),
        other => Err(Status::internal(format!(
            "the state answered a metadata put with {other:?}"
        ))),
    }
}

/// Serves `Cluster/MetaGet`.
pub(crate) async fn serve_get(
    node: &Attached,
    ctx: &RequestContext,
    payload: Bytes,
) -> Result<Bytes, Status> {
    let req = pb::MetaGetRequest::decode(payload)
        .map_err(|e| Status::invalid_argument(format!("cluster/metaget: {e}")))?;
    check_meta_key(&req.key).map_err(invalid)?;
    let linearized = tokio::time::timeout(
        LINEARIZE_TIMEOUT,
        node.raft.ensure_linearizable(ReadPolicy::ReadIndex),
    )
    .await;
    let read_log_id = match linearized {
        Err(_) => {
            return Err(Status::unavailable(format!(
                "node {} could not confirm its leadership with a quorum within \
                 {LINEARIZE_TIMEOUT:?}; a linearizable read is not possible here now",
                node.id
            )));
        }
        Ok(Ok(read_log_id)) => read_log_id,
        Ok(Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f)))) => {
            let forward = pb::MetaGetRequest {
                forwarded: true,
                key: req.key,
            };
            return forward_register_call(
                node,
                ctx,
                &f,
                methods::CLUSTER_META_GET,
                forward.encode_to_vec().into(),
                req.forwarded,
            )
            .await;
        }
        Ok(Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(q)))) => {
            return Err(Status::unavailable(format!(
                "no quorum to confirm a linearizable read: {q}"
            )));
        }
        Ok(Err(RaftError::Fatal(e))) => {
            return Err(Status::unavailable(format!(
                "Raft stopped on this node: {e}"
            )));
        }
    };
    let entry = node
        .sm
        .read(|state| state.meta(&req.key).cloned())
        .map_err(|e| Status::unavailable(format!("reading the state: {e}")))?;
    let resp = match entry {
        Some(e) => pb::MetaGetResponse {
            found: true,
            value: e.value,
            write_index: e.index,
            read_index: read_log_id.index(),
            leader_id: node.id,
        },
        None => pb::MetaGetResponse {
            found: false,
            value: String::new(),
            write_index: 0,
            read_index: read_log_id.index(),
            leader_id: node.id,
        },
    };
    Ok(resp.encode_to_vec().into())
}

/// What a Cluster write served by the leader came to.
pub(crate) enum LeaderWrite {
    /// Committed and applied on this node (the leader): the state's answer.
    Written(Response),
    /// This node does not lead: the leader's answer to the forwarded call,
    /// passed back as is.
    Forwarded(Bytes),
}

/// The one write path of the Cluster calls only the leader serves
/// (`MetaPut`, `TransportSet`, `Rollout`): proposes `command` within
/// [`WRITE_TIMEOUT`]; on a follower, forwards the call once
/// ([`forward_register_call`], `forwarded` building its payload marked
/// forwarded); `what` names the write in the timeout's message.
pub(crate) async fn write_at_leader(
    node: &Attached,
    ctx: &RequestContext,
    command: Command,
    what: &str,
    method: &'static tern_protocol::Method,
    forwarded: impl FnOnce() -> Bytes,
    already_forwarded: bool,
) -> Result<LeaderWrite, Status> {
    match tokio::time::timeout(
        WRITE_TIMEOUT,
        crate::node::client_write(&node.raft, command),
    )
    .await
    {
        Err(_) => Err(Status::unavailable(format!(
            "the {what} was not committed within {WRITE_TIMEOUT:?} (no quorum?); \
             retry with the same request id"
        ))),
        Ok(Ok(written)) => Ok(LeaderWrite::Written(written.data)),
        Ok(Err(WriteError::Limit(e))) => Err(crate::node::limit_status(&e)),
        // A leader whose lease lapsed leads: its refusal is said as such
        // (Unavailable, retry shortly), not forwarded to nobody.
        Ok(Err(WriteError::Raft(e))) if tern_raft_net::write::lease_lapsed(&e) => {
            Err(tern_raft_net::write::write_error(e))
        }
        Ok(Err(WriteError::Raft(RaftError::APIError(ClientWriteError::ForwardToLeader(f))))) => {
            forward_register_call(node, ctx, &f, method, forwarded(), already_forwarded)
                .await
                .map(LeaderWrite::Forwarded)
        }
        Ok(Err(WriteError::Raft(e))) => Err(tern_raft_net::write::write_error(e)),
    }
}

/// Passes a register call this node cannot serve to the leader, once
/// (through [`tern_protocol::forward::forward_to_leader`]); a call that
/// arrived forwarded is answered [`not_leader`] instead.
pub(crate) async fn forward_register_call(
    node: &Attached,
    ctx: &RequestContext,
    f: &ForwardToLeader<TypeConfig>,
    method: &'static tern_protocol::Method,
    payload: Bytes,
    already_forwarded: bool,
) -> Result<Bytes, Status> {
    if already_forwarded {
        return Err(not_leader(
            f.leader_id,
            " (a forwarded call is not forwarded again: retry)",
        ));
    }
    let (Some(id), Some(member)) = (f.leader_id, f.leader_node.as_ref()) else {
        return Err(not_leader(
            f.leader_id,
            " (its address is not in this node's membership yet)",
        ));
    };
    tracing::debug!(method = %method.label(), leader = id, "forwarding a metadata call to the leader");
    let leader = Leader {
        id,
        addr: member.addr.clone(),
    };
    forward_to_leader(node.client.as_ref(), &leader, ctx.deadline, method, payload).await
}
