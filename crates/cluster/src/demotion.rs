//! `Cluster/Demote`: an admin turns a server into an agent, keeping its
//! node id and its VMs.
//!
//! The leader takes the server out of Raft in an order where every
//! intermediate state keeps the VMs placed on the node and never runs
//! one twice, so that a leader that dies half-way leaves a state the next
//! call (at the new leader) finishes:
//!
//! 1. **Voter to learner** (`RemoveVoters`), if it votes: the cluster no
//!    longer counts on it for quorum. Nothing else changed yet; a learner
//!    left here is still a server.
//! 2. **Agent record** ([`Command::DemoteServer`]): the member also holds
//!    an agent record with its addresses and capacity (a *demotion under
//!    way*, `ClusterState::is_demoting`). The node itself, a learner that
//!    applies the log, sees it and stops (`tern-node`: it exits with a log
//!    line saying to restart it with `role = "agent"`); its workloads run
//!    on, as they do over any restart.
//! 3. **Audit record** ([`MembershipChange::Demoted`]), appended after the
//!    agent record committed: the leader waits (bounded,
//!    [`DEMOTION_NOTICE_TIMEOUT`]) until the node has it in its log, so the
//!    node has learned that step 2 is committed. A node that does not
//!    answer is not removed: the call fails saying so, and the node, when
//!    it is back, stops as in step 2 and the call can be made again.
//! 4. **Out of the membership** (`RemoveNodes`): applying the membership
//!    entry turns the member with an agent record into an agent
//!    (`ClusterState::apply_membership`), in the same replicated step, on
//!    every server. The leader counts the agent as heard at that moment,
//!    so it has the usual `agent_down_after_ms` to come back.
//!
//! One demotion runs at a time on a leader (a second waits), so two cannot
//! both pass the check of the voters left.
//!
//! Refused, with the reason: a caller without the admin role; an id that
//! is no member (`NotFound`) or an agent already (`FailedPrecondition`);
//! a voter whose removal would leave fewer than [`MIN_VOTERS_AFTER_DEMOTION`]
//! voters; the leader itself, which first hands leadership over (to the
//! most caught-up voter) and answers `Unavailable` asking to call again.

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use openraft::ChangeMembers;
use openraft::async_runtime::WatchReceiver;
use prost::Message;
use tern_protocol::{Code, RequestContext, Status, pb};
use tern_raft_net::Attached;
use tern_raft_net::service::raft_stopped;
use tern_state::{Command, MembershipChange, NodeId, Response};
use tokio::time::{Duration, Instant};

use crate::admission::{require_admin, unix_ms};
use crate::membership::{change_membership, ensure_leader, members_response};
use crate::service::ClusterShared;

/// The fewest voters a demotion may leave: three tolerate one failure,
/// the least a fleet of servers runs with. A cluster of three voters
/// demotes one only after a fourth server joined (or a learner was
/// promoted).
pub const MIN_VOTERS_AFTER_DEMOTION: usize = 3;

/// How long the leader waits for the demoted node to hold the entry that
/// tells it the demotion committed, before it gives up (the node stays a
/// learner marked for demotion; the call can be made again).
pub const DEMOTION_NOTICE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `Cluster/Demote`.
pub(crate) async fn serve(
    shared: &Arc<ClusterShared>,
    node: &Arc<Attached>,
    ctx: &RequestContext,
    payload: Bytes,
) -> Result<Bytes, Status> {
    let id = decode(payload)?;
    require_admin(node, &ctx.peer, "demoting a server")?;
    ensure_leader(node)?;
    // One demotion at a time: the voters are checked and changed under it.
    let _one = shared.demoting.lock().await;
    let voters = check_server(node, id)?;
    check_voters(id, &voters)?;
    if id == node.id {
        return Err(hand_over(node, id, &voters).await);
    }
    tracing::info!(node = id, by = %ctx.peer.short(), "demoting a server to an agent on an admin's request");
    if voters.contains(&id) {
        change_membership(
            &node.raft,
            ChangeMembers::RemoveVoters(BTreeSet::from([id])),
            true,
        )
        .await?;
        tracing::info!(node = id, "demotion: now a learner");
    }
    let written = crate::agents::write(
        node,
        Command::DemoteServer {
            request_id: format!("demote-{id}-{}", unix_ms()),
            node_id: id,
            at_unix_ms: unix_ms(),
        },
    )
    .await?;
    if let Response::Rejected(r) = written {
        return Err(tern_services::vm::rejection_status(&r));
    }
    let notice = audit(node, id, ctx).await?;
    wait_notified(node, id, notice).await?;
    tracing::info!(node = id, "demotion: removing it from the membership");
    // Heard as of now: the agent's bound counts from its demotion (noted
    // before the entry applies, so the monitor never sees it unheard).
    shared.agents.heard(id, Instant::now());
    change_membership(
        &node.raft,
        ChangeMembers::RemoveNodes(BTreeSet::from([id])),
        false,
    )
    .await?;
    shared.agents.heard(id, Instant::now());
    tracing::info!(
        node = id,
        "server demoted to an agent; it keeps its node id and its VMs"
    );
    Ok(members_response(node).encode_to_vec().into())
}

/// The node id a `Cluster/Demote` request names; `InvalidArgument` for
/// bytes that are no `DemoteRequest`.
fn decode(payload: Bytes) -> Result<NodeId, Status> {
    pb::DemoteRequest::decode(payload)
        .map(|r| r.node_id)
        .map_err(|e| Status::invalid_argument(format!("cluster/demote: {e}")))
}

/// `id` must be a member (a server): `NotFound` for an unknown id,
/// `FailedPrecondition` for an agent. Answers the voters.
fn check_server(node: &Attached, id: NodeId) -> Result<BTreeSet<NodeId>, Status> {
    let membership = node
        .raft
        .metrics()
        .borrow_watched()
        .membership_config
        .membership()
        .clone();
    if membership.get_node(&id).is_some() {
        return Ok(membership.voter_ids().collect());
    }
    let is_agent = node
        .sm
        .read(|s| s.agent(id).is_some())
        .map_err(|e| Status::unavailable(format!("cannot read the cluster state: {e}")))?;
    Err(if is_agent {
        Status::new(
            Code::FailedPrecondition,
            format!("node {id} is an agent already; only a server can be demoted"),
        )
    } else {
        Status::new(
            Code::NotFound,
            format!("node {id} is not a server (tern cluster members lists them)"),
        )
    })
}

/// Refuses demoting a voter when fewer than [`MIN_VOTERS_AFTER_DEMOTION`]
/// voters would remain.
fn check_voters(id: NodeId, voters: &BTreeSet<NodeId>) -> Result<(), Status> {
    if !voters.contains(&id) {
        return Ok(());
    }
    let left = voters.len() - 1;
    if left >= MIN_VOTERS_AFTER_DEMOTION {
        return Ok(());
    }
    Err(Status::new(
        Code::FailedPrecondition,
        format!(
            "demoting node {id} would leave {left} voters; a cluster keeps at least \
             {MIN_VOTERS_AFTER_DEMOTION} (add a server, or promote a learner with tern cluster \
             promote, first)"
        ),
    ))
}

/// The leader asked to demote itself: leadership moves to the most
/// caught-up other voter first, and the caller is asked to call again (the new leader serves
/// it).
async fn hand_over(node: &Attached, id: NodeId, voters: &BTreeSet<NodeId>) -> Status {
    // The most caught-up other voter (by what it has acknowledged).
    let replication = node.raft.metrics().borrow_watched().replication.clone();
    let matched = |v: &NodeId| {
        replication
            .as_ref()
            .and_then(|r| r.get(v))
            .and_then(|l| l.as_ref())
            .map_or(0, |l| l.index)
    };
    let successor = voters
        .iter()
        .copied()
        .filter(|v| *v != id)
        .max_by_key(|v| (matched(v), std::cmp::Reverse(*v)));
    let Some(successor) = successor else {
        return Status::new(Code::FailedPrecondition, "the only voter cannot be demoted");
    };
    tracing::info!(
        successor,
        "asked to demote myself: handing leadership over first"
    );
    if let Err(e) = node.raft.trigger().transfer_leader(successor).await {
        return raft_stopped(e);
    }
    Status::unavailable(format!(
        "node {id} leads the cluster: leadership is moving to node {successor}; call Demote \
         again (the new leader serves it)"
    ))
}

/// Records the demotion in the audit log (who asked); answers the log
/// index of the record, an entry appended after the agent record
/// committed.
async fn audit(node: &Attached, id: NodeId, ctx: &RequestContext) -> Result<u64, Status> {
    let command = Command::RecordMembership {
        request_id: format!("membership-demote-{id}-{}", unix_ms()),
        change: MembershipChange::Demoted { node_id: id },
        by: ctx.peer,
        at_unix_ms: unix_ms(),
    };
    match tokio::time::timeout(
        crate::meta::WRITE_TIMEOUT,
        crate::node::client_write(&node.raft, command),
    )
    .await
    {
        Ok(Ok(written)) => Ok(written.log_id.index),
        Ok(Err(e)) => Err(e.into_status()),
        Err(_) => Err(Status::unavailable(
            "the demotion's audit record was not committed in time; call Demote again",
        )),
    }
}

/// Waits until node `id` holds the log up to `index` (so it learned the
/// agent record committed, and stops acting as a server).
async fn wait_notified(node: &Attached, id: NodeId, index: u64) -> Result<(), Status> {
    node.raft
        .wait(Some(DEMOTION_NOTICE_TIMEOUT))
        .metrics(
            |m| {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(&id))
                    .and_then(|l| l.as_ref())
                    .is_some_and(|l| l.index >= index)
            },
            "the demoted node holds its demotion",
        )
        .await
        .map(|_| ())
        .map_err(|e| {
            tracing::warn!(node = id, error = %e, "the node being demoted did not receive its demotion in time");
            Status::unavailable(format!(
                "node {id} did not receive its demotion within {} s ({e}); it stays a learner \
                 marked for demotion: start it (it stops by itself once it has the demotion) and \
                 call Demote again; if it already stopped by itself (its log says it was demoted), \
                 tern cluster leave {id} finishes the demotion",
                DEMOTION_NOTICE_TIMEOUT.as_secs()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_demotion_never_leaves_fewer_than_the_minimum_of_voters() {
        let four: BTreeSet<NodeId> = [1, 2, 3, 4].into();
        assert!(check_voters(4, &four).is_ok());
        let three: BTreeSet<NodeId> = [1, 2, 3].into();
        let refused = check_voters(3, &three).unwrap_err();
        assert_eq!(refused.code, Code::FailedPrecondition);
        assert!(
            refused.message.contains("leave 2 voters"),
            "{}",
            refused.message
        );
        // A learner is no voter: demoting it leaves the voters as they are.
        assert!(check_voters(5, &three).is_ok());
    }

    proptest::proptest! {
        /// Whatever bytes arrive, the request decodes to the id it names
        /// or is refused as an invalid argument; never a panic.
        #[test]
        fn any_payload_decodes_or_is_refused_as_invalid(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
            id in proptest::prelude::any::<u64>(),
        ) {
            match decode(Bytes::from(bytes)) {
                Ok(_) => {}
                Err(e) => proptest::prop_assert_eq!(e.code, Code::InvalidArgument),
            }
            let named = pb::DemoteRequest { node_id: id }.encode_to_vec();
            proptest::prop_assert_eq!(decode(Bytes::from(named)).ok(), Some(id));
        }
    }
}
