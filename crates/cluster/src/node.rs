//! [`RaftNode`]: openraft started over the store halves and an
//! [`RpcClient`], with the services attached, and the steps a node binary
//! takes: initialise a new cluster, join one, leave, shut down.
//!
//! The order a node binary follows:
//!
//! 1. `let services = RaftServices::new(token)`; register
//!    `services.register(dispatcher)` with both transports and bind them.
//! 2. `let (log, sm) = tern_store::open(data_dir)?`.
//! 3. If [`read_node_id`] finds an id, [`RaftNode::start`] with it (a
//!    restart: Raft resumes from sled). Otherwise either
//!    [`RaftNode::start`] with [`FIRST_NODE_ID`] and
//!    [`RaftNode::initialize`] (the first node of a new cluster), or
//!    [`RaftNode::join`] with a seed's address and the join token.
//!    Both write the id with [`write_node_id`] before Raft starts.
//!    A restarted member whose addresses changed (new ports) calls
//!    [`request_join`] with its new address once Raft runs: as a member it
//!    needs no token, and the leader replaces its record in the
//!    membership so that the others reach it again.
//! 4. At exit, [`RaftNode::shutdown`] (a leader hands leadership over
//!    first), then shut the transports down.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::errors::Fatal;
use openraft::raft::ClientWriteResponse;
use openraft::storage::{RaftLogReader, RaftLogStorage};
use openraft::vote::RaftLeaderId;
use openraft::{Config, ServerState, SnapshotPolicy};
use prost::Message;
use tern_protocol::catalog::methods;
use tern_protocol::{Call, CallError, Code, PeerAddr, PeerId, RpcClient, pb};
use tern_state::limits::{LimitError, check_command};
use tern_state::{Command, Member, NodeId, Response};
use tern_store::{StateMachineStore, TypeConfig};

use tern_raft_net::network::{AddressBook, NetworkFactory, SNAPSHOT_CHUNK_SIZE};
use tern_raft_net::{Attached, RaftInstance};

use crate::service::RaftServices;

pub use tern_raft_net::write::{WriteError, client_write, limit_status};
pub use tern_state::FIRST_NODE_ID;

/// How often at most [`RaftNode::failure`] looks at Raft's running state
/// again after it changed. openraft republishes its metrics several
/// times per log entry; the node's main task waits on `failure` and
/// woke for each of them (about seven wake-ups per commit on the leader,
/// counted with `strace -f`). A storage failure is seen this much later
/// at most, well inside a restart's cost.
pub const FAILURE_CHECK_EVERY: Duration = Duration::from_millis(50);

/// Interval of the leader's heartbeats: 100 ms. A heartbeat is an empty
/// append on the control lane (never queued behind replication) that no
/// follower syncs, so it is cheap; replication appends have their own
/// deadline (`tern_raft_net::network::REPLICATION_TIMEOUT`), not this.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);
/// Shortest election timeout.
///
/// In openraft 0.10 a follower campaigns only after the leader's lease
/// (which openraft sets to [`ELECTION_TIMEOUT_MAX`]) *and* its own
/// randomised election timeout have passed since the last heartbeat, so
/// the silence that starts an election is lease + timeout: 450–600 ms with
/// these values, four to six heartbeats missed in a row, so one late
/// heartbeat or a lost packet never starts an election. The failover a
/// client sees after a leader dies is that silence (less the time since
/// the last heartbeat) plus a pre-vote and a vote round and the new
/// leader's first commit: under 700 ms, for the goal of a p99 under a
/// second.
pub const ELECTION_TIMEOUT_MIN: Duration = Duration::from_millis(150);
/// Longest election timeout: twice the shortest, so that candidates'
/// randomised timeouts rarely collide. It is also openraft's leader lease
/// (see [`ELECTION_TIMEOUT_MIN`]).
pub const ELECTION_TIMEOUT_MAX: Duration = Duration::from_millis(300);
/// Deadline of one snapshot chunk ([`SNAPSHOT_CHUNK_SIZE`]) including, for
/// the last, the receiver's install: 1 MiB needs well under a second on
/// any link a cluster runs over.
pub const SNAPSHOT_CHUNK_TIMEOUT: Duration = Duration::from_secs(10);
/// Entries per append-entries call: bounds a call's size and duration
/// (the network cuts a batch further if it exceeds the frame limit).
pub const MAX_PAYLOAD_ENTRIES: u64 = 512;
/// A snapshot is built every this many entries: the cluster state is
/// small, so snapshots are cheap, and the log stays short. Each node builds
/// at its own offset within the interval, so that the members do not
/// build together (`crate::snapshot_schedule`).
pub const SNAPSHOT_LOGS_SINCE_LAST: u64 = 10_000;
/// Entries kept in the log behind a snapshot, so that a follower a little
/// behind catches up from the log rather than by snapshot.
pub const LOGS_TO_KEEP_AFTER_SNAPSHOT: u64 = 1_000;
/// How long [`RaftNode::shutdown`] lets a leader hand leadership over
/// before stopping anyway: a few heartbeats.
pub const LEADERSHIP_HANDOFF_TIMEOUT: Duration = Duration::from_secs(3);
/// Timeout of one Cluster call made by [`request_join`].
pub const CLUSTER_CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Leader redirects [`request_join`] follows before giving up (a leader
/// change during a join costs one).
pub const MAX_JOIN_REDIRECTS: usize = 4;
/// Name of the file in the data directory that holds the node id.
pub const NODE_ID_FILE: &str = "raft-node-id";

/// The openraft settings a node runs with; [`RaftOptions::default`] holds
/// the named constants above. Tests lower the snapshot thresholds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftOptions {
    /// See [`HEARTBEAT_INTERVAL`].
    pub heartbeat_interval: Duration,
    /// See [`ELECTION_TIMEOUT_MIN`].
    pub election_timeout_min: Duration,
    /// See [`ELECTION_TIMEOUT_MAX`].
    pub election_timeout_max: Duration,
    /// See [`SNAPSHOT_LOGS_SINCE_LAST`].
    pub snapshot_logs_since_last: u64,
    /// See [`LOGS_TO_KEEP_AFTER_SNAPSHOT`].
    pub logs_to_keep_after_snapshot: u64,
    /// Replicate over one `Raft/AppendStream` per follower (pipelined)
    /// instead of one unary append at a time. On by default: see
    /// `tern_raft_net::append_stream`'s "The default".
    pub pipelined_replication: bool,
}

impl Default for RaftOptions {
    fn default() -> Self {
        RaftOptions {
            heartbeat_interval: HEARTBEAT_INTERVAL,
            election_timeout_min: ELECTION_TIMEOUT_MIN,
            election_timeout_max: ELECTION_TIMEOUT_MAX,
            snapshot_logs_since_last: SNAPSHOT_LOGS_SINCE_LAST,
            logs_to_keep_after_snapshot: LOGS_TO_KEEP_AFTER_SNAPSHOT,
            pipelined_replication: true,
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl RaftOptions {
    /// The validated openraft configuration.
    pub fn to_config(&self) -> Result<Config, RaftNodeError> {
        let config = Config {
            cluster_name: "tern".into(),
            heartbeat_interval: ms(self.heartbeat_interval),
            election_timeout_min: ms(self.election_timeout_min),
            election_timeout_max: ms(self.election_timeout_max),
            install_snapshot_timeout: ms(SNAPSHOT_CHUNK_TIMEOUT),
            max_payload_entries: MAX_PAYLOAD_ENTRIES,
            // Snapshots are asked for by `crate::snapshot_schedule`, at
            // every `snapshot_logs_since_last` entries offset per node.
            snapshot_policy: SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: self.logs_to_keep_after_snapshot,
            // A follower further behind than this gets a snapshot; it must
            // exceed the snapshot interval or a snapshot cannot close the
            // gap.
            replication_lag_threshold: self
                .snapshot_logs_since_last
                .saturating_add(self.logs_to_keep_after_snapshot)
                .saturating_mul(2),
            snapshot_max_chunk_size: SNAPSHOT_CHUNK_SIZE as u64,
            // Pre-vote: a node that can reach the others but is not heard
            // (or was partitioned) asks whether it would win before raising
            // its term, so it never deposes a healthy leader when it is
            // heard again. The network carries it on the control lane.
            enable_pre_vote: Some(true),
            ..Config::default()
        };
        config
            .validate()
            .map_err(|e| RaftNodeError::Config(e.to_string()))
    }
}

/// Why a node could not start, join, leave or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum RaftNodeError {
    /// The openraft configuration is invalid.
    #[error("invalid Raft configuration: {0}")]
    Config(String),
    /// openraft stopped or refused.
    #[error("Raft: {0}")]
    Raft(String),
    /// A Cluster call failed.
    #[error("cluster call to {peer}: {error}")]
    Call {
        /// The peer called.
        peer: String,
        /// What happened.
        error: CallError,
    },
    /// The cluster answered something unusable.
    #[error("cluster answered: {0}")]
    Answer(String),
    /// The write is over a size limit and was not sent.
    #[error("refused before proposing: {0}")]
    Limit(LimitError),
    /// A wait passed its bound.
    #[error("timed out: {0}")]
    TimedOut(String),
    /// Reading or writing the node id file failed.
    #[error("node id file: {0}")]
    Io(#[from] io::Error),
}

/// Reads the node id saved in `data_dir`, if any.
pub fn read_node_id(data_dir: &Path) -> io::Result<Option<NodeId>> {
    match std::fs::read_to_string(data_dir.join(NODE_ID_FILE)) {
        Ok(text) => text.trim().parse::<NodeId>().map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{NODE_ID_FILE} holds {text:?}: {e}"),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Saves the node id in `data_dir` durably (temporary file, fsync, rename,
/// directory fsync).
pub fn write_node_id(data_dir: &Path, id: NodeId) -> io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(data_dir)?;
    let tmp = data_dir.join(format!("{NODE_ID_FILE}.tmp"));
    let mut file = std::fs::File::create(&tmp)?;
    writeln!(file, "{id}")?;
    file.sync_all()?;
    std::fs::rename(&tmp, data_dir.join(NODE_ID_FILE))?;
    std::fs::File::open(data_dir)?.sync_all()
}

/// What a successful join returns.
#[derive(Debug, Clone)]
pub struct JoinAnswer {
    /// The node id the cluster gave this node.
    pub node_id: NodeId,
    /// The members at the time, with their node ids.
    pub members: Vec<(NodeId, PeerAddr)>,
    /// Whether the leader will promote this node to voter once it has
    /// caught up (otherwise it stays a learner until an admin promotes it).
    pub voter_pending: bool,
}

fn parse_members(members: &[pb::Member]) -> Vec<(NodeId, PeerAddr)> {
    members
        .iter()
        .filter_map(|m| {
            let addr = PeerAddr::try_from(m.address.as_ref()?).ok()?;
            Some((m.node_id, addr))
        })
        .collect()
}

/// Asks `leader` to commit `command` on this member's behalf
/// (`Raft/Propose`) within `timeout`, and returns the state machine's
/// response: a direct call to a node the caller names (tools and tests).
/// A follower's own writes reach the leader through
/// [`RaftConsensus`](crate::RaftConsensus), which forwards them with
/// `tern_protocol::forward::forward_to_leader`. The caller must be a member; a node that is not the leader answers
/// `FailedPrecondition` naming the leader. Safe to retry: every command
/// carries a request id the state machine deduplicates.
pub async fn propose(
    client: &dyn RpcClient,
    leader: &PeerAddr,
    command: &Command,
    timeout: Duration,
) -> Result<Response, RaftNodeError> {
    // The leader checks again; refusing here saves the trip.
    check_command(command).map_err(RaftNodeError::Limit)?;
    let payload = tern_raft_net::wire::wrap(command)
        .map_err(|e| RaftNodeError::Answer(format!("cannot encode the command: {e}")))?;
    let call = Call::new(methods::RAFT_PROPOSE, payload).with_timeout(timeout);
    let bytes = client
        .call(leader, call)
        .await
        .map_err(|error| RaftNodeError::Call {
            peer: leader.id.short(),
            error,
        })?;
    tern_raft_net::wire::unwrap::<Response>(bytes)
        .map_err(|e| RaftNodeError::Answer(format!("propose response: {e}")))
}

/// Asks the cluster, through `seed`, to let `me` join: calls Join at the
/// seed and, if it is not the leader, at the leader ([`at_the_leader`]).
pub async fn request_join(
    client: &dyn RpcClient,
    seed: &PeerAddr,
    token: &str,
    me: &Member,
) -> Result<JoinAnswer, RaftNodeError> {
    let req = pb::JoinRequest {
        token: token.to_owned(),
        address: Some(pb::PeerAddress::from(&me.addr)),
        capacity: Some(pb::Capacity {
            vcpus: me.capacity.vcpus,
            memory_mib: me.capacity.memory_mib,
        }),
    };
    let bytes = at_the_leader(
        client,
        seed,
        methods::CLUSTER_JOIN,
        req.encode_to_vec().into(),
    )
    .await?;
    let resp = pb::JoinResponse::decode(bytes)
        .map_err(|e| RaftNodeError::Answer(format!("join response: {e}")))?;
    Ok(JoinAnswer {
        node_id: resp.node_id,
        members: parse_members(&resp.members),
        voter_pending: resp.voter_pending,
    })
}

/// Asks the cluster, through `seed`, to remove node `node_id` (at the
/// leader, see [`at_the_leader`]; a leader asked to remove itself hands
/// leadership over first, so this may take a redirect more). `client` must
/// call as the node itself or as an admin. Returns the members left.
pub async fn request_leave(
    client: &dyn RpcClient,
    seed: &PeerAddr,
    node_id: NodeId,
) -> Result<Vec<(NodeId, PeerAddr)>, RaftNodeError> {
    let req = pb::LeaveRequest { node_id };
    let bytes = at_the_leader(
        client,
        seed,
        methods::CLUSTER_LEAVE,
        req.encode_to_vec().into(),
    )
    .await?;
    let resp = pb::LeaveResponse::decode(bytes)
        .map_err(|e| RaftNodeError::Answer(format!("leave response: {e}")))?;
    Ok(parse_members(&resp.members))
}

/// The one redirect loop for calls only the leader serves: calls `method`
/// at `seed`, and on `FailedPrecondition` (not the leader) or
/// `Unavailable` (no leader yet, or leadership moving) asks the node
/// called for the leader and calls it there, at most
/// [`MAX_JOIN_REDIRECTS`] times, a heartbeat apart.
pub async fn at_the_leader(
    client: &dyn RpcClient,
    seed: &PeerAddr,
    method: &'static tern_protocol::Method,
    payload: bytes::Bytes,
) -> Result<bytes::Bytes, RaftNodeError> {
    let mut target = seed.clone();
    for attempt in 0..=MAX_JOIN_REDIRECTS {
        if attempt > 0 {
            tokio::time::sleep(HEARTBEAT_INTERVAL).await;
        }
        let call = Call::new(method, payload.clone()).with_timeout(CLUSTER_CALL_TIMEOUT);
        match client.call(&target, call).await {
            Ok(bytes) => return Ok(bytes),
            Err(CallError::Application(s))
                if matches!(s.code, Code::FailedPrecondition | Code::Unavailable) =>
            {
                tracing::info!(
                    peer = %target.id.short(),
                    method = %method.label(),
                    reason = %s.message,
                    "redirected to the leader"
                );
                target = find_leader(client, &target).await?;
            }
            Err(error) => {
                return Err(RaftNodeError::Call {
                    peer: target.id.short(),
                    error,
                });
            }
        }
    }
    Err(RaftNodeError::TimedOut(format!(
        "no leader answered {} after {MAX_JOIN_REDIRECTS} redirects",
        method.label()
    )))
}

/// The leader's address as `peer` knows it (waits briefly during an
/// election).
async fn find_leader(client: &dyn RpcClient, peer: &PeerAddr) -> Result<PeerAddr, RaftNodeError> {
    for _ in 0..10 {
        let call = Call::new(
            methods::CLUSTER_MEMBERS,
            pb::MembersRequest {}.encode_to_vec().into(),
        )
        .with_timeout(CLUSTER_CALL_TIMEOUT);
        let bytes = client
            .call(peer, call)
            .await
            .map_err(|error| RaftNodeError::Call {
                peer: peer.id.short(),
                error,
            })?;
        let resp = pb::MembersResponse::decode(bytes)
            .map_err(|e| RaftNodeError::Answer(format!("members response: {e}")))?;
        if let Some((_, addr)) = parse_members(&resp.members)
            .into_iter()
            .find(|(id, _)| *id == resp.leader_id && resp.leader_id != 0)
        {
            return Ok(addr);
        }
        tokio::time::sleep(ELECTION_TIMEOUT_MIN / 2).await;
    }
    Err(RaftNodeError::TimedOut(format!(
        "{} knows no leader",
        peer.id.short()
    )))
}

/// Keeps `book` equal to the latest membership until Raft stops. It
/// follows openraft's server metrics, which change with the role, leader,
/// vote or membership only (`metrics()` changes with every entry).
fn spawn_address_book_updater(raft: &RaftInstance, book: Arc<AddressBook>) {
    let mut rx = raft.server_metrics();
    tokio::spawn(async move {
        let mut seen = None;
        loop {
            let membership = rx.borrow_watched().membership_config.clone();
            if seen.as_ref() != Some(membership.log_id()) {
                book.update(membership.membership());
                seen = Some(*membership.log_id());
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
}

/// A running Raft node: openraft over the store and the client, with the
/// Raft and Cluster services attached.
pub struct RaftNode {
    attached: Arc<Attached>,
    services: RaftServices,
    client: Arc<dyn RpcClient>,
}

impl std::fmt::Debug for RaftNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftNode")
            .field("id", &self.attached.id)
            .finish_non_exhaustive()
    }
}

impl RaftNode {
    /// Starts Raft as node `id` on the store halves, calling other nodes
    /// through `client`, and attaches `services` to it. A node restarted
    /// on the same store resumes where it stopped. `log` is a
    /// [`tern_store::LogStore`] (tests wrap one to inject storage faults).
    pub async fn start<LS: RaftLogStorage<TypeConfig>>(
        services: &RaftServices,
        id: NodeId,
        log: LS,
        sm: StateMachineStore,
        client: Arc<dyn RpcClient>,
        options: &RaftOptions,
    ) -> Result<RaftNode, RaftNodeError> {
        let config = Arc::new(options.to_config()?);
        let network = NetworkFactory::new(client.clone(), id)
            .with_pipelined_replication(options.pipelined_replication);
        let book = network.address_book();
        let mut log = log;
        // An election this node won before a restart is not counted again.
        let stored_vote_term = log
            .get_log_reader()
            .await
            .read_vote()
            .await
            .map_err(|e| RaftNodeError::Raft(format!("reading the stored vote: {e}")))?
            .filter(|v| *v.leader_id().node_id() == id)
            .map(|v| v.leader_id().term());
        let raft = RaftInstance::new(id, config, network, log, sm.clone())
            .await
            .map_err(|e| RaftNodeError::Raft(e.to_string()))?;
        tern_raft_net::metrics::spawn_watcher(&raft, stored_vote_term);
        spawn_address_book_updater(&raft, book);
        crate::snapshot_schedule::spawn(
            raft.clone(),
            crate::snapshot_schedule::Schedule::for_node(id, options.snapshot_logs_since_last),
        );
        let attached = Arc::new(Attached {
            raft,
            sm,
            id,
            client: client.clone(),
        });
        services.attach(attached.clone());
        tracing::info!(node = id, "raft started");
        Ok(RaftNode {
            attached,
            services: services.clone(),
            client,
        })
    }

    /// Keeps this node's addresses in the membership equal to `me` while
    /// they change ([`crate::address::keep_recorded`]); the task ends when
    /// Raft stops.
    pub fn keep_address_recorded(
        &self,
        me: tokio::sync::watch::Receiver<Member>,
        token: String,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(crate::address::keep_recorded(
            self.attached.clone(),
            me,
            token,
        ))
    }

    /// Joins the cluster through `seed` with `token` as `me`: obtains a
    /// node id ([`request_join`]), saves it in `data_dir`, starts Raft,
    /// and waits at most `timeout` until the leader has promoted this
    /// node to voter, or, when the cluster already has its `max_voters`,
    /// until it is a learner in a committed membership.
    #[allow(clippy::too_many_arguments)] // reason: the composition step takes every part once
    pub async fn join<LS: RaftLogStorage<TypeConfig>>(
        services: &RaftServices,
        data_dir: &Path,
        log: LS,
        sm: StateMachineStore,
        client: Arc<dyn RpcClient>,
        options: &RaftOptions,
        seed: &PeerAddr,
        token: &str,
        me: &Member,
        timeout: Duration,
    ) -> Result<RaftNode, RaftNodeError> {
        let answer = request_join(client.as_ref(), seed, token, me).await?;
        tracing::info!(node = answer.node_id, "joined as learner");
        write_node_id(data_dir, answer.node_id)?;
        services.trust_until_first_membership(answer.members.iter().map(|(id, a)| (*id, a.id)));
        let node = RaftNode::start(services, answer.node_id, log, sm, client, options).await?;
        node.wait_until_joined(answer.voter_pending, timeout)
            .await?;
        Ok(node)
    }

    /// Makes this node the only voter of a new cluster, with `me` as its
    /// record. Refused if the node already has state.
    pub async fn initialize(&self, me: Member) -> Result<(), RaftNodeError> {
        let nodes = std::collections::BTreeMap::from([(self.attached.id, me)]);
        self.attached
            .raft
            .initialize(nodes)
            .await
            .map_err(|e| RaftNodeError::Raft(e.to_string()))
    }

    /// Waits at most `timeout` until this node is in a committed,
    /// non-joint membership: as a voter when `voter` (the join answer's
    /// `voter_pending`), else as a learner or voter.
    pub async fn wait_until_joined(
        &self,
        voter: bool,
        timeout: Duration,
    ) -> Result<(), RaftNodeError> {
        let id = self.attached.id;
        self.attached
            .raft
            .wait(Some(timeout))
            .metrics(
                |m| {
                    let committed = m.committed_membership_config.membership();
                    committed.get_joint_config().len() == 1
                        && if voter {
                            committed.voter_ids().any(|v| v == id)
                        } else {
                            committed.get_node(&id).is_some()
                        }
                },
                if voter {
                    "promoted to voter"
                } else {
                    "a learner"
                },
            )
            .await
            .map(|_| ())
            .map_err(|e| RaftNodeError::TimedOut(e.to_string()))
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.attached.id
    }

    /// The openraft instance. Write with [`RaftNode::client_write`], which
    /// checks the write limits first; `raft().client_write` does not.
    pub fn raft(&self) -> &RaftInstance {
        &self.attached.raft
    }

    /// Proposes `command` once it passes the write limits
    /// ([`tern_state::limits::check_command`]) and answers the state
    /// machine's response once it is committed and applied here. On a
    /// follower openraft answers `ForwardToLeader` (in
    /// [`WriteError::Raft`]); forward with [`propose`].
    pub async fn client_write(
        &self,
        command: Command,
    ) -> Result<ClientWriteResponse<TypeConfig>, WriteError> {
        client_write(&self.attached.raft, command).await
    }

    /// Resolves when Raft has stopped on this node on its own: openraft
    /// stops on any storage error (a failed log write or sync, a snapshot
    /// that cannot be written or read) and on a panic in its core, and
    /// answers nothing from then on. The answer says what failed; the node
    /// binary exits on it. Never resolves after a clean
    /// [`RaftNode::shutdown`] (or if Raft's metrics are dropped without an
    /// error), so it can sit in a `select!` beside the shutdown signals.
    pub async fn failure(&self) -> String {
        let mut rx = self.attached.raft.metrics();
        loop {
            let state = rx.borrow_watched().running_state.clone();
            match state {
                Ok(()) => {}
                Err(Fatal::Stopped) => return std::future::pending().await,
                Err(Fatal::StorageError(e)) => {
                    return format!("Raft stopped on a storage error: {e}");
                }
                Err(Fatal::Panicked) => return "Raft's core task panicked".to_owned(),
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
            // Changes meanwhile are seen at once after the pause.
            tokio::time::sleep(FAILURE_CHECK_EVERY).await;
        }
    }

    /// Whether this server has been demoted to an agent
    /// (`tern cluster demote`, see [`crate::demotion`]): its applied state
    /// holds an agent record for its own id and it votes no more. Such a
    /// node must stop acting as a server: it is restarted with
    /// `role = "agent"`.
    pub fn is_demoted(&self) -> bool {
        !self.votes()
            && self
                .attached
                .sm
                .read(|s| s.agent(self.attached.id).is_some())
                .unwrap_or(false)
    }

    /// Whether this node is a voter in the membership Raft has now.
    fn votes(&self) -> bool {
        let id = self.attached.id;
        self.attached
            .raft
            .server_metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == id)
    }

    /// Resolves once this server has been demoted
    /// ([`RaftNode::is_demoted`]). A demotion takes the vote away first
    /// and applies the agent record after, so this follows the server
    /// metrics (membership changes) while the node votes, and the applied
    /// state as well only once it does not: a voter is not woken by every
    /// entry. Never resolves while it is not, or once Raft has stopped.
    pub async fn demoted(&self) {
        let mut server = self.attached.raft.server_metrics();
        let mut applied = self.attached.sm.changes();
        loop {
            applied.borrow_and_update();
            if self.is_demoted() {
                return;
            }
            let changed = if self.votes() {
                server.changed().await.is_ok()
            } else {
                tokio::select! {
                    c = server.changed() => c.is_ok(),
                    c = applied.changed() => c.is_ok(),
                }
            };
            if !changed {
                return std::future::pending().await;
            }
        }
    }

    /// The state machine, to read the cluster state.
    pub fn state(&self) -> &StateMachineStore {
        &self.attached.sm
    }

    /// The services this node is attached to.
    pub fn services(&self) -> &RaftServices {
        &self.services
    }

    /// The peer id of member `id` in the current membership.
    pub fn peer_of(&self, id: NodeId) -> Option<PeerId> {
        let m = self
            .attached
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .clone();
        m.membership().get_node(&id).map(Member::peer_id)
    }

    /// If this node leads, hands leadership to the most up-to-date other
    /// voter and waits (at most [`LEADERSHIP_HANDOFF_TIMEOUT`]) until
    /// another node leads. Nothing to do for a follower or a lone voter.
    pub async fn hand_over_leadership(&self) -> Result<(), RaftNodeError> {
        let raft = &self.attached.raft;
        let id = self.attached.id;
        let metrics = raft.metrics().borrow_watched().clone();
        if metrics.state != ServerState::Leader {
            return Ok(());
        }
        let successor = metrics
            .membership_config
            .membership()
            .voter_ids()
            .filter(|v| *v != id)
            .max_by_key(|v| {
                metrics
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(v).cloned().flatten())
                    .map(|l| l.index)
            });
        let Some(to) = successor else {
            return Ok(());
        };
        tracing::info!(node = id, to, "handing leadership over");
        raft.trigger()
            .transfer_leader(to)
            .await
            .map_err(|e| RaftNodeError::Raft(e.to_string()))?;
        raft.wait(Some(LEADERSHIP_HANDOFF_TIMEOUT))
            .metrics(
                |m| m.current_leader.is_some_and(|l| l != id),
                "leadership handed over",
            )
            .await
            .map(|_| ())
            .map_err(|e| RaftNodeError::TimedOut(e.to_string()))
    }

    /// Removes this node from the cluster (from the voters, then from the
    /// membership), through the leader it knows, then stops it. A leader
    /// hands leadership over first.
    pub async fn leave(self) -> Result<(), RaftNodeError> {
        // Never call ourselves: a leader steps aside first.
        self.hand_over_leadership().await?;
        let metrics = self.attached.raft.metrics().borrow_watched().clone();
        let seed = metrics
            .current_leader
            .and_then(|l| metrics.membership_config.membership().get_node(&l).cloned())
            .ok_or_else(|| RaftNodeError::Raft("no leader known to leave through".into()))?;
        request_leave(self.client.as_ref(), &seed.addr, self.attached.id).await?;
        tracing::info!(node = self.attached.id, "left the cluster");
        self.shutdown().await
    }

    /// Stops Raft. A leader first hands leadership to another voter and
    /// waits (at most [`LEADERSHIP_HANDOFF_TIMEOUT`]) for it to take over,
    /// so the cluster does not sit through an election timeout. The
    /// services then answer `Unavailable`.
    pub async fn shutdown(self) -> Result<(), RaftNodeError> {
        let raft = &self.attached.raft;
        let id = self.attached.id;
        if let Err(e) = self.hand_over_leadership().await {
            tracing::warn!(error = %e, "leadership handoff did not finish; stopping anyway");
        }
        self.services.detach();
        raft.shutdown()
            .await
            .map_err(|e| RaftNodeError::Raft(e.to_string()))?;
        tracing::info!(node = id, "raft stopped");
        Ok(())
    }
}
