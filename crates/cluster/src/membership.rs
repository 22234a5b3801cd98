//! Membership changes, served by the leader: `Cluster/Join` (a node id,
//! then a learner, then a voter once it has caught up), `Cluster/Leave`,
//! `Cluster/Members`, and the helpers the other Cluster calls share
//! (leader checks, write errors).
//!
//! # Join and leave
//!
//! Join and Leave are served by the leader; a follower answers
//! `FailedPrecondition` naming the leader, and the caller retries there
//! (`Cluster/Members` gives the leader's id and address;
//! [`crate::request_join`] does this). The leader allocates the node id
//! with [`Command::AllocateNodeId`] (the same peer always gets the id it
//! holds; an id once released is never handed out again), adds the node
//! as a learner, answers with the id at once (the joiner cannot start its
//! Raft before it knows its id), and promotes the learner to voter in the
//! background once it has caught up. Leave removes the node from the
//! voters, then from the cluster; a leader asked to remove itself hands
//! leadership over first and asks the caller to retry at the new leader.
//!
//! # Who may call
//!
//! - **Cluster/Join:** a member, or a caller presenting the join token
//!   (compared in constant time). A node joins only as itself: the address
//!   in the request must carry the caller's own id, and within the
//!   address limits ([`tern_state::limits::check_member`]).
//! - **Cluster/Leave:** a member removes only itself; an admin (access
//!   table) removes any node.
//! - **Cluster/Members:** any caller the access table lets read (the same
//!   facts the Status service shows); a joiner uses it to find the leader.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use openraft::async_runtime::WatchReceiver;
use openraft::errors::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::raft::ClientWriteResponse;
use openraft::{ChangeMembers, ServerState};
use prost::Message;
use tern_protocol::catalog::methods;
use tern_protocol::forward::not_leader;
use tern_protocol::{Code, Method, PeerAddr, PeerId, RequestContext, Status, pb};
use tern_raft_net::service::{not_a_member, raft_stopped};
use tern_raft_net::{Attached, RaftInstance};
use tern_state::{Capacity, Command, Member, MembershipChange, NodeId, Response};
use tern_store::{Membership, TypeConfig};
use tokio::time::Duration;

use crate::admission::{TokenRefusal, check_token, count_refusal, require_admin, unix_ms};
use crate::service::{ClusterShared, lock};

/// How long a learner has to catch up before the leader gives up
/// promoting it (the joiner then fails its wait and may join again, which
/// restarts the promotion). Generous: a learner far behind first receives
/// a snapshot.
pub const PROMOTION_TIMEOUT: Duration = Duration::from_secs(120);

/// A learner this many entries behind the leader's last log counts as
/// caught up: close enough that its first rounds as a voter do not stall
/// commits, loose enough to be reached under a steady write load.
pub const PROMOTION_MAX_LAG: u64 = 64;

/// How long a membership change waits for the previous one to be
/// committed (a joint configuration to become uniform) before it gives
/// up: a few rounds of replication.
pub const MEMBERSHIP_SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Attempts of one membership change that finds another in progress.
pub const MEMBERSHIP_CHANGE_ATTEMPTS: usize = 5;

/// The shared secret a new node presents to join. Compared in constant
/// time; never printed.
#[derive(Clone)]
pub struct JoinToken(Arc<str>);

impl JoinToken {
    /// A token. An empty token is refused (it would let anyone join).
    pub fn new(token: impl Into<String>) -> Option<JoinToken> {
        let token: String = token.into();
        (!token.is_empty()).then(|| JoinToken(token.into()))
    }

    /// Constant-time comparison (in the length of the longer input).
    pub fn matches(&self, presented: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), presented.as_bytes());
        let mut diff = (a.len() != b.len()) as u8;
        for i in 0..a.len().max(b.len()) {
            let x = a.get(i).copied().unwrap_or(0);
            let y = b.get(i).copied().unwrap_or(0);
            diff |= x ^ y;
        }
        std::hint::black_box(diff) == 0
    }
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinToken(<redacted>)")
    }
}

fn failed_precondition(message: impl Into<String>) -> Status {
    Status::new(Code::FailedPrecondition, message)
}

/// Converts a membership to the protobuf list, voters flagged.
pub(crate) fn members_pb(membership: &Membership) -> Vec<pb::Member> {
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    membership
        .nodes()
        .map(|(id, m)| pb::Member {
            node_id: *id,
            address: Some(pb::PeerAddress::from(&m.addr)),
            voter: voters.contains(id),
            capacity: Some(pb::Capacity {
                vcpus: m.capacity.vcpus,
                memory_mib: m.capacity.memory_mib,
            }),
        })
        .collect()
}

pub(crate) fn members_response(node: &Attached) -> pb::MembersResponse {
    let metrics = node.raft.metrics().borrow_watched().clone();
    pb::MembersResponse {
        members: members_pb(metrics.membership_config.membership()),
        leader_id: metrics.current_leader.unwrap_or(0),
    }
}

/// `FailedPrecondition` naming the leader, when this node is not it.
pub(crate) fn ensure_leader(node: &Attached) -> Result<(), Status> {
    let metrics = node.raft.metrics().borrow_watched().clone();
    if metrics.state == ServerState::Leader {
        return Ok(());
    }
    Err(match metrics.current_leader {
        Some(leader) => {
            let who = metrics
                .membership_config
                .membership()
                .get_node(&leader)
                .map(|m| m.peer_id().short())
                .unwrap_or_default();
            not_leader(
                Some(leader),
                &format!(" ({who}; Cluster/Members gives its address)"),
            )
        }
        None => not_leader(None, ""),
    })
}

/// Waits (bounded) until the effective membership is committed and not
/// joint, so that the next change is not refused as in progress.
async fn membership_settled(raft: &RaftInstance) -> Result<(), Status> {
    raft.wait(Some(MEMBERSHIP_SETTLE_TIMEOUT))
        .metrics(
            |m| {
                m.membership_config.log_id() == m.committed_membership_config.log_id()
                    && m.membership_config.membership().get_joint_config().len() == 1
            },
            "membership settled",
        )
        .await
        .map(|_| ())
        .map_err(|e| Status::unavailable(format!("a membership change is still in progress: {e}")))
}

/// Applies `changes` once the previous change has settled, retrying when
/// another change slipped in first.
pub(crate) async fn change_membership(
    raft: &RaftInstance,
    changes: ChangeMembers<NodeId, Member>,
    retain: bool,
) -> Result<ClientWriteResponse<TypeConfig>, Status> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        membership_settled(raft).await?;
        match raft.change_membership(changes.clone(), retain).await {
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                ChangeMembershipError::InProgress(e),
            ))) if attempt < MEMBERSHIP_CHANGE_ATTEMPTS => {
                tracing::debug!(error = %e, "membership change in progress; retrying");
            }
            other => return other.map_err(tern_raft_net::write::write_error),
        }
    }
}

pub(crate) async fn join(
    shared: &Arc<ClusterShared>,
    node: &Arc<Attached>,
    ctx: &RequestContext,
    payload: Bytes,
) -> Result<Bytes, Status> {
    let method = methods::CLUSTER_JOIN;
    let req = pb::JoinRequest::decode(payload)
        .map_err(|e| Status::invalid_argument(format!("cluster/join: {e}")))?;
    let addr = req
        .address
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("cluster/join: address is required"))?;
    let addr = PeerAddr::try_from(addr)
        .map_err(|e| Status::invalid_argument(format!("cluster/join: address: {e}")))?;
    let member = node.is_member(&ctx.peer);
    let now = tokio::time::Instant::now();
    let admission = if member {
        Admitted::Member
    } else {
        shared.failed_joins.check(&ctx.peer, now)?;
        let statically = shared
            .admission
            .static_token
            .as_ref()
            .is_some_and(|t| t.matches(&req.token));
        if statically {
            Admitted::StaticToken
        } else {
            let checked = node
                .sm
                .read(|s| check_token(s, &req.token, unix_ms()))
                .map_err(|e| Status::unavailable(format!("cannot read the cluster state: {e}")))?;
            match checked {
                Ok((token_id, token_hash)) => Admitted::Token {
                    token_id,
                    token_hash,
                },
                Err(refusal) => return Err(refuse(shared, ctx, method, refusal, now)),
            }
        }
    };
    if addr.id != ctx.peer {
        count_refusal("not_itself");
        tracing::warn!(caller = %ctx.peer.short(), named = %addr.id.short(), "refused a join for another node");
        return Err(Status::permission_denied(format!(
            "a node joins as itself: the address names {} but the caller is {}",
            addr.id.short(),
            ctx.peer.short()
        )));
    }
    ensure_leader(node)?;
    let declared = req
        .capacity
        .map(|c| Capacity {
            vcpus: c.vcpus,
            memory_mib: c.memory_mib,
        })
        .unwrap_or_default();
    let max = shared.admission.max_capacity;
    let capacity = Capacity {
        vcpus: declared.vcpus.min(max.vcpus),
        memory_mib: declared.memory_mib.min(max.memory_mib),
    };
    if capacity != declared {
        tracing::warn!(
            caller = %ctx.peer.short(),
            declared_vcpus = declared.vcpus,
            declared_memory_mib = declared.memory_mib,
            max_vcpus = max.vcpus,
            max_memory_mib = max.memory_mib,
            "a joiner declared more capacity than [cluster] max_node_vcpus / max_node_memory_mib allow; capped"
        );
    }
    let record = Member::new(addr, capacity);
    tern_state::limits::check_member(&record)
        .map_err(|e| Status::invalid_argument(format!("cluster/join: {e}")))?;

    let membership = node
        .raft
        .metrics()
        .borrow_watched()
        .membership_config
        .clone();
    // Unique per peer and membership: a retry within one membership is
    // answered from the deduplication table; a rejoin after a leave (a new
    // membership) is a new request, so it can never get the old id back.
    let since_index = membership.log_id().as_ref().map_or(0, |l| l.index);
    let allocate = match admission {
        Admitted::Member | Admitted::StaticToken => Command::AllocateNodeId {
            request_id: format!("join-{}-{since_index}", ctx.peer),
            peer: ctx.peer,
        },
        // The token's id is part of the request id: a join refused with
        // one token and retried with another is a new request.
        Admitted::Token {
            token_id,
            token_hash,
        } => Command::AdmitNode {
            request_id: format!("join-{}-{since_index}-{token_id}", ctx.peer),
            peer: ctx.peer,
            token_id,
            token_hash,
            at_unix_ms: unix_ms(),
        },
    };
    let written = crate::node::client_write(&node.raft, allocate)
        .await
        .map_err(crate::node::WriteError::into_status)?;
    let id = match written.data {
        Response::NodeId(id) => id,
        Response::Rejected(r) => {
            if let Some(refusal) = TokenRefusal::from_rejection(&r) {
                return Err(refuse(shared, ctx, method, refusal, now));
            }
            return Err(failed_precondition(r.to_string()));
        }
        other => {
            return Err(Status::internal(format!(
                "node id allocation answered {other:?}"
            )));
        }
    };

    let stored = node
        .raft
        .metrics()
        .borrow_watched()
        .membership_config
        .clone();
    let change = match stored.membership().get_node(&id) {
        None => {
            tracing::info!(node = id, peer = %ctx.peer.short(), "adding learner");
            Some(ChangeMembers::AddNodes(BTreeMap::from([(id, record)])))
        }
        Some(existing) if *existing != record => {
            if !crate::address::same_addresses(&existing.addr, &record.addr) {
                check_address_gap(shared, id)?;
                tracing::info!(
                    node = id,
                    old = %crate::address::describe(&existing.addr),
                    new = %crate::address::describe(&record.addr),
                    "recording a member's new addresses (asked by the member itself)"
                );
                count_address_update();
            } else {
                tracing::info!(node = id, "updating a member's capacity");
            }
            Some(ChangeMembers::SetNodes(BTreeMap::from([(id, record)])))
        }
        Some(_) => None,
    };
    // The membership to answer with and the log id it took effect at
    // (metrics may not show a change the moment it commits).
    let added = matches!(change, Some(ChangeMembers::AddNodes(_)));
    let (membership, since) = match change {
        Some(change) => {
            let written = change_membership(&node.raft, change, true).await?;
            let membership = written
                .membership()
                .clone()
                .unwrap_or_else(|| stored.membership().clone());
            (membership, Some(written.log_id))
        }
        None => (stored.membership().clone(), *stored.log_id()),
    };
    if added {
        record_change(
            node,
            MembershipChange::AddedLearner {
                node_id: id,
                peer: ctx.peer,
            },
            ctx.peer,
        )
        .await;
    }
    let voters = membership.voter_ids().count();
    let is_voter = membership.voter_ids().any(|v| v == id);
    // A server being demoted that restarted as a server stays a learner.
    let demoting = node.sm.read(|s| s.is_demoting(id)).unwrap_or(false);
    let voter_pending = is_voter || (voters < shared.admission.max_voters && !demoting);
    if !is_voter {
        if voter_pending {
            spawn_promotion(shared.clone(), node.clone(), id, since);
        } else {
            tracing::info!(
                node = id,
                voters,
                max_voters = shared.admission.max_voters,
                "joined as a learner; the cluster has max_voters voters, so it stays one until an admin promotes it (tern cluster promote)"
            );
        }
    }
    Ok(pb::JoinResponse {
        node_id: id,
        members: members_pb(&membership),
        voter_pending,
    }
    .encode_to_vec()
    .into())
}

/// Refuses a member's address update that comes sooner than
/// [`crate::address::MIN_RECORDED_GAP`] after its last one; notes this
/// one otherwise.
fn check_address_gap(shared: &ClusterShared, id: NodeId) -> Result<(), Status> {
    let now = tokio::time::Instant::now();
    let gap = crate::address::MIN_RECORDED_GAP;
    let mut last = lock(&shared.address_updates);
    // Bounded by the members that moved within the last gap.
    last.retain(|_, at| now.duration_since(*at) < gap);
    if last.contains_key(&id) {
        tracing::warn!(
            node = id,
            "refused an address update: the member changed its addresses less than {} ms ago",
            gap.as_millis()
        );
        return Err(Status::new(
            Code::ResourceExhausted,
            format!(
                "node {id} changed its addresses less than {} ms ago; try again later",
                gap.as_millis()
            ),
        ));
    }
    last.insert(id, now);
    Ok(())
}

/// Counts an address update the leader records.
fn count_address_update() {
    ::metrics::counter!(tern_protocol::metric_names::MEMBERSHIP_ADDRESS_UPDATES).increment(1);
}

/// The leader records its own new addresses (see [`crate::address`]):
/// its member record with `me`'s addresses, capacity unchanged.
pub(crate) async fn record_own_address(node: &Arc<Attached>, me: &Member) -> Result<(), Status> {
    ensure_leader(node)?;
    let stored = node
        .raft
        .metrics()
        .borrow_watched()
        .membership_config
        .clone();
    let Some(existing) = stored.membership().get_node(&node.id) else {
        return Err(failed_precondition("this node is not in the membership"));
    };
    if crate::address::same_addresses(&existing.addr, &me.addr) {
        return Ok(());
    }
    let record = Member::new(me.addr.clone(), existing.capacity);
    tern_state::limits::check_member(&record)
        .map_err(|e| Status::invalid_argument(format!("own address: {e}")))?;
    tracing::info!(
        node = node.id,
        old = %crate::address::describe(&existing.addr),
        new = %crate::address::describe(&record.addr),
        "recording the leader's own new addresses"
    );
    change_membership(
        &node.raft,
        ChangeMembers::SetNodes(BTreeMap::from([(node.id, record)])),
        true,
    )
    .await?;
    count_address_update();
    Ok(())
}

/// Whether the wait before promoting learner `id` (added by the
/// membership at `since`) is over: it caught up, or there is nothing left
/// to do (this node no longer leads, or the learner was removed; the
/// caller checks which).
fn promotion_settled(
    m: &openraft::RaftMetrics<TypeConfig>,
    id: NodeId,
    since: Option<tern_store::LogId>,
) -> bool {
    if m.state != ServerState::Leader {
        return true;
    }
    if *m.membership_config.log_id() < since {
        return false; // metrics do not show the learner yet
    }
    if m.membership_config.membership().get_node(&id).is_none() {
        return true;
    }
    let matched = m
        .replication
        .as_ref()
        .and_then(|r| r.get(&id))
        .and_then(|l| l.as_ref())
        .map(|l| l.index);
    match (matched, m.last_log_index) {
        (Some(matched), Some(last)) => last.saturating_sub(matched) <= PROMOTION_MAX_LAG,
        _ => false,
    }
}

/// Promotes learner `id` (added by the membership at `since`) to voter
/// once it has caught up, unless a promotion of it is already under way.
fn spawn_promotion(
    shared: Arc<ClusterShared>,
    node: Arc<Attached>,
    id: NodeId,
    since: Option<tern_store::LogId>,
) {
    if !lock(&shared.promoting).insert(id) {
        return;
    }
    tokio::spawn(async move {
        let waited = node
            .raft
            .wait(Some(PROMOTION_TIMEOUT))
            .metrics(|m| promotion_settled(m, id, since), "learner caught up")
            .await;
        match waited {
            Err(e) => {
                tracing::warn!(node = id, error = %e, "learner did not catch up; not promoted")
            }
            Ok(m)
                if m.state == ServerState::Leader
                    && m.membership_config.membership().get_node(&id).is_some() =>
            {
                match change_membership(
                    &node.raft,
                    ChangeMembers::AddVoterIds(BTreeSet::from([id])),
                    true,
                )
                .await
                {
                    Ok(_) => {
                        tracing::info!(node = id, "learner promoted to voter");
                        let me = leader_key(&node);
                        record_change(&node, MembershipChange::Promoted { node_id: id }, me).await;
                    }
                    Err(e) => tracing::warn!(node = id, error = %e, "promotion to voter failed"),
                }
            }
            Ok(_) => tracing::info!(
                node = id,
                "promotion abandoned: no longer leader or node removed"
            ),
        }
        lock(&shared.promoting).remove(&id);
    });
}

pub(crate) async fn leave(
    shared: &Arc<ClusterShared>,
    node: &Arc<Attached>,
    ctx: &RequestContext,
    payload: Bytes,
) -> Result<Bytes, Status> {
    let method = methods::CLUSTER_LEAVE;
    let admin = node
        .sm
        .read(|s| s.role_of(&ctx.peer) == Some(tern_protocol::access::Role::Admin))
        .map_err(|e| Status::unavailable(format!("reading the access table: {e}")))?;
    if !admin && !node.is_member(&ctx.peer) {
        return Err(not_a_member(
            &ctx.peer,
            method,
            "only a member (removing itself) or an admin may remove nodes",
        ));
    }
    let req = pb::LeaveRequest::decode(payload)
        .map_err(|e| Status::invalid_argument(format!("cluster/leave: {e}")))?;
    let id = req.node_id;
    ensure_leader(node)?;
    let membership = node
        .raft
        .metrics()
        .borrow_watched()
        .membership_config
        .clone();
    let membership = membership.membership().clone();
    // A node may remove itself; removing another node is an admin's call.
    let itself = membership
        .get_node(&id)
        .is_some_and(|member| member.peer_id() == ctx.peer);
    if !admin && !itself {
        tracing::warn!(caller = %ctx.peer.short(), node = id, "refused Cluster/Leave: a member may remove only itself");
        return Err(Status::new(
            tern_protocol::Code::PermissionDenied,
            format!(
                "removing node {id} needs the admin role: a member may remove only itself (tern cluster leave with an admin's --key)"
            ),
        ));
    }
    if membership.get_node(&id).is_none() {
        // An agent is removed from the state (its VMs move); anything
        // else is gone already.
        crate::agents::remove(node, id).await?;
        return Ok(members_reply(&membership));
    }
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    if id == node.id {
        let Some(successor) = voters.iter().copied().find(|v| *v != id) else {
            return Err(failed_precondition(
                "the last voter cannot leave the cluster",
            ));
        };
        tracing::info!(
            successor,
            "asked to remove myself: handing leadership over first"
        );
        node.raft
            .trigger()
            .transfer_leader(successor)
            .await
            .map_err(raft_stopped)?;
        return Err(Status::unavailable(format!(
            "leadership is moving to node {successor}; call Leave again at the new leader"
        )));
    }
    if voters.contains(&id) {
        tracing::info!(node = id, "removing voter");
        change_membership(
            &node.raft,
            ChangeMembers::RemoveVoters(BTreeSet::from([id])),
            true,
        )
        .await?;
    }
    // A server being demoted leaves as the agent it was becoming
    // (`apply_membership`); it is heard as of now, like a demotion's end.
    if node.sm.read(|s| s.is_demoting(id)).unwrap_or(false) {
        tracing::info!(
            node = id,
            "the node was being demoted: it leaves as an agent"
        );
        shared.agents.heard(id, tokio::time::Instant::now());
    }
    tracing::info!(node = id, "removing node from the cluster");
    let written = change_membership(
        &node.raft,
        ChangeMembers::RemoveNodes(BTreeSet::from([id])),
        false,
    )
    .await?;
    record_change(node, MembershipChange::Removed { node_id: id }, ctx.peer).await;
    let membership = written
        .membership()
        .clone()
        .unwrap_or_else(|| membership.clone());
    Ok(members_reply(&membership))
}

fn members_reply(membership: &Membership) -> Bytes {
    pb::LeaveResponse {
        members: members_pb(membership),
    }
    .encode_to_vec()
    .into()
}

/// How a joiner was let in.
enum Admitted {
    /// Already a member (a restarted node updating its address).
    Member,
    /// The node's configured static token.
    StaticToken,
    /// A token of the cluster state: its use is spent by `AdmitNode`.
    Token {
        token_id: String,
        token_hash: [u8; tern_state::admission::TOKEN_HASH_LEN],
    },
}

/// Refuses a join for a bad token: counted, remembered against the caller
/// for the failed-join bound, logged.
pub(crate) fn refuse(
    shared: &ClusterShared,
    ctx: &RequestContext,
    method: &Method,
    refusal: TokenRefusal,
    now: tokio::time::Instant,
) -> Status {
    shared.failed_joins.record(ctx.peer, now);
    count_refusal(refusal.reason());
    let _ = not_a_member(&ctx.peer, method, refusal.reason());
    refusal.status()
}

/// The leader's own key (for audit records of changes it makes itself).
fn leader_key(node: &Attached) -> PeerId {
    node.raft
        .metrics()
        .borrow_watched()
        .membership_config
        .membership()
        .get_node(&node.id)
        .map_or_else(|| PeerId::from_bytes([0; 32]), Member::peer_id)
}

/// Records a membership change in the audit log (best effort: the change
/// itself is already committed; a failure to record it is logged).
pub(crate) async fn record_change(node: &Attached, change: MembershipChange, by: PeerId) {
    let command = Command::RecordMembership {
        request_id: format!("membership-{}-{}", unix_ms(), rand_suffix()),
        change,
        by,
        at_unix_ms: unix_ms(),
    };
    match tokio::time::timeout(
        crate::meta::WRITE_TIMEOUT,
        crate::node::client_write(&node.raft, command),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not record a membership change in the audit log")
        }
        Err(_) => tracing::warn!("recording a membership change in the audit log timed out"),
    }
}

fn rand_suffix() -> u64 {
    rand::random()
}

/// Serves `Cluster/Promote`: an admin makes a learner a voter.
pub(crate) async fn promote(
    node: &Arc<Attached>,
    ctx: &RequestContext,
    payload: Bytes,
) -> Result<Bytes, Status> {
    let req = pb::PromoteRequest::decode(payload)
        .map_err(|e| Status::invalid_argument(format!("cluster/promote: {e}")))?;
    require_admin(node, &ctx.peer, "promoting a learner")?;
    ensure_leader(node)?;
    let id = req.node_id;
    let membership = node
        .raft
        .metrics()
        .borrow_watched()
        .membership_config
        .membership()
        .clone();
    if membership.get_node(&id).is_none() {
        return Err(Status::new(
            Code::NotFound,
            format!("node {id} is not a member (tern cluster members lists them)"),
        ));
    }
    let demoting = node
        .sm
        .read(|s| s.is_demoting(id))
        .map_err(|e| Status::unavailable(format!("cannot read the cluster state: {e}")))?;
    if demoting {
        return Err(failed_precondition(format!(
            "node {id} is being demoted to an agent; finish with tern cluster demote {id}"
        )));
    }
    if !membership.voter_ids().any(|v| v == id) {
        tracing::info!(node = id, by = %ctx.peer.short(), "promoting a learner on an admin's request");
        change_membership(
            &node.raft,
            ChangeMembers::AddVoterIds(BTreeSet::from([id])),
            true,
        )
        .await?;
        record_change(node, MembershipChange::Promoted { node_id: id }, ctx.peer).await;
    }
    Ok(members_response(node).encode_to_vec().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_member_that_flaps_its_addresses_is_refused_until_the_gap_passed() {
        let services = crate::RaftServices::new(JoinToken::new("t"));
        let shared = services.shared();
        check_address_gap(shared, 3).unwrap();
        let refused = check_address_gap(shared, 3).unwrap_err();
        assert_eq!(refused.code, Code::ResourceExhausted);
        assert!(refused.message.contains("node 3"), "{}", refused.message);
        // Another member is not held back by it.
        check_address_gap(shared, 4).unwrap();
        tokio::time::advance(crate::address::MIN_RECORDED_GAP).await;
        check_address_gap(shared, 3).unwrap();
        assert_eq!(lock(&shared.address_updates).len(), 1);
    }

    #[test]
    fn join_tokens_compare_whole_values() {
        let t = JoinToken::new("s3cret").unwrap();
        assert!(t.matches("s3cret"));
        assert!(!t.matches("s3cre"));
        assert!(!t.matches("s3cret!"));
        assert!(!t.matches(""));
        assert!(!t.matches("S3cret"));
        assert!(JoinToken::new("").is_none());
        assert_eq!(format!("{t:?}"), "JoinToken(<redacted>)");
    }
}
