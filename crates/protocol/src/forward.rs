//! Forwarding to the Raft leader, one way for every write a follower
//! receives: the VM service's calls, the metadata register's calls and a
//! member's own proposals (`Raft/Propose`, which carry the VM writes its
//! VM service accepted and its reconciler's reports) all reach the leader
//! through [`forward_to_leader`], within [`FORWARD_TIMEOUT`], and a
//! follower that cannot forward answers with [`not_leader`].
//!
//! Forwards never loop: each caller decides whether a call may be
//! forwarded at all (a call that arrived forwarded is not forwarded again)
//! before it calls this. The request is passed unchanged, request id
//! included, so a forward is exactly as safe to repeat as the original.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::catalog::Method;
use crate::peer::PeerAddr;
use crate::rpc::{Call, CallError, RpcClient};
use crate::status::{Code, Status};

/// Bound on one forward to the leader (the caller's own deadline, when
/// shorter, wins): the leader's own write bound plus a round trip.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// The leader as the follower knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    /// Its Raft node id.
    pub id: u64,
    /// How to reach it.
    pub addr: PeerAddr,
}

/// `FailedPrecondition` naming the leader (or `Unavailable` when none is
/// known): the answer of a follower that does not forward. `why` is added
/// to the message (e.g. why this call is not forwarded).
pub fn not_leader(leader: Option<u64>, why: &str) -> Status {
    match leader {
        Some(id) => Status::new(
            Code::FailedPrecondition,
            format!(
                "this node is not the Raft leader; the leader is node {id}: call it there{why}"
            ),
        ),
        None => Status::unavailable(format!(
            "this node is not the Raft leader and no leader is known; retry shortly{why}"
        )),
    }
}

/// Sends `payload` for `method` to `leader` through `client` (the node's
/// router, calling as the node) and answers what the leader answers; a
/// transport failure is `Unavailable` saying to retry with the same
/// request id. The bound is the time left before `deadline` (a handler
/// passes its caller's, [`RequestContext::deadline`](crate::RequestContext::deadline)), at most
/// [`FORWARD_TIMEOUT`].
pub async fn forward_to_leader(
    client: &dyn RpcClient,
    leader: &Leader,
    deadline: Option<Instant>,
    method: &'static Method,
    payload: Bytes,
) -> Result<Bytes, Status> {
    let timeout = deadline.map_or(FORWARD_TIMEOUT, |d| {
        d.saturating_duration_since(Instant::now())
            .min(FORWARD_TIMEOUT)
    });
    let call = Call::new(method, payload).with_timeout(timeout);
    client.call(&leader.addr, call).await.map_err(|e| match e {
        CallError::Application(status) => status,
        CallError::Transport(t) => Status::unavailable(format!(
            "forwarding to the leader (node {}) failed: {t}; retry with the same request id",
            leader.id
        )),
    })
}
