//! Agents' heartbeats taken by followers and relayed to the leader in
//! batches, so that a fleet's heartbeats cost the leader a few calls a
//! second instead of one call per agent per interval.
//!
//! An agent sends its plain heartbeats to a follower (its *home*, chosen
//! by node id so that the agents spread over the followers). The follower
//! does not answer at once: it adds the agent to the batch under way, and
//! every [`RELAY_INTERVAL`] sends the batch to the leader as
//! `Cluster/AgentsHeard`. The leader, while it leads with a fresh majority
//! (as for a direct heartbeat), notes every agent of the batch as heard
//! when the relay arrives, and names those it refuses. Only then does the
//! follower acknowledge the heartbeats of the batch.
//!
//! **Why it waits.** The agent's fence counts from when its acknowledged
//! heartbeat was sent; the leader counts the agent's silence from when it
//! heard it. Because the follower acknowledges only heartbeats the leader
//! has taken, the leader heard each acknowledged heartbeat after it was
//! sent, exactly as with a direct heartbeat: the fence never starts later
//! than the leader's count, and the "never twice" budget of
//! [`crate::agents`] holds unchanged. The price is latency (at most one
//! interval plus a round trip to the leader), far inside the agent's call
//! timeout.
//!
//! **What only the leader takes.** A follower refuses
//! (`FailedPrecondition`, naming the leader) a heartbeat that needs a
//! write or sets the agent's resume point: an agent resuming (after its
//! start or its fence), one down in the follower's state, or one whose
//! capacity changed. The leader also refuses agents its own state has
//! down or does not know. A relay the leader did not take (no leader, no
//! majority, a failed call) fails the whole batch (`Unavailable`): those
//! agents turn to the leader directly.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use openraft::async_runtime::WatchReceiver;
use prost::Message;
use tern_protocol::metric_names::{AGENT_HEARTBEATS, AGENT_RELAY_FAILURES};
use tern_protocol::{Call, Code, RequestContext, Status, pb};
use tern_state::{AgentRecord, AgentStatus, NodeId};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::service::{ClusterShared, lock};
use tern_raft_net::Attached;

/// How often a follower relays the heartbeats it took: a heartbeat waits
/// at most this long plus one round trip to the leader for its answer,
/// and the leader takes at most four relays a second from each follower.
pub const RELAY_INTERVAL: Duration = Duration::from_millis(250);

/// Bound on one relay call to the leader; a heartbeat whose relay has not
/// been taken by then is answered `Unavailable`.
pub const RELAY_TIMEOUT: Duration = Duration::from_secs(1);

/// Longest a follower holds a heartbeat for its relay: the batch may wait
/// one interval to go, its call [`RELAY_TIMEOUT`], and one more interval
/// for a tick delayed by a busy runtime. Then `Unavailable`.
pub const RELAY_WAIT: Duration =
    Duration::from_millis(2 * RELAY_INTERVAL.as_millis() as u64 + RELAY_TIMEOUT.as_millis() as u64);

/// Most agents in one relay: 800 KiB of ids at most, one `AgentsHeard`.
/// A follower that took more in one interval sends the rest to the
/// leader (refused as the leader's refusals are), never acknowledging a
/// heartbeat it did not relay.
pub const MAX_RELAYED: usize = 100_000;

/// What became of one batch.
#[derive(Debug, Clone)]
enum Outcome {
    /// The leader took it: its applied revision and the agents it refused.
    Taken {
        revision: u64,
        refused: Arc<HashSet<NodeId>>,
    },
    /// The leader did not take it: why.
    Failed(String),
}

/// The batch being filled.
struct Batch {
    ids: HashSet<NodeId>,
    done: watch::Sender<Option<Outcome>>,
}

impl Batch {
    fn new() -> Batch {
        Batch {
            ids: HashSet::new(),
            done: watch::channel(None).0,
        }
    }
}

/// A follower's relay of the heartbeats it took (see the module docs).
pub(crate) struct HeartbeatRelay {
    batch: Mutex<Batch>,
    /// Whether the relay task runs (started with the first heartbeat).
    running: AtomicBool,
}

impl Default for HeartbeatRelay {
    fn default() -> Self {
        HeartbeatRelay {
            batch: Mutex::new(Batch::new()),
            running: AtomicBool::new(false),
        }
    }
}

impl std::fmt::Debug for HeartbeatRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeartbeatRelay")
            .field("waiting", &lock(&self.batch).ids.len())
            .finish_non_exhaustive()
    }
}

/// Why a follower does not take `req` itself; `None` when it may.
pub(crate) fn leader_only(
    req: &pb::AgentHeartbeatRequest,
    record: &AgentRecord,
    capacity: tern_state::Capacity,
) -> Option<&'static str> {
    if req.resuming {
        Some("a resuming agent's heartbeat sets its resume point")
    } else if record.status == AgentStatus::Down {
        Some("the agent is down; only the leader marks it ready again")
    } else if req.capacity.is_some() && capacity != record.capacity {
        Some("the agent's capacity changed; only the leader records it")
    } else {
        None
    }
}

/// Takes the heartbeat of agent `id` on a follower: waits until the
/// leader took the relay that carries it; the leader's applied revision.
pub(crate) async fn relay(
    shared: &Arc<ClusterShared>,
    node: &Attached,
    id: NodeId,
) -> Result<u64, Status> {
    let relay = &shared.relay;
    let mut done = {
        let mut batch = lock(&relay.batch);
        batch.ids.insert(id);
        batch.done.subscribe()
    };
    if !relay.running.swap(true, Ordering::AcqRel) {
        tokio::spawn(run(Arc::downgrade(shared)));
    }
    let waited = tokio::time::timeout(RELAY_WAIT, done.wait_for(Option::is_some)).await;
    let outcome = match waited {
        Ok(Ok(o)) => o.clone(),
        Ok(Err(_)) | Err(_) => None,
    };
    match outcome {
        Some(Outcome::Taken { revision, refused }) if !refused.contains(&id) => {
            metrics::counter!(AGENT_HEARTBEATS, "via" => "relay").increment(1);
            Ok(revision)
        }
        Some(Outcome::Taken { .. }) => Err(to_leader(
            node,
            "the leader refused it (it has the agent down or does not know it)",
        )),
        Some(Outcome::Failed(why)) => Err(Status::unavailable(format!(
            "the heartbeat could not be relayed to the leader ({why}); heartbeat to the leader directly"
        ))),
        None => Err(Status::unavailable(
            "the heartbeat's relay to the leader did not finish in time; heartbeat to the leader directly",
        )),
    }
}

/// `FailedPrecondition` naming the leader as this follower knows it.
pub(crate) fn to_leader(node: &Attached, why: &str) -> Status {
    let leader = node.raft.metrics().borrow_watched().current_leader;
    let named = leader.map_or_else(|| "unknown yet".to_string(), |l| format!("node {l}"));
    Status::new(
        Code::FailedPrecondition,
        format!("this server does not take this heartbeat: {why}; send it to the leader ({named})"),
    )
}

/// The relay task of one server: every [`RELAY_INTERVAL`], the batch
/// under way goes to the leader. Ends with the services.
async fn run(shared: Weak<ClusterShared>) {
    /// Marks the task stopped however it ends (also when its runtime is
    /// dropped under it), so that the next heartbeat starts another.
    struct Running(Weak<ClusterShared>);
    impl Drop for Running {
        fn drop(&mut self) {
            if let Some(shared) = self.0.upgrade() {
                shared.relay.running.store(false, Ordering::Release);
            }
        }
    }
    let _running = Running(shared.clone());
    let mut tick = tokio::time::interval(RELAY_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let (ids, done) = {
            let mut batch = lock(&shared.relay.batch);
            if batch.ids.is_empty() {
                continue;
            }
            let taken = std::mem::replace(&mut *batch, Batch::new());
            (taken.ids, taken.done)
        };
        let outcome = match shared.raft.node() {
            Ok(node) => send(&node, ids).await,
            Err(e) => Outcome::Failed(format!("Raft is not running here: {}", e.message)),
        };
        if let Outcome::Failed(why) = &outcome {
            metrics::counter!(AGENT_RELAY_FAILURES).increment(1);
            tracing::debug!(error = %why, "a relay of agents' heartbeats failed");
        }
        done.send_replace(Some(outcome));
    }
}

/// The agents of one relay, in order, and those beyond
/// [`MAX_RELAYED`]: not relayed, so never acknowledged here (they are sent
/// to the leader, as the leader's refusals are).
fn split_relay(ids: HashSet<NodeId>) -> (Vec<NodeId>, Vec<NodeId>) {
    let mut node_ids: Vec<NodeId> = ids.into_iter().collect();
    node_ids.sort_unstable();
    let over = node_ids.split_off(node_ids.len().min(MAX_RELAYED));
    (node_ids, over)
}

/// Sends one batch to the leader.
async fn send(node: &Attached, ids: HashSet<NodeId>) -> Outcome {
    let leader = {
        let m = node.raft.metrics();
        let m = m.borrow_watched();
        match m.current_leader {
            Some(l) if l == node.id => return Outcome::Failed("this server leads now".into()),
            Some(l) => m
                .membership_config
                .membership()
                .get_node(&l)
                .map(|n| n.addr.clone()),
            None => None,
        }
    };
    let Some(leader) = leader else {
        return Outcome::Failed("no leader known".into());
    };
    let (node_ids, over) = split_relay(ids);
    let req = pb::AgentsHeardRequest { node_ids };
    let call = Call::new(
        tern_protocol::catalog::methods::CLUSTER_AGENTS_HEARD,
        Bytes::from(req.encode_to_vec()),
    )
    .with_timeout(RELAY_TIMEOUT);
    match node.client.call(&leader, call).await {
        Ok(bytes) => match pb::AgentsHeardResponse::decode(bytes) {
            Ok(answer) => Outcome::Taken {
                revision: answer.revision,
                refused: Arc::new(answer.refused.into_iter().chain(over).collect()),
            },
            Err(e) => Outcome::Failed(format!("the leader's answer is undecodable: {e}")),
        },
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

/// An `AgentsHeard` request from the network: well formed and within
/// [`MAX_RELAYED`] agents, or `InvalidArgument` saying which.
fn decode_heard(payload: Bytes) -> Result<pb::AgentsHeardRequest, Status> {
    let req = pb::AgentsHeardRequest::decode(payload)
        .map_err(|e| Status::invalid_argument(format!("cluster/agentsheard: {e}")))?;
    if req.node_ids.len() > MAX_RELAYED {
        return Err(Status::invalid_argument(format!(
            "cluster/agentsheard: {} agents in one relay; at most {MAX_RELAYED}",
            req.node_ids.len()
        )));
    }
    Ok(req)
}

/// Serves `Cluster/AgentsHeard` on the leader: the relaying server must be
/// a member; this node must lead with a fresh majority. Every known,
/// ready agent of the relay is heard now; the others are refused.
pub(crate) async fn serve_heard(
    shared: &Arc<ClusterShared>,
    node: &Arc<Attached>,
    ctx: &RequestContext,
    payload: Bytes,
) -> Result<Bytes, Status> {
    if !node.is_member(&ctx.peer) {
        return Err(Status::permission_denied(format!(
            "cluster/agentsheard: {} is not a server of this cluster; only servers relay heartbeats",
            ctx.peer.short()
        )));
    }
    let req = decode_heard(payload)?;
    crate::membership::ensure_leader(node)?;
    crate::agents::ensure_majority(node)?;
    let now = Instant::now();
    let (heard, refused, revision) = node
        .sm
        .read(|s| {
            let (heard, refused): (Vec<NodeId>, Vec<NodeId>) =
                req.node_ids.iter().partition(|id| {
                    s.agent(**id)
                        .is_some_and(|a| a.status == AgentStatus::Ready)
                });
            (heard, refused, s.vm_history().revision())
        })
        .map_err(|e| Status::unavailable(format!("cannot read the cluster state: {e}")))?;
    shared.agents.heard_all(&heard, now);
    Ok(pb::AgentsHeardResponse { revision, refused }
        .encode_to_vec()
        .into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_protocol::PeerAddr;
    use tern_state::Capacity;

    fn record(status: AgentStatus) -> AgentRecord {
        let key = tern_protocol::PeerId::from_bytes([7; 32]);
        AgentRecord {
            addr: PeerAddr {
                id: key,
                iroh: None,
                grpc: Some("https://127.0.0.1:7400".into()),
            },
            capacity: Capacity {
                vcpus: 4,
                memory_mib: 4096,
            },
            status,
            since_unix_ms: 0,
        }
    }

    fn heartbeat(resuming: bool, capacity: Option<(u32, u64)>) -> pb::AgentHeartbeatRequest {
        pb::AgentHeartbeatRequest {
            node_id: 9,
            capacity: capacity.map(|(vcpus, memory_mib)| pb::Capacity { vcpus, memory_mib }),
            resuming,
        }
    }

    #[test]
    fn a_follower_takes_only_plain_heartbeats() {
        let same = Capacity {
            vcpus: 4,
            memory_mib: 4096,
        };
        let ready = record(AgentStatus::Ready);
        assert_eq!(
            leader_only(&heartbeat(false, Some((4, 4096))), &ready, same),
            None
        );
        assert_eq!(leader_only(&heartbeat(false, None), &ready, same), None);
        let resuming = leader_only(&heartbeat(true, Some((4, 4096))), &ready, same);
        assert!(
            resuming.is_some_and(|w| w.contains("resum")),
            "{resuming:?}"
        );
        let down = leader_only(&heartbeat(false, None), &record(AgentStatus::Down), same);
        assert!(down.is_some_and(|w| w.contains("down")), "{down:?}");
        let bigger = Capacity {
            vcpus: 8,
            memory_mib: 4096,
        };
        let changed = leader_only(&heartbeat(false, Some((8, 4096))), &ready, bigger);
        assert!(
            changed.is_some_and(|w| w.contains("capacity")),
            "{changed:?}"
        );
    }

    #[test]
    fn agents_beyond_one_relay_are_not_relayed_and_not_lost() {
        let ids: HashSet<NodeId> = (1..=MAX_RELAYED as u64 + 3).collect();
        let (sent, over) = split_relay(ids);
        assert_eq!(sent.len(), MAX_RELAYED);
        assert_eq!(over, [1, 2, 3].map(|k| MAX_RELAYED as u64 + k));
        let (sent, over) = split_relay([5, 2].into_iter().collect());
        assert_eq!((sent, over), (vec![2, 5], vec![]));
    }

    #[test]
    fn a_malformed_or_oversized_relay_is_refused_by_name() {
        let ok = pb::AgentsHeardRequest {
            node_ids: vec![3, 4],
        };
        assert_eq!(decode_heard(ok.encode_to_vec().into()).unwrap(), ok);
        let garbled = decode_heard(Bytes::from_static(&[0x0a, 0xff, 0xff, 0xff])).unwrap_err();
        assert_eq!(garbled.code, Code::InvalidArgument);
        assert!(
            garbled.message.starts_with("cluster/agentsheard"),
            "{garbled:?}"
        );
        let over = pb::AgentsHeardRequest {
            node_ids: vec![1; MAX_RELAYED + 1],
        };
        let refused = decode_heard(over.encode_to_vec().into()).unwrap_err();
        assert_eq!(refused.code, Code::InvalidArgument);
        assert!(refused.message.contains("at most 100000"), "{refused:?}");
        // Whatever the bytes, an answer, never a panic.
        let mut seed = 0x9e37_79b9_u32;
        for len in 0..512 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    seed.to_le_bytes()[0]
                })
                .collect();
            let _ = decode_heard(bytes.into());
        }
    }

    #[test]
    fn a_relayed_heartbeat_waits_no_longer_than_the_agents_call() {
        // The agent gives a heartbeat AGENT_CALL_TIMEOUT (3 s, in
        // tern-node); the follower's wait must end well inside it so the
        // agent hears "go to the leader" in time to try it.
        assert!(RELAY_WAIT <= Duration::from_millis(1_500));
        // A full relay fits a message well under the frame limit.
        let full = pb::AgentsHeardRequest {
            node_ids: vec![u64::MAX; MAX_RELAYED],
        };
        assert!(full.encoded_len() < tern_protocol::frame::DEFAULT_MAX_PAYLOAD as usize);
    }
}
