//! The access table's Cluster calls: `Cluster/AccessGrant`,
//! `Cluster/AccessRevoke` and `Cluster/AccessList`.
//!
//! Who may call them is the node's access check's decision (admin for
//! changes, viewer for the list; see `tern_protocol::access`). Changes are
//! served by the leader alone and never forwarded: a forward would carry
//! the follower's key, not the admin's, and the state records and checks
//! who asked. A follower answers `FailedPrecondition` naming the leader.
//! The change records the caller's authenticated key and the leader's
//! clock as values, so `apply` stays pure; the state refuses a change by
//! a key that is not an admin (checked again at apply) and the revocation
//! of the last admin.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use prost::Message;
use tern_protocol::access::Role;
use tern_protocol::{Code, PeerId, RequestContext, Status, pb};
use tern_state::MAX_REQUEST_ID_LEN;
use tern_state::{ClusterState, Command, Rejection, Response};

use crate::node::WriteError;
use tern_raft_net::Attached;

/// The roles granted, by key, as `tern.v1.AccessGrant`s (without the
/// audit log: what an agent's assignment carries).
pub fn grants_pb(state: &ClusterState) -> Vec<pb::AccessGrant> {
    state
        .access()
        .iter()
        .map(|(key, roles)| pb::AccessGrant {
            key: Bytes::copy_from_slice(key.as_bytes()),
            roles: roles.iter().map(|r| r.name().to_owned()).collect(),
        })
        .collect()
}

/// The table and the log as the protobuf answer.
pub fn list_response(state: &ClusterState) -> pb::AccessListResponse {
    pb::AccessListResponse {
        grants: grants_pb(state),
        log: state
            .audit_log()
            .map(|e| pb::AccessEvent {
                seq: e.seq,
                at_unix_ms: e.at_unix_ms,
                by: Bytes::copy_from_slice(e.by.as_bytes()),
                action: e.action.name().to_owned(),
                key: e
                    .action
                    .key()
                    .map_or_else(Bytes::new, |k| Bytes::copy_from_slice(k.as_bytes())),
                role: e.action.role().map_or("", |r| r.name()).to_owned(),
                node_id: e.action.node_id().unwrap_or(0),
                token_id: e.action.token_id().unwrap_or_default().to_owned(),
            })
            .collect(),
    }
}

/// Serves `Cluster/AccessList` from this node's applied state.
pub(crate) fn serve_list(node: &Attached) -> Result<Bytes, Status> {
    let resp = node
        .sm
        .read(list_response)
        .map_err(|e| Status::unavailable(format!("cannot read the cluster state: {e}")))?;
    Ok(resp.encode_to_vec().into())
}

/// Serves `Cluster/AccessGrant` (`grant`) and `Cluster/AccessRevoke`.
pub(crate) async fn serve_change(
    node: &Attached,
    ctx: &RequestContext,
    payload: Bytes,
    grant: bool,
) -> Result<Bytes, Status> {
    let req = pb::AccessChangeRequest::decode(payload)
        .map_err(|e| Status::invalid_argument(format!("cluster/access: {e}")))?;
    if req.request_id.is_empty() || req.request_id.len() > MAX_REQUEST_ID_LEN {
        return Err(Status::invalid_argument(format!(
            "field `request_id`: {} bytes; a request id is 1 to {MAX_REQUEST_ID_LEN} bytes",
            req.request_id.len()
        )));
    }
    let key = <[u8; 32]>::try_from(req.key.as_ref())
        .map(PeerId::from_bytes)
        .map_err(|_| {
            Status::invalid_argument(format!(
                "field `key`: {} bytes; a key is 32 bytes (an Ed25519 public key)",
                req.key.len()
            ))
        })?;
    let role = Role::from_name(&req.role).ok_or_else(|| {
        Status::invalid_argument(format!(
            "field `role`: {:?} is not a role (viewer, operator or admin)",
            req.role
        ))
    })?;
    crate::membership::ensure_leader(node)?;
    let command = Command::ChangeAccess {
        request_id: req.request_id,
        grant,
        key,
        role,
        by: ctx.peer,
        at_unix_ms: unix_ms(),
    };
    tracing::info!(%command, "access change");
    let written = tokio::time::timeout(
        crate::meta::WRITE_TIMEOUT,
        crate::node::client_write(&node.raft, command),
    )
    .await
    .map_err(|_| {
        Status::unavailable(
            "the change was not committed in time (no quorum?); retry with the same request id",
        )
    })?
    .map_err(|e| match e {
        WriteError::Limit(e) => crate::node::limit_status(&e),
        WriteError::Raft(e) => tern_raft_net::write::write_error(e),
    })?;
    match written.data {
        Response::Done => serve_list(node),
        Response::Rejected(why @ Rejection::NotAdmin { .. }) => {
            Err(Status::permission_denied(why.to_string()))
        }
        Response::Rejected(why @ Rejection::AccessFull) => {
            Err(Status::new(Code::ResourceExhausted, why.to_string()))
        }
        Response::Rejected(why) => Err(Status::new(Code::FailedPrecondition, why.to_string())),
        other => Err(Status::internal(format!(
            "the state answered an access change with {other:?}"
        ))),
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
