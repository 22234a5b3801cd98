//! The agent role: a node that runs VMs without being a Raft member.
//!
//! [`AgentLink`] is an agent's whole view of the cluster. It registers
//! with the servers named in `[cluster] join` (with the join token the
//! first time; its key is known afterwards), heartbeats through its home
//! follower (`tern_cluster::relay`; to the leader itself while resuming),
//! follows its assignment on one server's `Cluster/AgentSync` stream, and
//! implements the services' `Consensus` over what it follows, so that the
//! reconciler, Health, Status, the access check and the policy control
//! run on an agent unchanged:
//!
//! - **read** is a mirror (`ClusterState::agent_mirror`): the VMs placed
//!   on this agent with their leases and user data, the servers as
//!   members (they may call the agent as members do), and the transport
//!   policy the cluster wants for it;
//! - **write** carries only the reconciler's reports, as
//!   `Cluster/AgentReport` to the leader;
//! - **status** says role `Agent`, the leader its last acknowledged
//!   heartbeat named, and whether the mirror may be acted on.
//!
//! # Never twice
//!
//! - **Fence.** When no heartbeat has been acknowledged for a third of the
//!   servers' `down_after` (the leader marks the agent down and moves its
//!   VMs after all of it), the agent fences itself: its mirror wants every
//!   VM stopped, so the reconciler stops them, and no report is sent (a
//!   "stopped" report would keep the VM stopped once the agent is back).
//!   The silence is counted from when the last acknowledged heartbeat was
//!   *sent* (the leader heard it no earlier), and an acknowledgement that
//!   took longer than the fence bound to come back does not count, so a
//!   slow answer never puts the agent's count behind the leader's.
//! - **Resume.** After a start or a fence, the agent acts on nothing
//!   until it holds an assignment at least as new as the revision the
//!   leader's acknowledging heartbeat named (`min_revision` on a new sync
//!   stream). So a VM moved away meanwhile is no longer in its assignment
//!   when it acts, and the reconciler removes it before it starts
//!   anything.
//! - **Known limit.** Workloads outlive their node by design (a node
//!   restart does not stop VMs). An agent *process* that dies cannot
//!   fence: its workloads run on while the leader moves them after
//!   `down_after`, until the agent comes back and stops them first thing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use tern_cluster::agents::MIN_AGENT_DOWN_AFTER;
use tern_protocol::catalog::methods;
use tern_protocol::metric_names::{AGENT_FENCED, AGENT_HEARTBEAT_AGE};
use tern_protocol::stream::StreamCall;
use tern_protocol::{BoxFuture, Call, CallError, Code, PeerAddr, RpcClient, pb};
use tern_services::consensus::{Consensus, ConsensusError, RaftRole, RaftStatus};
use tern_state::{AssignedVm, Capacity, ClusterState, Command, Member, NodeId, Response, VmState};
use tokio::sync::watch;

/// Bound on one call to a server (register, heartbeat, report).
pub const AGENT_CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// How long an agent keeps trying to register before `tern run` gives up.
pub const REGISTER_GIVE_UP: Duration = Duration::from_secs(120);

/// Pause before trying the next server after a failed call or stream.
const RETRY_PAUSE: Duration = Duration::from_millis(300);

/// The shortest heartbeat interval an agent follows, whatever a server
/// answers: ten a second is already far more than any bound needs.
pub const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);

/// Heartbeats sent straight to the leader after the home server refused
/// or failed one, before the agent tries its home again (30 s at the
/// default interval): a home that is down costs one failed call per this
/// many heartbeats, not one each.
const DIRECT_AFTER_REFUSAL: u32 = 15;

/// How often the fence is checked: well inside the shortest fence
/// (a third of `MIN_AGENT_DOWN_AFTER`, 1 s).
const FENCE_TICK: Duration = Duration::from_millis(100);

/// What the agent learned of the servers.
#[derive(Debug, Clone, Default)]
struct Servers {
    list: Vec<(NodeId, Member)>,
    leader: Option<NodeId>,
    heartbeat_interval: Duration,
    down_after: Duration,
}

impl Servers {
    fn addr_of(&self, id: NodeId) -> Option<PeerAddr> {
        self.list
            .iter()
            .find(|(n, _)| *n == id)
            .map(|(_, m)| m.addr.clone())
    }

    /// The leader if known, else the `turn`th server.
    fn target(&self, turn: usize, seeds: &[PeerAddr]) -> Option<PeerAddr> {
        if let Some(addr) = self.leader.and_then(|l| self.addr_of(l)) {
            return Some(addr);
        }
        self.nth(turn, seeds)
    }

    /// The follower that takes this agent's plain heartbeats and relays
    /// them to the leader (`tern_cluster::relay`): one of the servers
    /// other than the leader, chosen by the agent's node id so that the
    /// fleet spreads evenly. `None` while the leader is unknown or leads
    /// alone.
    fn home(&self, me: NodeId) -> Option<PeerAddr> {
        let leader = self.leader?;
        let mut followers: Vec<&(NodeId, Member)> =
            self.list.iter().filter(|(id, _)| *id != leader).collect();
        if followers.is_empty() {
            return None;
        }
        followers.sort_unstable_by_key(|(id, _)| *id);
        let at = usize::try_from(me % followers.len() as u64).unwrap_or(0);
        followers.get(at).map(|(_, m)| m.addr.clone())
    }

    fn nth(&self, turn: usize, seeds: &[PeerAddr]) -> Option<PeerAddr> {
        if self.list.is_empty() {
            return seeds.get(turn % seeds.len().max(1)).cloned();
        }
        self.list
            .get(turn % self.list.len())
            .map(|(_, m)| m.addr.clone())
    }

    /// Takes the servers' settings from an answer (network input): an
    /// interval below [`MIN_HEARTBEAT_INTERVAL`] or a bound below the
    /// servers' own minimum is raised to it, so a bad answer can neither
    /// make the agent spin nor fence at once.
    fn set_timing(&mut self, heartbeat_interval_ms: u64, down_after_ms: u64) {
        self.heartbeat_interval =
            Duration::from_millis(heartbeat_interval_ms).max(MIN_HEARTBEAT_INTERVAL);
        self.down_after = Duration::from_millis(down_after_ms).max(MIN_AGENT_DOWN_AFTER);
    }

    fn fence_after(&self) -> Duration {
        self.down_after / 3
    }
}

/// Whether an acknowledgement that came `answered_after` its heartbeat
/// was sent counts: not once that exceeds the fence bound.
fn ack_in_time(answered_after: Duration, fence_after: Duration) -> bool {
    answered_after <= fence_after
}

fn servers_of(members: &[pb::Member]) -> Vec<(NodeId, Member)> {
    members
        .iter()
        .filter_map(|m| {
            let addr = PeerAddr::try_from(m.address.as_ref()?).ok()?;
            let c = m.capacity.unwrap_or_default();
            Some((
                m.node_id,
                Member::new(
                    addr,
                    Capacity {
                        vcpus: c.vcpus,
                        memory_mib: c.memory_mib,
                    },
                ),
            ))
        })
        .collect()
}

/// The assignment last received, as the agent keeps it.
#[derive(Debug, Clone, Default)]
struct Assignment {
    revision: u64,
    vms: Vec<AssignedVm>,
    policy: Option<tern_protocol::policy::TransportConfig>,
    access: std::collections::BTreeMap<
        tern_protocol::PeerId,
        std::collections::BTreeSet<tern_protocol::access::Role>,
    >,
}

/// An agent's link to the servers; see the module docs.
pub struct AgentLink {
    client: Arc<dyn RpcClient>,
    me: PeerAddr,
    capacity: Capacity,
    token: String,
    seeds: Vec<PeerAddr>,
    node_id: AtomicU64,
    servers: RwLock<Servers>,
    assignment: RwLock<Assignment>,
    mirror: RwLock<ClusterState>,
    /// When the last heartbeat the leader acknowledged was sent: the
    /// leader heard it no earlier, so the fence, counted from here, never
    /// starts later than the leader's count of the agent's silence.
    last_ack: Mutex<Option<Instant>>,
    /// The revision the current assignment must reach before the agent
    /// acts (set from the acknowledging heartbeat after a start or fence).
    floor: AtomicU64,
    /// Whether the agent is fenced (its VMs wanted stopped).
    fenced: AtomicBool,
    /// VMs the fence stopped that the cluster still wants running: once
    /// unfenced their records read `Pending` in the mirror (a fresh start,
    /// as an operator's start would make them) until this agent reports
    /// them running again. Without it the reconciler would take the stop
    /// for the VM ending on its own, and leave it stopped.
    fence_stopped: Mutex<std::collections::BTreeSet<String>>,
    /// Whether plain heartbeats go through a home follower (the default);
    /// off, every heartbeat goes to the leader (see
    /// [`AgentLink::heartbeat_to_the_leader_only`]).
    via_followers: AtomicBool,
    /// Bumped when the sync stream must be opened again (a new floor).
    resync: watch::Sender<u64>,
    status: watch::Sender<RaftStatus>,
    changes: watch::Sender<u64>,
}

impl std::fmt::Debug for AgentLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentLink")
            .field("node_id", &self.node_id())
            .field("fenced", &self.fenced.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Why registration failed for good.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The servers refused the key or token: retrying will not help.
    #[error("the cluster refused the agent's registration: {0}")]
    Refused(String),
    /// No server answered within [`REGISTER_GIVE_UP`].
    #[error(
        "no server in cluster.join accepted the registration within {REGISTER_GIVE_UP:?} ({attempts} attempts; last error: {last}); check that the servers run and are reachable"
    )]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// The last error.
        last: String,
    },
}

/// Where one heartbeat goes and how long it may take.
struct HeartbeatTarget {
    /// The target is the agent's home follower (a failure sends the next
    /// heartbeats to the leader).
    home: bool,
    /// The server to call; none while no server is known.
    target: Option<PeerAddr>,
    /// The pause after an acknowledged heartbeat.
    interval: Duration,
    /// The call's timeout: at most half the fence bound for a home, so a
    /// home that does not answer leaves time to reach the leader.
    timeout: Duration,
}

impl AgentLink {
    /// A link for the agent `me` (its key and addresses) offering
    /// `capacity`, registering through `seeds` with `token`.
    pub fn new(
        client: Arc<dyn RpcClient>,
        me: PeerAddr,
        capacity: Capacity,
        token: String,
        seeds: Vec<PeerAddr>,
    ) -> Arc<AgentLink> {
        let (status, _) = watch::channel(RaftStatus {
            role: RaftRole::Agent,
            ..RaftStatus::default()
        });
        Arc::new(AgentLink {
            client,
            me,
            capacity,
            token,
            seeds,
            node_id: AtomicU64::new(0),
            servers: RwLock::new(Servers::default()),
            assignment: RwLock::new(Assignment::default()),
            mirror: RwLock::new(ClusterState::default()),
            last_ack: Mutex::new(None),
            floor: AtomicU64::new(u64::MAX),
            fenced: AtomicBool::new(false),
            fence_stopped: Mutex::new(std::collections::BTreeSet::new()),
            via_followers: AtomicBool::new(true),
            resync: watch::channel(0).0,
            status,
            changes: watch::channel(0).0,
        })
    }

    /// Sends every heartbeat to the leader, none through a follower: the
    /// protocol before the relay, kept for the fleet bench's side-by-side
    /// comparison (`tern-bench fleet --transport grpc-direct`). Safe
    /// either way; the leader then takes one call per agent and interval.
    pub fn heartbeat_to_the_leader_only(&self) {
        self.via_followers.store(false, Ordering::Release);
    }

    /// The agent's node id (0 before it registered).
    pub fn node_id(&self) -> NodeId {
        self.node_id.load(Ordering::Acquire)
    }

    /// How long ago the leader last acknowledged a heartbeat.
    pub fn heartbeat_age(&self) -> Option<Duration> {
        lock(&self.last_ack).map(|at| at.elapsed())
    }

    /// Whether the agent is fenced now.
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    async fn call<Req: Message, Resp: Message + Default>(
        &self,
        peer: &PeerAddr,
        method: &'static tern_protocol::Method,
        req: &Req,
    ) -> Result<Resp, CallError> {
        self.call_within(peer, method, req, AGENT_CALL_TIMEOUT)
            .await
    }

    async fn call_within<Req: Message, Resp: Message + Default>(
        &self,
        peer: &PeerAddr,
        method: &'static tern_protocol::Method,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, CallError> {
        let call = Call::new(method, Bytes::from(req.encode_to_vec())).with_timeout(timeout);
        let bytes = self.client.call(peer, call).await?;
        Resp::decode(bytes).map_err(|e| {
            CallError::Application(tern_protocol::Status::internal(format!(
                "{}: undecodable answer: {e}",
                method.label()
            )))
        })
    }

    /// Registers with the servers: the agent's node id.
    pub async fn register(&self) -> Result<NodeId, RegisterError> {
        let give_up = Instant::now() + REGISTER_GIVE_UP;
        let req = pb::AgentRegisterRequest {
            token: self.token.clone(),
            address: Some(pb::PeerAddress::from(&self.me)),
            capacity: Some(pb::Capacity {
                vcpus: self.capacity.vcpus,
                memory_mib: self.capacity.memory_mib,
            }),
        };
        let mut attempts = 0u32;
        let mut last: String;
        loop {
            let target = lock_read(&self.servers).target(attempts as usize, &self.seeds);
            attempts += 1;
            let Some(target) = target else {
                return Err(RegisterError::Refused("no server to register with".into()));
            };
            match self
                .call::<_, pb::AgentRegisterResponse>(
                    &target,
                    methods::CLUSTER_AGENT_REGISTER,
                    &req,
                )
                .await
            {
                Ok(answer) => {
                    self.node_id.store(answer.node_id, Ordering::Release);
                    let mut s = lock_write(&self.servers);
                    s.list = servers_of(&answer.servers);
                    s.leader = (answer.leader_id != 0).then_some(answer.leader_id);
                    s.set_timing(answer.heartbeat_interval_ms, answer.down_after_ms);
                    tracing::info!(
                        node = answer.node_id,
                        servers = s.list.len(),
                        "agent registered"
                    );
                    return Ok(answer.node_id);
                }
                Err(CallError::Application(s)) if s.code == Code::PermissionDenied => {
                    return Err(RegisterError::Refused(s.message));
                }
                Err(CallError::Application(s)) if s.code == Code::FailedPrecondition => {
                    // Not the leader: ask the members for it.
                    self.learn_leader(&target).await;
                    last = s.message;
                }
                Err(e) => {
                    last = e.to_string();
                    lock_write(&self.servers).leader = None;
                }
            }
            if Instant::now() > give_up {
                return Err(RegisterError::GaveUp { attempts, last });
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    async fn learn_leader(&self, via: &PeerAddr) {
        if let Ok(m) = self
            .call::<_, pb::MembersResponse>(via, methods::CLUSTER_MEMBERS, &pb::MembersRequest {})
            .await
        {
            let mut s = lock_write(&self.servers);
            s.list = servers_of(&m.members);
            s.leader = (m.leader_id != 0).then_some(m.leader_id);
        }
    }

    /// Runs the heartbeats, the fence and the assignment stream until
    /// `stop` resolves.
    pub async fn run(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        tokio::select! {
            () = &mut stop => {}
            () = self.clone().heartbeats() => {}
            () = self.clone().fence() => {}
            () = self.clone().sync() => {}
        }
        self.status.send_modify(|s| s.role = RaftRole::Shutdown);
    }

    /// Where the next heartbeat goes (see [`HeartbeatTarget`]).
    fn heartbeat_target(&self, resuming: bool, direct_left: u32, turn: usize) -> HeartbeatTarget {
        let s = lock_read(&self.servers);
        let home = if resuming || direct_left > 0 || !self.via_followers.load(Ordering::Acquire) {
            None
        } else {
            s.home(self.node_id())
        };
        // A home that does not answer must leave time to reach the leader
        // before the fence: half the fence at most.
        let timeout = if home.is_some() {
            (s.fence_after() / 2).min(AGENT_CALL_TIMEOUT)
        } else {
            AGENT_CALL_TIMEOUT
        };
        HeartbeatTarget {
            home: home.is_some(),
            target: home.or_else(|| s.target(turn, &self.seeds)),
            interval: s.heartbeat_interval.max(MIN_HEARTBEAT_INTERVAL),
            timeout,
        }
    }

    /// Sends the heartbeats: plain ones to the agent's home follower,
    /// which relays them; to the leader itself while resuming (after the
    /// start or a fence: the leader's answer sets the resume point), while
    /// there is no home, and for [`DIRECT_AFTER_REFUSAL`] heartbeats after
    /// the home refused or failed one.
    async fn heartbeats(self: Arc<Self>) {
        let mut turn = 0usize;
        let mut direct_left = 0u32;
        loop {
            let resuming = self.is_fenced() || self.floor.load(Ordering::Acquire) == u64::MAX;
            let HeartbeatTarget {
                home,
                target,
                interval,
                timeout,
            } = self.heartbeat_target(resuming, direct_left, turn);
            let Some(target) = target else {
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            };
            let sent = Instant::now();
            let req = pb::AgentHeartbeatRequest {
                node_id: self.node_id(),
                capacity: Some(pb::Capacity {
                    vcpus: self.capacity.vcpus,
                    memory_mib: self.capacity.memory_mib,
                }),
                resuming,
            };
            match self
                .call_within::<_, pb::AgentHeartbeatResponse>(
                    &target,
                    methods::CLUSTER_AGENT_HEARTBEAT,
                    &req,
                    timeout,
                )
                .await
            {
                Ok(answer) => {
                    self.acknowledged(&answer, sent);
                    direct_left = direct_left.saturating_sub(1);
                    tokio::time::sleep(interval).await;
                }
                Err(e) if home => {
                    // The leader at once: the fence is counting.
                    tracing::debug!(error = %e, server = %target.id.short(), "the home server did not take the heartbeat; heartbeating to the leader for a while");
                    direct_left = DIRECT_AFTER_REFUSAL;
                }
                Err(e) => {
                    turn = turn.wrapping_add(1);
                    match &e {
                        CallError::Application(s) if s.code == Code::PermissionDenied => {
                            tracing::warn!(error = %s, "heartbeat refused; registering again");
                            if let Err(e) = self.register().await {
                                tracing::warn!(error = %e, "registering again failed");
                            }
                        }
                        CallError::Application(s) if s.code == Code::FailedPrecondition => {
                            self.learn_leader(&target).await;
                        }
                        _ => {
                            tracing::debug!(error = %e, server = %target.id.short(), "heartbeat failed; trying another server");
                            lock_write(&self.servers).leader = None;
                        }
                    }
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
    }

    /// A heartbeat sent at `sent` was acknowledged by the leader.
    fn acknowledged(&self, answer: &pb::AgentHeartbeatResponse, sent: Instant) {
        let fence_after = {
            let mut s = lock_write(&self.servers);
            let list = servers_of(&answer.servers);
            if !list.is_empty() {
                s.list = list;
            }
            s.leader = (answer.leader_id != 0).then_some(answer.leader_id);
            s.set_timing(answer.heartbeat_interval_ms, answer.down_after_ms);
            s.fence_after()
        };
        if !ack_in_time(sent.elapsed(), fence_after) {
            // The answer took longer than the fence: the leader may have
            // heard this agent as long ago as it was sent, so it proves
            // nothing the fence does not already count. The next, faster
            // heartbeat ends a fence.
            tracing::warn!(
                answered_after_ms = sent.elapsed().as_millis(),
                fence_ms = fence_after.as_millis(),
                "a heartbeat was acknowledged after the fence bound; not counted"
            );
            return;
        }
        {
            let mut last = lock(&self.last_ack);
            *last = Some(last.map_or(sent, |l| l.max(sent)));
        }
        metrics::gauge!(AGENT_HEARTBEAT_AGE).set(sent.elapsed().as_secs_f64());
        let was_fenced = self.fenced.swap(false, Ordering::AcqRel);
        if was_fenced || self.floor.load(Ordering::Acquire) == u64::MAX {
            // After a start or a fence: act only on an assignment at
            // least as new as what the leader has applied now.
            self.floor.store(answer.revision, Ordering::Release);
            self.resync.send_modify(|n| *n += 1);
            if was_fenced {
                metrics::gauge!(AGENT_FENCED).set(0.0);
                tracing::info!(
                    revision = answer.revision,
                    "heartbeats acknowledged again: unfenced; waiting for a fresh assignment before acting"
                );
            }
        }
        self.publish();
    }

    async fn fence(self: Arc<Self>) {
        loop {
            tokio::time::sleep(FENCE_TICK).await;
            let Some(age) = self.heartbeat_age() else {
                continue;
            };
            metrics::gauge!(AGENT_HEARTBEAT_AGE).set(age.as_secs_f64());
            let fence_after = lock_read(&self.servers).fence_after();
            if age > fence_after && !self.fenced.swap(true, Ordering::AcqRel) {
                lock(&self.fence_stopped).extend(
                    lock_read(&self.assignment)
                        .vms
                        .iter()
                        .filter(|v| v.vm.desired == VmState::Running)
                        .map(|v| v.vm.id.clone()),
                );
                metrics::gauge!(AGENT_FENCED).set(1.0);
                tracing::warn!(
                    silent_ms = age.as_millis(),
                    fence_ms = fence_after.as_millis(),
                    "no heartbeat acknowledged within the fence bound: stopping this agent's VMs (the leader moves them after down_after)"
                );
                self.publish();
            }
        }
    }

    async fn sync(self: Arc<Self>) {
        let mut turn = self.node_id() as usize;
        let mut resync = self.resync.subscribe();
        loop {
            let floor = self.floor.load(Ordering::Acquire);
            if floor == u64::MAX {
                // No heartbeat acknowledged yet: nothing to ask for.
                if resync.changed().await.is_err() {
                    return;
                }
                continue;
            }
            let target = lock_read(&self.servers).nth(turn, &self.seeds);
            turn = turn.wrapping_add(1);
            let Some(target) = target else {
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            };
            let from = lock_read(&self.assignment).revision;
            let req = pb::AgentSyncRequest {
                from_revision: from,
                min_revision: floor,
            };
            resync.borrow_and_update();
            tokio::select! {
                ended = self.follow(&target, req) => {
                    tracing::debug!(server = %target.id.short(), reason = %ended, "assignment stream ended; trying another server");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                r = resync.changed() => if r.is_err() { return },
            }
        }
    }

    /// Follows one assignment stream until it ends; answers why.
    async fn follow(&self, target: &PeerAddr, req: pb::AgentSyncRequest) -> String {
        let call = StreamCall::new(
            methods::CLUSTER_AGENT_SYNC,
            Bytes::from(req.encode_to_vec()),
        );
        let mut stream = match self.client.open_stream(target, call).await {
            Ok(s) => s,
            Err(e) => return e.to_string(),
        };
        loop {
            let msg = match stream.receiver.next().await {
                None => return "the server ended it".into(),
                Some(Err(e)) => return e.to_string(),
                Some(Ok(bytes)) => bytes,
            };
            let msg = match pb::AgentAssignment::decode(msg) {
                Ok(m) => m,
                Err(e) => return format!("undecodable assignment: {e}"),
            };
            if msg.progress {
                continue;
            }
            if let Err(why) = self.assigned(msg) {
                tracing::warn!(server = %target.id.short(), error = %why, "refused an assignment");
                return why;
            }
        }
    }

    /// A new assignment arrived.
    fn assigned(&self, msg: pb::AgentAssignment) -> Result<(), String> {
        let vms = tern_services::agent::from_pb_vms(self.node_id(), msg.vms)
            .map_err(|e| e.to_string())?;
        let access =
            tern_services::agent::from_pb_grants(&msg.grants).map_err(|e| e.to_string())?;
        let policy = match &msg.policy {
            Some(p) => Some(
                tern_protocol::policy::TransportConfig::from_pb(p)
                    .map_err(|e| format!("the assignment's policy: {e}"))?,
            ),
            None => None,
        };
        let servers = servers_of(&msg.servers);
        if !servers.is_empty() {
            lock_write(&self.servers).list = servers;
        }
        {
            let mut a = lock_write(&self.assignment);
            if msg.revision < a.revision {
                return Ok(());
            }
            *a = Assignment {
                revision: msg.revision,
                vms,
                policy,
                access,
            };
        }
        tracing::debug!(revision = msg.revision, status = %msg.status, "assignment received");
        self.publish();
        Ok(())
    }

    /// Rebuilds the mirror and the status from what the agent holds.
    fn publish(&self) {
        let fenced = self.is_fenced();
        let a = lock_read(&self.assignment).clone();
        let s = lock_read(&self.servers).clone();
        let floor = self.floor.load(Ordering::Acquire);
        let fresh = floor != u64::MAX && a.revision >= floor;
        let mut vms = a.vms;
        if fenced {
            for v in &mut vms {
                if v.vm.desired == VmState::Running {
                    v.vm.desired = VmState::Stopped;
                }
                v.vm.migrate_to = 0;
            }
        } else {
            let mut stopped = lock(&self.fence_stopped);
            stopped.retain(|id| vms.iter().any(|v| v.vm.id == *id));
            for v in &mut vms {
                if stopped.contains(&v.vm.id)
                    && v.vm.desired == VmState::Running
                    && !v.vm.is_migrating()
                    && matches!(v.vm.observed, VmState::Running | VmState::Pending)
                {
                    v.vm.observed = VmState::Pending;
                }
            }
        }
        let node = self.node_id();
        let mirror = ClusterState::agent_mirror(tern_state::AgentView {
            node,
            revision: a.revision,
            vms,
            servers: s.list.clone(),
            policy: a.policy,
            access: a.access,
        });
        *lock_write(&self.mirror) = mirror;
        self.status.send_modify(|st| {
            st.node_id = node;
            if st.role != RaftRole::Shutdown {
                st.role = RaftRole::Agent;
            }
            // Acting is allowed on a fresh assignment, and while fenced
            // (to stop everything).
            st.leader_id = if fresh || fenced {
                s.leader.or(Some(0))
            } else {
                None
            };
            st.applied_index = a.revision;
            st.commit_index = a.revision;
            st.members = s
                .list
                .iter()
                .map(|(id, m)| tern_services::consensus::MemberStatus {
                    node_id: *id,
                    member: m.clone(),
                    voter: true,
                })
                .collect();
        });
        self.changes.send_modify(|n| *n = a.revision.max(*n + 1));
    }

    async fn report(&self, command: Command) -> Result<Response, ConsensusError> {
        let Command::ReportVm { request_id, report } = command else {
            return Err(ConsensusError::Unavailable {
                reason: format!("an agent proposes only its reports, not {command}"),
            });
        };
        if self.is_fenced() {
            return Err(ConsensusError::Unavailable {
                reason: "fenced (no heartbeat acknowledged): reports wait until the leader hears this agent again".into(),
            });
        }
        let running = (report.observed == VmState::Running).then(|| report.vm_id.clone());
        let req = pb::AgentReportRequest {
            request_id,
            vm_id: report.vm_id,
            node_id: self.node_id(),
            observed: tern_services::vm::pb_state(report.observed) as i32,
            reason: report.reason,
            log_path: report.log_path,
        };
        let target = lock_read(&self.servers).target(0, &self.seeds);
        let Some(target) = target else {
            return Err(ConsensusError::Unavailable {
                reason: "no server known".into(),
            });
        };
        match self
            .call::<_, pb::VmRecord>(&target, methods::CLUSTER_AGENT_REPORT, &req)
            .await
        {
            Ok(vm) => {
                if let Some(id) = running
                    && lock(&self.fence_stopped).remove(&id)
                {
                    // Running again: the record speaks for itself now.
                    self.publish();
                }
                Ok(Response::Vm(Box::new(tern_state::VmRecord {
                    id: vm.id,
                    node_id: vm.node_id,
                    generation: vm.generation,
                    ..tern_state::VmRecord::default()
                })))
            }
            Err(CallError::Application(s)) if s.code == Code::FailedPrecondition => {
                self.learn_leader(&target).await;
                Err(ConsensusError::NotLeader { leader: None })
            }
            Err(CallError::Application(s)) => Err(ConsensusError::Unavailable {
                reason: s.to_string(),
            }),
            Err(e) => {
                lock_write(&self.servers).leader = None;
                Err(ConsensusError::Unavailable {
                    reason: e.to_string(),
                })
            }
        }
    }
}

impl Consensus for AgentLink {
    fn write(&self, command: Command) -> BoxFuture<'_, Result<Response, ConsensusError>> {
        Box::pin(self.report(command))
    }

    fn read(&self, read: &mut dyn FnMut(&ClusterState)) -> Result<(), ConsensusError> {
        read(&lock_read(&self.mirror));
        Ok(())
    }

    fn status(&self) -> watch::Receiver<RaftStatus> {
        self.status.subscribe()
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn lock_read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn lock_write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_protocol::PeerId;

    fn member(n: u8) -> (NodeId, Member) {
        (
            NodeId::from(n),
            Member::new(
                PeerAddr::new(PeerId::from_bytes([n; 32])),
                Capacity::default(),
            ),
        )
    }

    #[test]
    fn the_leader_is_asked_first_then_servers_in_turn() {
        let mut s = Servers {
            list: vec![member(1), member(2), member(3)],
            ..Servers::default()
        };
        let seeds = [PeerAddr::new(PeerId::from_bytes([9; 32]))];
        assert_eq!(
            s.target(1, &seeds).map(|a| a.id),
            Some(PeerId::from_bytes([2; 32]))
        );
        s.leader = Some(3);
        assert_eq!(
            s.target(1, &seeds).map(|a| a.id),
            Some(PeerId::from_bytes([3; 32]))
        );
        let none = Servers::default();
        assert_eq!(
            none.target(5, &seeds).map(|a| a.id),
            Some(PeerId::from_bytes([9; 32])),
            "seeds before any server is known"
        );
    }

    #[test]
    fn agents_spread_their_heartbeats_over_the_followers() {
        let mut s = Servers {
            list: vec![member(3), member(1), member(2)],
            leader: None,
            ..Servers::default()
        };
        assert_eq!(s.home(10), None, "no home while the leader is unknown");
        s.leader = Some(2);
        let homes: Vec<PeerId> = (0..4).filter_map(|me| s.home(me)).map(|a| a.id).collect();
        assert_eq!(
            homes,
            [1u8, 3, 1, 3].map(|n| PeerId::from_bytes([n; 32])),
            "the followers by node id in turn, never the leader"
        );
        let alone = Servers {
            list: vec![member(1)],
            leader: Some(1),
            ..Servers::default()
        };
        assert_eq!(alone.home(7), None, "a leader alone takes them all");
    }

    #[test]
    fn a_servers_timing_below_the_minimums_is_raised() {
        let mut s = Servers::default();
        s.set_timing(0, 0);
        assert_eq!(s.heartbeat_interval, MIN_HEARTBEAT_INTERVAL);
        assert_eq!(s.down_after, MIN_AGENT_DOWN_AFTER);
        s.set_timing(2_000, 30_000);
        assert_eq!(s.heartbeat_interval, Duration::from_secs(2));
        assert_eq!(s.down_after, Duration::from_secs(30));
    }

    #[test]
    fn an_acknowledgement_slower_than_the_fence_does_not_count() {
        let fence = Duration::from_secs(10);
        assert!(ack_in_time(Duration::from_millis(3), fence));
        assert!(ack_in_time(fence, fence));
        assert!(!ack_in_time(fence + Duration::from_millis(1), fence));
    }

    #[test]
    fn the_fence_is_a_third_of_the_down_bound() {
        let s = Servers {
            down_after: Duration::from_secs(30),
            ..Servers::default()
        };
        assert_eq!(s.fence_after(), Duration::from_secs(10));
    }
}
